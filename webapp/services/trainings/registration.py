"""A succeeded training's LoRAs become models: the final LoRA and every epoch LoRA, owned by the job's owner.

`TrainingRegistrar` is a job observer (``webapp/services/jobs/observers.py``): the queue tells it when a job
finishes, and for a succeeded ``train_lora`` job it reads each LoRA from the asset store into a temp file and
registers it through the one import path (``Importer.import_file``: probed, hashed, stored under ``models/``),
private, named ``<output_name>`` and ``<output_name>-000001`` … (another model of the name gets the importer's
``-<hash8>`` suffix), with the run's facts as metadata. The work runs on one background thread, so the
dispatcher that recorded the job is not held up by hashing.

Each job is registered once: the models made are remembered on the job row (``info.registered_models``, key →
model id; failures in ``info.registration_errors``), so a start-up sweep registers the jobs that finished while
the studio was down and skips the rest — and a LoRA the owner deleted is not brought back. Registering the
same bytes again would in any case give back the owner's existing model (the importer dedupes by sha256).

Several instances on one database each run a registrar: one's start-up sweep may meet another's observer on the
same job. Before any work, a registrar *claims* the job: one write transaction that finds it not registered yet
and sets ``Job.registered_by`` to its instance id with a conditional UPDATE (``WHERE registered_by IS NULL``), so
exactly one instance goes on. A claim left by a process that died before it remembered the models is taken back
by the next start on the same data dir (same home, see ``webapp/services/jobs/leases.py``); a registration that
fails in this process gives its claim back for the next sweep.

A registered LoRA is stored once: when the owner's model holds the bytes in the store, the job gives up its copy
(deleted from ``jobs/<id>/lora/``, its size taken off the job's ``stored_bytes``, the key listed in
``info.handed_to_models``), so the disk quota counts the file once, with the model, and deleting either the job
or the model leaves the count equal to what is stored. The training still serves that file, from the model.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import or_
from sqlmodel import col, select, update

from deploy.jobkinds import TRAIN_LORA
from deploy.storage import BlobStore, StorageError
from webapp.db import Database
from webapp.records import Job, JobStatus, ModelRecord, ModelType, User, Visibility
from webapp.services.errors import ServiceError
from webapp.services.jobs.leases import Instance
from webapp.services.jobs.observers import FinishedJob, JobObserver
from webapp.services.models import ImportRequest, ModelRegistry
from webapp.services.trainings.service import HANDED, REGISTERED, lora_keys

__all__ = ["ERRORS", "HANDED", "REGISTERED", "TrainingRegistrar"]

log = logging.getLogger(__name__)

ERRORS = "registration_errors"
_EPOCH = re.compile(r"-(\d{6})$")


def _epoch_of(key: str) -> int | None:
    match = _EPOCH.search(PurePosixPath(key).stem)
    return int(match.group(1)) if match else None


def _lora_summary(path: Path) -> dict[str, Any]:
    """What ``training.metadata.summary`` reads back from the file (base, rank, epochs, top tags, hashes); the
    whole header is kept by the importer already (``metadata.file.header``)."""
    from training.metadata import summary  # imports torch: only on this background thread

    try:
        found = summary(path)
    except (OSError, ValueError) as exc:  # a summary is a nicety: the model is registered without one
        log.warning("could not read the metadata summary of %s: %s", path.name, exc)
        return {}
    found.pop("metadata", None)
    return found


class TrainingRegistrar(JobObserver):
    def __init__(self, *, db: Database, store: BlobStore, registry: ModelRegistry, temp_dir: Path,
                 instance: Instance | None = None) -> None:
        self._db = db
        self._instance = instance or Instance()
        self._store = store
        self._registry = registry
        self._temp_dir = temp_dir
        self._lock = threading.Lock()
        self._pending: list[Future[Any]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="training-registration")

    # -- the observer -------------------------------------------------------------------------------------

    def job_finished(self, finished: FinishedJob) -> None:
        if finished.mode == "train" and finished.status == JobStatus.SUCCEEDED:
            self._submit(self.register, finished.job_id)

    def start(self) -> None:
        """Register, in the background, the succeeded trainings whose LoRAs are not registered yet."""
        self._submit(self.sweep)

    def _submit(self, fn: Any, *args: Any) -> None:
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._executor.submit(self._logged, fn, *args))

    @staticmethod
    def _logged(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - the next start's sweep tries again
            log.exception("training registration %s%s failed", fn.__name__, args)
            return None

    def wait(self, timeout: float | None = None) -> None:
        """Until the registrations asked for so far are done (tests, shutdown)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.result(timeout)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- the work -----------------------------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Register every succeeded training not registered yet; returns the job ids done now."""
        with self._db.read() as s:
            rows = s.exec(select(Job.id, Job.info_json).where(
                Job.kind == TRAIN_LORA, Job.status == JobStatus.SUCCEEDED, self._claimable())).all()
        todo = [job_id for job_id, info in rows if REGISTERED not in json.loads(info or "{}")]
        todo = [job_id for job_id in todo if self.register(job_id) is not None]
        if todo:
            log.info("registered the LoRAs of %d training(s) that finished while the studio was down", len(todo))
        return todo

    def _claimable(self) -> Any:
        """Jobs whose registration no one holds, or a predecessor of this home held (that process is gone)."""
        mine = self._instance.id
        return or_(col(Job.registered_by).is_(None),
                   col(Job.registered_by).startswith(self._instance.home_prefix) & (col(Job.registered_by) != mine))

    def _claim(self, job_id: str) -> tuple[Job, User] | dict[str, str] | None:
        """Take the job's registration for this instance: the job and its owner to register; the models already
        registered; or None (not a succeeded training with an owner, or another instance holds it)."""
        with self._db.write() as s:  # the check and the conditional UPDATE in one write transaction
            job = s.get(Job, job_id)
            owner = s.get(User, job.owner_id) if job is not None and job.owner_id is not None else None
            if job is None or job.kind != TRAIN_LORA or job.status != JobStatus.SUCCEEDED or owner is None:
                return None
            info = job.info or {}
            if REGISTERED in info:
                return dict(info[REGISTERED])
            claimed = s.exec(update(Job).where(col(Job.id) == job_id, self._claimable())  # type: ignore[call-overload]
                             .values(registered_by=self._instance.id)
                             .execution_options(synchronize_session=False))
            if claimed.rowcount != 1:
                log.info("training %s: instance %s registers its LoRAs", job_id, job.registered_by)
                return None
        return job, owner

    def _unclaim(self, job_id: str) -> None:
        with self._db.write() as s:
            s.exec(update(Job).where(col(Job.id) == job_id, col(Job.registered_by) == self._instance.id)  # type: ignore[call-overload]
                   .values(registered_by=None).execution_options(synchronize_session=False))

    def register(self, job_id: str) -> dict[str, str] | None:
        """Register the job's LoRAs (once, by one instance); returns artifact key → model id, or None when there
        is nothing to register here (not a succeeded training, or another instance registers it)."""
        claim = self._claim(job_id)
        if not isinstance(claim, tuple):
            return claim
        job, owner = claim
        try:
            return self._register(job, owner)
        except BaseException:
            self._unclaim(job_id)  # the next sweep tries again
            raise

    def _register(self, job: Job, owner: User) -> dict[str, str]:
        keys = lora_keys(job)
        final = [k for k in keys if _epoch_of(k) is None]
        registered: dict[str, str] = {}
        handed: dict[str, int] = {}  # key -> bytes the owner's model now holds in the store
        errors: dict[str, str] = {}
        workdir = Path(tempfile.mkdtemp(prefix="training-", dir=self._ensure_temp()))
        try:
            for key in [*final, *(k for k in keys if k not in final)]:  # the final LoRA takes the plain name
                try:
                    record, size = self._register_one(job, owner, key, workdir)
                except (ServiceError, StorageError) as exc:
                    message = exc.message if isinstance(exc, ServiceError) else str(exc)
                    log.warning("training %s: %s was not registered: %s", job.id, key, message)
                    errors[key] = message
                    continue
                registered[key] = record.id
                if record.store_key and record.owner_id == job.owner_id:
                    handed[key] = size
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if self._remember(job.id, registered, errors, handed):
            self._give_up_copies(job.id, handed)
        log.info("training %s: registered %d LoRA(s) for %s", job.id, len(registered), owner.username)
        return registered

    def _ensure_temp(self) -> Path:
        self._temp_dir.mkdir(parents=True, exist_ok=True)
        return self._temp_dir

    def _register_one(self, job: Job, owner: User, key: str, workdir: Path) -> tuple[ModelRecord, int]:
        """The model now holding the LoRA at ``key`` (made, or the owner's with the same bytes) and its size."""
        file_name = PurePosixPath(key).name
        local = workdir / file_name
        self._store.download_to(key, local)
        payload = job.request
        epoch = _epoch_of(key)
        what = f"epoch {epoch} of" if epoch is not None else "final LoRA of"
        description = (f"{what} training job {job.id} on {payload.get('base_model_name') or job.checkpoint} "
                       f"(dataset {payload.get('dataset_id')})")
        metadata = {"training": {"job_id": job.id, "epoch": epoch, "final": epoch is None,
                                 "base_type": payload.get("base_type"), "base_model": payload.get("base_model_name"),
                                 "dataset_id": payload.get("dataset_id"), "artifact_key": key}}
        summary = _lora_summary(local)
        if summary:
            metadata["summary"] = summary
        request = ImportRequest(owner=owner, declared_type=ModelType.LORA, file_name=file_name, source="training",
                                source_detail=f"job {job.id}", visibility=Visibility.PRIVATE,
                                description=description, metadata=metadata)
        return self._registry.importer.import_file(local, request).record, local.stat().st_size

    def _remember(self, job_id: str, registered: dict[str, str], errors: dict[str, str],
                  handed: dict[str, int]) -> bool:
        """Record the registration and take the handed-over files off the job's bytes; False if the job is gone."""
        with self._db.write() as s:
            row = s.get(Job, job_id)
            if row is None:
                return False
            info = row.info or {}
            info[REGISTERED] = registered
            if errors:
                info[ERRORS] = errors
            if handed:
                info[HANDED] = sorted(handed)
                row.stored_bytes = max(0, (row.stored_bytes or 0) - sum(handed.values()))
            row.info_json = json.dumps(info)
            s.add(row)
        return True

    def _give_up_copies(self, job_id: str, handed: dict[str, int]) -> None:
        """Delete the job's copies of files its owner's models now hold (after the row says so: a failure here
        leaves a file the job's deletion removes, never a model without its bytes)."""
        for key in handed:
            try:
                self._store.delete(key)
            except StorageError:
                log.warning("training %s: could not delete %s, now held by a model", job_id, key, exc_info=True)
