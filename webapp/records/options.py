"""A1111 options (``/sdapi/v1/options``) persisted per server and per user.

A1111 has one global options dict; the studio is multi-user, so an administrator's POST sets the
server defaults and anyone else's POST sets only their own values, layered on top. Values are JSON
so one table holds strings, numbers, booleans and lists alike.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from webapp.records.common import utcnow


class ServerOption(SQLModel, table=True):
    __tablename__ = "server_option"

    key: str = Field(primary_key=True, max_length=128)
    value_json: str
    updated_at: datetime = Field(default_factory=utcnow)


class UserOption(SQLModel, table=True):
    __tablename__ = "user_option"

    user_id: int = Field(foreign_key="user.id", primary_key=True, ondelete="CASCADE")
    key: str = Field(primary_key=True, max_length=128)
    value_json: str
    updated_at: datetime = Field(default_factory=utcnow)
