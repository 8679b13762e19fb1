"""Import tasks with several studio instances on one database (SQLite, PostgreSQL): each task belongs to the home
of the instance that took it, so another instance's start leaves it alone, and a restart on the same home (the
same data dir) recovers it.

Each "instance" here is an ``ImportTasks`` with its own ``Instance``, importer and temp dir on one database; a
task runs a handler that waits on an event, so it is running for as long as the test says.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.storage import open_store
from tests.jobs.test_queue import _users
from webapp.db import Database
from webapp.records import ImportTask, ModelRecord, ModelStatus, TaskKind, TaskStatus, User
from webapp.records.models import ModelType, Visibility
from webapp.services.jobs.leases import Instance
from webapp.services.models.importer import Importer
from webapp.services.models.tasks import ImportTasks, TaskContext
from webapp.services.models.uploads import Uploads

WAIT_S = 30


@dataclass
class Side:
    """One instance's import machinery: its tasks, importer and uploads on its own disk."""

    instance: Instance
    tasks: ImportTasks
    importer: Importer
    uploads: Uploads
    started: threading.Event
    release: threading.Event

    def start(self) -> None:
        """What ``build_model_services`` does at start."""
        self.tasks.recover()
        self.uploads.cleanup()
        self.tasks.resume()


@pytest.fixture
def sides(upgraded_db: Database, tmp_path: Path) -> Iterator[dict[str, object]]:
    store = open_store(tmp_path / "store")
    made: list[Side] = []

    def side(name: str, instance: Instance) -> Side:
        disk = tmp_path / name
        importer = Importer(upgraded_db, store, disk / "staging")
        tasks = ImportTasks(upgraded_db, importer, disk / "tmp", 1, instance=instance)
        started, release = threading.Event(), threading.Event()

        def hold(ctx: TaskContext) -> None:  # a long import: running until the test releases it
            ctx.update(0, state="downloading", force=True)
            started.set()
            assert release.wait(WAIT_S)
            ctx.update(0, state="done")

        tasks.register(TaskKind.URL, hold)
        uploads = Uploads(upgraded_db, importer, tasks, disk / "uploads", max_bytes=1 << 20)
        made.append(Side(instance, tasks, importer, uploads, started, release))
        return made[-1]

    yield {"side": side, "db": upgraded_db}
    for one in made:
        one.release.set()
        one.tasks.close()


def _reserve(side: Side, owner: User, file_name: str) -> ModelRecord:
    return side.importer.reserve(owner=owner, model_type=ModelType.LORA, file_name=file_name, name=None,
                                 source="url", source_detail=None, visibility=Visibility.EVERYONE, description=None)


def _task(db: Database, task_id: str) -> ImportTask:
    with db.read() as s:
        return s.get(ImportTask, task_id)


def _model(db: Database, model_id: str) -> ModelRecord | None:
    with db.read() as s:
        return s.get(ModelRecord, model_id)


def test_starting_a_second_instance_leaves_the_first_ones_imports_alone(sides):
    db = sides["db"]
    (alice,) = _users(db, "alice")
    a = sides["side"]("a", Instance())
    a.start()
    reserved = _reserve(a, alice, "big.safetensors")
    running = a.tasks.submit(kind=TaskKind.URL, owner=alice, params={"urls": ["https://example.com/big"]},
                             items=[{"source": "https://example.com/big", "reserved_id": reserved.id}])
    assert a.started.wait(WAIT_S)
    queued = ImportTask(kind=TaskKind.URL, owner_id=alice.id, home=a.instance.home,  # waits for a's pool
                        params_json=json.dumps({"urls": ["https://example.com/next"]}),
                        items_json=json.dumps([{"source": "https://example.com/next"}]))
    with db.write() as s:
        s.add(queued)
    leftover = a.tasks._temp_root / f"task-{running.id}"
    assert _task(db, running.id).home == a.instance.home

    b = sides["side"]("b", Instance())
    b.tasks._temp_root = a.tasks._temp_root  # even a second process on a's data dir keeps a's temp files
    b.start()
    assert _task(db, running.id).status == TaskStatus.RUNNING
    assert _task(db, queued.id).status == TaskStatus.QUEUED and not b.started.is_set()
    assert _model(db, reserved.id).status == ModelStatus.INITIAL  # b's clean-up kept a's reserved row
    assert leftover.is_dir()

    a.release.set()
    finished = a.tasks.wait(running.id, WAIT_S)
    assert finished.status == TaskStatus.SUCCEEDED, finished.message


def test_a_restart_on_the_same_home_recovers_its_own_tasks_only(sides):
    db = sides["db"]
    (alice,) = _users(db, "alice")
    first = sides["side"]("first", Instance())
    other = sides["side"]("other", Instance())
    first.start()
    other.start()
    mine_reserved, theirs_reserved = _reserve(first, alice, "mine.safetensors"), _reserve(other, alice, "theirs.safetensors")
    mine = first.tasks.submit(kind=TaskKind.URL, owner=alice, params={"urls": ["https://example.com/mine"]},
                              items=[{"source": "https://example.com/mine", "reserved_id": mine_reserved.id}])
    theirs = other.tasks.submit(kind=TaskKind.URL, owner=alice, params={"urls": ["https://example.com/theirs"]},
                                items=[{"source": "https://example.com/theirs", "reserved_id": theirs_reserved.id}])
    assert first.started.wait(WAIT_S) and other.started.wait(WAIT_S)
    queued = ImportTask(kind=TaskKind.URL, owner_id=alice.id, home=first.instance.home,
                        params_json=json.dumps({"urls": ["https://example.com/later"]}),
                        items_json=json.dumps([{"source": "https://example.com/later"}]))
    with db.write() as s:
        s.add(queued)

    # "first" dies (its lock on the data dir is gone) and starts again with its home
    again = sides["side"]("again", Instance(first.instance.home))
    again.start()
    failed = _task(db, mine.id)
    assert failed.status == TaskStatus.FAILED and "restart" in failed.message
    assert _model(db, mine_reserved.id) is None
    assert again.started.wait(WAIT_S)  # its queued task resumes here
    assert _task(db, queued.id).status == TaskStatus.RUNNING
    assert _task(db, theirs.id).status == TaskStatus.RUNNING
    assert _model(db, theirs_reserved.id).status == ModelStatus.INITIAL

    other.release.set()
    again.release.set()
    assert other.tasks.wait(theirs.id, WAIT_S).status == TaskStatus.SUCCEEDED
    assert again.tasks.wait(queued.id, WAIT_S).status == TaskStatus.SUCCEEDED


def test_tasks_from_before_homes_are_taken_by_the_first_instance_to_start(sides):
    db = sides["db"]
    (alice,) = _users(db, "alice")
    legacy = ImportTask(kind=TaskKind.URL, owner_id=alice.id, status=TaskStatus.RUNNING,
                        params_json=json.dumps({"urls": ["https://example.com/old"]}),
                        items_json=json.dumps([{"source": "https://example.com/old", "state": "downloading"}]))
    with db.write() as s:
        s.add(legacy)
    first = sides["side"]("first", Instance())
    first.start()
    row = _task(db, legacy.id)
    assert row.home == first.instance.home and row.status == TaskStatus.FAILED
