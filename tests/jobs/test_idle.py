"""The idle watcher on the fake backend with a fake clock: models are released after the idle time, not
before, not twice, not while a job runs; the shutdown command runs once and only when nothing is active."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from tests.jobs.conftest import txt2img
from webapp.records import JobStatus
from webapp.services.idle import ActivityClock, IdleWatcher

MINUTE = 60.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, minutes: float) -> None:
        self.now += minutes * MINUTE


class Watched:
    """A watcher over the fake studio's JobService, its activity fed by the real queue's observers."""

    def __init__(self, studio, monkeypatch: pytest.MonkeyPatch, **hooks: object) -> None:
        self.studio, self.jobs, self.admin = studio, studio.jobs, studio.admin
        self.clock = FakeClock()
        activity = ActivityClock(self.clock)
        monkeypatch.setattr(self.jobs.queue, "observers", (*self.jobs.queue.observers, activity))
        self.released: list[str] = []
        for name, dispatcher in self.jobs._dispatchers.items():
            monkeypatch.setattr(dispatcher.backend, "release_memory", lambda name=name: self.released.append(name))
        self.watcher = IdleWatcher(activity=activity, jobs=self.jobs, clock=self.clock, **hooks)  # type: ignore[arg-type]

    def run_job(self, **request: object) -> None:
        job = self.jobs.submit(actor=self.admin, mode="txt2img", request=txt2img(**request))
        assert self.jobs.wait(actor=self.admin, job_id=job.id, timeout=30).status == JobStatus.SUCCEEDED

    def start_long_job(self) -> str:
        """A job that runs until cancelled (the fake renders 100 x 150 steps of 5 ms: over a minute)."""
        job = self.jobs.submit(actor=self.admin, mode="txt2img", request=txt2img(steps=150, n_iter=100))
        deadline = time.monotonic() + 10
        while self.jobs.get(actor=self.admin, job_id=job.id).status != JobStatus.RUNNING:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.01)
        return job.id

    def cancel(self, job_id: str) -> None:
        self.jobs.cancel(actor=self.admin, job_id=job_id)
        assert self.jobs.wait(actor=self.admin, job_id=job_id, timeout=30).status == JobStatus.CANCELLED


def test_models_are_released_after_the_idle_time_once_per_idle_period(fake_studio, monkeypatch):
    watched = Watched(fake_studio, monkeypatch, unload_after_seconds=30 * MINUTE)
    endpoints = sorted(fake_studio.jobs._dispatchers)
    watched.clock.advance(29)
    watched.watcher.tick()
    assert watched.released == [], "released before the idle time"
    watched.clock.advance(2)
    watched.watcher.tick()
    assert watched.released == endpoints, "every endpoint backend is asked once"
    watched.clock.advance(120)
    watched.watcher.tick()
    watched.watcher.tick()
    assert watched.released == endpoints, "released twice in one idle period"

    watched.run_job()  # a job starts a new idle period
    watched.watcher.tick()
    watched.clock.advance(29)
    watched.watcher.tick()
    assert watched.released == endpoints
    watched.clock.advance(2)
    watched.watcher.tick()
    assert watched.released == endpoints * 2


def test_nothing_is_released_or_shut_down_while_a_job_runs(fake_studio, monkeypatch, tmp_path):
    marker = tmp_path / "shutdown"
    watched = Watched(fake_studio, monkeypatch, unload_after_seconds=30 * MINUTE,
                      shutdown_after_seconds=60 * MINUTE, shutdown_command=_touch(marker))
    job_id = watched.start_long_job()
    watched.clock.advance(240)
    watched.watcher.tick()
    assert watched.released == [] and not marker.exists(), "a running job is activity all the time it runs"
    watched.cancel(job_id)  # its end is activity too: the idle time counts from here
    watched.clock.advance(29)
    watched.watcher.tick()
    assert watched.released == [] and not marker.exists()
    watched.clock.advance(2)
    watched.watcher.tick()
    assert watched.released and not marker.exists()
    watched.clock.advance(30)
    watched.watcher.tick()
    assert marker.read_text() == "x"


def test_the_shutdown_command_runs_once(fake_studio, monkeypatch, tmp_path):
    marker = tmp_path / "shutdown"
    watched = Watched(fake_studio, monkeypatch, shutdown_after_seconds=60 * MINUTE, shutdown_command=_touch(marker))
    watched.clock.advance(59)
    watched.watcher.tick()
    assert not marker.exists()
    watched.clock.advance(2)
    watched.watcher.tick()
    assert marker.read_text() == "x" and watched.watcher.shutdown_ran
    watched.run_job()  # the machine did not go down: a later idle period must not run it again
    watched.clock.advance(120)
    watched.watcher.tick()
    assert marker.read_text() == "x", "the shutdown command ran twice"
    assert watched.released == [], "unloading was not asked for"


def test_a_failing_shutdown_command_is_logged_and_not_retried(fake_studio, monkeypatch, tmp_path, caplog):
    marker = tmp_path / "shutdown"
    command = [sys.executable, "-c", "import sys; open(sys.argv[1], 'a').write('x'); sys.exit(3)", str(marker)]
    watched = Watched(fake_studio, monkeypatch, shutdown_after_seconds=MINUTE, shutdown_command=command)
    watched.clock.advance(2)
    with caplog.at_level(logging.WARNING, logger="webapp.services.idle"):
        watched.watcher.tick()
        watched.clock.advance(10)
        watched.watcher.tick()
    assert marker.read_text() == "x"
    assert any("IDLE SHUTDOWN" in r.message and "exited with 3" in r.message for r in caplog.records)


def test_queued_jobs_count_as_activity(fake_studio, monkeypatch):
    watched = Watched(fake_studio, monkeypatch, unload_after_seconds=30 * MINUTE)
    running = watched.start_long_job()
    queued = fake_studio.jobs.submit(actor=fake_studio.admin, mode="txt2img", request=txt2img())
    assert fake_studio.jobs.active_jobs() == 2, "queued and running jobs are both activity"
    fake_studio.jobs.cancel(actor=fake_studio.admin, job_id=queued.id)
    watched.clock.advance(31)
    watched.watcher.tick()
    assert watched.released == []
    watched.cancel(running)
    assert fake_studio.jobs.active_jobs() == 0


def test_the_watcher_refuses_a_shutdown_without_a_command_and_is_off_at_zero():
    class NoJobs:
        def active_jobs(self) -> int:
            return 0

        def release_all_memory(self, *, reason: str) -> list[str]:
            raise AssertionError("released while off")

    clock = FakeClock()
    with pytest.raises(ValueError, match="command"):
        IdleWatcher(activity=ActivityClock(clock), jobs=NoJobs(), shutdown_after_seconds=60)
    off = IdleWatcher(activity=ActivityClock(clock), jobs=NoJobs(), clock=clock)
    clock.advance(10_000)
    off.tick()
    off.start()
    assert not off.enabled and off._thread is None


def test_the_studio_starts_and_stops_its_watcher(fake_studio):
    idle = fake_studio.studio.idle
    assert idle is not None and idle.enabled, "idle unloading is on by default (30 minutes)"
    assert idle.unload_after == 30 * MINUTE and idle.shutdown_after == 0
    assert idle._thread is not None and idle._thread.is_alive()


def _touch(marker: Path) -> list[str]:
    """A shutdown command that appends one ``x`` to ``marker`` (so a second run shows)."""
    return [sys.executable, "-c", "import sys; open(sys.argv[1], 'a').write('x')", str(marker)]


def test_a_backend_that_cannot_release_is_logged_and_left_out(fake_studio, monkeypatch, caplog):
    def broken() -> None:
        raise RuntimeError("worker out of reach")

    for dispatcher in fake_studio.jobs._dispatchers.values():
        monkeypatch.setattr(dispatcher.backend, "release_memory", broken)
    with caplog.at_level(logging.ERROR, logger="webapp.services.jobs.service"):
        assert fake_studio.jobs.release_all_memory(reason="idle") == []
    assert any("could not release" in r.message for r in caplog.records)
