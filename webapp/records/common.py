"""Helpers shared by table definitions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime


def utcnow() -> datetime:
    """Timezone-aware UTC now (SQLModel stores aware datetimes and refuses naive ones)."""
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex
