"""``/progress``, ``/interrupt``, ``/skip`` (per caller) and ``/internal/progress`` (follow a ``force_task_id``).

A1111 has one global job, so any client sees and interrupts whatever runs. Here each caller sees and
stops only their own work: ``/progress`` reports the caller's running job (else their oldest queued
one) and ``/interrupt`` stops that same job, keeping its finished batches; ``/skip`` drops the current
batch of the caller's running job and it goes on with the next. Administrators are callers like anyone
here; they stop other users' jobs through ``/api/v1/jobs/{id}/cancel`` or the UI, where the target is
explicit.
Idle is exactly what pollers wait for: ``progress == 0`` and ``state.job_count == 0``.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter

from webapp.api.deps import CurrentUser
from webapp.api.sdapi.context import SdapiContext
from webapp.api.sdapi.errors import A1111Route
from webapp.api.sdapi.schemas import InternalProgressBody
from webapp.records import JobStatus
from webapp.services.errors import NotFound

IDLE_STATE: dict[str, Any] = {
    "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
    "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
}


def idle_progress() -> dict[str, Any]:
    return {"progress": 0.0, "eta_relative": 0.0, "state": dict(IDLE_STATE), "current_image": None,
            "textinfo": None, "current_task": None}


def progress_answer(ctx: SdapiContext, user: Any, skip_current_image: bool) -> dict[str, Any]:
    snapshot = ctx.jobs.current_progress(actor=user)
    if snapshot is None:
        return idle_progress()
    job_count = max(snapshot.job_count, 1)
    queued = snapshot.status == JobStatus.QUEUED
    stamp = (snapshot.started_at or snapshot.created_at).strftime("%Y%m%d%H%M%S")
    preview = None
    if not skip_current_image and snapshot.preview_png and ctx.options.generation_defaults(actor=user).live_previews:
        preview = base64.b64encode(snapshot.preview_png).decode("ascii")
    textinfo = (f"Waiting in the queue (position {snapshot.queue_position})" if queued
                else snapshot.note if snapshot.note and not snapshot.total else f"Step {snapshot.step}/{snapshot.total}")
    return {
        # never exactly 0 while something is pending, so "progress == 0 and job_count == 0" means idle
        "progress": 0.0 if queued else min(1.0, max(0.01, float(snapshot.progress))),
        "eta_relative": float(snapshot.eta or 0.0),
        "state": {
            "skipped": False, "interrupted": False, "stopping_generation": False,
            "job": "" if queued else f"Batch {snapshot.job_no + 1} out of {job_count}",
            "job_count": job_count, "job_timestamp": stamp, "job_no": snapshot.job_no,
            "sampling_step": snapshot.step, "sampling_steps": snapshot.total,
        },
        "current_image": preview, "textinfo": textinfo, "current_task": snapshot.task_id or snapshot.job_id,
    }


def build_router(ctx: SdapiContext) -> APIRouter:
    router = APIRouter(route_class=A1111Route)

    @router.get("/progress")
    def progress(user: CurrentUser, skip_current_image: bool = False) -> dict[str, Any]:
        """The caller's running (else oldest queued) job; idle is ``progress 0`` and ``job_count 0``."""
        return progress_answer(ctx, user, skip_current_image)

    @router.post("/interrupt")
    def interrupt(user: CurrentUser) -> dict[str, Any]:
        """Stop the caller's current job (running, else oldest queued; only their own), keeping finished batches."""
        ctx.jobs.interrupt(actor=user)
        return {}

    @router.post("/skip")
    def skip(user: CurrentUser) -> None:
        """Drop the current batch of the caller's running job; it goes on with its next batch (``n_iter``)."""
        ctx.jobs.skip(actor=user)
        return None

    return router


def build_internal_router(ctx: SdapiContext) -> APIRouter:
    """A1111's UI progress route, used with ``force_task_id`` (outside ``/sdapi/v1``)."""
    router = APIRouter(route_class=A1111Route)

    @router.post("/internal/progress")
    def internal_progress(user: CurrentUser, body: InternalProgressBody) -> dict[str, Any]:
        try:
            job = ctx.jobs.find_by_task(actor=user, task_id=body.id_task)
        except NotFound:  # not submitted yet (or not the caller's): A1111 answers "waiting" too
            return {"active": False, "queued": False, "completed": False, "progress": None, "eta": None,
                    "live_preview": None, "id_live_preview": -1, "textinfo": "Waiting..."}
        snapshot = ctx.jobs.progress(actor=user, job_id=job.id)
        running = snapshot.status == JobStatus.RUNNING
        preview, preview_id = None, body.id_live_preview
        if body.live_preview and running and snapshot.preview_png:
            preview = "data:image/png;base64," + base64.b64encode(snapshot.preview_png).decode("ascii")
            preview_id = snapshot.step
        return {
            "active": running, "queued": snapshot.status == JobStatus.QUEUED,
            "completed": JobStatus(snapshot.status).terminal,
            "progress": float(snapshot.progress) if running or snapshot.status == JobStatus.SUCCEEDED else None,
            "eta": snapshot.eta, "live_preview": preview, "id_live_preview": preview_id,
            "textinfo": f"{snapshot.status}" + (f" (queue position {snapshot.queue_position})"
                                                 if snapshot.status == JobStatus.QUEUED else ""),
        }

    return router
