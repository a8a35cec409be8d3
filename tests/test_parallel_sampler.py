"""Parallel refinement sampler on the tiny Gemma 3 (2 layers, sliding window 16).

The contract: greedy output equals AR's, token for token; seeded sampling equals AR's seeded
sample and is reproducible; stop tokens and max_tokens end a sequence exactly as AR does;
`steps` caps the forwards per block; refinement drafts appear only when asked for.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from sampler.ar import ARSampler
from sampler.ngram_pool import NgramPool
from sampler.parallel import ParallelSampler
from sampler.parallel_draws import Shortlist
from sampler.registry import build_sampler
from sampler.runtime.kv_compaction import keep_new_rows
from sampler.types import ParallelOptions, SamplingParams, StepEvent
from server.engine_core import run_to_completion

WINDOW = 16  # the tiny model's sliding window


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(sampler, prompt: list[int], params: SamplingParams, seq_id: str = "s") -> tuple[list[int], list[StepEvent]]:
    done = run_to_completion(sampler, {seq_id: (prompt, params)})
    return done.tokens[seq_id], done.events[seq_id]


def prompts(vocab: int, count: int, seed: int = 0) -> list[list[int]]:
    """Random prompts, half of them repetitive (so n-gram candidates get accepted), 1..60 tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        base = [rng.randrange(6, vocab) for _ in range(rng.randrange(1, 20))]
        out.append(base * 3 if i % 2 else base)
    return out


# shortlist_size 64 (< vocab / 2) guesses the walk from 64 tokens' logits, as the real model
# does with 4096 of 262144; 0 computes full logits for every row.
# lean_below 0 keeps full trees even where guesses fail; 5 makes most forwards lean.
@pytest.mark.parametrize("block_size,shortlist_size,lean_below", [(1, 64, 0.7), (3, 0, 0.0), (8, 64, 5.0)])
def test_greedy_equals_ar(tiny_loaded, block_size, shortlist_size, lean_below):
    model, device = tiny_loaded.model, tiny_loaded.device
    params = SamplingParams(max_tokens=40, temperature=0.0)
    multi = 0
    for prompt in prompts(model.config.vocab_size, 8, seed=block_size):
        ar, _ = run(ARSampler(model, device), prompt, params)
        par, events = run(
            ParallelSampler(model, device, block_size=block_size, shortlist_size=shortlist_size, lean_below=lean_below),
            prompt,
            params,
        )
        assert par == ar, f"prompt {prompt}"
        assert len(par) == 40 and events[-1].finish_reason == "length"
        assert all(e.forward_passes == 1 and e.token_ids for e in events)
        multi += sum(len(e.token_ids) > 1 for e in events)
    assert multi > 0, "no step ever committed more than one token"


def test_long_prompt_and_output_cross_the_window(tiny_loaded):
    """Prompt longer than the window (prefilled with the first tree), output crossing it 4x."""
    model, device = tiny_loaded.model, tiny_loaded.device
    rng = random.Random(7)
    prompt = [rng.randrange(6, model.config.vocab_size) for _ in range(3 * WINDOW)]
    params = SamplingParams(max_tokens=4 * WINDOW, temperature=0.0)
    ar, _ = run(ARSampler(model, device), prompt, params)
    for block_size, max_nodes in ((2, 8), (6, 16), (WINDOW + 4, 40)):
        par, _ = run(
            ParallelSampler(
                model,
                device,
                block_size=block_size,
                max_candidates=6,
                candidate_len=12,
                max_tree_nodes=max_nodes,
                shortlist_size=64,
            ),
            prompt,
            params,
        )
        assert par == ar


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_seeded_sampling_equals_ar_and_repeats(tiny_loaded, temperature, top_k, top_p):
    model, device = tiny_loaded.model, tiny_loaded.device
    for seed, prompt in enumerate(prompts(model.config.vocab_size, 4, seed=11)):
        params = SamplingParams(max_tokens=30, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ar, _ = run(ARSampler(model, device), prompt, params)
        first, _ = run(ParallelSampler(model, device), prompt, params)
        again, _ = run(ParallelSampler(model, device, block_size=3, shortlist_size=64), prompt, params)
        assert first == ar == again
    # Different seeds give different samples (the noise really is keyed by the seed).
    a, _ = run(ParallelSampler(model, device), [10, 11, 12], SamplingParams(max_tokens=20, seed=1))
    b, _ = run(ParallelSampler(model, device), [10, 11, 12], SamplingParams(max_tokens=20, seed=2))
    assert a != b


def test_sampling_draws_each_positions_noise_once(tiny_loaded, monkeypatch):
    """A position is drawn in several forwards until it commits; its Gumbel row depends only on
    (seed, position), so the sequence generates it once and keeps it until it commits. Tokens
    stay AR's."""
    import sampler.parallel_draws as draws_module

    model, device = tiny_loaded.model, tiny_loaded.device
    generated: list[int] = []
    original = draws_module.gumbel_noise

    def counted(seed, positions, vocab_size, stream=0):
        generated.extend(positions)
        return original(seed, positions, vocab_size, stream)

    monkeypatch.setattr(draws_module, "gumbel_noise", counted)
    prompt = prompts(model.config.vocab_size, 2, seed=5)[1]  # repetitive: guesses hold, rows recur
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3)
    sampler = ParallelSampler(model, device, block_size=4, shortlist_size=64)
    tokens, events = run(sampler, prompt, params)
    assert tokens == run(ARSampler(model, device), prompt, params)[0]
    assert sum(e.forward_passes for e in events) > 1 and len(generated) == len(set(generated))
    assert not sampler._seqs  # finished: its noise rows went with it


