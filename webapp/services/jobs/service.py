"""JobService: the one way in for every generation (UI, /sdapi/v1, /api/v1), and the way to follow it.

``submit`` validates the A1111-shaped request, resolves its models as the submitting user, enforces
the per-user cap, the role quotas (``quotas.py``) and the disk quota (``webapp/services/quota.py``), stores
the input images in the asset store (``inputs.py``) and enqueues; the endpoint's dispatcher does the rest.

Authorisation lives here (``webapp.services.access``): submitting needs ``inference:create`` (a training
``training:create``), ``endpoint:use`` on the endpoint (``EndpointService.resolve``) and ``model:use`` on every
model (``RequestResolver``); cancelling, interrupting and skipping need ``…:update`` on the job, deleting
``…:delete``. A job the actor may not see (``…:list``: their own, or everyone's with ``…:all``) is NotFound —
never 403 — so job ids reveal nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from sqlalchemy import func, update
from sqlmodel import Session, select

from deploy.backends.base import Backend
from deploy.backends.messages import JobModels
from deploy.jobkinds import GENERATE, get_kind
from deploy.storage import BlobNotFound, BlobStore, StorageError
from webapp.db import Database
from webapp.records import Job, JobMode, JobStatus, ModelRecord, User, utcnow
from webapp.records.jobs import ACTIVE_STATUSES, TERMINAL_STATUSES
from webapp.services.access import authorize, can
from webapp.services.errors import Conflict, InvalidInput, NotFound, Unavailable
from webapp.services.jobs.board import JobBoard
from webapp.services.jobs.dispatcher import Dispatcher
from webapp.services.jobs.endpoints import EndpointService
from webapp.services.jobs.inputs import INPUTS_PREFIX, JobInputs
from webapp.services.jobs.queue import JobQueue, Recovery
from webapp.services.jobs.quotas import JobQuotas, keep_usage_of_deleted
from webapp.services.jobs.readable import readable
from webapp.services.jobs.requests import RequestResolver
from webapp.services.quota import DiskQuota
from webapp.services.text import check_text


def job_resource(mode: JobMode | str | None) -> str:
    """The permission resource a job falls under: ``training`` for trainings, else ``inference``."""
    return "training" if str(mode) == JobMode.TRAIN.value or mode == JobMode.TRAIN else "inference"

log = logging.getLogger(__name__)

WAIT_RECHECK_SECONDS = 2.0
"""``wait`` re-reads the row at least this often even without a wake-up (jobs finished by another process)."""
REAP_SECONDS = 5.0
"""The most time between two looks for running jobs whose lease ran out (their instance died); a third of the
lease when that is shorter."""
INPUT_SWEEP_GRACE = timedelta(hours=1)
"""Input images are written before their row commits, so the sweep leaves young ones alone (a submit in flight
in this or another process); a crash's leftovers go at a later start."""


@dataclass(frozen=True)
class ProgressSnapshot:
    """Where the actor's current job stands (A1111 /progress and the UI progress bar read this)."""

    job_id: str
    status: JobStatus
    mode: str
    task_id: str | None
    step: int
    total: int
    job_no: int
    job_count: int
    progress: float
    eta: float | None
    preview_png: bytes | None
    queue_position: int
    started_at: datetime | None
    created_at: datetime
    metrics: dict[str, float] | None = None
    """The latest numbers the job reported (a training's loss, lr, epoch); None for generation."""
    note: str | None = None
    """Why a running job makes no steps yet (a SageMaker endpoint scaling from zero, with the wait so far)."""


def _fingerprint(job: Job) -> tuple[Any, ...]:
    """What a follower of ``job`` sees change in its row while another instance runs it."""
    return (job.status, job.step, job.steps, job.job_no, job.job_count, job.progress, job.metrics_json,
            job.log_tail)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _parse_status(value: JobStatus | str | None) -> JobStatus | None:
    if value in (None, ""):
        return None
    try:
        return JobStatus(str(value))
    except ValueError:
        raise InvalidInput(f"`status` must be one of {', '.join(s.value for s in JobStatus)}, not {value!r}",
                           field="status") from None


