"""The ``http`` backend's recovery, fault by fault, against a scripted worker (tests/backends/scripted.py)."""

from __future__ import annotations

import logging
import time

import httpx
import pytest

from deploy.backends import registry
from deploy.backends.base import BackendBusy, BackendError
from deploy.backends.http import HttpWorkerBackend
from deploy.backends.messages import Event, Failed, Progress, Started, Succeeded
from tests.backends.events import Sink
from tests.backends.scripted import ScriptedWorker, fail, info, line, respond, stream
from tests.container.worker import fake_spec

SECRET = "s3cret-value-that-must-never-leak"
URL = "http://gpu-box:8080"


def make(worker: ScriptedWorker, **kwargs) -> HttpWorkerBackend:
    values = {"slots": 2, "poll_seconds": 60.0, "grace_seconds": 1.0, "reconnect_delay": 0.02}
    values.update(kwargs)
    return HttpWorkerBackend("box", url=URL, secret=SECRET, transport=worker.transport(), **values)


def started(worker: ScriptedWorker, sink: Sink, **kwargs) -> HttpWorkerBackend:
    backend = make(worker, **kwargs)
    backend.start(sink)
    assert backend.probe() == (True, None)
    return backend


def run_one(worker: ScriptedWorker, timeout: float = 5.0, **kwargs) -> tuple[Event, Sink]:
    """Submit ``job1`` to a started backend over ``worker``; its terminal event (bounded wait) and the sink."""
    sink = Sink()
    backend = started(worker, sink, **kwargs)
    try:
        backend.submit(fake_spec("job1"))
        return sink.wait_terminal("job1", timeout), sink
    finally:
        backend.stop()


def result(job_id: str = "job1") -> Succeeded:
    return Succeeded(job_id=job_id, images=(b"\x89PNG img",), infotexts=("a lighthouse",), seeds=(1,))


def test_registry_builds_it_from_typed_options():
    backend = registry.create_backend(registry.BackendConfig(
        name="box", kind="http", options={"url": URL + "/", "secret": SECRET, "slots": 3}))
    assert isinstance(backend, HttpWorkerBackend) and backend.is_configured()
    assert backend.url == URL and backend.capabilities().slots == 3 and backend.capabilities().remote
    assert SECRET not in repr(backend)
    with pytest.raises(ValueError, match="secret"):
        registry.create_backend(registry.BackendConfig(name="box", kind="http", options={"url": URL}))


def test_events_are_forwarded_in_order_and_the_buffer_is_dropped():
    worker = ScriptedWorker().on("POST /v1/jobs", respond(202, {"job_id": "job1"}))
    worker.on("GET /v1/jobs/job1/events", lambda r: stream([
        line(1, Started(job_id="job1", worker="worker/cuda:0")), line(2, Progress(job_id="job1", step=1, total=3)),
        b'{"heartbeat": true}\n', line(3, result())]))
    worker.on("DELETE /v1/jobs/job1", respond(200, {"ok": True}))
    sink = Sink()
    backend = started(worker, sink)
    try:
        assert backend.free_slots() == 2
        backend.submit(fake_spec("job1"))
        assert isinstance(sink.wait_terminal("job1", 5), Succeeded)
        assert [type(e) for e in sink.events] == [Started, Progress, Succeeded]
        assert sink.events[0].worker == "box/worker/cuda:0"
        assert sink.events[-1] == result()
        deadline = time.monotonic() + 5
        while not worker.calls("DELETE", "/v1/jobs/job1") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.calls("DELETE", "/v1/jobs/job1"), "the worker's buffer is released after the result"
        assert backend.free_slots() == 2
    finally:
        backend.stop()
    (query, body), = worker.calls("POST", "/v1/jobs")
    assert body["job_id"] == "job1" and body["request"]["prompt"] == "a lighthouse"
    assert all(h.get("authorization") == f"Bearer {SECRET}" for h in worker.headers)


def test_a_dropped_stream_reconnects_after_the_last_seq_without_repeating_events():
    worker = ScriptedWorker().on("POST /v1/jobs", respond(202, {"job_id": "job1"}))
    worker.on("GET /v1/jobs/job1/events",
              lambda r: stream([line(1, Started(job_id="job1")), line(2, Progress(job_id="job1", step=1, total=3))],
                               then=httpx.RemoteProtocolError("peer closed connection")),
              fail(httpx.ConnectError, "connection refused"),
              lambda r: stream([line(2, Progress(job_id="job1", step=1, total=3)),  # a replay we already have
                                line(3, Progress(job_id="job1", step=3, total=3)), line(4, result())]))
    worker.on("GET /v1/jobs/job1", respond(200, {"job_id": "job1", "done": False, "last_seq": 3, "terminal": None}))
    terminal, sink = run_one(worker)
    assert isinstance(terminal, Succeeded)
    assert [(type(e).__name__, getattr(e, "step", None)) for e in sink.events] == [
        ("Started", None), ("Progress", 1), ("Progress", 3), ("Succeeded", None)]
    afters = [query["after"] for query, _ in worker.calls("GET", "/v1/jobs/job1/events")]
    assert afters == ["0", "2", "2"]


def test_a_finished_job_is_fetched_on_reconnect_instead_of_replayed():
    worker = ScriptedWorker().on("POST /v1/jobs", respond(202, {"job_id": "job1"}))
    worker.on("GET /v1/jobs/job1/events", lambda r: stream([line(1, Started(job_id="job1"))],
                                                           then=httpx.ReadError("reset")))
    worker.on("GET /v1/jobs/job1", respond(200, {"job_id": "job1", "done": True, "last_seq": 5,
                                                 "terminal": result().to_dict()}))
    assert run_one(worker)[0] == result()
    assert len(worker.calls("GET", "/v1/jobs/job1/events")) == 1


def test_a_worker_gone_for_the_grace_period_interrupts_the_job():
    worker = ScriptedWorker().on("POST /v1/jobs", respond(202, {"job_id": "job1"}))
    worker.on("GET /v1/jobs/job1/events", lambda r: stream([line(1, Started(job_id="job1"))],
                                                           then=httpx.ReadError("reset")),
              fail(httpx.ConnectError, "connection refused"))
    worker.on("GET /v1/jobs/job1", fail(httpx.ConnectError, "connection refused"))
    before = time.monotonic()
    terminal, sink = run_one(worker, timeout=10, grace_seconds=0.5)
    waited = time.monotonic() - before
    assert isinstance(terminal, Failed) and terminal.kind == "interrupted", terminal
    assert "lost the worker at http://gpu-box:8080" in terminal.message and "ConnectError" in terminal.message
    assert waited >= 0.4, "it waits out the grace period before giving the job up"
    assert len(worker.calls("GET", "/v1/jobs/job1")) >= 2, "it kept trying to reconnect meanwhile"
    assert len(sink.of(Failed)) == 1, "stop() does not report the job a second time"


def test_a_restarted_worker_that_forgot_the_job_interrupts_it_at_once():
    worker = ScriptedWorker().on("POST /v1/jobs", respond(202, {"job_id": "job1"}))
    worker.on("GET /v1/jobs/job1/events", lambda r: stream([line(1, Started(job_id="job1"))],
                                                           then=httpx.RemoteProtocolError("peer closed")))
    worker.on("GET /v1/jobs/job1", respond(404, {"error": "unknown_job", "message": "no job job1"}))
    terminal, _ = run_one(worker, grace_seconds=60.0)
    assert isinstance(terminal, Failed) and terminal.kind == "interrupted"
    assert "no longer knows the job" in terminal.message


def test_submit_retries_a_lost_answer_with_the_same_job_id():
    worker = ScriptedWorker().on("POST /v1/jobs", fail(httpx.ReadTimeout, "answer lost"),
                                 respond(200, {"job_id": "job1", "duplicate": True}))
    worker.on("GET /v1/jobs/job1/events", lambda r: stream([line(1, Started(job_id="job1")), line(2, result())]))
    assert run_one(worker)[0] == result()
    bodies = [body for _, body in worker.calls("POST", "/v1/jobs")]
    assert [b["job_id"] for b in bodies] == ["job1", "job1"] and bodies[0] == bodies[1]
    assert len(worker.calls("GET", "/v1/jobs/job1/events")) == 1, "one follower, not two"


