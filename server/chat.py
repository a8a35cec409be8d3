"""Prompt building at the edge: chat templates and tokenisation (the sampler sees ids only)."""

from __future__ import annotations

from typing import Any

from server.protocol import ChatMessage

# Gemma's turn format, for checkpoints that ship no chat template (the 270M GGUF is a
# pretrained base model). A system or developer message is folded into the first user
# turn, as Gemma's own template does; the assistant role is called "model".
GEMMA_TURN_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] in ('system', 'developer') -%}"
    "{%- set first_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "<start_of_turn>{{ role }}\n"
    "{{ (first_prefix if loop.first else '') + message['content'] | trim }}<end_of_turn>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model\n{%- endif -%}"
)
END_OF_TURN = "<end_of_turn>"


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """Token ids of `messages` rendered by the checkpoint's template (or Gemma's turns)."""
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    if plain[0]["role"] in ("system", "developer") and len(plain) == 1:
        # A lone system message still needs a user turn to answer.
        plain.append({"role": "user", "content": ""})
    template = getattr(tokenizer, "chat_template", None) or GEMMA_TURN_TEMPLATE
    text = tokenizer.apply_chat_template(plain, chat_template=template, add_generation_prompt=True, tokenize=False)
    # The template already wrote BOS; don't let the tokenizer add a second one.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Completion prompts get the tokenizer's special tokens (Gemma needs its BOS)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def chat_stop_token_ids(tokenizer: Any) -> list[int]:
    """The end-of-turn token ends a chat reply even when the config's EOS list lacks it."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    unk = getattr(tokenizer, "unk_token_id", None)
    return [] if token_id is None or token_id == unk else [int(token_id)]
