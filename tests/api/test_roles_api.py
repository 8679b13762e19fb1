"""``/api/v1/roles``, ``/api/v1/users/{username}/roles`` and ``/api/v1/permissions`` over HTTP: every route, the
refusals (403 naming the permission, grant only what you hold, 409 for the last administrator) and bad input
(4xx naming the field), each leaving nothing changed."""

from __future__ import annotations

from sqlmodel import select

from tests.api.conftest import ADMIN, ALICE
from webapp.records import AccessRole, AuditEvent
from webapp.services.access import ALL_PERMISSIONS, DESCRIPTIONS, RESOURCES

PASSWORD = "roles-api-password-1"


def _role_names(studio) -> set[str]:
    with studio.studio.db.read() as s:
        return {r.name for r in s.exec(select(AccessRole))}


def _events(studio, action: str) -> list[AuditEvent]:
    with studio.studio.db.read() as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == action)))


def test_the_permission_vocabulary_is_readable_by_every_user(fake_studio):
    answer = fake_studio.client.get("/api/v1/permissions", auth=ALICE)
    assert answer.status_code == 200
    body = answer.json()
    assert [r["name"] for r in body["resources"]] == list(RESOURCES)
    assert all(r["description"] == DESCRIPTIONS[r["name"]] for r in body["resources"])
    assert set(body["permissions"]) == ALL_PERMISSIONS and "all" in body["actions"]
    assert "endpoint:create" in next(r for r in body["resources"] if r["name"] == "endpoint")["permissions"]


def test_listing_and_reading_roles(fake_studio):
    c = fake_studio.client
    listed = {r["name"]: r for r in c.get("/api/v1/roles", auth=ADMIN).json()}
    assert {"Admin", "Designer", "IT Operator"} <= set(listed)
    assert listed["Admin"]["members"] == 1 and "endpoint:all" in listed["Admin"]["permissions"]
    assert listed["Designer"]["members"] >= 2  # alice and bob
    by_id = c.get(f"/api/v1/roles/{listed['Designer']['id']}", auth=ADMIN)
    assert by_id.status_code == 200 and by_id.json()["name"] == "Designer"
    assert c.get("/api/v1/roles/Designer", auth=ADMIN).json()["id"] == listed["Designer"]["id"]
    missing = c.get("/api/v1/roles/Nobody", auth=ADMIN)
    assert missing.status_code == 404 and missing.json()["field"] == "role"
    refused = c.get("/api/v1/roles", auth=ALICE)  # a Designer holds no role:list
    assert refused.status_code == 403 and "role:list" in refused.json()["detail"]


def test_create_update_and_delete_a_role(fake_studio):
    c = fake_studio.client
    created = c.post("/api/v1/roles", auth=ADMIN, json={
        "name": "Reviewers", "description": "look, don't touch", "permissions": ["model:list", "inference:all"],
        "max_jobs_per_day": 20, "max_storage_mb": 100})
    assert created.status_code == 201, created.text
    role = created.json()
    assert role["permissions"] == ["model:list", "inference:all"] and role["members"] == 0
    assert (role["max_jobs_per_day"], role["max_storage_mb"], role["max_queued_jobs"]) == (20, 100, None)

    patched = c.patch(f"/api/v1/roles/{role['id']}", auth=ADMIN,
                      json={"name": "Auditors", "max_jobs_per_day": None, "permissions": ["model:list"]})
    assert patched.status_code == 200, patched.text
    after = patched.json()
    assert after["name"] == "Auditors" and after["permissions"] == ["model:list"]
    assert after["max_jobs_per_day"] is None and after["max_storage_mb"] == 100, "a quota left out is kept"
    assert after["description"] == "look, don't touch"

    given = c.put("/api/v1/users/bob/roles", auth=ADMIN, json={"roles": ["Designer", "Auditors"]})
    assert given.status_code == 200 and given.json() == {"username": "bob", "roles": ["Auditors", "Designer"]}
    assert sorted(next(u for u in c.get("/api/v1/users", auth=ADMIN).json() if u["username"] == "bob")["roles"]) \
        == ["Auditors", "Designer"]
    assert c.get("/api/v1/roles/Auditors", auth=ADMIN).json()["members"] == 1

    deleted = c.delete("/api/v1/roles/Auditors", auth=ADMIN)
    assert deleted.status_code == 200 and deleted.json() == {"deleted": "Auditors"}
    assert c.get("/api/v1/roles/Auditors", auth=ADMIN).status_code == 404
    assert c.get("/api/v1/me", auth=("bob", "bob-password-456")).json()["roles"] == ["Designer"]
    assert [e.target for e in _events(fake_studio, "role.create")][-1] == "Reviewers"
    assert [e.target for e in _events(fake_studio, "role.update")][-1] == "Auditors"
    assert [e.target for e in _events(fake_studio, "role.delete")][-1] == "Auditors"
    assert [e.target for e in _events(fake_studio, "user.roles")][-1] == "bob"