def test_an_unreachable_worker_refuses_the_submit_and_degrades_the_endpoint():
    worker = ScriptedWorker().on("POST /v1/jobs", fail(httpx.ConnectError, "connection refused"))
    sink = Sink()
    backend = started(worker, sink, submit_attempts=3)
    try:
        with pytest.raises(BackendError, match="could not be reached: ConnectError"):
            backend.submit(fake_spec("job1"))
        assert len(worker.calls("POST", "/v1/jobs")) == 3
        healthy, reason = backend.health()
        assert not healthy and "gpu-box:8080" in reason
        assert backend.free_slots() == 0
        assert backend.probe() == (True, None), "the next good /v1/info puts it back in service"
        assert backend.free_slots() == 2, "the refused job holds no slot"
    finally:
        backend.stop()
    assert sink.events == []


def test_busy_refused_and_unreadable_submits():
    worker = ScriptedWorker().on("POST /v1/jobs", respond(503, {"error": "busy", "message": "all 1 slot(s) busy"}),
                                 respond(400, {"error": "bad_spec", "message": "not a job spec: 'models'"}),
                                 respond(413, {"error": "too_large", "message": "the body is over 64 MB"}),
                                 respond(401, {"error": "unauthorized", "message": "bad secret"}))
    sink = Sink()
    backend = started(worker, sink)
    try:
        with pytest.raises(BackendBusy, match="busy: all 1 slot"):
            backend.submit(fake_spec("a"))
        backend.submit(fake_spec("b"))  # reported as a failed job: retrying elsewhere would not help
        failed = sink.wait_terminal("b", 1)
        assert isinstance(failed, Failed) and failed.kind == "internal" and "not a job spec" in failed.message
        backend.submit(fake_spec("big"))
        too_large = sink.wait_terminal("big", 1)
        assert isinstance(too_large, Failed) and too_large.kind == "bad_request" and "64 MB" in too_large.message
        with pytest.raises(BackendError, match="refused the endpoint's secret"):
            backend.submit(fake_spec("c"))
        assert backend.health() == (False, "the worker at http://gpu-box:8080 refused the endpoint's secret")
    finally:
        backend.stop()
    assert [e.job_id for e in sink.events] == ["b", "big"]


def test_health_comes_from_the_poll_and_gates_the_slots():
    worker = ScriptedWorker().on("GET /v1/info", respond(200, info(slots=1)), respond(200, info(slots=1)),
                                 fail(httpx.ConnectTimeout, "slow"), respond(401, {"error": "unauthorized"}),
                                 respond(200, info(slots=1)))
    backend = make(worker, slots=4)
    assert backend.free_slots() == 0, "not started"
    backend.start(Sink())
    try:
        deadline = time.monotonic() + 5
        while not backend.health()[0] and time.monotonic() < deadline:  # the poller's first look, at start
            time.sleep(0.01)
        assert backend.probe() == (True, None)
        assert backend.free_slots() == 1, "never more than the worker's own slots"
        caps = backend.capabilities()
        assert (caps.remote, caps.slots, caps.devices, caps.modes) == (True, 4, ("cuda:0",), ("txt2img",))
        assert caps.extra["worker_version"] == "test-worker"
        assert backend.probe() == (False, "the worker at http://gpu-box:8080 did not answer within 5s")
        assert backend.free_slots() == 0
        assert "refused the endpoint's secret" in backend.probe()[1]
        assert backend.probe() == (True, None) and backend.free_slots() == 1
    finally:
        backend.stop()


