"""Who hears about job state changes: the queue tells its observers after each change it commits.

Every status change of a job is written by ``JobQueue`` (enqueue, claim, finish, requeue, cancel, restart
recovery), whichever endpoint, dispatcher or service asked for it, so observers hooked there see each
job exactly once per change: metrics (``webapp/services/metrics.py``) count and time them, the idle
watcher (``webapp/services/idle.py``) notes that the server is in use. Observers are called outside the
queue's transaction; one that raises is logged and never breaks the queue.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from webapp.records import Job, JobStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinishedJob:
    """A job that reached a terminal status (``ran_seconds``: None when it never started)."""

    job_id: str
    endpoint: str
    mode: str
    status: JobStatus
    error_kind: str | None
    ran_seconds: float | None


class JobObserver:
    """Override what you need; every method is a no-op here."""

    def job_queued(self, job: Job) -> None:
        """A job was submitted (``job`` as inserted)."""

    def job_started(self, job: Job) -> None:
        """A dispatcher claimed ``job`` (its ``created_at`` and ``started_at`` are set)."""

    def job_interrupted(self, *, job_id: str, endpoint: str) -> None:
        """A running job lost its worker (or the server stopped under it) and went back to the queue."""

    def job_finished(self, finished: FinishedJob) -> None:
        """A job reached a terminal status: succeeded, failed or cancelled (queued or running)."""


def seconds_between(start: datetime | None, end: datetime) -> float | None:
    """Seconds from ``start`` to ``end``; SQLite hands back naive datetimes, which are UTC here."""
    if start is None:
        return None
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    return max(0.0, (end - start).total_seconds())


def notify(observers: Sequence[JobObserver], method: str, *args: object, **kwargs: object) -> None:
    """Call ``method`` on every observer; an observer's failure is logged, not raised."""
    for observer in observers:
        try:
            getattr(observer, method)(*args, **kwargs)
        except Exception:  # noqa: BLE001 - metrics or the idle watcher must never break the queue
            log.exception("job observer %s failed in %s", type(observer).__name__, method)
