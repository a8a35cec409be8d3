"""Dropping some of the rows a forward just appended to a transformers KV cache, in place.

A forward over several guessed branches appends a row per guess; only the verified ones may stay
(docs/parallel.md, "How it works").
"""

from __future__ import annotations

from typing import Any

import torch


def keep_new_rows(cache: Any, num_new: int, keep: list[int]) -> None:
    """Keep rows `keep` (ascending, < num_new) of the `num_new` rows just appended to every
    layer of `cache` (a transformers DynamicCache), compacted in order, and drop the rest.

    Keys/values are (B, H, L, D) with the new rows last. Kept rows are copied down in place,
    then `crop` drops the tail; for sliding layers that crop also trims the recorded past
    back to `window - 1` rows (so the next forward's mask sizes hold), which needs the cache's
    past recording on (`activate_past_recording`) while the rows are appended.
    """
    n = len(keep)
    if keep != list(range(n)):
        for layer in cache.layers:
            if not getattr(layer, "is_initialized", True) or layer.keys is None:
                continue
            base = layer.keys.shape[-2] - num_new
            idx = torch.tensor(keep, device=layer.keys.device) + base
            layer.keys[:, :, base : base + n] = layer.keys.index_select(2, idx)
            layer.values[:, :, base : base + n] = layer.values.index_select(2, idx)
    cache.crop(n - num_new)


class TreeBatchCache:
    """The KV cache of one batched verification forward: reads the sequences' stacked past,
    records the new rows, writes nothing back by itself.

    `past[l]` is layer l's left-padded (B, H, P_l, D) keys and values (sampler/runtime/
    stacked_cache.py); `update` (the one method a Gemma attention layer calls) returns the past
    with the forward's (B, H, Q, D) rows appended and keeps those rows in `new[l]`, so that
    `append_kept_rows` can give each sequence its accepted ones afterwards.
    """

    is_compileable = False

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.new[layer_idx] = (keys, values)
        past_keys, past_values = self.past[layer_idx]
        return torch.cat([past_keys, keys], dim=-2), torch.cat([past_values, values], dim=-2)


def append_kept_rows(cache: Any, batch: TreeBatchCache, row: int, keep: list[int]) -> None:
    """Append rows `keep` (ascending) of batch row `row`'s new KV rows to the batch-1 DynamicCache
    `cache`, leaving it exactly as `keep_new_rows` after an own forward would: full layers
    grow by len(keep); sliding layers keep their last `window - 1` rows and count every
    token in `cumulative_length`."""
    for layer_idx, layer in enumerate(cache.layers):
        if layer_idx not in batch.new:
            continue
        keys, values = batch.new[layer_idx]  # (B, H, Q, D)
        idx = torch.tensor(keep, device=keys.device)
        layer.keys = torch.cat([layer.keys, keys[row : row + 1].index_select(2, idx)], dim=-2)
        layer.values = torch.cat([layer.values, values[row : row + 1].index_select(2, idx)], dim=-2)
        if getattr(layer, "is_sliding", False):
            layer.keys = layer.keys[:, :, -layer.sliding_window + 1 :]
            layer.values = layer.values[:, :, -layer.sliding_window + 1 :]
            layer.cumulative_length += len(keep)
