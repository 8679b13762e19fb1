"""The sharing rule every shareable item follows (webapp/services/sharing.py), on SQLite and PostgreSQL: roles
resolved by name or id, visibility "roles" needs one, roles with another visibility are refused, and a visibility
other than "roles" stores none."""

from __future__ import annotations

import pytest

from webapp.db import Database
from webapp.records import Visibility
from webapp.services import sharing
from webapp.services.errors import InvalidInput
from webapp.services.passwords import Passwords
from webapp.services.roles import RoleService
from webapp.services.users import UserService


@pytest.fixture
def ids(db) -> dict[str, int]:
    users = UserService(db, Passwords())
    users.ensure_admin("a-long-enough-password")
    RoleService(db).create_role(actor=users.get_by_name("admin"), name="Team", permissions=["model:list"])
    return {name: role_id for role_id, name in sharing.role_names(db).items()}


def resolve(db: Database, **kwargs) -> tuple[Visibility, str]:
    with db.read() as s:
        return sharing.resolve(s, **kwargs)


def test_new_items(db, ids):
    team, designer = ids["Team"], ids["Designer"]
    assert resolve(db, visibility=None, allowed_roles=None) == (Visibility.PRIVATE, "")
    assert resolve(db, visibility=None, allowed_roles=None, default=Visibility.EVERYONE) == (Visibility.EVERYONE, "")
    assert resolve(db, visibility="roles", allowed_roles=["Team", str(designer), team]) == (
        Visibility.ROLES, f",{min(team, designer)},{max(team, designer)},")
    assert resolve(db, visibility="private", allowed_roles=[]) == (Visibility.PRIVATE, "")
    for kwargs, message in (
        ({"visibility": "roles", "allowed_roles": None}, "at least one role"),
        ({"visibility": "roles", "allowed_roles": []}, "at least one role"),
        ({"visibility": "everyone", "allowed_roles": ["Team"]}, "only with visibility 'roles'"),
        ({"visibility": "roles", "allowed_roles": ["Team", "Nope", "99999"]}, "'Nope', '99999'"),
        ({"visibility": "roles", "allowed_roles": [True]}, "list of role names"),
    ):
        with pytest.raises(InvalidInput, match=message) as refused:
            resolve(db, **kwargs)
        assert refused.value.field == "allowed_roles", kwargs
    with pytest.raises(InvalidInput, match="visibility") as bad:
        resolve(db, visibility="friends", allowed_roles=None)
    assert bad.value.field == "visibility"


def test_changes_keep_or_forget_the_roles(db, ids):
    stored = f",{ids['Team']},"
    shared = (Visibility.ROLES, stored)
    assert resolve(db, visibility="roles", allowed_roles=None, current=shared) == shared  # kept
    assert resolve(db, visibility=None, allowed_roles=["Designer"], current=shared) == (
        Visibility.ROLES, f",{ids['Designer']},")
    assert resolve(db, visibility="everyone", allowed_roles=None, current=shared) == (Visibility.EVERYONE, "")
    with pytest.raises(InvalidInput, match="at least one role"):
        resolve(db, visibility="roles", allowed_roles=None, current=(Visibility.PRIVATE, ""))
    with pytest.raises(InvalidInput, match="only with visibility 'roles'"):
        resolve(db, visibility=None, allowed_roles=["Team"], current=(Visibility.EVERYONE, ""))
    assert sharing.names_of(f",{ids['Team']},{ids['Designer']},", sharing.role_names(db)) == ["Designer", "Team"]
    assert sharing.names_of(",424242,", {}) == ["#424242"]
