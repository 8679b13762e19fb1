"""A1111's ``models/`` folder layout, and the rescan that keeps the registry in step with it.

A1111 keeps each kind of model in its own subfolder of ``models/`` (``Stable-diffusion``, ``Lora``,
``VAE``, ``ControlNet``, ``hypernetworks``) and textual inversions in ``embeddings/`` beside it, in the
webui root; files lie directly inside or in nested folders, and each shows by its path relative to its
type folder without the extension (``styles/ink``). A diffusers ControlNet folder (config.json naming
ControlNetModel, beside its weights) counts as one model, named by its folder; the import packs it into
one stored file, so it is never registered in place. The studio reads the same layout so an existing
A1111 install is usable as it is, registered in place, whether the admin names its root or ``models/``.

Names first, hashes after: hashing a folder of checkpoints takes minutes, and A1111 lists its models
as soon as it starts, so ``register_names`` gives every new file an ``Initial`` row in place (listed,
no hash yet) before ``rescan`` hashes them one by one; jobs refuse such a model until its hash is known.

Rescan policy (idempotent): new files are registered; files whose size and mtime are unchanged are
not re-read; a changed file is re-checked and its model takes the new bytes (same id and name); a
file that disappeared leaves its model ``Failed`` with the reason (history and preview kept — it
becomes ``Active`` again if the file comes back); a model an admin deleted stays deleted until its
file changes; a file that cannot be registered is remembered with its error and retried only when
it changes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import select

from pipelines.controlnet.folders import is_controlnet_folder, weights_file
from pipelines.errors import PipelineError
from webapp.db import Database
from webapp.records import ModelRecord, ModelStatus, ModelType, ScannedFile, Visibility, utcnow
from webapp.services.errors import ServiceError
from webapp.services.models.catalog import MODEL_EXTENSIONS, derive_name
from webapp.services.models.importer import Importer, ImportRequest

log = logging.getLogger(__name__)

A1111_FOLDERS: dict[str, ModelType] = {
    "stable-diffusion": ModelType.CHECKPOINT, "lora": ModelType.LORA, "lycoris": ModelType.LORA,
    "embeddings": ModelType.EMBEDDING, "vae": ModelType.VAE, "controlnet": ModelType.CONTROLNET,
    "hypernetworks": ModelType.HYPERNETWORK,
}


@dataclass(frozen=True)
class FoundFile:
    type: ModelType | None  # None: found outside a type folder, the file decides
    path: Path  # as found (not resolved), so the record shows the folder the admin configured
    relative: str  # relative to the type folder, '/'-separated, with extension (a ControlNet folder: none)

    @property
    def name(self) -> str:
        return derive_name(self.relative)


@dataclass(frozen=True)
class Stamp:
    """Size and mtime: how a rescan tells that a model changed (a ControlNet folder: config and weights)."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Stamp:
        """Raises OSError (e.g. a dangling link) or PipelineError (a ControlNet folder without weights)."""
        stats = [m.stat() for m in (path / "config.json", weights_file(path))] if path.is_dir() else [path.stat()]
        return cls(sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats))


@dataclass(frozen=True)
class A1111Install:
    """Where an install keeps its models: ``models`` (the type folders) and the root's ``embeddings``."""

    models: Path
    embeddings: Path | None = None

    @property
    def folders(self) -> list[Path]:
        return [self.models, *([self.embeddings] if self.embeddings is not None else [])]


def find_install(path: Path) -> A1111Install:
    """`path` as users name an A1111 install: its webui root (``models/`` inside) or that ``models/`` folder.

    The root's ``embeddings/`` is where A1111 keeps textual inversions (``--embeddings-dir``'s default).
    Any other folder is taken as a models folder of its own.
    """
    if (path / "models").is_dir():
        root, models = path, path / "models"
    elif path.name.lower() == "models":
        root, models = path.parent, path
    else:
        return A1111Install(path)
    embeddings = root / "embeddings"
    return A1111Install(models, embeddings if embeddings.is_dir() else None)


def is_a1111_folder(directory: Path) -> bool:
    """True when `directory` has at least one of A1111's model subfolders."""
    try:
        return any(child.is_dir() and child.name.lower() in A1111_FOLDERS for child in directory.iterdir())
    except OSError:
        return False


def walk_models(folder: Path, model_type: ModelType | None = None) -> Iterator[FoundFile]:
    """Model files and ControlNet folders under `folder` (hidden entries skipped, links to folders not followed)."""
    for directory, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(directory)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in list(dirnames):
            path = here / name
            if not path.is_symlink() and is_controlnet_folder(path):
                dirnames.remove(name)  # its files are the one model
                yield FoundFile(model_type, path, path.relative_to(folder).as_posix())
        for filename in sorted(filenames):
            if filename.startswith(".") or not filename.lower().endswith(MODEL_EXTENSIONS):
                continue
            path = Path(directory) / filename
            yield FoundFile(model_type, path, path.relative_to(folder).as_posix())


