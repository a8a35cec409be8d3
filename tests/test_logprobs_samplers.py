"""Logprobs from the samplers other than `ar`: block diffusion reports the distribution of the
denoising step that committed each token; parallel refinement's values equal `ar`'s (float32).
Checked against the model's own logits, recorded by a forward hook."""

from __future__ import annotations

import pytest
import torch

from sampler.diffusion import DiffusionSampler
from sampler.runtime.tiny_diffusion import build_tiny_diffusion
from sampler.types import DiffusionOptions, ParallelOptions, SamplingParams
from server.engine_core import run_to_completion

CPU = torch.device("cpu")
EOS_IDS = frozenset({1, 5})

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_diffusion_logprobs_come_from_the_committing_step(temperature: float) -> None:
    model = build_tiny_diffusion(1024, 32, eos_token_ids=sorted(EOS_IDS), usable_vocab=489)
    steps: list[torch.Tensor] = []  # each decoder forward's raw logits (C, V), before tempering

    def record(module, inputs, output):
        steps.append(output.logits[0].detach().clone())

    handle = model.register_forward_hook(record)
    try:
        sampler = DiffusionSampler(model, CPU)
        options = DiffusionOptions(max_denoising_steps=4)
        params = SamplingParams(
            max_tokens=70, temperature=temperature, seed=5, stop_token_ids=EOS_IDS, diffusion=options, logprobs=3
        )
        done = run_to_completion(sampler, {"a": ([2, 10, 20, 30], params)})
    finally:
        handle.remove()
    events = done.events["a"]
    commits = [e for e in events if e.token_ids]
    assert len(commits) >= 2  # more than one block: the scores follow each block's own step
    decoder_step = -1
    for event in events:
        decoder_step += 1  # one decoder forward per step() for this single row
        if not event.token_ids:
            continue
        lsm = steps[decoder_step].float().log_softmax(-1)
        assert event.logprobs is not None and len(event.logprobs) == len(event.token_ids)
        for pos, (token, scored) in enumerate(zip(event.token_ids, event.logprobs, strict=True)):
            assert scored.token_id == token
            assert scored.logprob == pytest.approx(float(lsm[pos, token]), abs=1e-5)
            assert [t for t, _ in scored.top] == lsm[pos].topk(3).indices.tolist()
            # The committed token is the step's argmax: the most likely, before temperature.
            assert scored.top[0][0] == token


def test_diffusion_without_logprobs_reports_none() -> None:
    model = build_tiny_diffusion(1024, 32, eos_token_ids=sorted(EOS_IDS), usable_vocab=489)
    params = SamplingParams(
        max_tokens=20, seed=5, stop_token_ids=EOS_IDS, diffusion=DiffusionOptions(max_denoising_steps=3)
    )
    done = run_to_completion(DiffusionSampler(model, CPU), {"a": ([2, 10], params)})
    assert all(e.logprobs is None for e in done.events["a"])


def _run(sampler, requests, most_per_step: list[int] | None = None):
    done = run_to_completion(sampler, requests)
    if most_per_step is not None:
        most_per_step.append(max(len(e.token_ids) for events in done.events.values() for e in events))
    return {k: [lp for e in events for lp in e.logprobs or []] for k, events in done.events.items()}, done.tokens


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_parallel_logprobs_equal_ar_in_float32(tiny_loaded, temperature: float) -> None:
    """Two sequences batched (ragged trees), repetitive prompts so trees verify guesses: the
    committed tokens are AR's, and so are their logprobs and alternatives."""
    from sampler.ar import ARSampler
    from sampler.parallel import ParallelSampler

    model = tiny_loaded.model
    prompts = {"a": [2, 10, 20, 30, 10, 20, 30, 10, 20], "b": [2, 40, 41, 42, 43, 40, 41]}
    params = SamplingParams(max_tokens=24, temperature=temperature, seed=21, logprobs=4)
    requests = {k: (p, params) for k, p in prompts.items()}
    ar_scores, ar_tokens = _run(ARSampler(model, CPU), requests)
    par = ParallelSampler(model, CPU)
    most: list[int] = []
    par_scores, par_tokens = _run(par, requests, most)
    assert par_tokens == ar_tokens
    if temperature == 0.0:
        assert most[0] > 1  # some step committed a verified path, not just the root's draw
    for k in prompts:
        assert len(par_scores[k]) == len(ar_tokens[k]) == 24
        for got, want in zip(par_scores[k], ar_scores[k], strict=True):
            assert got.token_id == want.token_id
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [t for t, _ in got.top] == [t for t, _ in want.top]
            assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top], abs=1e-4)


def test_parallel_forced_commits_have_one_entry_per_token(tiny_loaded) -> None:
    """`steps` mode commits unverified draft tokens: each still gets its entry, in order."""
    from sampler.parallel import ParallelSampler

    params = SamplingParams(max_tokens=20, temperature=0.0, logprobs=1, parallel=ParallelOptions(steps=1))
    scores, tokens = _run(ParallelSampler(tiny_loaded.model, CPU, block_size=4), {"a": ([2, 10, 20], params)})
    assert [s.token_id for s in scores["a"]] == tokens["a"] and len(tokens["a"]) == 20
