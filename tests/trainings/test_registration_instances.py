"""Registering a succeeded training's LoRAs with several studio instances on one database (SQLite, PostgreSQL):
one instance's start-up sweep and another's observer may reach the same job together; the claim on the job row
lets exactly one of them import the files.

Each "instance" is a ``TrainingRegistrar`` with its own ``Instance``, importer and temp dir over one database and
one store; the importer is wrapped to count the files each one imports.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from deploy.jobkinds import TRAIN_LORA
from deploy.storage import open_store
from tests.jobs.test_queue import _users
from tests.trainings.conftest import lora_files
from webapp.db import Database
from webapp.records import Job, JobStatus, ModelRecord, ModelType
from webapp.services.jobs.leases import Instance
from webapp.services.models.importer import Importer
from webapp.services.models.registry import ModelRegistry
from webapp.services.models.scan import ModelsDirScanner
from webapp.services.trainings.registration import REGISTERED, TrainingRegistrar

WAIT_S = 60


class CountingImporter(Importer):
    """The real importer, counting the files it is asked to import (by file name), across instances."""

    def __init__(self, *args: Any, counts: Counter[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts = counts

    def import_file(self, path: Path, request: Any) -> Any:  # type: ignore[override]
        self.counts[Path(path).name] += 1
        return super().import_file(path, request)


@pytest.fixture
def world(upgraded_db: Database, tmp_path: Path) -> dict[str, Any]:
    store = open_store(tmp_path / "store")
    counts: Counter[str] = Counter()
    (alice,) = _users(upgraded_db, "alice")
    job = Job(owner_id=alice.id, owner_name=alice.username, mode="train", kind=TRAIN_LORA, endpoint="trainers",
              request_json=json.dumps({"output_name": "catlora"}), status=JobStatus.SUCCEEDED)
    keys = [f"jobs/{job.id}/lora/catlora-000001.safetensors", f"jobs/{job.id}/lora/catlora.safetensors"]
    store.put_file(keys[0], lora_files().epoch)
    store.put_file(keys[1], lora_files().final)
    job.artifact_keys_json = json.dumps(keys)
    with upgraded_db.write() as s:
        s.add(job)

    def registrar(name: str, instance: Instance) -> TrainingRegistrar:
        disk = tmp_path / name
        (disk / "staging").mkdir(parents=True, exist_ok=True)
        importer = CountingImporter(upgraded_db, store, disk / "staging", counts=counts)
        registry = ModelRegistry(upgraded_db, store, importer, ModelsDirScanner(upgraded_db, importer, None, []))
        return TrainingRegistrar(db=upgraded_db, store=store, registry=registry, temp_dir=disk / "trainings",
                                 instance=instance)

    return {"db": upgraded_db, "job": job, "keys": keys, "counts": counts, "registrar": registrar}


def _row(db: Database, job_id: str) -> Job:
    with db.read() as s:
        return s.get(Job, job_id)


def _loras(db: Database) -> list[ModelRecord]:
    with db.read() as s:
        return [m for m in s.query(ModelRecord).all() if m.type == ModelType.LORA and m.source == "training"]


def test_two_instances_registering_one_training_together_import_each_lora_once(world):
    db, job = world["db"], world["job"]
    registrars = [world["registrar"]("a", Instance()), world["registrar"]("b", Instance())]
    together = threading.Barrier(len(registrars), timeout=WAIT_S)
    results: dict[int, Any] = {}

    def register(index: int) -> None:
        together.wait()
        results[index] = registrars[index].register(job.id)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(registrars))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads) and len(results) == 2

    assert world["counts"] == Counter({"catlora.safetensors": 1, "catlora-000001.safetensors": 1})
    row = _row(db, job.id)
    assert row.registered_by in {r._instance.id for r in registrars}
    registered = row.info[REGISTERED]
    assert set(registered) == set(world["keys"])
    assert sorted(m.id for m in _loras(db)) == sorted(registered.values())
    winner = [value for value in results.values() if value]
    assert winner and all(value == registered for value in winner)  # the loser: None, or the same models
    assert all(r.sweep() == [] for r in registrars) and sum(world["counts"].values()) == 2


def test_a_claim_of_a_gone_run_of_the_same_home_is_taken_back_another_homes_is_not(world):
    db, job = world["db"], world["job"]
    home = Instance().home
    with db.write() as s:
        row = s.get(Job, job.id)
        row.registered_by = "0123456789ab.deadbeef0000"  # another instance, busy with it
        s.add(row)
    assert world["registrar"]("a", Instance(home)).sweep() == []
    assert world["registrar"]("a", Instance(home)).register(job.id) is None and not world["counts"]

    with db.write() as s:
        row = s.get(Job, job.id)
        row.registered_by = f"{home}.deadbeef0000"  # this home's previous run, which died mid-registration
        s.add(row)
    again = world["registrar"]("again", Instance(home))
    assert again.sweep() == [job.id]
    assert _row(db, job.id).registered_by == again._instance.id
    assert set(_row(db, job.id).info[REGISTERED]) == set(world["keys"])
    assert sum(world["counts"].values()) == 2
