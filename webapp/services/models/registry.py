"""`ModelRegistry`: the service every part of the studio asks about models.

The jobs engineer resolves prompts and dropdown choices through `find` / `list_models` and ships
`file_ref(record)` in job messages; the A1111 API lists and refreshes through it; the Models tab and
/api/v1/models manage rows through it. Authorisation lives here (own + everyone-visible models;
owners and admins change them), so every edge gets the same answer.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from deploy.model_files import ModelFileRef
from deploy.storage import BlobStore
from pipelines.images import open_image
from pipelines.types import InvalidRequestError
from webapp.db import Database
from webapp.records import ModelRecord, ModelStatus, ModelType, ScannedFile, User, Visibility, utcnow
from webapp.services import sharing
from webapp.services.access import authorize, can
from webapp.services.errors import Conflict, InvalidInput, NotFound
from webapp.services.models import catalog
from webapp.services.models.importer import Importer, ImportRequest, Progress
from webapp.services.models.scan import ModelsDirScanner, ScanSummary
from webapp.services.users import usernames

log = logging.getLogger(__name__)

InUseCheck = Callable[[ModelRecord], str | None]
MAX_PREVIEW_BYTES = 10 * 1024 * 1024
PREVIEW_FORMATS = {"PNG": ("png", "image/png"), "JPEG": ("jpg", "image/jpeg"), "WEBP": ("webp", "image/webp"),
                   "GIF": ("gif", "image/gif")}


class ModelRegistry:
    def __init__(self, db: Database, store: BlobStore, importer: Importer, scanner: ModelsDirScanner, *,
                 refresh_interval: float = 60.0) -> None:
        self._db = db
        self._store = store
        self.importer = importer
        self.scanner = scanner
        self._in_use: InUseCheck | None = None
        self._refresh_interval = refresh_interval
        self._refresh_guard = threading.Lock()
        self._last_user_refresh: float | None = None

    # -- hooks -------------------------------------------------------------------------------------------

    def set_in_use_check(self, fn: InUseCheck) -> None:
        """The job service says which queued/running job uses a model; deletion is refused while one does."""
        self._in_use = fn

    # -- reading -----------------------------------------------------------------------------------------

    def list_models(
        self, *, actor: User, type: ModelType | str | None = None, status: ModelStatus | str | None = ModelStatus.ACTIVE,
        base: str | None = None, query: str | None = None, limit: int | None = None, offset: int = 0,
        registering: bool = False,
    ) -> list[ModelRecord]:
        """Models `actor` may see, by type then name; ``status=None`` lists every status. `registering` adds
        the models-dir files still being hashed (what A1111 clients and the dropdowns list at start)."""
        if offset < 0:
            raise InvalidInput("`offset` must be >= 0", field="offset")
        if limit is not None and limit < 1:
            raise InvalidInput("`limit` must be >= 1", field="limit")
        statement = catalog.filtered(actor, type=type, status=status, base=base, query=query, registering=registering)
        statement = statement.order_by(col(ModelRecord.type), func.lower(ModelRecord.name)).offset(offset)
        if limit is not None:
            statement = statement.limit(limit)
        with self._db.read() as s:
            return list(s.exec(statement))

    def count_models(
        self, *, actor: User, type: ModelType | str | None = None, status: ModelStatus | str | None = ModelStatus.ACTIVE,
        base: str | None = None, query: str | None = None,
    ) -> int:
        statement = catalog.filtered(actor, type=type, status=status, base=base, query=query)
        with self._db.read() as s:
            return s.exec(select(func.count()).select_from(statement.subquery())).one()

    def bases(self, *, actor: User) -> list[str]:
        """Distinct detected bases among visible models (for the table's filter)."""
        statement = catalog.visible_to(select(ModelRecord), actor).where(col(ModelRecord.base).is_not(None))
        with self._db.read() as s:
            return sorted({r.base for r in s.exec(statement) if r.base})

    def get(self, *, actor: User, model_id: str) -> ModelRecord:
        with self._db.read() as s:
            record = s.get(ModelRecord, model_id)
        if record is None or not catalog.can_see(actor, record):
            raise NotFound(f"no model with id {model_id!r}", field="model_id")
        return record

    def get_by_name(self, *, actor: User, type: ModelType | str, name: str) -> ModelRecord:
        """The model of `type` named exactly `name` (names are unique per type), any status."""
        model_type = catalog.parse_type(type)
        with self._db.read() as s:
            record = s.exec(select(ModelRecord).where(ModelRecord.type == model_type, ModelRecord.name == name)).first()
        if record is None or not catalog.can_see(actor, record):
            raise NotFound(f"no {model_type.label} named {name!r}", field="name")
        return record

    def find(self, *, actor: User, type: ModelType | str, ref: str) -> ModelRecord | None:
        """Resolve name / ``name [hash]`` / file name / AutoV2 / legacy / LoRA / full sha256 to an Active model."""
        model_type = catalog.parse_type(type)
        with self._db.read() as s:
            return catalog.find_record(s, actor, model_type, ref)

    def owner_names(self, records: list[ModelRecord]) -> dict[int, str]:
        return usernames(self._db, (r.owner_id for r in records))

    def role_names(self) -> dict[int, str]:
        """Id → name of every role: labels for models' allowed roles and the choices for sharing."""
        return sharing.role_names(self._db)

    @staticmethod
    def file_ref(record: ModelRecord) -> ModelFileRef:
        """What a job message carries so a worker can materialise and verify the file."""
        if record.status != ModelStatus.ACTIVE or not record.sha256:
            raise Conflict(f"model {record.name!r} is {record.status.value}, not usable"
                           + (f": {record.failure_reason}" if record.failure_reason else ""), field="model")
        return ModelFileRef(sha256=record.sha256, store_key=record.store_key, local_path=record.local_path,
                            size=record.size, file_format=record.file_format or "safetensors")

    # -- registering --------------------------------------------------------------------------------------

    def register_file(
        self, *, actor: User | None, path: str | Path, declared_type: ModelType | str | None = None,
        name: str | None = None, in_place: bool = False, visibility: Visibility | str = Visibility.EVERYONE,
        description: str | None = None, metadata: dict[str, Any] | None = None, source: str = "server",
        file_name: str | None = None, progress: Progress | None = None,
        allowed_roles: Sequence[str | int] | None = None,
    ) -> ModelRecord:
        """Register one local file synchronously (the core of every import path and of test fixtures).

        The caller vouches for `path` (HTTP/UI server imports check admin rights and import roots before
        calling). In place, the file stays where it is and is referenced by path (admins only: it is a
        server file); otherwise its bytes are copied into the asset store. Same bytes twice: the existing
        model is returned if the caller may see it; another user's private model is never revealed (the
        caller gets a model of their own sharing the stored bytes).
        """
        if actor is not None:
            authorize(actor, "model:create")
        if in_place and actor is not None:
            authorize(actor, "model:all")
        vis, roles = self.importer.resolve_sharing(visibility, allowed_roles)
        request = ImportRequest(
            owner=actor, declared_type=catalog.parse_type(declared_type) if declared_type else None,
            name=name, file_name=file_name, in_place=in_place, source=source,
            source_detail=str(path) if source == "server" else None,
            visibility=vis, allowed_roles=roles, description=description, metadata=metadata,
        )
        return self.importer.import_file(Path(path), request, progress=progress).record

    def rescan_models_dir(self) -> ScanSummary:
        """Bring the registry in step with the configured models dir (new, changed, gone files)."""
        return self.scanner.rescan()

    def refresh(self, *, actor: User) -> ScanSummary | None:
        """A user's refresh (A1111 ``refresh-*``, /api/v1/models/refresh, the Models tab's button).

        A rescan reads every new file of the models folder, so ordinary users may start one at most once per
        ``refresh_interval`` seconds server-wide and never queue behind a running one: otherwise the answer is
        None at once, and the lists stay as they are (A1111 clients call refresh routinely and expect 200).
        Administrators always rescan.
        """
        if can(actor, "model:all"):
            return self.scanner.rescan()
        with self._refresh_guard:
            now = time.monotonic()
            if self._last_user_refresh is not None and now - self._last_user_refresh < self._refresh_interval:
                return None
            self._last_user_refresh = now
        return self.scanner.try_rescan()

    # -- changing -------------------------------------------------------------------------------------------

    def update(
        self, *, actor: User, model_id: str, name: str | None = None, description: str | None = None,
        visibility: Visibility | str | None = None, metadata: dict[str, Any] | None = None,
        allowed_roles: Sequence[str | int] | None = None,
    ) -> ModelRecord:
        """Rename, describe, share (``model:update`` on the model: its owner, or ``model:all``). Sharing follows
        ``webapp.services.sharing``: ``allowed_roles`` (names or ids) go with visibility ``roles``."""
        with self._db.write() as s:
            record = s.get(ModelRecord, model_id)
            if record is None or not catalog.can_see(actor, record):
                raise NotFound(f"no model with id {model_id!r}", field="model_id")
            catalog.require_manage(actor, record, "update")
            if visibility is not None or allowed_roles is not None:
                record.visibility, record.allowed_roles = sharing.resolve(
                    s, visibility=visibility, allowed_roles=allowed_roles,
                    current=(record.visibility, record.allowed_roles))
            if name is not None:
                new_name = catalog.check_name(name)
                if new_name != record.name and catalog.name_taken(s, record.type, new_name, except_id=record.id):
                    raise Conflict(f"a {record.type.label} named {new_name!r} already exists", field="name")
                if new_name != record.name:
                    log.info("model %s renamed %r -> %r by %s", record.id, record.name, new_name, actor.username)
                record.name = new_name
            if description is not None:
                record.description = description.strip() or None
            if metadata is not None:
                current = json.loads(record.metadata_json or "{}")
                current.update({k: v for k, v in metadata.items() if k != "file"})
                record.metadata_json = json.dumps(current, default=str)
            record.updated_at = utcnow()
            s.add(record)
            return record

    def delete(self, *, actor: User, model_id: str) -> None:
        """Delete a model and its stored bytes; refused while a queued/running job uses it.

        In-place files on the server are never deleted: the model is unregistered and the models-folder
        scan leaves the file alone until it changes.
        """
        record = self.get(actor=actor, model_id=model_id)
        catalog.require_manage(actor, record, "delete")
        if self._in_use is not None and (user := self._in_use(record)):
            raise Conflict(f"{record.name!r} cannot be deleted: it is used by {user}", field="model_id")
        with self._db.write() as s:
            current = s.get(ModelRecord, model_id)
            if current is None:
                raise NotFound(f"no model with id {model_id!r}", field="model_id")
            for row in s.exec(select(ScannedFile).where(ScannedFile.model_id == model_id)):
                row.model_id, row.dismissed = None, True
                s.add(row)
            s.delete(current)
        if record.preview_key:
            self._store.delete(record.preview_key)
        if record.store_key:
            self.importer.release_blob(record.store_key, record.sha256)
        log.info("model %s (%s %r) deleted by %s", record.id, record.type.value, record.name, actor.username)

    # -- previews -------------------------------------------------------------------------------------------

    def set_preview(self, *, actor: User, model_id: str, data: bytes) -> ModelRecord:
        """Store an image as the model's preview (PNG, JPEG, WebP or GIF, at most 10 MB)."""
        record = self.get(actor=actor, model_id=model_id)
        catalog.require_manage(actor, record)
        extension, content_type = _check_image(data)
        key = f"previews/models/{record.id}/{secrets.token_hex(6)}.{extension}"
        self._store.put(key, io.BytesIO(data), content_type=content_type)
        try:
            with self._db.write() as s:
                current = s.get(ModelRecord, model_id)
                if current is None:
                    raise NotFound(f"no model with id {model_id!r}", field="model_id")
                old, current.preview_key, current.updated_at = current.preview_key, key, utcnow()
                s.add(current)
        except BaseException:
            self._store.delete(key)
            raise
        if old:
            self._store.delete(old)
        return current

    def clear_preview(self, *, actor: User, model_id: str) -> None:
        record = self.get(actor=actor, model_id=model_id)
        catalog.require_manage(actor, record)
        with self._db.write() as s:
            current = s.get(ModelRecord, model_id)
            if current is not None:
                current.preview_key = None
                s.add(current)
        if record.preview_key:
            self._store.delete(record.preview_key)

    def preview(self, *, actor: User, model_id: str) -> tuple[bytes, str] | None:
        """The preview image and its content type, or None."""
        record = self.get(actor=actor, model_id=model_id)
        if not record.preview_key:
            return None
        info = self._store.stat(record.preview_key)
        if info is None:
            return None
        with self._store.open(record.preview_key) as handle:
            return handle.read(), info.content_type or "application/octet-stream"


def _check_image(data: bytes) -> tuple[str, str]:
    """Header-first (``open_image``: bombs and garbage refused before decoding), then PIL's ``verify``."""
    if not data:
        raise InvalidInput("the preview image is empty", field="image")
    if len(data) > MAX_PREVIEW_BYTES:
        raise InvalidInput(f"the preview image is {len(data)} bytes; at most {MAX_PREVIEW_BYTES} are allowed",
                           field="image")
    try:
        with open_image(data, "image") as image:
            fmt = image.format
            image.verify()
    except InvalidRequestError as exc:
        raise InvalidInput(str(exc), field="image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"the preview is not a readable image ({exc})", field="image") from None
    if fmt not in PREVIEW_FORMATS:
        raise InvalidInput(f"preview images must be PNG, JPEG, WebP or GIF, not {fmt}", field="image")
    return PREVIEW_FORMATS[fmt]
