"""Generation jobs and the endpoints that run them.

A job row is the whole life of one generation: who asked, what exactly (the A1111-shaped request as
submitted and the model files it resolved to), where it runs, how far it got and what came out (image
keys in the asset store, infotexts, A1111's ``info``). The queue claims rows straight from this table,
so its indexes are shaped for the claim query: queued jobs of one endpoint grouped by owner, oldest
first, and per-owner lookups of running jobs and of when each owner was last served.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Column, Index, Text
from sqlmodel import Field, SQLModel

from webapp.records.common import new_id, utcnow


class JobMode(StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    TRAIN = "train"
    """A training job (kind ``train_lora``): its ``request_json`` is the kind's payload, not an A1111 request."""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


def _loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    return json.loads(text)


class Job(SQLModel, table=True):
    __tablename__ = "job"
    __table_args__ = (
        # claim: queued jobs of an endpoint, per owner, oldest first
        Index("ix_job_claim", "status", "endpoint", "owner_id", "created_at"),
        # fairness: an owner's running jobs and when the owner was last served
        Index("ix_job_owner_status", "owner_id", "status"),
        Index("ix_job_owner_started", "owner_id", "started_at"),
        # history: an owner's jobs newest first
        Index("ix_job_owner_created", "owner_id", "created_at"),
        # disk quota: an owner's total from the index alone (the rows hold large request texts)
        Index("ix_job_owner_bytes", "owner_id", "stored_bytes"),
        # GPU-seconds per day: an owner's jobs that finished since a time, with their start, from the index alone
        Index("ix_job_owner_finished", "owner_id", "finished_at", "started_at"),
        # reaper: running jobs whose lease ran out
        Index("ix_job_lease", "status", "lease_expires_at"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    owner_id: int = Field(foreign_key="user.id", ondelete="CASCADE")
    owner_name: str = Field(max_length=64)
    """Usernames never change, so history can show the owner without a join."""
    mode: JobMode
    kind: str = Field(default="generate", max_length=32, index=True)
    """What the job does (``deploy.jobkinds``): ``generate`` (the A1111-shaped request) or ``train_lora`` (its
    payload in ``request_json``); a dispatcher only claims the kinds its backend declares."""
    status: JobStatus = Field(default=JobStatus.QUEUED, index=True)
    endpoint: str = Field(max_length=64, index=True)
    task_id: str | None = Field(default=None, max_length=128, index=True)
    """A client-chosen id (A1111 ``force_task_id``) to follow the job by."""
    request_json: str = Field(sa_column=Column(Text, nullable=False))
    """The A1111-shaped request exactly as submitted: the job's reproducible input. Its images are references
    to the job's ``inputs/<id>/`` blobs (``webapp/services/jobs/inputs.py``; inline base64 on older rows), so
    readers that echo it go through ``JobService.submitted_request``."""
    engine_request_json: str | None = Field(default=None, sa_column=Column(Text))
    """The engine request and ControlNet units as validated at submit (images as input references): what the
    dispatcher runs. None on rows written before inputs moved to the asset store."""
    models_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    """Resolved model files by role: {"checkpoint": {...}, "vae": ..., "loras": {name: {...}}, ...}."""
    checkpoint: str | None = Field(default=None, max_length=255, index=True)
    checkpoint_hash: str | None = Field(default=None, max_length=10)
    attempts: int = 0
    """How many times a worker started it; restart recovery gives up after the configured maximum."""
    cancel_requested: bool = False
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str | None = Field(default=None, max_length=64)
    progress: float = 0.0
    step: int = 0
    steps: int = 0
    job_no: int = 0
    job_count: int = 0
    eta_seconds: float | None = None
    image_keys_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    infotexts_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    info_json: str | None = Field(default=None, sa_column=Column(Text))
    """A1111's ``info`` object (seeds, sizes, model name/hash ...) of a finished job."""
    warnings_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    timings_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    error: str | None = Field(default=None, sa_column=Column(Text))
    error_kind: str | None = Field(default=None, max_length=32)
    metrics_json: str | None = Field(default=None, sa_column=Column(Text))
    """Numbers a job reports while it runs (a training's loss, lr, epoch): ``{"latest": {...}, "history": [...]}``,
    the history bounded (``webapp/services/jobs/dispatcher.py``). None for jobs that report none."""
    log_tail: str | None = Field(default=None, sa_column=Column(Text))
    """The last lines a job logged (training); None for jobs that log nothing."""
    artifact_keys_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    """Asset-store keys of the files a job made besides images (a training's LoRA files, samples, log)."""
    remote_handle_json: str | None = Field(default=None, sa_column=Column(Text))
    """What the backend needs to find a job that runs elsewhere again after a restart (``Started.handle``: a
    SageMaker async invocation's id and output locations); None for jobs that run in a worker we hold."""
    lease_owner: str | None = Field(default=None, max_length=64)
    """The studio instance (``webapp/services/jobs/leases.py``) whose dispatcher holds the running job; kept on a
    finished row (where it ran), cleared when the job goes back to the queue."""
    lease_expires_at: datetime | None = None
    """Until when that instance's hold is good; it renews it while the job runs, and any instance's reaper puts a
    running job whose lease has run out back in the queue (its instance died). None: not running."""
    registered_by: str | None = Field(default=None, max_length=64)
    """A succeeded training: the studio instance that took the registration of its LoRAs as models
    (``webapp/services/trainings/registration.py``), claimed by a conditional UPDATE so one instance does it."""
    stored_bytes: int | None = Field(default=None, sa_type=BigInteger)
    """Disk the job takes: its request as stored plus its result images (the disk quota sums it). None on
    jobs recorded before sizes were kept, until the start-up sweep measures them."""

    # -- decoded views ---------------------------------------------------------------------------
    @property
    def request(self) -> dict[str, Any]:
        return _loads(self.request_json, {})

    @property
    def models(self) -> dict[str, Any]:
        return _loads(self.models_json, {})

    @property
    def image_keys(self) -> list[str]:
        return _loads(self.image_keys_json, [])

    @property
    def infotexts(self) -> list[str]:
        return _loads(self.infotexts_json, [])

    @property
    def info(self) -> dict[str, Any] | None:
        return _loads(self.info_json, None)

    @property
    def metrics(self) -> dict[str, Any]:
        return _loads(self.metrics_json, {})

    @property
    def artifact_keys(self) -> list[str]:
        return _loads(self.artifact_keys_json, [])

    @property
    def remote_handle(self) -> dict[str, Any] | None:
        return _loads(self.remote_handle_json, None)

    @property
    def log_lines(self) -> list[str]:
        return self.log_tail.splitlines() if self.log_tail else []

    @property
    def warnings(self) -> list[str]:
        return _loads(self.warnings_json, [])

    @property
    def timings(self) -> dict[str, float]:
        return _loads(self.timings_json, {})

    @property
    def is_terminal(self) -> bool:
        return JobStatus(self.status).terminal

    @property
    def title(self) -> str:
        """The history name users see: ``Time-Type-Status-UUID`` (time in UTC)."""
        return f"{self.created_at:%Y-%m-%d %H:%M:%S}-{self.mode}-{self.status}-{self.id}"


class EndpointStatus(StrEnum):
    """ESD's endpoint vocabulary, so users coming from the AWS extension read the same words."""

    CREATING = "Creating"
    IN_SERVICE = "InService"
    DEGRADED = "Degraded"
    """Running here but its backend reports a problem (a worker unreachable): its queued jobs wait."""
    UPDATING = "Updating"
    DELETING = "Deleting"
    FAILED = "Failed"
    STOPPED = "Stopped"


class Endpoint(SQLModel, table=True):
    """A configured backend instance jobs can be sent to (``local`` is created at start)."""

    __tablename__ = "endpoint"

    name: str = Field(primary_key=True, max_length=64)
    kind: str = Field(max_length=32)
    status: EndpointStatus = Field(default=EndpointStatus.CREATING)
    remote: bool = False
    """True when jobs leave this server (the Generate button then reads "Generate on Cloud")."""
    is_default: bool = False
    config_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    capabilities_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    error: str | None = Field(default=None, sa_column=Column(Text))
    owner_id: int | None = Field(default=None, foreign_key="user.id", ondelete="SET NULL")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    min_instances: int = 1
    max_instances: int = 1
    autoscale: bool = False
    allowed_roles: str = Field(default="", max_length=1024)
    """Role ids as ``,3,7,`` whose users may run jobs here; empty: every user holding ``endpoint:use``."""
    """Instance bounds and autoscaling as deployed (SageMaker scales within them; one-box kinds record them)."""
    secrets_token: str | None = Field(default=None, sa_column=Column(Text))
    """The options' secret fields as one Fernet token (webapp/services/secrets.py); ``config_json`` holds the
    rest. Decrypted only to build the backend; never shown."""

    @property
    def config(self) -> dict[str, Any]:
        return _loads(self.config_json, {})

    @property
    def capabilities(self) -> dict[str, Any]:
        return _loads(self.capabilities_json, {})
