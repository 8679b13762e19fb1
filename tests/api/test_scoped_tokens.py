"""API tokens with scopes and expiry: a scoped token acts as its owner narrowed to the scopes (within the
owner's permissions *now*), is refused on the UI, cannot mint a broader token; an expired token is refused
like a revoked one; creating and revoking tokens is audited (never the token itself)."""

from __future__ import annotations

from datetime import timedelta

import gradio as gr
import pytest
from sqlmodel import select, update

from tests.api.conftest import ADMIN, ALICE
from webapp.records import ApiToken, AuditEvent, utcnow

PASSWORD = "scoped-password-789"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _user(studio, name: str, roles: list[str]) -> tuple[str, str]:
    """A user of these roles (created once per module studio); returns its Basic credentials."""
    if studio.user(name) is None:
        studio.studio.users.create_user(actor=studio.admin, username=name, password=PASSWORD, roles=roles)
    else:
        studio.studio.roles.set_user_roles(actor=studio.admin, username=name, roles=roles)
    return name, PASSWORD


def _token_rows(studio, username: str) -> list[ApiToken]:
    user = studio.user(username)
    with studio.studio.db.read() as s:
        return list(s.exec(select(ApiToken).where(ApiToken.user_id == user.id)))


def test_a_scoped_token_of_an_admin_reaches_only_its_scopes(fake_studio):
    c = fake_studio.client
    tara = _user(fake_studio, "tara", ["Admin"])
    created = c.post("/api/v1/tokens", auth=tara, json={"name": "jobs reader", "scopes": ["inference:list"]})
    assert created.status_code == 201, created.text
    assert created.json()["scopes"] == ["inference:list"] and created.json()["expires_at"] is None
    token = created.json()["token"]

    assert c.get("/api/v1/jobs", headers=bearer(token)).status_code == 200
    assert c.get("/api/v1/me", headers=bearer(token)).json()["permissions"] == ["inference:list"]
    deploy = c.post("/api/v1/endpoints", headers=bearer(token), json={"name": "scoped-one", "kind": "fake"})
    assert deploy.status_code == 403 and "endpoint:create" in deploy.json()["detail"], deploy.text
    assert c.get("/api/v1/endpoints/scoped-one", auth=ADMIN).status_code == 404
    upload = c.post("/api/v1/uploads", headers=bearer(token),
                    json={"file_name": "x.safetensors", "size": 10, "type": "lora"})
    assert upload.status_code == 403 and "model:create" in upload.json()["detail"], upload.text
    assert c.get("/api/v1/users", headers=bearer(token)).status_code == 403
    # the same owner with Basic (or an unscoped token) still holds everything
    assert c.get("/api/v1/users", auth=tara).status_code == 200
    listed = [t for t in c.get("/api/v1/tokens", auth=tara).json() if t["id"] == created.json()["id"]]
    assert listed[0]["scopes"] == ["inference:list"] and "token" not in listed[0]


def test_submitting_a_job_needs_inference_create_and_endpoint_use(fake_studio):
    c = fake_studio.client
    job = {"mode": "txt2img", "request": {"prompt": "a bridge", "steps": 2, "width": 64, "height": 64}}

    def token(scopes: list[str]) -> dict[str, str]:
        return bearer(c.post("/api/v1/tokens", auth=ALICE, json={"name": "jobs", "scopes": scopes}).json()["token"])

    before = c.get("/api/v1/jobs", auth=ALICE).json()["total"]
    reader = c.post("/api/v1/jobs", headers=token(["inference:list"]), json=job)
    assert reader.status_code == 403 and "inference:create" in reader.json()["detail"], reader.text
    no_endpoint = c.post("/api/v1/jobs", headers=token(["inference:list", "inference:create"]), json=job)
    assert no_endpoint.status_code == 403 and "endpoint:use" in no_endpoint.json()["detail"], no_endpoint.text
    assert c.get("/api/v1/jobs", auth=ALICE).json()["total"] == before
    runner = c.post("/api/v1/jobs", headers=token(["inference:list", "inference:create", "endpoint:use", "model:list", "model:use"]),
                    json=job)
    assert runner.status_code == 201, runner.text


