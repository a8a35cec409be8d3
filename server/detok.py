"""Incremental detokenisation with stop strings, for one choice of one request.

Invariants: text handed out is never retracted; it never ends inside a multi-byte
character (a trailing U+FFFD means an incomplete byte sequence, held back until completed);
it never contains any part of a stop string, even one that spans token or chunk boundaries
(a tail that could still grow into a stop string is held back until it cannot).
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._ids: list[int] = []
        self._decoded = ""  # decode(all ids) the last time it ended on a complete character
        self._emitted = 0  # chars of the visible text already handed out
        self.stopped = False
        # Tokens consumed up to and including the one that completed a stop string.
        self.num_tokens = 0

    def _visible(self) -> str:
        return self._decoded

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
            text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # incomplete multi-byte character: wait for its other bytes
            self._decoded = text
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
        out = text[self._emitted:end]
        self._emitted = end
        return out

    def flush(self) -> str:
        """At the end of generation: hand out held-back text (it can no longer become a stop)."""
        if not self.stopped and self._ids:
            text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
            # A dangling partial character at the very end is dropped, not shown as U+FFFD.
            self._decoded = text.rstrip("\ufffd") if text.endswith("\ufffd") else text
        return self._take(final=True)

    @property
    def text(self) -> str:
        return self._decoded[: self._emitted]