def test_kv_cache_matches_ar_past_the_window(tiny_loaded):
    """After many crops the cache holds exactly what AR's holds: same rows, same values."""
    model, device = tiny_loaded.model, tiny_loaded.device
    prompt = list(range(20, 50)) * 2  # 60 tokens, repetitive: long accepted runs, big crops
    params = SamplingParams(max_tokens=50, temperature=0.0)
    par = ParallelSampler(model, device, block_size=5)
    par.add("p", prompt, params)
    ar = ARSampler(model, device)
    ar.add("a", prompt, params)
    ar_out: list[int] = []
    checked = 0
    while par.num_active:
        par_seq = par._seqs["p"]
        if par_seq.cache is not None:
            n = len(par_seq.generated)
            while len(ar_out) < n:
                ar_out += ar.step()["a"].token_ids
            assert ar_out == par_seq.generated
            ar_cache = ar._batch.cache  # one sequence: no padding columns
            assert par_seq.cache_len == len(prompt) + n - 1  # everything but the pending token
            for mine, theirs in zip(par_seq.cache.layers, ar_cache.layers, strict=True):
                assert mine.keys.shape == theirs.keys.shape
                if getattr(mine, "is_sliding", False):
                    assert mine.keys.shape[-2] == WINDOW - 1
                    assert mine.cumulative_length == theirs.cumulative_length
                torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(mine.values, theirs.values, atol=1e-4, rtol=1e-4)
            checked += 1
        par.step()
    assert checked >= 5


def test_keep_rows_compacts_new_rows(tiny_loaded):
    """`keep_new_rows` keeps the chosen appended rows in order and trims sliding layers to W - 1."""
    config = tiny_loaded.model.config
    cache = DynamicCache(config=config)
    cache.activate_past_recording()
    past, new = 20, 6

    def rows(start: int, stop: int) -> torch.Tensor:  # (1, 1, n, 4), row i holds the value i
        return torch.arange(start, stop, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 1, -1, 4).contiguous()

    for layer_idx in range(config.num_hidden_layers):
        cache.update(rows(0, past), rows(0, past), layer_idx)
    cache.crop(0)  # as after a step: sliding layers trimmed to their last W - 1 rows
    for layer_idx in range(config.num_hidden_layers):
        cache.update(rows(past, past + new), rows(past, past + new), layer_idx)
    keep_new_rows(cache, new, [0, 2, 5])
    for layer in cache.layers:
        rows = layer.keys[0, 0, :, 0].tolist()
        expected = list(range(past)) + [past, past + 2, past + 5]
        if layer.is_sliding:
            expected = expected[-(WINDOW - 1) :]
            assert layer.cumulative_length == past + 3
        assert rows == expected


