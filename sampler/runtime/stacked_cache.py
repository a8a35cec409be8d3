"""Read-only stacking of batch-1 KV caches into one left-padded view for a shared forward.

Used by the block-diffusion decoder (docs/diffusion.md, "Code layout"): each row keeps its own
batch-1 cache, and one decoder forward reads them all through a `CacheView` it never writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


class CacheView:
    """Read-only stacked KV for one forward: what transformers' `append_to_cache` reads.

    The DiffusionGemma decoder only concatenates `layers[i].keys/values` with the canvas K/V
    and never writes, so a plain holder of (B, H, L, D) tensors is enough.
    """

    is_compileable = False

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers


@dataclass
class _LayerKV:
    keys: torch.Tensor  # (B, H, L, D)
    values: torch.Tensor  # (B, H, L, D)


class StackedCache(NamedTuple):
    view: CacheView
    # None when no row needs padding (the unpadded batch-1 path); else a boolean
    # (B, 1, C, L + C) mask per layer type.
    masks: dict[str, torch.Tensor] | None


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """(1, H, n, D) → (1, H, length, D) with zeros on the left (length >= n)."""
    missing = length - x.shape[-2]
    if missing == 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], missing, x.shape[3]), x], dim=-2)


def stack_caches(caches: list[Any], layer_types: list[str], query_length: int, device: torch.device) -> StackedCache:
    """Batch-1 caches as one left-padded (B, H, L, D) view per layer, plus attention masks.

    Left padding keeps every row's real columns last (right padding would be wrong). A row's
    mask row sees its own cached columns (the last n_b of L) and all `query_length` new
    columns (the decoder's canvas, attended bidirectionally). One cache: its own tensors.
    """
    layers: list[Any] = []
    lengths: dict[str, tuple[list[int], int]] = {}  # layer type -> (columns per row, longest)
    for i, layer_type in enumerate(layer_types):
        per_row = [cache.layers[i] for cache in caches]
        sizes = [layer.keys.shape[-2] for layer in per_row]
        longest = max(sizes)
        lengths.setdefault(layer_type, (sizes, longest))
        if len(caches) == 1:
            layers.append(_LayerKV(per_row[0].keys, per_row[0].values))
        else:
            layers.append(
                _LayerKV(
                    torch.cat([_left_pad(x.keys, longest) for x in per_row]),
                    torch.cat([_left_pad(x.values, longest) for x in per_row]),
                )
            )
    if all(min(sizes) == longest for sizes, longest in lengths.values()):
        return StackedCache(CacheView(layers), None)
    masks = {}
    for layer_type, (sizes, longest) in lengths.items():
        columns = torch.arange(longest + query_length, device=device)
        first_real = torch.tensor([longest - n for n in sizes], device=device)
        visible = columns[None, :] >= first_real[:, None]  # (B, L + C)
        masks[layer_type] = visible[:, None, None, :].expand(len(caches), 1, query_length, longest + query_length)
    return StackedCache(CacheView(layers), masks)
