"""The synchronous engine step: the scheduler admits, then every sampler with sequences steps once.

No thread and no asyncio (the way nano-vllm's `LLMEngine.step()` works): `server/engine.py`
runs the core on the model thread, tests and benchmarks drive it with `run_to_completion`.
Behaviour under load: docs/load.md ("The engine under load").
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sampler.types import BatchSampler, FinishReason, HandsOver, SamplingParams, StepEvent, TakesOver
from server.scheduler import Scheduler, SequenceRequest

log = logging.getLogger("dgserve.engine")


class RequestRefused(Exception):
    """The sampler would not take the sequence (its `add` raised `cause`); it never ran."""

    def __init__(self, seq_id: str, cause: Exception) -> None:
        super().__init__(str(cause))
        self.seq_id = seq_id
        self.cause = cause


class StepFailed(Exception):
    """A sampler's step raised `cause`; every sequence that sampler was serving ends with it."""

    def __init__(self, sampler: str, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.sampler = sampler
        self.cause = cause


SequenceFailure = RequestRefused | StepFailed
# What one step yields for one sequence: an event, or the failure that ended it.
Outcome = StepEvent | SequenceFailure


class EngineCore:
    """Owns the scheduler and the samplers, built lazily by name through `build_sampler`.

    Thread safety: `add`, `cancel_waiting`, `stop_accepting` and the counts may be called from
    any thread (the scheduler locks); `step` and `cancel` only from the one thread that owns the
    samplers. `on_admit(admitted)` runs once per step, after the admitted sequences were handed
    to their samplers (refused ones included), before any sampler steps.
    """

    def __init__(
        self,
        build_sampler: Callable[[str], BatchSampler],
        *,
        max_num_seqs: int,
        max_queue: int,
        on_admit: Callable[[list[SequenceRequest]], None] | None = None,
    ) -> None:
        self.samplers: dict[str, BatchSampler] = {}
        self._build_sampler = build_sampler
        self._scheduler = Scheduler(max_num_seqs=max_num_seqs, max_queue=max_queue)
        self._on_admit = on_admit

    @classmethod
    def for_sampler(cls, sampler: BatchSampler, *, max_num_seqs: int = sys.maxsize) -> EngineCore:
        """A core around one ready sampler, with an unbounded queue (tests and benchmarks)."""

        def no_other(name: str) -> BatchSampler:
            raise ValueError(f"this engine serves only {sampler.name!r}, not {name!r}")

        core = cls(no_other, max_num_seqs=max_num_seqs, max_queue=sys.maxsize)
        core.samplers[sampler.name] = sampler
        return core

    @property
    def num_waiting(self) -> int:
        return self._scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self._scheduler.num_running

    @property
    def idle(self) -> bool:
        return self._scheduler.idle

    def add(self, *requests: SequenceRequest) -> None:
        """Queue all of `requests` or none (raises the scheduler's QueueFull / NotAccepting)."""
        self._scheduler.enqueue(list(requests))

    def stop_accepting(self) -> None:
        self._scheduler.stop_accepting()

    def cancel_waiting(self, seq_id: str) -> bool:
        """Drop a sequence not yet admitted (any thread); False if it is not waiting."""
        return self._scheduler.drop_waiting(seq_id)

    def cancel(self, seq_id: str) -> None:
        """Drop a sequence wherever it is; unknown or finished ids are ignored."""
        if self.cancel_waiting(seq_id):
            return
        request = self._scheduler.finish(seq_id)
        if request is not None:
            self._sampler(request.sampler).cancel(seq_id)

    def abort_all(self) -> None:
        """Forget every sequence without touching the samplers (their thread is gone)."""
        self._scheduler.clear()

    def step(self) -> dict[str, Outcome]:
        """Admit, then step each sampler that has sequences. Failures come back as values."""
        outcomes: dict[str, Outcome] = {}
        admitted = self._scheduler.admit()
        for request in admitted:
            refusal = self._hand_to_sampler(request)
            if refusal is not None:
                outcomes[request.seq_id] = refusal
        if self._on_admit is not None:
            self._on_admit(admitted)
        outcomes.update(self._hand_over_when_busy())
        for name, sampler in list(self.samplers.items()):
            if sampler.num_active:
                outcomes.update(self._step_sampler(name, sampler))
        return outcomes

    def _sampler(self, name: str) -> BatchSampler:
        if name not in self.samplers:
            self.samplers[name] = self._build_sampler(name)
        return self.samplers[name]

    def _hand_to_sampler(self, request: SequenceRequest) -> RequestRefused | None:
        name = self._scheduler.choose_sampler(request)
        try:
            self._sampler(name).add(request.seq_id, request.prompt_ids, request.params)
        except Exception as exc:  # a request the sampler (or its factory) refuses fails alone
            log.warning("request %s refused by sampler: %s", request.seq_id, exc)
            self._scheduler.finish(request.seq_id)
            return RequestRefused(request.seq_id, exc)
        return None

    def _hand_over_when_busy(self) -> dict[str, Outcome]:
        """Move running sequences to their `sampler_when_busy` once another request runs.

        Why: every sampler with sequences runs its own forward each step, so one sequence left on
        `parallel` beside a batch on `ar` costs every one of them a second forward per step (a
        burst of clients starts with the first one alone, on `parallel`). The receiving sampler
        prefills the prompt plus what was committed (one forward) and goes on with the same
        noise stream, so greedy and seeded output is what the first sampler would have given.
        A failure to continue ends only that sequence.
        """
        failures: dict[str, Outcome] = {}
        for request in self._scheduler.busy_movers():
            source, target_name = self.samplers.get(request.sampler), request.sampler_when_busy
            assert target_name is not None  # busy_movers only returns sequences with one
            target = self._sampler(target_name)
            if not isinstance(source, HandsOver) or not isinstance(target, TakesOver):
                continue
            handover = source.detach(request.seq_id)
            if handover is None:
                continue
            try:
                target.resume(request.seq_id, request.prompt_ids, request.params, handover)
            except Exception as exc:  # the sequence was detached: it ends here, alone
                log.exception("handing %s over to %s failed", request.seq_id, target_name)
                self._scheduler.finish(request.seq_id)
                failures[request.seq_id] = StepFailed(target_name, exc)
                continue
            self._scheduler.move(request, target_name)
            log.debug("busy: %s handed over after %d tokens", request.seq_id, len(handover.generated))
        return failures

    def _step_sampler(self, name: str, sampler: BatchSampler) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        try:
            events = sampler.step()
        except Exception as exc:
            # A failed step poisons only the sequences it was serving; other samplers go on.
            log.exception("sampler %s step failed", name)
            failure = StepFailed(name, exc)
            for request in self._scheduler.running_on(name):
                sampler.cancel(request.seq_id)
                self._scheduler.finish(request.seq_id)
                outcomes[request.seq_id] = failure
            return outcomes
        for seq_id, event in events.items():
            if not self._scheduler.is_running(seq_id):
                continue  # not ours any more (cancelled); the sampler's word is stale
            if event.finish_reason is not None:
                self._scheduler.finish(seq_id)
            outcomes[seq_id] = event
        return outcomes


@dataclass
class Completion:
    """What `run_to_completion` gathered: every sequence's events, in order, and the steps taken."""

    events: dict[str, list[StepEvent]]
    steps: int = 0
    tokens: dict[str, list[int]] = field(init=False)
    forward_passes: dict[str, int] = field(init=False)
    finish_reasons: dict[str, FinishReason | None] = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = {k: [] for k in self.events}
        self.forward_passes = {k: 0 for k in self.events}
        self.finish_reasons = {k: None for k in self.events}

    def record(self, seq_id: str, event: StepEvent) -> None:
        self.events[seq_id].append(event)
        self.tokens[seq_id] += event.token_ids
        self.forward_passes[seq_id] += event.forward_passes
        self.finish_reasons[seq_id] = event.finish_reason


def run_to_completion(
    sampler: BatchSampler,
    requests: Mapping[str, tuple[list[int], SamplingParams]],
    *,
    max_num_seqs: int | None = None,
    join_at: Mapping[str, int] | None = None,
    cancel_at: Mapping[str, int] | None = None,
) -> Completion:
    """Serve `requests` ({seq_id: (prompt_ids, params)}) on `sampler` through an EngineCore until idle.

    Request k is queued before step `join_at[k]` (default 0) and cancelled before step
    `cancel_at[k]`; at most `max_num_seqs` run at once (default: all), the rest wait FIFO. A
    sequence failure re-raises what the sampler raised, so callers see the sampler's own error.
    """
    core = EngineCore.for_sampler(sampler, max_num_seqs=max_num_seqs or max(len(requests), 1))
    join_at, cancel_at = join_at or {}, cancel_at or {}
    pending = dict(requests)
    done = Completion({seq_id: [] for seq_id in requests})
    while pending or not core.idle:
        for seq_id in [s for s in pending if join_at.get(s, 0) <= done.steps]:
            core.add(SequenceRequest(*pending.pop(seq_id), sampler.name, seq_id=seq_id))
        for seq_id in [s for s, at in cancel_at.items() if at == done.steps]:
            core.cancel(seq_id)
        for seq_id, outcome in core.step().items():
            if isinstance(outcome, (RequestRefused, StepFailed)):
                raise outcome.cause
            done.record(seq_id, outcome)
        done.steps += 1
        if core.num_running and not sampler.num_active:
            raise RuntimeError(f"{sampler.name} dropped running sequences without finishing them")
    return done
