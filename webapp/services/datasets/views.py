"""JSON views of datasets, shared by /api/v1/datasets and the Datasets tab."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from webapp.records import Dataset, DatasetItem, User
from webapp.services.access import can
from webapp.services.sharing import names_of


def dataset_view(dataset: Dataset, *, actor: User, owner_name: str | None, location: str,
                 role_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """``allowed_roles``: role names (``role_names``: id → name, as ``DatasetService.role_names`` gives)."""
    return {
        "id": dataset.id, "name": dataset.name, "owner": owner_name, "visibility": dataset.visibility.value,
        "allowed_roles": names_of(dataset.allowed_roles, role_names or {}),
        "image_count": dataset.image_count, "bytes": dataset.bytes,
        "resolution": {"min_width": dataset.min_width, "min_height": dataset.min_height,
                       "max_width": dataset.max_width, "max_height": dataset.max_height},
        "source": dataset.source, "source_detail": dataset.source_detail, "location": location,
        "can_manage": can(actor, "dataset:update", dataset), "can_delete": can(actor, "dataset:delete", dataset),
        "created_at": dataset.created_at.isoformat(), "updated_at": dataset.updated_at.isoformat(),
    }


def item_view(item: DatasetItem) -> dict[str, Any]:
    return {
        "id": item.id, "folder": item.folder, "repeats": item.repeats, "file_name": item.file_name,
        "path": item.relative_path, "caption": item.caption, "width": item.width, "height": item.height,
        "size": item.size, "content_type": item.content_type,
    }


def resolution_text(dataset: Dataset) -> str:
    low, high = f"{dataset.min_width}x{dataset.min_height}", f"{dataset.max_width}x{dataset.max_height}"
    return low if low == high else f"{low} … {high}"
