"""``/api/v1/endpoints``: where jobs can run (list, get) for everyone; deploy and delete for administrators.

Items carry the studio's fields plus ESD's names for the same facts (``endpoint_name``,
``endpoint_status``, ``endpoint_type``, ``min/max_instance_number``, ``autoscaling``), and ``POST`` accepts
ESD's request names as aliases (``endpoint_name``, ``min/max_instance_number``, ``autoscaling_enabled``;
``instance_type``, ``initial_instance_count`` and ``endpoint_type`` go into the options of a kind that has
such an option), so scripts written for the AWS extension work unchanged. Backend configuration is shown to
administrators only (it may name accounts or hosts), with secret options masked: they are write-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Body
from pydantic import BaseModel, Field

from deploy.backends.options import options_model
from webapp.api.deps import CurrentUser
from webapp.records import Endpoint, User
from webapp.services.access import can
from webapp.services.errors import InvalidInput
from webapp.services.jobs.endpoint_admin import Deployment, EndpointAdmin, shown_config
from webapp.services.sharing import names_of, role_list

FIELDS = ("name", "kind", "options", "min_instances", "max_instances", "autoscale", "allowed_roles")
ESD_ALIASES = {"endpoint_name": "name", "min_instance_number": "min_instances", "max_instance_number": "max_instances",
               "autoscaling_enabled": "autoscale"}
ESD_OPTIONS = ("instance_type", "initial_instance_count", "endpoint_type")
"""ESD fields that are options of cloud kinds; accepted where the kind's options model has a field so named."""


class AllowedRoles(BaseModel):
    allowed_roles: list[str | int] = Field(description="Role names (or ids); empty: every holder of endpoint:use")


def endpoint_item(endpoint: Endpoint, actor: User, role_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """``allowed_roles``: role names (``role_names``: id → name); empty: open to every holder of endpoint:use."""
    capabilities = endpoint.capabilities
    item: dict[str, Any] = {
        "name": endpoint.name, "kind": endpoint.kind, "status": str(endpoint.status), "remote": endpoint.remote,
        "is_default": endpoint.is_default, "capabilities": capabilities, "error": endpoint.error,
        "min_instances": endpoint.min_instances, "max_instances": endpoint.max_instances,
        "autoscale": endpoint.autoscale, "allowed_roles": names_of(endpoint.allowed_roles, role_names or {}),
        "created_at": endpoint.created_at, "updated_at": endpoint.updated_at,
        # ESD vocabulary
        "endpoint_name": endpoint.name, "endpoint_status": str(endpoint.status),
        "endpoint_type": "Async" if endpoint.remote else "Real-time",
        "current_instance_count": capabilities.get("slots"), "startTime": endpoint.created_at,
        "min_instance_number": endpoint.min_instances, "max_instance_number": endpoint.max_instances,
        "autoscaling": endpoint.autoscale,
    }
    if can(actor, "endpoint:update"):
        item["config"] = shown_config(endpoint)
    return item


def deployment_from_body(body: Any) -> Deployment:
    """The request body (studio or ESD names) as a ``Deployment``; unknown fields are 422 naming them."""
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", field="body")
    values: dict[str, Any] = {}
    for key, value in body.items():
        if key in ESD_OPTIONS:
            continue
        target = key if key in FIELDS else ESD_ALIASES.get(key)
        if target is None:
            raise InvalidInput(f"unknown field `{key}`; known: {', '.join((*FIELDS, *ESD_ALIASES, *ESD_OPTIONS))}",
                               field=key)
        if target in values:
            raise InvalidInput(f"`{key}` repeats `{target}`; send one of them", field=key)
        values[target] = value
    options = values.get("options", {})
    kind = values.get("kind")
    model = options_model(kind) if isinstance(kind, str) else None
    for key in (k for k in ESD_OPTIONS if k in body):
        if model is None or key not in model.model_fields or not isinstance(options, dict):
            raise InvalidInput(f"`{key}` does not apply to endpoints of kind {kind!r}", field=key)
        options = {key: body[key], **options}
    return Deployment(kind=kind, options=options, name=values.get("name"),  # type: ignore[arg-type]
                      min_instances=values.get("min_instances", 1), max_instances=values.get("max_instances", 1),
                      autoscale=values.get("autoscale"), allowed_roles=tuple(role_list(values.get("allowed_roles")) or ()))


def build_router(endpoints: Any, admin: EndpointAdmin) -> APIRouter:
    """``endpoints`` is the ``EndpointService``; ``admin`` deploys and deletes."""
    router = APIRouter(prefix="/api/v1/endpoints", tags=["endpoints"])

    @router.get("")
    def list_endpoints(user: CurrentUser) -> dict[str, Any]:
        names = endpoints.role_names()
        items = [endpoint_item(e, user, names) for e in endpoints.list_endpoints(actor=user)]
        return {"endpoints": items, "total": len(items)}

    @router.post("", status_code=201)
    def deploy(user: CurrentUser, body: Any = Body(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        """Deploy an endpoint (administrators). Body: ``kind``, ``options`` (the kind's own), optional ``name``
        (default ``studio-<kind>-<6 hex>``; SageMaker: ``studio-async-…`` / ``studio-rt-…``), ``min_instances``,
        ``max_instances``, ``autoscale`` (default: on for SageMaker, off otherwise), ``allowed_roles`` (role names
        whose users may see and use it; default: every holder of endpoint:use)."""
        return endpoint_item(admin.deploy(actor=user, request=deployment_from_body(body)), user, endpoints.role_names())

    @router.delete("")
    def delete_listed(user: CurrentUser, body: Any = Body(...)) -> dict[str, Any]:  # noqa: B008
        """ESD's form: ``{"endpoint_name_list": [...]}``; all are checked before any is deleted."""
        names = body.get("endpoint_name_list") if isinstance(body, dict) else None
        if not isinstance(names, list):
            raise InvalidInput("send {\"endpoint_name_list\": [names]}", field="endpoint_name_list")
        moved = admin.delete_many(actor=user, names=names, force=body.get("force", False))
        return {"deleted": names, "moved_jobs": moved}

    @router.get("/{name}")
    def get_endpoint(user: CurrentUser, name: str) -> dict[str, Any]:
        return endpoint_item(endpoints.get(actor=user, name=name), user, endpoints.role_names())

    @router.put("/{name}/allowed_roles")
    def set_allowed_roles(user: CurrentUser, name: str, body: AllowedRoles) -> dict[str, Any]:
        """Who may see and use the endpoint (``endpoint:update``): users holding one of ``allowed_roles`` (names);
        an empty list opens it to every holder of endpoint:use. Each change is written to the audit log."""
        endpoint = endpoints.set_allowed_roles(actor=user, name=name, roles=body.allowed_roles)
        return endpoint_item(endpoint, user, endpoints.role_names())

    @router.delete("/{name}")
    def delete(user: CurrentUser, name: str, force: bool = False) -> dict[str, Any]:
        """Delete an endpoint (administrators): running jobs are requeued, queued ones move to the default. A
        SageMaker endpoint is deleted there too (endpoint, config, model, scaling); while jobs run on it the delete
        is refused (409 naming ``force``) unless ``?force=true``."""
        return {"deleted": name, "moved_jobs": admin.delete(actor=user, name=name, force=force)}

    return router
