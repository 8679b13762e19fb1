"""API authentication: none, wrong, Basic (with its verified-credential cache), Bearer tokens, and
isolation between users (another user's job or progress is reported as absent)."""

from __future__ import annotations

import base64

import pytest

from tests.api.conftest import ADMIN, ALICE, ALICE_PASSWORD, BOB

TXT = {"prompt": "a red fox", "steps": 3, "width": 64, "height": 64}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_no_or_wrong_credentials_get_401_in_a1111_shape(fake_studio):
    c = fake_studio.client
    for path in ("/sdapi/v1/options", "/sdapi/v1/sd-models", "/sdapi/v1/progress", "/sdapi/v1/loras"):
        response = c.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Basic")
        body = response.json()
        assert set(body) >= {"error", "detail", "body", "errors"} and body["detail"]
        assert "x-process-time" in response.headers
    followed = c.post("/internal/progress", json={"id_task": "task(x)"})  # what force_task_id followers poll
    assert followed.status_code == 401 and followed.headers["www-authenticate"].startswith("Basic")
    assert set(followed.json()) >= {"error", "detail", "body", "errors"}
    wrong = c.post("/sdapi/v1/txt2img", json=TXT, auth=("alice", "not-her-password"))
    assert wrong.status_code == 401 and wrong.json()["detail"] == "Incorrect username or password"
    assert c.get("/sdapi/v1/options", headers=bearer("stk_" + "x" * 43)).status_code == 401
    assert c.get("/api/v1/me", headers=bearer("garbage")).status_code == 401


def test_basic_with_own_login_identifies_the_user(fake_studio):
    me = fake_studio.client.get("/api/v1/me", auth=ALICE)
    assert me.status_code == 200 and me.json()["username"] == "alice" and not me.json()["is_admin"]


def test_bearer_token_lifecycle(fake_studio):
    c = fake_studio.client
    created = c.post("/api/v1/tokens", json={"name": "laptop scripts"}, auth=ALICE)
    assert created.status_code == 201
    token = created.json()["token"]
    assert token.startswith("stk_") and created.json()["prefix"] == token[:10]
    assert c.get("/api/v1/me", headers=bearer(token)).json()["username"] == "alice"
    assert c.get("/sdapi/v1/options", headers=bearer(token)).status_code == 200
    listed = c.get("/api/v1/tokens", auth=ALICE).json()
    mine = [t for t in listed if t["id"] == created.json()["id"]]
    assert mine and mine[0]["last_used_at"] is not None and "token" not in mine[0] and "token_hash" not in mine[0]
    # Only the hash is stored.
    from sqlmodel import select

    from webapp.records import ApiToken

    with fake_studio.studio.db.read() as s:
        stored = s.exec(select(ApiToken).where(ApiToken.id == created.json()["id"])).one()
    assert token not in stored.token_hash and len(stored.token_hash) == 64
    # Bob can neither see nor revoke Alice's token.
    assert created.json()["id"] not in [t["id"] for t in c.get("/api/v1/tokens", auth=BOB).json()]
    assert c.delete(f"/api/v1/tokens/{created.json()['id']}", auth=BOB).status_code == 404
    revoked = c.delete(f"/api/v1/tokens/{created.json()['id']}", auth=ALICE)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = c.get("/sdapi/v1/options", headers=bearer(token))
    assert refused.status_code == 401 and refused.json()["error"] == "HTTPException"


def test_token_name_is_required(fake_studio):
    response = fake_studio.client.post("/api/v1/tokens", json={"name": "  "}, auth=ALICE)
    assert response.status_code == 422 and response.json()["field"] == "name"