def iter_model_files(root: Path) -> Iterator[FoundFile]:
    """Every model file under `root`'s A1111 subfolders, in a stable order (hidden entries skipped)."""
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        model_type = A1111_FOLDERS.get(child.name.lower())
        if model_type is not None and child.is_dir():
            yield from walk_models(child, model_type)


def iter_install_files(install: A1111Install) -> Iterator[FoundFile]:
    """The models folder's files, then the root's embeddings."""
    if install.models.is_dir():
        yield from iter_model_files(install.models)
    if install.embeddings is not None and install.embeddings.is_dir():
        yield from walk_models(install.embeddings, ModelType.EMBEDDING)


def within_roots(path: Path, roots: Sequence[Path]) -> bool:
    """`path` with symlinks and '..' resolved lies inside one of `roots` (themselves resolved)."""
    resolved = path.resolve()
    return any(resolved == root or resolved.is_relative_to(root) for root in (r.resolve() for r in roots))


@dataclass
class ScanSummary:
    """What one rescan did; `errors` maps file paths to the reason they are not models."""

    folder: str | None = None
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    reactivated: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    unchanged: int = 0
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"folder": self.folder, "added": self.added, "updated": self.updated, "reactivated": self.reactivated,
                "vanished": self.vanished, "unchanged": self.unchanged, "errors": self.errors}

    @property
    def line(self) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.updated)} updated", f"{len(self.vanished)} gone",
                 f"{self.unchanged} unchanged"]
        if self.reactivated:
            parts.insert(2, f"{len(self.reactivated)} back")
        if self.errors:
            parts.append(f"{len(self.errors)} not models")
        return ", ".join(parts)


Pending = tuple[FoundFile, Stamp, ScannedFile | None]
"""A file the scan must (re-)register, its stamp and its scan row (None when new)."""


