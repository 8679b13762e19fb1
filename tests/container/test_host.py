"""WorkerHost without HTTP: buffers and their sequence numbers, thinning, expiry, the line, stopping."""

from __future__ import annotations

import threading
import time

import pytest

from deploy.backends.fake import FakeBackend
from deploy.backends.messages import Failed, Progress, Started, Succeeded
from deploy.container.host import HostBusy, HostStopping, WorkerHost
from tests.container.worker import fake_spec


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _host(clock=time.monotonic, **options) -> WorkerHost:
    host = WorkerHost(FakeBackend("w", **options), max_waiting=2, buffer_ttl=60.0, clock=clock)
    host.start()
    return host


def _until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_progress_is_thinned_to_the_latest_and_sequence_numbers_keep_counting():
    host = _host(preview_every=0)
    try:
        terminal = host.run(fake_spec("a", steps=30))
        assert isinstance(terminal, Succeeded)
        buffer = host.buffer("a")
        kinds = [type(event) for _, event in buffer.entries]
        assert kinds == [Started, Progress, Succeeded], "Started, the last Progress, the end"
        seqs = [seq for seq, _ in buffer.entries]
        assert seqs == [1, 31, 32] and buffer.last_seq == 32, "31 = Started + 30 progress events"
        assert buffer.entries[1][1].step == 30
        assert host.wait_events(buffer, 31, timeout=0.01) == [buffer.entries[2]]
        assert host.wait_events(buffer, 32, timeout=5) == [], "over: no wait"
    finally:
        host.stop(1)


def test_finished_buffers_expire_after_the_ttl_running_ones_never():
    clock = Clock()
    host = _host(clock)
    try:
        assert host.submit(fake_spec("done"))
        _until(lambda: host.buffer("done") is not None and host.buffer("done").done)
        host.backend.step_delay = 0.05
        assert host.submit(fake_spec("running", steps=1000))
        clock.now += 59
        assert host.buffer("done") is not None
        clock.now += 2
        assert host.buffer("done") is None, "61 s after its end: dropped"
        assert host.buffer("running") is not None and not host.buffer("running").done
        assert not host.forget("running"), "a running job's buffer cannot be forgotten"
        assert host.cancel("running")
    finally:
        host.stop(5)


def test_run_waits_in_line_up_to_max_waiting_and_stop_interrupts_everyone():
    host = _host(step_delay=0.02)
    results: dict[str, object] = {}
    try:
        assert host.submit(fake_spec("blocker", steps=5000))
        threads = [threading.Thread(target=lambda j=j: results.setdefault(j, host.run(fake_spec(j))))
                   for j in ("w1", "w2")]
        for thread in threads:
            thread.start()
        _until(lambda: host.waiting() == 2)
        with pytest.raises(HostBusy, match="at most 2"):
            host.run(fake_spec("w3"))
        with pytest.raises(HostBusy):
            host.submit(fake_spec("direct"))
        assert host.free_slots() == 0 and host.running() == ["blocker"]
    finally:
        host.stop(5)
    for thread in threads:
        thread.join(10)
    for job_id in ("w1", "w2"):
        assert isinstance(results[job_id], Failed) and results[job_id].kind == "interrupted"
    blocker = host.buffer("blocker").terminal
    assert isinstance(blocker, Failed) and blocker.kind == "interrupted"
    assert host.backend.jobs_run == ["blocker"]
    assert not host.ready
    with pytest.raises(HostStopping):
        host.submit(fake_spec("late"))


def test_a_duplicate_run_waits_for_the_job_already_held():
    host = _host(step_delay=0.01)
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(host.run(fake_spec("same", steps=20))))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert len(results) == 2 and results[0] == results[1] and isinstance(results[0], Succeeded)
        assert host.backend.jobs_run == ["same"]
    finally:
        host.stop(1)
