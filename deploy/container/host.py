"""The worker host: one backend, the events of its jobs kept per job with sequence numbers, and waiting.

HTTP clients come and go (a dropped link reconnects with ``after=<last seq>``), so every event a backend
emits is appended to its job's ``JobBuffer`` with the next sequence number (1, 2, ...) and followers read
from the buffer, never from the backend. Buffers stay small: a new ``Progress`` replaces the previous one
(Started, the latest Progress and the terminal event are what a late reader needs). A finished buffer is
dropped when the client says it recorded the result (``forget``) or ``buffer_ttl`` after the end.

Slots are the backend's (one job per GPU). ``submit`` (the self-hosted worker's ``POST /v1/jobs``) takes a
free slot or refuses with ``HostBusy``; ``run`` (SageMaker's ``/invocations``) waits in line for a slot,
at most ``max_waiting`` requests deep, then waits for the terminal event. A job id the host already holds
is never run twice: ``submit`` reports the duplicate, ``run`` waits for the job already there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from deploy.backends.base import Backend, BackendBusy, BackendError
from deploy.backends.messages import TERMINAL_EVENTS, Cancelled, Event, Failed, JobSpec, Progress

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
"""Longest a waiter sleeps without re-checking (a missed notification costs at most this)."""


class HostRefused(BackendError):
    """The host cannot take the job now; ``code`` is the protocol's error code."""

    code = "refused"


class HostBusy(HostRefused):
    code = "busy"


class HostStopping(HostRefused):
    code = "stopping"


@dataclass
class JobBuffer:
    """One job's events as ``(seq, event)`` pairs; ``terminal`` once it ended."""

    job_id: str
    entries: list[tuple[int, Event]] = field(default_factory=list)
    last_seq: int = 0
    terminal: Event | None = None
    finished_at: float | None = None
    queued: bool = False
    """Waiting for a slot (``run``), not yet handed to the backend."""
    cancel_requested: bool = False

    @property
    def done(self) -> bool:
        return self.terminal is not None

    def after(self, seq: int) -> list[tuple[int, Event]]:
        return [entry for entry in self.entries if entry[0] > seq]

    def latest_progress(self) -> Progress | None:
        return next((e for _, e in reversed(self.entries) if isinstance(e, Progress)), None)


