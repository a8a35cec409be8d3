"""Packed prefill (sampler/runtime/packed_prefill.py): fresh prompts end to end in one row."""

from __future__ import annotations

import torch

from sampler.ar import ARSampler
from sampler.runtime.packed_prefill import last_rows, packed_masks, packed_positions, unpack_cache
from sampler.types import SamplingParams
from server.engine_core import run_to_completion

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def test_positions_restart_on_each_prompt():
    positions, segments = packed_positions([2, 3, 1])
    assert positions.tolist() == [0, 1, 0, 1, 2, 0]
    assert segments.tolist() == [0, 0, 1, 1, 1, 2]
    assert last_rows([2, 3, 1]).tolist() == [1, 4, 5]


def test_masks_keep_each_prompt_to_itself_and_its_window():
    positions, segments = packed_positions([2, 3])
    masks = packed_masks(["sliding_attention", "full_attention"], 2, positions, segments)
    full = masks["full_attention"][0, 0].int().tolist()
    assert full == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    # Window 2: a query sees itself and one position back.
    sliding = masks["sliding_attention"][0, 0].int().tolist()
    assert sliding[4] == [0, 0, 0, 1, 1] and sliding[1] == [1, 1, 0, 0, 0]


class _Layer:
    def __init__(self, keys: torch.Tensor) -> None:
        self.keys, self.values, self.cumulative_length = keys, keys + 100, keys.shape[-2]


class _Cache:
    def __init__(self, keys: torch.Tensor) -> None:
        self.layers = [_Layer(keys)]


def test_unpack_right_aligns_each_prompt_over_zeros():
    packed = torch.arange(1, 6, dtype=torch.float32).reshape(1, 1, 5, 1)  # prompts [1, 2] and [3, 4, 5]
    cache = unpack_cache(_Cache(packed), [2, 3])
    layer = cache.layers[0]
    assert layer.keys[:, 0, :, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert layer.values[1, 0, :, 0].tolist() == [103, 104, 105] and layer.values[0, 0, 0, 0] == 0
    assert layer.cumulative_length == 3


class _CountingForwards:
    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[int, ...]] = []
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: object, _args: object, kwargs: dict) -> None:
        self.calls.append(tuple(kwargs["input_ids"].shape))

    def close(self) -> None:
        self._handle.remove()


def test_tiny_gemma_packed_burst_is_one_unpadded_forward_with_each_prompts_tokens(tiny_loaded):
    # Lengths below, at and past the tiny model's 16-token sliding window, arriving together.
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    texts = ["a", "Hello, world", "The quick brown fox jumps over the lazy dog", "x = [1, 2, 3] " * 6]
    prompts = {f"p{i}": tok(t)["input_ids"] for i, t in enumerate(texts)}
    assert max(len(p) for p in prompts.values()) > 3 * 16
    sampled = SamplingParams(max_tokens=24, temperature=0.9, seed=11)
    jobs = {k: (p, sampled if k == "p2" else GREEDY) for k, p in prompts.items()}
    alone = {
        k: run_to_completion(ARSampler(model, torch.device("cpu"), prefix_cache_mb=0), {k: v}).tokens[k]
        for k, v in jobs.items()
    }
    sampler = ARSampler(model, torch.device("cpu"))
    counter = _CountingForwards(model)
    try:
        together = run_to_completion(sampler, jobs).tokens
    finally:
        counter.close()
    assert together == alone
    # The prefill: one row of exactly the prompts' tokens, no padding; then one decode row each.
    assert counter.calls[0] == (1, sum(len(p) for p in prompts.values()))
    assert all(shape[1] == 1 for shape in counter.calls[1:])
    # The packed prompts' blocks were stored: a repeat hits the prefix cache.
    assert sampler.prefix_cache is not None and len(sampler.prefix_cache) > 0


@torch.inference_mode()
def test_tiny_gemma_packed_logits_equal_each_prompt_alone(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("Hello there, friend", "x = [1, 2, 3] " * 5, "ok")]
    sampler = ARSampler(model, torch.device("cpu"), prefix_cache_mb=0)
    for i, p in enumerate(prompts):
        sampler.add(f"s{i}", p, GREEDY)
    waiting = list(sampler._seqs.items())
    packed = sampler._prefill_packed(waiting)
    for i, p in enumerate(prompts):
        alone = model(input_ids=torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(packed[f"s{i}"], alone, rtol=1e-4, atol=1e-4)
