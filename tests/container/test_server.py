"""The worker protocol over HTTP, against the worker app in this process on the fake backend."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest

from deploy.backends.messages import Cancelled, Succeeded, event_from_dict
from tests.container.worker import SECRET, auth, events_of, fake_spec, in_process_worker, read_stream


def _wait(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def worker():
    with in_process_worker(slots=1, step_delay=0.0) as running:
        yield running


@pytest.fixture
def client(worker):
    with worker.client() as c:
        yield c


def test_ping_is_open_and_every_other_route_needs_the_secret(worker):
    with httpx.Client(base_url=worker.url, timeout=10) as anonymous:
        ping = anonymous.get("/ping")
        assert ping.status_code == 200 and ping.content == b""
        for method, path in [("GET", "/v1/info"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"),
                             ("GET", "/v1/jobs/x/events"), ("POST", "/v1/jobs/x/cancel"), ("DELETE", "/v1/jobs/x"),
                             ("POST", "/v1/release-memory"), ("POST", "/invocations")]:
            for headers in ({}, auth("not-the-secret-at-all-xx"), {"Authorization": SECRET}):
                answer = anonymous.request(method, path, headers=headers, content=fake_spec().to_json())
                assert answer.status_code == 401, (method, path, headers)
                assert answer.json()["error"] == "unauthorized"
        assert worker.backend.jobs_run == [], "nothing ran without the secret"
        info = anonymous.get("/v1/info", headers=auth())
    assert info.status_code == 200
    body = info.json()
    assert body["slots"] == 1 and body["free_slots"] == 1 and body["running"] == []
    assert body["capabilities"]["devices"] == ["fake0"] and body["version"]


def test_submit_then_stream_to_a_png_then_replay_fetch_and_forget(client, worker):
    spec = fake_spec("stream-1", n_iter=2)
    answer = client.post("/v1/jobs", content=spec.to_json())
    assert answer.status_code == 202 and answer.json() == {"job_id": "stream-1"}
    lines = read_stream(client, "stream-1")
    seqs = [line["seq"] for line in lines if "seq" in line]
    assert seqs == sorted(seqs) and seqs[0] == 1 and len(set(seqs)) == len(seqs)
    events = [event_from_dict(e) for e in events_of(lines)]
    assert events[0].type == "started" and events[-1].type == "succeeded"
    final = events[-1]
    assert isinstance(final, Succeeded) and len(final.images) == 2
    assert all(image.startswith(b"\x89PNG") for image in final.images)

    replay = read_stream(client, "stream-1", after=1)  # buffered: the latest progress, then the end
    assert [line["event"]["type"] for line in replay] == ["progress", "succeeded"]
    assert replay[0]["event"]["step"] == 4 and replay[0]["event"]["job_no"] == 1
    assert 1 < replay[0]["seq"] < replay[1]["seq"] == seqs[-1]
    assert read_stream(client, "stream-1", after=seqs[-1]) == [], "nothing after the end: the stream just ends"

    state = client.get("/v1/jobs/stream-1").json()
    assert state["done"] is True and state["last_seq"] == seqs[-1]
    assert base64.b64decode(state["terminal"]["images"][0]) == final.images[0]

    assert client.delete("/v1/jobs/stream-1").json() == {"ok": True}
    assert client.get("/v1/jobs/stream-1").status_code == 404
    gone = client.get("/v1/jobs/stream-1/events")
    assert gone.status_code == 404 and gone.json()["error"] == "unknown_job"
    assert client.delete("/v1/jobs/stream-1").json() == {"ok": False}


def test_a_retried_submit_is_not_run_twice(client, worker):
    spec = fake_spec("dup-1")
    assert client.post("/v1/jobs", content=spec.to_json()).status_code == 202
    again = client.post("/v1/jobs", content=spec.to_json())
    assert again.status_code == 200 and again.json() == {"job_id": "dup-1", "duplicate": True}
    events_of(read_stream(client, "dup-1"))
    assert client.post("/v1/jobs", content=spec.to_json()).json()["duplicate"] is True, "still held after the end"
    assert worker.backend.jobs_run.count("dup-1") == 1
    client.delete("/v1/jobs/dup-1")


def test_bad_specs_are_400_naming_the_problem(client):
    for body in (b"not json", b"{}", b'{"job_id": "x", "mode": "txt2img", "request": {}, "models": {}}', b"\xff\xfe"):
        for path in ("/v1/jobs", "/invocations"):
            answer = client.post(path, content=body)
            assert answer.status_code == 400, (path, body)
            assert answer.json()["error"] == "bad_spec" and "job spec" in answer.json()["message"]
    bad_after = client.get("/v1/jobs/x/events", params={"after": -1})
    assert bad_after.status_code == 400 and bad_after.json()["field"] == "after"


def test_invocations_answer_the_terminal_event(client, worker):
    answer = client.post("/invocations", content=fake_spec("inv-1", prompt="a boat").to_json())
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    event = event_from_dict(answer.json())
    assert isinstance(event, Succeeded) and event.images[0].startswith(b"\x89PNG") and event.seeds == (7,)
    assert client.get("/v1/jobs/inv-1").status_code == 404, "the answer carried the result: nothing kept"


def test_release_memory_answers_ok(client):
    assert client.post("/v1/release-memory").json() == {"ok": True}


def test_busy_cancel_skip_and_heartbeats_on_a_slow_job(tmp_path):
    with in_process_worker(slots=1, step_delay=0.05, heartbeat=0.05) as slow, slow.client() as client:
        assert client.post("/v1/jobs", content=fake_spec("long", steps=400).to_json()).status_code == 202
        busy = client.post("/v1/jobs", content=fake_spec("other").to_json())
        assert busy.status_code == 503 and busy.json()["error"] == "busy"
        assert "busy" in busy.json()["message"] and "slot" in busy.json()["message"]
        assert client.get("/v1/info").json()["free_slots"] == 0
        assert client.get("/v1/info").json()["running"] == ["long"]
        _wait(lambda: client.get("/v1/jobs/long").json()["last_seq"] >= 2)
        assert client.post("/v1/jobs/long/cancel").json() == {"ok": True}
        lines = read_stream(client, "long")
        assert events_of(lines)[-1]["type"] == "cancelled"
        assert client.post("/v1/jobs/long/cancel").json() == {"ok": False}, "over: nothing to cancel"
        assert client.post("/v1/jobs/nope/skip").json() == {"ok": False}

        # skip drops the running batch and goes on with the next (n_iter=2 → one image, the second seed)
        assert client.post("/v1/jobs", content=fake_spec("skip", steps=40, n_iter=2, seed=3).to_json()).status_code \
            == 202
        _wait(lambda: client.get("/v1/jobs/skip").json()["last_seq"] >= 2)
        assert client.post("/v1/jobs/skip/skip").json() == {"ok": True}
        final = events_of(read_stream(client, "skip"))[-1]
        assert final["type"] == "succeeded" and final["seeds"] == [4] and len(final["images"]) == 1

        # an idle stream carries heartbeats: one step of 0.6 s, heartbeats every 0.05 s
        slow.backend.step_delay = 0.6
        client.post("/v1/jobs", content=fake_spec("quiet", steps=1).to_json())
        lines = read_stream(client, "quiet")
        assert sum(1 for line in lines if line == {"heartbeat": True}) >= 3
        assert events_of(lines)[-1]["type"] == "succeeded"


def test_invocations_wait_in_line_then_503_when_the_line_is_full():
    with in_process_worker(slots=1, step_delay=0.02, max_waiting=1) as slow, slow.client() as client:
        assert client.post("/v1/jobs", content=fake_spec("blocker", steps=2000).to_json()).status_code == 202
        answers: dict[str, httpx.Response] = {}

        def invoke(job_id: str) -> None:
            with slow.client() as own:
                answers[job_id] = own.post("/invocations", content=fake_spec(job_id).to_json(), timeout=60)

        waiter = threading.Thread(target=invoke, args=("waiting",))
        waiter.start()
        _wait(lambda: slow.host.waiting() == 1)
        assert client.get("/v1/info").json()["free_slots"] == 0
        full = client.post("/invocations", content=fake_spec("too-many").to_json())
        assert full.status_code == 503 and full.json()["error"] == "busy"
        assert "wait" in full.json()["message"]
        assert "waiting" not in slow.backend.jobs_run, "it waits for the slot, it does not run beside the blocker"
        client.post("/v1/jobs/blocker/cancel")
        waiter.join(30)
        assert answers["waiting"].status_code == 200 and answers["waiting"].json()["type"] == "succeeded"
        assert "too-many" not in slow.backend.jobs_run


def test_a_queued_invocation_can_be_cancelled():
    with in_process_worker(slots=1, step_delay=0.02, max_waiting=2) as slow, slow.client() as client:
        client.post("/v1/jobs", content=fake_spec("blocker", steps=2000).to_json())
        answers: dict[str, httpx.Response] = {}
        waiter = threading.Thread(target=lambda: answers.setdefault(
            "q", httpx.post(slow.url + "/invocations", content=fake_spec("queued").to_json(), headers=auth(),
                            timeout=60)))
        waiter.start()
        _wait(lambda: slow.host.waiting() == 1)
        assert client.get("/v1/jobs/queued").json()["done"] is False
        assert client.post("/v1/jobs/queued/cancel").json() == {"ok": True}
        waiter.join(30)
        assert answers["q"].json() == {**answers["q"].json(), "type": "cancelled",
                                       "reason": "cancelled before it started"}
        assert "queued" not in slow.backend.jobs_run
        client.post("/v1/jobs/blocker/cancel")


def test_a_stream_delivers_the_end_that_raced_with_a_heartbeat_timeout():
    """The wait timed out (a heartbeat is due) just as the terminal event arrived: the stream still sends it."""
    with in_process_worker(slots=1, step_delay=0.05, heartbeat=0.05) as slow, slow.client() as client:
        client.post("/v1/jobs", content=fake_spec("race", steps=1000).to_json())
        host, original = slow.host, slow.host.wait_events

        def timed_out_as_it_ended(buffer, after, timeout):
            found = original(buffer, after, timeout)
            if not buffer.done and buffer.last_seq >= 2:
                host._on_event(Cancelled(job_id="race", reason="ended during the wait"))
                return []
            return found

        host.wait_events = timed_out_as_it_ended
        try:
            lines = read_stream(client, "race")
        finally:
            host.wait_events = original
        assert events_of(lines)[-1] == {**events_of(lines)[-1], "type": "cancelled", "reason": "ended during the wait"}


def test_a_long_line_of_waiting_invocations_does_not_starve_ping_or_the_control_routes():
    """More requests wait than anyio's default thread pool has threads (40): /ping still answers at once."""
    count = 45
    with in_process_worker(slots=1, step_delay=0.02, max_waiting=count) as slow, slow.client() as client:
        client.post("/v1/jobs", content=fake_spec("blocker", steps=100000).to_json())
        answers: list[httpx.Response] = []

        def invoke(i: int) -> None:
            answers.append(httpx.post(slow.url + "/invocations", content=fake_spec(f"line-{i}").to_json(),
                                      headers=auth(), timeout=60))

        threads = [threading.Thread(target=invoke, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        try:
            _wait(lambda: slow.host.waiting() == count)
            assert httpx.get(slow.url + "/ping", timeout=2).status_code == 200
            assert client.get("/v1/info", timeout=2).json()["waiting"] == count
            assert client.get("/v1/jobs/blocker", timeout=2).json()["done"] is False
        finally:
            slow.host.stop(5)
            for thread in threads:
                thread.join(30)
        assert len(answers) == count and {a.json()["kind"] for a in answers} == {"interrupted"}


def test_a_spec_over_the_body_limit_is_refused_before_it_runs():
    with in_process_worker(max_body_bytes=4096) as small, small.client() as client:
        big = fake_spec("big", prompt="x" * 5000).to_json()
        for path in ("/v1/jobs", "/invocations"):
            answer = client.post(path, content=big)
            assert answer.status_code == 413 and answer.json()["error"] == "too_large", path
            assert answer.json()["field"] == "body" and "4096" in answer.json()["message"]
            chunked = client.post(path, content=iter([big[:3000].encode(), big[3000:].encode()]))
            assert chunked.status_code == 413, "no Content-Length: counted while reading"
        assert small.backend.jobs_run == []
        assert client.post("/v1/jobs", content=fake_spec("small").to_json()).status_code == 202