def test_other_users_job_and_progress_are_absent(slow_studio):
    c = slow_studio.client
    payload = {**TXT, "steps": 150, "n_iter": 20}
    job = c.post("/api/v1/inferences", auth=ALICE,
                 json={"task_type": "txt2img", "payload": payload}).json()["data"]["inference"]
    try:
        assert c.get(f"/api/v1/inferences/{job['id']}", auth=ALICE).status_code == 200
        assert c.get(f"/api/v1/inferences/{job['id']}", auth=BOB).status_code == 404
        assert c.get(f"/api/v1/jobs/{job['id']}", auth=BOB).status_code == 404
        assert c.request("DELETE", "/api/v1/inferences", auth=BOB,
                         json={"inference_id_list": [job["id"]]}).status_code == 404
        # Bob's /progress is idle although Alice's job is queued or running, and his interrupt leaves it alone.
        idle = c.get("/sdapi/v1/progress", auth=BOB).json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
        assert c.post("/sdapi/v1/interrupt", auth=BOB).json() == {}
        busy = c.get("/sdapi/v1/progress", auth=ALICE).json()
        assert busy["state"]["job_count"] >= 1 and busy["current_task"] == job["id"]
        # An administrator may look at it (explicitly, by id) but /interrupt stays per caller.
        assert c.get(f"/api/v1/inferences/{job['id']}", auth=ADMIN).status_code == 200
        c.post("/sdapi/v1/interrupt", auth=ADMIN)
        assert c.get(f"/api/v1/inferences/{job['id']}", auth=ALICE).json()["data"]["studio_status"] in (
            "queued", "running")
    finally:
        c.post(f"/api/v1/jobs/{job['id']}/cancel", auth=ALICE)
        slow_studio.studio.jobs.wait(actor=slow_studio.user("alice"), job_id=job["id"], timeout=30)


def test_basic_credentials_are_cached_but_never_outlive_a_password_change(fake_studio, monkeypatch):
    auth = fake_studio.studio.auth
    calls = []
    real_verify = auth._passwords.verify
    monkeypatch.setattr(auth._passwords, "verify", lambda h, p: calls.append(1) or real_verify(h, p))
    c = fake_studio.client
    header = {"authorization": "Basic " + base64.b64encode(b"bob:bob-password-456").decode()}
    for _ in range(5):
        assert c.get("/api/v1/me", headers=header).status_code == 200
    assert len(calls) <= 1, "argon2 ran again although the credential was verified moments ago"
    # An admin resets Bob's password: the cached login stops at once.
    fake_studio.studio.users.reset_password(actor=fake_studio.admin, username="bob", new_password="bob-new-pass-1")
    try:
        assert c.get("/api/v1/me", headers=header).status_code == 401
        assert c.get("/api/v1/me", auth=("bob", "bob-new-pass-1")).status_code == 200
    finally:
        fake_studio.studio.users.reset_password(actor=fake_studio.admin, username="bob",
                                                new_password=BOB[1])


def test_cached_credentials_die_with_the_user(fake_studio):
    c = fake_studio.client
    fake_studio.studio.users.create_user(actor=fake_studio.admin, username="carol", password="carol-password-1")
    assert c.get("/api/v1/me", auth=("carol", "carol-password-1")).status_code == 200
    assert c.delete("/api/v1/users/carol", auth=ADMIN).status_code == 200
    assert c.get("/api/v1/me", auth=("carol", "carol-password-1")).status_code == 401


def test_change_own_password(fake_studio):
    auth = fake_studio.studio.auth
    alice = fake_studio.user("alice")
    from webapp.services.errors import InvalidInput, NotAuthenticated

    with pytest.raises(NotAuthenticated):
        auth.change_own_password(actor=alice, current_password="wrong-one-123", new_password="x" * 12)
    with pytest.raises(InvalidInput) as short:
        auth.change_own_password(actor=alice, current_password=ALICE_PASSWORD, new_password="short")
    assert short.value.field == "new_password"
    c = fake_studio.client
    assert c.get("/api/v1/me", auth=ALICE).status_code == 200  # cached now
    keep, _ = auth.login("alice", ALICE_PASSWORD)
    other, _ = auth.login("alice", ALICE_PASSWORD)
    auth.change_own_password(actor=alice, current_password=ALICE_PASSWORD, new_password="alice-new-pass-9",
                             keep_session=keep)
    try:
        assert c.get("/api/v1/me", auth=ALICE).status_code == 401
        assert c.get("/api/v1/me", auth=("alice", "alice-new-pass-9")).status_code == 200
        assert auth.user_for_token(keep) is not None and auth.user_for_token(other) is None
    finally:
        auth.change_own_password(actor=fake_studio.user("alice"), current_password="alice-new-pass-9",
                                 new_password=ALICE_PASSWORD)
