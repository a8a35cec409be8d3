"""The engine: an `EngineCore` on the one thread that owns the model, handed requests from asyncio.

Handlers (on the asyncio loop) call `submit_many` and read a per-request `RequestStream`; the
model thread calls `EngineCore.step()` while there is work and pushes each sequence's outcome
back to its handler's loop. This module maps the core's domain errors to HTTP errors.
Cancelling a running sequence is a note the model thread applies before its next step, so a
disconnected client frees its sequence within one step. Behaviour: docs/load.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sampler.types import BatchSampler, StepEvent
from server.engine_core import EngineCore, Outcome, RequestRefused, StepFailed
from server.errors import APIError, internal_error, overloaded, shutting_down
from server.metrics import Metrics
from server.scheduler import NotAccepting, QueueFull, SequenceRequest

log = logging.getLogger("dgserve.engine")


class EngineDead(APIError):
    def __init__(self, reason: str) -> None:
        super().__init__(503, f"The model engine is not running: {reason}", type="server_error", code="engine_dead")


@dataclass(eq=False)
class EngineRequest(SequenceRequest):
    """A sequence plus the handler's event loop and the queue its outcomes arrive on."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def deliver(self, item: StepEvent | BaseException) -> None:
        """Called from the model thread: hand `item` to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:
            pass  # the handler's loop is closed: nobody is listening any more


class RequestStream:
    """The handler's side of one sequence: async iteration over its StepEvents."""

    def __init__(self, engine: Engine, request: EngineRequest) -> None:
        self._engine = engine
        self.request = request
        self.finished = False

    async def next_event(self) -> StepEvent:
        item = await self.request.events.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finish_reason is not None:
            self.finished = True
        return item

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.cancel(self.request.seq_id)


def _as_api_error(failure: RequestRefused | StepFailed) -> APIError:
    if isinstance(failure, RequestRefused):
        return APIError(400, f"Request cannot be served: {failure.cause}")
    return internal_error(f"generation failed: {type(failure.cause).__name__}: {failure.cause}")


class Engine:
    def __init__(
        self, build_sampler: Callable[[str], BatchSampler], *, max_num_seqs: int, max_queue: int, metrics: Metrics
    ) -> None:
        self.core = EngineCore(
            build_sampler, max_num_seqs=max_num_seqs, max_queue=max_queue, on_admit=self._record_admission
        )
        self.metrics = metrics
        # Guards everything below; the core has its own lock, always taken after this one.
        self._cond = threading.Condition()
        self._listeners: dict[str, EngineRequest] = {}  # live sequences by seq_id
        self._cancelled: set[str] = set()  # running sequences to cancel before the next step
        self._stopping = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="dgserve-model", daemon=True)
        metrics.watch_prefix_cache(self._prefix_cache_totals)

    # ---- handler side (asyncio loop) -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return self.core.num_running

    def submit_many(self, requests: list[EngineRequest]) -> None:
        """Queue all of `requests` or none (n > 1 choices must not be half admitted)."""
        with self._cond:
            if self.error is not None:
                raise EngineDead(self.error)
            try:
                self.core.add(*requests)
            except NotAccepting:
                raise shutting_down() from None
            except QueueFull as full:
                if len(requests) > full.max_queue:  # could never fit, however idle: not "retry later"
                    raise APIError(400, f"{len(requests)} choices exceed the queue's {full.max_queue}.") from None
                raise overloaded(f"The request queue is full ({full.max_queue} waiting); retry later.") from None
            self._listeners.update((r.seq_id, r) for r in requests)
            self.metrics.label(self.metrics.waiting).set(self.core.num_waiting)
            self._cond.notify()

    def cancel(self, seq_id: str) -> None:
        with self._cond:
            self._listeners.pop(seq_id, None)
            if self.core.cancel_waiting(seq_id):
                self.metrics.label(self.metrics.waiting).set(self.core.num_waiting)
                return
            self._cancelled.add(seq_id)
            self._cond.notify()

    def stop_accepting(self) -> None:
        self.core.stop_accepting()

    def idle(self) -> bool:
        return self.core.idle

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _prefix_cache_totals(self) -> dict[str, int]:
        """Summed over the distinct prefix caches of the samplers (`prefix_cache_stats`; `ar` and
        `parallel` share one, counted once); read at scrape time."""
        totals: dict[str, int] = {}
        seen: set[int] = set()
        for sampler in list(self.core.samplers.values()):
            stats = getattr(sampler, "prefix_cache_stats", None)
            if stats is None or id(stats) in seen:
                continue
            seen.add(id(stats))
            for key, value in vars(stats).items():
                totals[key] = totals.get(key, 0) + value
        return totals

    # ---- model thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException as exc:  # the loop itself broke: every waiter must hear of it
            log.exception("model thread died")
            self._die(f"{type(exc).__name__}: {exc}")

    def _die(self, reason: str) -> None:
        with self._cond:
            self.error = reason
            doomed = list(self._listeners.values())
            self._listeners.clear()
            self.core.abort_all()
        for request in doomed:
            request.deliver(EngineDead(reason))
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.label(self.metrics.waiting).set(self.core.num_waiting)
        self.metrics.label(self.metrics.running).set(self.core.num_running)

    def _record_admission(self, admitted: list[SequenceRequest]) -> None:
        for request in admitted:
            assert request.admitted is not None  # set by the scheduler on admission
            self.metrics.label(self.metrics.queue_time).observe(request.admitted - request.arrival)
        self._update_gauges()

    def _iterate(self) -> bool:
        with self._cond:
            while self.core.idle and not self._cancelled and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            cancelled, self._cancelled = self._cancelled, set()
        for seq_id in cancelled:
            self.core.cancel(seq_id)
        self._deliver(self.core.step())
        self._update_gauges()
        return True

    def _deliver(self, outcomes: dict[str, Outcome]) -> None:
        with self._cond:
            targets: list[tuple[EngineRequest, Outcome]] = []
            for seq_id, outcome in outcomes.items():
                ends = not isinstance(outcome, StepEvent) or outcome.finish_reason is not None
                request = self._listeners.pop(seq_id, None) if ends else self._listeners.get(seq_id)
                if request is not None:  # None: cancelled by its handler meanwhile
                    targets.append((request, outcome))
        for request, outcome in targets:
            request.deliver(outcome if isinstance(outcome, StepEvent) else _as_api_error(outcome))
