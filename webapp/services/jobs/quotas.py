"""Job quotas per role: jobs queued or running at once, jobs per day, GPU-seconds per day (and, shown beside them,
the disk quota of ``webapp/services/quota.py``).

A user's limits are the most generous of their roles' (``RoleService.effective_quotas``; None = unlimited), so a
role without limits — Admin as seeded — is never refused. Days are UTC days: the daily quotas reset at 00:00 UTC.

Counting is indexed queries on the job table, plus one ledger row per owner and day for what the rows no longer
show (``quota_usage``, ``QuotaUsage``):

* queued: the owner's jobs queued or running now (``ix_job_owner_status``);
* jobs per day: the owner's jobs created since 00:00 UTC (``ix_job_owner_created``), plus the ledger's ``jobs``;
* GPU-seconds per day: the time the owner's jobs ran today — ``finished_at − started_at`` of jobs that finished
  today (``ix_job_owner_finished``, covering), plus ``now − started_at`` of running ones, each counted from 00:00
  when it started earlier — plus the ledger's ``gpu_seconds``.

The ledger keeps deleting or requeueing a job from giving quota back: the write transaction that deletes a job
(``JobService.delete``, which every delete path ends in) adds what the row counted today (``counted_today``: its
submission if created today, its run time within today), and the one that puts a running job back in the queue
(``JobQueue`` requeue and reap, which clear ``started_at``) adds that attempt's run time within today
(``attempt_today``; an attempt its instance died in ends at its lease's expiry at the latest). Writing a row drops
every row of an earlier day, so the table stays small: the rows of the last day anything was written.

``admit`` runs inside the write transaction that inserts the job (``JobQueue.enqueue``). Write transactions run
one at a time (``Database.write``), so two submits in parallel cannot both take the last slot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, case, delete, extract, func, insert, literal, update
from sqlmodel import Session, select

from webapp.db import Database
from webapp.records import Job, JobStatus, QuotaUsage, User, utcnow
from webapp.services.errors import JobQuotaExceeded
from webapp.services.quota import DiskQuota

JOB_QUOTAS = ("max_queued_jobs", "max_jobs_per_day", "max_gpu_seconds_per_day")
LABELS = {"max_queued_jobs": "queued jobs", "max_jobs_per_day": "jobs per day",
          "max_gpu_seconds_per_day": "GPU-seconds per day", "max_storage_mb": "storage (MB)"}

Limits = Callable[[User], Mapping[str, int | None]]


@dataclass(frozen=True)
class QuotaUse:
    """One quota of one user, as ``GET /api/v1/me/quotas`` and the Account tab show it."""

    name: str
    label: str
    limit: float | None
    """None: unlimited. Storage in MB (the tighter of the server's setting and the roles')."""
    used: float
    resets_at: datetime | None
    """When a daily quota starts again (the next 00:00 UTC); None for the others."""
    source: str | None = None
    """Storage only: where the limit comes from."""


def next_midnight(now: datetime) -> datetime:
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


def in_words(seconds: float) -> str:
    """``3 h 12 min``, ``12 min``, ``40 s``: how long until a quota resets."""
    whole = max(0, int(seconds))
    hours, minutes = whole // 3600, whole % 3600 // 60
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min" if minutes else f"{whole} s"


def _naive(moment: datetime) -> Any:
    """A UTC moment as a SQL literal of the timestamp columns' type (they hold UTC without a zone)."""
    return literal(moment.astimezone(UTC).replace(tzinfo=None), DateTime())


def _seconds(s: Session, start: Any, end: Any) -> Any:
    """``end − start`` in seconds, as SQL (the one thing SQLite and PostgreSQL spell differently here)."""
    if s.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return extract("epoch", end - start)


def gpu_seconds(s: Session, owner_id: int, since: datetime, now: datetime) -> float:
    """Seconds the owner's jobs ran between ``since`` and ``now`` (finished ones and running ones)."""
    start = case((Job.started_at < _naive(since), _naive(since)), else_=Job.started_at)  # type: ignore[operator]
    finished = s.exec(select(func.coalesce(func.sum(_seconds(s, start, Job.finished_at)), 0.0)).where(
        Job.owner_id == owner_id, Job.finished_at >= since, Job.started_at.is_not(None))).one()  # type: ignore[operator,union-attr]
    running = s.exec(select(func.coalesce(func.sum(_seconds(s, start, _naive(now))), 0.0)).where(
        Job.owner_id == owner_id, Job.status == JobStatus.RUNNING, Job.started_at.is_not(None))).one()  # type: ignore[union-attr]
    return max(0.0, float(finished) + float(running))


