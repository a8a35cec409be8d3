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


def random_jobs(rng: random.Random, count: int, longest_prompt: int, max_tokens: tuple[int, int]):
    """`count` greedy jobs with random prompts of 1..longest_prompt-1 tokens and max_tokens in the range."""
    return {
        f"s{i}": (
            [rng.randrange(1, V) for _ in range(rng.randrange(1, longest_prompt))],
            SamplingParams(max_tokens=rng.randrange(*max_tokens), temperature=0),
        )
        for i in range(count)
    }


def alone_on_fake_model(jobs: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    """Each job's tokens when it runs by itself."""
    return {
        k: run(ARSampler(ScriptedModel(V, context_hash_script), torch.device("cpu")), {k: v}, {})[k]
        for k, v in jobs.items()
    }


def test_fake_model_batched_equals_alone():
    rng = random.Random(0)
    jobs = random_jobs(rng, 8, 12, (3, 25))
    alone = alone_on_fake_model(jobs)
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


def test_fake_model_prefill_budget_chunks_and_batches_equal_alone():
    # Budgets below, between and above the prompt lengths: prompts prefill whole in one padded
    # forward, or in chunks over several steps, and every sequence still gets its tokens alone.
    jobs = random_jobs(random.Random(1), 10, 30, (2, 12))
    alone = alone_on_fake_model(jobs)
    for budget in (1, 4, 7, 40, 1000):
        model = ScriptedModel(V, context_hash_script)
        together = run(ARSampler(model, torch.device("cpu"), max_prefill_tokens=budget), jobs, {"s7": 2, "s9": 5})
        assert together == alone, budget


def test_prefill_of_simultaneous_arrivals_is_one_forward():
    model = ScriptedModel(V, context_hash_script)
    sampler = ARSampler(model, torch.device("cpu"), max_prefill_tokens=64)
    for i, n in enumerate((3, 9, 5, 1)):
        sampler.add(f"s{i}", list(range(1, n + 1)), SamplingParams(max_tokens=4, temperature=0))
    events = sampler.step()
    assert model.forward_calls == 1  # 4 rows x 9 columns = 36 <= 64: one left-padded forward
    assert sorted(events) == ["s0", "s1", "s2", "s3"]
    sampler.add("long", list(range(1, 41)), SamplingParams(max_tokens=4, temperature=0))
    events = sampler.step()  # decode (1 forward) + 40 prompt tokens within the 64 budget (1 forward)
    assert model.forward_calls == 3 and "long" in events


def test_long_prompt_prefills_in_chunks_while_others_decode():
    model = ScriptedModel(V, context_hash_script)
    sampler = ARSampler(model, torch.device("cpu"), max_prefill_tokens=10)
    sampler.add("short", [5, 6], SamplingParams(max_tokens=20, temperature=0))
    sampler.step()
    sampler.add("long", list(range(1, 36)), SamplingParams(max_tokens=3, temperature=0))
    seen = []
    for _ in range(4):  # 35 tokens at 10 per step: the first token comes with the 4th chunk
        events = sampler.step()
        assert "short" in events  # the running sequence decodes every step meanwhile
        seen.append("long" in events)
    assert seen == [False, False, False, True]
    assert sampler.step()["long"].token_ids


def test_tiny_gemma_ragged_prefill_equals_alone(tiny_loaded):
    # Prompt lengths below, at and well past the tiny model's 16-token sliding window, arriving
    # together (one left-padded prefill) and with a budget that chunks the long ones.
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    texts = ["a", "Hello, world", "The quick brown fox jumps over the lazy dog", "x = [1, 2, 3] " * 6]
    jobs = {f"p{i}": (tok(t)["input_ids"], SamplingParams(max_tokens=24, temperature=0)) for i, t in enumerate(texts)}
    assert sorted(len(p) for p, _ in jobs.values())[-1] > 3 * 16
    alone = {k: run(ARSampler(model, torch.device("cpu"), prefix_cache_mb=0), {k: v}, {})[k] for k, v in jobs.items()}
    for budget in (10_000, 100, 7):
        sampler = ARSampler(model, torch.device("cpu"), max_prefill_tokens=budget, prefix_cache_mb=0)
        assert run(sampler, jobs, {}) == alone, budget


def test_prefill_budget_follows_the_measured_rate():
    """`max_prefill_s`: the token budget shrinks to what the measured prefill rate does in that
    time (never below 64 tokens or above `max_prefill_tokens`); None keeps the token budget."""
    model = ScriptedModel(V, context_hash_script)
    sampler = ARSampler(model, torch.device("cpu"), max_prefill_tokens=512, max_prefill_s=0.5)
    assert sampler.prefill_budget == 512  # nothing measured yet
    sampler._measure_prefill(300, 1.0)  # 300 tokens/s: 150 in half a second
    assert sampler.prefill_budget == 150
    sampler._measure_prefill(100, 1.0)  # the moving average leans toward the newest rate
    assert 100 < sampler.prefill_rate < 300 and sampler.prefill_budget == int(sampler.prefill_rate * 0.5)
    sampler._measure_prefill(10, 1.0)  # a forward this small is mostly fixed cost: not a rate
    assert sampler.prefill_budget == int(sampler.prefill_rate * 0.5)
    sampler.prefill_rate = 20.0
    assert sampler.prefill_budget == 64
    sampler.prefill_rate = 1e6
    assert sampler.prefill_budget == 512
    untimed = ARSampler(model, torch.device("cpu"), max_prefill_tokens=512, max_prefill_s=None)
    untimed.prefill_rate = 20.0
    assert untimed.prefill_budget == 512


def test_a_burst_on_a_slow_machine_gets_first_tokens_chunk_by_chunk():
    """At a measured 200 prompt tokens/s and max_prefill_s 0.5, four 40-token prompts arriving
    together prefill two per step: the first two answer a step earlier than one big forward
    would let them, and all four get exactly their tokens alone."""
    jobs = {f"s{i}": ([i + 1, *range(50, 89)], SamplingParams(max_tokens=3, temperature=0)) for i in range(4)}
    model = ScriptedModel(V, context_hash_script)
    sampler = ARSampler(model, torch.device("cpu"), max_prefill_tokens=512, max_prefill_s=0.5)
    sampler.prefill_rate = 200.0
    for seq_id, (prompt, params) in jobs.items():
        sampler.add(seq_id, prompt, params)
    assert sorted(sampler.step()) == ["s0", "s1"]
    sampler.prefill_rate = 200.0  # the fake model is fast: keep the slow machine's rate
    assert sorted(sampler.step()) == ["s0", "s1", "s2", "s3"]
    alone = alone_on_fake_model(jobs)
    model = ScriptedModel(V, context_hash_script)
    slow = ARSampler(model, torch.device("cpu"), max_prefill_tokens=512, max_prefill_s=0.5)
    slow.prefill_rate = 200.0
    assert run(slow, jobs, {}) == alone


def test_a_burst_prefills_shortest_first():
    """Prompts of 20, 10, 30 and 12 tokens arrive together with room for 25 prompt tokens a step:
    the two shortest answer in the first step (in arrival order only the first would), and
    every sequence's tokens equal its tokens alone."""
    lengths = {"s0": 20, "s1": 10, "s2": 30, "s3": 12}
    jobs = {k: ([7 + i for i in range(n)], SamplingParams(max_tokens=3, temperature=0)) for k, n in lengths.items()}
    sampler = ARSampler(ScriptedModel(V, context_hash_script), torch.device("cpu"), max_prefill_tokens=25)
    for seq_id, (prompt, params) in jobs.items():
        sampler.add(seq_id, prompt, params)
    assert sorted(sampler.step()) == ["s1", "s3"]
    fresh = ARSampler(ScriptedModel(V, context_hash_script), torch.device("cpu"), max_prefill_tokens=25)
    assert run(fresh, jobs, {}) == alone_on_fake_model(jobs)


def test_a_long_prompt_is_not_starved_by_short_arrivals():
    """A 40-token prompt with 10 tokens of budget a step, a new 8-token prompt arriving every
    step: shortest-first alone would pass it over for ever; after 4 steps passed over it goes
    first and answers after its 4 chunks."""
    model = ScriptedModel(V, context_hash_script)
    sampler = ARSampler(model, torch.device("cpu"), max_prefill_tokens=10)
    sampler.add("long", list(range(1, 41)), SamplingParams(max_tokens=2, temperature=0))
    answered_at = None
    for step in range(12):
        sampler.add(f"short{step}", [50 + step, *range(60, 67)], SamplingParams(max_tokens=50, temperature=0))
        if "long" in sampler.step():
            answered_at = step
            break
    assert answered_at == 4 + 4 - 1  # passed over in steps 0-3, then chunks in steps 4-7


def test_a_lone_prompt_prefills_in_token_budget_chunks():
    """The time budget bounds how long others wait; with nothing running and nothing else waiting
    a 300-token prompt prefills in one forward (max_prefill_tokens 512) even where the measured
    rate allows 100 tokens a step, and in 100-token chunks once another sequence runs."""
    prompt = [7, *range(20, 319)]
    alone_model = ScriptedModel(V, context_hash_script)
    alone = ARSampler(alone_model, torch.device("cpu"), max_prefill_tokens=512, max_prefill_s=0.5)
    alone.prefill_rate = 200.0
    alone.add("long", prompt, SamplingParams(max_tokens=2, temperature=0))
    assert "long" in alone.step() and alone_model.forward_calls == 1
    busy = ARSampler(
        ScriptedModel(V, context_hash_script), torch.device("cpu"), max_prefill_tokens=512, max_prefill_s=0.5
    )
    busy.add("short", [5, 6], SamplingParams(max_tokens=20, temperature=0))
    busy.step()
    busy.add("long", prompt, SamplingParams(max_tokens=2, temperature=0))
    answered = []
    for _ in range(3):
        busy.prefill_rate = 200.0  # the fake model is fast: keep the slow machine's rate
        answered.append("long" in busy.step())
    assert answered == [False, False, True]
