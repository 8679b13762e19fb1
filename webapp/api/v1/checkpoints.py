"""``/api/v1/checkpoints``: ESD's name for models, over the same ModelRegistry as the Models tab.

ESD calls every model file a "checkpoint" and types them by A1111 folder (Stable-diffusion, Lora,
VAE, ControlNet, embeddings, hypernetworks); statuses are Initial / Active / Failed here (ESD's
Disabled has no equivalent). Lists page with ``page``/``per_page``; answers use ESD's envelope.
Uploads and URL imports go through ``/api/v1/models`` (the registry's import paths).
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Body
from pydantic import BaseModel

from webapp.api.deps import CurrentUser
from webapp.api.v1.inferences import envelope
from webapp.records import ModelRecord, ModelType, User
from webapp.services.errors import InvalidInput, NotFound
from webapp.services.models.catalog import require_manage

_BY_FOLDER = {t.a1111_folder.lower(): t for t in ModelType}


class CheckpointRename(BaseModel):
    name: str


class CheckpointDelete(BaseModel):
    checkpoint_id_list: list[str]


def parse_types(types: str | None) -> list[ModelType]:
    """ESD folder names (``Stable-diffusion,Lora``) or studio type names, comma-separated."""
    if not types:
        return []
    found: list[ModelType] = []
    for part in (p.strip() for p in types.split(",") if p.strip()):
        model_type = _BY_FOLDER.get(part.lower())
        if model_type is None:
            try:
                model_type = ModelType(part.lower())
            except ValueError:
                choices = ", ".join(t.a1111_folder for t in ModelType)
                raise InvalidInput(f"`types` entry {part!r} is not one of {choices}", field="types") from None
        found.append(model_type)
    return found


def checkpoint_item(record: ModelRecord, actor: User) -> dict[str, Any]:
    """ESD's item; the server path of an in-place model is for administrators only (like model_view)."""
    return {
        "id": record.id, "type": ModelType(record.type).a1111_folder, "status": str(record.status),
        "name": [record.file_name or record.name], "studio_name": record.name,
        "s3Location": record.store_key or (record.local_path if actor.is_admin else None),
        "created": record.created_at.isoformat(),
        "allowed_roles_or_users": ["*"] if str(record.visibility) == "everyone" else [],
        "params": {"sha256": record.sha256, "autov2": record.autov2, "base": record.base, "size": record.size,
                   "message": record.description, "failure_reason": record.failure_reason},
    }


def build_router(registry: Any) -> APIRouter:
    """``registry`` is the ``ModelRegistry``."""
    router = APIRouter(prefix="/api/v1/checkpoints", tags=["checkpoints (ESD names)"])

    @router.get("")
    def list_checkpoints(user: CurrentUser, page: int = 1, per_page: int = 50, types: str | None = None,
                         status: str | None = None) -> dict[str, Any]:
        if page < 1:
            raise InvalidInput("`page` must be >= 1", field="page")
        if not 1 <= per_page <= 1000:
            raise InvalidInput("`per_page` must be between 1 and 1000", field="per_page")
        wanted = parse_types(types)
        records: list[ModelRecord] = []
        for model_type in wanted or [None]:
            records += registry.list_models(actor=user, type=model_type, status=status or None)
        total = len(records)
        chosen = records[(page - 1) * per_page: page * per_page]
        return envelope({"page": page, "per_page": per_page, "pages": max(1, math.ceil(total / per_page)),
                         "total": total, "checkpoints": [checkpoint_item(r, user) for r in chosen]})

    @router.get("/{checkpoint_id}")
    def get_checkpoint(user: CurrentUser, checkpoint_id: str) -> dict[str, Any]:
        return envelope(checkpoint_item(registry.get(actor=user, model_id=checkpoint_id), user))

    @router.put("/{checkpoint_id}")
    def rename_checkpoint(user: CurrentUser, checkpoint_id: str, body: CheckpointRename) -> dict[str, Any]:
        """ESD's rename (owners and administrators)."""
        record = registry.update(actor=user, model_id=checkpoint_id, name=body.name)
        return envelope(checkpoint_item(record, user), "checkpoint renamed")

    @router.delete("")
    def delete_checkpoints(user: CurrentUser, body: CheckpointDelete = Body(...)) -> dict[str, Any]:  # noqa: B008
        """Delete models and their files; an unknown id refuses the whole request."""
        if not body.checkpoint_id_list:
            raise InvalidInput("`checkpoint_id_list` must name at least one checkpoint", field="checkpoint_id_list")
        missing, found = [], []
        for model_id in body.checkpoint_id_list:
            try:
                found.append(registry.get(actor=user, model_id=model_id))
            except NotFound:
                missing.append(model_id)
        if missing:
            raise NotFound(f"no checkpoint {', '.join(map(repr, missing))}", field="checkpoint_id_list")
        for record in found:  # every one may be deleted by the caller, or none is
            require_manage(user, record, "delete")
        for model_id in body.checkpoint_id_list:
            registry.delete(actor=user, model_id=model_id)
        return envelope({"deleted": body.checkpoint_id_list}, "checkpoints deleted")

    return router
