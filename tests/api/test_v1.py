"""The studio's own /api/v1 resources from this issue: users, endpoints, ESD-named inferences and
checkpoints, ping, OpenAPI docs; and the Account tab's handlers."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

from tests.api.conftest import ADMIN, ALICE, ALICE_PASSWORD, BOB
from tests.fixtures.studio_models import CHECKPOINT

TXT = {"prompt": "a bridge", "steps": 2, "width": 64, "height": 64}


def test_ping_me_and_docs(fake_studio):
    c = fake_studio.client
    assert c.get("/api/v1/ping", auth=ALICE).json() == {"message": "pong", "statusCode": 200}
    assert c.get("/api/v1/ping").status_code == 401
    assert c.get("/docs", auth=ALICE).status_code == 200
    paths = c.get("/openapi.json", auth=ALICE).json()["paths"]
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/options", "/api/v1/tokens", "/api/v1/inferences",
                 "/api/v1/checkpoints", "/api/v1/endpoints", "/api/v1/users"):
        assert path in paths, path


def test_users_are_for_admins(fake_studio):
    c = fake_studio.client
    assert c.get("/api/v1/users", auth=ALICE).status_code == 403
    assert c.post("/api/v1/users", auth=ALICE, json={"username": "eve", "password": "eve-password-1"}).status_code == 403
    created = c.post("/api/v1/users", auth=ADMIN, json={"username": "dave", "password": "dave-password-1"})
    assert created.status_code == 201 and created.json()["username"] == "dave" and "password_hash" not in created.json()
    assert "dave" in [u["username"] for u in c.get("/api/v1/users", auth=ADMIN).json()]
    bad = c.post("/api/v1/users", auth=ADMIN, json={"username": "x y", "password": "long-enough-1"})
    assert bad.status_code == 422 and bad.json()["field"] == "username"
    assert c.put("/api/v1/users/dave/password", auth=ADMIN, json={"password": "dave-password-2"}).status_code == 200
    assert c.get("/api/v1/me", auth=("dave", "dave-password-2")).status_code == 200
    # ESD's bulk delete: a non-admin learns nothing (same 403 for existing and unknown names) ...
    for names in (["dave"], ["nobody"]):
        denied = c.request("DELETE", "/api/v1/users", auth=ALICE, json={"user_name_list": names})
        assert denied.status_code == 403, names
    # ... and an unknown name refuses the whole request
    refused = c.request("DELETE", "/api/v1/users", auth=ADMIN, json={"user_name_list": ["dave", "nobody"]})
    assert refused.status_code == 404 and refused.json()["field"] == "user_name_list"
    assert c.request("DELETE", "/api/v1/users", auth=ADMIN, json={"user_name_list": ["dave"]}).json() == {
        "deleted": ["dave"]}
    assert c.get("/api/v1/me", auth=("dave", "dave-password-2")).status_code == 401


def test_endpoints_list_and_get(fake_studio):
    c = fake_studio.client
    listed = c.get("/api/v1/endpoints", auth=ALICE).json()
    local = [e for e in listed["endpoints"] if e["name"] == "local"][0]
    assert local["endpoint_status"] == "InService" and local["is_default"] and "config" not in local
    assert "config" in c.get("/api/v1/endpoints/local", auth=ADMIN).json()
    missing = c.get("/api/v1/endpoints/nowhere", auth=ALICE)
    assert missing.status_code == 404 and missing.json()["field"] == "endpoint"


def test_inferences_esd_flow(fake_studio):
    c = fake_studio.client
    created = c.post("/api/v1/inferences", auth=ALICE, json={
        "task_type": "txt2img", "inference_type": "Async", "models": {"Stable-diffusion": [CHECKPOINT]},
        "payload_string": __import__("json").dumps(TXT)})
    assert created.status_code == 201 and created.json()["statusCode"] == 201
    job_id = created.json()["data"]["inference"]["InferenceJobId"]
    started = c.put(f"/api/v1/inferences/{job_id}/start", auth=ALICE)
    assert started.status_code == 202 and started.json()["data"]["inference_id"] == job_id
    fake_studio.studio.jobs.wait(actor=fake_studio.user("alice"), job_id=job_id, timeout=30)
    item = c.get(f"/api/v1/inferences/{job_id}", auth=ALICE).json()["data"]
    assert item["status"] == "succeed" and item["taskType"] == "txt2img" and item["image_names"] == ["0.png"]
    assert item["params"]["used_models"]["Stable-diffusion"] == [CHECKPOINT]
    image = c.get(item["img_presigned_urls"][0], auth=ALICE)
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get(item["img_presigned_urls"][0], auth=BOB).status_code == 404
    listed = c.get("/api/v1/inferences", auth=ALICE, params={"limit": 1}).json()["data"]
    assert listed["inferences"][0]["InferenceJobId"] == job_id
    assert c.request("DELETE", "/api/v1/inferences", auth=ALICE, json={"inference_id_list": [job_id]}).status_code == 200
    assert c.get(f"/api/v1/inferences/{job_id}", auth=ALICE).status_code == 404


def test_inference_cancel(slow_studio):
    c = slow_studio.client
    created = c.post("/api/v1/inferences", auth=ALICE, json={
        "task_type": "txt2img", "payload": {**TXT, "steps": 150, "n_iter": 20}}).json()["data"]["inference"]
    assert c.post(f"/api/v1/inferences/{created['id']}/cancel", auth=BOB).status_code == 404
    assert c.post(f"/api/v1/inferences/{created['id']}/cancel", auth=ALICE).status_code == 200
    slow_studio.studio.jobs.wait(actor=slow_studio.user("alice"), job_id=created["id"], timeout=30)
    item = c.get(f"/api/v1/inferences/{created['id']}", auth=ALICE).json()["data"]
    assert item["status"] == "failed" and item["studio_status"] == "cancelled"


def test_inferences_page_and_validate(fake_studio):
    c = fake_studio.client
    ids = []
    for i in range(3):
        r = c.post("/api/v1/inferences", auth=BOB, json={"task_type": "txt2img", "payload": {**TXT, "seed": i}})
        ids.append(r.json()["data"]["inference"]["id"])
    first = c.get("/api/v1/inferences", auth=BOB, params={"limit": 2}).json()["data"]
    assert len(first["inferences"]) == 2 and first["last_evaluated_key"] == "2"
    rest = c.get("/api/v1/inferences", auth=BOB, params={"limit": 2, "exclusive_start_key": "2"}).json()["data"]
    assert len(rest["inferences"]) == 1 and rest["last_evaluated_key"] is None
    seen = [x["id"] for x in first["inferences"] + rest["inferences"]]
    assert sorted(seen) == sorted(ids)
    for body, field in (({"task_type": "upscale", "payload": TXT}, "task_type"),
                        ({"task_type": "txt2img"}, "payload"),
                        ({"task_type": "txt2img", "payload_string": "{nope"}, "payload_string"),
                        ({"task_type": "txt2img", "payload": {**TXT, "width": 63}}, "width")):
        response = c.post("/api/v1/inferences", auth=BOB, json=body)
        assert response.status_code == 422 and response.json()["field"] == field, body


def test_checkpoints_esd_names(fake_studio):
    c = fake_studio.client
    data = c.get("/api/v1/checkpoints", auth=ALICE, params={"types": "Stable-diffusion,Lora"}).json()["data"]
    types = {item["type"] for item in data["checkpoints"]}
    assert types == {"Stable-diffusion", "Lora"} and data["total"] == len(data["checkpoints"])
    lora = [i for i in data["checkpoints"] if i["type"] == "Lora"][0]
    assert lora["status"] == "Active" and lora["params"]["sha256"]
    bad = c.get("/api/v1/checkpoints", auth=ALICE, params={"types": "Pictures"})
    assert bad.status_code == 422 and bad.json()["field"] == "types"
    paged = c.get("/api/v1/checkpoints", auth=ALICE, params={"per_page": 2, "page": 2}).json()["data"]
    assert paged["pages"] >= 2 and len(paged["checkpoints"]) <= 2
    # renaming someone else's model is refused; the owner (admin) may
    refused = c.put(f"/api/v1/checkpoints/{lora['id']}", auth=ALICE, json={"name": "renamed"})
    assert refused.status_code == 403
    missing = c.request("DELETE", "/api/v1/checkpoints", auth=ADMIN, json={"checkpoint_id_list": ["nope"]})
    assert missing.status_code == 404


# -- Account tab (handlers called as Gradio would) ---------------------------------------------------------

@pytest.fixture
def account_tab(fake_studio):
    from webapp.ui.account_tab import AccountTab
    from webapp.ui.context import UiContext

    studio = fake_studio.studio
    return AccountTab(UiContext(users=studio.users), tokens=studio.tokens, auth=studio.auth, quota=studio.quota)


def _request(username: str, cookies: dict | None = None) -> gr.Request:
    return gr.Request(username=username, cookies=cookies or {}, client=SimpleNamespace(host="127.0.0.1"))


def test_account_tab_creates_lists_and_revokes_tokens(account_tab, fake_studio):
    shown, name, rows, choices = account_tab.create("ui token", _request("alice"))
    token = shown["value"]
    assert token.startswith("stk_") and name == ""
    assert any(r[0] == "ui token" and r[4] == "active" for r in rows)
    assert fake_studio.client.get("/api/v1/me", headers={"authorization": f"Bearer {token}"}).status_code == 200
    token_id = [value for label, value in choices["choices"] if label.startswith("ui token")][0]
    with pytest.raises(gr.Error):
        account_tab.revoke(token_id, _request("bob"))  # not his
    rows, _ = account_tab.revoke(token_id, _request("alice"))
    assert any(r[0] == "ui token" and r[4].startswith("revoked") for r in rows)
    assert fake_studio.client.get("/api/v1/me", headers={"authorization": f"Bearer {token}"}).status_code == 401
    with pytest.raises(gr.Error):
        account_tab.create("", _request("alice"))


def test_account_tab_changes_own_password(account_tab, fake_studio):
    with pytest.raises(gr.Error, match="differ"):
        account_tab.change_password(ALICE_PASSWORD, "alice-new-pass-1", "something-else", _request("alice"))
    with pytest.raises(gr.Error, match="Incorrect"):
        account_tab.change_password("wrong-password", "alice-new-pass-1", "alice-new-pass-1", _request("alice"))
    assert account_tab.change_password(ALICE_PASSWORD, "alice-new-pass-1", "alice-new-pass-1",
                                       _request("alice")) == ("", "", "")
    try:
        assert fake_studio.client.get("/api/v1/me", auth=("alice", "alice-new-pass-1")).status_code == 200
        assert fake_studio.client.get("/api/v1/me", auth=ALICE).status_code == 401
    finally:
        account_tab.change_password("alice-new-pass-1", ALICE_PASSWORD, ALICE_PASSWORD, _request("alice"))
