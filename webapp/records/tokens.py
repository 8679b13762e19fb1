"""Per-user API tokens for scripts and editors (``Authorization: Bearer <token>``).

Only the sha256 of a token is stored: tokens are 256-bit random strings, so a plain fast hash is
enough (no password stretching needed) and a database leak does not hand out API access. The short
``prefix`` is kept so users can tell their tokens apart in the Account tab.
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from webapp.records.common import new_id, utcnow


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_token"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    user_id: int = Field(foreign_key="user.id", index=True, ondelete="CASCADE")
    name: str = Field(max_length=64)
    token_hash: str = Field(index=True, unique=True, max_length=64)
    prefix: str = Field(max_length=16)
    """The first characters of the token, shown in lists (``stk_AbCd…``)."""
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    expires_at: datetime | None = None
    """After this the token is refused; None: until revoked."""
    scopes_json: str | None = Field(default=None, sa_column=Column(Text))
    """A JSON list of permissions the token is limited to (within its owner's, checked per request); None: the
    owner's permissions."""

    @property
    def active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > utcnow())

    @property
    def scopes(self) -> list[str] | None:
        return None if self.scopes_json is None else list(json.loads(self.scopes_json))


class ApiTokenPublic(SQLModel):
    """What lists show: never the hash."""

    id: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    expires_at: datetime | None = None
    scopes: list[str] | None = None
