"""The engine: a bounded request queue and the one thread that owns the model.

Handlers (on the asyncio loop) call `submit` and read a per-request `RequestStream`; the
model thread admits waiting requests up to `max_num_seqs`, calls `step()` once per active
sampler per iteration (one step serves every sequence of that sampler) and pushes each
sequence's `StepEvent` back to its handler's loop. Cancellation is a flag the model thread
applies at the top of its next iteration, so a disconnected client frees its sequence
within one step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from sampler.types import BatchSampler, SamplingParams, StepEvent
from server.errors import APIError, internal_error, overloaded
from server.metrics import Metrics

log = logging.getLogger("dgserve.engine")


class EngineDead(APIError):
    def __init__(self, reason: str) -> None:
        super().__init__(503, f"The model engine is not running: {reason}", type="server_error",
                         code="engine_dead")


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    sampler: str
    loop: asyncio.AbstractEventLoop
    # If set, the sampler this request switches to when admitted while other sequences run.
    sampler_when_busy: str | None = None
    seq_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def deliver(self, item: StepEvent | BaseException) -> None:
        """Called from the model thread: hand `item` to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:
            pass  # the handler's loop is closed: nobody is listening any more


class RequestStream:
    """The handler's side of one sequence: async iteration over its StepEvents."""

    def __init__(self, engine: "Engine", request: EngineRequest) -> None:
        self._engine = engine
        self.request = request
        self.finished = False

    @property
    def seq_id(self) -> str:
        return self.request.seq_id

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


class Engine:
    def __init__(self, build_sampler: Callable[[str], BatchSampler], *, max_num_seqs: int,
                 max_queue: int, metrics: Metrics) -> None:
        self._build_sampler = build_sampler
        self._samplers: dict[str, BatchSampler] = {}
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._running: dict[str, EngineRequest] = {}
        self._cancelled: set[str] = set()
        self._stopping = False
        self._accepting = True
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="dgserve-model", daemon=True)

    # ---- handler side (asyncio loop) -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sampler: str) -> RequestStream:
        request = EngineRequest(prompt_ids, params, sampler, asyncio.get_running_loop())
        self.submit_many([request])
        return RequestStream(self, request)

    def submit_many(self, requests: list[EngineRequest]) -> None:
        """Queue all of `requests` or none (n > 1 choices must not be half admitted)."""
        with self._cond:
            if self.error is not None:
                raise EngineDead(self.error)
            if not self._accepting:
                raise overloaded("The server is shutting down.", retry_after_s=5)
            if len(self._waiting) + len(requests) > self.max_queue:
                raise overloaded(f"The request queue is full ({self.max_queue} waiting); retry later.")
            self._waiting.extend(requests)
            self.metrics.label(self.metrics.waiting).set(len(self._waiting))
            self._cond.notify()

    def cancel(self, seq_id: str) -> None:
        with self._cond:
            for request in self._waiting:
                if request.seq_id == seq_id:
                    self._waiting.remove(request)
                    self.metrics.label(self.metrics.waiting).set(len(self._waiting))
                    return
            self._cancelled.add(seq_id)
            self._cond.notify()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def idle(self) -> bool:
        with self._cond:
            return not self._waiting and not self._running

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- model thread -----------------------------------------------------------------
    def _sampler(self, name: str) -> BatchSampler:
        if name not in self._samplers:
            self._samplers[name] = self._build_sampler(name)
        return self._samplers[name]

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
            doomed = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
            self._running.clear()
        for request in doomed:
            request.deliver(EngineDead(reason))
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.label(self.metrics.waiting).set(len(self._waiting))
        self.metrics.label(self.metrics.running).set(len(self._running))

    def _iterate(self) -> bool:
        with self._cond:
            while not self._waiting and not self._running and not self._cancelled and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            cancelled, self._cancelled = self._cancelled, set()
            admitted: list[EngineRequest] = []
            while self._waiting and len(self._running) + len(admitted) < self.max_num_seqs:
                admitted.append(self._waiting.popleft())
            for request in admitted:
                self._running[request.seq_id] = request
        for seq_id in cancelled:
            request = self._running.pop(seq_id, None)
            if request is not None:
                self._sampler(request.sampler).cancel(seq_id)
        now = time.monotonic()
        for request in admitted:
            request.admitted = now
            if request.sampler_when_busy is not None and len(self._running) > 1:
                request.sampler = request.sampler_when_busy
            self.metrics.label(self.metrics.queue_time).observe(now - request.arrival)
            try:
                self._sampler(request.sampler).add(request.seq_id, request.prompt_ids, request.params)
            except Exception as exc:  # a request the sampler refuses fails alone
                log.warning("request %s refused by sampler: %s", request.seq_id, exc)
                self._running.pop(request.seq_id, None)
                request.deliver(APIError(400, f"Request cannot be served: {exc}"))
        self._update_gauges()
        for name, sampler in list(self._samplers.items()):
            if sampler.num_active:
                self._step(name, sampler)
        self._update_gauges()
        return True

    def _step(self, name: str, sampler: BatchSampler) -> None:
        try:
            events = sampler.step()
        except Exception as exc:
            # A failed step poisons only the sequences it was serving; the thread goes on.
            log.exception("sampler %s step failed", name)
            victims = [r for r in self._running.values() if r.sampler == name]
            for request in victims:
                sampler.cancel(request.seq_id)
                del self._running[request.seq_id]
                request.deliver(internal_error(f"generation failed: {type(exc).__name__}: {exc}"))
            return
        for seq_id, event in events.items():
            request = self._running.get(seq_id)
            if request is None:
                continue  # cancelled while this step ran
            if event.finish_reason is not None:
                del self._running[seq_id]
            request.deliver(event)
