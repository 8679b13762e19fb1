"""/api/v1/trainings over HTTP: create (201) and its 4xx naming the field, defaults, format-config, list, get with
metrics / log / files / registered models, files, stop, resume and delete; another user's training is a 404."""

from __future__ import annotations

import time

from tests.trainings.conftest import ENDPOINT, dataset_of, http_as, job_count, user

BASE = "/api/v1/trainings"


def _body(tstudio, actor, **overrides):
    body = {"base_type": "sd15", "base_model": "tiny-sd15", "dataset_id": dataset_of(tstudio, actor).id,
            "config": "network_dim = 4\nmax_train_epochs = 2\n", "output_name": "apilora", "endpoint": ENDPOINT}
    body.update(overrides)
    return body


def _wait_status(client, job_id, statuses, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.get(f"{BASE}/{job_id}").json()
        if found["status"] in statuses:
            return found
        time.sleep(0.05)
    raise AssertionError(f"training {job_id} is still {found['status']}")


def test_create_list_get_stop_delete_and_refusals(tstudio):
    alice = user(tstudio, "alice")
    user(tstudio, "bob")
    api, other = http_as(tstudio, "alice"), http_as(tstudio, "bob")
    for overrides, field in (({"dataset_id": "nope"}, "dataset_id"), ({"base_type": "sdxl"}, "base_model"),
                             ({"config": {"network_dim": "many", "what": 1}}, "config.network_dim"),
                             ({"output_name": "a/b"}, "output_name")):
        response = api.post(BASE, json=_body(tstudio, alice, **overrides))
        assert response.status_code == 422, response.text
        assert response.json()["field"] == field
    missing = api.post(BASE, json={"base_type": "sd15"})
    assert missing.status_code == 422 and missing.json()["field"] == "base_model"
    assert job_count(tstudio) == 0

    created = api.post(BASE, json=_body(tstudio, alice))
    assert created.status_code == 201, created.text
    training = created.json()
    assert training["status"] == "queued" and training["output_name"] == "apilora"
    assert training["config"]["network_dim"] == 4 and training["base_model"] == "tiny-sd15"
    listed = api.get(BASE).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == training["id"]
    assert other.get(BASE).json()["total"] == 0
    assert other.get(f"{BASE}/{training['id']}").status_code == 404
    assert other.post(f"{BASE}/{training['id']}/stop").status_code == 404
    assert api.get(f"{BASE}/{training['id']}").json()["resumable"] is False
    stopped = api.post(f"{BASE}/{training['id']}/stop")
    assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled"
    refused = api.post(f"{BASE}/{training['id']}/resume")
    assert refused.status_code == 409 and refused.json()["field"] == "job_id"
    assert api.delete(f"{BASE}/{training['id']}").status_code == 204
    assert api.get(f"{BASE}/{training['id']}").status_code == 404


def test_a_run_shows_metrics_log_files_and_registered_models(tstudio):
    alice = user(tstudio, "alice")
    api = http_as(tstudio, "alice")
    tstudio.dispatcher.resume()
    training = api.post(BASE, json=_body(tstudio, alice)).json()
    done = _wait_status(api, training["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    tstudio.training_registrar.wait(30)
    done = api.get(f"{BASE}/{training['id']}").json()
    assert [p["loss"] for p in done["metrics"]["history"]] == [0.9, 0.5]
    assert done["metrics"]["latest"]["loss"] == 0.5 and done["loss"] == 0.5
    assert done["log"] == ["step 1 loss 0.9", "step 2 loss 0.5"]
    kinds = {a["kind"] for a in done["artifacts"]}
    assert kinds == {"lora", "sample"}
    assert len(done["registered_models"]) == 2
    model_ids = set(done["registered_models"].values())
    listed = api.get("/api/v1/models", params={"type": "lora"}).json()
    names = {m["name"] for m in listed["items"] if m["id"] in model_ids}
    assert names == {"apilora", "apilora-000001"}
    sample = next(a["key"] for a in done["artifacts"] if a["kind"] == "sample")
    image = api.get(f"{BASE}/{training['id']}/file", params={"key": sample})
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content[:4] == b"\x89PNG"
    lora = api.get(f"{BASE}/{training['id']}/file", params={"key": done["info"]["lora"]})
    assert lora.status_code == 200 and "attachment" in lora.headers["content-disposition"]
    state = api.get(f"{BASE}/{training['id']}/file", params={"key": f"jobs/{training['id']}/state/state.pt"})
    assert state.status_code == 404


def test_defaults_and_format_config(tstudio):
    user(tstudio, "alice")
    api = http_as(tstudio, "alice")
    defaults = api.get(f"{BASE}/defaults", params={"base_type": "sdxl"}).json()
    assert defaults["config"]["resolution"] == 1024 and "resolution = 1024" in defaults["toml"]
    assert api.get(f"{BASE}/defaults", params={"base_type": "sd9"}).json()["field"] == "base_type"
    formatted = api.post(f"{BASE}/format-config", json={"base_type": "sd15", "config": "network_dim=8\nsdpa=true"})
    assert formatted.status_code == 200
    assert "network_dim = 8" in formatted.json()["toml"] and formatted.json()["warnings"][0].startswith("sdpa")
    bad = api.post(f"{BASE}/format-config", json={"base_type": "sd15", "config": {"unet_lr": -1, "foo": 2}})
    assert bad.status_code == 422
    assert bad.json()["field"] == "config.unet_lr" and "foo: unknown key" in bad.json()["detail"]
    assert http_as(tstudio, "alice").get(BASE).status_code == 200
    from fastapi.testclient import TestClient

    assert TestClient(tstudio.app).get(BASE).status_code == 401
