"""Users, their login sessions and the failed-login counters."""

from __future__ import annotations

import functools
import json
from datetime import datetime

from sqlalchemy import Column, Index, Text
from sqlmodel import Field, SQLModel

from webapp.records.common import utcnow


@functools.lru_cache(maxsize=4096)
def _parsed(text: str) -> frozenset:
    """A mirrored JSON list as a set (a few distinct values: one per combination of roles)."""
    return frozenset(json.loads(text))


class UserBase(SQLModel):
    username: str = Field(index=True, unique=True, max_length=64)


class User(UserBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    password_hash: str
    created_at: datetime = Field(default_factory=utcnow)
    password_changed_at: datetime = Field(default_factory=utcnow)
    language: str | None = Field(default=None, max_length=16)
    """The UI language the user chose (``en``, ``zh-CN``, ``ja``); None follows the browser's."""
    role_ids_json: str = Field(default="[]", sa_column=Column(Text, nullable=False, server_default="[]"))
    permissions_json: str = Field(default="[]", sa_column=Column(Text, nullable=False, server_default="[]"))
    """The user's roles and the union of their permissions, kept by ``RoleService`` in the transaction that
    changes either (the truth is ``access_role_member`` + ``access_role``): any loaded row can be authorised
    without another query. A scoped API token's request gets a copy narrowed to the token's scopes."""

    @property
    def role_ids(self) -> frozenset[int]:
        return _parsed(self.role_ids_json or "[]")

    @property
    def permissions(self) -> frozenset[str]:
        return _parsed(self.permissions_json or "[]")

    @property
    def is_admin(self) -> bool:
        """Holds every permission (the seeded Admin role): server-wide settings, metrics, server paths."""
        from webapp.services.access import ALL_PERMISSIONS  # the permission vocabulary lives with the rules
        return self.permissions >= ALL_PERMISSIONS

    def narrowed(self, scopes: frozenset[str]) -> User:
        """A detached copy holding only the permissions also in ``scopes`` (a scoped API token's request)."""
        from webapp.services.access import expand
        copy = User.model_validate(self.model_dump())
        copy.permissions_json = json.dumps(sorted(self.permissions & expand(scopes)))
        return copy


class UserPublic(UserBase):
    id: int
    created_at: datetime
    language: str | None = None
    roles: list[str] = []


class LoginSession(SQLModel, table=True):
    """A browser login. Only the sha256 of the cookie token is stored, so a database leak is not a login."""

    __tablename__ = "login_session"

    token_hash: str = Field(primary_key=True, max_length=64)
    user_id: int = Field(foreign_key="user.id", index=True, ondelete="CASCADE")
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime = Field(index=True)
    last_seen_at: datetime = Field(default_factory=utcnow)
    client_address: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=256)


class LoginAttempt(SQLModel, table=True):
    """One counted login attempt under one throttle key (``webapp.services.throttle``), kept in the database
    so every studio instance on it counts the same failures. ``key_hash`` is the sha256 of the key: rows
    hold no user name or address, and a 10 kB user name costs what a short one does."""

    __tablename__ = "login_attempt"
    __table_args__ = (Index("ix_login_attempt_key_hash_at", "key_hash", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    key_hash: str = Field(max_length=64)
    at: float = Field(index=True)
    """Seconds on the throttle's clock (wall-clock time: shared by every instance)."""
