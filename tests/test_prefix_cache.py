"""The prefix cache: a prompt that starts like an earlier one reuses its KV and gets the tokens a
fresh prefill gives (float32 greedy), across the sliding window; LRU under a byte budget."""

from __future__ import annotations

import pytest
import torch

from sampler.ar import ARSampler
from sampler.runtime.prefix_cache import PrefixCache, cache_from_blocks
from sampler.types import SamplingParams
from server.engine_core import run_to_completion

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def _tokens(sampler: ARSampler, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    return run_to_completion(sampler, {"s": (prompt, params)}).tokens["s"]


def _fake_block(value: float, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    t = torch.full((1, 1, size, 2), value)
    return [(t, t.clone())]  # one layer; 2 x 4 x 2 float32 = 64 bytes


def test_chained_hashes_reuse_only_whole_matching_prefixes():
    cache = PrefixCache(budget_bytes=10_000, block_size=4)
    prompt = list(range(1, 14))  # 3 full blocks + 1 token
    cache.insert(prompt, lambda j: _fake_block(float(j)))
    assert len(cache) == 3
    # Same prompt: at most (13 - 1) // 4 = 3 blocks, one token left to compute.
    assert [b[0][0][0, 0, 0, 0].item() for b in cache.lookup(prompt)] == [0.0, 1.0, 2.0]
    # A prompt equal to the first 12 tokens reuses only 2 blocks (the 12th token needs a forward).
    assert len(cache.lookup(prompt[:12])) == 2
    # Same second block after a different first block: chained keys differ, nothing reused.
    assert cache.lookup([99, 2, 3, 4] + prompt[4:]) == []
    assert cache.stats.queries == 3 and cache.stats.hits == 2
    assert cache.stats.reused_tokens == 12 + 8 and cache.stats.query_tokens == 13 + 12 + 13


def test_lru_eviction_keeps_the_budget_and_drops_tails_first():
    cache = PrefixCache(budget_bytes=5 * 64, block_size=4)
    first, second = list(range(1, 13)), list(range(50, 62))
    cache.insert(first, lambda j: _fake_block(1.0))
    cache.insert(second, lambda j: _fake_block(2.0))  # 6 blocks of 64 bytes > 320
    assert cache.stats.bytes_used <= 5 * 64 and cache.stats.evicted_blocks == 1
    # The least recently used chain lost its tail, not its root: a prefix hit remains.
    assert len(cache.lookup(first + [7])) == 2
    assert len(cache.lookup(second + [7])) == 3
    cache.insert(list(range(100, 120)), lambda j: _fake_block(3.0))  # 5 blocks: all else evicted
    assert cache.stats.bytes_used == 5 * 64 and cache.lookup(first + [7]) == []


def test_budget_zero_stores_nothing():
    cache = PrefixCache(budget_bytes=0, block_size=4)
    cache.insert(list(range(20)), lambda j: _fake_block(1.0))
    assert len(cache) == 0 and cache.lookup(list(range(20))) == []


def test_tiny_gemma_hit_equals_miss_across_the_sliding_window(tiny_loaded):
    # The tiny model's window is 16 tokens and a block 16: the reused prefix (over 80 tokens)
    # is 5x the window and more, so the sliding layers' reused columns matter.
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    history = tok("user: tell me about lists. model: a list holds items in order. " * 3)["input_ids"]
    assert len(history) > 5 * 16
    turn2 = history + tok(" user: and tuples?")["input_ids"]
    warm = ARSampler(model, torch.device("cpu"))
    first = _tokens(warm, history)
    assert warm.prefix_cache is not None and warm.prefix_cache.stats.hits == 0
    reused = _tokens(warm, turn2)
    stats = warm.prefix_cache.stats
    assert stats.hits == 1 and stats.reused_tokens == (len(history) // 16) * 16 > 16
    assert reused == _tokens(ARSampler(model, torch.device("cpu"), prefix_cache_mb=0), turn2)
    assert first == _tokens(ARSampler(model, torch.device("cpu"), prefix_cache_mb=0), history)
    # Chunked after the hit (the rest of the prompt over several steps) and sampled: still the same.
    chunked = ARSampler(model, torch.device("cpu"), max_prefill_tokens=5)
    sampled = SamplingParams(max_tokens=24, temperature=0.8, seed=3)
    _tokens(chunked, history)
    assert _tokens(chunked, turn2, sampled) == _tokens(
        ARSampler(model, torch.device("cpu"), prefix_cache_mb=0), turn2, sampled
    )
    assert chunked.prefix_cache is not None and chunked.prefix_cache.stats.hits == 1


@torch.inference_mode()
def test_tiny_gemma_resumed_logits_equal_a_full_prefill(tiny_loaded):
    # Greedy tokens of a random tiny model hardly depend on single KV columns; the logits do.
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    history = tok("abcdefghijklmnopqrstuvwxyz0123456789 " * 3)["input_ids"]
    turn2 = history + tok(" and then?")["input_ids"]
    warm = ARSampler(model, torch.device("cpu"))
    _tokens(warm, history)
    assert warm.prefix_cache is not None
    blocks = warm.prefix_cache.lookup(turn2)
    reused = len(blocks) * 16
    assert reused > 5 * 16
    cache = cache_from_blocks(model.config, blocks)
    suffix = torch.tensor([turn2[reused:]])
    resumed = model(input_ids=suffix, position_ids=torch.arange(reused, len(turn2))[None], cache=cache).logits
    full = model(input_ids=torch.tensor([turn2])).logits[:, reused:]
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=1e-5)


def test_tiny_gemma_hits_while_others_run(tiny_loaded):
    # Hit and miss sequences joining a running batch: each gets its tokens alone.
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    base = tok("def area(r):\n    return 3.14159 * r * r\n\n" * 2)["input_ids"]
    jobs = {
        "a": (base + tok("def perimeter(r):")["input_ids"], GREEDY),
        "b": (base + tok("print(area(2))")["input_ids"], GREEDY),
        "c": (tok("Hello there")["input_ids"], GREEDY),
    }
    alone = {k: _tokens(ARSampler(model, torch.device("cpu"), prefix_cache_mb=0), p) for k, (p, _) in jobs.items()}
    sampler = ARSampler(model, torch.device("cpu"))
    _tokens(sampler, base + [5])
    together = run_to_completion(sampler, jobs, join_at={"a": 0, "b": 3, "c": 1}).tokens
    assert together == alone
    assert sampler.prefix_cache is not None and sampler.prefix_cache.stats.hits == 2


class _CountingForwards:
    """Counts the model's forward calls (a forward hook on the whole model)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def test_tiny_gemma_burst_of_hits_prefills_in_one_forward(tiny_loaded):
    # Clients sharing a long system prompt arrive together: their prefix hits (and a fresh
    # prompt among them) prefill in ONE forward, each row re-computing the few cached tokens
    # that line its uncached part up with the others', and every one gets its tokens alone.
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    system = tok("system: answer briefly and politely. " * 4)["input_ids"]
    assert len(system) > 3 * 16
    jobs = {
        "a": (system + tok(" user: hi")["input_ids"], GREEDY),
        "b": (system + tok(" user: what is a list in python?")["input_ids"], GREEDY),
        "c": (system[:20] + tok(" user: short")["input_ids"], GREEDY),
        "d": (tok("no shared prefix at all")["input_ids"], SamplingParams(max_tokens=24, temperature=0.7, seed=5)),
    }
    alone = {
        k: _tokens(ARSampler(model, torch.device("cpu"), prefix_cache_mb=0), p, params)
        for k, (p, params) in jobs.items()
    }
    sampler = ARSampler(model, torch.device("cpu"))
    _tokens(sampler, system + [7])
    counter = _CountingForwards(model)
    try:
        together = run_to_completion(sampler, jobs)
    finally:
        counter.close()
    assert together.tokens == alone
    assert sampler.prefix_cache is not None and sampler.prefix_cache.stats.hits >= 3
    # One prefill forward for all four, then one decode forward per token of the longest.
    assert counter.calls == 1 + max(len(t) for t in alone.values()) - 1
    assert all(together.forward_passes[k] == len(alone[k]) for k in jobs)


def test_scripted_models_run_without_a_prefix_cache():
    from tests.fakes import ScriptedModel, counting_script

    sampler = ARSampler(ScriptedModel(20, counting_script(20)), torch.device("cpu"))
    assert sampler.prefix_cache is None and sampler.prefix_cache_stats is None


@pytest.mark.slow
def test_real_gemma_hit_equals_miss_past_the_512_window():
    from sampler.runtime.loading import load_model

    loaded = load_model("gemma3-270m", dtype="float32", device="cpu")
    tok = loaded.tokenizer
    story = "The old lighthouse keeper counted the ships that passed each night and wrote their names. "
    history = tok(story * 40)["input_ids"]
    assert len(history) > 600  # longer than the 512-token sliding window
    turn2 = history + tok(" The next morning, the keeper")["input_ids"]
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=frozenset(loaded.eos_token_ids))
    warm = ARSampler(loaded.model, loaded.device)
    _tokens(warm, history, params)
    hit = _tokens(warm, turn2, params)
    assert warm.prefix_cache is not None and warm.prefix_cache.stats.reused_tokens > 512
    miss = _tokens(ARSampler(loaded.model, loaded.device, prefix_cache_mb=0), turn2, params)
    assert hit == miss, (tok.decode(hit), tok.decode(miss))


def test_metrics_count_queries_hits_and_reused_tokens(tiny_server):
    import httpx

    def counter(name: str) -> float:
        return tiny_server.metric(f"dgserve_prefix_cache_{name}_total")

    before = {k: counter(k) for k in ("queries", "hits", "reused_tokens")}
    history = "The tiny server remembers the start of this rather long prompt, block by block. " * 2
    for prompt in (history, history + "And then it goes on."):
        body = {"model": "tiny-gemma3", "prompt": prompt, "max_tokens": 2, "temperature": 0}
        assert httpx.post(f"{tiny_server.base_url}/v1/completions", json=body, timeout=60).status_code == 200
    assert counter("queries") - before["queries"] == 2
    assert counter("hits") - before["hits"] == 1
    # Whole 16-token blocks of the first prompt (over 70 tokens) were reused.
    reused = counter("reused_tokens") - before["reused_tokens"]
    assert reused >= 64 and reused % 16 == 0
    assert tiny_server.metric("dgserve_prefix_cache_bytes") > 0


def test_tiny_gemma_parallel_hit_equals_miss_and_shares_with_ar(tiny_loaded):
    """`parallel` (the default config's one-client sampler) resumes a follow-up turn from the
    prefix cache after its first turn stored the prompt's blocks: greedy and seeded tokens equal
    a miss's (and AR's); a prompt `parallel` stored is a hit for `ar` sharing the cache (the
    engine's hand-over re-prefill)."""
    from sampler.parallel import ParallelSampler

    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    history = tok("user: tell me about sets. model: a set holds each item once. " * 3)["input_ids"]
    assert len(history) > 5 * 16  # past the tiny model's 16-token window
    turn2 = history + tok(" user: and dicts?")["input_ids"]
    cpu = torch.device("cpu")
    for params in (GREEDY, SamplingParams(max_tokens=24, temperature=0.8, seed=3)):
        shared = PrefixCache(64 * 2**20)
        warm = ParallelSampler(model, cpu, prefix_cache=shared)
        first = _tokens(warm, history, params)
        assert shared.stats.hits == 0 and len(shared) == len(history) // 16
        reused = _tokens(warm, turn2, params)
        assert shared.stats.hits == 1 and shared.stats.reused_tokens == (len(history) // 16) * 16
        assert reused == _tokens(ParallelSampler(model, cpu), turn2, params)
        assert first == _tokens(ParallelSampler(model, cpu), history, params)
        assert reused == _tokens(ARSampler(model, cpu, prefix_cache_mb=0), turn2, params)
        ar = ARSampler(model, cpu, prefix_cache=shared)
        assert _tokens(ar, turn2, params) == reused and shared.stats.hits == 2


def test_registry_shares_one_prefix_cache_between_ar_and_parallel(tiny_loaded):
    from dataclasses import replace

    from sampler.registry import build_sampler, prepare_prefix_cache

    loaded = replace(tiny_loaded, prefix_cache=None)  # this test's own, not the shared fixture's
    prepare_prefix_cache(loaded, {"prefix_cache_mb": 8, "prefix_block_size": 4})
    ar, parallel = build_sampler("ar", loaded), build_sampler("parallel", loaded)
    assert ar.prefix_cache is parallel.prefix_cache is loaded.prefix_cache
    assert loaded.prefix_cache.block_size == 4 and loaded.prefix_cache.budget_bytes == 8 * 2**20
    off = replace(tiny_loaded, prefix_cache=None)
    prepare_prefix_cache(off, {"prefix_cache_mb": 0})
    assert build_sampler("ar", off).prefix_cache is None and build_sampler("parallel", off).prefix_cache is None


def test_tiny_gemma_parallel_long_prompt_in_chunks_equals_ar(tiny_loaded):
    """`parallel` takes a long uncached prompt through the decoder in `prefill_chunk` chunks before
    its first tree forward: tokens equal AR's (greedy and seeded; prompt 5x the tiny model's
    window, chunks of 10), the chunk forwards are counted, and the prompt's blocks it stores are
    the right KV: a follow-up turn resumed from them equals a miss."""
    from sampler.parallel import ParallelSampler

    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    history = tok("user: what is a queue? model: first in, first out, like a line. " * 3)["input_ids"]
    assert len(history) > 5 * 16
    turn2 = history + tok(" user: and a stack?")["input_ids"]
    cpu = torch.device("cpu")
    for params in (GREEDY, SamplingParams(max_tokens=24, temperature=0.8, seed=5)):
        shared = PrefixCache(64 * 2**20)
        chunked = ParallelSampler(model, cpu, prefix_cache=shared, prefill_chunk=10)
        done = run_to_completion(chunked, {"s": (history, params)})
        assert done.tokens["s"] == _tokens(ARSampler(model, cpu, prefix_cache_mb=0), history, params)
        assert done.events["s"][0].forward_passes == 1 + (len(history) - 1) // 10
        resumed = _tokens(chunked, turn2, params)
        assert shared.stats.hits == 1
        assert resumed == _tokens(ParallelSampler(model, cpu), turn2, params)
