"""Live job state in memory: the latest progress (with its preview) and change notifications.

Progress arrives many times a second; writing each step to the database would make the queue pay
for every UI poll. The dispatcher posts every event here and writes progress to the database only
now and then; pollers (the UI, /sdapi/v1/progress, ``JobService.wait``) read this board and sleep on
its condition instead of hammering the database.

HTTP waiters (long-polls, SSE, A1111's blocking txt2img) await ``wait_async`` instead: an asyncio event
set from the dispatcher's thread, so a waiting request costs no thread and one user's hundred waits
cannot use up a pool that another user's request needs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

KEEP_FINISHED = 10_000
"""Versions of this many finished jobs are kept (late waiters still see the change); older ones go."""


@dataclass(frozen=True)
class LiveProgress:
    step: int = 0
    total: int = 0
    job_no: int = 0
    job_count: int = 0
    eta: float | None = None
    preview_png: bytes | None = None
    phase: str = "base"
    updated: float = 0.0
    metrics: dict[str, float] | None = None
    """The latest numbers the job reported (a training's loss, lr, epoch); None for generation."""
    note: str | None = None
    """Why a started job makes no steps yet (``phase == "waiting"``: a SageMaker endpoint scaling from zero)."""

    @property
    def fraction(self) -> float:
        if self.total <= 0 or self.job_count <= 0:
            return 0.0
        return min(1.0, (self.job_no + self.step / self.total) / self.job_count)


class JobBoard:
    """Thread-safe; one per process (the dispatchers write, the services read)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._live: dict[str, LiveProgress] = {}
        self._versions: dict[str, int] = {}
        self._finished: deque[str] = deque()
        self._clock = 0
        self._async_waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def version(self, job_id: str) -> int:
        with self._cond:
            return self._versions.get(job_id, 0)

    def touch(self, job_id: str) -> None:
        """The job's row changed (status, results): wake whoever waits on it."""
        with self._cond:
            self._changed(job_id)

    def _changed(self, job_id: str) -> None:
        """A new version of ``job_id``: wake the threads and the event loops waiting on it (lock held)."""
        self._clock += 1
        self._versions[job_id] = self._clock
        self._cond.notify_all()
        for loop, event in self._async_waiters.pop(job_id, ()):
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    def post(self, job_id: str, progress: LiveProgress) -> None:
        with self._cond:
            previous = self._live.get(job_id)
            if progress.preview_png is None and previous is not None and previous.preview_png is not None:
                # keep showing the last preview between preview steps
                progress = replace(progress, preview_png=previous.preview_png)
            self._live[job_id] = progress
            self._changed(job_id)

    def live(self, job_id: str) -> LiveProgress | None:
        with self._cond:
            return self._live.get(job_id)

    def finish(self, job_id: str) -> None:
        """The job reached a terminal state: drop its live progress, wake waiters."""
        with self._cond:
            self._live.pop(job_id, None)
            self._changed(job_id)
            self._finished.append(job_id)
            while len(self._finished) > KEEP_FINISHED:
                old = self._finished.popleft()
                if old not in self._live:
                    self._versions.pop(old, None)

    def forget(self, job_id: str) -> None:
        """The job was deleted: drop what the board holds and wake its waiters (they find it gone)."""
        with self._cond:
            self._live.pop(job_id, None)
            self._changed(job_id)
            self._versions.pop(job_id, None)

    def wait(self, job_id: str, since: int, timeout: float) -> int:
        """Block until the job's version differs from ``since`` or ``timeout`` passes; returns the version."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self._versions.get(job_id, 0) == since:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._versions.get(job_id, 0)

    async def wait_async(self, job_id: str, since: int, timeout: float) -> int:
        """``wait`` for the event loop: awaits an event the writer sets, holding no thread meanwhile."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter = (loop, event)
        with self._cond:
            if self._versions.get(job_id, 0) != since:
                return self._versions.get(job_id, 0)
            self._async_waiters.setdefault(job_id, set()).add(waiter)
        try:
            await asyncio.wait_for(event.wait(), max(0.0, timeout))
        except TimeoutError:
            pass
        finally:
            with self._cond:
                waiters = self._async_waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._async_waiters[job_id]
        return self.version(job_id)
