"""Candidate continuations ("n-gram drafts") for the parallel refinement sampler.

From the context (what followed earlier occurrences of the current suffix) and from the
refinement trajectory (n-grams the Jacobi draft proposed, keyed by their first token); see
docs/parallel.md ("How it works"). Candidates are only guesses: the sampler verifies every one
against the model, so nothing here can change the output, only how many tokens a forward commits.
"""

from __future__ import annotations

from collections import OrderedDict


class NgramPool:
    """The token context of one sequence plus an index of where each short n-gram ended.

    Invariant: `tokens` is exactly prompt + committed output; `_ends[k][key]` lists, ascending,
    every position j with tokens[j-k+1 : j+1] == key.
    """

    def __init__(self, key_len: int = 3, trajectory_per_key: int = 4) -> None:
        if key_len < 1:
            raise ValueError("key_len must be >= 1")
        self.key_len = key_len
        self.trajectory_per_key = trajectory_per_key
        self.tokens: list[int] = []
        self._ends: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(key_len + 1)]
        # first token -> continuations, most recently proposed last (an LRU per key).
        self._trajectory: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def extend(self, new_tokens: list[int]) -> None:
        """Append committed tokens to the context and index the n-grams that now end in them."""
        for token in new_tokens:
            self.tokens.append(token)
            j = len(self.tokens) - 1
            for k in range(1, min(self.key_len, j + 1) + 1):
                key = tuple(self.tokens[j - k + 1 : j + 1])
                self._ends[k].setdefault(key, []).append(j)

    def add_trajectory(self, first: int, continuation: list[int]) -> None:
        if not continuation or self.trajectory_per_key <= 0:
            return
        entry = self._trajectory.setdefault(first, OrderedDict())
        cont = tuple(continuation)
        entry.pop(cont, None)
        entry[cont] = None
        while len(entry) > self.trajectory_per_key:
            entry.popitem(last=False)

    def candidates(self, count: int, length: int, min_key: int = 1) -> list[list[int]]:
        """Up to `count` distinct continuations (each <= `length` tokens) of the current context.

        Order is best first: longer suffix matches before shorter ones, recent before old, then
        trajectory n-grams. A candidate that is a prefix of one already chosen is skipped (the
        verification tree would merge it anyway and it would take a slot). `min_key` > 1 keeps
        only context matches of at least that many suffix tokens (the likeliest to be accepted).
        """
        out: list[list[int]] = []
        if count <= 0 or length <= 0 or not self.tokens:
            return out
        seen: set[tuple[int, ...]] = set()
        n = len(self.tokens)

        def offer(cont: tuple[int, ...]) -> bool:
            if cont and not any(c[: len(cont)] == cont for c in seen):
                seen.add(cont)
                out.append(list(cont))
            return len(out) >= count

        for k in range(min(self.key_len, n), min_key - 1, -1):
            ends = self._ends[k].get(tuple(self.tokens[n - k :]), ())
            # Most recent first; the last entry is the current suffix itself (nothing follows it).
            for j in reversed(ends):
                if j < n - 1 and offer(tuple(self.tokens[j + 1 : j + 1 + length])):
                    return out
        if min_key > 1:
            return out
        for cont in reversed(self._trajectory.get(self.tokens[-1], {})):
            if offer(cont[:length]):
                return out
        return out
