"""A sequence handed from `parallel` to `ar` when the engine gets busy goes on as it would have
(server/engine_core.py `_hand_over_when_busy`), on the tiny Gemma 3 with the real samplers."""

from __future__ import annotations

import pytest

from sampler.registry import build_sampler
from sampler.types import SamplingParams, StepEvent
from server.engine_core import EngineCore, run_to_completion
from server.scheduler import SequenceRequest

PROMPT = [5, 9, 17, 33, 65, 129, 7]


def _handed_over(
    loaded, params: SamplingParams, steps_alone: int
) -> tuple[list[int], list[tuple[int, int]], SequenceRequest]:
    """`alone` starts on parallel in an idle engine; after `steps_alone` steps another request
    arrives. Returns alone's tokens, (forward passes, tokens) per event and its request."""
    core = EngineCore(lambda name: build_sampler(name, loaded), max_num_seqs=8, max_queue=8)
    alone = SequenceRequest(list(PROMPT), params, "parallel", sampler_when_busy="ar", seq_id="alone")
    core.add(alone)
    events: list[StepEvent] = []
    for step in range(1000):
        if step == steps_alone:
            late = SamplingParams(max_tokens=40, temperature=0)
            core.add(SequenceRequest([11, 12, 13], late, "parallel", sampler_when_busy="ar", seq_id="late"))
        outcome = core.step().get("alone")
        if outcome is not None:
            assert isinstance(outcome, StepEvent)
            events.append(outcome)
            if outcome.finish_reason is not None:
                break
    return [t for e in events for t in e.token_ids], [(e.forward_passes, len(e.token_ids)) for e in events], alone


def _ar_alone(loaded, params: SamplingParams) -> list[int]:
    return run_to_completion(build_sampler("ar", loaded), {"x": (list(PROMPT), params)}).tokens["x"]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_tokens=30, temperature=0), SamplingParams(max_tokens=30, temperature=1.0, seed=1234)],
    ids=["greedy", "seeded-t1"],
)
def test_handed_over_output_is_what_ar_gives_alone(tiny_loaded, one_torch_thread, params):
    tokens, _, alone = _handed_over(tiny_loaded, params, steps_alone=3)
    assert alone.sampler == "ar"
    assert tokens == _ar_alone(tiny_loaded, params)
    assert len(tokens) == params.max_tokens


def test_after_the_hand_over_each_step_is_one_ar_forward(tiny_loaded, one_torch_thread):
    params = SamplingParams(max_tokens=30, temperature=0)
    _, per_event, alone = _handed_over(tiny_loaded, params, steps_alone=2)
    forwards, tokens = zip(*per_event, strict=True)
    # Events 0-1 came from parallel; from event 2 on ar serves it: its first event's forward is
    # the prefill of prompt + committed tokens, then one forward per token.
    assert alone.sampler == "ar"
    assert all(f == 1 and n == 1 for f, n in zip(forwards[2:], tokens[2:], strict=True))
    assert sum(tokens) == 30


def test_a_long_context_stays_on_parallel(tiny_loaded, one_torch_thread):
    # Handing over costs a prefill of the whole context on ar; past max_handover_tokens it stays.
    sampler = build_sampler("parallel", tiny_loaded, {"max_handover_tokens": 8})
    sampler.add("short", [5, 9, 17], SamplingParams(max_tokens=20, temperature=0))
    sampler.add("long", list(range(5, 15)), SamplingParams(max_tokens=20, temperature=0))
    sampler.step()
    assert sampler.detach("long") is None and sampler.num_active == 2
    handover = sampler.detach("short")
    assert handover is not None and handover.generated and sampler.num_active == 1