def test_stop_tokens_and_max_tokens_like_ar(tiny_loaded):
    model, device = tiny_loaded.model, tiny_loaded.device
    prompt = list(range(30, 45)) * 3
    free, _ = run(ARSampler(model, device), prompt, SamplingParams(max_tokens=30, temperature=0.0))
    for stop_at in (0, 7, 20):
        stop = free[stop_at]
        if stop in free[:stop_at]:
            continue
        params = SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=frozenset({stop}))
        ar, ar_events = run(ARSampler(model, device), prompt, params)
        par, events = run(ParallelSampler(model, device, block_size=6), prompt, params)
        assert par == ar == free[:stop_at]
        assert events[-1].finish_reason == ar_events[-1].finish_reason == "stop"
        assert stop not in par
    for max_tokens in (1, 2, 5, 13):
        par, events = run(
            ParallelSampler(model, device, block_size=8), prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)
        )
        assert par == free[:max_tokens]
        assert events[-1].finish_reason == "length"
        assert all(e.finish_reason is None for e in events[:-1])


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_steps_caps_forwards_per_block(tiny_loaded, steps):
    model, device = tiny_loaded.model, tiny_loaded.device
    block = 4
    prompt = prompts(model.config.vocab_size, 1, seed=3)[0]
    params = SamplingParams(
        max_tokens=37, temperature=0.0, parallel=ParallelOptions(steps=steps), stream_refinements=True
    )
    out, events = run(ParallelSampler(model, device, block_size=block), prompt, params)
    assert len(out) == 37 and events[-1].finish_reason == "length"
    # A block is a run of `block` positions; count the forwards each one took.
    generated, block_start, forwards = 0, 0, 0
    for event in events:
        forwards += 1
        generated += len(event.token_ids)
        if generated >= block_start + block or event.finish_reason:
            assert forwards <= steps
            block_start, forwards = generated, 0
        if event.finish_reason is None:
            assert 0 <= event.refinement_step < steps
    if steps == 1:
        # One forward per block: every step commits a whole block.
        assert all(len(e.token_ids) >= block for e in events[:-1])


def test_steps_default_comes_from_constructor_and_request_wins(tiny_loaded):
    model, device = tiny_loaded.model, tiny_loaded.device
    prompt = [7, 8, 9, 10]
    _, by_config = run(
        ParallelSampler(model, device, block_size=5, steps=1), prompt, SamplingParams(max_tokens=20, temperature=0.0)
    )
    assert len(by_config) <= 4  # 20 tokens, at least 5 per forward
    exact, _ = run(ARSampler(model, device), prompt, SamplingParams(max_tokens=20, temperature=0.0))
    by_request, _ = run(
        ParallelSampler(model, device, block_size=5, steps=1),
        prompt,
        SamplingParams(max_tokens=20, temperature=0.0, parallel=ParallelOptions(steps=1000)),
    )
    assert by_request == exact


def test_refinement_drafts_absent_by_default(tiny_loaded):
    model, device = tiny_loaded.model, tiny_loaded.device
    _, events = run(ParallelSampler(model, device), [5, 6, 7], SamplingParams(max_tokens=25, temperature=0.0))
    assert all(e.draft_ids is None and e.refinement_step is None for e in events)


