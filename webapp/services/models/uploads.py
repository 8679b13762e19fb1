"""Chunked, resumable browser uploads of multi-GB model files, with bounded memory.

Protocol (our own, tus-like, driven by webapp/ui/static/uploader.js and usable from scripts):

1. ``create`` — file name, size, type → an upload id, and an ``Initial`` model row so the table shows
   the file arriving;
2. ``receive`` — bytes for ``[offset, …)``, streamed to ``<data_dir>/uploads/<id>/<file>`` as they come
   (at most one write buffer in memory); the offset must equal what the server has, so a client that
   lost a connection asks ``status`` for the byte count and resumes from there;
3. ``complete`` — when every byte is here, an import task checks, hashes, converts and stores it.

A dropped connection keeps every byte written before the drop; a server restart keeps the session
(row + file) so the browser resumes; sessions left open for a week are removed with their files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import anyio
from sqlmodel import select

from webapp.db import Database
from webapp.records import (
    ImportTask,
    ModelRecord,
    ModelStatus,
    ModelType,
    TaskKind,
    UploadSession,
    UploadStatus,
    User,
    Visibility,
    utcnow,
)
from webapp.services.access import authorize, can
from webapp.services.errors import Conflict, InvalidInput, NotFound, ServiceError
from webapp.services.models import catalog
from webapp.services.models.importer import Importer, ImportRequest
from webapp.services.models.tasks import ImportTasks, TaskContext
from webapp.services.quota import DiskQuota

log = logging.getLogger(__name__)

WRITE_BUFFER = 4 * 1024 * 1024
"""Bytes gathered before a write is handed to a thread: bounds memory per upload, keeps the loop free."""
CHUNK_HINT = 16 * 1024 * 1024
"""What clients are told to send per request: small enough to lose little on a drop."""
STALE_AFTER = timedelta(days=7)


class _BackgroundWriter:
    """Writes buffers on a worker thread while the event loop reads the next one.

    At most one write is in flight, so an upload holds two buffers at most, and reading the socket
    overlaps with the disk instead of alternating with it.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._pending: asyncio.Future[int] | None = None
        self.written = 0

    async def write(self, data: bytearray) -> None:
        await self.flush()
        if data:
            self._pending = asyncio.get_running_loop().run_in_executor(None, self._handle.write, data)

    async def flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.written += await pending


def _stale(session: UploadSession) -> bool:
    updated = session.updated_at if session.updated_at.tzinfo else session.updated_at.replace(tzinfo=UTC)
    return updated < utcnow() - STALE_AFTER


