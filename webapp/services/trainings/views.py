"""JSON views of trainings, shared by /api/v1/trainings and the Training tab."""

from __future__ import annotations

from typing import Any

from webapp.records import Job
from webapp.services.jobs import ProgressSnapshot
from webapp.services.trainings.registration import ERRORS, REGISTERED
from webapp.services.trainings.service import lora_keys, sample_keys


def _time(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def artifact_kind(job: Job, key: str) -> str:
    if key in lora_keys(job):
        return "lora"
    if key in sample_keys(job):
        return "sample"
    return "log" if key.endswith(".log") else "file"


def training_summary(job: Job, snapshot: ProgressSnapshot) -> dict[str, Any]:
    """One row of the list: who, what, how far, the latest loss."""
    payload = job.request
    latest = snapshot.metrics or job.metrics.get("latest") or {}
    return {
        "id": job.id, "status": str(job.status), "owner": job.owner_name, "output_name": payload.get("output_name"),
        "base_type": payload.get("base_type"), "base_model": payload.get("base_model_name") or job.checkpoint,
        "dataset_id": payload.get("dataset_id"), "endpoint": job.endpoint,
        "progress": snapshot.progress, "step": snapshot.step, "total_steps": snapshot.total,
        "queue_position": snapshot.queue_position, "eta_seconds": snapshot.eta,
        "loss": latest.get("loss"), "epoch": latest.get("epoch"),
        "created_at": _time(job.created_at), "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at), "error": job.error, "error_kind": job.error_kind,
    }


def training_view(job: Job, snapshot: ProgressSnapshot, *, resumable: bool, log_lines: int = 200) -> dict[str, Any]:
    """The whole training: the summary, its config, metrics (latest and history), log tail, files, models."""
    info = job.info or {}
    metrics = job.metrics
    return {
        **training_summary(job, snapshot),
        "config": job.request.get("config", {}),
        "metrics": {"latest": snapshot.metrics or metrics.get("latest") or {}, "history": metrics.get("history", [])},
        "log": job.log_lines[-log_lines:],
        "artifacts": [{"key": key, "kind": artifact_kind(job, key)} for key in job.artifact_keys],
        "registered_models": info.get(REGISTERED, {}),
        "registration_errors": info.get(ERRORS, {}),
        "info": {k: v for k, v in info.items() if k not in (REGISTERED, ERRORS)},
        "resumable": resumable,
    }
