"""The one code path every model goes through: inspect, hash, dedupe, convert, store, record.

Server paths, browser uploads, URL downloads and the models-folder scan all end here with a local
file. What the file *is* is decided from its bytes (pipelines.safe_files / probe), never from its
name; a declared type that contradicts the tensors is refused with a sentence saying what the file
really is. Pickles are only ever opened through torch's ``weights_only`` loader (a code payload is
refused without running) and are stored converted to safetensors — except hypernetworks, which the
engine reads only as A1111 ``.pt`` files and which are stored as the verified pickle. A diffusers
ControlNet folder is packed into one safetensors file carrying its config
(pipelines.controlnet.folders), which is then imported like any file: the store holds one blob per model.

Failure leaves nothing behind: the conversion temp file is removed, a blob put into the store is
deleted again if the row cannot be written, and a reserved ``Initial`` row is handed back to the
caller (who removes it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from deploy.storage import BlobStore, StorageError
from webapp.db import Database
from webapp.records import ModelRecord, ModelStatus, ModelType, User, Visibility, utcnow
from webapp.services import sharing
from webapp.services.errors import Conflict, InvalidInput, NotFound, ServiceError
from webapp.services.models import catalog
from webapp.services.quota import DiskQuota

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""safetensors headers of real models are < 1 MB (SDXL ~250 KB); a bigger claim is an attack or junk."""

Progress = Callable[[str, int, int], None]
"""(phase, bytes done, bytes total); phases: hashing, converting, storing."""

_PROBE_TYPES = {
    "checkpoint": ModelType.CHECKPOINT, "lora": ModelType.LORA, "textual_inversion": ModelType.EMBEDDING,
    "hypernetwork": ModelType.HYPERNETWORK, "vae": ModelType.VAE, "controlnet": ModelType.CONTROLNET,
}
_ARTICLE = {ModelType.EMBEDDING: "a textual inversion (embedding)", ModelType.LORA: "a LoRA",
            ModelType.CHECKPOINT: "a checkpoint", ModelType.HYPERNETWORK: "a hypernetwork", ModelType.VAE: "a VAE",
            ModelType.CONTROLNET: "a ControlNet"}


@dataclass(frozen=True)
class Inspection:
    """What a file is, from its bytes."""

    type: ModelType
    base: str | None
    file_format: str  # safetensors / pickle / torch_zip
    details: dict[str, Any] = field(default_factory=dict)
    header_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_pickle(self) -> bool:
        return self.file_format != "safetensors"

    @property
    def stored_format(self) -> str:
        """Hypernetworks stay verified pickles (the engine reads only .pt); everything else is safetensors."""
        return self.file_format if self.type is ModelType.HYPERNETWORK else "safetensors"

    @property
    def label(self) -> str:
        base = f" for {self.base}" if self.base else ""
        return f"{_ARTICLE[self.type]}{base}"


@dataclass(frozen=True)
class ImportRequest:
    """Everything the caller knows about a file besides its bytes."""

    owner: User | None
    declared_type: ModelType | None = None
    name: str | None = None
    file_name: str | None = None
    in_place: bool = False
    source: str = "upload"
    source_detail: str | None = None
    visibility: Visibility = Visibility.EVERYONE
    allowed_roles: str | None = None
    """Stored form (``,3,7,``) for visibility ``roles``; None: what the reserved row holds (a new row: none)."""
    description: str | None = None
    metadata: dict[str, Any] | None = None
    reserved_id: str | None = None
    """An ``Initial`` row created while the bytes arrived; filled in instead of inserting a new row."""
    replace_id: str | None = None
    """A model whose file changed on disk (rescan): its row takes the new bytes, keeping id and name."""


@dataclass(frozen=True)
class ImportOutcome:
    record: ModelRecord
    created: bool  # False: these bytes were already a model (deduplicated)


def _as_input_error(exc: Exception, *, field: str = "file") -> InvalidInput:
    return InvalidInput(str(exc), field=field)


