"""EngineCore and its scheduler, driven step by step with scripted samplers (no model, no thread)."""

from __future__ import annotations

import asyncio

import pytest

from sampler.types import Handover, SamplingParams, StepEvent
from server.engine import Engine, EngineRequest, RequestStream
from server.engine_core import EngineCore, RequestRefused, StepFailed, run_to_completion
from server.errors import APIError
from server.metrics import Metrics
from server.scheduler import NotAccepting, QueueFull, SequenceRequest


class ScriptedSampler:
    """Emits one token per step per sequence (prompt[0] + tokens so far) until max_tokens.

    Refuses an empty prompt; `fail_steps` makes that many following steps raise.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.added: list[str] = []
        self.cancelled: list[str] = []
        self.fail_steps = 0
        self._seqs: dict[str, tuple[list[int], int, list[int]]] = {}

    @property
    def num_active(self) -> int:
        return len(self._seqs)

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.added.append(seq_id)
        self._seqs[seq_id] = (prompt_ids, params.max_tokens, [])

    def cancel(self, seq_id: str) -> None:
        self.cancelled.append(seq_id)
        self._seqs.pop(seq_id, None)

    def step(self) -> dict[str, StepEvent]:
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("scripted failure")
        events = {}
        for seq_id, (prompt, max_tokens, out) in list(self._seqs.items()):
            out.append(prompt[0] + len(out))
            done = len(out) >= max_tokens
            events[seq_id] = StepEvent([out[-1]], "length" if done else None, forward_passes=1)
            if done:
                del self._seqs[seq_id]
        return events


def request(
    seq_id: str, max_tokens: int = 3, sampler: str = "s", prompt: list[int] | None = None, busy: str | None = None
) -> SequenceRequest:
    return SequenceRequest(
        [10] if prompt is None else prompt,
        SamplingParams(max_tokens=max_tokens),
        sampler,
        seq_id=seq_id,
        sampler_when_busy=busy,
    )


def make_core(max_num_seqs: int = 8, max_queue: int = 16) -> tuple[EngineCore, dict[str, ScriptedSampler]]:
    built: dict[str, ScriptedSampler] = {}

    def build(name: str) -> ScriptedSampler:
        if name == "unknown":
            raise ValueError("no such sampler")
        built[name] = ScriptedSampler(name)
        return built[name]

    return EngineCore(build, max_num_seqs=max_num_seqs, max_queue=max_queue), built


def test_fifo_admission_up_to_max_num_seqs() -> None:
    core, built = make_core(max_num_seqs=2)
    core.add(request("a", max_tokens=1), request("b", max_tokens=3))
    core.add(request("c", max_tokens=2))
    core.add(request("d", max_tokens=1))
    assert set(core.step()) == {"a", "b"}  # a finishes: its slot goes to c, not d
    assert (core.num_running, core.num_waiting) == (1, 2)
    assert set(core.step()) == {"b", "c"}
    assert set(core.step()) == {"b", "c"}  # both finish
    assert set(core.step()) == {"d"}
    assert built["s"].added == ["a", "b", "c", "d"] and core.idle


def test_queue_full_refuses_whole_groups() -> None:
    core, _ = make_core(max_num_seqs=1, max_queue=3)
    core.add(request("a"), request("b"))
    with pytest.raises(QueueFull) as full:
        core.add(request("c"), request("d"))  # one slot left: neither is queued
    assert full.value.max_queue == 3 and core.num_waiting == 2
    core.add(request("c"))
    with pytest.raises(QueueFull):
        core.add(request("d"))
    core.step()  # a is admitted: the queue has room again
    core.add(request("d"))
    assert core.num_waiting == 3


def test_stop_accepting_refuses_new_work_and_finishes_the_rest() -> None:
    core, _ = make_core(max_num_seqs=1)
    core.add(request("a", max_tokens=1), request("b", max_tokens=1))
    core.stop_accepting()
    with pytest.raises(NotAccepting):
        core.add(request("c"))
    assert set(core.step()) == {"a"} and set(core.step()) == {"b"} and core.idle


def test_cancel_while_waiting_never_reaches_the_sampler() -> None:
    core, built = make_core(max_num_seqs=1)
    core.add(request("a", max_tokens=2), request("b"), request("c", max_tokens=1))
    core.step()
    core.cancel("b")
    assert core.num_waiting == 1
    assert set(core.step()) == {"a"}
    assert set(core.step()) == {"c"}
    assert built["s"].added == ["a", "c"] and built["s"].cancelled == []


def test_cancel_while_running_frees_its_slot() -> None:
    core, built = make_core(max_num_seqs=1)
    core.add(request("a", max_tokens=5), request("b", max_tokens=1))
    assert set(core.step()) == {"a"}
    core.cancel("a")
    assert built["s"].cancelled == ["a"] and core.num_running == 0
    assert set(core.step()) == {"b"}
    core.cancel("a")  # already gone: ignored
    core.cancel("never-seen")
    assert core.idle and built["s"].cancelled == ["a"]


def test_busy_switch_only_when_others_run() -> None:
    core, built = make_core()
    alone = request("alone", max_tokens=2, sampler="parallel", busy="ar")
    core.add(alone)
    core.step()
    assert alone.sampler == "parallel"
    late = request("late", max_tokens=1, sampler="parallel", busy="ar")
    core.add(late)
    assert set(core.step()) == {"alone", "late"}
    assert late.sampler == "ar" and built["ar"].added == ["late"]
    # Admitted together into an idle engine: each sees the other running.
    pair = [request(k, max_tokens=1, sampler="parallel", busy="ar") for k in ("p", "q")]
    core.add(*pair)
    core.step()
    assert [r.sampler for r in pair] == ["ar", "ar"]
    assert built["parallel"].added == ["alone"]


class HandingSampler(ScriptedSampler):
    """A scripted sampler that gives up and takes over sequences (HandsOver, TakesOver)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.refuse_resume = False

    def detach(self, seq_id: str) -> Handover | None:
        entry = self._seqs.pop(seq_id, None)
        return None if entry is None else Handover(list(entry[2]), seed=7)

    def resume(self, seq_id: str, prompt_ids: list[int], params: SamplingParams, handover: Handover) -> None:
        if self.refuse_resume:
            raise RuntimeError("scripted refusal")
        self.added.append(seq_id)
        self._seqs[seq_id] = (prompt_ids, params.max_tokens, list(handover.generated))


