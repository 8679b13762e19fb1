"""Live job state in memory: the latest progress (with its preview) and change notifications.

Progress arrives many times a second; writing each step to the database would make the queue pay
for every UI poll. The dispatcher posts every event here and writes progress to the database only
now and then; pollers (the UI, /sdapi/v1/progress, ``JobService.wait``) read this board and sleep on
its condition instead of hammering the database.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

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

    def version(self, job_id: str) -> int:
        with self._cond:
            return self._versions.get(job_id, 0)

    def touch(self, job_id: str) -> None:
        """The job's row changed (status, results): wake whoever waits on it."""
        with self._cond:
            self._clock += 1
            self._versions[job_id] = self._clock
            self._cond.notify_all()

    def post(self, job_id: str, progress: LiveProgress) -> None:
        with self._cond:
            previous = self._live.get(job_id)
            if progress.preview_png is None and previous is not None and previous.preview_png is not None:
                # keep showing the last preview between preview steps
                progress = LiveProgress(progress.step, progress.total, progress.job_no, progress.job_count,
                                        progress.eta, previous.preview_png, progress.phase, progress.updated)
            self._live[job_id] = progress
            self._clock += 1
            self._versions[job_id] = self._clock
            self._cond.notify_all()

    def live(self, job_id: str) -> LiveProgress | None:
        with self._cond:
            return self._live.get(job_id)

    def finish(self, job_id: str) -> None:
        """The job reached a terminal state: drop its live progress, wake waiters."""
        with self._cond:
            self._live.pop(job_id, None)
            self._clock += 1
            self._versions[job_id] = self._clock
            self._finished.append(job_id)
            while len(self._finished) > KEEP_FINISHED:
                old = self._finished.popleft()
                if old not in self._live:
                    self._versions.pop(old, None)
            self._cond.notify_all()

    def forget(self, job_id: str) -> None:
        with self._cond:
            self._live.pop(job_id, None)
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
