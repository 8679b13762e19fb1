"""``/api/v1/models``: list/get/update/delete models, previews, refresh, and imports from server and URLs.

Thin over `ModelRegistry` and the import services; authorisation and validation live there. Imports
answer 202 with the import task (poll ``/api/v1/tasks/{id}``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import BaseModel, Field

from webapp.api.deps import CurrentUser
from webapp.records import ModelType, Visibility
from webapp.services.errors import InvalidInput
from webapp.services.models.views import model_view, scan_view, task_view
from webapp.services.models.wiring import ModelServices

MAX_PAGE = 500


ROLES_HELP = ("Role names (or ids) who see the model when `visibility` is `roles`; refused with another "
              "visibility")


class ModelUpdate(BaseModel):
    name: str | None = None
    description: str | None = None
    visibility: Visibility | None = None
    allowed_roles: list[str | int] | None = Field(None, description=ROLES_HELP)
    metadata: dict[str, Any] | None = None


class ServerImportRequest(BaseModel):
    paths: list[str] | str = Field(description="Files or folders on the server (an A1111 models/ folder imports whole)")
    type: ModelType | None = Field(None, description="Declared type; omitted: detected (or from the A1111 folder)")
    in_place: bool = Field(True, description="Reference the files where they are instead of copying them")
    description: str | None = Field(None, description='Plain text or JSON such as {"description": "..."}')
    visibility: Visibility = Visibility.EVERYONE
    allowed_roles: list[str | int] | None = Field(None, description=ROLES_HELP)


class UrlImportRequest(BaseModel):
    urls: list[str] | str = Field(description="URLs, a list or comma-separated")
    type: ModelType
    description: str | None = Field(None, description='Plain text or JSON such as {"description": "..."}')
    visibility: Visibility = Visibility.EVERYONE
    allowed_roles: list[str | int] | None = Field(None, description=ROLES_HELP)


def build_router(services: ModelServices) -> APIRouter:
    registry = services.registry
    router = APIRouter(prefix="/api/v1/models", tags=["models"])

    def view(record: Any, user: Any) -> dict[str, Any]:
        return model_view(record, actor=user, owner_name=registry.owner_names([record]).get(record.owner_id),
                          role_names=registry.role_names())

    @router.get("")
    def list_models(
        user: CurrentUser, type: str | None = None, status: str | None = Query(None, description="Initial/Active/Failed"),
        base: str | None = None, q: str | None = None, limit: int = Query(50, ge=1, le=MAX_PAGE),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        """Models the caller may see (own + shared; admins: all), every status unless `status` is given."""
        wanted = None if status in (None, "", "all") else status
        records = registry.list_models(actor=user, type=type, status=wanted, base=base, query=q, limit=limit,
                                       offset=offset)
        owners, roles = registry.owner_names(records), registry.role_names()
        return {
            "items": [model_view(r, actor=user, owner_name=owners.get(r.owner_id), role_names=roles) for r in records],
            "total": registry.count_models(actor=user, type=type, status=wanted, base=base, query=q),
            "limit": limit, "offset": offset,
        }

    @router.post("/refresh")
    def refresh(user: CurrentUser) -> dict[str, Any]:
        """Rescan the configured models dir (what A1111's refresh-checkpoints does); ``rescanned`` is false when
        a non-administrator's refresh was skipped because one ran moments ago (see ``ModelRegistry.refresh``)."""
        return scan_view(registry.refresh(actor=user), actor=user)

    @router.post("/import/server", status_code=status.HTTP_202_ACCEPTED)
    def import_server(user: CurrentUser, body: ServerImportRequest) -> dict[str, Any]:
        task = services.server.start(actor=user, paths=body.paths, declared_type=body.type, in_place=body.in_place,
                                     description=body.description, visibility=body.visibility,
                                     allowed_roles=body.allowed_roles)
        return task_view(task)

    @router.post("/import/url", status_code=status.HTTP_202_ACCEPTED)
    def import_url(user: CurrentUser, body: UrlImportRequest) -> dict[str, Any]:
        task = services.urls.start(actor=user, urls=body.urls, declared_type=body.type, description=body.description,
                                   visibility=body.visibility, allowed_roles=body.allowed_roles)
        return task_view(task)

    @router.get("/{model_id}")
    def get_model(user: CurrentUser, model_id: str) -> dict[str, Any]:
        return view(registry.get(actor=user, model_id=model_id), user)

    @router.patch("/{model_id}")
    def update_model(user: CurrentUser, model_id: str, body: ModelUpdate) -> dict[str, Any]:
        record = registry.update(actor=user, model_id=model_id, name=body.name, description=body.description,
                                 visibility=body.visibility, metadata=body.metadata,
                                 allowed_roles=body.allowed_roles)
        return view(record, user)

    @router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT)
    def delete_model(user: CurrentUser, model_id: str) -> Response:
        registry.delete(actor=user, model_id=model_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.get("/{model_id}/preview")
    def get_preview(user: CurrentUser, model_id: str) -> Response:
        found = registry.preview(actor=user, model_id=model_id)
        if found is None:
            return Response(status_code=status.HTTP_404_NOT_FOUND)
        data, content_type = found
        return Response(data, media_type=content_type, headers={"cache-control": "private, max-age=60"})

    @router.put("/{model_id}/preview")
    async def set_preview(user: CurrentUser, model_id: str, request: Request) -> dict[str, Any]:
        """The request body is the image (PNG, JPEG, WebP or GIF; at most 10 MB)."""
        from starlette.concurrency import run_in_threadpool

        from webapp.services.models.registry import MAX_PREVIEW_BYTES

        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_PREVIEW_BYTES:
                raise InvalidInput(f"the preview image is larger than {MAX_PREVIEW_BYTES} bytes", field="image")
        record = await run_in_threadpool(registry.set_preview, actor=user, model_id=model_id, data=bytes(data))
        return await run_in_threadpool(view, record, user)

    @router.delete("/{model_id}/preview", status_code=status.HTTP_204_NO_CONTENT)
    def clear_preview(user: CurrentUser, model_id: str) -> Response:
        registry.clear_preview(actor=user, model_id=model_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router
