"""Per-user disk quota: job results and imported model files, against one limit (``user_quota_gb``).

What a user takes is summed from sizes the rows already hold — never a walk over the disk or the
asset store — so asking costs four indexed SUM queries:

* jobs: ``job.stored_bytes``, the request as stored (init images included) plus the result images and, for
  other kinds, the files the job wrote (a training's LoRAs and samples), less the LoRAs registered as the
  owner's models: the job gives its copy up to the model (``trainings/registration.py``), so each counts once;
* models: the stored file of every model the user imported (``model.size`` where the bytes are in the
  asset store; models registered in place on the server take no extra space). The registry keeps one
  row per distinct file, so a file imported again by anyone counts once, for its owner;
* datasets: the images and captions of the user's training datasets (``dataset.bytes``);
* uploads: the declared size of the user's uploads still open, so parallel uploads cannot each fit a
  quota that all of them together overrun.

A user who is over the limit can still see, download and delete what they have; new jobs and new
model files are refused with 413 naming the field ``quota`` (a 4xx: deleting old results fixes it,
and clients do not retry it as they would a 5xx such as 507). Administrators are not limited: they own
the disk. A per-user limit can later replace ``limit_for``'s single setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func
from sqlmodel import select

from webapp.db import Database
from webapp.records import Dataset, Job, ModelRecord, ModelStatus, UploadSession, UploadStatus, User
from webapp.services.errors import ServiceError


class QuotaExceeded(ServiceError):
    status = 413

    def __init__(self, message: str) -> None:
        super().__init__(message, field="quota")


@dataclass(frozen=True)
class DiskUsage:
    used: int
    limit: int | None
    """None: unlimited."""


def format_bytes(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class DiskQuota:
    def __init__(self, db: Database, *, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise ValueError("limit_bytes must be >= 0 (0: unlimited)")
        self._db = db
        self._limit = limit_bytes

    def limit_for(self, user: User) -> int | None:
        if user.is_admin or self._limit == 0:
            return None
        return self._limit

    def usage(self, *, actor: User) -> DiskUsage:
        return DiskUsage(used=self._used(actor.id), limit=self.limit_for(actor))

    def check(self, user: User, *, adding: int = 0, what: str = "a new job") -> None:
        """Refuse when ``user`` is already at the limit, or ``adding`` more bytes would take them past it."""
        limit = self.limit_for(user)
        if limit is None:
            return
        used = self._used(user.id)
        if used + adding > limit or used >= limit:
            need = f"{what} ({format_bytes(adding)}) " if adding else f"{what} "
            raise QuotaExceeded(
                f"{need}does not fit your disk quota: you use {format_bytes(used)} of {format_bytes(limit)}; "
                "delete old jobs or models you imported to make room")

    def _used(self, user_id: int) -> int:
        with self._db.read() as s:
            jobs = s.exec(select(func.coalesce(func.sum(Job.stored_bytes), 0)).where(Job.owner_id == user_id)).one()
            models = s.exec(select(func.coalesce(func.sum(ModelRecord.size), 0)).where(
                ModelRecord.owner_id == user_id, ModelRecord.store_key.is_not(None),  # type: ignore[union-attr]
                ModelRecord.status != ModelStatus.INITIAL)).one()
            uploads = s.exec(select(func.coalesce(func.sum(UploadSession.size), 0)).where(
                UploadSession.owner_id == user_id, UploadSession.status == UploadStatus.OPEN)).one()
            datasets = s.exec(select(func.coalesce(func.sum(Dataset.bytes), 0)).where(Dataset.owner_id == user_id)).one()
        return int(jobs) + int(models) + int(uploads) + int(datasets)
