"""Background import tasks: persisted rows with a progress line per file, run by a small worker pool.

An import of a 7 GB checkpoint takes minutes (download or upload, hash, maybe convert, copy to S3),
so every way in returns a task id at once and the work runs here. The row is the truth the UI and
API poll: its status, overall progress and one line per file (state, bytes, model, error).

Restarts: a task that was *queued* is resumed; one that was *running* is failed with the reason, its
temp directory removed and its reserved ``Initial`` rows dropped (a kind may add its own clean-up,
e.g. an interrupted upload import gives the browser its upload back to complete again).

Several instances on one database: a task belongs to the *home* of the instance that took it
(``leases.Instance.home``, kept with the data dir), because its files are on that machine's disk (the
upload's bytes under ``<data_dir>/uploads``, the server import's roots, the temp files). Start-up recovers
and resumes only the tasks of its own home: "running at start" means "dead" only for them (the home's lock
says the previous process on this data dir is gone); another home's running task belongs to a live
instance, or to one that recovers it when it starts again on its data dir.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlmodel import col, select, update

from webapp.db import Database
from webapp.records import ImportTask, TaskKind, TaskStatus, User, utcnow
from webapp.services.access import can
from webapp.services.errors import NotFound, ServiceError
from webapp.services.jobs.leases import Instance
from webapp.services.models.importer import Importer

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.5
FINAL_ITEM_STATES = ("done", "known", "failed")


class TaskStopped(Exception):
    """The server is shutting down; the task ends as failed with that reason."""


@dataclass
class TaskContext:
    """What a handler gets: the task's request, its items (progress lines) and a scratch directory."""

    task_id: str
    owner: User | None
    params: dict[str, Any]
    items: list[dict[str, Any]]
    temp_dir: Path
    payload: Any
    _runner: ImportTasks
    _last_flush: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, index: int, *, force: bool = False, **changes: Any) -> None:
        """Change one item's line; written to the database at most every FLUSH_SECONDS unless forced."""
        with self._lock:
            state_changed = "state" in changes and changes["state"] != self.items[index].get("state")
            state_changed = state_changed or "reserved_id" in changes  # other instances' clean-up reads it
            self.items[index].update(changes)
            now = time.monotonic()
            if not (force or state_changed) and now - self._last_flush < FLUSH_SECONDS:
                return
            self._last_flush = now
            items = json.loads(json.dumps(self.items, default=str))
        self._runner.save_progress(self.task_id, items)

    def progress_callback(self, index: int) -> Callable[[str, int, int], None]:
        """An importer progress callback updating item `index` (phase, bytes done, bytes total)."""
        def report(phase: str, done: int, total: int) -> None:
            self.check_stop()
            self.update(index, state=phase, done=done, total=total)
        return report

    def check_stop(self) -> None:
        if self._runner.stopping.is_set():
            raise TaskStopped("the server is shutting down")


Handler = Callable[[TaskContext], None]
Interrupted = Callable[[ImportTask], None]


def _fraction(item: dict[str, Any]) -> float:
    if item.get("state") in FINAL_ITEM_STATES:
        return 1.0
    total = item.get("total") or 0
    return min(1.0, (item.get("done") or 0) / total) * 0.99 if total else 0.0


def overall(items: list[dict[str, Any]]) -> float:
    return sum(_fraction(i) for i in items) / len(items) if items else 1.0


