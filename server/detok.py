"""Incremental detokenisation with stop strings, for one choice of one request.

Invariants: text handed out is never retracted; it never ends inside a multi-byte
character (a trailing U+FFFD means an incomplete byte sequence, held back until completed);
it never contains any part of a stop string, even one that spans token or chunk boundaries
(a tail that could still grow into a stop string is held back until it cannot).
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Decodes only a short window of tokens per step (vLLM's `detokenize_incrementally` idea).

    `ids[prefix_offset:read_offset]` are tokens already turned into text, kept as context:
    decoding a token alone can differ from decoding it after its neighbours (a tokenizer may
    drop a leading space or merge bytes), so the new text is `decode(ids[prefix_offset:])`
    minus `decode(ids[prefix_offset:read_offset])`. The sum of these deltas equals a decode
    of all ids, for the cost of a few tokens per step instead of the whole output.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._decoded = ""  # decode(ids[:read_offset]): the text up to the last complete character
        self._emitted = 0  # chars of `_decoded` already handed out
        self.stopped = False
        # Tokens consumed up to and including the one that completed a stop string.
        self.num_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _read_new_text(self) -> str:
        """Text the unread tokens add, or "" while they end inside a character (or add none).

        Offsets move only when text is read, so the window always starts on a character boundary.
        """
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def _hold_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def add(self, token_ids: list[int]) -> str:
        """Feed committed tokens; return the new text that is safe to show."""
        if self.stopped or not token_ids:
            return ""
        for token in token_ids:
            # One token at a time so a stop string is caught at the token that completes it.
            self._ids.append(token)
            self.num_tokens += 1
            new_text = self._read_new_text()
            if not new_text:
                continue
            self._decoded += new_text
            if self._stop:
                # Only the new tail (plus a stop string's length of context) can hold a match.
                start = max(0, self._emitted - max(len(s) for s in self._stop))
                hits = [i for i in (self._decoded.find(s, start) for s in self._stop) if i >= 0]
                if hits:
                    self._decoded = self._decoded[: min(hits)]
                    self.stopped = True
                    break
        return self._take(final=self.stopped)

    def _take(self, final: bool) -> str:
        text = self._decoded
        end = len(text) if final else len(text) - self._hold_back(text)
        end = max(end, self._emitted)
        out = text[self._emitted : end]
        self._emitted = end
        return out

    def flush(self) -> str:
        """At the end of generation: hand out held-back text (it can no longer become a stop)."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            tail = self._decode(self._ids[self._prefix_offset :])[len(prefix_text) :]
            # A dangling partial character at the very end is dropped, not shown as U+FFFD.
            self._decoded += tail.rstrip("\ufffd") if tail.endswith("\ufffd") else tail
        return self._take(final=True)
