"""``POST/DELETE /api/v1/endpoints``: administrators deploy and delete; errors are JSON naming the field;
secret options never come back; ESD's request and item names work too."""

from __future__ import annotations

import time

from tests.api.conftest import ADMIN, ALICE

SECRET = "worker-shared-secret-0123456789"
TXT = {"prompt": "a bridge", "steps": 2, "width": 64, "height": 64}


def test_deploy_list_and_delete(fake_studio):
    c = fake_studio.client
    created = c.post("/api/v1/endpoints", auth=ADMIN, json={
        "name": "api-one", "kind": "fake", "options": {"slots": 2}, "min_instances": 0, "max_instances": 3,
        "autoscale": True})
    assert created.status_code == 201, created.text
    item = created.json()
    assert item["name"] == "api-one" and item["status"] == "InService" and item["kind"] == "fake"
    assert (item["min_instances"], item["max_instances"], item["autoscale"]) == (0, 3, True)
    assert (item["min_instance_number"], item["max_instance_number"], item["autoscaling"]) == (0, 3, True)
    assert item["config"]["slots"] == 2 and item["capabilities"]["slots"] == 2

    seen_by_alice = [e for e in c.get("/api/v1/endpoints", auth=ALICE).json()["endpoints"] if e["name"] == "api-one"]
    assert len(seen_by_alice) == 1 and "config" not in seen_by_alice[0]
    job = c.post("/api/v1/jobs", auth=ALICE, json={"mode": "txt2img", "request": TXT, "endpoint": "api-one"})
    assert job.status_code in (200, 201, 202), job.text

    deleted = c.delete("/api/v1/endpoints/api-one", auth=ADMIN)
    assert deleted.status_code == 200 and deleted.json()["deleted"] == "api-one"
    assert deleted.json()["moved_jobs"] in (0, 1)  # the job may already have run
    assert c.get("/api/v1/endpoints/api-one", auth=ADMIN).status_code == 404


def test_non_admins_get_403_and_nothing_changes(fake_studio):
    c = fake_studio.client
    refused = c.post("/api/v1/endpoints", auth=ALICE, json={"name": "alices", "kind": "fake", "options": {}})
    assert refused.status_code == 403
    assert c.get("/api/v1/endpoints/alices", auth=ADMIN).status_code == 404
    assert c.delete("/api/v1/endpoints/local", auth=ALICE).status_code == 403
    listed = c.request("DELETE", "/api/v1/endpoints", auth=ALICE, json={"endpoint_name_list": ["local"]})
    assert listed.status_code == 403


def test_bad_fields_are_422_naming_them_and_conflicts_409(fake_studio):
    c = fake_studio.client
    cases = [
        ({"name": "Bad Name", "kind": "fake"}, "name"),
        ({"kind": "warp-drive"}, "kind"),
        ({"options": {"slots": 2}}, "kind"),
        ({"kind": "fake", "options": {"slots": "many"}}, "options.slots"),
        ({"kind": "fake", "min_instances": 2, "max_instances": 1}, "max_instances"),
        ({"kind": "fake", "autoscaling": True}, "autoscaling"),
        ({"kind": "fake", "instance_type": "ml.g5.xlarge"}, "instance_type"),
        ({"kind": "fake", "name": "twice", "endpoint_name": "twice"}, "endpoint_name"),
        ({"kind": "http", "options": {"url": "http://127.0.0.1:9", "secret": "short"}}, "options.secret"),
    ]
    for body, field in cases:
        answer = c.post("/api/v1/endpoints", auth=ADMIN, json=body)
        assert answer.status_code == 422 and answer.json()["field"] == field, (body, answer.text)
    assert c.post("/api/v1/endpoints", auth=ADMIN, json=["kind"]).json()["field"] == "body"
    taken = c.post("/api/v1/endpoints", auth=ADMIN, json={"name": "local", "kind": "fake"})
    assert taken.status_code == 409 and taken.json()["field"] == "name"
    local = c.delete("/api/v1/endpoints/local", auth=ADMIN)
    assert local.status_code == 409 and local.json()["field"] == "name"
    assert c.delete("/api/v1/endpoints/nowhere", auth=ADMIN).status_code == 404
    names = [e["name"] for e in c.get("/api/v1/endpoints", auth=ADMIN).json()["endpoints"]]
    assert names == ["local"]


def test_secrets_are_write_only(fake_studio):
    c = fake_studio.client
    created = c.post("/api/v1/endpoints", auth=ADMIN, json={
        "name": "gpu-box", "kind": "http", "options": {"url": "https://gpu-box:8080", "secret": SECRET}})
    assert created.status_code == 201, created.text
    for answer in (created, c.get("/api/v1/endpoints/gpu-box", auth=ADMIN), c.get("/api/v1/endpoints", auth=ADMIN)):
        assert SECRET not in answer.text
    item = created.json()
    assert item["config"]["secret"] == "********" and item["config"]["url"] == "https://gpu-box:8080"
    if item["status"] == "Failed":  # this branch has no http backend yet: a clean Failed with the reason
        assert "http" in item["error"] and SECRET not in item["error"]
    assert c.delete("/api/v1/endpoints/gpu-box", auth=ADMIN).status_code == 200


def test_esd_names_deploy_and_bulk_delete_moves_queued_jobs(fake_studio):
    c = fake_studio.client
    created = c.post("/api/v1/endpoints", auth=ADMIN, json={
        "endpoint_name": "esd-style", "kind": "fake", "options": {"steps": 400, "step_delay": 0.05},
        "min_instance_number": 1, "max_instance_number": 2, "autoscaling_enabled": False})
    assert created.status_code == 201, created.text
    assert created.json()["endpoint_name"] == "esd-style" and created.json()["max_instances"] == 2
    ids = [c.post("/api/v1/jobs", auth=ALICE, json={"mode": "txt2img", "request": {**TXT, "seed": i},
                                                     "endpoint": "esd-style"}).json()["id"] for i in range(2)]
    deadline = time.monotonic() + 20
    while c.get(f"/api/v1/jobs/{ids[0]}", auth=ALICE).json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.02)

    refused = c.request("DELETE", "/api/v1/endpoints", auth=ADMIN, json={"endpoint_name_list": ["esd-style", "local"]})
    assert refused.status_code == 409  # checked before any is deleted
    assert c.get("/api/v1/endpoints/esd-style", auth=ADMIN).status_code == 200
    deleted = c.request("DELETE", "/api/v1/endpoints", auth=ADMIN, json={"endpoint_name_list": ["esd-style"]})
    assert deleted.status_code == 200 and deleted.json() == {"deleted": ["esd-style"], "moved_jobs": 2}
    for job_id in ids:
        done = fake_studio.studio.jobs.wait(actor=fake_studio.user("alice"), job_id=job_id, timeout=30)
        assert done.status == "succeeded" and done.endpoint == "local", done
