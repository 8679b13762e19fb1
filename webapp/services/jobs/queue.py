"""The persistent job queue: rows in the ``job`` table, claimed atomically and fairly.

Claiming is one write transaction (``BEGIN IMMEDIATE`` on SQLite serialises claimers; on PostgreSQL
the chosen row is locked ``FOR UPDATE SKIP LOCKED``), and the status change is conditional
(``... WHERE status = 'queued'``), so no job runs twice however many dispatchers claim at once.

Fairness is per owner, not per job: the next job belongs to the owner with the fewest running jobs,
then the one served least recently, then the one whose oldest queued job is oldest; within an owner
jobs run first-in first-out. One user's hundred queued jobs therefore take turns with another user's
single job instead of starving it.

Restart recovery runs before any dispatcher starts: a job left ``running`` by a crash goes back to
the queue unless it has already been started ``max_attempts`` times (then it fails with the reason:
it may be what kills the server), and a running job whose cancel was requested ends cancelled. A job that
runs elsewhere and left a handle (``remote_handle_json``: a SageMaker async invocation) on an endpoint whose
backend can adopt it stays ``running``: its dispatcher takes it over again at start instead of running it twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, update
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from webapp.db import Database
from webapp.records import Job, JobStatus, utcnow
from webapp.services.errors import Throttled
from webapp.services.jobs.observers import FinishedJob, JobObserver, notify, seconds_between

log = logging.getLogger(__name__)

QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING


@dataclass(frozen=True)
class Recovery:
    requeued: tuple[str, ...]
    failed: tuple[str, ...]
    cancelled: tuple[str, ...]


class JobQueue:
    def __init__(self, db: Database, *, max_queued_per_user: int, max_attempts: int,
                 observers: Sequence[JobObserver] = ()) -> None:
        if max_queued_per_user < 1 or max_attempts < 1:
            raise ValueError("max_queued_per_user and max_attempts must be at least 1")
        self.db = db
        self.max_queued_per_user = max_queued_per_user
        self.max_attempts = max_attempts
        self.observers = tuple(observers)
        """Told of every change after it is committed (metrics, the idle watcher): see ``observers.py``."""

    # -- in ---------------------------------------------------------------------------------------------
    def enqueue(self, job: Job) -> Job:
        """Insert ``job`` as queued unless its owner is at the per-user cap (checked in the same transaction)."""
        with self.db.write() as s:
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
            result = s.exec(update(Job).where(Job.id == job.id, Job.status == QUEUED).values(  # type: ignore[call-overload]
                status=RUNNING, started_at=now, attempts=Job.attempts + 1, worker=worker, progress=0.0, step=0,
                steps=0, job_no=0, job_count=0, eta_seconds=None, error=None, error_kind=None)
                .execution_options(synchronize_session=False))
            if result.rowcount != 1:
                return None
            # what the UPDATE wrote, without reading the row back
            job.status, job.started_at, job.attempts, job.worker = RUNNING, now, job.attempts + 1, worker
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
            row = s.exec(update(Job).where(Job.id == job_id, Job.status == RUNNING).values(  # type: ignore[call-overload]
                status=status, finished_at=now, eta_seconds=None, stored_bytes=stored, **encoded,
            ).returning(Job.endpoint, Job.mode, Job.started_at, Job.error_kind)).first()
        if row is not None:
            notify(self.observers, "job_finished", FinishedJob(
                job_id=job_id, endpoint=row.endpoint, mode=str(row.mode), status=status, error_kind=row.error_kind,
                ran_seconds=seconds_between(row.started_at, now)))
        return row is not None

    def requeue(self, job_id: str, *, refund_attempt: bool, reason: str) -> JobStatus | None:
        """Put a running job back in the queue (or fail it when out of attempts); returns the new status."""
        with self.db.write() as s:
            job = s.get(Job, job_id)
            if job is None or job.status != RUNNING:
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
            job.status, job.started_at, job.worker = QUEUED, None, None
            job.remote_handle_json = None
            job.progress, job.step, job.steps, job.eta_seconds = 0.0, 0, 0, None
        job.attempts = attempts
        s.add(job)
        log.info("job %s %s after: %s (attempt %d of %d)", job.id,
                 "requeued" if job.status == QUEUED else str(job.status), reason, attempts, self.max_attempts)
        return JobStatus(job.status)

    def recover(self, endpoints: list[str] | None = None, *, adopting: Sequence[str] = ()) -> Recovery:
        """At start-up: no job stays ``running`` — each is requeued, failed (out of attempts) or cancelled —
        except one with a remote handle on an endpoint in ``adopting`` (its backend takes it over again) whose
        cancel was not requested."""
        requeued, failed, cancelled = [], [], []
        changes = []
        with self.db.write() as s:
            statement = select(Job).where(Job.status == RUNNING)
            if endpoints is not None:
                statement = statement.where(Job.endpoint.in_(endpoints))  # type: ignore[attr-defined]
            for job in s.exec(statement).all():
                if job.remote_handle_json and job.endpoint in adopting and not job.cancel_requested:
                    continue
                started_at = job.started_at
                status = self._requeue_row(s, job, refund_attempt=False, reason="the server stopped while it ran")
                {QUEUED: requeued, JobStatus.FAILED: failed}.get(status, cancelled).append(job.id)
                changes.append((job.id, job.endpoint, str(job.mode), status, job.error_kind, started_at))
        for job_id, endpoint, mode, status, error_kind, started_at in changes:
            self._after_requeue(job_id, endpoint, mode, status, error_kind, started_at, refunded=False)
        if requeued or failed or cancelled:
            log.warning("restart recovery: %d job(s) requeued, %d failed, %d cancelled",
                        len(requeued), len(failed), len(cancelled))
        return Recovery(tuple(requeued), tuple(failed), tuple(cancelled))

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
        """Persist progress now and then (the board holds the live value)."""
        with self.db.write() as s:
            s.exec(update(Job).where(Job.id == job_id, Job.status == RUNNING).values(**values))  # type: ignore[call-overload]

    def set_handle(self, job_id: str, handle: Mapping[str, Any]) -> None:
        """Record how to find a running job that runs elsewhere (``Started.handle``) — committed before the
        backend's ``submit`` returns, so a crash right after loses nothing."""
        with self.db.write() as s:
            s.exec(update(Job).where(Job.id == job_id, Job.status == RUNNING)  # type: ignore[call-overload]
                   .values(remote_handle_json=json.dumps(dict(handle))))

    def running_on(self, endpoint: str) -> list[str]:
        """Ids of the jobs running on ``endpoint``."""
        with self.db.read() as s:
            return list(s.exec(select(Job.id).where(Job.status == RUNNING, Job.endpoint == endpoint)).all())

    def detached(self, endpoint: str) -> list[Job]:
        """Running jobs of ``endpoint`` that left a handle (what its dispatcher adopts at start)."""
        with self.db.read() as s:
            return list(s.exec(select(Job).where(Job.status == RUNNING, Job.endpoint == endpoint,
                                                 Job.remote_handle_json.is_not(None))  # type: ignore[union-attr]
                               .order_by(Job.started_at)).all())

    def set_worker(self, job_id: str, worker: str) -> None:
        with self.db.write() as s:
            s.exec(update(Job).where(Job.id == job_id, Job.status == RUNNING).values(worker=worker))  # type: ignore[call-overload]

    # -- reads -------------------------------------------------------------------------------------------------
    def position(self, job: Job) -> int:
        """Jobs on the same endpoint queued before this one (an estimate: fairness may reorder owners)."""
        with self.db.read() as s:
            return s.exec(select(func.count()).select_from(Job).where(
                Job.status == QUEUED, Job.endpoint == job.endpoint, Job.created_at < job.created_at)).one()
