"""Model imports: background tasks, resumable browser uploads, and what the models-folder scan has seen.

These rows are what makes imports survive a restart: a task's progress lines, an upload's received
byte count (the browser resumes from it), and the scan's memory of each file (so a rescan re-hashes
only files whose size or mtime changed, and does not resurrect a model an admin deleted).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel

from webapp.records.common import new_id, utcnow
from webapp.records.models import ModelType, Visibility


class TaskKind(StrEnum):
    SERVER = "server"  # paths on the server (or an A1111 models/ folder)
    URL = "url"
    UPLOAD = "upload"  # a finished browser upload being checked and stored
    SCAN = "scan"  # the configured models dir, registered in place


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every item imported (or already known)
    PARTIAL = "partial"  # some items failed
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.PARTIAL, TaskStatus.FAILED)


class ImportTask(SQLModel, table=True):
    """One background import of one or more files; `items_json` holds a progress line per file."""

    __tablename__ = "import_task"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    kind: TaskKind = Field(index=True)
    owner_id: int | None = Field(default=None, foreign_key="user.id", index=True, ondelete="SET NULL")
    status: TaskStatus = Field(default=TaskStatus.QUEUED, index=True)
    params_json: str = "{}"
    """The request as given, minus credentials (URLs are stored redacted)."""
    items_json: str = "[]"
    """A list of items: source, name, state, done/total bytes, model id/name, message."""
    progress: float = 0.0
    message: str | None = None
    home: str | None = Field(default=None, max_length=32, index=True)
    """The home (``leases.Instance.home``) of the studio instance that runs the task: its files (uploads, server
    import roots, temp files) are on that instance's disk, so only that instance resumes or recovers it."""
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class UploadStatus(StrEnum):
    OPEN = "open"  # receiving chunks
    COMPLETING = "completing"  # all bytes here; an import task is checking and storing them
    DONE = "done"  # the task finished (see its status)


class UploadSession(SQLModel, table=True):
    """A chunked browser upload; the bytes live in ``<data_dir>/uploads/<id>/<file_name>`` until imported."""

    __tablename__ = "upload_session"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    owner_id: int = Field(foreign_key="user.id", index=True, ondelete="CASCADE")
    file_name: str = Field(max_length=255)
    size: int = Field(sa_type=BigInteger)
    received: int = Field(default=0, sa_type=BigInteger)
    type: ModelType
    name: str | None = Field(default=None, max_length=255)
    description: str | None = None
    metadata_json: str | None = None
    visibility: Visibility = Field(default=Visibility.EVERYONE)
    sha256: str | None = Field(default=None, max_length=64)
    """Optional: what the client says the file hashes to; checked before import."""
    model_id: str | None = Field(default=None, max_length=32)
    """The `Initial` model row shown while the bytes arrive."""
    status: UploadStatus = Field(default=UploadStatus.OPEN, index=True)
    task_id: str | None = Field(default=None, max_length=32)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class ScannedFile(SQLModel, table=True):
    """A file the models-folder scan has looked at, keyed by its absolute path."""

    __tablename__ = "scanned_file"

    path: str = Field(primary_key=True, max_length=4096)
    size: int = Field(sa_type=BigInteger)
    mtime_ns: int = Field(sa_type=BigInteger)
    model_id: str | None = Field(default=None, max_length=32, index=True)
    """The model these bytes are (in place, or an earlier upload of the same bytes)."""
    error: str | None = None
    """Why the file could not be registered; retried only when the file changes."""
    dismissed: bool = False
    """Its model was deleted by a user: a rescan leaves it alone until the file changes."""
    seen_at: datetime = Field(default_factory=utcnow)
