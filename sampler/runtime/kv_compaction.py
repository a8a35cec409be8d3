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
