"""Roles: named sets of permissions with quotas, who holds them, and the rules that keep that safe.

* A user can only grant what they hold: creating or editing a role (each permission added or removed) and
  giving or taking a role from a user need every permission involved.
* The last administrator cannot be removed: after any change at least one user must hold every
  permission (deleting users, taking roles away, editing or deleting a role are all checked).
* A user row mirrors its roles and effective permissions (``User.role_ids_json`` / ``permissions_json``);
  every change here rewrites the affected users in the same write transaction.
Every change is written to the audit log in that transaction too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import func, text
from sqlmodel import Session, col, delete, select

from webapp.db import Database
from webapp.records import AccessRole, RoleMember, User, utcnow
from webapp.services import audit
from webapp.services.access import (
    ALL_PERMISSIONS,
    DEFAULT_ROLE,
    authorize,
    compact,
    expand,
    parse_permissions,
)
from webapp.services.errors import Conflict, InvalidInput, NotFound, PermissionDenied

MAX_NAME = 64
MAX_DESCRIPTION = 256
QUOTA_FIELDS = ("max_queued_jobs", "max_jobs_per_day", "max_gpu_seconds_per_day", "max_storage_mb")
QUOTA_LABELS = {"max_queued_jobs": "queued jobs", "max_jobs_per_day": "jobs per day",
                "max_gpu_seconds_per_day": "GPU-seconds per day", "max_storage_mb": "storage (MB)"}


class RoleView(BaseModel):
    id: int
    name: str
    description: str
    builtin: str | None
    permissions: list[str]
    """Compact (``model:all`` rather than its six actions)."""
    max_queued_jobs: int | None
    max_jobs_per_day: int | None
    max_gpu_seconds_per_day: int | None
    max_storage_mb: int | None
    members: int
    updated_at: datetime


def _view(role: AccessRole, members: int) -> RoleView:
    return RoleView(id=role.id, name=role.name, description=role.description, builtin=role.builtin,
                    permissions=compact(json.loads(role.permissions_json)), members=members,
                    updated_at=role.updated_at, **{f: getattr(role, f) for f in QUOTA_FIELDS})


def role_permissions(role: AccessRole) -> frozenset[str]:
    return expand(json.loads(role.permissions_json))


# -- inside a write transaction ------------------------------------------------------------------------------

def refresh_users(s: Session, user_ids: Iterable[int]) -> None:
    """Rewrite the mirrored roles and permissions of these users from the membership table."""
    for user_id in set(user_ids):
        user = s.get(User, user_id)
        if user is None:
            continue
        roles = s.exec(select(AccessRole).join(RoleMember, col(RoleMember.role_id) == col(AccessRole.id))
                       .where(RoleMember.user_id == user_id)).all()
        held: set[str] = set()
        for role in roles:
            held |= role_permissions(role)
        user.role_ids_json = json.dumps(sorted(r.id for r in roles))
        user.permissions_json = json.dumps(sorted(held))
        s.add(user)


def ensure_an_admin_remains(s: Session) -> None:
    """Refuse (Conflict) a change that leaves no user holding every permission."""
    s.flush()
    for user in s.exec(select(User)):
        if user.permissions >= ALL_PERMISSIONS:
            return
    raise Conflict("this would remove the last administrator (a user holding every permission); give another "
                   "user the Admin role first", field="roles")


def resolve_roles(s: Session, names_or_ids: Sequence[str | int], *, field: str = "roles") -> list[AccessRole]:
    """Roles named by name or id; every unknown one is named."""
    found: list[AccessRole] = []
    missing: list[str] = []
    for item in names_or_ids:
        role = None
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            role = s.get(AccessRole, int(item))
        if role is None and isinstance(item, str):
            role = s.exec(select(AccessRole).where(AccessRole.name == item.strip())).first()
        if role is None:
            missing.append(str(item))
        elif role not in found:
            found.append(role)
    if missing:
        raise InvalidInput(f"`{field}`: no role named {', '.join(repr(m) for m in missing)}", field=field)
    return found


def find_role(s: Session, role: str | int) -> AccessRole:
    """One role by name or id; NotFound (404) naming it when there is none."""
    try:
        return resolve_roles(s, [role], field="role")[0]
    except InvalidInput:
        raise NotFound(f"no role named {str(role)!r}", field="role") from None


def require_grantable(actor: User, permissions: Iterable[str], *, field: str = "permissions") -> None:
    lacking = sorted(expand(permissions) - actor.permissions)
    if lacking:
        raise PermissionDenied(f"you can only grant what you hold: you lack {compact(lacking)}", field=field)


def set_member_roles(s: Session, actor: User, user: User, roles: Sequence[AccessRole]) -> None:
    """Make ``roles`` exactly the user's roles; each role added or removed must be grantable by ``actor``."""
    current = {m.role_id for m in s.exec(select(RoleMember).where(RoleMember.user_id == user.id))}
    wanted = {r.id for r in roles}
    changed = current ^ wanted
    for role_id in changed:
        role = s.get(AccessRole, role_id)
        if role is not None:
            require_grantable(actor, role_permissions(role), field="roles")
    for role_id in current - wanted:
        s.exec(delete(RoleMember).where(RoleMember.user_id == user.id, RoleMember.role_id == role_id))
    for role_id in wanted - current:
        s.add(RoleMember(user_id=user.id, role_id=role_id))
    s.flush()
    refresh_users(s, [user.id])


