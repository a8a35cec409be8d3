"""Next-token draws for the rows of one parallel-refinement forward, guessed cheaply from a shortlist first.

Why full logits only where a token is drawn: docs/parallel.md ("Logits only where needed").
"""

from __future__ import annotations

import torch

from sampler.constrained import TreeMasks
from sampler.logits import draw_tokens, gumbel_noise, softcap
from sampler.parallel_tree import GuessTree
from sampler.runtime.certified_head import CertifiedHead, draw_alone_decides
from sampler.types import SamplingParams


class Shortlist:
    """A ring of up to `capacity` likely next tokens and their LM-head rows, per sequence.

    Fed with the context's tokens and every token drawn from full logits, so it follows the
    text (adding each row's top-k as well measured no better). `weight[:size]` are the head
    rows of `ids[:size]`, in float32.
    """

    def __init__(self, head_weight: torch.Tensor, capacity: int) -> None:
        self.head_weight = head_weight  # (V, d)
        self.capacity = capacity
        self.ids = torch.zeros(capacity, dtype=torch.long)
        self.weight = head_weight.new_empty(capacity, head_weight.shape[1], dtype=torch.float32)  # (capacity, d)
        self.slot: dict[int, int] = {}
        self.size = 0
        self._next = 0

    def add(self, tokens: list[int]) -> None:
        fresh = list(dict.fromkeys(t for t in tokens if t not in self.slot))[-self.capacity :]
        if not fresh:
            return
        slots = []
        for token in fresh:
            slot = self._next
            self._next = (self._next + 1) % self.capacity
            old = int(self.ids[slot])
            if self.size == self.capacity and self.slot.get(old) == slot:
                del self.slot[old]
            self.slot[token] = slot
            slots.append(slot)
            self.size = min(self.size + 1, self.capacity)
        idx = torch.tensor(slots)
        ids = torch.tensor(fresh)
        self.ids[idx] = ids
        rows = self.head_weight.index_select(0, ids.to(self.head_weight.device)).float()
        self.weight[idx.to(self.weight.device)] = rows