def make_handing_core(
    refuse_resume: frozenset[str] | set[str] = frozenset(),
) -> tuple[EngineCore, dict[str, HandingSampler]]:
    built: dict[str, HandingSampler] = {}

    def build(name: str) -> HandingSampler:
        built[name] = HandingSampler(name)
        built[name].refuse_resume = name in refuse_resume
        return built[name]

    return EngineCore(build, max_num_seqs=8, max_queue=16), built


def test_a_running_sequence_is_handed_over_once_the_engine_is_busy() -> None:
    core, built = make_handing_core()
    alone = request("alone", max_tokens=5, sampler="parallel", busy="ar")
    core.add(alone)
    first = [core.step()["alone"] for _ in range(2)]
    assert alone.sampler == "parallel" and all(isinstance(e, StepEvent) for e in first)
    core.add(request("late", max_tokens=5, sampler="parallel", busy="ar"))
    rest: list[StepEvent] = []
    while not core.idle:
        rest += [e for k, e in core.step().items() if k == "alone" and isinstance(e, StepEvent)]
    # Handed over before the next step: it went on where it was, on `ar`, to max_tokens.
    assert alone.sampler == "ar" and built["ar"].added == ["late", "alone"]
    assert built["parallel"].num_active == 0
    assert [t for e in first + rest if isinstance(e, StepEvent) for t in e.token_ids] == [10, 11, 12, 13, 14]
    assert rest[-1].finish_reason == "length"


def test_siblings_of_one_request_are_not_handed_over() -> None:
    core, built = make_handing_core()
    pair = [
        SequenceRequest([10], SamplingParams(max_tokens=3), "parallel", seq_id=k, sampler_when_busy="ar", group="g")
        for k in ("a", "b")
    ]
    core.add(*pair)
    while not core.idle:
        core.step()
    assert [r.sampler for r in pair] == ["parallel", "parallel"] and "ar" not in built


def test_a_failed_hand_over_ends_only_that_sequence() -> None:
    core, built = make_handing_core(refuse_resume={"ar"})
    core.add(request("alone", max_tokens=5, sampler="parallel", busy="ar"))
    core.step()
    core.add(request("other", max_tokens=3, sampler="s"))
    outcomes = core.step()
    failure = outcomes["alone"]
    assert isinstance(failure, StepFailed) and str(failure.cause) == "scripted refusal"
    assert isinstance(outcomes["other"], StepEvent)
    assert built["parallel"].num_active == 0 and not core._scheduler.is_running("alone")
    while not core.idle:
        core.step()


def test_a_refused_request_fails_alone() -> None:
    core, built = make_core()
    core.add(request("ok", max_tokens=1), request("empty", prompt=[]), request("lost", sampler="unknown"))
    outcomes = core.step()
    assert isinstance(outcomes["empty"], RequestRefused) and isinstance(outcomes["empty"].cause, ValueError)
    assert isinstance(outcomes["lost"], RequestRefused) and "no such sampler" in str(outcomes["lost"])
    assert outcomes["ok"] == StepEvent([10], "length", forward_passes=1)
    assert core.idle and built["s"].added == ["ok"]


def test_a_failing_step_is_isolated_to_its_sampler() -> None:
    core, built = make_core()
    core.add(request("x1", sampler="x"), request("x2", sampler="x"), request("y1", max_tokens=2, sampler="y"))
    core.step()
    built["x"].fail_steps = 1
    outcomes = core.step()
    assert isinstance(outcomes["x1"], StepFailed) and outcomes["x1"] is outcomes["x2"]
    assert outcomes["x1"].sampler == "x" and str(outcomes["x1"]) == "RuntimeError: scripted failure"
    assert outcomes["y1"] == StepEvent([11], "length", forward_passes=1)
    assert sorted(built["x"].cancelled) == ["x1", "x2"] and core.idle
    core.add(request("x3", max_tokens=1, sampler="x"))  # the sampler serves new work afterwards
    assert core.step() == {"x3": StepEvent([10], "length", forward_passes=1)}


