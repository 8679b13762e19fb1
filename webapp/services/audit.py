"""The audit log: every administrative and permission change, written in the transaction that makes it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from webapp.db import Database
from webapp.records import AuditEvent, User
from webapp.services.access import authorize

MAX_PAGE = 500


def record(s: Session, actor: User | None, action: str, target: str = "", **detail: Any) -> None:
    """Add one event inside the caller's write transaction (so it lands exactly when the change does)."""
    s.add(AuditEvent(actor_id=actor.id if actor is not None else None,
                     actor_name=actor.username if actor is not None else "(system)", action=action,
                     target=target[:256], detail_json=json.dumps(detail, default=str, sort_keys=True)))


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    """A user name, exact."""
    action: str | None = None
    """An action (``user.create``) or an area (``user``: every ``user.*``)."""
    since: datetime | None = None
    until: datetime | None = None
    target: str | None = None
    """A substring of the target."""


class AuditLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    def list_events(self, *, actor: User, where: AuditFilter = AuditFilter(), limit: int = 100,
                    offset: int = 0) -> list[AuditEvent]:
        """Newest first; administrators (``user:all``) only."""
        authorize(actor, "user:all")
        limit = max(1, min(int(limit), MAX_PAGE))
        query = select(AuditEvent)
        if where.actor:
            query = query.where(AuditEvent.actor_name == where.actor)
        if where.action:
            query = query.where(col(AuditEvent.action) == where.action if "." in where.action
                                else col(AuditEvent.action).startswith(where.action + "."))
        if where.since is not None:
            query = query.where(AuditEvent.at >= where.since)
        if where.until is not None:
            query = query.where(AuditEvent.at < where.until)
        if where.target:
            query = query.where(col(AuditEvent.target).contains(where.target.replace("\x00", "")))
        with self._db.read() as s:
            return list(s.exec(query.order_by(col(AuditEvent.at).desc(), col(AuditEvent.id).desc())
                               .offset(max(0, int(offset))).limit(limit)))


def write(db: Database, actor: User | None, action: str, target: str = "", **detail: Any) -> None:
    """``record`` in a transaction of its own, for changes made through another service's transactions."""
    with db.write() as s:
        record(s, actor, action, target, **detail)
