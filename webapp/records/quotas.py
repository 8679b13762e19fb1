"""What deleted and requeued jobs used of a day's job quotas (``webapp/services/jobs/quotas.py``)."""

from __future__ import annotations

from datetime import date

from sqlmodel import Field, SQLModel


class QuotaUsage(SQLModel, table=True):
    """Per owner and UTC day: the jobs submitted and GPU-seconds run that the job rows no longer show — a job
    deleted the day it was submitted or ran, an attempt whose ``started_at`` a requeue cleared. The daily quotas
    count the live job rows plus this row; rows of earlier days are dropped as new ones are written."""

    __tablename__ = "quota_usage"

    owner_id: int = Field(foreign_key="user.id", primary_key=True, ondelete="CASCADE")
    day: date = Field(primary_key=True)
    """The UTC day."""
    jobs: int = 0
    gpu_seconds: float = 0.0