def test_a_designer_cannot_manage_roles(fake_studio):
    c = fake_studio.client
    before = _role_names(fake_studio)
    refused = c.post("/api/v1/roles", auth=ALICE, json={"name": "Mine", "permissions": ["model:list"]})
    assert refused.status_code == 403 and "role:create" in refused.json()["detail"]
    assert c.patch("/api/v1/roles/Designer", auth=ALICE, json={"description": "x"}).status_code == 403
    assert c.delete("/api/v1/roles/Designer", auth=ALICE).status_code == 403
    own = c.put("/api/v1/users/alice/roles", auth=ALICE, json={"roles": ["Admin"]})
    assert own.status_code == 403 and "user:update" in own.json()["detail"]
    assert _role_names(fake_studio) == before
    assert c.get("/api/v1/me", auth=ALICE).json()["roles"] == ["Designer"]


def test_a_role_keeper_grants_only_what_they_hold(fake_studio):
    c = fake_studio.client
    keeper_role = c.post("/api/v1/roles", auth=ADMIN, json={
        "name": "Role keeper", "permissions": ["role:all", "user:all", "model:list"]})
    assert keeper_role.status_code == 201
    fake_studio.studio.users.create_user(actor=fake_studio.admin, username="keeper", password=PASSWORD,
                                         roles=["Role keeper"])
    keeper = ("keeper", PASSWORD)
    before = _role_names(fake_studio)
    deployers = c.post("/api/v1/roles", auth=keeper, json={"name": "Deployers", "permissions": ["endpoint:create"]})
    assert deployers.status_code == 403 and "endpoint:create" in deployers.json()["detail"]
    assert deployers.json()["field"] == "permissions"
    widened = c.patch("/api/v1/roles/Role keeper", auth=keeper,
                      json={"permissions": ["role:all", "user:all", "model:list", "endpoint:create"]})
    assert widened.status_code == 403 and "endpoint:create" in widened.json()["detail"]
    operator = c.put("/api/v1/users/bob/roles", auth=keeper, json={"roles": ["Designer", "IT Operator"]})
    assert operator.status_code == 403 and "endpoint" in operator.json()["detail"]
    assert _role_names(fake_studio) == before
    assert c.get("/api/v1/roles/Role keeper", auth=ADMIN).json()["permissions"] == ["user:all", "role:all",
                                                                                     "model:list"]
    assert c.get("/api/v1/me", auth=("bob", "bob-password-456")).json()["roles"] == ["Designer"]
    viewers = c.post("/api/v1/roles", auth=keeper, json={"name": "Viewers", "permissions": ["model:list"]})
    assert viewers.status_code == 201


def test_the_last_administrator_stays(fake_studio):
    c = fake_studio.client
    assert [u["username"] for u in c.get("/api/v1/users", auth=ADMIN).json() if "Admin" in u["roles"]] == ["admin"]
    events = len(_events(fake_studio, "user.roles")) + len(_events(fake_studio, "role.update"))
    demoted = c.put("/api/v1/users/admin/roles", auth=ADMIN, json={"roles": ["Designer"]})
    assert demoted.status_code == 409 and demoted.json()["field"] == "roles", demoted.text
    assert "last administrator" in demoted.json()["detail"]
    narrowed = c.patch("/api/v1/roles/Admin", auth=ADMIN, json={"permissions": ["model:all"]})
    assert narrowed.status_code == 409
    assert c.delete("/api/v1/roles/Admin", auth=ADMIN).status_code == 409
    assert c.get("/api/v1/me", auth=ADMIN).json()["roles"] == ["Admin"]
    assert c.get("/api/v1/me", auth=ADMIN).json()["is_admin"] is True
    assert len(c.get("/api/v1/roles/Admin", auth=ADMIN).json()["permissions"]) == len(RESOURCES)
    assert len(_events(fake_studio, "user.roles")) + len(_events(fake_studio, "role.update")) == events


def test_bad_role_input_names_the_field(fake_studio):
    c = fake_studio.client
    before = _role_names(fake_studio)
    cases = [
        ({"name": "Bad", "permissions": ["model:fly"]}, 422, "permissions"),
        ({"name": "Bad", "permissions": [], "max_queued_jobs": -1}, 422, "max_queued_jobs"),
        ({"name": "Designer", "permissions": []}, 409, "name"),
        ({"name": "12", "permissions": []}, 422, "name"),
        ({"name": "Bad", "permission": ["model:list"]}, 422, "permissions"),  # a typo is not ignored
        ({"name": "Bad", "permissions": "model:list"}, 422, "permissions"),
    ]
    for body, status, field in cases:
        answer = c.post("/api/v1/roles", auth=ADMIN, json=body)
        assert answer.status_code == status and answer.json()["field"] == field, (body, answer.text)
    assert _role_names(fake_studio) == before
    assert c.patch("/api/v1/roles/Designer", auth=ADMIN, json={"name": None}).json()["field"] == "name"
    assert c.patch("/api/v1/roles/Nobody", auth=ADMIN, json={"description": "x"}).status_code == 404
    unknown_role = c.put("/api/v1/users/bob/roles", auth=ADMIN, json={"roles": ["Designer", "Wizards"]})
    assert unknown_role.status_code == 422 and unknown_role.json()["field"] == "roles"
    assert "Wizards" in unknown_role.json()["detail"]
    unknown_user = c.put("/api/v1/users/nobody/roles", auth=ADMIN, json={"roles": ["Designer"]})
    assert unknown_user.status_code == 404 and unknown_user.json()["field"] == "username"
    assert c.get("/api/v1/me", auth=("bob", "bob-password-456")).json()["roles"] == ["Designer"]