class ImportTasks:
    """Runs import handlers by task kind on `workers` threads; rows persist everything shown to users."""

    def __init__(self, db: Database, importer: Importer, temp_root: Path, workers: int, *,
                 instance: Instance) -> None:
        self._db = db
        self.home = instance.home
        self._importer = importer
        self._temp_root = temp_root
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model-import")
        self._handlers: dict[TaskKind, Handler] = {}
        self._on_interrupted: dict[TaskKind, Interrupted] = {}
        self._payloads: dict[str, Any] = {}
        self._done: dict[str, threading.Event] = {}
        self._guard = threading.Lock()
        self.stopping = threading.Event()

    def register(self, kind: TaskKind, handler: Handler, on_interrupted: Interrupted | None = None) -> None:
        self._handlers[kind] = handler
        if on_interrupted is not None:
            self._on_interrupted[kind] = on_interrupted

    # -- submitting and reading ------------------------------------------------------------------------

    def submit(self, *, kind: TaskKind, owner: User | None, params: dict[str, Any], items: list[dict[str, Any]],
               payload: Any = None) -> ImportTask:
        """Persist a queued task and hand it to the pool. `payload` stays in memory (e.g. secrets)."""
        for item in items:
            item.setdefault("state", "waiting")
        task = ImportTask(kind=kind, owner_id=owner.id if owner else None, params_json=json.dumps(params, default=str),
                          items_json=json.dumps(items, default=str), message=f"{len(items)} file(s) queued",
                          home=self.home)
        with self._db.write() as s:
            s.add(task)
        self._enqueue(task.id, payload)
        return task

    def _enqueue(self, task_id: str, payload: Any) -> None:
        with self._guard:
            self._payloads[task_id] = payload
            self._done[task_id] = threading.Event()
        self._pool.submit(self._run, task_id)

    def get(self, *, actor: User, task_id: str) -> ImportTask:
        with self._db.read() as s:
            task = s.get(ImportTask, task_id)
        if task is None or not (can(actor, "model:all") or task.owner_id == actor.id):
            raise NotFound(f"no import task with id {task_id!r}", field="task_id")
        return task

    def list_tasks(self, *, actor: User, limit: int = 20, offset: int = 0) -> list[ImportTask]:
        statement = select(ImportTask).order_by(col(ImportTask.created_at).desc()).offset(offset).limit(limit)
        if not can(actor, "model:all"):
            statement = statement.where(ImportTask.owner_id == actor.id)
        with self._db.read() as s:
            return list(s.exec(statement))

    def wait(self, task_id: str, timeout: float | None = None) -> ImportTask:
        """Block until the task finishes (or `timeout`); returns the latest row."""
        with self._guard:
            event = self._done.get(task_id)
        if event is not None:
            event.wait(timeout)
        with self._db.read() as s:
            task = s.get(ImportTask, task_id)
        if task is None:
            raise NotFound(f"no import task with id {task_id!r}", field="task_id")
        return task

    # -- running ---------------------------------------------------------------------------------------

    def save_progress(self, task_id: str, items: list[dict[str, Any]]) -> None:
        with self._db.write() as s:
            task = s.get(ImportTask, task_id)
            if task is None:
                return
            task.items_json = json.dumps(items, default=str)
            task.progress = overall(items)
            task.updated_at = utcnow()
            s.add(task)

    def _run(self, task_id: str) -> None:
        with self._guard:
            payload = self._payloads.pop(task_id, None)
        temp_dir = self._temp_root / f"task-{task_id}"
        try:
            with self._db.write() as s:
                task = s.get(ImportTask, task_id)
                if task is None or task.status != TaskStatus.QUEUED:
                    return
                task.status, task.started_at, task.updated_at = TaskStatus.RUNNING, utcnow(), utcnow()
                task.message = "running"
                s.add(task)
                owner = s.get(User, task.owner_id) if task.owner_id is not None else None
            ctx = TaskContext(task_id, owner, json.loads(task.params_json), json.loads(task.items_json), temp_dir,
                              payload, self)
            temp_dir.mkdir(parents=True, exist_ok=True)
            error = None
            try:
                self._handlers[task.kind](ctx)
            except TaskStopped as exc:
                error = str(exc)
            except ServiceError as exc:
                error = exc.message
            except Exception as exc:  # a bug must still end the task, visibly, not leave it "running"
                log.exception("import task %s crashed", task_id)
                error = f"internal error: {type(exc).__name__}: {exc}"
            self._finish(ctx, error)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
            with self._guard:
                event = self._done.pop(task_id, None)
            if event is not None:
                event.set()

    def _finish(self, ctx: TaskContext, error: str | None) -> None:
        for index, item in enumerate(ctx.items):
            if item.get("state") not in FINAL_ITEM_STATES:
                ctx.items[index].update(state="failed", message=error or "not processed")
                self._importer.discard_reserved(item.get("reserved_id"))
        states = [i["state"] for i in ctx.items]
        ok = sum(1 for s in states if s in ("done", "known"))
        if ctx.items and ok == len(states):
            status = TaskStatus.SUCCEEDED
        elif ok:
            status = TaskStatus.PARTIAL
        else:
            status = TaskStatus.FAILED
        failed = len(states) - ok
        message = error or f"{ok} of {len(states)} file(s) imported" + (f", {failed} failed" if failed else "")
        with self._db.write() as s:
            task = s.get(ImportTask, ctx.task_id)
            if task is None:
                return
            task.items_json = json.dumps(ctx.items, default=str)
            task.status, task.message, task.progress = status, message, 1.0
            task.finished_at = task.updated_at = utcnow()
            s.add(task)
        log.info("import task %s %s: %s", ctx.task_id, status.value, message)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def recover(self) -> None:
        """At start: fail what a stop of this home interrupted, cleaning up after it (temp files, reserved rows).

        Tasks from before homes were recorded (NULL) are taken by the first instance to start: they come from
        the single instance that ran before the upgrade."""
        with self._db.write() as s:
            s.exec(update(ImportTask).where(col(ImportTask.home).is_(None)).values(home=self.home))  # type: ignore[call-overload]
            running = list(s.exec(select(ImportTask).where(ImportTask.status == TaskStatus.RUNNING,
                                                           ImportTask.home == self.home)))
            for task in running:
                items = json.loads(task.items_json)
                for item in items:
                    if item.get("state") not in FINAL_ITEM_STATES:
                        item.update(state="failed", message="interrupted by a server restart")
                task.items_json = json.dumps(items)
                task.status, task.progress = TaskStatus.FAILED, 1.0
                task.message = "interrupted by a server restart before it finished; nothing of the unfinished " \
                               "files was kept — run the import again"
                task.finished_at = task.updated_at = utcnow()
                s.add(task)
        for task in running:
            for item in json.loads(task.items_json):
                self._importer.discard_reserved(item.get("reserved_id"))
            if (hook := self._on_interrupted.get(task.kind)) is not None:
                hook(task)
            log.warning("import task %s was interrupted by a restart; marked failed", task.id)
        if self._temp_root.is_dir():
            others = self.unfinished_elsewhere()
            for leftover in self._temp_root.glob("task-*"):
                if leftover.name.removeprefix("task-") not in others:  # a second process on this data dir
                    shutil.rmtree(leftover, ignore_errors=True)

    def unfinished_elsewhere(self) -> dict[str, ImportTask]:
        """Queued or running tasks of other homes, by id: other instances' work, which this one leaves alone."""
        with self._db.read() as s:
            rows = s.exec(select(ImportTask).where(col(ImportTask.status).in_([TaskStatus.QUEUED, TaskStatus.RUNNING]),
                                                   ImportTask.home != self.home))
            return {task.id: task for task in rows}

    def resume(self) -> None:
        """After `recover` and the kinds' own clean-up: queue again what a stop of this home left queued."""
        with self._db.read() as s:
            queued = list(s.exec(select(ImportTask).where(ImportTask.status == TaskStatus.QUEUED,
                                                          ImportTask.home == self.home)
                                 .order_by(col(ImportTask.created_at))))
        for task in queued:
            params = json.loads(task.params_json)
            if params.get("resumable", True):
                log.info("resuming queued import task %s", task.id)
                self._enqueue(task.id, None)
            else:
                with self._db.write() as s:
                    row = s.get(ImportTask, task.id)
                    if row is not None:
                        row.status, row.progress, row.finished_at = TaskStatus.FAILED, 1.0, utcnow()
                        row.message = ("the server restarted before this import began; its URLs carried credentials, "
                                       "which are never stored — submit it again")
                        s.add(row)

    def close(self) -> None:
        """Stop: running handlers end at their next chunk, queued ones stay queued for the next start."""
        self.stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