class ModelsDirScanner:
    """Keeps the registry in step with the configured models dir (see module docstring for the policy)."""

    def __init__(self, db: Database, importer: Importer, models_dir: Path | None, roots: Sequence[Path]) -> None:
        self._db = db
        self._importer = importer
        self.models_dir = models_dir
        self._roots = list(roots)
        self._lock = threading.Lock()

    def _install(self) -> A1111Install | None:
        """Found again at every scan: the folders may appear after the server started."""
        if self.models_dir is None:
            return None
        if not self.models_dir.is_dir():
            log.warning("models dir %s does not exist (yet); nothing to scan", self.models_dir)
            return None
        return find_install(self.models_dir)

    def register_names(self) -> list[str]:
        """List every new file at once (an ``Initial`` row in place, no hash yet); `rescan` hashes them."""
        with self._lock:
            install = self._install()
            if install is None:
                return []
            pending, _seen, _known = self._walk(install, ScanSummary())
            return self._list_names(install, pending)

    def rescan(self) -> ScanSummary:
        with self._lock:  # two refreshes at once would hash the same new files twice
            return self._rescan()

    def try_rescan(self) -> ScanSummary | None:
        """Rescan unless one is running already (None at once then: that one brings the news)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._rescan()
        finally:
            self._lock.release()

    def _rescan(self) -> ScanSummary:
        summary = ScanSummary(folder=str(self.models_dir) if self.models_dir else None)
        install = self._install()
        if install is not None:
            pending, seen, known = self._walk(install, summary)
            self._list_names(install, pending)
            for found, stamp, row in pending:
                self._register(install, found, stamp, row, summary)
            for path, row in known.items():
                if path not in seen and any(Path(path).is_relative_to(f) for f in install.folders):
                    self._forget(row, summary)
        self._fail_missing_in_place(summary)
        log.info("models dir rescan: %s", summary.line)
        return summary

    def _walk(self, install: A1111Install, summary: ScanSummary) -> tuple[list[Pending], set[str], dict]:
        """(files to register, every path seen, the scan rows known before)."""
        with self._db.read() as s:
            known = {row.path: row for row in s.exec(select(ScannedFile))}
        seen: set[str] = set()
        pending: list[Pending] = []
        for found in iter_install_files(install):
            key = str(found.path)
            seen.add(key)
            try:
                stamp = Stamp.of(found.path)
            except OSError as exc:  # a dangling symlink
                summary.errors[key] = f"cannot read {found.relative}: {exc.strerror or exc}"
                continue
            except PipelineError as exc:
                summary.errors[key] = str(exc)
                continue
            row = known.get(key)
            unchanged = row is not None and row.size == stamp.size and row.mtime_ns == stamp.mtime_ns
            if unchanged and (row.dismissed or row.error or self._active(row.model_id)):
                summary.unchanged += 1
                if row.error:
                    summary.errors[key] = row.error
                continue
            pending.append((found, stamp, row))
        return pending, seen, known

    def _list_names(self, install: A1111Install, pending: list[Pending]) -> list[str]:
        """An ``Initial`` row, in place, for each pending file no model holds yet (the hash comes later)."""
        names = []
        for found, _stamp, _row in pending:
            if self._in_place_model(str(found.path)) is not None or not self._readable(install, found.path):
                continue
            record = self._importer.reserve(
                owner=None, model_type=found.type, file_name=found.relative, name=None, source="scan",
                source_detail=str(found.path), visibility=Visibility.EVERYONE, description=None,
                local_path=str(found.path.resolve()))
            names.append(record.name)
        if names:
            log.info("models dir: %d new file(s) listed, hashing follows", len(names))
        return names

    def _readable(self, install: A1111Install, path: Path) -> bool:
        return within_roots(path, [*self._roots, *install.folders])

    def _active(self, model_id: str | None) -> bool:
        if model_id is None:
            return False
        with self._db.read() as s:
            record = s.get(ModelRecord, model_id)
            return record is not None and record.status == ModelStatus.ACTIVE

    def _register(self, install: A1111Install, found: FoundFile, stamp: Stamp, row: ScannedFile | None,
                  summary: ScanSummary) -> None:
        key = str(found.path)
        previous = self._in_place_model(key)
        listed = previous.id if previous is not None and previous.status == ModelStatus.INITIAL else None
        if listed is not None:
            previous = None  # the row `_list_names` made: filled in by the import, not replaced
        error, model_id = None, None
        try:
            if not self._readable(install, found.path):
                error = f"{found.relative} resolves to {found.path.resolve()}, outside the import roots"
            else:
                request = ImportRequest(
                    owner=None, declared_type=found.type, file_name=found.relative, in_place=True, source="scan",
                    source_detail=key, replace_id=previous.id if previous is not None else None, reserved_id=listed,
                )
                outcome = self._importer.import_file(found.path, request)
                model_id = outcome.record.id
                if previous is not None and previous.id == model_id:
                    target = summary.reactivated if previous.status == ModelStatus.FAILED else summary.updated
                    target.append(outcome.record.name)
                elif outcome.created:
                    summary.added.append(outcome.record.name)
                else:
                    summary.unchanged += 1  # the same bytes were already a model (e.g. uploaded earlier)
        except ServiceError as exc:
            error = exc.message
        finally:
            self._importer.discard_reserved(listed)  # a no-op once filled in: only a failed file's row goes
        if error:
            summary.errors[key] = error
            log.warning("models dir: %s", error)
        with self._db.write() as s:
            current = s.get(ScannedFile, key) or ScannedFile(path=key, size=0, mtime_ns=0)
            current.size, current.mtime_ns, current.seen_at = stamp.size, stamp.mtime_ns, utcnow()
            current.model_id, current.error, current.dismissed = model_id, error, False
            s.add(current)

    def _in_place_model(self, path: str) -> ModelRecord | None:
        with self._db.read() as s:
            return s.exec(select(ModelRecord).where(ModelRecord.local_path == str(Path(path).resolve()))).first() \
                or s.exec(select(ModelRecord).where(ModelRecord.source_detail == path,
                                                    ModelRecord.source == "scan")).first()

    def _forget(self, row: ScannedFile, summary: ScanSummary) -> None:
        """The file is gone: its in-place model fails with the reason; the scan forgets the path."""
        with self._db.write() as s:
            record = s.get(ModelRecord, row.model_id) if row.model_id else None
            if record is not None and record.local_path and record.status == ModelStatus.ACTIVE \
                    and not Path(record.local_path).exists():
                record.status = ModelStatus.FAILED
                record.failure_reason = f"{row.path} is gone from the models folder"
                record.updated_at = utcnow()
                s.add(record)
                summary.vanished.append(record.name)
            stale = s.get(ScannedFile, row.path)
            if stale is not None:
                s.delete(stale)

    def _fail_missing_in_place(self, summary: ScanSummary) -> None:
        """In-place models from any import root whose file disappeared."""
        with self._db.write() as s:
            for record in s.exec(select(ModelRecord).where(ModelRecord.local_path.is_not(None),  # type: ignore[union-attr]
                                                           ModelRecord.status == ModelStatus.ACTIVE)):
                if not Path(record.local_path).exists():
                    record.status = ModelStatus.FAILED
                    record.failure_reason = f"{record.local_path} no longer exists on the server"
                    record.updated_at = utcnow()
                    s.add(record)
                    summary.vanished.append(record.name)