class Draws:
    """Next-token choices for the R draw rows of one forward: row 0 is the root, row 1 + i is
    tree node i, and row r predicts absolute position positions[r].

    `exact[r]` is drawn from full logits exactly as AR would draw it (same logits, same noise
    keyed by (seed, position)); `guess[r]` comes from the shortlist and is only used to decide
    which rows to compute exactly and what to try next. `head` is the model's own output
    module, so a head call over k rows gets the kernel AR's does (sampler/runtime/cpu_linear.py);
    its logits are soft-capped by `cap` as the model's forward does. `shortlist` None: no guesses.
    `masks` (a grammar's, per row): every draw, exact or guessed, is over the masked logits, as
    AR masks its draw (docs/parallel.md, "Structured output"); `hidden` stays raw for logprobs.
    `certified` (the head's half-precision path, sampler/runtime/certified_head.py) draws the
    same tokens without full logits where the draw alone decides (no mask, top-k or top-p).
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        positions: list[int],
        *,
        head: torch.nn.Module,
        cap: float | None,
        vocab_size: int,
        params: SamplingParams,
        seed: int,
        shortlist: Shortlist | None,
        masks: TreeMasks | None = None,
        certified: CertifiedHead | None = None,
        noise_rows: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.hidden, self.positions = hidden, positions  # hidden: (R, d)
        self.certified = certified if masks is None and draw_alone_decides(params) else None
        self.head, self.cap, self.vocab_size = head, cap, vocab_size
        self.params, self.seed, self.shortlist, self.masks = params, seed, shortlist, masks
        self.exact: dict[int, int] = {}
        # position -> (V,) Gumbel noise (sampling only); `noise_rows`: the sequence's own, kept
        # across forwards (a row depends only on (seed, position), so it is drawn once).
        self._noise: dict[int, torch.Tensor] = {} if noise_rows is None else noise_rows
        self.guess: list[int] = [-1] * len(positions)  # -1: no guess (the shortlist is off)
        if shortlist is not None:
            ids = shortlist.ids[: shortlist.size]
            # float32 even for a bfloat16 model: R x S x d is small, and fp32 GEMM is fast here.
            approx = softcap(hidden.float() @ shortlist.weight[: shortlist.size].T, cap)  # (R, S)
            if masks is not None:
                approx = approx.masked_fill(~masks.allowed(ids).to(approx.device), float("-inf"))
            noise = None if params.greedy else self._noise_rows(positions)[:, ids]
            # Unfiltered by top-k / top-p: a guess only picks what to verify.
            picked = draw_tokens(approx, noise, temperature=params.temperature, top_k=0, top_p=1.0)
            self.guess = ids[picked].tolist()

    def _noise_rows(self, positions: list[int]) -> torch.Tensor:
        """(len(positions), V) noise; each position's row is drawn once and reused."""
        for position in positions:
            if position not in self._noise:
                self._noise[position] = gumbel_noise(self.seed, [position], self.vocab_size)[0]
        return torch.stack([self._noise[p] for p in positions])

    def best(self, row: int) -> int:
        return self.exact.get(row, self.guess[row])

    def missing(self, rows: list[int]) -> list[int]:
        """`rows` without repeats and without those already drawn exactly."""
        return [r for r in dict.fromkeys(rows) if r not in self.exact]

    def ensure(self, rows: list[int]) -> None:
        """Full logits for `rows` (one head call), drawn with AR's arithmetic (`draw_tokens`)."""
        rows = self.missing(rows)
        if rows and not self.draw_certified(rows):
            self.take(rows, softcap(self.head(self.hidden[rows]), self.cap))

    def draw_certified(self, rows: list[int]) -> bool:
        """Draw `rows` (new, distinct) through the certified head; False where it cannot."""
        if self.certified is None:
            return False
        p = self.params
        noise = None if p.greedy else self._noise_rows([self.positions[r] for r in rows])
        tokens = self.certified.draw(self.hidden[rows], cap=self.cap, temperature=p.temperature, noise=noise)
        if tokens is None:
            return False
        self._record(rows, tokens)
        return True

    def take(self, rows: list[int], logits: torch.Tensor) -> None:
        """Draw `rows` (new, distinct) from their soft-capped full `logits` (k, V)."""
        p = self.params
        if self.masks is not None:
            logits = logits.clone()  # a slice of a shared head call (`ensure_together`)
            self.masks.mask_(logits, rows)
        noise = None if p.greedy else self._noise_rows([self.positions[r] for r in rows])
        tokens = draw_tokens(logits, noise, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p).tolist()
        self._record(rows, tokens)

    def _record(self, rows: list[int], tokens: list[int]) -> None:
        self.exact.update(zip(rows, tokens, strict=True))
        if self.shortlist is not None:
            self.shortlist.add(tokens)

    def guessed_path(self, tree: GuessTree, row: int) -> list[int]:
        """`row` and the rows reached from it by following the current best tokens."""
        rows = [row]
        while (node := tree.kids_of_row(row).get(self.best(row))) is not None:
            row = 1 + node
            rows.append(row)
        return rows


def ensure_together(requests: list[tuple[Draws, list[int]]]) -> None:
    """`Draws.ensure` for several sequences' draws with ONE head call over all their rows: the
    head's weight streams once per batched step instead of once per sequence. Every `Draws`
    must share the head and cap (one model). Each still draws with its own parameters and
    noise, so the tokens are the ones a separate `ensure` would draw."""
    todo = [(draws, draws.missing(rows)) for draws, rows in requests]
    todo = [(draws, rows) for draws, rows in todo if rows]
    if len(todo) <= 1:  # `ensure` may draw through the certified head
        for draws, rows in todo:
            draws.ensure(rows)
        return
    first = todo[0][0]
    logits = softcap(first.head(torch.cat([draws.hidden[rows] for draws, rows in todo])), first.cap)  # (sum k, V)
    start = 0
    for draws, rows in todo:
        draws.take(rows, logits[start : start + len(rows)])
        start += len(rows)
