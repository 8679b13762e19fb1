"""Queries over the model registry: who may see what, names, and finding a model by any reference.

A1111 clients name models in many ways — ``name``, ``name [6ce0161689]``, ``file.safetensors``, the
10-hex AutoV2, the 8-hex legacy hash, the 12-hex LoRA/TI hash or the full sha256 — and every one of
them must resolve to the same row. These helpers are pure functions of a session so the registry,
the import paths and the jobs engineer's resolver share one definition.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import and_, func, or_
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from webapp.records import ModelRecord, ModelStatus, ModelType, User
from webapp.services.access import authorize, can, visible
from webapp.services.errors import InvalidInput, PermissionDenied

MAX_NAME = 255
_FORBIDDEN_NAME_CHARS = "<>:[]\\\"|?*"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEX = re.compile(r"[0-9a-f]+")
_TITLE = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")

REGISTERING = and_(ModelRecord.status == ModelStatus.INITIAL, col(ModelRecord.local_path).is_not(None))
"""A file in place on this server whose hash is still being computed (the models-dir scan lists names first):
listed, as A1111 lists models before it hashes them, but not usable by a job until its hash is known."""


# -- authorisation -------------------------------------------------------------------------------------

def visible_to(statement: SelectOfScalar, actor: User) -> SelectOfScalar:
    """Restrict a model query to what `actor` may see (``webapp.services.access``: own models, shared ones;
    ``model:all``: every one)."""
    return statement.where(visible(actor, ModelRecord, "model"))


def can_see(actor: User, record: ModelRecord) -> bool:
    return can(actor, "model:list", record)


def require_manage(actor: User, record: ModelRecord, action: str = "update") -> None:
    """Renaming, deleting and previews: the owner or a holder of ``model:all`` (server-scanned models: them)."""
    if can(actor, f"model:{action}", record):
        return
    if f"model:{action}" not in actor.permissions:
        authorize(actor, f"model:{action}")
    raise PermissionDenied(f"only the owner of {record.name!r} or a holder of model:all may change it")


# -- names -----------------------------------------------------------------------------------------------

def check_name(name: str, *, field: str = "name") -> str:
    """A name users can write in prompts (``<lora:name:1>``) and titles (``name [hash]``)."""
    cleaned = name.strip() if isinstance(name, str) else ""
    if not cleaned:
        raise InvalidInput(f"`{field}` must not be empty", field=field)
    if len(cleaned) > MAX_NAME:
        raise InvalidInput(f"`{field}` is {len(cleaned)} characters long; at most {MAX_NAME} are allowed", field=field)
    bad = sorted({c for c in cleaned if c in _FORBIDDEN_NAME_CHARS}) or (["control characters"]
                                                                         if _CONTROL.search(cleaned) else [])
    if bad:
        raise InvalidInput(f"`{field}` {cleaned!r} contains {' '.join(bad)}, which prompts and titles cannot carry",
                           field=field)
    if cleaned.startswith("/") or any(part in ("", ".", "..") for part in cleaned.split("/")):
        raise InvalidInput(f"`{field}` {cleaned!r} must be a relative name without empty, '.' or '..' parts",
                           field=field)
    return cleaned


def derive_name(file_name: str) -> str:
    """The name A1111 shows for a file: its relative path without the extension, made prompt-safe."""
    path = PurePosixPath(file_name.replace("\\", "/"))
    stem = str(path.with_suffix("")) if path.suffix.lower() in MODEL_EXTENSIONS else str(path)
    cleaned = _CONTROL.sub("", "".join("_" if c in _FORBIDDEN_NAME_CHARS else c for c in stem))
    parts = [p for p in cleaned.split("/") if p not in ("", ".", "..")]
    return "/".join(parts)[:MAX_NAME].strip() or "model"


def name_taken(session: Session, model_type: ModelType, name: str, *, except_id: str | None = None) -> bool:
    statement = select(ModelRecord.id).where(ModelRecord.type == model_type, ModelRecord.name == name)
    if except_id is not None:
        statement = statement.where(ModelRecord.id != except_id)
    return session.exec(statement).first() is not None


def unique_name(session: Session, model_type: ModelType, wanted: str, sha256: str | None) -> str:
    """`wanted`, or `wanted-<hash8>` (then a counter) when another model of this type has it."""
    if not name_taken(session, model_type, wanted):
        return wanted
    base = f"{wanted[:MAX_NAME - 9]}-{sha256[:8]}" if sha256 else wanted[:MAX_NAME - 4]
    candidate, counter = base, 2
    while name_taken(session, model_type, candidate):
        candidate = f"{base[:MAX_NAME - 4]}-{counter}"
        counter += 1
    return candidate


# -- lookups ---------------------------------------------------------------------------------------------

def find_record(session: Session, actor: User, model_type: ModelType, ref: str) -> ModelRecord | None:
    """Resolve any A1111-style reference to one Active (or still registering) model of `model_type` that
    `actor` may see; a registering one has no hash yet, so jobs refuse it with that reason.

    Order: exact name, ``name [hash]`` title, full sha256, short hashes (AutoV2 / legacy / LoRA / TI),
    file name with extension, bare file stem. The first rule that matches wins; ties go to the oldest.
    """
    ref = (ref or "").strip()
    if not ref:
        return None
    base = visible_to(select(ModelRecord), actor).where(
        ModelRecord.type == model_type, or_(ModelRecord.status == ModelStatus.ACTIVE, REGISTERING),
    ).order_by(col(ModelRecord.created_at), col(ModelRecord.id))

    def first(*conditions: Any) -> ModelRecord | None:
        return session.exec(base.where(*conditions)).first()

    if found := first(ModelRecord.name == ref):
        return found
    title = _TITLE.match(ref)
    if title:
        named = _by_file_or_name(session, base, title.group("name"))
        wanted = title.group("hash").lower()
        for record in named:
            if wanted in _short_hashes(record):
                return record
        return None
    lowered = ref.lower()
    if _HEX.fullmatch(lowered):
        if len(lowered) == 64 and (found := first(or_(ModelRecord.sha256 == lowered,
                                                      ModelRecord.source_sha256 == lowered))):
            return found
        if len(lowered) in (8, 10, 12):
            for record in session.exec(base.where(or_(
                col(ModelRecord.sha256).startswith(lowered), ModelRecord.legacy_hash == lowered,
                col(ModelRecord.lora_hash).startswith(lowered),
            ))):
                if lowered in _short_hashes(record):
                    return record
    named = _by_file_or_name(session, base, ref)
    return named[0] if named else None


def _by_file_or_name(session: Session, base: SelectOfScalar, ref: str) -> Sequence[ModelRecord]:
    """Models whose name or file name equals `ref`, else whose name (or its last part) is `ref`'s stem."""
    ref = ref.replace("\\", "/")
    exact = session.exec(base.where(or_(ModelRecord.name == ref, ModelRecord.file_name == ref))).all()
    if exact:
        return exact
    stem = derive_name(ref)
    leaf = stem.rsplit("/", 1)[-1]
    return session.exec(base.where(or_(
        ModelRecord.name == stem, ModelRecord.name == leaf, col(ModelRecord.name).endswith("/" + leaf, autoescape=True),
    ))).all()


