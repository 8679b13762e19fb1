"""Roles and the one authorisation rule, on SQLite and PostgreSQL: seeded roles, granting only what one
holds, the last administrator, users' mirrored permissions, allowed roles, and the audit trail."""

from __future__ import annotations

import json

import pytest
from sqlmodel import select

from webapp.records import AuditEvent, ModelRecord, ModelType, User, Visibility
from webapp.services.access import ALL_PERMISSIONS, can, encode_roles, visible
from webapp.services.audit import AuditFilter, AuditLog
from webapp.services.errors import Conflict, InvalidInput, PermissionDenied
from webapp.services.passwords import Passwords
from webapp.services.roles import RoleService
from webapp.services.users import UserService

PASSWORD = "a-long-enough-password"


@pytest.fixture
def users(db):
    service = UserService(db, Passwords())
    service.ensure_admin(PASSWORD)
    return service


@pytest.fixture
def roles(db):
    return RoleService(db)


@pytest.fixture
def admin(users):
    return users.get_by_name("admin")


def fresh(users: UserService, user: User) -> User:
    return users.get_by_name(user.username)


def test_seeded_roles_and_defaults(users, roles, admin):
    views = {r.name: r for r in roles.list_roles(actor=admin)}
    assert set(views) == {"Admin", "Designer", "IT Operator"}
    assert admin.permissions >= ALL_PERMISSIONS and views["Admin"].members == 1
    alice = users.create_user(actor=admin, username="alice", password=PASSWORD)
    assert roles.roles_of([alice.id])[alice.id] == ["Designer"]
    assert can(alice, "inference:create") and can(alice, "endpoint:use")
    assert not can(alice, "endpoint:create") and not can(alice, "inference:all") and not can(alice, "user:list")
    operator = users.create_user(actor=admin, username="olga", password=PASSWORD, roles=["IT Operator"])
    assert can(operator, "endpoint:create") and can(operator, "endpoint:delete")
    assert not can(operator, "inference:all"), "an IT Operator does not see other users' images"
    legacy = users.create_user(actor=admin, username="root2", password=PASSWORD, role="admin")
    assert legacy.is_admin
    with pytest.raises(InvalidInput, match="roles"):
        users.create_user(actor=admin, username="bob", password=PASSWORD, roles=["Nope"])
    assert users.get_by_name("bob") is None


def test_a_user_can_only_grant_what_they_hold(users, roles, admin):
    roles.create_role(actor=admin, name="Role keeper", permissions=["role:all", "user:all", "model:list"])
    keeper = users.create_user(actor=admin, username="keeper", password=PASSWORD, roles=["Role keeper"])
    with pytest.raises(PermissionDenied, match="endpoint:create"):
        roles.create_role(actor=keeper, name="Deployers", permissions=["endpoint:create"])
    assert "Deployers" not in {r.name for r in roles.list_roles(actor=admin)}
    small = roles.create_role(actor=keeper, name="Viewers", permissions=["model:list"])
    assert small.permissions == ["model:list"]
    with pytest.raises(PermissionDenied, match="you can only grant"):  # Designer grants inference:*
        users.create_user(actor=keeper, username="dana", password=PASSWORD, roles=["Designer"])
    assert users.get_by_name("dana") is None, "a refused creation leaves no user behind"
    with pytest.raises(PermissionDenied, match="you can only grant"):  # nor may they take a role they lack away
        roles.update_role(actor=keeper, role="Designer", permissions=["model:list"])
    with pytest.raises(PermissionDenied, match="role:create"):
        roles.create_role(actor=fresh(users, users.create_user(actor=admin, username="d2", password=PASSWORD)),
                          name="x", permissions=[])


def test_permissions_follow_role_changes_at_once(users, roles, admin):
    alice = users.create_user(actor=admin, username="alice", password=PASSWORD)
    assert not can(fresh(users, alice), "endpoint:create")
    roles.update_role(actor=admin, role="Designer", permissions=["endpoint:all", "inference:create"])
    alice = fresh(users, alice)
    assert can(alice, "endpoint:create") and not can(alice, "model:list")
    roles.set_user_roles(actor=admin, username="alice", roles=["IT Operator"])
    alice = fresh(users, alice)
    assert roles.roles_of([alice.id])[alice.id] == ["IT Operator"] and can(alice, "model:all")
    roles.set_user_roles(actor=admin, username="alice", roles=[])
    assert fresh(users, alice).permissions == frozenset()


