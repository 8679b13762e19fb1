"""A real worker process lost mid-job: killed (SIGKILL), killed and restarted, or hung (SIGSTOP).

Whatever happens to the worker, the ``http`` backend ends the job ``Failed(kind="interrupted")`` within a
bounded time (so the queue runs it again), shows the endpoint degraded meanwhile, and takes jobs again once
a worker answers at the same address.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.backends.http import HttpWorkerBackend
from deploy.backends.messages import Failed, Succeeded
from tests.backends.conftest import wait_healthy
from tests.backends.events import Sink
from tests.container.worker import fake_spec
from tests.fixtures.worker_process import WorkerProcess

SLOW = {"slots": 1, "step_delay": 0.14, "preview_every": 1}


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(tmp_path / "worker", backend="fake", backend_options=SLOW)
    process.start()
    try:
        yield process
    finally:
        if process.process is not None and process.process.poll() is None:
            process.process.send_signal(signal.SIGCONT)
        process.stop(10)


def started(worker: WorkerProcess, **timing: float) -> tuple[HttpWorkerBackend, Sink]:
    backend = HttpWorkerBackend("box", url=worker.url, secret=worker.secret, poll_seconds=0.2, **timing)
    sink = Sink()
    backend.start(sink)
    wait_healthy(backend)
    return backend, sink


def wait_for(condition, what: str, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout}s")
        time.sleep(0.02)


def test_a_killed_worker_interrupts_its_job_and_a_restarted_one_runs_it_again(worker):
    backend, sink = started(worker, grace_seconds=2.0, heartbeat_timeout=2.0)
    try:
        backend.submit(fake_spec("job1", steps=150))
        sink.wait_progress("job1")
        worker.kill()
        terminal = sink.wait_terminal("job1", 30)
        assert isinstance(terminal, Failed) and terminal.kind == "interrupted", terminal
        assert "lost the worker" in terminal.message
        wait_for(lambda: not backend.health()[0], "degraded")
        assert "unreachable" in backend.health()[1] and backend.free_slots() == 0

        worker.start()
        wait_healthy(backend)
        assert backend.free_slots() == 1
        backend.submit(fake_spec("job1", steps=4))  # the queue sends the same job again
        assert isinstance(sink.wait_terminal("job1", 30, nth=1), Succeeded)
    finally:
        backend.stop()


def test_a_worker_restarted_within_the_grace_period_interrupts_the_job_at_once(worker):
    backend, sink = started(worker, grace_seconds=120.0)
    try:
        backend.submit(fake_spec("job1", steps=150))
        sink.wait_progress("job1")
        worker.kill()
        worker.start()
        terminal = sink.wait_terminal("job1", 60)  # far less than the grace: the new worker says it never had it
        assert isinstance(terminal, Failed) and terminal.kind == "interrupted", terminal
        assert "no longer knows the job" in terminal.message
    finally:
        backend.stop()


def test_a_hung_worker_is_degraded_and_its_job_interrupted(worker):
    backend, sink = started(worker, grace_seconds=2.0, heartbeat_timeout=1.0, timeout_seconds=1.0)
    assert worker.process is not None
    try:
        backend.submit(fake_spec("job1", steps=150))
        sink.wait_progress("job1")
        worker.process.send_signal(signal.SIGSTOP)  # alive, connected, silent
        terminal = sink.wait_terminal("job1", 30)
        assert isinstance(terminal, Failed) and terminal.kind == "interrupted", terminal
        wait_for(lambda: not backend.health()[0], "degraded")
        assert "did not answer within" in backend.health()[1]
        worker.process.send_signal(signal.SIGCONT)
        wait_healthy(backend)
    finally:
        backend.stop()