def test_on_admit_sees_each_admission_after_the_hand_over() -> None:
    seen: list[list[tuple[str, str, bool]]] = []
    core = EngineCore(
        ScriptedSampler,
        max_num_seqs=1,
        max_queue=4,
        on_admit=lambda rs: seen.append([(r.seq_id, r.sampler, r.admitted is not None) for r in rs]),
    )
    core.add(request("a", max_tokens=1, busy="b"), request("b", max_tokens=1))
    core.step()
    core.step()
    core.step()
    assert seen == [[("a", "s", True)], [("b", "s", True)], []]


def test_run_to_completion_collects_events_in_order() -> None:
    done = run_to_completion(
        ScriptedSampler("s"), {"a": ([5], SamplingParams(max_tokens=3)), "b": ([7], SamplingParams(max_tokens=2))}
    )
    assert done.tokens == {"a": [5, 6, 7], "b": [7, 8]} and done.steps == 3
    assert done.forward_passes == {"a": 3, "b": 2} and done.finish_reasons == {"a": "length", "b": "length"}
    assert [len(e) for e in done.events.values()] == [3, 2]


def test_run_to_completion_limits_joins_and_cancels() -> None:
    sampler = ScriptedSampler("s")
    jobs = {k: ([1], SamplingParams(max_tokens=2)) for k in "abcd"}
    done = run_to_completion(sampler, jobs, max_num_seqs=2, join_at={"d": 3}, cancel_at={"b": 1})
    # a and b start; b is cancelled after one token; c takes its slot; d joins at step 3.
    assert done.tokens == {"a": [1, 2], "b": [1], "c": [1, 2], "d": [1, 2]}
    assert sampler.added == ["a", "b", "c", "d"] and sampler.cancelled == ["b"] and done.steps == 5


def test_run_to_completion_raises_what_the_sampler_raised() -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        run_to_completion(ScriptedSampler("s"), {"a": ([], SamplingParams(max_tokens=1))})


# ---- the threaded wrapper: domain errors become the HTTP errors clients always got -------------
def _engine(max_num_seqs: int = 4, max_queue: int = 2) -> Engine:
    return Engine(ScriptedSampler, max_num_seqs=max_num_seqs, max_queue=max_queue, metrics=Metrics("m"))


def _requests(loop: asyncio.AbstractEventLoop, *prompts: list[int], sampler: str = "s") -> list[EngineRequest]:
    return [EngineRequest(p, SamplingParams(max_tokens=2), sampler, loop) for p in prompts]


def test_wrapper_maps_admission_errors_to_503() -> None:
    async def main() -> None:
        engine, loop = _engine(), asyncio.get_running_loop()
        engine.submit_many(_requests(loop, [1]))
        with pytest.raises(APIError) as full:
            engine.submit_many(_requests(loop, [1], [2]))
        assert (full.value.status, full.value.code, full.value.headers) == (503, "overloaded", {"Retry-After": "1"})
        assert full.value.message == "The request queue is full (2 waiting); retry later."
        engine.stop_accepting()
        with pytest.raises(APIError) as draining:
            engine.submit_many(_requests(loop, [1]))
        assert (draining.value.message, draining.value.headers) == (
            "The server is shutting down.",
            {"Retry-After": "5"},
        )

    asyncio.run(main())


def test_wrapper_delivers_events_and_failures_per_sequence() -> None:
    async def main() -> None:
        engine, loop = _engine(max_queue=3), asyncio.get_running_loop()
        engine.start()
        try:
            good, empty = _requests(loop, [4], [])
            (unknown,) = _requests(loop, [4], sampler="x")
            engine.core.samplers["x"] = failing = ScriptedSampler("x")
            failing.fail_steps = 1
            engine.submit_many([good, empty, unknown])
            streams = [RequestStream(engine, r) for r in (good, empty, unknown)]
            first = await asyncio.wait_for(streams[0].next_event(), 30)
            second = await asyncio.wait_for(streams[0].next_event(), 30)
            assert (first.token_ids, second.token_ids, second.finish_reason) == ([4], [5], "length")
            with pytest.raises(APIError) as refused:
                await asyncio.wait_for(streams[1].next_event(), 30)
            assert (refused.value.status, refused.value.message) == (400, "Request cannot be served: empty prompt")
            with pytest.raises(APIError) as failed:
                await asyncio.wait_for(streams[2].next_event(), 30)
            assert (failed.value.status, failed.value.code) == (500, "internal_error")
            assert failed.value.message == "generation failed: RuntimeError: scripted failure"
            assert engine.alive
        finally:
            engine.shutdown()

    asyncio.run(main())
