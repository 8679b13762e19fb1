"""``/api/v1/endpoints``: where jobs can run (list, get), over the jobs engineer's EndpointService.

Items carry the studio's fields plus ESD's names for the same facts (``endpoint_name``,
``endpoint_status``, ``endpoint_type``), so scripts written for the AWS extension read them unchanged.
Backend configuration is shown to administrators only (it may name accounts or hosts).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from webapp.api.deps import CurrentUser
from webapp.records import Endpoint, User


def endpoint_item(endpoint: Endpoint, actor: User) -> dict[str, Any]:
    capabilities = endpoint.capabilities
    item: dict[str, Any] = {
        "name": endpoint.name, "kind": endpoint.kind, "status": str(endpoint.status), "remote": endpoint.remote,
        "is_default": endpoint.is_default, "capabilities": capabilities, "error": endpoint.error,
        "created_at": endpoint.created_at, "updated_at": endpoint.updated_at,
        # ESD vocabulary
        "endpoint_name": endpoint.name, "endpoint_status": str(endpoint.status),
        "endpoint_type": "Async" if endpoint.remote else "Real-time",
        "current_instance_count": capabilities.get("slots"), "startTime": endpoint.created_at,
    }
    if actor.is_admin:
        item["config"] = endpoint.config
    return item


def build_router(endpoints: Any) -> APIRouter:
    """``endpoints`` is the ``EndpointService``."""
    router = APIRouter(prefix="/api/v1/endpoints", tags=["endpoints"])

    @router.get("")
    def list_endpoints(user: CurrentUser) -> dict[str, Any]:
        items = [endpoint_item(e, user) for e in endpoints.list_endpoints(actor=user)]
        return {"endpoints": items, "total": len(items)}

    @router.get("/{name}")
    def get_endpoint(user: CurrentUser, name: str) -> dict[str, Any]:
        return endpoint_item(endpoints.get(actor=user, name=name), user)

    return router
