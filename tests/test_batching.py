"""Continuous batching: sequences that join, leave and share forwards get exactly the tokens
they get alone."""

from __future__ import annotations

import random

import torch

from sampler.ar import ARSampler
from sampler.types import SamplingParams
from server.engine_core import run_to_completion
from tests.fakes import ScriptedModel, one_hot_logits

V = 97


def context_hash_script(context: list[int]) -> torch.Tensor:
    # Depends on every token and its position: any cache/mask/padding mistake changes it.
    return one_hot_logits(V, sum((i + 1) * t for i, t in enumerate(context)) % V)


def run(
    sampler: ARSampler,
    jobs: dict[str, tuple[list[int], SamplingParams]],
    join_at: dict[str, int],
    cancel_at: dict[str, int] | None = None,
) -> dict[str, list[int]]:
    """Each job joins before step join_at[k] (default 0) and is cancelled before step cancel_at[k]."""
    return run_to_completion(sampler, jobs, join_at=join_at, cancel_at=cancel_at).tokens


def test_fake_model_batched_equals_alone():
    rng = random.Random(0)
    jobs = {
        f"s{i}": (
            [rng.randrange(1, V) for _ in range(rng.randrange(1, 12))],
            SamplingParams(max_tokens=rng.randrange(3, 25), temperature=0),
        )
        for i in range(8)
    }
    alone = {
        k: run(ARSampler(ScriptedModel(V, context_hash_script), torch.device("cpu")), {k: v}, {})[k]
        for k, v in jobs.items()
    }
    joins = {k: rng.randrange(0, 10) for k in jobs}
    together = run(
        ARSampler(ScriptedModel(V, context_hash_script), torch.device("cpu")), jobs, joins, cancel_at={"s3": 4}
    )
    for k in jobs:
        if k == "s3":
            assert together[k] == alone[k][: len(together[k])]
        else:
            assert together[k] == alone[k], k


def test_tiny_gemma_batched_equals_alone_across_the_sliding_window(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    prompts = [
        "def fibonacci(n):",
        "Hello",
        "The quick brown fox jumps over the lazy dog. Hello, world!",
        "1. first item\n2.",
        "Café",
        '{"name": "dgserve", "tokens": [1, 2, 3]',
    ]
    jobs = {}
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=30, temperature=0 if i % 2 == 0 else 0.8, seed=i)
        jobs[f"p{i}"] = (tok(p)["input_ids"], params)
    alone = {k: run(ARSampler(model, torch.device("cpu")), {k: v}, {})[k] for k, v in jobs.items()}
    together = run(
        ARSampler(model, torch.device("cpu")), jobs, {"p0": 0, "p1": 0, "p2": 3, "p3": 5, "p4": 20, "p5": 21}
    )
    assert together == alone