def inspect_file(path: Path) -> Inspection:
    """Validate and classify `path`; pipelines errors become `InvalidInput` naming the file."""
    from pipelines import safe_files
    from pipelines.errors import PipelineError
    from pipelines.probe import probe

    try:
        kind = safe_files.detect_kind(path)
        metadata: dict[str, str] = {}
        if kind is safe_files.FileKind.DIFFUSERS:
            raise InvalidInput(f"{path.name} is a diffusers folder; only ControlNet folders are imported, and "
                               "checkpoints in their single-file (.safetensors) form", field="file")
        if kind is safe_files.FileKind.SAFETENSORS:
            header = safe_files.read_safetensors_header(path, max_header_bytes=MAX_HEADER_BYTES)
            metadata = dict(header.metadata)
        info = probe(path)
        if info.type.value == "controlnet" and kind is safe_files.FileKind.SAFETENSORS:
            from pipelines.controlnet.folders import check_packed

            check_packed(path)  # a config in its metadata must fit its tensors, as a folder's must
    except PipelineError as exc:
        raise _as_input_error(exc) from None
    model_type = _PROBE_TYPES[info.type.value]
    if not info.supported:
        raise InvalidInput(f"{path.name} is {_ARTICLE[model_type]} this studio cannot use: {info.problem}",
                           field="file")
    base = info.base.value.replace("_", "-") if info.base is not None else None
    if info.inpaint and base:
        base = f"{base}-inpaint"
    details = {k: (list(v) if isinstance(v, tuple) else v) for k, v in info.details.items()}
    return Inspection(model_type, base, kind.value, details, metadata)


def check_declared(inspection: Inspection, declared: ModelType | None, file_name: str) -> None:
    if declared is not None and declared is not inspection.type:
        raise InvalidInput(
            f"{file_name} was declared {_ARTICLE[declared]} but its tensors say it is {inspection.label}; "
            f"choose the type {inspection.type.value!r} or upload the right file", field="type",
        )


class _CountingReader:
    """A file wrapper reporting bytes read, so storing a multi-GB file shows progress."""

    def __init__(self, handle: Any, total: int, progress: Progress | None) -> None:
        self._handle, self._total, self._progress, self.done = handle, total, progress, 0

    def readinto(self, view: memoryview) -> int:
        count = self._handle.readinto(view)
        self._advance(count or 0)
        return count

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._advance(len(data))
        return data

    def _advance(self, count: int) -> None:
        self.done += count
        if self._progress is not None and count:
            self._progress("storing", self.done, self._total)


def _convert(src: Path, inspection: Inspection, workdir: Path) -> Path:
    """Rewrite a (verified) pickle as safetensors in `workdir`."""
    from pipelines import safe_files
    from pipelines.errors import PipelineError

    target = workdir / (src.stem + ".safetensors")
    try:
        if inspection.type is ModelType.EMBEDDING:
            _convert_embedding(src, target)
        elif inspection.type is ModelType.CONTROLNET:
            from pipelines.controlnet.loader import own_tensors

            safe_files.convert_to_safetensors(src, target, keep=own_tensors)
        else:
            safe_files.convert_to_safetensors(src, target)
    except PipelineError as exc:
        raise _as_input_error(exc) from None
    return target


def _convert_embedding(src: Path, target: Path) -> None:
    """A1111 ``.pt`` embeddings nest the vectors under ``string_to_param``; safetensors holds ``emb_params``."""
    from safetensors.torch import save_file

    from pipelines import safe_files
    from pipelines.errors import ModelFormatError

    data = safe_files.load_pickle(src)
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        (tensor,) = data["string_to_param"].values()
        save_file({"emb_params": tensor.detach().contiguous()}, str(target),
                  metadata={"name": str(data.get("name") or src.stem)})
        return
    tensors = safe_files.tensors_of(data, source=src.name)
    if len(tensors) != 1:
        raise ModelFormatError(f"{src.name}: an embedding must hold one tensor, found {len(tensors)}")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(target))