def _parse_mode(value: JobMode | str | None) -> JobMode | None:
    if value in (None, ""):
        return None
    try:
        return JobMode(str(value))
    except ValueError:
        raise InvalidInput(f"`mode` must be one of {', '.join(m.value for m in JobMode)}, not {value!r}",
                           field="mode") from None


class _Follow:
    """What ``wait`` and ``wait_async`` share: the deadline, the board version seen, when the row was read."""

    def __init__(self, board: JobBoard, job_id: str, timeout: float | None) -> None:
        self._board = board
        self._job_id = job_id
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.version = board.version(job_id)  # before the first read, so no change slips between them
        self._last_read = time.monotonic()

    def remaining(self) -> float:
        """How long the next sleep may last (<= 0: the timeout has passed)."""
        if self._deadline is None:
            return WAIT_RECHECK_SECONDS
        return min(WAIT_RECHECK_SECONDS, self._deadline - time.monotonic())

    def must_reload(self, changed: int) -> bool:
        """After a sleep ending at board version ``changed``: must the row be read again? Not while the
        board shows progress and the row was read lately."""
        progressing = changed != self.version and self._board.live(self._job_id) is not None
        self.version = changed
        if progressing and time.monotonic() - self._last_read < WAIT_RECHECK_SECONDS:
            return False
        self._last_read = time.monotonic()
        return True