class WorkerHost:
    """Wraps one started ``Backend``; thread-safe, called from the server's threads."""

    def __init__(self, backend: Backend, *, max_waiting: int = 4, buffer_ttl: float = 900.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.max_waiting = max_waiting
        self.buffer_ttl = buffer_ttl
        self._clock = clock
        self._cond = threading.Condition()
        self._buffers: dict[str, JobBuffer] = {}
        self._waiting: deque[JobBuffer] = deque()
        self._started = False
        self._stopping = False

    # -- life cycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.backend.start(self._on_event)
        with self._cond:
            self._started = True

    @property
    def ready(self) -> bool:
        """Started and not stopping: what ``/ping`` answers."""
        return self._started and not self._stopping

    def stop(self, timeout: float = 20.0) -> None:
        """Stop accepting; queued jobs and running ones end ``Failed(kind="interrupted")``."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            for buffer in list(self._waiting):
                self._finish(buffer, _interrupted(buffer.job_id, "the worker stopped before the job started"))
            self._waiting.clear()
            self._cond.notify_all()
        if self._started:
            self.backend.stop(timeout)
        with self._cond:
            for buffer in self._buffers.values():
                if not buffer.done:  # the backend did not report it in time
                    self._finish(buffer, _interrupted(buffer.job_id, "the worker stopped while the job was running"))
            self._cond.notify_all()

    # -- jobs ------------------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> bool:
        """Hand ``spec`` to a free slot now; False when the job is already held (not run twice)."""
        with self._cond:
            self._sweep()
            if spec.job_id in self._buffers:
                return False
            self._check_accepting()
            if self._free_slots() <= 0:
                raise HostBusy(f"all {self.slots} slot(s) of this worker are busy; submit again when one is free")
            self._buffers[spec.job_id] = JobBuffer(spec.job_id)
            try:
                self.backend.submit(spec)
            except BaseException as exc:
                del self._buffers[spec.job_id]
                if isinstance(exc, BackendBusy):
                    raise HostBusy(str(exc)) from None
                raise
            log.info("job %s accepted (attempt %d)", spec.job_id, spec.attempt)
        return True

    def run(self, spec: JobSpec, *, on_event: Callable[[JobBuffer], None] | None = None,
            timeout: float | None = None) -> Event:
        """Wait for a slot, run ``spec`` and return its terminal event (a held job id: that job's).

        ``on_event`` is called (on this thread, outside the host's lock) whenever the buffer changed.
        """
        with self._cond:
            self._sweep()
            buffer = self._buffers.get(spec.job_id)
            mine = buffer is None
            if buffer is None:
                self._check_accepting()
                if (self._waiting or self._free_slots() <= 0) and len(self._waiting) >= self.max_waiting:
                    raise HostBusy(f"all {self.slots} slot(s) of this worker are busy and {len(self._waiting)} "
                                   f"request(s) already wait (at most {self.max_waiting}); retry later")
                buffer = self._buffers[spec.job_id] = JobBuffer(spec.job_id, queued=True)
                self._waiting.append(buffer)
        if mine and buffer.queued:
            self._wait_for_slot(buffer, spec, on_event)
        return self._wait_terminal(buffer, on_event, timeout)

    def _wait_for_slot(self, buffer: JobBuffer, spec: JobSpec, on_event: Callable[[JobBuffer], None] | None) -> None:
        if on_event is not None:
            on_event(buffer)
        with self._cond:
            while buffer.queued and not buffer.done:
                if buffer.cancel_requested:
                    self._waiting.remove(buffer)
                    self._finish(buffer, Cancelled(job_id=buffer.job_id, reason="cancelled before it started"))
                    break
                if self._waiting[0] is buffer and self.backend.free_slots() > 0:
                    try:
                        self.backend.submit(spec)
                    except BackendBusy:
                        self._cond.wait(POLL_SECONDS)
                        continue
                    except BaseException as exc:
                        self._waiting.remove(buffer)
                        self._finish(buffer, Failed(job_id=buffer.job_id, kind="internal",
                                                    message=f"the worker could not start the job: {exc}"))
                        break
                    self._waiting.popleft()
                    buffer.queued = False
                    self._cond.notify_all()
                    log.info("job %s accepted after waiting (attempt %d)", spec.job_id, spec.attempt)
                    break
                self._cond.wait(POLL_SECONDS)

    def _wait_terminal(self, buffer: JobBuffer, on_event: Callable[[JobBuffer], None] | None,
                       timeout: float | None) -> Event:
        deadline = None if timeout is None else self._clock() + timeout
        seen = -1
        while True:
            with self._cond:
                while buffer.last_seq == seen and not buffer.done:
                    if deadline is not None and self._clock() >= deadline:
                        raise TimeoutError(f"job {buffer.job_id} did not finish within {timeout} s")
                    self._cond.wait(POLL_SECONDS)
                seen = buffer.last_seq
                terminal = buffer.terminal
            if on_event is not None:
                on_event(buffer)
            if terminal is not None:
                return terminal

    def wait_events(self, buffer: JobBuffer, after: int, timeout: float) -> list[tuple[int, Event]]:
        """Events of ``buffer`` with seq > ``after``, waiting up to ``timeout`` for one; [] on timeout."""
        deadline = self._clock() + timeout
        with self._cond:
            while True:
                found = buffer.after(after)
                if found or buffer.done:
                    return found
                left = deadline - self._clock()
                if left <= 0:
                    return []
                self._cond.wait(min(left, POLL_SECONDS))

    def buffer(self, job_id: str) -> JobBuffer | None:
        with self._cond:
            self._sweep()
            return self._buffers.get(job_id)

    def forget(self, job_id: str) -> bool:
        """Drop a finished job's buffer (the client recorded the result); False when unknown or running."""
        with self._cond:
            buffer = self._buffers.get(job_id)
            if buffer is None or not buffer.done:
                return False
            del self._buffers[job_id]
            return True

    def cancel(self, job_id: str) -> bool:
        with self._cond:
            buffer = self._buffers.get(job_id)
            if buffer is None or buffer.done:
                return False
            if buffer.queued:
                buffer.cancel_requested = True
                self._cond.notify_all()
                return True
        return self.backend.cancel(job_id)

    def skip(self, job_id: str) -> bool:
        with self._cond:
            buffer = self._buffers.get(job_id)
            if buffer is None or buffer.done or buffer.queued:
                return False
        return self.backend.skip(job_id)

    def release_memory(self) -> None:
        self.backend.release_memory()

    # -- facts -------------------------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.backend.capabilities().slots

    def free_slots(self) -> int:
        with self._cond:
            return self._free_slots()

    def running(self) -> list[str]:
        with self._cond:
            return [b.job_id for b in self._buffers.values() if not b.done and not b.queued]

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    # -- internals ----------------------------------------------------------------------------------------------
    def _free_slots(self) -> int:
        if self._stopping or not self._started:
            return 0
        return max(0, self.backend.free_slots() - len(self._waiting))

    def _check_accepting(self) -> None:
        if self._stopping:
            raise HostStopping("this worker is stopping and takes no new jobs")
        if not self._started:
            raise HostStopping("this worker has not started yet")

    def _on_event(self, event: Event) -> None:
        """The backend's sink (its worker threads): append, keep Progress thinned, wake the followers."""
        with self._cond:
            buffer = self._buffers.get(event.job_id)
            if buffer is None:
                if self._stopping:
                    return
                buffer = self._buffers[event.job_id] = JobBuffer(event.job_id)
            if buffer.done:
                log.warning("job %s: %s event after its end ignored", event.job_id, event.type)
                return
            if isinstance(event, TERMINAL_EVENTS):
                self._finish(buffer, event)
                return
            if isinstance(event, Progress):
                buffer.entries = [entry for entry in buffer.entries if not isinstance(entry[1], Progress)]
            self._append(buffer, event)
            self._cond.notify_all()

    def _append(self, buffer: JobBuffer, event: Event) -> None:
        buffer.last_seq += 1
        buffer.entries.append((buffer.last_seq, event))

    def _finish(self, buffer: JobBuffer, terminal: Event) -> None:
        """Record the terminal event (caller holds the lock)."""
        self._append(buffer, terminal)
        buffer.terminal = terminal
        buffer.finished_at = self._clock()
        buffer.queued = False
        self._cond.notify_all()
        log.info("job %s ended: %s", buffer.job_id, terminal.type)

    def _sweep(self) -> None:
        """Drop buffers finished more than ``buffer_ttl`` ago (caller holds the lock)."""
        limit = self._clock() - self.buffer_ttl
        for job_id in [j for j, b in self._buffers.items() if b.finished_at is not None and b.finished_at < limit]:
            del self._buffers[job_id]
            log.info("job %s: events dropped %.0f s after its end (never fetched)", job_id, self.buffer_ttl)


def _interrupted(job_id: str, message: str) -> Failed:
    return Failed(job_id=job_id, message=message, kind="interrupted")
