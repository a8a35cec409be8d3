"""Stacking batch-1 KV caches into one left-padded read-only view (no model)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sampler.runtime.stacked_cache import stack_caches

CPU = torch.device("cpu")
QUERY = 3  # new columns (the decoder's canvas)


def cache(lengths: list[int], fill: float) -> SimpleNamespace:
    """A batch-1 cache with one layer per entry of `lengths`: (1, 2, n, 4) keys = fill, values = -fill."""
    return SimpleNamespace(
        layers=[
            SimpleNamespace(keys=torch.full((1, 2, n, 4), fill), values=torch.full((1, 2, n, 4), -fill))
            for n in lengths
        ]
    )


def test_rows_are_left_padded_and_masked_per_layer_type() -> None:
    # Layer 0 is full attention (the rows hold 2 and 4 columns), layer 1 a sliding window (3 each).
    short, long = cache([2, 3], 1.0), cache([4, 3], 2.0)
    view, masks = stack_caches([short, long], ["full", "sliding"], QUERY, CPU)
    keys = view.layers[0].keys
    assert keys.shape == (2, 2, 4, 4)
    assert keys[0, :, :2].eq(0).all() and keys[0, :, 2:].eq(1).all() and keys[1].eq(2).all()
    assert view.layers[0].values[0, :, 2:].eq(-1).all()
    assert view.layers[1].keys.shape == (2, 2, 3, 4)
    assert masks is not None and set(masks) == {"full", "sliding"}
    assert masks["full"].shape == (2, 1, QUERY, 4 + QUERY)
    assert masks["full"][0, 0, 0].tolist() == [False, False] + [True] * (2 + QUERY)
    assert masks["full"][1].all()
    assert masks["sliding"].all()


def test_equal_lengths_need_no_mask() -> None:
    _, masks = stack_caches([cache([3], 1.0), cache([3], 2.0)], ["full"], QUERY, CPU)
    assert masks is None


def test_one_row_is_its_own_cache() -> None:
    alone = cache([5, 2], 1.0)
    view, masks = stack_caches([alone], ["full", "sliding"], QUERY, CPU)
    assert masks is None
    assert view.layers[1].keys is alone.layers[1].keys