def active_jobs(s: Session, owner_id: int) -> int:
    return s.exec(select(func.count()).select_from(Job).where(
        Job.owner_id == owner_id, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))).one()  # type: ignore[attr-defined]


def jobs_since(s: Session, owner_id: int, since: datetime) -> int:
    return s.exec(select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.created_at >= since)).one()


def _utc(moment: datetime) -> datetime:
    """A timestamp as read back (naive UTC) or as written (aware), as aware UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def day_start(now: datetime) -> datetime:
    """00:00 UTC of ``now``'s day: where the daily quotas count from."""
    return next_midnight(now) - timedelta(days=1)


def _ran(start: datetime | None, end: datetime | None, since: datetime) -> float:
    """Seconds from ``start`` to ``end`` that fall after ``since``."""
    if start is None or end is None:
        return 0.0
    return max(0.0, (_utc(end) - max(_utc(start), since)).total_seconds())


def counted_today(job: Job, now: datetime) -> tuple[int, float]:
    """What ``job``'s row adds to today's counts (``jobs_since``, ``gpu_seconds``): 1 if it was submitted today, and
    its run time within today — to ``finished_at`` if it finished today, to ``now`` if it is running."""
    since = day_start(now)
    jobs = 1 if _utc(job.created_at) >= since else 0
    seconds = 0.0
    if job.started_at is not None:
        if job.finished_at is not None and _utc(job.finished_at) >= since:
            seconds += _ran(job.started_at, job.finished_at, since)
        if job.status == JobStatus.RUNNING:
            seconds += _ran(job.started_at, now, since)
    return jobs, seconds


def attempt_today(job: Job, now: datetime) -> float:
    """The run time within today of ``job``'s current attempt, which a requeue is about to forget: from
    ``started_at`` to now, or to its lease's expiry when that came first (the instance running it died by then)."""
    end = _utc(now)
    if job.lease_expires_at is not None:
        end = min(end, _utc(job.lease_expires_at))
    return _ran(job.started_at, end, day_start(now))


def record_usage(s: Session, owner_id: int, now: datetime, *, jobs: int = 0, gpu_seconds: float = 0.0) -> None:
    """Add to the owner's ledger row of ``now``'s UTC day, in the write transaction ``s`` that removes what it
    counted from the job rows; drops every ledger row of an earlier day."""
    if jobs <= 0 and gpu_seconds <= 0:
        return
    today = _utc(now).date()
    s.exec(delete(QuotaUsage).where(QuotaUsage.day < today))  # type: ignore[call-overload]
    # Write transactions run one at a time (``Database.write``): no other writer adds the row between the two.
    found = s.exec(update(QuotaUsage).where(  # type: ignore[call-overload]
        QuotaUsage.owner_id == owner_id, QuotaUsage.day == today).values(
        jobs=QuotaUsage.jobs + jobs, gpu_seconds=QuotaUsage.gpu_seconds + gpu_seconds))
    if found.rowcount == 0:
        s.exec(insert(QuotaUsage).values(  # type: ignore[call-overload]
            owner_id=owner_id, day=today, jobs=jobs, gpu_seconds=gpu_seconds))


def keep_usage_of_deleted(s: Session, job: Job, now: datetime) -> None:
    """``job`` is deleted in ``s``: keep what it counted today in the ledger."""
    jobs, seconds = counted_today(job, now)
    record_usage(s, job.owner_id, now, jobs=jobs, gpu_seconds=seconds)


def recorded(s: Session, owner_id: int, day: date) -> tuple[int, float]:
    """The ledger's jobs and GPU-seconds of the owner on ``day`` (0, 0.0 when none)."""
    row = s.get(QuotaUsage, (owner_id, day))
    return (row.jobs, row.gpu_seconds) if row is not None else (0, 0.0)


