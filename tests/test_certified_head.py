"""The certified head draws exactly what full float32 logits draw (sampler/runtime/certified_head.py),
alone and inside the AR and parallel samplers on the tiny Gemma 3."""

from __future__ import annotations

import pytest
import torch

import sampler.runtime.certified_head as certified_module
from sampler.logits import draw_tokens, gumbel_noise, softcap
from sampler.registry import build_sampler
from sampler.runtime.certified_head import CertifiedHead, attach_certified_head, certified_head
from sampler.runtime.loading import load_model
from sampler.types import SamplingParams
from server.engine_core import run_to_completion

VOCAB, DIM = 6000, 64


def _weight(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, DIM, generator=gen) * 0.05


def _hidden(rows: int, seed: int = 1) -> torch.Tensor:
    """Heavy-tailed rows like a Gemma final hidden state: a few channels far larger than the rest."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, DIM, generator=gen) * 2.5
    h[:, :3] *= 30
    return h


def _reference(weight: torch.Tensor, hidden: torch.Tensor, cap: float | None, temperature: float, noise) -> list[int]:
    logits = softcap(hidden @ weight.T, cap)
    return draw_tokens(logits, noise, temperature=temperature, top_k=0, top_p=1.0).tolist()


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_draws_equal_full_float32_logits(cap: float | None, temperature: float) -> None:
    weight, hidden = _weight(), _hidden(24)
    noise = gumbel_noise(7, list(range(24)), VOCAB) if temperature > 0 else None
    head = CertifiedHead(weight)
    assert head.draw(hidden, cap=cap, temperature=temperature, noise=noise) == _reference(
        weight, hidden, cap, temperature, noise
    )


def _bin(value: float) -> tuple[float, float]:
    """The two float16 neighbours around a positive `value` (as floats)."""
    bits = int(torch.tensor([value]).half().view(torch.int16)[0])
    if float(torch.tensor([value]).half()[0]) > value:
        bits -= 1  # positive float16s order like their bit patterns
    lo, hi = torch.tensor([bits, bits + 1], dtype=torch.int16).view(torch.float16).tolist()
    return lo, hi


def test_float16_rounding_that_reorders_two_tokens_is_rescored() -> None:
    """Token `rival` is below `best` in float32 but above it in the float16 pass (one coordinate
    crosses a rounding boundary, another loses almost a bin unseen): the draw must still be
    `best`, and it is what float32 logits draw."""
    weight, hidden = _weight(), _hidden(1).abs()  # positive: rounding up raises the logit
    h = hidden[0]
    best, rival = 10, 11
    weight[best] = h / h.norm() * 0.6  # far above every random row
    i, j = int(h.argmax()), int(h[3:].argmax()) + 3  # an outlier coordinate and an ordinary one
    weight[rival] = weight[best]
    lo, hi = _bin(float(weight[best, j]))
    mid, eps = (lo + hi) / 2, (hi - lo) * 0.01
    weight[best, j], weight[rival, j] = mid - eps, mid + eps  # rival rounds up a whole bin
    lo, hi = _bin(float(weight[best, i]))
    weight[best, i], weight[rival, i] = lo + (hi - lo) * 0.49, lo + (hi - lo) * 0.01  # same bin
    exact = hidden @ weight.T
    half = hidden @ weight.half().float().T
    assert exact[0, best] > exact[0, rival] + 1e-3 and half[0, rival] > half[0, best]
    head = CertifiedHead(weight)
    assert head.draw(hidden, cap=None, temperature=0.0, noise=None) == [best]
    assert _reference(weight, hidden, None, 0.0, None) == [best]


def test_exact_ties_go_to_the_lowest_id() -> None:
    weight, hidden = _weight(), _hidden(8)
    best = (hidden @ weight.T).argmax(dim=1)
    for r in range(8):
        weight[int(best[r]) - 1] = weight[int(best[r])]  # a duplicate just below: it wins the tie
    head = CertifiedHead(weight)
    got = head.draw(hidden, cap=None, temperature=0.0, noise=None)
    assert got == _reference(weight, hidden, None, 0.0, None)
    assert got == [int(b) - 1 for b in best]


def test_too_many_candidates_falls_back_to_the_full_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(certified_module, "_MAX_CANDIDATES", 0)
    weight, hidden = _weight(), _hidden(3)
    head = CertifiedHead(weight)
    assert head.draw(hidden, cap=None, temperature=0.0, noise=None) == _reference(weight, hidden, None, 0.0, None)
    assert head.fallbacks == 3


def test_more_rows_than_measured_ask_for_full_logits() -> None:
    head = CertifiedHead(_weight(), max_rows=4)
    assert head.draw(_hidden(5), cap=None, temperature=0.0, noise=None) is None
    assert head.draw(_hidden(4), cap=None, temperature=0.0, noise=None) is not None


def test_attached_only_to_float32_cpu_heads_and_not_when_off() -> None:
    bf16 = load_model("tiny-gemma3", dtype="bfloat16", device="cpu", certified="on")
    assert certified_head(bf16.model) is None
    f32 = load_model("tiny-gemma3", dtype="float32", device="cpu", certified="off")
    assert certified_head(f32.model) is None
    assert attach_certified_head(f32.model, "on") is certified_head(f32.model) is not None


@pytest.fixture(scope="module")
def tiny_pair(one_torch_thread):
    """The tiny Gemma with the certified head on, and the same weights without it."""
    on = load_model("tiny-gemma3", dtype="float32", device="cpu", certified="on")
    off = load_model("tiny-gemma3", dtype="float32", device="cpu", certified="off")
    return on, off


def _count_draws(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = CertifiedHead.draw

    def counted(self, hidden, **kwargs):
        calls.append(hidden.shape[0])
        return original(self, hidden, **kwargs)

    monkeypatch.setattr(CertifiedHead, "draw", counted)
    return calls


PARAMS = [
    SamplingParams(max_tokens=40, temperature=0),
    SamplingParams(max_tokens=40, temperature=1.0, seed=99),
    SamplingParams(max_tokens=40, temperature=0.6, seed=3),
]


@pytest.mark.parametrize("sampler", ["ar", "parallel"])
@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded-t1", "seeded-t06"])
def test_samplers_draw_the_same_tokens_through_it(
    tiny_pair, sampler: str, params: SamplingParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    on, off = tiny_pair
    prompts = {"a": [5, 9, 17, 33, 65, 129, 7], "b": [2, 40, 41, 42, 40, 41, 42, 40]}
    calls = _count_draws(monkeypatch)
    got = run_to_completion(build_sampler(sampler, on), {k: (p, params) for k, p in prompts.items()}).tokens
    assert calls, "the certified head was not used"
    want = run_to_completion(build_sampler(sampler, off), {k: (p, params) for k, p in prompts.items()}).tokens
    assert got == want


def test_requests_that_need_logits_keep_the_full_head(tiny_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """logprobs and top-p need every logit: those rows never go through the certified head, and
    their values equal the plain model's."""
    on, off = tiny_pair
    calls = _count_draws(monkeypatch)
    for params in (
        SamplingParams(max_tokens=12, temperature=0, logprobs=2),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=5),
    ):
        got = run_to_completion(build_sampler("ar", on), {"x": ([5, 9, 17], params)})
        want = run_to_completion(build_sampler("ar", off), {"x": ([5, 9, 17], params)})
        assert got.tokens == want.tokens
    assert calls == []