def test_the_last_administrator_cannot_be_removed(users, roles, admin):
    for change in (
        lambda: roles.set_user_roles(actor=admin, username="admin", roles=["Designer"]),
        lambda: roles.update_role(actor=admin, role="Admin", permissions=["model:all"]),
        lambda: roles.delete_role(actor=admin, role="Admin"),
    ):
        with pytest.raises(Conflict, match="last administrator"):
            change()
    assert fresh(users, admin).is_admin and {r.name for r in roles.list_roles(actor=admin)} >= {"Admin"}
    other = users.create_user(actor=admin, username="root2", password=PASSWORD, roles=["Admin"])
    roles.set_user_roles(actor=other, username="admin", roles=["Designer"])  # another admin remains: fine
    assert not fresh(users, admin).is_admin
    with pytest.raises(Conflict, match="last administrator"):
        roles.set_user_roles(actor=other, username="root2", roles=[])


def test_deleting_a_role_removes_it_from_members_and_allowed_roles(db, users, roles, admin):
    team = roles.create_role(actor=admin, name="Team A", permissions=["model:list", "model:use"])
    keep = roles.create_role(actor=admin, name="Team B", permissions=["model:list"])
    alice = users.create_user(actor=admin, username="alice", password=PASSWORD, roles=["Team A"])
    with db.write() as s:
        s.add(ModelRecord(id="m1", type=ModelType.LORA, name="shared", visibility=Visibility.ROLES,
                          allowed_roles=encode_roles([team.id, keep.id]), owner_id=admin.id))
        s.add(ModelRecord(id="m2", type=ModelType.LORA, name="only-a", visibility=Visibility.ROLES,
                          allowed_roles=encode_roles([team.id]), owner_id=admin.id))
    roles.delete_role(actor=admin, role="Team A")
    assert fresh(users, alice).permissions == frozenset() and fresh(users, alice).role_ids == frozenset()
    with db.read() as s:
        assert s.get(ModelRecord, "m1").allowed_roles == encode_roles([keep.id])
        assert s.get(ModelRecord, "m2").allowed_roles == ""


def test_can_and_visible_agree_on_every_row(db, users, roles, admin):
    """The SQL form of the rule selects exactly the rows ``can`` allows, for several kinds of user."""
    team = roles.create_role(actor=admin, name="Team", permissions=["model:list", "model:use"])
    users.create_user(actor=admin, username="alice", password=PASSWORD)                    # Designer
    users.create_user(actor=admin, username="tina", password=PASSWORD, roles=["Team"])      # model:list, role Team
    users.create_user(actor=admin, username="olga", password=PASSWORD, roles=["IT Operator"])  # model:all
    users.create_user(actor=admin, username="nobody", password=PASSWORD, roles=[])
    people = {n: users.get_by_name(n) for n in ("admin", "alice", "tina", "olga", "nobody")}
    rows = []
    with db.write() as s:
        n = 0
        for owner in (people["alice"], people["tina"], None):
            for vis in Visibility:
                for allowed in ("", encode_roles([team.id]), encode_roles([999])):
                    n += 1
                    rows.append(ModelRecord(id=f"m{n}", type=ModelType.LORA, name=f"m{n}", visibility=vis,
                                            allowed_roles=allowed, owner_id=owner.id if owner else None))
        s.add_all(rows)
    with db.read() as s:
        every = list(s.exec(select(ModelRecord)))
        for name, person in people.items():
            for action in ("list", "update"):
                selected = {m.id for m in s.exec(select(ModelRecord).where(visible(person, ModelRecord, "model",
                                                                                   action)))}
                allowed = {m.id for m in every if can(person, f"model:{action}", m)}
                assert selected == allowed, (name, action)
    assert not any(can(people["nobody"], "model:list", m) for m in every)
    tina_sees = {m.name for m in every if can(people["tina"], "model:list", m)}
    assert any(m.visibility == Visibility.ROLES and m.owner_id != people["tina"].id and m.name in tina_sees
               for m in every), "a role-shared model is visible to a holder of that role"