def used_today(s: Session, owner_id: int, now: datetime) -> tuple[int, float]:
    """Jobs submitted and GPU-seconds run today by the owner: the live job rows plus the ledger."""
    since = day_start(now)
    jobs, seconds = recorded(s, owner_id, since.date())
    return jobs_since(s, owner_id, since) + jobs, gpu_seconds(s, owner_id, since, now) + seconds


class JobQuotas:
    def __init__(self, db: Database, *, limits: Limits, disk: DiskQuota | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._db = db
        self._limits = limits
        self._disk = disk
        self._clock = clock

    def limits(self, user: User) -> dict[str, int | None]:
        """The user's job limits (None: unlimited), read before the write transaction that ``admit`` runs in."""
        found = self._limits(user)
        return {name: found.get(name) for name in JOB_QUOTAS}

    def admit(self, s: Session, user: User, limits: Mapping[str, int | None]) -> None:
        """Raise ``JobQuotaExceeded`` (429, naming the quota and when it frees) unless ``user`` may add one more job;
        ``s`` is the write transaction that inserts it."""
        if all(limits.get(name) is None for name in JOB_QUOTAS):
            return
        now = self._clock()
        resets = next_midnight(now)
        left = in_words((resets - now).total_seconds())
        retry_after = max(1, int((resets - now).total_seconds()) + 1)
        queued = limits.get("max_queued_jobs")
        if queued is not None and (used := active_jobs(s, user.id)) >= queued:
            raise JobQuotaExceeded(
                f"your roles allow {queued} queued jobs (max_queued_jobs) and you have {used} of {queued} queued or "
                "running; frees as your jobs finish (or cancel one)", quota="max_queued_jobs")
        per_day, gpu = limits.get("max_jobs_per_day"), limits.get("max_gpu_seconds_per_day")
        submitted, ran = used_today(s, user.id, now) if per_day is not None or gpu is not None else (0, 0.0)
        if per_day is not None and submitted >= per_day:
            raise JobQuotaExceeded(
                f"your roles allow {per_day} jobs per day (max_jobs_per_day) and you submitted {submitted} of {per_day} "
                f"today; resets at 00:00 UTC, in {left}", quota="max_jobs_per_day", resets_at=resets, retry_after=retry_after)
        if gpu is not None and ran >= gpu:
            raise JobQuotaExceeded(
                f"your roles allow {gpu} GPU-seconds per day (max_gpu_seconds_per_day) and your jobs ran "
                f"{ran:.0f} of {gpu} today; resets at 00:00 UTC, in {left}", quota="max_gpu_seconds_per_day", resets_at=resets,
                retry_after=retry_after)

    def usage(self, *, actor: User) -> list[QuotaUse]:
        """The actor's own quotas with what they use now (jobs, then storage)."""
        limits = self.limits(actor)
        now = self._clock()
        resets = next_midnight(now)
        with self._db.read() as s:
            submitted, ran = used_today(s, actor.id, now)
            used = {"max_queued_jobs": active_jobs(s, actor.id), "max_jobs_per_day": submitted,
                    "max_gpu_seconds_per_day": round(ran, 1)}
        out = [QuotaUse(name=name, label=LABELS[name], limit=limits[name], used=used[name],
                        resets_at=None if name == "max_queued_jobs" else resets) for name in JOB_QUOTAS]
        if self._disk is not None:
            disk = self._disk.usage(actor=actor)
            limit, source = self._disk.limit_and_source(actor)
            out.append(QuotaUse(name="max_storage_mb", label=LABELS["max_storage_mb"],
                                limit=None if limit is None else round(limit / 2**20, 3),
                                used=round(disk.used / 2**20, 3), resets_at=None, source=source))
        return out


def describe(uses: list[QuotaUse]) -> str:
    """One line for people: ``Quotas: queued jobs 1 of 5 · jobs per day 3 of 100 · … — daily ones reset …``."""
    parts = []
    for use in uses:
        used = f"{use.used:g}"
        of = f" of {use.limit:g}" if use.limit is not None else " (no limit)"
        parts.append(f"{use.label} {used}{of}")
    return "Quotas: " + " · ".join(parts) + " — daily ones reset at 00:00 UTC"