def _short_hashes(record: ModelRecord) -> set[str]:
    out: set[str] = set()
    if record.sha256:
        out |= {record.sha256[:10], record.sha256[:12], record.sha256, record.sha256[:8]}
    if record.source_sha256:
        out |= {record.source_sha256[:10], record.source_sha256[:12], record.source_sha256}
    if record.legacy_hash:
        out.add(record.legacy_hash)
    if record.lora_hash:
        out |= {record.lora_hash[:12], record.lora_hash[:10], record.lora_hash[:8], record.lora_hash}
    return out


def filtered(
    actor: User, *, type: ModelType | str | None = None, status: ModelStatus | str | None = None,
    base: str | None = None, query: str | None = None, registering: bool = False,
) -> SelectOfScalar:
    """The list query behind the table, the API and the dropdowns (validated filters, visibility applied);
    `registering` adds the models still hashing to a `status` filter."""
    statement = visible_to(select(ModelRecord), actor)
    if type:
        statement = statement.where(ModelRecord.type == parse_type(type, field="type"))
    if status:
        wanted = ModelRecord.status == parse_status(status)
        statement = statement.where(or_(wanted, REGISTERING) if registering else wanted)
    if base:
        statement = statement.where(ModelRecord.base == base)
    if query and query.strip():
        needle = f"%{query.strip().lower()}%"
        statement = statement.where(or_(
            func.lower(ModelRecord.name).like(needle), func.lower(ModelRecord.description).like(needle),
            col(ModelRecord.sha256).startswith(query.strip().lower()),
        ))
    return statement


def parse_type(value: ModelType | str, *, field: str = "type") -> ModelType:
    if isinstance(value, ModelType):
        return value
    text = str(value).strip()
    aliases = {  # A1111 folder names and ESD type names map onto ours
        "stable-diffusion": "checkpoint", "sd": "checkpoint", "embeddings": "embedding",
        "textual_inversion": "embedding", "textual-inversion": "embedding", "ti": "embedding",
        "hypernetworks": "hypernetwork", "loras": "lora", "lycoris": "lora",
    }
    lowered = text.lower()
    try:
        return ModelType(aliases.get(lowered, lowered))
    except ValueError:
        choices = ", ".join(t.value for t in ModelType)
        raise InvalidInput(f"`{field}` must be one of {choices}, not {text!r}", field=field) from None


def parse_status(value: ModelStatus | str) -> ModelStatus:
    if isinstance(value, ModelStatus):
        return value
    for status in ModelStatus:
        if status.value.lower() == str(value).strip().lower():
            return status
    choices = ", ".join(s.value for s in ModelStatus)
    raise InvalidInput(f"`status` must be one of {choices}, not {value!r}", field="status")


def parse_description(text: str | None) -> tuple[str | None, dict[str, Any] | None]:
    """The seeds' optional JSON description (``{"description": "...", ...}``) or plain text.

    Returns (description, metadata): the "description" key becomes the description, other keys are
    kept as metadata. Text that starts like JSON but does not parse is an error, not a description.
    """
    if text is None or not str(text).strip():
        return None, None
    stripped = str(text).strip()
    if not stripped.startswith(("{", "[")):
        return stripped, None
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"`description` is not valid JSON: {exc.msg} at character {exc.pos}",
                           field="description") from None
    if not isinstance(value, dict):
        raise InvalidInput("`description` JSON must be an object such as {\"description\": \"...\"}",
                           field="description")
    description = value.pop("description", None)
    if description is not None and not isinstance(description, str):
        raise InvalidInput("`description.description` must be a string", field="description")
    return (description.strip() or None) if description else None, (value or None)