def test_changes_are_audited_and_filterable(db, users, roles, admin):
    log = AuditLog(db)
    roles.create_role(actor=admin, name="Team", permissions=["model:list"])
    users.create_user(actor=admin, username="alice", password=PASSWORD)
    roles.set_user_roles(actor=admin, username="alice", roles=["Team", "Designer"])
    roles.update_role(actor=admin, role="Team", permissions=["model:all"], max_jobs_per_day=5)
    users.reset_password(actor=admin, username="alice", new_password="another-long-password")
    users.delete_user(actor=admin, username="alice")
    actions = [e.action for e in log.list_events(actor=admin)]
    assert actions[:6] == ["user.delete", "user.password_reset", "role.update", "user.roles", "user.create",
                           "role.create"]
    update = log.list_events(actor=admin, where=AuditFilter(action="role.update"))[0]
    detail = json.loads(update.detail_json)
    assert update.actor_name == "admin" and update.target == "Team"
    assert detail["added"] and detail["max_jobs_per_day"] == [None, 5]
    assert {e.action for e in log.list_events(actor=admin, where=AuditFilter(action="user"))} == {
        "user.create", "user.roles", "user.password_reset", "user.delete"}
    assert log.list_events(actor=admin, where=AuditFilter(actor="nobody")) == []
    designer = users.create_user(actor=admin, username="dora", password=PASSWORD)
    with pytest.raises(PermissionDenied):
        log.list_events(actor=designer)
    with pytest.raises(Conflict):
        roles.create_role(actor=admin, name="Team", permissions=[])
    with db.read() as s:  # a refused change writes no event
        assert len(s.exec(select(AuditEvent).where(AuditEvent.action == "role.create")).all()) == 1


def test_quotas_and_bad_role_input(users, roles, admin):
    with pytest.raises(InvalidInput, match="unknown permissions"):
        roles.create_role(actor=admin, name="Bad", permissions=["model:fly", "gpu:all"])
    with pytest.raises(InvalidInput, match="max_queued_jobs"):
        roles.create_role(actor=admin, name="Bad", permissions=[], max_queued_jobs=-1)
    assert "Bad" not in {r.name for r in roles.list_roles(actor=admin)}
    roles.create_role(actor=admin, name="Small", permissions=["inference:create"], max_jobs_per_day=10,
                      max_queued_jobs=2)
    roles.create_role(actor=admin, name="Big", permissions=["inference:create"], max_jobs_per_day=100)
    alice = users.create_user(actor=admin, username="alice", password=PASSWORD, roles=["Small", "Big"])
    quotas = roles.effective_quotas(alice)
    assert quotas["max_jobs_per_day"] == 100, "the most generous role wins"
    assert quotas["max_queued_jobs"] is None, "a role without a limit leaves it unlimited"


def test_jobs_are_never_shared_and_endpoints_follow_allowed_roles(users, roles, admin):
    from webapp.records import Endpoint, Job, JobMode

    team = roles.create_role(actor=admin, name="Team", permissions=["endpoint:list", "endpoint:use",
                                                                    "inference:list"])
    alice = users.create_user(actor=admin, username="alice", password=PASSWORD)
    tina = users.create_user(actor=admin, username="tina", password=PASSWORD, roles=["Team"])
    job = Job(id="j1", owner_id=alice.id, mode=JobMode.TXT2IMG, request_json="{}", endpoint="local")
    assert can(alice, "inference:list", job) and not can(tina, "inference:list", job)
    assert can(admin, "inference:list", job)
    open_endpoint = Endpoint(name="open", kind="fake")
    team_endpoint = Endpoint(name="team", kind="fake", allowed_roles=encode_roles([team.id]))
    assert can(alice, "endpoint:use", open_endpoint) and not can(alice, "endpoint:use", team_endpoint)
    assert can(tina, "endpoint:use", team_endpoint) and can(admin, "endpoint:use", team_endpoint)