class JobService:
    def __init__(self, *, db: Database, store: BlobStore, queue: JobQueue, board: JobBoard,
                 endpoints: EndpointService, resolver: RequestResolver, quota: DiskQuota | None = None,
                 quotas: JobQuotas | None = None) -> None:
        self._db = db
        self._store = store
        self._quota = quota
        self.quotas = quotas
        """The role quotas on jobs (None: none apply)."""
        self.queue = queue
        self.board = board
        self.endpoints = endpoints
        self.resolver = resolver
        self.inputs = JobInputs(store)
        self._dispatchers: dict[str, Dispatcher] = {}
        self._wiring = threading.RLock()
        """Held while dispatchers come and go, and by ``submit`` from its running-here check to the enqueue,
        so no job is queued for an endpoint whose dispatcher was just detached (deleted)."""
        self._started = False
        self._stop_reaping = threading.Event()
        self._reaper: threading.Thread | None = None

    # -- wiring -----------------------------------------------------------------------------------------
    def attach(self, dispatcher: Dispatcher) -> None:
        """Run ``dispatcher``'s endpoint here; started at once when the service already runs (an endpoint
        deployed while the server is up)."""
        with self._wiring:
            if dispatcher.endpoint in self._dispatchers:
                raise ValueError(f"endpoint {dispatcher.endpoint!r} already has a dispatcher")
            if self._started:
                dispatcher.start()  # first: one that fails to start is not kept
            self._dispatchers[dispatcher.endpoint] = dispatcher

    def detach(self, endpoint: str) -> Dispatcher | None:
        """Stop sending new jobs to ``endpoint`` here; the caller stops the returned dispatcher."""
        with self._wiring:
            return self._dispatchers.pop(endpoint, None)

    def dispatchers(self) -> dict[str, Dispatcher]:
        """The endpoints running here and their dispatchers (a copy)."""
        with self._wiring:
            return dict(self._dispatchers)

    def start(self) -> Recovery:
        """Recover jobs a crash left running, then start every dispatcher (and sweep orphaned images
        in the background)."""
        with self._wiring:
            adopting = [name for name, d in self._dispatchers.items() if d.adopts]
        recovery = self.queue.recover(adopting=adopting)
        with self._wiring:
            for dispatcher in self._dispatchers.values():
                dispatcher.start()
            self._started = True
        self._stop_reaping.clear()
        self._reaper = threading.Thread(target=self._reap_loop, name="jobs-lease-reaper", daemon=True)
        self._reaper.start()
        threading.Thread(target=self._sweep, name="jobs-orphan-sweep", daemon=True).start()
        return recovery

    def _reap_loop(self) -> None:
        every = min(REAP_SECONDS, self.queue.lease_seconds / 3)
        while not self._stop_reaping.wait(every):
            try:
                self.reap()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the reaping
                log.exception("looking for jobs whose lease ran out failed; looking again in %.1f s", every)

    def reap(self) -> Recovery:
        """Put the running jobs of instances that died (their leases ran out) back in the queue, and hand those
        that run elsewhere with a handle to this instance's dispatchers that adopt (``JobQueue.reap``)."""
        with self._wiring:
            dispatchers = dict(self._dispatchers)
        reaped = self.queue.reap(adopting=[name for name, d in dispatchers.items() if d.adopts])
        for job_id in reaped.changed:
            self.board.touch(job_id)
        if reaped.requeued:
            for dispatcher in dispatchers.values():
                dispatcher.wake()
        if reaped.adopted:
            for dispatcher in dispatchers.values():
                if dispatcher.adopts:
                    dispatcher.adopt_detached()
        return reaped

    def _sweep(self) -> None:
        for sweep in (self.purge_orphan_images, self.measure_unmeasured_jobs):
            try:
                sweep()
            except Exception:  # noqa: BLE001 - a sweep failure must not take the server down; it runs again next start
                log.exception("%s failed", sweep.__name__)

    def measure_unmeasured_jobs(self) -> int:
        """Fill in ``stored_bytes`` of finished jobs recorded before sizes were kept (the row's texts plus the
        stored input and result images), so the disk quota counts them too. Returns the jobs measured."""
        measured = 0
        while True:
            with self._db.read() as s:
                rows = s.exec(select(Job).where(
                    Job.stored_bytes.is_(None), Job.status.in_(TERMINAL_STATUSES)).limit(500)).all()  # type: ignore[union-attr,attr-defined]
            if not rows:
                break
            for job in rows:
                blobs = (self._store.stat(key) for key in [*self.inputs.keys_of(job), *job.image_keys])
                texts = len(job.request_json.encode()) + len((job.engine_request_json or "").encode())
                size = texts + sum(blob.size for blob in blobs if blob is not None)
                with self._db.write() as s:
                    s.exec(update(Job).where(Job.id == job.id).values(stored_bytes=size))  # type: ignore[call-overload]
                measured += 1
        if measured:
            log.info("measured the disk use of %d job(s) recorded before sizes were kept", measured)
        return measured

    def purge_orphan_images(self, *, input_grace: timedelta = INPUT_SWEEP_GRACE) -> int:
        """Delete stored images whose job row is gone — a user deleted with their jobs, a crash between
        storing a result and recording it, or between storing a job's inputs and committing its row — so no
        unreachable image stays behind. Inputs younger than ``input_grace`` are kept (their row may be about
        to commit). Returns blobs deleted."""
        by_job: dict[str, list[str]] = {}
        for blob in self._store.list("jobs/"):
            parts = blob.key.split("/")
            if len(parts) >= 3:  # images, and the artifacts and resumable state of other job kinds
                by_job.setdefault(parts[1], []).append(blob.key)
        cutoff = datetime.now(UTC) - input_grace
        for blob in self._store.list(INPUTS_PREFIX):
            parts = blob.key.split("/")
            if len(parts) == 3 and blob.modified is not None and _aware(blob.modified) <= cutoff:
                by_job.setdefault(parts[1], []).append(blob.key)
        ids = list(by_job)
        deleted = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            with self._db.read() as s:
                known = set(s.exec(select(Job.id).where(Job.id.in_(chunk))).all())  # type: ignore[attr-defined]
            for job_id in chunk:
                if job_id in known:
                    continue
                for key in by_job[job_id]:
                    self._store.delete(key)
                    deleted += 1
        if deleted:
            log.info("deleted %d image(s) of jobs that no longer exist", deleted)
        return deleted

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the reaper and every dispatcher; jobs running elsewhere with a handle stay running for the next
        start (or another instance, once their leases run out)."""
        self._stop_reaping.set()
        if self._reaper is not None:
            self._reaper.join(timeout)
            self._reaper = None
        for dispatcher in self.dispatchers().values():
            dispatcher.stop(timeout, keep_detached=True)
        self.queue.instance.release()  # the next process on this data dir takes back what is left at once

    def backend(self, endpoint: str) -> Backend | None:
        """The backend running ``endpoint`` in this process (diagnostics, benchmarks), or None."""
        dispatcher = self._dispatchers.get(endpoint)
        return dispatcher.backend if dispatcher is not None else None

    def set_default_checkpoint(self, resolver: Callable[[User], str | None]) -> None:
        """Where a request naming no checkpoint takes one from (the API's per-user options plug in here)."""
        self.resolver.default_checkpoint = resolver

    def model_in_use(self, record: ModelRecord) -> str | None:
        """For the registry's delete guard: a queued/running job using ``record``'s file, described."""
        if not record.sha256:
            return None
        with self._db.read() as s:
            job = s.exec(select(Job).where(Job.status.in_(ACTIVE_STATUSES),  # type: ignore[attr-defined]
                                           Job.models_json.contains(record.sha256))  # type: ignore[attr-defined]
                         .order_by(Job.created_at)).first()
        return f"job {job.title} of {job.owner_name}" if job else None

    # -- submit -------------------------------------------------------------------------------------------
    def submit(self, *, actor: User, mode: str, request: dict, endpoint: str | None = None,
               task_id: str | None = None) -> Job:
        """Validate, resolve models as ``actor``, enforce the cap, enqueue; returns the queued job."""
        authorize(actor, "inference:create")
        check_text({"endpoint": endpoint, "task_id": task_id})
        target = self.endpoints.resolve(actor=actor, name=endpoint)
        self._check_running_here(target.name)
        prepared = self.resolver.prepare(actor=actor, mode=mode, request=request)  # the one validation
        if task_id is not None and (not isinstance(task_id, str) or len(task_id) > 128):
            raise InvalidInput("`task_id` must be a string of at most 128 characters", field="task_id")
        job = Job(
            owner_id=actor.id, owner_name=actor.username, mode=prepared.mode, endpoint=target.name, task_id=task_id,
            request_json="", models_json=json.dumps(prepared.models.to_dict()),
            checkpoint=prepared.checkpoint.name, checkpoint_hash=prepared.checkpoint.autov2,
            job_count=prepared.request.n_iter,
        )
        staged = self.inputs.stage(job_id=job.id, request=request, engine=prepared.request,
                                   units=prepared.units_by_arg)
        job.request_json, job.engine_request_json = staged.request_json, staged.engine_request_json
        job.stored_bytes = staged.stored_bytes
        admit = self._admission(actor)
        self._admit_early(admit)  # before the inputs are written
        try:
            self.inputs.write(staged)  # before the row commits: a queued job always finds its inputs
        except StorageError as exc:
            log.exception("job %s: storing its input images failed", job.id)
            raise Unavailable(f"the asset store could not take the job's input images: {exc}",
                              field="init_images") from None
        try:
            with self._wiring:
                self._check_running_here(target.name)  # again: it may have been deleted meanwhile
                self.queue.enqueue(job, admit=admit)
        except BaseException:
            self.inputs.delete(staged.keys)  # a refused submit leaves nothing behind
            raise
        log.info("job %s (%s) queued by %s on %s", job.id, job.mode, actor.username, target.name)
        dispatcher = self._dispatchers.get(target.name)
        if dispatcher is not None:
            dispatcher.wake()
        return job

    def submit_task(self, *, actor: User, kind: str, payload: Mapping[str, Any], models: JobModels,
                    endpoint: str | None = None, task_id: str | None = None, job_id: str | None = None,
                    artifact_keys: Sequence[str] = ()) -> Job:
        """Enqueue a job of a kind other than generation (``deploy.jobkinds``: ``train_lora``). The caller's service
        has validated ``payload`` and resolved ``models`` as ``actor``; here the endpoint must run the kind, and the
        per-user cap and the disk quota apply as for generation. The payload is stored as the job's request.

        ``job_id`` (a fresh ``new_id()``) lets the caller put files under ``jobs/<job_id>/`` before the job can be
        claimed (a resumed training's state); by default the row makes its own id. ``artifact_keys``: files the
        caller put there that are the job's artifacts from the start (a resumed training's earlier epochs); like
        the ones its worker reports, their bytes count when the job ends."""
        check_text({"endpoint": endpoint, "task_id": task_id})
        job_kind = get_kind(kind)
        if job_kind.name == GENERATE:
            raise InvalidInput("generation jobs are submitted with `submit`", field="kind")
        authorize(actor, f"{job_resource(job_kind.modes[0])}:create")
        target = self.endpoints.resolve(actor=actor, name=endpoint)
        declared = target.capabilities.get("kinds") or [GENERATE]
        if job_kind.name not in declared:
            raise Conflict(f"endpoint {target.name!r} does not run {job_kind.description or job_kind.name} jobs "
                           f"(it runs: {', '.join(declared)})", field="endpoint")
        self._check_running_here(target.name)
        request_json = json.dumps(dict(payload))
        if job_id is not None and (not isinstance(job_id, str) or not job_id.isalnum() or len(job_id) > 32):
            raise InvalidInput("`job_id` must be at most 32 letters and digits", field="job_id")
        job = Job(owner_id=actor.id, owner_name=actor.username, mode=JobMode(job_kind.modes[0]), kind=job_kind.name,
                  endpoint=target.name, task_id=task_id, request_json=request_json,
                  models_json=json.dumps(models.to_dict()), checkpoint=models.checkpoint.name,
                  checkpoint_hash=models.checkpoint.sha256[:10] or None, job_count=1,
                  stored_bytes=len(request_json.encode()))
        if artifact_keys:
            prefix = f"jobs/{job_id}/"
            if job_id is None or not all(isinstance(k, str) and k.startswith(prefix) for k in artifact_keys):
                raise InvalidInput("`artifact_keys` must lie under the job's own jobs/<job_id>/", field="artifact_keys")
            job.artifact_keys_json = json.dumps(list(dict.fromkeys(artifact_keys)))
        if job_id is not None:
            job.id = job_id
        admit = self._admission(actor)
        self._admit_early(admit)
        with self._wiring:
            self._check_running_here(target.name)
            self.queue.enqueue(job, admit=admit)
        log.info("job %s (%s) queued by %s on %s", job.id, job.kind, actor.username, target.name)
        dispatcher = self._dispatchers.get(target.name)
        if dispatcher is not None:
            dispatcher.wake()
        return job

    def _admission(self, actor: User) -> Callable[[Session], None] | None:
        """The disk and role-quota checks ``JobQueue.enqueue`` runs in the transaction that inserts the job (the
        limits are read now, before it: a role edited meanwhile applies from the next submit; the usage inside it,
        so parallel submits cannot all fit under a limit that only one of them fits)."""
        checks: list[Callable[[Session], None]] = []
        if self._quota is not None and (disk := self._quota.admission(actor)) is not None:
            checks.append(disk)
        if self.quotas is not None:
            quotas, limits = self.quotas, self.quotas.limits(actor)
            checks.append(lambda s: quotas.admit(s, actor, limits))
        if not checks:
            return None

        def admit(s: Session) -> None:
            for check in checks:
                check(s)

        return admit

    def _admit_early(self, admit: Callable[[Session], None] | None) -> None:
        """The admission checks once before the submit does any work (a refusal costs nothing); they run again,
        authoritative, in the transaction that inserts the job."""
        if admit is not None:
            with self._db.read() as s:
                admit(s)

    def _check_running_here(self, endpoint: str) -> None:
        if self._started and endpoint not in self._dispatchers:
            # Recorded but not running here (added by another process, or being deleted): a job sent there
            # would wait forever, so say so now.
            raise Conflict(f"endpoint {endpoint!r} has no backend running on this server (it is being deleted, or "
                           f"another process recorded it: restart the server to start it)", field="endpoint")

    # -- reads --------------------------------------------------------------------------------------------
    def _load(self, job_id: str) -> Job | None:
        with self._db.read() as s:
            job = s.get(Job, job_id)
        return readable(job) if job is not None else None

    @staticmethod
    def _visible(actor: User, job: Job | None, job_id: str) -> Job:
        if job is None or not can(actor, f"{job_resource(job.mode)}:list", job):
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return job

    def get(self, *, actor: User, job_id: str) -> Job:
        return self._visible(actor, self._load(job_id), job_id)

    def find_by_task(self, *, actor: User, task_id: str) -> Job:
        """The actor's newest job submitted with ``task_id`` (A1111 ``force_task_id``)."""
        with self._db.read() as s:
            job = s.exec(select(Job).where(Job.task_id == task_id, Job.owner_id == actor.id)
                         .order_by(Job.created_at.desc())).first()  # type: ignore[attr-defined]
        return self._visible(actor, readable(job) if job is not None else None, task_id)

    def list_jobs(self, *, actor: User, mode: str | Sequence[str] | None = None, status: str | None = None,
                  endpoint: str | None = None, checkpoint: str | None = None, since: datetime | None = None,
                  until: datetime | None = None, limit: int | None = 10, offset: int = 0,
                  all_users: bool = False) -> tuple[list[Job], int]:
        """The actor's jobs newest first (admins: everyone's with ``all_users``), filtered; plus the total.

        ``mode`` may be one type or several (the img2img tab lists img2img and inpaint jobs).
        """
        if limit is not None and limit < 0 or offset < 0:
            raise InvalidInput("`limit` and `offset` must not be negative", field="limit" if offset >= 0 else "offset")
        modes = [mode] if isinstance(mode, str) or mode is None else list(mode)
        resource = "training" if modes == ["train"] else "inference"
        authorize(actor, f"{resource}:list")
        conditions = []
        if not (all_users and can(actor, f"{resource}:all")):
            conditions.append(Job.owner_id == actor.id)
        parsed_modes = [m for m in (_parse_mode(m) for m in modes) if m is not None]
        if parsed_modes:
            conditions.append(Job.mode.in_(parsed_modes))  # type: ignore[attr-defined]
        if (parsed_status := _parse_status(status)) is not None:
            conditions.append(Job.status == parsed_status)
        if endpoint:
            conditions.append(Job.endpoint == endpoint)
        if checkpoint:
            conditions.append(Job.checkpoint == checkpoint)
        if since is not None:
            conditions.append(Job.created_at >= since)
        if until is not None:
            conditions.append(Job.created_at <= until)
        with self._db.read() as s:
            total = s.exec(select(func.count()).select_from(Job).where(*conditions)).one()
            statement = select(Job).where(*conditions).order_by(Job.created_at.desc(), Job.id).offset(offset)  # type: ignore[attr-defined]
            if limit is not None:
                statement = statement.limit(limit)
            jobs = [readable(job) for job in s.exec(statement).all()]
        return jobs, total

    def checkpoints_used(self, *, actor: User, all_users: bool = False) -> list[str]:
        """Checkpoint names in the actor's history (for the History filter)."""
        statement = select(Job.checkpoint).distinct().where(Job.checkpoint.is_not(None))  # type: ignore[union-attr]
        if not (all_users and can(actor, "inference:all")):
            statement = statement.where(Job.owner_id == actor.id)
        with self._db.read() as s:
            return sorted(c for c in s.exec(statement).all() if c)

    def wait(self, *, actor: User, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is finished (or ``timeout`` seconds pass); returns the latest row.

        Sleeps on the board's condition (woken by the dispatcher). While the board shows the job running
        (progress events) the row is not re-read; it is on other wake-ups (start, end) and every couple of
        seconds, so many waiters cost the database almost nothing. Holds its thread: for worker threads
        (the UI); HTTP handlers await ``wait_async``.
        """
        follow = _Follow(self.board, job_id, timeout)
        job = self.get(actor=actor, job_id=job_id)
        while not job.is_terminal and (remaining := follow.remaining()) > 0:
            if follow.must_reload(self.board.wait(job_id, follow.version, remaining)):
                job = self.get(actor=actor, job_id=job_id)
        return job

    async def wait_async(self, *, actor: User, job_id: str, timeout: float | None = None) -> Job:
        """``wait`` for the event loop: the waiting costs no thread (rows are read on a worker thread)."""
        read = functools.partial(self.get, actor=actor, job_id=job_id)
        follow = _Follow(self.board, job_id, timeout)
        job = await anyio.to_thread.run_sync(read)
        while not job.is_terminal and (remaining := follow.remaining()) > 0:
            if follow.must_reload(await self.board.wait_async(job_id, follow.version, remaining)):
                job = await anyio.to_thread.run_sync(read)
        return job

    async def changed_async(self, *, actor: User, job: Job, version: int, timeout: float) -> bool:
        """Await news of ``job`` (as loaded, with the board at ``version`` before): the board's, when it runs here,
        else a change of its row — another instance runs it and writes its progress every second or so, so the
        row is read again every ``WAIT_RECHECK_SECONDS``. False when ``timeout`` passed without news; raises
        NotFound when the job was deleted."""
        deadline = time.monotonic() + timeout
        seen = _fingerprint(job)
        while (remaining := deadline - time.monotonic()) > 0:
            if await self.board.wait_async(job.id, version, min(remaining, WAIT_RECHECK_SECONDS)) != version:
                return True
            current = await anyio.to_thread.run_sync(functools.partial(self.get, actor=actor, job_id=job.id))
            if _fingerprint(current) != seen:
                return True
        return False

    def submitted_request(self, job: Job) -> dict:
        """The request of a job the caller already loaded (and may see) as its client sent it, input images
        inline as base64 again (the row holds references to the asset store)."""
        return self.inputs.as_submitted(job)

    def image_count(self, job: Job) -> int:
        return len(job.image_keys)

    def image(self, *, actor: User, job_id: str, index: int) -> bytes:
        """One result PNG exactly as stored (its ``parameters`` chunk included)."""
        job = self.get(actor=actor, job_id=job_id)
        keys = job.image_keys
        if not 0 <= index < len(keys):
            raise NotFound(f"job {job_id!r} has no image {index}", field="index")
        try:
            with self._store.open(keys[index]) as handle:
                return handle.read()
        except BlobNotFound:
            raise NotFound(f"image {index} of job {job_id!r} is missing from the asset store") from None

    def images(self, *, actor: User, job_id: str) -> list[bytes]:
        job = self.get(actor=actor, job_id=job_id)
        return [self.image(actor=actor, job_id=job.id, index=i) for i in range(len(job.image_keys))]

    def current_job(self, *, actor: User) -> Job | None:
        """The actor's running generation job (most recently started), else their oldest queued one, else None
        (A1111's /progress, /interrupt and /skip speak of generation: a training of theirs is not touched)."""
        mine = (Job.owner_id == actor.id, Job.kind == GENERATE)
        with self._db.read() as s:
            running = s.exec(select(Job).where(*mine, Job.status == JobStatus.RUNNING)
                             .order_by(Job.started_at.desc())).first()  # type: ignore[union-attr]
            job = running or s.exec(select(Job).where(*mine, Job.status == JobStatus.QUEUED)
                                    .order_by(Job.created_at)).first()
        return readable(job) if job is not None else None

    def progress(self, *, actor: User, job_id: str) -> ProgressSnapshot:
        return self._snapshot(self.get(actor=actor, job_id=job_id))

    def current_progress(self, *, actor: User) -> ProgressSnapshot | None:
        """The actor's current job (running, else queued) as a snapshot; None when they have none."""
        job = self.current_job(actor=actor)
        return self._snapshot(job) if job is not None else None

    def snapshot_of(self, job: Job) -> ProgressSnapshot:
        """The snapshot of a job the caller already loaded (and was allowed to see)."""
        return self._snapshot(job)

    def _snapshot(self, job: Job) -> ProgressSnapshot:
        live = self.board.live(job.id) if job.status == JobStatus.RUNNING else None
        note = None
        if live is not None:
            step, total, job_no, job_count = live.step, live.total, live.job_no, live.job_count
            fraction, eta, preview, metrics = live.fraction, live.eta, live.preview_png, live.metrics
            note = live.note
        else:
            step, total, job_no, job_count = job.step, job.steps, job.job_no, job.job_count
            fraction, eta, preview = job.progress, job.eta_seconds, None
            metrics = job.metrics.get("latest") or None
        position = self.queue.position(job) if job.status == JobStatus.QUEUED else 0
        return ProgressSnapshot(
            job_id=job.id, status=JobStatus(job.status), mode=str(job.mode), task_id=job.task_id, step=step,
            total=total, job_no=job_no, job_count=job_count, progress=1.0 if job.status == JobStatus.SUCCEEDED
            else fraction, eta=eta, preview_png=preview, queue_position=position, started_at=job.started_at,
            created_at=job.created_at, metrics=metrics, note=note)

    # -- changes ----------------------------------------------------------------------------------------------
    def cancel(self, *, actor: User, job_id: str) -> Job:
        """Cancel a queued job now, or stop a running one within one sampling step. Finished jobs are left."""
        job = self.get(actor=actor, job_id=job_id)
        authorize(actor, f"{job_resource(job.mode)}:update", job, what=f"job {job.id}")
        self._cancel(actor, job)
        return self.get(actor=actor, job_id=job_id)

    def _cancel(self, actor: User, job: Job) -> None:
        if job.status == JobStatus.QUEUED and self.queue.cancel_queued(job.id, f"cancelled by {actor.username}"):
            self.board.finish(job.id)
            log.info("job %s cancelled by %s while queued", job.id, actor.username)
        elif self.queue.request_cancel(job.id):
            dispatcher = self._dispatchers.get(job.endpoint)
            if dispatcher is not None and job.id in dispatcher.in_flight():
                dispatcher.cancel(job.id)  # another instance's dispatcher finds the flag when it renews its lease
            log.info("job %s: cancel requested by %s while running", job.id, actor.username)

    def delete(self, *, actor: User, job_id: str) -> None:
        """Delete the job and its images (a running job is cancelled first)."""
        job = self.get(actor=actor, job_id=job_id)
        authorize(actor, f"{job_resource(job.mode)}:delete", job, what=f"job {job.id}")
        if job.status in ACTIVE_STATUSES:
            self._cancel(actor, job)
        with self._db.write() as s:
            row = s.get(Job, job.id)
            keys = [*row.image_keys, *row.artifact_keys, *self.inputs.keys_of(row)] if row is not None else []
            if row is not None:
                keep_usage_of_deleted(s, row, utcnow())  # deleting today's jobs gives no daily quota back
                s.delete(row)
        keys += [blob.key for blob in self._store.list(f"jobs/{job.id}/")]  # state a worker kept to resume from
        for key in dict.fromkeys(keys):
            self._store.delete(key)
        self.board.forget(job.id)
        log.info("job %s deleted by %s", job.id, actor.username)

    def release_memory(self, *, actor: User) -> list[str]:
        """Every backend drops its loaded models (A1111 unload-checkpoint). Administrators only: it slows
        the next job of every user (``endpoint:update``). Returns the endpoints asked."""
        authorize(actor, "endpoint:update")
        return self.release_all_memory(reason=f"asked by {actor.username}")

    def release_all_memory(self, *, reason: str) -> list[str]:
        """``release_memory`` for the server itself (the idle watcher): no actor, the reason is logged. A backend
        that fails (a remote worker out of reach) is logged and left out; the others are still asked."""
        names = []
        for name, dispatcher in self.dispatchers().items():
            try:
                dispatcher.backend.release_memory()
            except Exception:  # noqa: BLE001 - one endpoint's failure must not keep the others' memory held
                log.exception("endpoint %s could not release its loaded models", name)
                continue
            names.append(name)
        log.info("released the loaded models of %s (%s)", ", ".join(names) or "no endpoint", reason)
        return names

    def active_jobs(self) -> int:
        """Jobs queued or running on the endpoints this server dispatches (the idle watcher asks)."""
        names = list(self._dispatchers)
        if not names:
            return 0
        with self._db.read() as s:
            return s.exec(select(func.count()).select_from(Job).where(
                Job.status.in_(ACTIVE_STATUSES), Job.endpoint.in_(names))).one()  # type: ignore[attr-defined]

    def interrupt(self, *, actor: User) -> Job | None:
        """A1111 /interrupt, per caller: cancel the job ``/progress`` shows them — the running one, else
        their oldest queued one (on a shared server a client's request may still wait in the queue).
        Batches already finished are kept. Returns the job, or None when the caller is idle."""
        job = self.current_job(actor=actor)
        return self.cancel(actor=actor, job_id=job.id) if job is not None else None

    def skip(self, *, actor: User) -> Job | None:
        """A1111 /skip, per caller: the running job drops its current batch and goes on with the next
        (``n_iter``). A backend that cannot skip ends the job instead, keeping the finished batches.
        Returns the job, or None when nothing of the caller's is running."""
        job = self.current_job(actor=actor)
        if job is None or job.status != JobStatus.RUNNING:
            return None
        authorize(actor, f"{job_resource(job.mode)}:update", job, what=f"job {job.id}")
        dispatcher = self._dispatchers.get(job.endpoint)
        if dispatcher is not None and dispatcher.skip(job.id):
            log.info("job %s: %s skipped its current batch", job.id, actor.username)
            return self.get(actor=actor, job_id=job.id)
        return self.cancel(actor=actor, job_id=job.id)
