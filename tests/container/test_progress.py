"""Async invocations' progress objects: asked for in the custom attributes, written to the asset store."""

from __future__ import annotations

import json
import threading
import time

import pytest

from deploy.backends.messages import Progress, Started, Succeeded
from deploy.container.host import JobBuffer
from deploy.container.progress import ATTRIBUTES_HEADER, ProgressWriter, parse_custom_attributes, progress_key
from deploy.storage import InvalidKey, LocalStore
from tests.container.worker import fake_spec, in_process_worker


def _load(store: LocalStore, key: str) -> dict:
    with store.open(key) as handle:
        return json.loads(handle.read())


def test_custom_attributes_and_the_progress_key():
    attributes = parse_custom_attributes("trace=abc, progress=async/progress/j1.json,flag")
    assert attributes == {"trace": "abc", "progress": "async/progress/j1.json"}
    assert progress_key(attributes) == "async/progress/j1.json"
    assert progress_key(parse_custom_attributes(None)) is None
    with pytest.raises(InvalidKey):
        progress_key({"progress": "../outside.json"})


def test_the_writer_throttles_and_always_writes_the_end(tmp_path):
    store = LocalStore(tmp_path)
    now = [0.0]
    writer = ProgressWriter(store, "p/j.json", interval=1.0, clock=lambda: now[0])
    buffer = JobBuffer("j")

    def read() -> dict:
        return _load(store, "p/j.json")

    writer(buffer)
    assert read()["status"] == "queued" and writer.writes == 1
    buffer.entries.append((1, Started(job_id="j", worker="w/cuda:0")))
    buffer.last_seq = 1
    now[0] = 0.5
    writer(buffer)
    assert writer.writes == 1, "within the interval: not written"
    buffer.entries.append((2, Progress(job_id="j", step=5, total=10, eta=2.5, preview_png="aGk=")))
    buffer.last_seq = 2
    now[0] = 1.2
    writer(buffer)
    document = read()
    assert writer.writes == 2 and document["status"] == "running" and document["worker"] == "w/cuda:0"
    assert (document["step"], document["total"], document["fraction"], document["eta"]) == (5, 10, 0.5, 2.5)
    assert document["preview_png"] == "aGk="
    writer(buffer)
    assert writer.writes == 2, "nothing new: not written"
    end = Succeeded(job_id="j", images=(b"\x89PNG",), seeds=(1,))
    buffer.entries.append((3, end))
    buffer.last_seq, buffer.terminal = 3, end
    now[0] = 1.3
    writer(buffer)
    final = read()
    assert writer.writes == 3, "the end is written at once"
    assert final["status"] == "succeeded" and final["fraction"] == 1.0 and final["images"] == 1
    assert final["preview_png"] is None and len(json.dumps(final)) < 1000


def test_an_invocation_with_a_progress_key_writes_progress_then_the_outcome(tmp_path):
    store = LocalStore(tmp_path)
    with in_process_worker(step_delay=0.02, store=store) as worker, worker.client() as client:
        seen: list[dict] = []
        stop = threading.Event()

        def watch() -> None:  # what the control plane does: poll the object
            while not stop.is_set():
                if store.exists("progress/inv.json"):
                    seen.append(_load(store, "progress/inv.json"))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        answer = client.post("/invocations", content=fake_spec("inv", steps=50).to_json(),
                             headers={ATTRIBUTES_HEADER: "progress=progress/inv.json"})
        stop.set()
        watcher.join()
        assert answer.status_code == 200 and answer.json()["type"] == "succeeded"
        final = _load(store, "progress/inv.json")
        assert final["status"] == "succeeded" and final["job_id"] == "inv"
        running = [s for s in seen if s["status"] == "running" and s["step"] > 0]
        assert running and running[0]["preview_png"], "steps and a preview were visible while it ran"

        refused = client.post("/invocations", content=fake_spec("bad-key").to_json(),
                              headers={ATTRIBUTES_HEADER: "progress=/abs/key"})
        assert refused.status_code == 400 and refused.json()["field"] == "progress"
