"""Grammar-constrained decoding for `response_format` JSON, through llguidance.

llguidance's view of the tokenizer is built once per process, at server start-up
(server/startup.py calls `llg_tokenizer`), and kept here. A request's grammar is compiled and
validated once at the HTTP edge (`json_grammar`); each sequence then owns a `Matcher` that
masks the tokens the grammar forbids before a draw and advances with every committed token. Why
llguidance, its measured costs and what a cut output guarantees: docs/openai.md ("Structured
output").
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

_TOKENIZERS: dict[int, tuple[Any, llguidance.LLTokenizer]] = {}
_LOCK = threading.Lock()


def llg_tokenizer(hf_tokenizer: Any) -> llguidance.LLTokenizer:
    """llguidance's view of a transformers fast tokenizer, built once per tokenizer object: the
    first call builds it (Gemma's 262,144 tokens take 4-7 s, holding the GIL; see docs), later
    calls return it. Keyed by identity: the tokenizer is kept alive with its entry so the id
    cannot be reused. A caller arriving during the build waits for it rather than building twice."""
    with _LOCK:
        entry = _TOKENIZERS.get(id(hf_tokenizer))
        if entry is None:
            entry = (hf_tokenizer, llguidance.hf.from_tokenizer(hf_tokenizer))
            _TOKENIZERS[id(hf_tokenizer)] = entry
        return entry[1]


@dataclass(frozen=True)
class Grammar:
    """A validated llguidance grammar and the tokenizer its token masks are for."""

    tokenizer: llguidance.LLTokenizer
    text: str  # llguidance's grammar serialization (JSON)


def json_grammar(hf_tokenizer: Any, schema: dict[str, Any] | None) -> Grammar:
    """The grammar of JSON documents valid against `schema`; None: any JSON object (json_object
    mode). Raises ValueError naming the problem when the schema cannot be compiled."""
    text = llguidance.LLMatcher.grammar_from_json_schema(
        {"type": "object"} if schema is None else json.dumps(schema),
        # Compact output: no free whitespace between tokens, so the model cannot pad forever.
        defaults={"whitespace_flexible": False},
    )
    tokenizer = llg_tokenizer(hf_tokenizer)
    error = llguidance.LLMatcher.validate_grammar(text, tokenizer)
    if error:
        raise ValueError(error)
    return Grammar(tokenizer, text)


class Matcher:
    """One sequence's position in its grammar: which next tokens are allowed, when it is done."""

    def __init__(self, grammar: Grammar, stop_token_ids: frozenset[int]) -> None:
        self._matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.text)
        if self._matcher.is_error():
            raise ValueError(self._matcher.get_error())
        self._stop_ids = sorted(stop_token_ids)
        # (1, ceil(V / 32)) int32: bit j of word i allows token 32 * i + j.
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, grammar.tokenizer.vocab_size)

    def mask_(self, logits: torch.Tensor) -> None:
        """Set the (1, V) `logits` of forbidden tokens to -inf, in place. Once the document is
        complete the sequence's own stop tokens are allowed too (llguidance knows only EOS)."""
        llguidance.torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        accepting = self._matcher.is_accepting()
        saved = logits[0, self._stop_ids].clone() if accepting and self._stop_ids else None
        llguidance.torch.apply_token_bitmask_inplace(logits, self._bitmask.to(logits.device))
        if saved is not None:
            logits[0, self._stop_ids] = saved

    def advance(self, token: int) -> None:
        """Consume a committed (non-stop) token; it was drawn under `mask_`, so it is allowed."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"grammar rejected token {token}: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The document is complete and nothing may follow it."""
        return bool(self._matcher.is_stopped())