def default_roles(s: Session) -> list[AccessRole]:
    role = s.exec(select(AccessRole).where(AccessRole.builtin == DEFAULT_ROLE)).first()
    return [role] if role is not None else []


def _check_quotas(values: dict[str, int | None]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name, value in values.items():
        if name not in QUOTA_FIELDS:
            raise InvalidInput(f"unknown quota `{name}`; quotas are {list(QUOTA_FIELDS)}", field=name)
        if value is None or value == "":
            out[name] = None
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise InvalidInput(f"`{name}` must be a whole number ≥ 0 or empty (no limit), not {value!r}",
                               field=name) from None
        if number < 0 or number > 10**12:
            raise InvalidInput(f"`{name}` must be between 0 and 10^12, not {number}", field=name)
        out[name] = number
    return out


def _check_name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > MAX_NAME or any(ord(c) < 32 for c in name) or name.isdigit():
        raise InvalidInput(f"`name` must be 1-{MAX_NAME} printable characters, not only digits", field="name")
    return name


def _check_description(description: str) -> str:
    description = (description or "").strip()
    if len(description) > MAX_DESCRIPTION or "\x00" in description:
        raise InvalidInput(f"`description` must be at most {MAX_DESCRIPTION} characters", field="description")
    return description


class RoleService:
    def __init__(self, db: Database) -> None:
        self._db = db

    def list_roles(self, *, actor: User) -> list[RoleView]:
        authorize(actor, "role:list")
        with self._db.read() as s:
            counts = dict(s.exec(select(RoleMember.role_id, func.count()).group_by(RoleMember.role_id)).all())
            return [_view(r, counts.get(r.id, 0)) for r in s.exec(select(AccessRole).order_by(AccessRole.id))]

    def role_names(self) -> dict[int, str]:
        """Id → name of every role (no authorisation: names label things the caller already sees)."""
        with self._db.read() as s:
            return {r.id: r.name for r in s.exec(select(AccessRole))}

    def get_role(self, *, actor: User, role: str | int) -> RoleView:
        authorize(actor, "role:list")
        with self._db.read() as s:
            found = find_role(s, role)
            members = s.exec(select(func.count()).select_from(RoleMember).where(RoleMember.role_id == found.id)).one()
            return _view(found, members)

    def create_role(self, *, actor: User, name: str, permissions: Iterable[str], description: str = "",
                    **quotas: int | None) -> RoleView:
        authorize(actor, "role:create")
        name, description = _check_name(name), _check_description(description)
        granted = parse_permissions(permissions)
        require_grantable(actor, granted)
        limits = _check_quotas(quotas)
        with self._db.write() as s:
            if s.exec(select(AccessRole).where(AccessRole.name == name)).first() is not None:
                raise Conflict(f"a role named {name!r} already exists", field="name")
            role = AccessRole(name=name, description=description, permissions_json=json.dumps(compact(granted)),
                              **limits)
            s.add(role)
            s.flush()
            audit.record(s, actor, "role.create", name, permissions=compact(granted), **limits)
            return _view(role, 0)

    def update_role(self, *, actor: User, role: str | int, name: str | None = None, description: str | None = None,
                    permissions: Iterable[str] | None = None, **quotas: int | None) -> RoleView:
        authorize(actor, "role:update")
        limits = _check_quotas(quotas)
        with self._db.write() as s:
            found = find_role(s, role)
            before = role_permissions(found)
            changes: dict[str, object] = {}
            if name is not None and _check_name(name) != found.name:
                name = _check_name(name)
                if s.exec(select(AccessRole).where(AccessRole.name == name)).first() is not None:
                    raise Conflict(f"a role named {name!r} already exists", field="name")
                changes["name"] = [found.name, name]
                found.name = name
            if description is not None:
                found.description = _check_description(description)
            if permissions is not None:
                after = expand(parse_permissions(permissions))
                require_grantable(actor, before ^ after)  # adding or taking away: only what the actor holds
                if after != before:
                    changes["added"] = compact(after - before)
                    changes["removed"] = compact(before - after)
                found.permissions_json = json.dumps(compact(after))
            for field, value in limits.items():
                if getattr(found, field) != value:
                    changes[field] = [getattr(found, field), value]
                    setattr(found, field, value)
            found.updated_at = utcnow()
            s.add(found)
            members = [m.user_id for m in s.exec(select(RoleMember).where(RoleMember.role_id == found.id))]
            refresh_users(s, members)
            ensure_an_admin_remains(s)
            audit.record(s, actor, "role.update", found.name, **changes)
            return _view(found, len(members))

    def delete_role(self, *, actor: User, role: str | int) -> str:
        """Delete a role; returns its name."""
        authorize(actor, "role:delete")
        with self._db.write() as s:
            found = find_role(s, role)
            require_grantable(actor, role_permissions(found))
            members = [m.user_id for m in s.exec(select(RoleMember).where(RoleMember.role_id == found.id))]
            s.exec(delete(RoleMember).where(RoleMember.role_id == found.id))
            s.delete(found)
            s.flush()
            token = f",{found.id},"
            for table in ("model", "dataset", "endpoint"):  # no longer allowed anywhere
                s.connection().execute(text(
                    f"UPDATE \"{table}\" SET allowed_roles = CASE WHEN REPLACE(allowed_roles, :t, ',') = ',' "
                    f"THEN '' ELSE REPLACE(allowed_roles, :t, ',') END WHERE allowed_roles LIKE :like"),
                    {"t": token, "like": f"%{token}%"})
            refresh_users(s, members)
            ensure_an_admin_remains(s)
            audit.record(s, actor, "role.delete", found.name, members=len(members))
            return found.name

    def set_user_roles(self, *, actor: User, username: str, roles: Sequence[str | int]) -> list[str]:
        """Give ``username`` exactly these roles (names or ids); returns their names."""
        authorize(actor, "user:update")
        with self._db.write() as s:
            user = s.exec(select(User).where(User.username == username)).first()
            if user is None:
                raise NotFound(f"no user named {username!r}", field="username")
            wanted = resolve_roles(s, roles)
            before = sorted(r.name for r in s.exec(select(AccessRole).join(
                RoleMember, col(RoleMember.role_id) == col(AccessRole.id)).where(RoleMember.user_id == user.id)))
            set_member_roles(s, actor, user, wanted)
            ensure_an_admin_remains(s)
            after = sorted(r.name for r in wanted)
            if before != after:
                audit.record(s, actor, "user.roles", username, before=before, after=after)
            return after

    def roles_of(self, user_ids: Iterable[int]) -> dict[int, list[str]]:
        """User id → role names (for lists the caller may already see)."""
        wanted = set(user_ids)
        out: dict[int, list[str]] = {u: [] for u in wanted}
        if not wanted:
            return out
        with self._db.read() as s:
            rows = s.exec(select(RoleMember.user_id, AccessRole.name).join(
                AccessRole, col(RoleMember.role_id) == col(AccessRole.id)).where(col(RoleMember.user_id).in_(wanted))
                .order_by(AccessRole.name)).all()
        for user_id, name in rows:
            out[user_id].append(name)
        return out

    def effective_quotas(self, user: User) -> dict[str, int | None]:
        """The most generous of the user's roles per quota (None: unlimited); no roles: none of them apply."""
        with self._db.read() as s:
            roles = s.exec(select(AccessRole).join(RoleMember, col(RoleMember.role_id) == col(AccessRole.id))
                           .where(RoleMember.user_id == user.id)).all()
        out: dict[str, int | None] = {}
        for field in QUOTA_FIELDS:
            values = [getattr(r, field) for r in roles]
            out[field] = None if not values or any(v is None for v in values) else max(values)
        return out
