"""Packed prefill: several fresh prompts in ONE row of one forward, without padding.

Left-padding a group of prompts to the longest costs what the padding's tokens cost (a burst of
16 chat prompts of 14-53 tokens wastes about a third of the forward). Packed, the prompts sit
end to end in one row of S = sum(lengths) tokens; a block-diagonal causal mask keeps each
prompt to its own tokens (and, on sliding-window layers, to its window), and positions restart
at 0 on each prompt. The forward's cache then holds every prompt's KV side by side in one row
(sliding layers record every column); `unpack_cache` cuts it into one left-padded row per
prompt, the layout the AR decode batch keeps (sampler/runtime/kv_batch.py). docs/load.md,
"Prefill under load", has the measurement.

Shapes: S packed tokens, B prompts, H KV heads, D head dim, L = max(lengths).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig


def packing_layout(config: Any) -> tuple[list[str], int] | None:
    """(layer types, sliding window) when packing works for a model with this transformers config:
    a transformers config (a cache can be built from it) whose layers are all full or
    sliding-window attention, which the model's forward takes a per-type mask dict for (Gemma 3);
    None otherwise (then groups are left-padded)."""
    if not isinstance(config, PretrainedConfig):
        return None
    layer_types = list(getattr(config, "layer_types", None) or [])
    if not layer_types or not set(layer_types) <= {"full_attention", "sliding_attention"}:
        return None
    return layer_types, int(getattr(config, "sliding_window", 0) or 0)


def packed_positions(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) positions restarting at 0 on each prompt, and (S,) the prompt index of each token."""
    positions = torch.cat([torch.arange(n) for n in lengths])
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return positions, segments


def packed_masks(
    layer_types: list[str], window: int, positions: torch.Tensor, segments: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Boolean (1, 1, S, S) masks per layer type, True = may attend: a token sees the tokens of
    its own prompt up to itself; on sliding layers only those less than `window` positions back
    (as a query at q sees a key at p when q - p < window in AR decoding)."""
    own = segments[:, None] == segments[None, :]
    back = positions[:, None] - positions[None, :]  # (S, S): query position - key position
    allowed = own & (back >= 0)
    masks: dict[str, torch.Tensor] = {}
    for kind in set(layer_types):
        mask = allowed & (back < window) if kind == "sliding_attention" else allowed
        masks[kind] = mask[None, None]
    return masks


def last_rows(lengths: list[int]) -> torch.Tensor:
    """(B,) the packed index of each prompt's last token (the rows whose logits are kept)."""
    return torch.cumsum(torch.tensor(lengths), 0) - 1


def unpack_cache(cache: Any, lengths: list[int]) -> Any:
    """Cut a packed forward's cache (every layer (1, H, S, D), sliding layers recorded) into B
    rows, prompt b's columns right-aligned in row b and zeros on its left: (B, H, L, D). In place;
    returns `cache`. Sliding layers keep recording: joining the decode batch trims them."""
    starts = [0, *torch.cumsum(torch.tensor(lengths), 0).tolist()[:-1]]
    width = max(lengths)
    for layer in cache.layers:
        for part in ("keys", "values"):
            packed = getattr(layer, part)  # (1, H, S, D)
            rows = packed.new_zeros(len(lengths), packed.shape[1], width, packed.shape[3])
            for b, (start, n) in enumerate(zip(starts, lengths, strict=True)):
                rows[b, :, width - n :] = packed[0, :, start : start + n]
            setattr(layer, part, rows)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = width
    return cache
