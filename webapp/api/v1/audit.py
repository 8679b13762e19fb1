"""``GET /api/v1/audit``: the audit log of administrative and permission changes (who, what, when), for
administrators (``user:all``), filtered as ``AuditLog.list_events`` filters it.

Dates are ISO 8601 (``2024-05-01`` or ``2024-05-01T12:00:00Z``); one without a time zone is UTC. A bad one
is a 422 naming the parameter.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from webapp.api.deps import CurrentUser
from webapp.records import AuditEvent
from webapp.services.audit import MAX_PAGE, AuditFilter, AuditLog
from webapp.services.errors import InvalidInput


class AuditEventPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    actor_id: int | None
    action: str
    target: str
    detail: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditEventPublic]
    limit: int
    offset: int


def parse_when(value: str | None, field: str) -> datetime | None:
    """An ISO date or date-time (naive: UTC), or None when empty."""
    if value is None or not value.strip():
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput(f"`{field}` must be an ISO date or date-time (2024-05-01 or 2024-05-01T12:00:00Z), "
                           f"not {value[:64]!r}", field=field) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def event_public(event: AuditEvent) -> AuditEventPublic:
    try:
        detail = json.loads(event.detail_json or "{}")
    except ValueError:
        detail = {"raw": event.detail_json}
    return AuditEventPublic(id=event.id, at=event.at, actor=event.actor_name, actor_id=event.actor_id,
                            action=event.action, target=event.target,
                            detail=detail if isinstance(detail, dict) else {"value": detail})


def build_router(audit: AuditLog) -> APIRouter:
    router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

    @router.get("")
    def list_events(
        user: CurrentUser,
        actor: str | None = Query(None, description="A user name, exact"),
        action: str | None = Query(None, description="An action (`user.create`) or an area (`user`: every user.*)"),
        target: str | None = Query(None, description="A substring of the target"),
        since: str | None = Query(None, description="From this date-time on (ISO 8601; no zone: UTC)"),
        until: str | None = Query(None, description="Before this date-time (ISO 8601; no zone: UTC)"),
        limit: int = Query(100, ge=1, le=MAX_PAGE),
        offset: int = Query(0, ge=0),
    ) -> AuditPage:
        """Newest first (administrators: ``user:all``)."""
        start, end = parse_when(since, "since"), parse_when(until, "until")
        if start is not None and end is not None and end <= start:
            raise InvalidInput("`until` must be after `since`", field="until")
        where = AuditFilter(actor=actor or None, action=action or None, target=target or None, since=start,
                            until=end)
        events = audit.list_events(actor=user, where=where, limit=limit, offset=offset)
        return AuditPage(items=[event_public(e) for e in events], limit=limit, offset=offset)

    return router
