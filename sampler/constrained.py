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
import numpy as np
import torch

_TOKENIZERS: dict[int, tuple[Any, llguidance.LLTokenizer]] = {}
_LOCK = threading.Lock()
# Closing a document before max_tokens (`Matcher.closing`): the pieces tried first, by where the
# document is: inside a string, end it; else close the innermost container; else a separator,
# then the shortest values. Separators first: inside a number a digit is allowed too, and "0"
# first grew `1000...` until the budget ran out instead of moving on to the next required key.
# Only pieces that are one token in the vocabulary are used.
_END_STRING = ['"']
_CLOSE = {"{": ["}"], "[": ["]"]}
_FILLERS = [":", ",", "0", "null", "false", '""', "[]", "{}"]
_CLOSERS: dict[int, dict[str, int]] = {}  # id(LLTokenizer) -> piece -> token id
_TOKEN_BYTES: dict[int, np.ndarray] = {}  # id(LLTokenizer) -> (V,) byte length per token (0 = special)


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
        self._tokenizer = grammar.tokenizer
        self._consumed: list[int] = []  # the document's tokens so far (where a closing starts)
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
        self._consumed.append(token)

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order from here, the grammar allows (the state is untouched).
        Stop tokens count as forbidden: a guess holding one is cut before it (the parallel
        sampler's tree pruning; its walk can still draw the stop token, docs/parallel.md)."""
        return int(self._matcher.validate_tokens(tokens)) if tokens else 0

    def forced(self) -> int | None:
        """The one token the grammar allows next, or None (several, or the document may end
        here, where the stop tokens are allowed too). Such a token is what any masked draw
        picks, greedy or sampled, so committing it without a forward changes no output."""
        if self._matcher.is_accepting() or self._matcher.is_stopped():
            return None
        ff = self._matcher.compute_ff_tokens()  # cheap: empty unless bytes are forced
        if not ff:
            return None
        llguidance.torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        words = self._bitmask[0].numpy().view(np.uint32)
        nonzero = np.flatnonzero(words)
        # Exactly one bit set: one word holding a power of two.
        if len(nonzero) != 1 or int(words[nonzero[0]]) & (int(words[nonzero[0]]) - 1):
            return None
        token = 32 * int(nonzero[0]) + int(words[nonzero[0]]).bit_length() - 1
        return token

    def tree_masks(self, paths: list[list[int]]) -> TreeMasks:
        """The masks of several draw rows at once: row i's allowed next tokens after `paths[i]`
        from here (each path allowed by the grammar: the parallel sampler pruned its tree with
        `valid_prefix`). Computed on a copy of the state, which rolls back after each path."""
        sim = self._matcher.deep_copy()
        bitmask = llguidance.torch.allocate_token_bitmask(len(paths), self._tokenizer.vocab_size)
        accepting: list[bool] = []
        for row, path in enumerate(paths):
            if path and not sim.consume_tokens(path):
                raise RuntimeError(f"grammar rejected a pruned path: {sim.get_error()}")
            llguidance.torch.fill_next_token_bitmask(sim, bitmask, row)
            accepting.append(bool(sim.is_accepting()))
            if path:
                sim.rollback(len(path))
        return TreeMasks(bitmask, accepting, self._stop_ids)

    @property
    def done(self) -> bool:
        """The document is complete and nothing may follow it."""
        return bool(self._matcher.is_stopped())

    def closing(self, limit: int) -> list[int] | None:
        """Tokens that complete the document from here, at most `limit` of them, or None.

        Found greedily on a copy of the matcher (the sequence's own is untouched), every token
        checked by the grammar, so the completed document parses and validates: tokens the
        grammar forces, else the first allowed closing piece for where the text is (end the
        string, close the innermost container, a separator, the shortest value), else the
        allowed token with the shortest text. Not always the shortest completion; docs/openai.md
        ("Structured output") says what a max_tokens cut returns.
        """
        sim = self._matcher.deep_copy()
        state = _JsonState()
        state.feed(self._tokenizer.decode_bytes(self._consumed))
        out: list[int] = []
        while len(out) <= limit:
            if sim.is_accepting():
                return out
            step = sim.compute_ff_tokens() or self._closing_token(sim, state)
            if not step or not sim.consume_tokens(step):
                return None
            state.feed(self._tokenizer.decode_bytes(step))
            out += step
        return None

    def _closing_token(self, sim: Any, state: _JsonState) -> list[int]:
        pieces = _END_STRING if state.in_string else _CLOSE.get(state.innermost, []) + _FILLERS
        closers = _closer_ids(self._tokenizer)
        for piece in pieces:
            token = closers.get(piece)
            if token is not None and sim.validate_tokens([token]) == 1:
                return [token]
        allowed = np.flatnonzero(np.unpackbits(np.frombuffer(sim.compute_bitmask(), np.uint8), bitorder="little"))
        sizes = _token_bytes(self._tokenizer)
        allowed = allowed[(allowed < len(sizes)) & (sizes[np.minimum(allowed, len(sizes) - 1)] > 0)]
        return [int(allowed[np.argmin(sizes[allowed])])] if len(allowed) else []


class TreeMasks:
    """The grammar's masks for the R draw rows of one parallel forward (`Matcher.tree_masks`),
    applied exactly as `Matcher.mask_` applies one: forbidden tokens -inf, and on rows where the
    document may end the sequence's stop tokens keep their logits."""

    def __init__(self, bitmask: torch.Tensor, accepting: list[bool], stop_ids: list[int]) -> None:
        self.bitmask = bitmask  # (R, ceil(V / 32)) int32
        self.accepting = accepting
        self.stop_ids = stop_ids

    def mask_(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Mask (k, V) `logits` in place, row j with the mask of draw row rows[j]."""
        ending = [j for j, r in enumerate(rows) if self.accepting[r]] if self.stop_ids else []
        saved = logits[ending][:, self.stop_ids].clone() if ending else None
        llguidance.torch.apply_token_bitmask_inplace(logits, self.bitmask[rows].to(logits.device))
        if saved is not None:
            logits[torch.tensor(ending)[:, None], torch.tensor(self.stop_ids)[None, :]] = saved

    def allowed(self, ids: torch.Tensor) -> torch.Tensor:
        """(R, S) bool: which of the token `ids` (S,) each row allows (stop tokens included where
        the document may end). For masking the shortlist's cheap guesses."""
        ids = ids.long()
        words = self.bitmask[:, (ids >> 5).clamp(max=self.bitmask.shape[1] - 1)]  # (R, S) int32
        bits = ((words >> (ids & 31).int()) & 1).bool() & (ids < 32 * self.bitmask.shape[1])
        if self.stop_ids:
            stops = torch.isin(ids, torch.tensor(self.stop_ids))
            bits |= stops[None, :] & torch.tensor(self.accepting)[:, None]
        return bits


class _JsonState:
    """Where a JSON text is, as far as closing it goes: inside a string or not, and the open
    containers. Fed bytes as tokens are consumed."""

    def __init__(self) -> None:
        self.in_string = False
        self._escaped = False
        self._stack: list[str] = []

    @property
    def innermost(self) -> str:
        return self._stack[-1] if self._stack else ""

    def feed(self, data: bytes) -> None:
        for ch in data.decode("utf-8", errors="replace"):
            if self.in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self._stack.append(ch)
            elif ch in "}]" and self._stack:
                self._stack.pop()


def _closer_ids(tokenizer: llguidance.LLTokenizer) -> dict[str, int]:
    """The closing pieces that are a single token of `tokenizer`, built once per tokenizer."""
    with _LOCK:
        found = _CLOSERS.get(id(tokenizer))
        if found is None:
            pieces = _END_STRING + [p for ps in _CLOSE.values() for p in ps] + _FILLERS
            found = {p: ids[0] for p in pieces if len(ids := tokenizer.tokenize_str(p)) == 1}
            _CLOSERS[id(tokenizer)] = found
        return found


def _token_bytes(tokenizer: llguidance.LLTokenizer) -> np.ndarray:
    """(V,) each token's text length in bytes, 0 for special tokens, built once per tokenizer."""
    with _LOCK:
        sizes = _TOKEN_BYTES.get(id(tokenizer))
        if sizes is None:
            sizes = np.array(
                [
                    0 if tokenizer.is_special_token(i) else len(tokenizer.decode_bytes([i]))
                    for i in range(tokenizer.vocab_size)
                ]
            )
            _TOKEN_BYTES[id(tokenizer)] = sizes
        return sizes