def test_the_poller_observes_without_being_asked():
    worker = ScriptedWorker().on("GET /v1/info", fail(httpx.ConnectError, "connection refused"))
    backend = make(worker, poll_seconds=0.02)
    assert backend.health()[0] is False and "waiting for the first answer" in backend.health()[1]
    backend.start(Sink())
    try:
        deadline = time.monotonic() + 5
        while "unreachable" not in (backend.health()[1] or "") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "the worker at http://gpu-box:8080 is unreachable: ConnectError" in backend.health()[1]
        worker.on("GET /v1/info", respond(200, info()))
        while not backend.health()[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.health() == (True, None)
    finally:
        backend.stop()


def test_stop_cancels_on_the_worker_and_reports_running_jobs_interrupted():
    import threading

    hold = threading.Event()
    worker = ScriptedWorker().on("POST /v1/jobs", respond(202, {"job_id": "job1"}))
    worker.on("GET /v1/jobs/job1/events", lambda r: stream([line(1, Started(job_id="job1"))], hold=hold))
    worker.on("POST /v1/jobs/job1/cancel", respond(200, {"ok": True}))
    sink = Sink()
    backend = started(worker, sink)
    try:
        backend.submit(fake_spec("job1"))
        deadline = time.monotonic() + 5
        while not sink.events and time.monotonic() < deadline:
            time.sleep(0.01)
        backend.stop(timeout=5)
    finally:
        hold.set()
    assert [type(e) for e in sink.events] == [Started, Failed]
    assert sink.events[-1] == Failed(job_id="job1", message="the backend stopped while the job was running",
                                     kind="interrupted")
    assert len(worker.calls("POST", "/v1/jobs/job1/cancel")) == 1
    assert backend.free_slots() == 0
    with pytest.raises(BackendError, match="not running"):
        backend.submit(fake_spec("job2"))


def test_cancel_and_skip_reach_the_worker_only_for_held_jobs():
    import threading

    hold = threading.Event()
    worker = ScriptedWorker().on("POST /v1/jobs", respond(202, {"job_id": "job1"}))
    worker.on("GET /v1/jobs/job1/events", lambda r: stream([line(1, Started(job_id="job1"))], hold=hold))
    worker.on("POST /v1/jobs/job1/cancel", respond(200, {"ok": True}))
    worker.on("POST /v1/jobs/job1/skip", respond(200, {"ok": False}))
    backend = started(worker, Sink())
    try:
        backend.submit(fake_spec("job1"))
        assert backend.cancel("job1") is True
        assert backend.skip("job1") is False, "the worker's answer is passed on"
        assert backend.cancel("not-mine") is False and backend.skip("not-mine") is False
    finally:
        hold.set()
        backend.stop()
    assert [p for _, p, _, _ in worker.seen if p.startswith("/v1/jobs/not")] == []


def test_an_unreadable_stream_fails_the_job_instead_of_looping():
    worker = ScriptedWorker().on("POST /v1/jobs", respond(202, {"job_id": "job1"}))
    worker.on("GET /v1/jobs/job1/events", lambda r: stream([b'{"seq": 1, "event": {"type": "exploded"}}\n']))
    terminal, _ = run_one(worker)
    assert isinstance(terminal, Failed) and terminal.kind == "internal" and "cannot read" in terminal.message


def test_the_secret_is_never_logged(caplog):
    caplog.set_level(logging.DEBUG)
    worker = ScriptedWorker().on("POST /v1/jobs", fail(httpx.ConnectError, "connection refused"),
                                 respond(202, {"job_id": "job1"}), respond(401, {"error": "unauthorized"}))
    worker.on("GET /v1/jobs/job1/events", lambda r: stream([line(1, Started(job_id="job1"))],
                                                           then=httpx.ReadError("reset")),
              fail(httpx.ConnectError, "refused"))
    worker.on("GET /v1/jobs/job1", fail(httpx.ConnectError, "refused"))
    sink = Sink()
    backend = started(worker, sink, grace_seconds=0.2)
    errors = []
    try:
        backend.submit(fake_spec("job1"))
        sink.wait_terminal("job1", 5)
        try:
            backend.submit(fake_spec("job2"))
        except BackendError as exc:
            errors.append(str(exc))
        worker.on("GET /v1/info", respond(401, {"error": "unauthorized"}))
        backend.probe()
        backend.release_memory()
    finally:
        backend.stop()
    assert caplog.records, "the failures were logged"
    text = caplog.text + "".join(errors) + repr(backend) + str(backend.health()) + str(sink.events)
    for record in caplog.records:
        text += str(record.args) + str(record.__dict__)
    assert SECRET not in text
    assert "Bearer" not in text and "authorization" not in text.lower()
