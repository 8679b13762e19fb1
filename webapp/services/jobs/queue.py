"""The persistent job queue: rows in the ``job`` table, claimed atomically and fairly.

Claiming is one write transaction (``BEGIN IMMEDIATE`` on SQLite serialises claimers; on PostgreSQL
the chosen row is locked ``FOR UPDATE SKIP LOCKED``), and the status change is conditional
(``... WHERE status = 'queued'``), so no job runs twice however many dispatchers claim at once.

Fairness is per owner, not per job: the next job belongs to the owner with the fewest running jobs,
then the one served least recently, then the one whose oldest queued job is oldest; within an owner
jobs run first-in first-out. One user's hundred queued jobs therefore take turns with another user's
single job instead of starving it.

Several studio instances may share the database, so a running job is *leased*: the claim records the claiming
instance (``leases.Instance``) and an expiry, the instance's dispatcher renews the leases of its jobs while they
run (``renew``, one UPDATE for all of them, which also answers which of them another instance asked to cancel),
and every row change a dispatcher makes to a running job is conditional on still holding it. A job whose lease
ran out belongs to an instance that died: ``reap`` (every few seconds in each instance, and at start as
``recover``, which also takes back the jobs of this installation's previous run at once) puts it back in the
queue unless it has already been started ``max_attempts`` times (then it fails with the reason: it may be what
kills the server), and a running job whose cancel was requested ends cancelled. A job that runs elsewhere and left a
handle (``remote_handle_json``: a SageMaker async invocation) on an endpoint whose backend can adopt it stays
``running``: the reaping instance takes its lease, and its dispatcher takes the job over instead of running it
twice. A job another live instance holds is never touched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, or_, update
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from webapp.db import Database
from webapp.records import Job, JobStatus, utcnow
from webapp.services.errors import Throttled
from webapp.services.jobs.leases import Instance
from webapp.services.jobs.observers import FinishedJob, JobObserver, notify, seconds_between
from webapp.services.jobs.quotas import attempt_today, record_usage

log = logging.getLogger(__name__)

QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING


@dataclass(frozen=True)
class Recovery:
    requeued: tuple[str, ...]
    failed: tuple[str, ...]
    cancelled: tuple[str, ...]
    adopted: tuple[str, ...] = ()
    """Jobs running elsewhere whose lease this instance took: its dispatchers adopt them."""

    @property
    def changed(self) -> tuple[str, ...]:
        return self.requeued + self.failed + self.cancelled + self.adopted


@dataclass(frozen=True)
class Renewal:
    held: frozenset[str]
    """The jobs whose lease was renewed (still running, still ours)."""
    cancel: frozenset[str]
    """Those of them someone asked to cancel (maybe through another instance)."""


class JobQueue:
    def __init__(self, db: Database, *, max_queued_per_user: int, max_attempts: int,
                 observers: Sequence[JobObserver] = (), instance: Instance | None = None,
                 lease_seconds: float = 30.0) -> None:
        if max_queued_per_user < 1 or max_attempts < 1:
            raise ValueError("max_queued_per_user and max_attempts must be at least 1")
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, not {lease_seconds}")
        self.db = db
        self.instance = instance or Instance()
        self.lease_seconds = lease_seconds
        """How long a claim holds a running job without being renewed (renewed every third of it)."""
        self.max_queued_per_user = max_queued_per_user
        self.max_attempts = max_attempts
        self.observers = tuple(observers)
        """Told of every change after it is committed (metrics, the idle watcher): see ``observers.py``."""

    # -- in ---------------------------------------------------------------------------------------------
    def enqueue(self, job: Job, *, admit: Callable[[Session], None] | None = None) -> Job:
        """Insert ``job`` as queued unless its owner is at the per-user cap or ``admit`` (the owner's role quotas)
        refuses; both are checked in the same write transaction as the insert, so parallel submits cannot both
        take the last slot."""
        with self.db.write() as s:
            if admit is not None:
                admit(s)
            queued = s.exec(select(func.count()).select_from(Job).where(
                Job.owner_id == job.owner_id, Job.status == QUEUED)).one()
            if queued >= self.max_queued_per_user:
                raise Throttled(
                    f"you already have {queued} queued jobs, the most one user may queue "
                    f"({self.max_queued_per_user}); wait for some to finish or cancel some", retry_after=10)
            job.status = QUEUED
            job.created_at = utcnow()
            s.add(job)
        notify(self.observers, "job_queued", job)
        return job

    # -- leases ---------------------------------------------------------------------------------------------------
    def _lease_end(self) -> datetime:
        return utcnow() + timedelta(seconds=self.lease_seconds)

    def _held_here(self) -> Any:
        """Rows this instance may change as a running job's holder (NULL: claimed before leases existed)."""
        return or_(Job.lease_owner == self.instance.id, Job.lease_owner.is_(None))  # type: ignore[union-attr]

    def renew(self, job_ids: Sequence[str]) -> Renewal:
        """Push the leases of ``job_ids`` (this instance's in-flight jobs) forward in one UPDATE; says which are
        still held and which of those have a cancel requested. A job missing from ``held`` was lost: finished,
        deleted, or reaped while this instance did not renew in time."""
        if not job_ids:
            return Renewal(frozenset(), frozenset())
        with self.db.write() as s:
            rows = s.exec(update(Job).where(  # type: ignore[call-overload]
                Job.id.in_(list(job_ids)), Job.status == RUNNING,  # type: ignore[attr-defined]
                Job.lease_owner == self.instance.id).values(lease_expires_at=self._lease_end())
                .returning(Job.id, Job.cancel_requested)).all()
        return Renewal(frozenset(row[0] for row in rows), frozenset(row[0] for row in rows if row[1]))

    # -- claim --------------------------------------------------------------------------------------------
    @staticmethod
    def _claimable(endpoint: str, kinds: Sequence[str] | None) -> list[Any]:
        """Queued jobs of ``endpoint`` of the ``kinds`` its backend runs (None: any kind)."""
        conditions: list[Any] = [Job.status == QUEUED, Job.endpoint == endpoint]
        if kinds is not None:
            conditions.append(Job.kind.in_(list(kinds)))  # type: ignore[attr-defined]
        return conditions

    def _next_owner(self, s: Session, endpoint: str, kinds: Sequence[str] | None = None) -> int | None:
        claimable = self._claimable(endpoint, kinds)
        owners = s.exec(select(Job.owner_id).where(*claimable).distinct().limit(2)).all()
        if len(owners) < 2:  # the common case — nobody to be fair to — skips the ranking query
            return owners[0] if owners else None
        waiting = (select(Job.owner_id.label("owner_id"), func.min(Job.created_at).label("oldest"))
                   .where(*claimable)
                   .group_by(Job.owner_id).subquery("waiting"))
        other = aliased(Job)
        running = (select(func.count()).select_from(other)
                   .where(other.owner_id == waiting.c.owner_id, other.status == RUNNING).scalar_subquery())
        served = select(func.max(other.started_at)).where(other.owner_id == waiting.c.owner_id).scalar_subquery()
        statement = (select(waiting.c.owner_id)
                     .order_by(running, case((served.is_(None), 0), else_=1), served, waiting.c.oldest,
                               waiting.c.owner_id)
                     .limit(1))
        return s.exec(statement).first()  # type: ignore[call-overload]

    def claim(self, endpoint: str, *, worker: str | None = None, kinds: Sequence[str] | None = None) -> Job | None:
        """Take the next job for ``endpoint`` (fairly across owners) and mark it running; None if none.
        ``kinds``: only jobs of these kinds (what the endpoint's backend runs; None: any)."""
        with self.db.write() as s:
            owner = self._next_owner(s, endpoint, kinds)
            if owner is None:
                return None
            job = s.exec(select(Job).where(*self._claimable(endpoint, kinds), Job.owner_id == owner)
                         .order_by(Job.created_at, Job.id).limit(1).with_for_update(skip_locked=True)).first()
            if job is None:
                return None  # PostgreSQL: a concurrent claimer holds it; the caller asks again
            now = utcnow()
            lease_end = self._lease_end()
            result = s.exec(update(Job).where(Job.id == job.id, Job.status == QUEUED).values(  # type: ignore[call-overload]
                status=RUNNING, started_at=now, attempts=Job.attempts + 1, worker=worker, progress=0.0, step=0,
                steps=0, job_no=0, job_count=0, eta_seconds=None, error=None, error_kind=None,
                lease_owner=self.instance.id, lease_expires_at=lease_end)
                .execution_options(synchronize_session=False))
            if result.rowcount != 1:
                return None
            # what the UPDATE wrote, without reading the row back
            job.status, job.started_at, job.attempts, job.worker = RUNNING, now, job.attempts + 1, worker
            job.lease_owner, job.lease_expires_at = self.instance.id, lease_end
            job.progress, job.step, job.steps, job.job_no, job.job_count = 0.0, 0, 0, 0, 0
            job.eta_seconds, job.error, job.error_kind = None, None, None
            s.expunge(job)
        notify(self.observers, "job_started", job)
        return job

    # -- state changes --------------------------------------------------------------------------------------
    def cancel_queued(self, job_id: str, reason: str = "cancelled") -> bool:
        """Cancel a job that has not started; False when it is no longer queued."""
        with self.db.write() as s:
            row = s.exec(update(Job).where(Job.id == job_id, Job.status == QUEUED).values(  # type: ignore[call-overload]
                status=JobStatus.CANCELLED, finished_at=utcnow(), error=reason, error_kind="cancelled",
            ).returning(Job.endpoint, Job.mode)).first()
        if row is not None:
            notify(self.observers, "job_finished", FinishedJob(
                job_id=job_id, endpoint=row.endpoint, mode=str(row.mode), status=JobStatus.CANCELLED,
                error_kind="cancelled", ran_seconds=None))
        return row is not None

    def request_cancel(self, job_id: str) -> bool:
        """Flag a running job for cancellation (survives a restart: recovery then cancels it)."""
        with self.db.write() as s:
            result = s.exec(update(Job).where(Job.id == job_id, Job.status == RUNNING).values(  # type: ignore[call-overload]
                cancel_requested=True))
            return result.rowcount == 1

    def finish(self, job_id: str, status: JobStatus, *, result_bytes: int = 0, **values: Any) -> bool:
        """Move a running job to a terminal ``status`` with ``values``, adding ``result_bytes`` (its stored
        images) to the bytes it takes; False if it is not running any more."""
        if not status.terminal:
            raise ValueError(f"{status} is not a terminal status")
        encoded = {k: (json.dumps(v) if k.endswith("_json") and not isinstance(v, str | None) else v)
                   for k, v in values.items()}
        # a job queued before sizes were kept (NULL) starts from its request's length
        stored = func.coalesce(Job.stored_bytes, func.length(Job.request_json)) + result_bytes
        now = utcnow()
        with self.db.write() as s:
            row = s.exec(update(Job).where(Job.id == job_id, Job.status == RUNNING, self._held_here()).values(  # type: ignore[call-overload]
                status=status, finished_at=now, eta_seconds=None, stored_bytes=stored, lease_expires_at=None, **encoded,
            ).returning(Job.endpoint, Job.mode, Job.started_at, Job.error_kind)).first()
        if row is not None:
            notify(self.observers, "job_finished", FinishedJob(
                job_id=job_id, endpoint=row.endpoint, mode=str(row.mode), status=status, error_kind=row.error_kind,
                ran_seconds=seconds_between(row.started_at, now)))
        return row is not None

    def requeue(self, job_id: str, *, refund_attempt: bool, reason: str) -> JobStatus | None:
        """Put a running job this instance holds back in the queue (or fail it when out of attempts); returns the
        new status, None when it is not running here any more."""
        with self.db.write() as s:
            job = s.get(Job, job_id)
            if job is None or job.status != RUNNING or job.lease_owner not in (None, self.instance.id):
                return None
            started_at = job.started_at
            status = self._requeue_row(s, job, refund_attempt=refund_attempt, reason=reason)
            endpoint, mode, error_kind = job.endpoint, str(job.mode), job.error_kind
        self._after_requeue(job_id, endpoint, mode, status, error_kind, started_at, refunded=refund_attempt)
        return status

    def _after_requeue(self, job_id: str, endpoint: str, mode: str, status: JobStatus, error_kind: str | None,
                       started_at: datetime | None, *, refunded: bool) -> None:
        """Tell the observers what a requeue did: the job ended, or (when its worker lost it) it was interrupted."""
        if status == QUEUED:
            if not refunded:  # a refunded attempt was the server's own doing (stop, backend refused): no failure
                notify(self.observers, "job_interrupted", job_id=job_id, endpoint=endpoint)
            return
        notify(self.observers, "job_finished", FinishedJob(
            job_id=job_id, endpoint=endpoint, mode=mode, status=status, error_kind=error_kind,
            ran_seconds=seconds_between(started_at, utcnow())))

    def _requeue_row(self, s: Session, job: Job, *, refund_attempt: bool, reason: str) -> JobStatus:
        attempts = max(0, job.attempts - 1) if refund_attempt else job.attempts
        if job.cancel_requested:
            job.status, job.error, job.error_kind = JobStatus.CANCELLED, "cancelled", "cancelled"
            job.finished_at = utcnow()
        elif attempts >= self.max_attempts:
            job.status, job.error_kind = JobStatus.FAILED, "interrupted"
            job.error = (f"{reason}; it was started {attempts} times (the limit is {self.max_attempts}) and never "
                         "finished, so it was given up — it may be what stops the server")
            job.finished_at = utcnow()
        else:
            # the attempt's run time leaves the row with its started_at: the quota ledger keeps today's part
            now = utcnow()
            record_usage(s, job.owner_id, now, gpu_seconds=attempt_today(job, now))
            job.status, job.started_at, job.worker = QUEUED, None, None
            job.remote_handle_json, job.lease_owner = None, None
            job.progress, job.step, job.steps, job.eta_seconds = 0.0, 0, 0, None
        job.attempts, job.lease_expires_at = attempts, None
        s.add(job)
        log.info("job %s %s after: %s (attempt %d of %d)", job.id,
                 "requeued" if job.status == QUEUED else str(job.status), reason, attempts, self.max_attempts)
        return JobStatus(job.status)

    def recover(self, endpoints: list[str] | None = None, *, adopting: Sequence[str] = ()) -> Recovery:
        """At start-up, before any dispatcher claims: ``reap``, and also take back at once every job this
        installation's previous run held (its process is gone: ``leases.Instance``)."""
        return self.reap(endpoints, adopting=adopting, at_start=True)

    def reap(self, endpoints: list[str] | None = None, *, adopting: Sequence[str] = (),
             at_start: bool = False) -> Recovery:
        """Every running job whose lease ran out (its instance died) is requeued, failed (out of attempts) or
        cancelled (a cancel was requested) — except one with a remote handle on an endpoint in ``adopting`` whose
        cancel was not requested: this instance takes its lease and its dispatcher adopts it (``Recovery.adopted``).
        Jobs held by live instances are left alone."""
        requeued, failed, cancelled, adopted = [], [], [], []
        changes = []
        gone: Any = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < utcnow())  # type: ignore[union-attr,operator]
        if at_start:
            gone = or_(gone, Job.lease_owner.startswith(self.instance.home_prefix))  # type: ignore[union-attr]
        with self.db.write() as s:
            statement = select(Job).where(Job.status == RUNNING, gone)
            if endpoints is not None:
                statement = statement.where(Job.endpoint.in_(endpoints))  # type: ignore[attr-defined]
            # PostgreSQL: another instance's reaper holding a row skips it (BEGIN IMMEDIATE serialises SQLite's)
            for job in s.exec(statement.with_for_update(skip_locked=True)).all():
                if job.remote_handle_json and job.endpoint in adopting and not job.cancel_requested:
                    if job.lease_owner != self.instance.id:
                        log.info("job %s: its instance %s is gone; %s takes it over", job.id, job.lease_owner,
                                 self.instance.id)
                    job.lease_owner, job.lease_expires_at = self.instance.id, self._lease_end()
                    s.add(job)
                    adopted.append(job.id)
                    continue
                started_at, owner = job.started_at, job.lease_owner
                reason = ("the server stopped while it ran" if at_start and owner and
                          owner.startswith(self.instance.home_prefix) else
                          f"the studio instance running it ({owner or 'unknown'}) stopped renewing its lease")
                status = self._requeue_row(s, job, refund_attempt=False, reason=reason)
                {QUEUED: requeued, JobStatus.FAILED: failed}.get(status, cancelled).append(job.id)
                changes.append((job.id, job.endpoint, str(job.mode), status, job.error_kind, started_at))
        for job_id, endpoint, mode, status, error_kind, started_at in changes:
            self._after_requeue(job_id, endpoint, mode, status, error_kind, started_at, refunded=False)
        if requeued or failed or cancelled:
            log.warning("%s: %d job(s) requeued, %d failed, %d cancelled", "restart recovery" if at_start else
                        "expired leases", len(requeued), len(failed), len(cancelled))
        return Recovery(tuple(requeued), tuple(failed), tuple(cancelled), tuple(adopted))

    def move_queued(self, source: str, target: str) -> list[str]:
        """Send every job queued for endpoint ``source`` to ``target`` instead (``source`` is going away);
        returns their ids. They keep their place: the claim order is by owner and age, not endpoint."""
        with self.db.write() as s:
            ids = list(s.exec(select(Job.id).where(Job.status == QUEUED, Job.endpoint == source)).all())
            if ids:
                s.exec(update(Job).where(Job.id.in_(ids), Job.status == QUEUED).values(endpoint=target))  # type: ignore[call-overload,attr-defined]
        for job_id in ids:
            log.info("job %s moved from endpoint %s to %s: %s is being deleted", job_id, source, target, source)
        return ids

    def record_progress(self, job_id: str, values: Mapping[str, Any]) -> None:
        """Persist progress now and then (the board holds the live value; other instances read this)."""
        with self.db.write() as s:
            s.exec(update(Job).where(Job.id == job_id, Job.status == RUNNING, self._held_here()).values(**values))  # type: ignore[call-overload]

    def set_handle(self, job_id: str, handle: Mapping[str, Any]) -> None:
        """Record how to find a running job that runs elsewhere (``Started.handle``) — committed before the
        backend's ``submit`` returns, so a crash right after loses nothing."""
        with self.db.write() as s:
            s.exec(update(Job).where(Job.id == job_id, Job.status == RUNNING, self._held_here())  # type: ignore[call-overload]
                   .values(remote_handle_json=json.dumps(dict(handle))))

    def running_on(self, endpoint: str) -> list[str]:
        """Ids of the jobs running on ``endpoint``."""
        with self.db.read() as s:
            return list(s.exec(select(Job.id).where(Job.status == RUNNING, Job.endpoint == endpoint)).all())

    def detached(self, endpoint: str) -> list[Job]:
        """Running jobs of ``endpoint`` that left a handle and whose lease this instance holds (what its
        dispatcher adopts: after ``recover`` or ``reap`` took them over)."""
        with self.db.read() as s:
            return list(s.exec(select(Job).where(Job.status == RUNNING, Job.endpoint == endpoint,
                                                 Job.lease_owner == self.instance.id,
                                                 Job.remote_handle_json.is_not(None))  # type: ignore[union-attr]
                               .order_by(Job.started_at)).all())

    def set_worker(self, job_id: str, worker: str) -> None:
        with self.db.write() as s:
            s.exec(update(Job).where(Job.id == job_id, Job.status == RUNNING, self._held_here()).values(worker=worker))  # type: ignore[call-overload]

    # -- reads -------------------------------------------------------------------------------------------------
    def position(self, job: Job) -> int:
        """Jobs on the same endpoint queued before this one (an estimate: fairness may reorder owners)."""
        with self.db.read() as s:
            return s.exec(select(func.count()).select_from(Job).where(
                Job.status == QUEUED, Job.endpoint == job.endpoint, Job.created_at < job.created_at)).one()
