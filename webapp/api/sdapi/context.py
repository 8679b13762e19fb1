"""What the ``/sdapi/v1`` routes need, handed over once by the composition root (app.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from webapp.records import ModelRecord, ModelType, User
from webapp.services.options import OptionsService
from webapp.settings import Settings


@dataclass
class SdapiContext:
    """Services behind the A1111 routes. ``jobs`` is the JobService, ``registry`` the ModelRegistry."""

    settings: Settings
    options: OptionsService
    registry: Any
    jobs: Any

    def models(self, actor: User, model_type: ModelType) -> list[ModelRecord]:
        """Models of one type the caller may use, by name (lists show only what really exists): Active ones
        and, as A1111 lists files before hashing them, models-dir files whose hash is still being computed."""
        records = self.registry.list_models(actor=actor, type=model_type, registering=True)
        return sorted(records, key=lambda r: r.name.lower())


def record_metadata(record: ModelRecord) -> dict[str, Any]:
    """The registry's JSON metadata of a model (user metadata plus ``file``: details and header)."""
    if not record.metadata_json:
        return {}
    try:
        data = json.loads(record.metadata_json)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def file_details(record: ModelRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    """(probe details, safetensors header metadata) recorded when the file was imported."""
    file_info = record_metadata(record).get("file") or {}
    if not isinstance(file_info, dict):
        return {}, {}
    details = file_info.get("details") if isinstance(file_info.get("details"), dict) else {}
    header = file_info.get("header") if isinstance(file_info.get("header"), dict) else {}
    return details, header


def model_path(record: ModelRecord, actor: User) -> str:
    """Where the file is, as far as the caller may know: the server path of an in-place model for
    administrators, else its file name (A1111 clients match models by title, name or hash, not this path)."""
    if actor.is_admin and record.local_path:
        return record.local_path
    return record.file_name or record.name
