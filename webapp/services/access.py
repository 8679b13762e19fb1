"""Authorisation: the permission vocabulary and the one rule every service call goes through.

A permission is ``resource:action``. ``<resource>:all`` holds every action on that resource *and* reaches
every user's items of it (another user's private model, job or dataset); without it, an action reaches the
actor's own items, plus — for ``list`` and ``use`` — items shared with them: visibility ``everyone``, or
``roles`` with one of the actor's roles among the item's allowed roles. An endpoint has no owner: any holder
of ``endpoint:use`` may use it unless it names allowed roles.

``can`` is the rule, ``authorize`` raises it, ``visible`` is the same rule as a SQL condition for lists. A
user's permissions are stored expanded (``endpoint:all`` also listed as ``endpoint:list`` …), so a check is
a set lookup on the loaded row (``User.permissions``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, false, or_, true
from sqlalchemy.sql.elements import ColumnElement

from webapp.records import User, Visibility
from webapp.services.errors import InvalidInput, PermissionDenied

RESOURCES = ("user", "role", "model", "endpoint", "inference", "dataset", "training")
ACTIONS = ("list", "create", "update", "delete", "use", "all")
ALL_PERMISSIONS = frozenset(f"{r}:{a}" for r in RESOURCES for a in ACTIONS)

OWNED = frozenset({"model", "dataset", "inference", "training"})
"""Resources whose items belong to a user (an endpoint's ``owner_id`` records who deployed it, nothing more)."""
SHAREABLE = frozenset({"model", "dataset"})
"""Owned resources an owner may share (``visibility`` everyone / roles); jobs and trainings stay their owner's."""

DESCRIPTIONS = {
    "user": "user accounts", "role": "roles and their permissions", "model": "models (checkpoints, LoRAs, …)",
    "endpoint": "inference endpoints", "inference": "generation jobs and their images",
    "dataset": "training datasets", "training": "LoRA trainings",
}


def expand(permissions: Iterable[str]) -> frozenset[str]:
    """Every permission implied: ``x:all`` brings each action of ``x``."""
    out: set[str] = set()
    for p in permissions:
        out.add(p)
        resource, _, action = p.partition(":")
        if action == "all":
            out.update(f"{resource}:{a}" for a in ACTIONS)
    return frozenset(out)


def parse_permissions(values: Iterable[str], *, field: str = "permissions") -> frozenset[str]:
    """Check user-given permission strings; every unknown one is named."""
    given = [str(v).strip() for v in values]
    unknown = [v for v in given if v not in ALL_PERMISSIONS]
    if unknown:
        raise InvalidInput(
            f"`{field}` has unknown permissions {unknown}: each is resource:action with resource one of "
            f"{list(RESOURCES)} and action one of {list(ACTIONS)}", field=field)
    return frozenset(given)


def compact(permissions: Iterable[str]) -> list[str]:
    """The shortest equivalent list (``x:all`` instead of its six actions), sorted: for display."""
    held = expand(permissions)
    out: list[str] = []
    for r in RESOURCES:
        if f"{r}:all" in held:
            out.append(f"{r}:all")
        else:
            out.extend(f"{r}:{a}" for a in ACTIONS if f"{r}:{a}" in held)
    return out


# -- allowed roles, stored as ",3,7," so a LIKE finds one role on any database ---------------------------------

def encode_roles(role_ids: Iterable[int]) -> str:
    ids = sorted({int(r) for r in role_ids})
    return f",{','.join(map(str, ids))}," if ids else ""


def decode_roles(value: str | None) -> frozenset[int]:
    return frozenset(int(p) for p in (value or "").split(",") if p)


# -- the rule -------------------------------------------------------------------------------------------------

def _shared_with(actor: User, resource: str, item: Any) -> bool:
    """Whether ``item`` is shared with ``actor``: an endpoint naming no roles or one of theirs; a model or dataset
    visible to everyone, or to one of their roles. Jobs and trainings are never shared."""
    allowed = decode_roles(getattr(item, "allowed_roles", None))
    if resource == "endpoint":
        return not allowed or bool(allowed & actor.role_ids)
    if resource not in SHAREABLE:
        return False
    if item.visibility == Visibility.EVERYONE:
        return True
    return item.visibility == Visibility.ROLES and bool(allowed & actor.role_ids)


def can(actor: User, permission: str, item: Any = None) -> bool:
    """Whether ``actor`` may do ``permission`` (``resource:action``), on ``item`` when given (a row with
    ``owner_id`` and, for shareable things, ``visibility`` / ``allowed_roles``)."""
    if permission not in ALL_PERMISSIONS:
        raise ValueError(f"unknown permission {permission!r}")
    held = actor.permissions
    if permission not in held:
        return False
    if item is None:
        return True
    resource, _, action = permission.partition(":")
    if f"{resource}:all" in held:
        return True
    owner = getattr(item, "owner_id", None)
    if resource in OWNED and owner is not None and owner == actor.id:
        return True
    return action in ("list", "use") and _shared_with(actor, resource, item)


def authorize(actor: User, permission: str, item: Any = None, *, what: str | None = None) -> None:
    """Raise ``PermissionDenied`` naming the missing permission unless ``can``."""
    if can(actor, permission, item):
        return
    resource = permission.partition(":")[0]
    if permission not in actor.permissions:
        raise PermissionDenied(f"{actor.username!r} lacks the permission {permission}")
    target = f" on {what}" if what else ""
    raise PermissionDenied(f"{actor.username!r} may not {permission}{target}: it belongs to another user "
                           f"(that needs {resource}:all)")


def visible(actor: User, table: Any, resource: str, action: str = "list") -> ColumnElement[bool]:
    """``can(actor, resource:action, row)`` as a SQL condition on ``table``'s rows, for lists and counts."""
    held = actor.permissions
    if f"{resource}:{action}" not in held:
        return false()
    if f"{resource}:all" in held:
        return true()
    shared: list[ColumnElement[bool]] = []
    if action in ("list", "use"):
        by_role = [table.allowed_roles.contains(f",{r},") for r in sorted(actor.role_ids)]
        if resource in SHAREABLE:
            shared.append(table.visibility == Visibility.EVERYONE)
            if by_role:
                shared.append(and_(table.visibility == Visibility.ROLES, or_(*by_role)))
        elif resource == "endpoint":
            shared.append(or_(table.allowed_roles == "", table.allowed_roles.is_(None), *by_role))
    mine = [table.owner_id == actor.id] if resource in OWNED else []
    conditions = [*mine, *shared]
    return or_(*conditions) if conditions else false()


# -- the seeded roles (schema v17 creates them; administrators may edit them afterwards) -------------------------

_OWN_WORK = ("list", "create", "update", "delete", "use")
SEEDED_ROLES: tuple[tuple[str, str, str, frozenset[str]], ...] = (
    ("admin", "Admin", "Everything, on every user's items; manages users and roles.",
     frozenset(f"{r}:all" for r in RESOURCES)),
    ("designer", "Designer", "Generates, trains and manages their own models and datasets on the endpoints.",
     frozenset({"model:list", "model:create", "model:update", "model:delete", "model:use", "endpoint:list",
                "endpoint:use", *(f"{r}:{a}" for r in ("inference", "dataset", "training") for a in _OWN_WORK)})),
    ("it_operator", "IT Operator", "Deploys and runs endpoints and manages models; sees only their own jobs.",
     frozenset({"endpoint:all", "model:all", "user:list", "role:list",
                *(f"inference:{a}" for a in _OWN_WORK)})),
)
DEFAULT_ROLE = "designer"
"""The seeded role a new user gets when none is named (today's ordinary user)."""
