"""JSON-able views of models, import tasks and uploads, shared by /api/v1 and the Models tab.

Views decide what a caller may read: server paths (``local_path``, server ``source_detail``) and
asset-store keys are shown to administrators only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from webapp.records import ImportTask, ModelRecord, UploadSession, User
from webapp.services.access import can
from webapp.services.models.scan import ScanSummary
from webapp.services.sharing import names_of


def model_view(record: ModelRecord, *, actor: User, owner_name: str | None = None,
               role_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """``allowed_roles``: role names (``role_names``: id → name, as ``ModelRegistry.role_names`` gives)."""
    try:
        metadata = json.loads(record.metadata_json) if record.metadata_json else {}
    except json.JSONDecodeError:
        metadata = {}
    view: dict[str, Any] = {
        "id": record.id, "name": record.name, "title": record.title, "type": record.type.value,
        "base": record.base, "status": record.status.value, "failure_reason": record.failure_reason,
        "size": record.size, "sha256": record.sha256, "autov2": record.autov2, "legacy_hash": record.legacy_hash,
        "lora_hash": record.lora_hash, "source_sha256": record.source_sha256, "file_format": record.file_format,
        "file_name": record.file_name, "source": record.source, "in_place": record.local_path is not None,
        "owner": owner_name, "visibility": record.visibility.value,
        "allowed_roles": names_of(record.allowed_roles, role_names or {}), "description": record.description,
        "metadata": metadata, "has_preview": record.preview_key is not None,
        "created_at": record.created_at.isoformat(), "updated_at": record.updated_at.isoformat(),
    }
    if record.source == "url":
        view["source_detail"] = record.source_detail  # stored redacted
    if can(actor, "model:all"):
        view["local_path"] = record.local_path
        view["store_key"] = record.store_key
        view["source_detail"] = record.source_detail
    return view


DETAIL_KEYS = ("id", "name", "title", "sha256", "autov2", "legacy_hash", "lora_hash", "source_sha256", "file_name",
               "file_format", "size", "source", "source_detail", "in_place", "local_path", "store_key",
               "created_at", "updated_at")


def model_details(record: ModelRecord, *, actor: User) -> dict[str, Any]:
    """The Models tab's details panel: identity, hashes and origin (paths as `model_view` allows), no metadata."""
    view = model_view(record, actor=actor)
    return {key: view[key] for key in DETAIL_KEYS if view.get(key) is not None}


def scan_view(summary: ScanSummary | None, *, actor: User) -> dict[str, Any]:
    """A refresh's answer; the folder and the paths of files that are not models: administrators only."""
    if summary is None:
        return {"rescanned": False}
    view = {"rescanned": True, **summary.to_dict(), "not_models": len(summary.errors)}
    if not can(actor, "model:all"):
        del view["folder"], view["errors"]
    return view


def task_view(task: ImportTask) -> dict[str, Any]:
    items = json.loads(task.items_json or "[]")
    for item in items:
        item.pop("reserved_id", None)
    return {
        "id": task.id, "kind": task.kind.value, "status": task.status.value, "finished": task.status.finished,
        "progress": round(task.progress, 4), "message": task.message, "items": items,
        "created_at": task.created_at.isoformat(),
        "started_at": task.started_at.isoformat() if task.started_at else None,
        "finished_at": task.finished_at.isoformat() if task.finished_at else None,
    }


def upload_view(session: UploadSession, *, chunk_size: int) -> dict[str, Any]:
    return {
        "id": session.id, "file_name": session.file_name, "size": session.size, "received": session.received,
        "type": session.type.value, "status": session.status.value, "task_id": session.task_id,
        "model_id": session.model_id, "chunk_size": chunk_size,
        "created_at": session.created_at.isoformat(), "updated_at": session.updated_at.isoformat(),
    }


def item_line(item: dict[str, Any]) -> str:
    """One human line per file, as the Models tab shows it under the upload buttons."""
    name = item.get("model_name") or item.get("file_name") or item.get("source") or "?"
    state = item.get("state", "waiting")
    if state in ("hashing", "storing", "downloading", "converting", "uploading") and item.get("total"):
        pct = 100 * (item.get("done") or 0) / item["total"]
        return f"{name}: {state} {pct:.0f}%"
    message = item.get("message")
    return f"{name}: {state}" + (f" — {message}" if message else "")
