"""Roles (named sets of ``resource:action`` permissions with quotas), who holds them, and the audit log."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from webapp.records.common import utcnow


class AccessRole(SQLModel, table=True):
    """A role. ``permissions_json`` is a sorted JSON list of ``resource:action`` strings
    (``webapp.services.access``). Quota columns: NULL is "no limit from this role"; a user gets the most
    generous value among their roles."""

    __tablename__ = "access_role"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True, index=True)
    description: str = Field(default="", max_length=256)
    builtin: str | None = Field(default=None, max_length=32)
    """The seeded role this row started as (``admin``, ``designer``, ``it_operator``); editable all the same."""
    permissions_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    max_queued_jobs: int | None = None
    max_jobs_per_day: int | None = None
    max_gpu_seconds_per_day: int | None = None
    max_storage_mb: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class RoleMember(SQLModel, table=True):
    """User ↔ role. The user row mirrors its roles and effective permissions (``User.role_ids_json``,
    ``User.permissions_json``), rewritten in the same transaction as any change here or to a role."""

    __tablename__ = "access_role_member"

    user_id: int = Field(foreign_key="user.id", primary_key=True, ondelete="CASCADE")
    role_id: int = Field(foreign_key="access_role.id", primary_key=True, index=True, ondelete="CASCADE")


class AuditEvent(SQLModel, table=True):
    """One administrative or permission change: who, what, when. Names are copied, not referenced, so the
    log outlives the users and roles it speaks of."""

    __tablename__ = "audit_event"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    actor_id: int | None = Field(default=None, index=True)
    actor_name: str = Field(max_length=64)
    action: str = Field(max_length=64, index=True)
    """``<area>.<verb>``: ``user.create``, ``role.update``, ``endpoint.delete``, ``token.create`` …"""
    target: str = Field(default="", max_length=256)
    detail_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