def _clean_file_name(file_name: str) -> str:
    name = (file_name or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = "".join(c for c in name if c.isprintable()).lstrip(".")
    if not name:
        raise InvalidInput("`file_name` must name the file being uploaded", field="file_name")
    return name[:200]


class Uploads:
    def __init__(self, db: Database, importer: Importer, tasks: ImportTasks, upload_dir: Path, max_bytes: int,
                 quota: DiskQuota | None = None) -> None:
        self._db = db
        self._quota = quota
        self._importer = importer
        self._tasks = tasks
        self.upload_dir = upload_dir
        self.max_bytes = max_bytes
        self._busy: set[str] = set()
        self._last_expiry = time.monotonic()
        upload_dir.mkdir(parents=True, exist_ok=True)
        tasks.register(TaskKind.UPLOAD, self._run, on_interrupted=self._reopen)

    # -- the protocol ----------------------------------------------------------------------------------

    def create(
        self, *, actor: User, file_name: str, size: int, type: ModelType | str | None, name: str | None = None,
        description: str | None = None, visibility: Visibility | str = Visibility.EVERYONE,
        sha256: str | None = None,
    ) -> UploadSession:
        authorize(actor, "model:create")
        self._expire_stale()
        file_name = _clean_file_name(file_name)
        if not type:
            raise InvalidInput("choose the model `type` of the file being uploaded", field="type")
        model_type = catalog.parse_type(type)
        if not isinstance(size, int) or size <= 0:
            raise InvalidInput(f"`size` must be a positive number of bytes, not {size!r}", field="size")
        if size > self.max_bytes:
            raise InvalidInput(f"{file_name} is {size} bytes; uploads are limited to {self.max_bytes} bytes",
                               field="size")
        if self._quota is not None:
            self._quota.check(actor, adding=size, what=file_name)
        if sha256 is not None and not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256.lower())):
            raise InvalidInput("`sha256` must be 64 hex digits", field="sha256")
        text, metadata = catalog.parse_description(description)
        vis = catalog.parse_visibility(visibility)
        reserved = self._importer.reserve(owner=actor, model_type=model_type, file_name=file_name, name=name,
                                          source="upload", source_detail=None, visibility=vis, description=text)
        session = UploadSession(owner_id=actor.id, file_name=file_name, size=size, type=model_type, name=name,
                                description=text, visibility=vis, sha256=sha256.lower() if sha256 else None,
                                model_id=reserved.id)
        if metadata:
            session.metadata_json = json.dumps(metadata)
        try:
            self._path(session).parent.mkdir(parents=True, exist_ok=True)
            self._path(session).touch()
            with self._db.write() as s:
                s.add(session)
        except BaseException:
            self._importer.discard_reserved(reserved.id)
            shutil.rmtree(self.upload_dir / session.id, ignore_errors=True)
            raise
        log.info("upload %s of %s (%d bytes) started by %s", session.id, file_name, size, actor.username)
        return session

    def status(self, *, actor: User, upload_id: str) -> UploadSession:
        with self._db.read() as s:
            session = s.get(UploadSession, upload_id)
        if session is None or not (can(actor, "model:all") or session.owner_id == actor.id):
            raise NotFound(f"no upload with id {upload_id!r}", field="upload_id")
        return session

    async def receive(self, *, actor: User, upload_id: str, offset: int, chunks: AsyncIterator[bytes]) -> int:
        """Append the streamed bytes at `offset` (which must be what the server already has).

        Returns the new byte count. On a dropped connection the bytes that arrived are kept and
        counted, then the disconnect propagates.
        """
        session = await anyio.to_thread.run_sync(lambda: self.status(actor=actor, upload_id=upload_id))
        if session.status != UploadStatus.OPEN:
            raise Conflict(f"upload {upload_id} is {session.status.value}; it takes no more bytes", field="upload_id")
        if offset != session.received:
            raise Conflict(f"upload {upload_id} has {session.received} bytes; send from offset {session.received}, "
                           f"not {offset}", field="offset")
        if upload_id in self._busy:
            raise Conflict(f"another request is writing upload {upload_id}; wait for it", field="upload_id")
        self._busy.add(upload_id)
        writer: _BackgroundWriter | None = None
        try:
            handle = await anyio.to_thread.run_sync(self._open_at, session, offset)
            writer = _BackgroundWriter(handle)
            buffer, accepted = bytearray(), offset
            try:
                async for chunk in chunks:
                    accepted += len(chunk)
                    if accepted > session.size:
                        raise InvalidInput(f"more bytes than the declared size of {session.size}", field="size")
                    buffer += chunk
                    if len(buffer) >= WRITE_BUFFER:
                        await writer.write(buffer)  # written on a thread while the next buffer fills
                        buffer = bytearray()
                await writer.write(buffer)
                await writer.flush()
            except BaseException:
                await writer.flush()
                await writer.write(buffer)  # keep what arrived before the drop: it is a correct prefix
                await writer.flush()
                raise
            finally:
                await anyio.to_thread.run_sync(handle.close)
        finally:
            received = offset + (writer.written if writer is not None else 0)
            await anyio.to_thread.run_sync(self._set_received, upload_id, received)
            self._busy.discard(upload_id)
        return received

    def complete(self, *, actor: User, upload_id: str) -> ImportTask:
        """All bytes are here: check and store them in the background; returns the import task."""
        session = self.status(actor=actor, upload_id=upload_id)
        if session.status != UploadStatus.OPEN:
            raise Conflict(f"upload {upload_id} is already {session.status.value}", field="upload_id")
        if upload_id in self._busy:
            raise Conflict(f"upload {upload_id} is still receiving bytes", field="upload_id")
        path = self._path(session)
        on_disk = path.stat().st_size if path.is_file() else -1
        if session.received != session.size or on_disk != session.size:
            raise Conflict(f"upload {upload_id} has {session.received} of {session.size} bytes; send the rest first",
                           field="upload_id")
        items = [{"source": session.file_name, "type": session.type.value, "reserved_id": session.model_id,
                  "file_name": session.file_name, "total": session.size}]
        task = self._tasks.submit(kind=TaskKind.UPLOAD, owner=actor, params={"upload_id": upload_id}, items=items)
        with self._db.write() as s:
            row = s.get(UploadSession, upload_id)
            if row is not None:
                row.status, row.task_id, row.updated_at = UploadStatus.COMPLETING, task.id, utcnow()
                s.add(row)
        return task

    def abort(self, *, actor: User, upload_id: str) -> None:
        session = self.status(actor=actor, upload_id=upload_id)
        if session.status == UploadStatus.COMPLETING:
            raise Conflict(f"upload {upload_id} is being imported; it can no longer be cancelled", field="upload_id")
        if upload_id in self._busy:
            raise Conflict(f"upload {upload_id} is receiving bytes; stop sending first", field="upload_id")
        self._remove(session)

    # -- helpers ---------------------------------------------------------------------------------------

    def _path(self, session: UploadSession) -> Path:
        return self.upload_dir / session.id / session.file_name

    def _open_at(self, session: UploadSession, offset: int) -> Any:
        handle = self._path(session).open("r+b")
        handle.truncate(offset)  # bytes past what the row counts (a crash mid-chunk) are re-sent
        handle.seek(offset)
        return handle

    def _set_received(self, upload_id: str, received: int) -> None:
        with self._db.write() as s:
            row = s.get(UploadSession, upload_id)
            if row is not None:
                row.received, row.updated_at = received, utcnow()
                s.add(row)

    def _remove(self, session: UploadSession) -> None:
        shutil.rmtree(self.upload_dir / session.id, ignore_errors=True)
        self._importer.discard_reserved(session.model_id)
        with self._db.write() as s:
            row = s.get(UploadSession, session.id)
            if row is not None:
                s.delete(row)
        log.info("upload %s (%s) removed", session.id, session.file_name)

    # -- the import task ------------------------------------------------------------------------------

    def _run(self, ctx: TaskContext) -> None:
        with self._db.read() as s:
            session = s.get(UploadSession, ctx.params["upload_id"])
        if session is None:
            raise NotFound("the upload behind this task is gone")
        try:
            if session.sha256:
                from pipelines.hashes import sha256_file

                actual = sha256_file(self._path(session))
                if actual != session.sha256:
                    raise InvalidInput(f"{session.file_name} hashes to {actual}, not the announced {session.sha256}; "
                                       "the upload was corrupted — upload it again", field="sha256")
            outcome = self._importer.import_file(self._path(session), ImportRequest(
                owner=ctx.owner, declared_type=session.type, name=session.name, file_name=session.file_name,
                source="upload", visibility=session.visibility, description=session.description,
                metadata=json.loads(session.metadata_json) if session.metadata_json else None,
                reserved_id=session.model_id,
            ), progress=ctx.progress_callback(0))
        except ServiceError as exc:
            self._importer.discard_reserved(session.model_id)
            ctx.update(0, state="failed", message=exc.message, reserved_id=None)
        else:
            ctx.update(0, state="done" if outcome.created else "known", model_id=outcome.record.id,
                       model_name=outcome.record.name, reserved_id=None,
                       message="imported" if outcome.created else "already registered (same bytes)")
        finally:
            if ctx.items[0].get("state") in ("done", "known", "failed"):
                shutil.rmtree(self.upload_dir / session.id, ignore_errors=True)
                with self._db.write() as s:
                    row = s.get(UploadSession, session.id)
                    if row is not None:
                        row.status, row.updated_at = UploadStatus.DONE, utcnow()
                        s.add(row)

    def _reopen(self, task: ImportTask) -> None:
        """A restart interrupted the import: the bytes are still here, so the browser may complete again."""
        upload_id = json.loads(task.params_json).get("upload_id")
        with self._db.read() as s:
            session = s.get(UploadSession, upload_id) if upload_id else None
            owner = s.get(User, session.owner_id) if session is not None else None
        if session is None or not self._path(session).is_file():
            return
        try:
            reserved = self._importer.reserve(
                owner=owner, model_type=session.type, file_name=session.file_name, name=session.name, source="upload",
                source_detail=None, visibility=session.visibility, description=session.description,
            )
        except ServiceError:
            reserved = None
        with self._db.write() as s:
            row = s.get(UploadSession, session.id)
            if row is not None:
                row.status, row.task_id, row.updated_at = UploadStatus.OPEN, None, utcnow()
                row.model_id = reserved.id if reserved else None
                s.add(row)

    def _expire_stale(self) -> None:
        """Sessions abandoned for a week go (with their bytes); checked at most hourly, when uploads start."""
        if time.monotonic() - self._last_expiry < 3600:
            return
        self._last_expiry = time.monotonic()
        with self._db.read() as s:
            sessions = list(s.exec(select(UploadSession).where(UploadSession.status == UploadStatus.OPEN)))
        for session in sessions:
            if _stale(session) and session.id not in self._busy:
                self._remove(session)

    def cleanup(self) -> None:
        """At start: drop finished or week-old sessions and their files, and orphaned ``Initial`` rows (not those
        of another instance's running import)."""
        with self._db.read() as s:
            sessions = list(s.exec(select(UploadSession)))
        live_ids: set[str] = set()
        for session in sessions:
            if session.status == UploadStatus.DONE or (session.status == UploadStatus.OPEN and _stale(session)):
                self._remove(session)
            else:
                live_ids.add(session.id)
        for child in self.upload_dir.iterdir() if self.upload_dir.is_dir() else ():
            if child.name not in live_ids:
                shutil.rmtree(child, ignore_errors=True)
        keep = {s.model_id for s in sessions if s.id in live_ids and s.model_id}
        for task in self._tasks.unfinished_elsewhere().values():  # other instances' imports hold theirs
            keep.update(item["reserved_id"] for item in json.loads(task.items_json) if item.get("reserved_id"))
        with self._db.write() as s:
            # sessions another instance opened since the read above hold theirs too
            keep.update(model_id for model_id in s.exec(select(UploadSession.model_id)) if model_id)
            for record in s.exec(select(ModelRecord).where(ModelRecord.status == ModelStatus.INITIAL)):
                if record.id not in keep:
                    s.delete(record)
