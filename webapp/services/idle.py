"""What the server does when nobody uses it: free GPU memory, and optionally power the machine off.

A GPU VM billed by the hour costs the same whether it renders or waits, and a checkpoint held in VRAM
blocks whatever else wants the card. So after ``idle_unload_minutes`` with no job queued, started or
finished on this server, every endpoint backend is asked to release its loaded models (once per idle
period: the next job loads them again and starts a new period). After ``idle_shutdown_minutes`` —
off by default — the configured command (e.g. ``systemctl poweroff``) runs once, and only while nothing
is queued or running: the AWS extension's advice to stop instances to save cost, done for you.

Activity comes from the job queue's observers (``ActivityClock``), which hear of every job's changes;
each tick also asks the database whether anything is queued or running, so a job that runs for hours
keeps the server busy. Both take an injectable clock, so tests drive them without waiting.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from webapp.records import Job
from webapp.services.jobs.observers import FinishedJob, JobObserver

log = logging.getLogger(__name__)

Clock = Callable[[], float]
SHUTDOWN_TIMEOUT_SECONDS = 120.0
"""How long the shutdown command may run before it is abandoned (and logged as failed)."""


class ActivityClock(JobObserver):
    """When a job last moved on this server (queued, started, interrupted, finished), by ``clock``."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last = clock()  # the server's start opens the first idle period

    @property
    def last(self) -> float:
        with self._lock:
            return self._last

    def touch(self) -> None:
        now = self._clock()
        with self._lock:
            self._last = max(self._last, now)

    def job_queued(self, job: Job) -> None:
        self.touch()

    def job_started(self, job: Job) -> None:
        self.touch()

    def job_interrupted(self, *, job_id: str, endpoint: str) -> None:
        self.touch()

    def job_finished(self, finished: FinishedJob) -> None:
        self.touch()


class IdleJobs(Protocol):
    """What the watcher needs of ``JobService``."""

    def active_jobs(self) -> int: ...

    def release_all_memory(self, *, reason: str) -> list[str]: ...


class IdleWatcher:
    """Ticks in a thread of its own (``start``/``stop`` from app.py); ``tick`` does one check."""

    def __init__(self, *, activity: ActivityClock, jobs: IdleJobs, unload_after_seconds: float = 0.0,
                 shutdown_after_seconds: float = 0.0, shutdown_command: Sequence[str] = (),
                 clock: Clock = time.monotonic, tick_seconds: float | None = None) -> None:
        if unload_after_seconds < 0 or shutdown_after_seconds < 0:
            raise ValueError("idle times must not be negative (0 turns a hook off)")
        if shutdown_after_seconds > 0 and not shutdown_command:
            raise ValueError("an idle shutdown needs a command to run")
        self.activity = activity
        self.jobs = jobs
        self.unload_after = unload_after_seconds
        self.shutdown_after = shutdown_after_seconds
        self.shutdown_command = list(shutdown_command)
        self._clock = clock
        enabled = [t for t in (unload_after_seconds, shutdown_after_seconds) if t > 0]
        # a quarter of the shortest wait, between 1 s and 30 s: late by at most that much
        self.tick_seconds = tick_seconds or (min(30.0, max(1.0, min(enabled) / 4)) if enabled else 30.0)
        self._unloaded_period: float | None = None  # the ``activity.last`` of the period already unloaded
        self.shutdown_ran = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.unload_after > 0 or self.shutdown_after > 0

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="idle-watcher", daemon=True)
        self._thread.start()
        log.info("idle watcher: unload models after %s, shut down after %s",
                 _minutes(self.unload_after), _minutes(self.shutdown_after))

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the watcher
                log.exception("idle watcher: the check failed; trying again at the next tick")

    # -- one check ------------------------------------------------------------------------------------------
    def tick(self) -> None:
        if self.jobs.active_jobs() > 0:
            self.activity.touch()  # a long job is activity all the time it runs
            return
        period = self.activity.last
        idle = self._clock() - period
        if self.unload_after > 0 and idle >= self.unload_after and self._unloaded_period != period:
            self._unloaded_period = period
            self.jobs.release_all_memory(reason=f"idle for {idle / 60:.1f} minutes")
        if self.shutdown_after > 0 and idle >= self.shutdown_after and not self.shutdown_ran:
            self._shut_down(idle)

    def _shut_down(self, idle: float) -> None:
        if self.jobs.active_jobs() > 0:  # asked again right before: a job may have arrived meanwhile
            return
        self.shutdown_ran = True  # once per process, whatever the command does
        log.warning("IDLE SHUTDOWN: nothing queued or running for %.1f minutes; running %s",
                    idle / 60, self.shutdown_command)
        try:
            result = subprocess.run(self.shutdown_command, capture_output=True, text=True, check=False,
                                    timeout=SHUTDOWN_TIMEOUT_SECONDS)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("IDLE SHUTDOWN: %s could not run: %s (not retried; restart the server to re-arm it)",
                      self.shutdown_command, exc)
            return
        if result.returncode != 0:
            log.error("IDLE SHUTDOWN: %s exited with %d: %s (not retried; restart the server to re-arm it)",
                      self.shutdown_command, result.returncode, (result.stderr or result.stdout).strip()[-500:])
        else:
            log.warning("IDLE SHUTDOWN: %s succeeded", self.shutdown_command)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds > 0 else "never"
