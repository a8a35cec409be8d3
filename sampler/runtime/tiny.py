"""Tiny random Gemma models and a small tokenizer, built in-process with no downloads.

They make the test suite fast: the real code paths (transformers model classes, KV caches,
chat templates, byte-level detokenisation) on a model of about a hundred thousand weights.
Everything is seeded, so a tiny model is the same in every process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Special tokens in Gemma's spelling, so the chat template is the one real Gemma uses.
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN]

# Training text for the BPE merges: English, code and a few multi-byte characters, so the
# byte-level tokens split UTF-8 characters the way real tokenizers sometimes do.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    '{"name": "dgserve", "tokens": [1, 2, 3], "ok": true}',
    "Once upon a time there was a server that generated many tokens at once.",
    "Café, naïve, résumé — 東京, 日本語, emoji 🙂🚀 and ünïcödé text.",
    "1. first item\n2. second item\n3. third item\n- bullet\n* star",
    "user: what is the capital of France? model: The capital of France is Paris.",
]


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic, < 1 s)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN],
    )


# The decoder shape both tiny models share: 2 layers, one sliding-window (16) and one full.
TINY_DECODER_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    sliding_window=16,
    layer_types=["sliding_attention", "full_attention"],
    max_position_embeddings=4096,
)


def build_tiny_gemma3(
    vocab_size: int, *, eos_token_id: int, pad_token_id: int, bos_token_id: int, seed: int = 0
) -> torch.nn.Module:
    """A 2-layer random Gemma 3 causal LM: one sliding-window (16) layer and one full layer.

    The sliding window is tiny on purpose, so tests cross it within a few dozen tokens.
    The LM head row of EOS is zeroed: its logit is then 0 while the
    maximum over the other random logits is positive, so greedy generation runs to
    max_tokens instead of stopping at a random EOS. Tests of EOS use scripted fakes.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        **TINY_DECODER_SHAPE,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        tie_word_embeddings=False,
    )
    # Default init (std 0.02) gives near-uniform logits; larger weights give a model whose
    # greedy choices are clear rather than decided by rounding.
    model = build_seeded(lambda: Gemma3ForCausalLM(config), seed, weight_std=1.0)
    with torch.no_grad():
        model.get_output_embeddings().weight[eos_token_id].zero_()
    model.generation_config.eos_token_id = [eos_token_id]
    return model.eval()


ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def build_seeded(make: Callable[[], ModelT], seed: int, *, weight_std: float) -> ModelT:
    """`make()` under a fixed seed, every matrix redrawn from N(0, weight_std): the same model in every process.

    The global RNG is forked, so building a tiny model never shifts another test's random stream.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make()
        with torch.no_grad():
            # parameters() yields each tied tensor (embedding/LM head) once.
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, weight_std)
    return model
