"""``/invocations`` with store references (``spec=<key>``, ``results=<prefix>``) and a failed job's status."""

from __future__ import annotations

import io

import pytest

from deploy.backends.messages import Failed, Succeeded, event_from_dict
from deploy.container.progress import ATTRIBUTES_HEADER
from deploy.storage import MemoryStore
from tests.container.worker import fake_spec, in_process_worker


def _read(store, key: str) -> bytes:
    with store.open(key) as stream:
        return stream.read()


@pytest.fixture(scope="module")
def store():
    return MemoryStore()


@pytest.fixture(scope="module")
def worker(store):
    with in_process_worker(store=store, fail_prompts={"bad_request": "REJECT", "oom": "HUGE"}) as running:
        yield running


@pytest.fixture
def client(worker):
    with worker.client() as c:
        yield c


def test_a_spec_named_by_key_is_read_from_the_store_and_the_body_ignored(client, store):
    spec = fake_spec("by-ref", prompt="a stored spec")
    store.put("inputs/by-ref.json", io.BytesIO(spec.to_json().encode()))
    answer = client.post("/invocations", content=b"{}", headers={ATTRIBUTES_HEADER: "spec=inputs/by-ref.json"})
    assert answer.status_code == 200, answer.text
    event = event_from_dict(answer.json())
    assert isinstance(event, Succeeded) and event.job_id == "by-ref" and event.images

    missing = client.post("/invocations", content=b"{}", headers={ATTRIBUTES_HEADER: "spec=inputs/none.json"})
    assert missing.status_code == 400 and missing.json()["error"] == "bad_spec"
    assert "inputs/none.json" in missing.json()["message"]
    bad = client.post("/invocations", content=b"{}", headers={ATTRIBUTES_HEADER: "spec=../up.json"})
    assert bad.status_code == 400 and bad.json()["field"] == "spec"


def test_results_go_to_the_store_and_the_answer_names_their_keys(client, store):
    inline = event_from_dict(client.post("/invocations", content=fake_spec("inline", batch_size=2).to_json()).json())
    answer = client.post("/invocations", content=fake_spec("keys", batch_size=2).to_json(),
                         headers={ATTRIBUTES_HEADER: "progress=progress/keys.json,results=jobs/keys/"})
    assert answer.status_code == 200
    event = event_from_dict(answer.json())
    assert isinstance(event, Succeeded) and event.images == ()
    assert event.image_keys == ("jobs/keys/0.png", "jobs/keys/1.png")
    assert [_read(store, key) for key in event.image_keys] == list(inline.images), "same bytes, by key"
    assert "base64" not in answer.text and len(answer.content) < 5000
    assert store.exists("progress/keys.json")


def test_a_failed_job_answers_an_error_status_with_its_event(client):
    for prompt, kind, status in (("REJECT this", "bad_request", 400), ("HUGE", "oom", 500)):
        answer = client.post("/invocations", content=fake_spec("f", prompt=prompt).to_json(),
                             headers={ATTRIBUTES_HEADER: "results=jobs/f"})
        assert answer.status_code == status
        event = event_from_dict(answer.json())
        assert isinstance(event, Failed) and event.kind == kind and event.message


def test_references_need_a_store():
    with in_process_worker() as bare, bare.client() as client:
        answer = client.post("/invocations", content=fake_spec().to_json(), headers={ATTRIBUTES_HEADER: "results=r"})
        assert answer.status_code == 400 and answer.json() == {**answer.json(), "error": "no_store", "field": "results"}
        assert bare.backend.jobs_run == []