def store_key_for(model_type: ModelType, sha256: str, file_name: str, stored_format: str) -> str:
    """Content-addressed: the same bytes always land on the same key."""
    stem = catalog.derive_name(file_name).rsplit("/", 1)[-1]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:100].strip(".") or "model"
    suffix = ".safetensors" if stored_format == "safetensors" else ".pt"
    return f"models/{model_type.value}/{sha256}/{safe}{suffix}"


class Importer:
    def __init__(self, db: Database, store: BlobStore, staging_dir: Path, quota: DiskQuota | None = None) -> None:
        self._db = db
        self._store = store
        self._staging = staging_dir
        self._quota = quota
        self._sha_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _sha_lock(self, sha256: str) -> threading.Lock:
        with self._locks_guard:
            return self._sha_locks.setdefault(sha256, threading.Lock())

    def resolve_sharing(self, visibility: Visibility | str | None, allowed_roles: sharing.RoleNames | None,
                current: tuple[Visibility, str] | None = None) -> tuple[Visibility, str]:
        """A new (or, with ``current``, an existing) model's visibility and stored allowed roles, checked
        (``webapp.services.sharing``); models are visible to everyone unless told otherwise."""
        with self._db.read() as s:
            return sharing.resolve(s, visibility=visibility, allowed_roles=allowed_roles, current=current,
                                   default=Visibility.EVERYONE)

    def import_file(self, path: Path, request: ImportRequest, *, progress: Progress | None = None) -> ImportOutcome:
        """Register the file at `path` (which the caller keeps or deletes; in-place files are referenced)."""
        from pipelines.hashes import hash_file

        path = Path(path)
        file_name = request.file_name or path.name
        if path.is_dir():  # a diffusers ControlNet folder (its members are checked against it)
            return self._import_folder(path, request, progress)
        if not path.is_file():
            raise InvalidInput(f"{file_name} is not a regular file", field="file")
        size = path.stat().st_size
        if size == 0:
            raise InvalidInput(f"{file_name} is empty", field="file")
        inspection = inspect_file(path)
        check_declared(inspection, request.declared_type, file_name)
        hashes = hash_file(path, progress=(lambda done, total: progress("hashing", done, total)) if progress else None)
        with self._sha_lock(hashes.sha256):
            existing = self._existing(hashes.sha256, request.owner)
            if existing is not None and existing.status != ModelStatus.FAILED:
                return self._dedupe(existing, request)
            if existing is None and request.replace_id:
                with self._db.read() as s:
                    existing = s.get(ModelRecord, request.replace_id)
            if existing is not None and request.owner is not None and not catalog.can_see(request.owner, existing):
                raise NotFound(f"no model with id {request.replace_id!r}", field="model_id")  # not theirs to replace
            workdir = Path(tempfile.mkdtemp(prefix="import-", dir=self._staging))
            try:
                stored, stored_hashes = path, hashes
                if inspection.is_pickle and inspection.stored_format == "safetensors":
                    if progress:
                        progress("converting", 0, size)
                    stored = _convert(path, inspection, workdir)
                    stored_hashes = hash_file(stored)
                    with self._sha_lock(stored_hashes.sha256):  # the converted bytes may be a model already
                        same = self._existing(stored_hashes.sha256, request.owner)
                        if same is not None and same.status != ModelStatus.FAILED:
                            return self._dedupe(same, request)
                        return self._record(path, stored, inspection, hashes, stored_hashes, request,
                                            existing or same, progress)
                return self._record(path, stored, inspection, hashes, stored_hashes, request, existing, progress)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

    def _import_folder(self, folder: Path, request: ImportRequest, progress: Progress | None) -> ImportOutcome:
        """A diffusers ControlNet folder: packed into one file (config in its metadata), stored like any file.

        Never in place: the store keeps the packed file, and the folder is not referenced afterwards.
        """
        from pipelines.controlnet.folders import pack_folder
        from pipelines.errors import PipelineError

        name = (request.file_name or folder.name).rstrip("/")
        if request.declared_type not in (None, ModelType.CONTROLNET):
            raise InvalidInput(f"{name} is a diffusers folder; only ControlNet folders are imported, not "
                               f"{_ARTICLE[request.declared_type]}", field="type")
        workdir = Path(tempfile.mkdtemp(prefix="pack-", dir=self._staging))
        try:
            if progress:
                progress("converting", 0, 0)
            try:
                packed = pack_folder(folder, workdir / f"{folder.name}.safetensors")
            except (PipelineError, OSError) as exc:
                raise InvalidInput(str(exc), field="file") from None  # pipelines' messages name the folder
            return self.import_file(packed, replace(request, file_name=f"{name}.safetensors", in_place=False),
                                    progress=progress)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _existing(self, sha256: str, owner: User | None) -> ModelRecord | None:
        """The model already holding these bytes, among those `owner` may see (the server: all).

        Another user's private model is never an answer, not even as a refusal: the import then goes on as a
        fresh one (a model of the caller's own sharing the stored bytes), so nobody learns what others hold.
        """
        statement = select(ModelRecord).where(
            or_(ModelRecord.sha256 == sha256, ModelRecord.source_sha256 == sha256),
            ModelRecord.status != ModelStatus.INITIAL,
        )
        if owner is not None:
            statement = catalog.visible_to(statement, owner)
        with self._db.read() as s:
            return s.exec(statement).first()

    def release_blob(self, key: str, sha256: str | None) -> None:
        """Delete stored model bytes once no model refers to them (users' private copies share one key)."""
        with self._sha_lock(sha256 or key):
            self._release_unlocked(key)

    def _release_unlocked(self, key: str) -> None:
        with self._db.read() as s:
            used = s.exec(select(ModelRecord.id).where(ModelRecord.store_key == key)).first()
        if used is None:
            self._store.delete(key)

    def _dedupe(self, existing: ModelRecord, request: ImportRequest) -> ImportOutcome:
        """The same bytes are one model: hand back the existing one (`_existing` found it visible to the caller)."""
        if request.reserved_id and request.reserved_id != existing.id:
            self.discard_reserved(request.reserved_id)
        log.info("import of %s: same bytes as model %s (%s); not stored again",
                 request.file_name, existing.id, existing.name)
        return ImportOutcome(existing, created=False)

    def _record(
        self, original: Path, stored: Path, inspection: Inspection, hashes: Any, stored_hashes: Any,
        request: ImportRequest, target: ModelRecord | None, progress: Progress | None,
    ) -> ImportOutcome:
        file_name = request.file_name or original.name
        stored_format = inspection.stored_format
        in_place = request.in_place and stored is original
        key = None
        if not in_place:
            key = store_key_for(inspection.type, stored_hashes.sha256, file_name, stored_format)
            size = stored.stat().st_size
            if self._quota is not None and request.owner is not None and target is None:
                self._quota.check(request.owner, adding=size, what=file_name)
            try:
                with stored.open("rb") as handle:
                    self._store.put(key, _CountingReader(handle, size, progress), expected_sha256=stored_hashes.sha256)
            except StorageError as exc:
                raise ServiceError(f"could not store {file_name}: {exc}", field="file") from exc
        try:
            record = self._write_row(original, stored, inspection, hashes, stored_hashes, request, target, key,
                                     in_place)
        except BaseException:
            if key is not None and (target is None or target.store_key != key):
                self._release_unlocked(key)  # under this sha's lock already
            raise
        if target is not None and target.store_key and target.store_key != key:
            self._release_unlocked(target.store_key)  # the replaced bytes may be no model any more
        log.info("registered %s %r (%s, %s) from %s", record.type.value, record.name, record.base or "base unknown",
                 record.autov2, request.source)
        return ImportOutcome(record, created=target is None)

    def _write_row(
        self, original: Path, stored: Path, inspection: Inspection, hashes: Any, stored_hashes: Any,
        request: ImportRequest, target: ModelRecord | None, key: str | None, in_place: bool,
    ) -> ModelRecord:
        file_name = request.file_name or original.name
        metadata = dict(request.metadata or {})
        metadata["file"] = {"details": inspection.details, **({"header": inspection.header_metadata}
                                                              if inspection.header_metadata else {})}
        values: dict[str, Any] = {
            "type": inspection.type, "base": inspection.base, "status": ModelStatus.ACTIVE, "failure_reason": None,
            "size": stored.stat().st_size, "sha256": stored_hashes.sha256, "autov2": stored_hashes.autov2,
            "legacy_hash": stored_hashes.legacy,
            "lora_hash": stored_hashes.lora_sha256 if inspection.type is ModelType.LORA else None,
            "source_sha256": hashes.sha256 if stored is not original else None,
            "file_format": inspection.stored_format, "store_key": key,
            "local_path": str(original.resolve()) if in_place else None, "updated_at": utcnow(),
        }
        try:
            with self._db.write() as s:
                if target is not None:  # a model whose file went missing or changed: it takes these bytes
                    record = s.get(ModelRecord, target.id)
                    assert record is not None
                    for k, v in values.items():
                        setattr(record, k, v)
                    s.add(record)
                    if request.reserved_id and request.reserved_id != record.id:
                        reserved = s.get(ModelRecord, request.reserved_id)
                        if reserved is not None:
                            s.delete(reserved)
                    return record
                record = s.get(ModelRecord, request.reserved_id) if request.reserved_id else None
                if record is None:
                    record = ModelRecord(name="", type=inspection.type)
                    if request.reserved_id:
                        record.id = request.reserved_id
                if request.name:
                    name = catalog.check_name(request.name)
                    if catalog.name_taken(s, inspection.type, name, except_id=record.id):
                        raise Conflict(f"a {inspection.type.label} named {name!r} already exists; choose another "
                                       "name", field="name")
                elif record.name:  # the reserved row already holds a unique name
                    name = record.name
                else:
                    name = catalog.unique_name(s, inspection.type, catalog.derive_name(file_name),
                                               stored_hashes.sha256)
                for k, v in values.items():
                    setattr(record, k, v)
                record.name = name
                record.file_name = file_name
                record.source = request.source
                record.source_detail = request.source_detail
                record.owner_id = request.owner.id if request.owner is not None else None
                record.visibility = request.visibility
                if request.allowed_roles is not None:
                    record.allowed_roles = request.allowed_roles
                record.description = request.description
                record.metadata_json = json.dumps(metadata, default=str)
                s.add(record)
                s.flush()
                return record
        except IntegrityError:
            raise Conflict(f"another model of type {inspection.type.value} took the name of {file_name} meanwhile; "
                           "try again", field="name") from None

    # -- Initial rows --------------------------------------------------------------------------------------

    def reserve(self, *, owner: User | None, model_type: ModelType, file_name: str, name: str | None,
                source: str, source_detail: str | None, visibility: Visibility, description: str | None,
                local_path: str | None = None, allowed_roles: str = "") -> ModelRecord:
        """An ``Initial`` row shown in the table while the bytes arrive (or, in place at `local_path`, while
        the file is hashed); holds the name."""
        with self._db.write() as s:
            if name:
                wanted = catalog.check_name(name)
                if catalog.name_taken(s, model_type, wanted):
                    raise Conflict(f"a {model_type.label} named {wanted!r} already exists; choose another name",
                                   field="name")
            else:
                wanted = catalog.unique_name(s, model_type, catalog.derive_name(file_name), os.urandom(4).hex())
            record = ModelRecord(
                name=wanted, type=model_type, status=ModelStatus.INITIAL, file_name=file_name, source=source,
                source_detail=source_detail, owner_id=owner.id if owner else None, visibility=visibility,
                allowed_roles=allowed_roles, description=description, local_path=local_path,
            )
            s.add(record)
            s.flush()
            return record

    def discard_reserved(self, model_id: str | None) -> None:
        """Remove a reserved row that never became a model (only while it is still ``Initial``)."""
        if not model_id:
            return
        with self._db.write() as s:
            record = s.get(ModelRecord, model_id)
            if record is not None and record.status is ModelStatus.INITIAL:
                s.delete(record)
