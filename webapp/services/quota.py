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
and clients do not retry it as they would a 5xx such as 507). The limit is the tighter of the server's
``user_quota_gb`` (every user but administrators: they own the disk) and the user's roles' ``max_storage_mb``
(the most generous of their roles, ``RoleService.effective_quotas``); the message names which one it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func
from sqlmodel import Session, select

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
    def __init__(self, db: Database, *, limit_bytes: int,
                 role_limit_mb: Callable[[User], int | None] | None = None) -> None:
        if limit_bytes < 0:
            raise ValueError("limit_bytes must be >= 0 (0: unlimited)")
        self._db = db
        self._limit = limit_bytes
        self._role_limit_mb = role_limit_mb
        """The user's roles' ``max_storage_mb`` (None: unlimited)."""

    def limit_and_source(self, user: User) -> tuple[int | None, str | None]:
        """The user's limit in bytes (None: unlimited) and where it comes from, for messages."""
        found: list[tuple[int, str]] = []
        if not user.is_admin and self._limit > 0:
            found.append((self._limit, "the server's user_quota_gb"))
        role_mb = self._role_limit_mb(user) if self._role_limit_mb is not None else None
        if role_mb is not None:
            found.append((int(role_mb) * 2**20, "your roles' max_storage_mb"))
        if not found:
            return None, None
        return min(found, key=lambda pair: pair[0])

    def limit_for(self, user: User) -> int | None:
        return self.limit_and_source(user)[0]

    def usage(self, *, actor: User) -> DiskUsage:
        return DiskUsage(used=self._used(actor.id), limit=self.limit_for(actor))

    def check(self, user: User, *, adding: int = 0, what: str = "a new job") -> None:
        """Refuse when ``user`` is already at the limit, or ``adding`` more bytes would take them past it."""
        limit, source = self.limit_and_source(user)
        if limit is None:
            return
        with self._db.read() as s:
            self._refuse_if_full(s, user.id, limit, source, adding, what)

    def admission(self, user: User, *, what: str = "a new job") -> Callable[[Session], None] | None:
        """``check`` for the write transaction that inserts the new row (None: no limit). The limit is read now;
        the usage inside that transaction, so parallel submits each see the ones committed before them."""
        limit, source = self.limit_and_source(user)
        if limit is None:
            return None
        return lambda s: self._refuse_if_full(s, user.id, limit, source, 0, what)

    def _refuse_if_full(self, s: Session, user_id: int, limit: int, source: str | None, adding: int,
                        what: str) -> None:
        used = self._used_in(s, user_id)
        if used + adding > limit or used >= limit:
            need = f"{what} ({format_bytes(adding)}) " if adding else f"{what} "
            raise QuotaExceeded(
                f"{need}does not fit your disk quota ({source}): you use {format_bytes(used)} of "
                f"{format_bytes(limit)}; delete old jobs or models you imported to make room")

    def _used(self, user_id: int) -> int:
        with self._db.read() as s:
            return self._used_in(s, user_id)

    @staticmethod
    def _used_in(s: Session, user_id: int) -> int:
        jobs = s.exec(select(func.coalesce(func.sum(Job.stored_bytes), 0)).where(Job.owner_id == user_id)).one()
        models = s.exec(select(func.coalesce(func.sum(ModelRecord.size), 0)).where(
            ModelRecord.owner_id == user_id, ModelRecord.store_key.is_not(None),  # type: ignore[union-attr]
            ModelRecord.status != ModelStatus.INITIAL)).one()
        uploads = s.exec(select(func.coalesce(func.sum(UploadSession.size), 0)).where(
            UploadSession.owner_id == user_id, UploadSession.status == UploadStatus.OPEN)).one()
        datasets = s.exec(select(func.coalesce(func.sum(Dataset.bytes), 0)).where(Dataset.owner_id == user_id)).one()
        return int(jobs) + int(models) + int(uploads) + int(datasets)