def test_scopes_beyond_the_owners_are_refused_and_nothing_is_stored(fake_studio):
    c = fake_studio.client
    before = len(_token_rows(fake_studio, "alice"))
    beyond = c.post("/api/v1/tokens", auth=ALICE, json={"name": "deployer", "scopes": ["endpoint:create"]})
    assert beyond.status_code == 403 and beyond.json()["field"] == "scopes"
    assert "endpoint:create" in beyond.json()["detail"]
    mixed = c.post("/api/v1/tokens", auth=ALICE, json={"name": "mixed", "scopes": ["inference:list", "user:all"]})
    assert mixed.status_code == 403 and "user:all" in mixed.json()["detail"]
    unknown = c.post("/api/v1/tokens", auth=ALICE, json={"name": "typo", "scopes": ["inferences:list"]})
    assert unknown.status_code == 422 and unknown.json()["field"] == "scopes" and "inferences:list" in unknown.text
    empty = c.post("/api/v1/tokens", auth=ALICE, json={"name": "nothing", "scopes": []})
    assert empty.status_code == 422 and empty.json()["field"] == "scopes"
    assert len(_token_rows(fake_studio, "alice")) == before


def test_narrowing_follows_the_owners_role_change(fake_studio):
    c = fake_studio.client
    nora = _user(fake_studio, "nora", ["Admin"])
    token = c.post("/api/v1/tokens", auth=nora,
                   json={"name": "users", "scopes": ["user:list", "endpoint:list"]}).json()["token"]
    assert c.get("/api/v1/users", headers=bearer(token)).status_code == 200
    _user(fake_studio, "nora", ["Designer"])  # an administrator takes the Admin role away
    refused = c.get("/api/v1/users", headers=bearer(token))
    assert refused.status_code == 403 and "user:list" in refused.json()["detail"]
    assert c.get("/api/v1/me", headers=bearer(token)).json()["permissions"] == ["endpoint:list"]
    _user(fake_studio, "nora", ["Admin"])  # given back: the token's scopes apply again, no more
    assert c.get("/api/v1/users", headers=bearer(token)).status_code == 200
    assert c.get("/api/v1/me", headers=bearer(token)).json()["permissions"] == ["user:list", "endpoint:list"]


def test_a_scoped_token_cannot_mint_a_broader_one(fake_studio):
    c = fake_studio.client
    tara = _user(fake_studio, "tara", ["Admin"])
    token = c.post("/api/v1/tokens", auth=tara,
                   json={"name": "minter", "scopes": ["inference:list", "inference:create"]}).json()["token"]
    before = len(_token_rows(fake_studio, "tara"))
    unscoped = c.post("/api/v1/tokens", headers=bearer(token), json={"name": "everything"})
    assert unscoped.status_code == 403 and unscoped.json()["field"] == "scopes"
    broader = c.post("/api/v1/tokens", headers=bearer(token), json={"name": "more", "scopes": ["user:all"]})
    assert broader.status_code == 403 and "user:all" in broader.json()["detail"]
    assert len(_token_rows(fake_studio, "tara")) == before
    narrower = c.post("/api/v1/tokens", headers=bearer(token), json={"name": "less", "scopes": ["inference:list"]})
    assert narrower.status_code == 201 and narrower.json()["scopes"] == ["inference:list"]


def test_an_expired_token_gets_401(fake_studio):
    c = fake_studio.client
    created = c.post("/api/v1/tokens", auth=ALICE, json={"name": "short", "expires_in_days": 1})
    assert created.status_code == 201, created.text
    expires = created.json()["expires_at"]
    assert expires is not None
    token = created.json()["token"]
    assert c.get("/api/v1/me", headers=bearer(token)).status_code == 200
    with fake_studio.studio.db.write() as s:
        s.exec(update(ApiToken).where(ApiToken.id == created.json()["id"])
               .values(expires_at=utcnow() - timedelta(seconds=1)))
    refused = c.get("/api/v1/me", headers=bearer(token))
    assert refused.status_code == 401 and refused.json()["detail"] == "expired API token"
    assert c.get("/sdapi/v1/options", headers=bearer(token)).status_code == 401


def test_a_token_made_with_an_expiring_token_expires_no_later_than_it(fake_studio):
    from datetime import datetime

    c = fake_studio.client
    parent = c.post("/api/v1/tokens", auth=ALICE, json={"name": "for a day", "expires_in_days": 1}).json()
    parent_expiry = datetime.fromisoformat(parent["expires_at"])
    forever = c.post("/api/v1/tokens", headers=bearer(parent["token"]), json={"name": "no expiry asked"})
    assert forever.status_code == 201, forever.text
    assert datetime.fromisoformat(forever.json()["expires_at"]) == parent_expiry
    longer = c.post("/api/v1/tokens", headers=bearer(parent["token"]), json={"name": "month", "expires_in_days": 30})
    assert datetime.fromisoformat(longer.json()["expires_at"]) == parent_expiry
    shorter = c.post("/api/v1/tokens", headers=bearer(parent["token"]), json={"name": "hour", "expires_in_days": 0.04})
    assert datetime.fromisoformat(shorter.json()["expires_at"]) < parent_expiry, "an earlier expiry is kept"
    unbounded = c.post("/api/v1/tokens", auth=ALICE, json={"name": "password-made"})  # no token: nothing to inherit
    assert unbounded.json()["expires_at"] is None
    for made in (forever, longer, shorter, unbounded):
        assert c.delete(f"/api/v1/tokens/{made.json()['id']}", auth=ALICE).status_code == 200
    assert c.delete(f"/api/v1/tokens/{parent['id']}", auth=ALICE).status_code == 200


@pytest.mark.parametrize(("days", "problem"), [(0, "more than 0"), (-3, "more than 0"), (366, "at most 365"),
                                                ("soon", "expires_in_days")])
def test_expiry_is_bounded(fake_studio, days, problem):
    before = len(_token_rows(fake_studio, "alice"))
    answer = fake_studio.client.post("/api/v1/tokens", auth=ALICE, json={"name": "bad", "expires_in_days": days})
    assert answer.status_code == 422 and answer.json()["field"] == "expires_in_days", answer.text
    assert problem in answer.text
    assert len(_token_rows(fake_studio, "alice")) == before


def test_a_scoped_token_is_refused_on_the_ui(fake_studio):
    c = fake_studio.client
    tara = _user(fake_studio, "tara", ["Admin"])
    scoped = c.post("/api/v1/tokens", auth=tara, json={"name": "api only", "scopes": ["model:list"]}).json()["token"]
    for path in ("/ui/", "/ui/config", "/ui/gradio_api/queue/join"):
        refused = c.get(path, headers=bearer(scoped))
        assert refused.status_code == 403 and "scoped API token" in refused.json()["detail"], (path, refused.text)
    unscoped = c.post("/api/v1/tokens", auth=tara, json={"name": "everything"}).json()["token"]
    assert c.get("/ui/config", headers=bearer(unscoped)).status_code == 200
    assert c.get("/api/v1/models", headers=bearer(scoped)).status_code == 200


def test_token_creation_and_revocation_are_audited_without_the_token(fake_studio):
    c = fake_studio.client
    created = c.post("/api/v1/tokens", auth=ALICE, json={"name": "audited", "scopes": ["model:list"],
                                                          "expires_in_days": 30}).json()
    c.delete(f"/api/v1/tokens/{created['id']}", auth=ALICE)
    c.delete(f"/api/v1/tokens/{created['id']}", auth=ALICE)  # revoking twice is one event
    with fake_studio.studio.db.read() as s:
        events = [e for e in s.exec(select(AuditEvent).where(AuditEvent.action.in_(["token.create", "token.revoke"])))
                  if created["id"] in e.detail_json]
    assert sorted(e.action for e in events) == ["token.create", "token.revoke"]
    assert all(e.actor_name == "alice" and e.target == "alice" for e in events)
    assert all(created["token"] not in e.detail_json and created["token"][4:] not in e.detail_json for e in events)
    create = next(e for e in events if e.action == "token.create")
    assert '"scopes": ["model:list"]' in create.detail_json and '"name": "audited"' in create.detail_json


# -- Account tab (handlers called as Gradio would) ---------------------------------------------------------

@pytest.fixture
def account_tab(fake_studio):
    from webapp.ui.account_tab import AccountTab
    from webapp.ui.context import UiContext

    studio = fake_studio.studio
    return AccountTab(UiContext(users=studio.users), tokens=studio.tokens, auth=studio.auth, quota=studio.quota)


def test_the_account_tab_creates_scoped_expiring_tokens(account_tab, fake_studio):
    request = gr.Request(username="alice")
    choices = account_tab.scope_options(request)["choices"]
    assert "inference:create" in choices and "model:list" in choices and "user:list" not in choices
    shown, _name, rows, _choices = account_tab.create("tab scoped", request, ["inference:list"], 7)
    token = shown["value"]
    row = next(r for r in rows if r[0] == "tab scoped")
    assert row[4] == "active" and row[5] == "inference:list" and row[6] != "never"
    me = fake_studio.client.get("/api/v1/me", headers=bearer(token)).json()
    assert me["permissions"] == ["inference:list"]
    shown, _name, rows, _choices = account_tab.create("tab plain", request, [], None)
    row = next(r for r in rows if r[0] == "tab plain")
    assert row[5] == "all of yours" and row[6] == "never"
    before = len(_token_rows(fake_studio, "alice"))
    with pytest.raises(gr.Error, match="endpoint:create"):
        account_tab.create("tab beyond", request, ["endpoint:create"], None)
    with pytest.raises(gr.Error, match="at most 365"):
        account_tab.create("tab long", request, [], 400)
    assert len(_token_rows(fake_studio, "alice")) == before
