"""``GET /api/v1/audit``: administrators read who changed what and when, filtered by actor (exact), action
(exact, or an area such as ``user``), target (substring), since/until and paged; others get 403; bad dates
are a 422 naming the parameter. Server option defaults an administrator sets are audited too."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from tests.api.conftest import ADMIN, ALICE

PASSWORD = "audit-api-password-1"


@pytest.fixture(scope="module")
def events(fake_studio):
    """Changes by the admin and by alice, made once for the module."""
    c = fake_studio.client
    start = datetime.now(UTC)  # after alice's and bob's creation (the studio's fixture), before these
    assert c.post("/api/v1/users", auth=ADMIN, json={"username": "auditee", "password": PASSWORD}).status_code == 201
    assert c.post("/api/v1/roles", auth=ADMIN, json={"name": "Audit team", "permissions": ["model:list"]}).status_code == 201
    assert c.put("/api/v1/users/auditee/roles", auth=ADMIN, json={"roles": ["Audit team"]}).status_code == 200
    assert c.put("/api/v1/users/auditee/password", auth=ADMIN, json={"password": "audit-api-password-2"}).status_code == 200
    assert c.post("/sdapi/v1/options", auth=ADMIN, json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    assert c.post("/sdapi/v1/options", auth=ALICE, json={"CLIP_stop_at_last_layers": 3}).status_code == 200
    assert c.post("/api/v1/tokens", auth=ALICE, json={"name": "alice audit"}).status_code == 201
    return start


def _list(c, **params):
    answer = c.get("/api/v1/audit", auth=ADMIN, params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()["items"]


def test_the_whole_log_newest_first(fake_studio, events):
    items = _list(fake_studio.client)
    actions = [e["action"] for e in items]
    assert actions[:6] == ["token.create", "options.defaults", "user.password_reset", "user.roles", "role.create",
                           "user.create"]
    assert [e["id"] for e in items] == sorted((e["id"] for e in items), reverse=True)
    roles = next(e for e in items if e["action"] == "user.roles")
    assert roles["actor"] == "admin" and roles["target"] == "auditee"
    assert roles["detail"] == {"before": ["Designer"], "after": ["Audit team"]}
    defaults = next(e for e in items if e["action"] == "options.defaults")
    assert defaults["detail"] == {"changed": {"CLIP_stop_at_last_layers": 2}}
    assert actions.count("options.defaults") == 1, "a user's own options are not an administrative change"


def test_filters(fake_studio, events):
    c = fake_studio.client
    assert {e["action"] for e in _list(c, action="user")} == {"user.create", "user.roles", "user.password_reset"}
    assert [e["action"] for e in _list(c, action="user.roles")] == ["user.roles"]
    assert _list(c, action="user.rol") == []  # an action is exact; an area is the part before the dot
    assert [e["action"] for e in _list(c, actor="alice")] == ["token.create"]
    assert _list(c, actor="alic") == [], "the actor is a user name, exact"
    assert {e["target"] for e in _list(c, target="uditee")} == {"auditee"}
    assert [e["action"] for e in _list(c, actor="admin", action="role", target="Audit t")] == ["role.create"]
    assert [e["action"] for e in _list(c, action="user", target="auditee", actor="admin")] == [
        "user.password_reset", "user.roles", "user.create"]


def test_dates_and_paging(fake_studio, events):
    c = fake_studio.client
    recent = _list(c, since=events.isoformat())
    assert {"user.create", "token.create", "options.defaults"} <= {e["action"] for e in recent}
    assert _list(c, since=events.replace(tzinfo=None).isoformat()) == recent  # no zone: UTC
    assert _list(c, since=events.astimezone(timezone(timedelta(hours=9))).isoformat()) == recent
    assert len(_list(c, since=(events - timedelta(hours=1)).isoformat())) > len(recent)  # alice and bob's creation
    assert _list(c, since=(datetime.now(UTC) + timedelta(hours=1)).isoformat()) == []
    assert _list(c, until=(events - timedelta(hours=1)).isoformat()) == []
    assert _list(c, since="2000-01-01", until="2000-01-02") == []
    everything = _list(c)
    assert [e["id"] for e in _list(c, limit=2)] == [e["id"] for e in everything[:2]]
    assert [e["id"] for e in _list(c, limit=2, offset=1)] == [e["id"] for e in everything[1:3]]
    page = c.get("/api/v1/audit", auth=ADMIN, params={"limit": 3, "offset": 2}).json()
    assert (page["limit"], page["offset"], len(page["items"])) == (3, 2, 3)


@pytest.mark.parametrize(("params", "field"), [
    ({"since": "2024-13-01"}, "since"), ({"until": "yesterday"}, "until"), ({"since": "2024-05-02", "until": "2024-05-01"}, "until"),
    ({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"offset": -1}, "offset"),
])
def test_bad_parameters_name_the_field(fake_studio, params, field):
    answer = fake_studio.client.get("/api/v1/audit", auth=ADMIN, params=params)
    assert answer.status_code == 422 and answer.json()["field"] == field, answer.text


def test_only_administrators_read_the_log(fake_studio, events):
    c = fake_studio.client
    refused = c.get("/api/v1/audit", auth=ALICE)
    assert refused.status_code == 403 and "user:all" in refused.json()["detail"]
    fake_studio.studio.users.create_user(actor=fake_studio.admin, username="operator", password=PASSWORD,
                                         roles=["IT Operator"])
    assert c.get("/api/v1/audit", auth=("operator", PASSWORD)).status_code == 403
    scoped = c.post("/api/v1/tokens", auth=ADMIN, json={"name": "no audit", "scopes": ["user:list"]}).json()["token"]
    assert c.get("/api/v1/audit", headers={"authorization": f"Bearer {scoped}"}).status_code == 403
    full = c.post("/api/v1/tokens", auth=ADMIN, json={"name": "audit", "scopes": ["user:all"]}).json()["token"]
    assert c.get("/api/v1/audit", headers={"authorization": f"Bearer {full}"}).status_code == 200
