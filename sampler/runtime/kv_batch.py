"""A batch of sequences sharing one transformers KV cache, for one decode forward per step.

Layout: every row has the same number T of cache columns; a row with fewer real tokens is
LEFT-padded (right padding is wrong: new tokens must land in the same column for all rows).
`attention_mask` (B, T) marks real columns with 1. Each row's real tokens are therefore the
last r_i columns, so sliding-window layers, which keep only the last W-1 columns, keep every
row's own window. Rows join (after a prefill: one row, or several left-padded rows of one
batched prefill) and leave between steps; after a row leaves, columns that are padding in
every row are trimmed, so T stays the longest row. A joining cache whose sliding layers kept
more columns (past recording, for the prefix cache) is cut back to the window here.

Cache layer tensors are (B, H, C, D) with C = T for full-attention layers and
min(T, W-1) for sliding-window layers (their `cumulative_length` is T).
"""

from __future__ import annotations

from typing import Any

import torch


def _layer_columns(layer: Any, total: int) -> int:
    if getattr(layer, "is_sliding", False):
        return min(total, layer.sliding_window - 1)
    return total


def _left_pad(x: torch.Tensor, columns: int) -> torch.Tensor:
    """(B, H, C, D) → (B, H, columns, D), zeros on the left (columns >= C)."""
    missing = columns - x.shape[-2]
    if missing <= 0:
        return x[:, :, x.shape[-2] - columns :, :]
    pad = x.new_zeros(x.shape[0], x.shape[1], missing, x.shape[3])
    return torch.cat([pad, x], dim=-2)


def _stop_recording(cache: Any, total: int) -> None:
    """Sliding layers that recorded their past (record_past) keep only their window from here."""
    for layer in cache.layers:
        if getattr(layer, "record_past", False):
            layer.record_past = False
            columns = _layer_columns(layer, total)
            layer.keys, layer.values = layer.keys[:, :, -columns:, :], layer.values[:, :, -columns:, :]


def _zero_padding(cache: Any, rows_mask: torch.Tensor) -> None:
    """Padding columns hold zeros, whatever a padded prefill computed there: masked columns
    must stay finite (a NaN times a zero attention weight is still NaN)."""
    if bool(rows_mask.all()):
        return
    for layer in cache.layers:
        # masked_fill, not a product: NaN * 0 is NaN.
        pad = rows_mask[:, None, -layer.keys.shape[-2] :, None] == 0
        layer.keys, layer.values = layer.keys.masked_fill(pad, 0), layer.values.masked_fill(pad, 0)


def _set_total(cache: Any, total: int) -> None:
    for layer in cache.layers:
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = total


class KVBatch:
    """Rows of sequences in one left-padded cache. Row order is `seq_ids`."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.seq_ids: list[str] = []
        self.attention_mask: torch.Tensor | None = None  # (B, T) long
        self.lengths: list[int] = []  # real tokens per row, r_i <= T

    @property
    def total(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def has_padding(self) -> bool:
        """Whether any row is shorter than T (left padding present)."""
        return any(r != self.total for r in self.lengths)

    def join(self, seq_ids: list[str], cache: Any, lengths: list[int]) -> None:
        """Add the rows of a prefilled `cache`: row i holds `lengths[i]` real tokens, left-padded
        to max(lengths) columns (a batch-1 prefill is one row without padding)."""
        device = cache.layers[0].keys.device
        width = max(lengths)
        rows_mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], dtype=torch.long, device=device)
        _stop_recording(cache, width)
        _zero_padding(cache, rows_mask)
        if self.cache is None:
            self.cache, self.attention_mask = cache, rows_mask
            self.seq_ids, self.lengths = list(seq_ids), list(lengths)
            return
        total = max(self.total, width)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            columns = _layer_columns(mine, total)
            mine.keys = torch.cat([_left_pad(mine.keys, columns), _left_pad(theirs.keys, columns)])
            mine.values = torch.cat([_left_pad(mine.values, columns), _left_pad(theirs.values, columns)])
        _set_total(self.cache, total)
        assert self.attention_mask is not None
        old = torch.nn.functional.pad(self.attention_mask, (total - self.total, 0))
        new = torch.nn.functional.pad(rows_mask, (total - width, 0))
        self.attention_mask = torch.cat([old, new])
        self.seq_ids += seq_ids
        self.lengths += lengths

    def mask_for_step(self) -> torch.Tensor:
        """(B, T + 1): the mask a forward over one new token per row needs."""
        assert self.attention_mask is not None
        ones = self.attention_mask.new_ones(len(self), 1)
        return torch.cat([self.attention_mask, ones], dim=1)

    def advance(self, step_mask: torch.Tensor) -> None:
        """After a one-token forward: every row gained one real column."""
        self.attention_mask = step_mask
        self.lengths = [r + 1 for r in self.lengths]

    def remove(self, seq_ids: set[str]) -> None:
        keep = [i for i, s in enumerate(self.seq_ids) if s not in seq_ids]
        if len(keep) == len(self.seq_ids):
            return
        if not keep:
            self.__init__()  # type: ignore[misc]
            return
        index = torch.tensor(keep, device=self.attention_mask.device)  # type: ignore[union-attr]
        assert self.attention_mask is not None
        mask = self.attention_mask.index_select(0, index)
        # Columns that are padding in every remaining row carry nothing: drop them.
        drop = int(mask.any(dim=0).long().argmax()) if mask.numel() else 0
        total = mask.shape[1] - drop
        for layer in self.cache.layers:
            columns = _layer_columns(layer, total)
            layer.keys = layer.keys.index_select(0, index)[:, :, -columns:, :]
            layer.values = layer.values.index_select(0, index)[:, :, -columns:, :]
        _set_total(self.cache, total)
        self.attention_mask = mask[:, drop:]
        self.seq_ids = [self.seq_ids[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
