"""Endpoints: the configured backends jobs can be sent to, as database records.

The ``local`` endpoint is (re)written at every start from the settings; later work (self-hosted
workers, SageMaker real-time/async) adds rows through the same service and the dispatcher runs one
loop per endpoint. Every signed-in user may list endpoints (to choose where to generate); changing
them is for administrators.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from sqlmodel import select

from webapp.db import Database
from webapp.records import Endpoint, EndpointStatus, User, utcnow
from webapp.services import audit
from webapp.services.access import authorize, can
from webapp.services.errors import Conflict, NotFound

log = logging.getLogger(__name__)

CACHE_SECONDS = 2.0
"""Every submit reads the endpoints; they change rarely, so a short-lived copy serves (changes made in
this process are seen at once, changes by another process within this many seconds; the Fleet's poll reads
them afresh)."""


class EndpointService:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Endpoint]] | None = None
        self._generation = 0  # moves at every write here: a read that began before it is not cached

    def _rows(self, *, fresh: bool = False) -> list[Endpoint]:
        """All endpoints, default first, then by name (``fresh``: read now, whatever the cache holds)."""
        with self._lock:
            if not fresh and self._cached is not None and time.monotonic() - self._cached[0] < CACHE_SECONDS:
                return self._cached[1]
            generation = self._generation
        with self._db.read() as s:
            rows = list(s.exec(select(Endpoint).order_by(Endpoint.is_default.desc(), Endpoint.name)).all())  # type: ignore[attr-defined]
        with self._lock:
            if generation == self._generation:  # else a write here overtook this read: it must not be cached
                self._cached = (time.monotonic(), rows)
        return rows

    def _invalidate(self) -> None:
        with self._lock:
            self._cached = None
            self._generation += 1

    # -- reads (any signed-in user) -------------------------------------------------------------------
    def list_endpoints(self, *, actor: User) -> list[Endpoint]:
        """The endpoints ``actor`` may see (``endpoint:list``; an endpoint naming allowed roles: those roles)."""
        authorize(actor, "endpoint:list")
        return [e for e in self._rows() if can(actor, "endpoint:list", e)]

    def get(self, *, actor: User, name: str) -> Endpoint:
        authorize(actor, "endpoint:list")
        endpoint = self.find(name)
        if endpoint is None or not can(actor, "endpoint:list", endpoint):
            raise NotFound(f"no endpoint named {name!r}; available: {', '.join(self.names()) or '(none)'}",
                           field="endpoint")
        return endpoint

    def stored(self, *, fresh: bool = False) -> list[Endpoint]:
        """Every endpoint (for the server's own bookkeeping; users go through ``list_endpoints``); ``fresh``:
        read from the database now (what other instances changed in the last ``CACHE_SECONDS`` included)."""
        return list(self._rows(fresh=fresh))

    def find(self, name: str) -> Endpoint | None:
        """The endpoint named ``name`` or None (for the server's own bookkeeping; users go through ``get``)."""
        return next((e for e in self._rows() if e.name == name), None)

    def names(self) -> list[str]:
        return sorted(e.name for e in self._rows())

    def default_name(self) -> str | None:
        rows = self._rows()
        return rows[0].name if rows else None

    def resolve(self, *, actor: User, name: str | None) -> Endpoint:
        """The endpoint a new job goes to: the named one, or the default; it must be in service (a
        ``Degraded`` one accepts jobs too: they wait until it is healthy again)."""
        if not name:
            name = self.default_name()
            if name is None:
                raise Conflict("no endpoint is configured to run jobs", field="endpoint")
        authorize(actor, "endpoint:use")  # running jobs on it, not listing it (a scoped API token may hold only this)
        endpoint = self.find(name)
        if endpoint is None or not can(actor, "endpoint:use", endpoint):
            raise NotFound(f"no endpoint named {name!r}; available: {', '.join(self.names()) or '(none)'}",
                           field="endpoint")
        if endpoint.status not in (EndpointStatus.IN_SERVICE, EndpointStatus.DEGRADED):
            detail = f": {endpoint.error}" if endpoint.error else ""
            raise Conflict(f"endpoint {name!r} is {endpoint.status}, not InService{detail}", field="endpoint")
        return endpoint

    # -- writes (start-up and administrators) -----------------------------------------------------------------
    def ensure(self, *, name: str, kind: str, remote: bool, capabilities: Mapping[str, Any],
               config: Mapping[str, Any] | None, is_default: bool, status: EndpointStatus,
               error: str | None = None) -> Endpoint:
        """Create or refresh an endpoint record from configuration (``config`` None: keep the stored one)."""
        with self._db.write() as s:
            endpoint = s.get(Endpoint, name) or Endpoint(name=name, kind=kind)
            endpoint.kind, endpoint.remote, endpoint.status, endpoint.error = kind, remote, status, error
            endpoint.capabilities_json = json.dumps(dict(capabilities))
            if config is not None:
                endpoint.config_json = json.dumps(dict(config), default=str)
            endpoint.updated_at = utcnow()
            if is_default:
                for other in s.exec(select(Endpoint).where(Endpoint.is_default, Endpoint.name != name)).all():
                    other.is_default = False
                    s.add(other)
            endpoint.is_default = is_default
            s.add(endpoint)
        self._invalidate()
        return endpoint

    def add(self, endpoint: Endpoint) -> None:
        """Record a new endpoint; ``Conflict`` naming ``name`` when one by that name exists."""
        with self._db.write() as s:
            if s.get(Endpoint, endpoint.name) is not None:
                raise Conflict(f"an endpoint named {endpoint.name!r} already exists", field="name")
            s.add(endpoint)
        self._invalidate()

    def remove(self, name: str) -> None:
        with self._db.write() as s:
            endpoint = s.get(Endpoint, name)
            if endpoint is not None:
                s.delete(endpoint)
        self._invalidate()

    def set_status(self, name: str, status: EndpointStatus, error: str | None = None) -> None:
        with self._db.write() as s:
            endpoint = s.get(Endpoint, name)
            if endpoint is None:
                return
            endpoint.status, endpoint.error, endpoint.updated_at = status, error, utcnow()
            s.add(endpoint)
        self._invalidate()

    def set_capabilities(self, name: str, capabilities: Mapping[str, Any]) -> None:
        """Record what the endpoint's backend reports it can do (a remote worker's own samplers ...)."""
        with self._db.write() as s:
            endpoint = s.get(Endpoint, name)
            if endpoint is None:
                return
            endpoint.capabilities_json = json.dumps(dict(capabilities))
            s.add(endpoint)
        self._invalidate()

    def audit(self, actor: User, action: str, target: str, **detail: Any) -> None:
        """One audit-log event for an endpoint change made here or by ``EndpointAdmin``."""
        audit.write(self._db, actor, action, target, **detail)

    def set_status_as(self, *, actor: User, name: str, status: EndpointStatus) -> Endpoint:
        """An operator (``endpoint:update``) takes an endpoint out of service (Stopped) or back (InService)."""
        authorize(actor, "endpoint:update")
        self.get(actor=actor, name=name)
        self.set_status(name, status)
        log.info("endpoint %s set to %s by %s", name, status, actor.username)
        self.audit(actor, "endpoint.status", name, status=str(status))
        return self.get(actor=actor, name=name)