def test_refinement_drafts_well_formed(tiny_loaded):
    model, device = tiny_loaded.model, tiny_loaded.device
    block, max_tokens = 6, 25
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stream_refinements=True)
    out, events = run(ParallelSampler(model, device, block_size=block), [5, 6, 7] * 4, params)
    exact, _ = run(ARSampler(model, device), [5, 6, 7] * 4, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    assert out == exact  # asking for drafts changes nothing in the output
    done = 0
    for event in events:
        done += len(event.token_ids)
        if event.finish_reason is not None:
            assert event.draft_ids is None
            continue
        assert isinstance(event.draft_ids, list) and all(isinstance(t, int) for t in event.draft_ids)
        assert len(event.draft_ids) <= min(block, max_tokens - done)
        assert isinstance(event.refinement_step, int) and event.refinement_step >= 0
    # A draft runs dry only when a step verifies all of it; refinements never stop (no lean steps).
    assert sum(bool(e.draft_ids) for e in events[:-1]) >= (len(events) - 1) * 3 // 4


def test_add_cancel_and_several_sequences(tiny_loaded):
    model, device = tiny_loaded.model, tiny_loaded.device
    sampler = ParallelSampler(model, device)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    with pytest.raises(ValueError):
        sampler.add("empty", [], params)
    sampler.add("a", [1, 2, 3], params)
    sampler.add("b", [4, 5, 6, 4, 5, 6], params)
    sampler.add("c", [9], params)
    sampler.cancel("c")
    assert sampler.num_active == 2
    outs: dict[str, list[int]] = {"a": [], "b": []}
    while sampler.num_active:
        for seq_id, event in sampler.step().items():
            outs[seq_id] += event.token_ids
    for seq_id, prompt in (("a", [1, 2, 3]), ("b", [4, 5, 6, 4, 5, 6])):
        assert outs[seq_id] == run(ARSampler(model, device), prompt, params)[0]


def test_registry_passes_config_options(tiny_loaded):
    sampler = build_sampler("parallel", tiny_loaded, {"block_size": 3, "max_candidates": 2, "steps": 2})
    assert isinstance(sampler, ParallelSampler) and sampler.name == "parallel"
    assert (sampler.block_size, sampler.max_candidates, sampler.steps) == (3, 2, 2)
    assert sampler.shortlist_size == 0  # 4096 is not < half the tiny vocabulary: full logits
    with pytest.raises(TypeError):
        build_sampler("parallel", tiny_loaded, {"no_such_option": 1})


def test_ngram_pool_candidates():
    pool = NgramPool(key_len=2, trajectory_per_key=2)
    pool.extend([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3])
    # Suffix (2, 3) occurred twice before: most recent continuation first.
    assert pool.candidates(4, 3)[:2] == [[5, 6, 2], [4, 9, 2]]
    pool.add_trajectory(3, [7, 7])
    assert [7, 7] in pool.candidates(8, 3)
    assert len(pool.candidates(1, 3)) == 1
    pool.add_trajectory(3, [8])
    pool.add_trajectory(3, [6])  # only the 2 most recent trajectory n-grams per key are kept
    assert [7, 7] not in pool.candidates(8, 3)


def test_shortlist_ring_keeps_rows_in_step():
    head = torch.randn(50, 8)
    shortlist = Shortlist(head, capacity=4)
    shortlist.add([3, 5, 3, 7])
    shortlist.add([9, 11, 13])  # wraps: the two oldest (3, 5) leave
    assert shortlist.size == 4 and set(shortlist.slot) == {7, 9, 11, 13}
    for token, slot in shortlist.slot.items():
        assert int(shortlist.ids[slot]) == token
        torch.testing.assert_close(shortlist.weight[slot], head[token])


def test_batched_equals_unbatched_with_ragged_joins_and_finishes(tiny_loaded, monkeypatch):
    """One batched forward per step gives every sequence the tokens and forward count its own
    forwards give: ragged prompts (some past the sliding window), ragged trees, pending runs
    after forced commits (`steps`), greedy and seeded sampling, joins, finishes and a cancel
    at different steps."""
    model, device = tiny_loaded.model, tiny_loaded.device
    rng = random.Random(5)
    lengths = [3, 40, 9, 25, 1, 17, 60]
    requests = {}
    for i, n in enumerate(lengths):
        base = [rng.randrange(6, model.config.vocab_size) for _ in range(max(1, n // 2))]
        prompt = (base * 2)[:n] if i % 2 else [rng.randrange(6, model.config.vocab_size) for _ in range(n)]
        params = SamplingParams(
            max_tokens=12 + 7 * i,
            temperature=0.0 if i % 3 else 0.8,
            top_k=0 if i % 3 else 30,
            seed=100 + i,
            parallel=ParallelOptions(steps=2 if i == 5 else None),
        )
        requests[f"s{i}"] = (prompt, params)
    join_at = {"s2": 3, "s3": 3, "s4": 7, "s5": 12, "s6": 15}
    cancel_at = {"s1": 20}

    batch_sizes: list[int] = []
    forward_batch = ParallelSampler._forward_batch

    def spy(self, plans):
        batch_sizes.append(len(plans))
        return forward_batch(self, plans)

    monkeypatch.setattr(ParallelSampler, "_forward_batch", spy)
    done = {}
    for batched in (False, True):
        sampler = ParallelSampler(model, device, block_size=4, shortlist_size=64, batched=batched)
        done[batched] = run_to_completion(sampler, requests, join_at=join_at, cancel_at=cancel_at)
    assert done[True].tokens == done[False].tokens
    assert done[True].forward_passes == done[False].forward_passes
    assert done[True].finish_reasons == done[False].finish_reasons
    assert done[True].steps == done[False].steps
    assert max(batch_sizes) >= 4, batch_sizes  # the batched run really shared its forwards
    assert len(set(batch_sizes)) >= 3  # sequences joined and left while others ran
    # Greedy, uncancelled sequences still equal AR token for token.
    for seq_id in ("s2", "s4", "s5"):
        prompt, params = requests[seq_id]
        if params.greedy and params.parallel.steps is None:
            assert done[True].tokens[seq_id] == run(ARSampler(model, device), prompt, params)[0]
    assert sum(len(t) for t in done[True].tokens.values()) > sum(done[True].forward_passes.values())
