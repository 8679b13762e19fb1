"""A1111's ``models/`` folder layout, and the rescan that keeps the registry in step with it.

A1111 keeps each kind of model in its own subfolder (``Stable-diffusion``, ``Lora``, ``embeddings``,
``VAE``, ``ControlNet``, ``hypernetworks``), files directly inside or in nested folders, and shows
each by its path relative to that subfolder without the extension (``styles/ink``). The studio reads
the same layout so an existing A1111 install is usable as it is, registered in place.

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

from webapp.db import Database
from webapp.records import ModelRecord, ModelStatus, ModelType, ScannedFile, utcnow
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
    type: ModelType
    path: Path  # as found (not resolved), so the record shows the folder the admin configured
    relative: str  # relative to the type folder, '/'-separated, with extension

    @property
    def name(self) -> str:
        return derive_name(self.relative)


def is_a1111_folder(directory: Path) -> bool:
    """True when `directory` has at least one of A1111's model subfolders."""
    try:
        return any(child.is_dir() and child.name.lower() in A1111_FOLDERS for child in directory.iterdir())
    except OSError:
        return False


def iter_model_files(root: Path) -> Iterator[FoundFile]:
    """Every model file under `root`'s A1111 subfolders, in a stable order (hidden entries skipped)."""
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        model_type = A1111_FOLDERS.get(child.name.lower())
        if model_type is None or not child.is_dir():
            continue
        for directory, dirnames, filenames in os.walk(child, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith(".") or not filename.lower().endswith(MODEL_EXTENSIONS):
                    continue
                path = Path(directory) / filename
                yield FoundFile(model_type, path, path.relative_to(child).as_posix())


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


class ModelsDirScanner:
    """Keeps the registry in step with the configured models dir (see module docstring for the policy)."""

    def __init__(self, db: Database, importer: Importer, models_dir: Path | None, roots: Sequence[Path]) -> None:
        self._db = db
        self._importer = importer
        self.models_dir = models_dir
        self._roots = list(roots)
        self._lock = threading.Lock()

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
        if self.models_dir is not None:
            if self.models_dir.is_dir():
                self._scan_folder(self.models_dir, summary)
            else:
                log.warning("models dir %s does not exist (yet); nothing to scan", self.models_dir)
        self._fail_missing_in_place(summary)
        log.info("models dir rescan: %s", summary.line)
        return summary

    def _scan_folder(self, folder: Path, summary: ScanSummary) -> None:
        with self._db.read() as s:
            known = {row.path: row for row in s.exec(select(ScannedFile))}
        seen: set[str] = set()
        for found in iter_model_files(folder):
            key = str(found.path)
            seen.add(key)
            try:
                stat = found.path.stat()
            except OSError as exc:  # a dangling symlink
                summary.errors[key] = f"cannot read {found.relative}: {exc.strerror or exc}"
                continue
            row = known.get(key)
            unchanged = row is not None and row.size == stat.st_size and row.mtime_ns == stat.st_mtime_ns
            if unchanged and (row.dismissed or row.error or self._active(row.model_id)):
                summary.unchanged += 1
                if row.error:
                    summary.errors[key] = row.error
                continue
            self._register(found, stat, row, summary)
        for path, row in known.items():
            if path not in seen and Path(path).is_relative_to(folder):
                self._forget(row, summary)

    def _active(self, model_id: str | None) -> bool:
        if model_id is None:
            return False
        with self._db.read() as s:
            record = s.get(ModelRecord, model_id)
            return record is not None and record.status == ModelStatus.ACTIVE

    def _register(self, found: FoundFile, stat: os.stat_result, row: ScannedFile | None, summary: ScanSummary) -> None:
        key = str(found.path)
        previous = self._in_place_model(key)
        error, model_id = None, None
        if not within_roots(found.path, self._roots):
            error = f"{found.relative} resolves to {found.path.resolve()}, outside the import roots"
        else:
            request = ImportRequest(
                owner=None, declared_type=found.type, file_name=found.relative, in_place=True, source="scan",
                source_detail=key, replace_id=previous.id if previous is not None else None,
            )
            try:
                outcome = self._importer.import_file(found.path, request)
            except ServiceError as exc:
                error = exc.message
            else:
                model_id = outcome.record.id
                if previous is not None and previous.id == model_id:
                    target = summary.reactivated if previous.status == ModelStatus.FAILED else summary.updated
                    target.append(outcome.record.name)
                elif outcome.created:
                    summary.added.append(outcome.record.name)
                else:
                    summary.unchanged += 1  # the same bytes were already a model (e.g. uploaded earlier)
        if error:
            summary.errors[key] = error
            log.warning("models dir: %s", error)
        with self._db.write() as s:
            current = s.get(ScannedFile, key) or ScannedFile(path=key, size=0, mtime_ns=0)
            current.size, current.mtime_ns, current.seen_at = stat.st_size, stat.st_mtime_ns, utcnow()
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
