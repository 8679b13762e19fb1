"""Who an item is shared with: its visibility and, for visibility ``roles``, its allowed roles.

Models and datasets carry ``visibility`` (private / everyone / roles) and ``allowed_roles`` (role ids stored as
``,3,7,`` by ``access.encode_roles``); endpoints carry allowed roles only. Callers name roles (by name or id);
this module resolves them once, inside the caller's transaction, so every service reads and writes sharing the
same way and ``webapp.services.access`` decides from the stored values.

The rule for roles and visibility is strict rather than forgiving: roles name who may see an item whose
visibility is ``roles``, so

* visibility ``roles`` needs at least one role (given now, or already stored when only the visibility is sent);
* roles sent with another visibility are refused (``allowed_roles`` names the problem) — an empty list is
  accepted and means none;
* an item whose visibility is not ``roles`` stores no roles (changing it away from ``roles`` forgets them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlmodel import Session, select

from webapp.db import Database
from webapp.records import AccessRole, Visibility
from webapp.services.access import decode_roles, encode_roles
from webapp.services.errors import InvalidInput
from webapp.services.roles import resolve_roles

FIELD = "allowed_roles"

RoleNames = Sequence[str | int]
"""Roles as a caller names them: names (``"Team"``) or ids."""


def parse_visibility(value: Visibility | str) -> Visibility:
    try:
        return Visibility(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(v.value for v in Visibility)
        raise InvalidInput(f"`visibility` must be one of {choices}, not {value!r}", field="visibility") from None


def role_list(value: Any) -> list[str | int] | None:
    """A caller's roles as a list: None stays None (not given); a comma-separated string is split."""
    if value is None:
        return None
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
            isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise InvalidInput(f"`{FIELD}` must be a list of role names, not {value!r}", field=FIELD)
    return [v.strip() if isinstance(v, str) else v for v in value if not (isinstance(v, str) and not v.strip())]


def encode_named(s: Session, roles: RoleNames, *, field: str = FIELD) -> str:
    """Role names or ids → the stored ``,3,7,`` form; every unknown role is named (``field``)."""
    if not roles:
        return ""
    return encode_roles(r.id for r in resolve_roles(s, list(roles), field=field))


def resolve(
    s: Session, *, visibility: Visibility | str | None, allowed_roles: RoleNames | None,
    current: tuple[Visibility, str] | None = None, default: Visibility = Visibility.PRIVATE,
) -> tuple[Visibility, str]:
    """The (visibility, stored roles) an item gets; ``current`` is what it has now (None: a new item, which gets
    ``default`` when no visibility is sent). See the module's rule."""
    if visibility is not None:
        wanted = parse_visibility(visibility)
    else:
        wanted = current[0] if current is not None else default
    roles = role_list(allowed_roles)
    if wanted != Visibility.ROLES:
        if roles:
            raise InvalidInput(f"`{FIELD}` apply only with visibility 'roles' (visibility is {wanted.value!r}); "
                               "choose visibility 'roles' or send no roles", field=FIELD)
        return wanted, ""
    if roles is not None:
        stored = encode_named(s, roles)
    else:
        stored = current[1] if current is not None and current[0] == Visibility.ROLES else ""
    if not stored:
        raise InvalidInput(f"visibility 'roles' needs at least one role in `{FIELD}`", field=FIELD)
    return wanted, stored


def role_names(db: Database) -> dict[int, str]:
    """Id → name of every role (labels for what a caller already sees; no authorisation)."""
    with db.read() as s:
        return {r.id: r.name for r in s.exec(select(AccessRole))}


def names_of(stored: str | None, names: Mapping[int, str]) -> list[str]:
    """The stored ``,3,7,`` as role names, sorted (a deleted role's id shows as ``#7``)."""
    return sorted(names.get(i, f"#{i}") for i in decode_roles(stored))


def choices(names: Mapping[int, str]) -> list[str]:
    """Role names for a dropdown, sorted."""
    return sorted(names.values(), key=str.lower)

