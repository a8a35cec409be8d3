"""Admission for the engine core: a bounded FIFO of waiting sequences and the set that runs.

The rules (docs/load.md, "The engine under load"):

- **FIFO.** Sequences are admitted in the order they were queued, as long as fewer than
  `max_num_seqs` run; a finished or cancelled sequence frees its slot for the next step.
- **Bounded queue, whole groups.** At most `max_queue` sequences wait. A group (the n choices of
  one request) is queued whole or refused whole (`QueueFull`), so choices are never half queued.
- **Draining.** After `stop_accepting()` every new group is refused (`NotAccepting`); what is
  already queued or running still completes.
- **Busy switch.** A sequence with `sampler_when_busy` that is handed to its sampler while a
  sequence of another group runs (counting those admitted with it) runs on that sampler instead;
  its own group's siblings (the other choices of its request) do not make the engine busy. One
  already running when the engine becomes busy is handed over between steps (`busy_movers`),
  where its sampler can give it up and the other can continue it (server/engine_core.py).

Thread safety: every method takes the scheduler's lock briefly and never calls out while
holding it, so handler threads may queue and drop waiting sequences while the model thread
admits.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass, field

from sampler.types import SamplingParams


@dataclass(eq=False)
class SequenceRequest:
    """One sequence to generate. `sampler` may change once, at admission (the busy switch)."""

    prompt_ids: list[int]
    params: SamplingParams
    sampler: str
    # Keyword-only, so a subclass may add positional fields after `sampler`.
    sampler_when_busy: str | None = field(default=None, kw_only=True)
    # The request this sequence is one choice of; None: a group of its own.
    group: str | None = field(default=None, kw_only=True)
    seq_id: str = field(default_factory=lambda: uuid.uuid4().hex, kw_only=True)
    arrival: float = field(default_factory=time.monotonic, kw_only=True)
    admitted: float | None = field(default=None, kw_only=True)


class AdmissionError(Exception):
    """A group the scheduler will not queue; nothing of it was queued."""


class QueueFull(AdmissionError):
    def __init__(self, max_queue: int) -> None:
        super().__init__(f"{max_queue} sequences are already waiting")
        self.max_queue = max_queue


class NotAccepting(AdmissionError):
    def __init__(self) -> None:
        super().__init__("the scheduler is draining and takes no new sequences")


class Scheduler:
    def __init__(self, *, max_num_seqs: int, max_queue: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._waiting: collections.deque[SequenceRequest] = collections.deque()
        self._running: dict[str, SequenceRequest] = {}
        self._accepting = True

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._running

    def enqueue(self, group: list[SequenceRequest]) -> None:
        """Queue every sequence of `group`, or none (raises QueueFull / NotAccepting)."""
        with self._lock:
            if not self._accepting:
                raise NotAccepting()
            if len(self._waiting) + len(group) > self.max_queue:
                raise QueueFull(self.max_queue)
            self._waiting.extend(group)

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def drop_waiting(self, seq_id: str) -> bool:
        """Remove a sequence that has not been admitted yet; False if it is not waiting."""
        with self._lock:
            for request in self._waiting:
                if request.seq_id == seq_id:
                    self._waiting.remove(request)
                    return True
            return False

    def admit(self) -> list[SequenceRequest]:
        """Move waiting sequences, oldest first, into the running set while slots are free."""
        now = time.monotonic()
        admitted: list[SequenceRequest] = []
        with self._lock:
            while self._waiting and len(self._running) < self.max_num_seqs:
                request = self._waiting.popleft()
                request.admitted = now
                self._running[request.seq_id] = request
                admitted.append(request)
        return admitted

    def choose_sampler(self, request: SequenceRequest) -> str:
        """Apply the busy switch to a just-admitted sequence; returns the sampler it runs on.

        Judged when the sequence is handed to its sampler, so sequences admitted with it count
        and ones refused before it no longer do.
        """
        with self._lock:
            busy = any(self._other_group(request, r) for r in self._running.values())
        if request.sampler_when_busy is not None and busy:
            request.sampler = request.sampler_when_busy
        return request.sampler

    def busy_movers(self) -> list[SequenceRequest]:
        """Running sequences the busy switch would now send elsewhere: they run on a sampler other
        than their `sampler_when_busy` while a sequence of another group runs too."""
        with self._lock:
            running = list(self._running.values())
        return [
            r
            for r in running
            if r.sampler_when_busy is not None
            and r.sampler != r.sampler_when_busy
            and any(self._other_group(r, other) for other in running)
        ]

    def move(self, request: SequenceRequest, sampler: str) -> None:
        """Record that a running sequence now runs on `sampler` (it was handed over)."""
        with self._lock:
            request.sampler = sampler

    @staticmethod
    def _other_group(request: SequenceRequest, running: SequenceRequest) -> bool:
        if running is request:
            return False
        return request.group is None or running.group != request.group

    def is_running(self, seq_id: str) -> bool:
        return seq_id in self._running

    def running_on(self, sampler: str) -> list[SequenceRequest]:
        with self._lock:
            return [r for r in self._running.values() if r.sampler == sampler]

    def finish(self, seq_id: str) -> SequenceRequest | None:
        """Release a running sequence's slot (finished, failed or cancelled)."""
        with self._lock:
            return self._running.pop(seq_id, None)

    def clear(self) -> None:
        """Forget every waiting and running sequence (the engine died under them)."""
        with self._lock:
            self._waiting.clear()
            self._running.clear()
