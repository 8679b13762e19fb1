"""/api/v1/jobs and the image route over HTTP: create/get/list/cancel/delete/images/progress/SSE, isolation;
on SQLite and on PostgreSQL."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_PASSWORD, login
from tests.fixtures.postgres import DATABASE_KINDS
from tests.jobs.conftest import USER_PASSWORD, add_user, txt2img


@pytest.fixture(scope="module", params=DATABASE_KINDS)
def fake_studio_database(request) -> str:
    return request.param


@pytest.fixture
def clients(fake_studio) -> Iterator[tuple[TestClient, TestClient, TestClient]]:
    """(alice, bob, admin) signed in, each with its own session."""
    add_user(fake_studio, "alice")
    add_user(fake_studio, "bob")
    with TestClient(fake_studio.app, follow_redirects=False) as a, \
            TestClient(fake_studio.app, follow_redirects=False) as b, \
            TestClient(fake_studio.app, follow_redirects=False) as admin:
        login(a, "alice", USER_PASSWORD)
        login(b, "bob", USER_PASSWORD)
        login(admin, "admin", ADMIN_PASSWORD)
        yield a, b, admin


def _create(client: TestClient, **overrides) -> dict:
    body = {"mode": "txt2img", "request": txt2img(**overrides)}
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def _finished(client: TestClient, job_id: str) -> dict:
    """Follow the job's SSE stream to its ``done`` event."""
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "done":
                return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended without a done event")


def test_create_follow_and_fetch_images_with_their_infotext(clients):
    from PIL import Image

    alice, _, _ = clients
    created = _create(alice, batch_size=2)
    assert created["status"] == "queued" and created["owner"] == "alice" and created["id"]
    done = _finished(alice, created["id"])
    assert done["status"] == "succeeded" and len(done["images"]) == 2
    assert done["info"]["all_seeds"] == [7, 8]
    image = alice.get(done["images"][1]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(image.content)) as png:
        assert png.info["parameters"] == done["images"][1]["infotext"]
    same = alice.get(f"/api/v1/jobs/{created['id']}/images/1")
    assert same.content == image.content, "both routes serve the stored bytes"
    download = alice.get(done["images"][0]["url"] + "?download=1")
    assert download.headers["content-disposition"].startswith("attachment")
    detail = alice.get(f"/api/v1/jobs/{created['id']}").json()
    assert detail["request"]["prompt"] == "a red fox" and detail["title"].endswith(f"-txt2img-succeeded-{created['id']}")
    progress = alice.get(f"/api/v1/jobs/{created['id']}/progress?wait=1").json()
    assert progress["status"] == "succeeded" and progress["progress"] == 1.0


def test_other_users_get_404_for_everything_of_a_job(clients):
    alice, bob, admin = clients
    job = _finished(alice, _create(alice)["id"])
    job_id, url = job["id"], job["images"][0]["url"]
    for method, path in [("GET", f"/api/v1/jobs/{job_id}"), ("GET", f"/api/v1/jobs/{job_id}/images"),
                         ("GET", f"/api/v1/jobs/{job_id}/images/0"), ("GET", url),
                         ("GET", f"/api/v1/jobs/{job_id}/progress"), ("GET", f"/api/v1/jobs/{job_id}/events"),
                         ("POST", f"/api/v1/jobs/{job_id}/cancel"), ("DELETE", f"/api/v1/jobs/{job_id}")]:
        response = bob.request(method, path)
        assert response.status_code == 404, (method, path, response.status_code)
    assert bob.get("/api/v1/jobs").json()["total"] == 0
    assert admin.get(url).status_code == 200, "administrators see every job"
    assert [j["id"] for j in admin.get("/api/v1/jobs?all_users=true").json()["items"]] == [job_id]
    with TestClient(alice.app, follow_redirects=False) as anonymous:
        assert anonymous.get(url).status_code in (303, 401)
        assert anonymous.get(f"/api/v1/jobs/{job_id}").status_code == 401
    assert alice.get(url).status_code == 200


def test_list_filters_and_paging(clients):
    alice, _, _ = clients
    ids = [_finished(alice, _create(alice, seed=i)["id"])["id"] for i in range(3)]
    page = alice.get("/api/v1/jobs?limit=2&offset=1").json()
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == [ids[1], ids[0]]
    assert alice.get("/api/v1/jobs?status=failed").json()["total"] == 0
    assert alice.get("/api/v1/jobs?mode=txt2img&checkpoint=tiny-sd15&endpoint=local").json()["total"] == 3
    assert alice.get("/api/v1/jobs?since=2999-01-01T00:00:00").json()["total"] == 0
    bad = alice.get("/api/v1/jobs?status=exploded")
    assert bad.status_code == 422 and bad.json()["field"] == "status"


def test_bad_requests_are_422_naming_the_field(clients):
    alice, _, _ = clients
    response = alice.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img(steps=1000)})
    assert response.status_code == 422 and response.json()["field"] == "steps"
    assert "between 1 and 150" in response.json()["detail"]
    response = alice.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img(sampler_name="Nope")})
    assert response.status_code == 404 and response.json()["field"] == "sampler_name"
    response = alice.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img(),
                                                "endpoint": "nowhere"})
    assert response.status_code == 404 and response.json()["field"] == "endpoint"
    assert alice.get("/api/v1/jobs").json()["total"] == 0


def test_cancel_and_delete(clients, fake_studio):
    alice, _, _ = clients
    created = _create(alice, steps=150, n_iter=20)
    cancelled = alice.post(f"/api/v1/jobs/{created['id']}/cancel")
    assert cancelled.status_code == 200
    assert _finished(alice, created["id"])["status"] == "cancelled"
    assert alice.delete(f"/api/v1/jobs/{created['id']}").status_code == 204
    assert alice.get(f"/api/v1/jobs/{created['id']}").status_code == 404


def test_sse_streams_progress_before_done(clients):
    alice, _, _ = clients
    created = _create(alice, steps=60)
    kinds = []
    with alice.stream("GET", f"/api/v1/jobs/{created['id']}/events") as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                kinds.append(line.removeprefix("event: "))
            if kinds and kinds[-1] == "done":
                break
    assert kinds[-1] == "done" and "progress" in kinds[:-1]
