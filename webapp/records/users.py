"""Users, their login sessions and the failed-login counters."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Index
from sqlmodel import Field, SQLModel

from webapp.records.common import utcnow


class Role(StrEnum):
    ADMIN = "admin"
    USER = "user"


class UserBase(SQLModel):
    username: str = Field(index=True, unique=True, max_length=64)
    role: Role = Field(default=Role.USER)


class User(UserBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    password_hash: str
    created_at: datetime = Field(default_factory=utcnow)
    password_changed_at: datetime = Field(default_factory=utcnow)

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN


class UserPublic(UserBase):
    id: int
    created_at: datetime


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
