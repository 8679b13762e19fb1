"""``/api/v1/jobs``: create (returns the id at once), get, list with filters and paging, cancel, delete,
images, and progress as a long-poll or a Server-Sent Events stream. Thin over ``JobService``: the same
validation, authorisation (another user's job is a 404) and queue as the UI. Long-polls and streams
await the job board's events, holding no thread while they wait.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from webapp.api.deps import CurrentUser
from webapp.records import Job, User
from webapp.services.errors import NotFound
from webapp.services.jobs import JobService, ProgressSnapshot

log = logging.getLogger(__name__)

SSE_HEARTBEAT_SECONDS = 15.0
MAX_LONG_POLL_SECONDS = 60.0


class JobCreate(BaseModel):
    mode: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
    request: dict[str, Any] = Field(default_factory=dict, description="An A1111 /sdapi/v1 txt2img or img2img body")
    endpoint: str | None = Field(None, description="Where to run it; default: the default endpoint")
    task_id: str | None = Field(None, description="Your own id to follow the job by (A1111 force_task_id)")


class JobImage(BaseModel):
    index: int
    url: str
    infotext: str | None


class JobPublic(BaseModel):
    id: str
    title: str
    owner: str
    mode: str
    status: str
    endpoint: str
    task_id: str | None
    checkpoint: str | None
    checkpoint_hash: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: float
    step: int
    steps: int
    eta_seconds: float | None
    images: list[JobImage]
    info: dict[str, Any] | None
    warnings: list[str]
    timings: dict[str, float]
    error: str | None
    error_kind: str | None
    request: dict[str, Any] | None = None


class JobPage(BaseModel):
    items: list[JobPublic]
    total: int
    limit: int
    offset: int


class JobProgress(BaseModel):
    id: str
    status: str
    step: int
    total: int
    job_no: int
    job_count: int
    progress: float
    eta_seconds: float | None
    queue_position: int
    preview: str | None = Field(None, description="data: URI of the live preview PNG, when there is one")


def image_url(job_id: str, index: int) -> str:
    return f"/files/jobs/{job_id}/{index}.png"


def job_public(job: Job, *, request: dict[str, Any] | None = None) -> JobPublic:
    """The job as the API shows it; ``request`` (``JobService.submitted_request``) only in the single-job view."""
    infotexts = job.infotexts
    images = [JobImage(index=i, url=image_url(job.id, i), infotext=infotexts[i] if i < len(infotexts) else None)
              for i in range(len(job.image_keys))]
    return JobPublic(
        id=job.id, title=job.title, owner=job.owner_name, mode=str(job.mode), status=str(job.status),
        endpoint=job.endpoint, task_id=job.task_id, checkpoint=job.checkpoint, checkpoint_hash=job.checkpoint_hash,
        attempts=job.attempts, created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        progress=job.progress, step=job.step, steps=job.steps, eta_seconds=job.eta_seconds, images=images,
        info=job.info, warnings=job.warnings, timings=job.timings, error=job.error, error_kind=job.error_kind,
        request=request,
    )


def progress_public(snapshot: ProgressSnapshot) -> JobProgress:
    import base64

    preview = None
    if snapshot.preview_png:
        preview = "data:image/png;base64," + base64.b64encode(snapshot.preview_png).decode("ascii")
    return JobProgress(id=snapshot.job_id, status=str(snapshot.status), step=snapshot.step, total=snapshot.total,
                       job_no=snapshot.job_no, job_count=snapshot.job_count, progress=snapshot.progress,
                       eta_seconds=snapshot.eta, queue_position=snapshot.queue_position, preview=preview)


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def build_router(jobs: JobService) -> APIRouter:
    router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

    @router.post("", status_code=status.HTTP_201_CREATED)
    def create_job(body: JobCreate, user: CurrentUser) -> JobPublic:
        """Queue a generation; poll ``GET /api/v1/jobs/{id}`` or stream ``/events`` to follow it."""
        job = jobs.submit(actor=user, mode=body.mode, request=body.request, endpoint=body.endpoint,
                          task_id=body.task_id)
        return job_public(job)

    @router.get("")
    def list_jobs(
        user: CurrentUser,
        mode: str | None = None,
        status_: str | None = Query(None, alias="status"),
        endpoint: str | None = None,
        checkpoint: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = Query(10, ge=1, le=500),
        offset: int = Query(0, ge=0),
        all_users: bool = False,
    ) -> JobPage:
        """Your jobs, newest first (administrators: everyone's with ``all_users=true``)."""
        items, total = jobs.list_jobs(actor=user, mode=mode, status=status_, endpoint=endpoint, checkpoint=checkpoint,
                                      since=_utc(since), until=_utc(until), limit=limit, offset=offset,
                                      all_users=all_users)
        return JobPage(items=[job_public(j) for j in items], total=total, limit=limit, offset=offset)

    @router.get("/{job_id}")
    def get_job(job_id: str, user: CurrentUser) -> JobPublic:
        job = jobs.get(actor=user, job_id=job_id)
        return job_public(job, request=jobs.submitted_request(job))

    @router.post("/{job_id}/cancel")
    def cancel_job(job_id: str, user: CurrentUser) -> JobPublic:
        """Cancel a queued job, or stop a running one within one sampling step."""
        return job_public(jobs.cancel(actor=user, job_id=job_id))

    @router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT)
    def delete_job(job_id: str, user: CurrentUser) -> Response:
        jobs.delete(actor=user, job_id=job_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.get("/{job_id}/images")
    def list_images(job_id: str, user: CurrentUser) -> list[JobImage]:
        return job_public(jobs.get(actor=user, job_id=job_id)).images

    @router.get("/{job_id}/images/{index}", response_class=Response,
                responses={200: {"content": {"image/png": {}}}})
    def get_image(job_id: str, index: int, user: CurrentUser) -> Response:
        """The PNG exactly as stored, with its ``parameters`` (infotext) chunk."""
        return Response(jobs.image(actor=user, job_id=job_id, index=index), media_type="image/png",
                        headers={"cache-control": "private, max-age=3600"})

    @router.get("/{job_id}/progress")
    async def get_progress(job_id: str, user: CurrentUser,
                           wait: float = Query(0.0, ge=0.0, le=MAX_LONG_POLL_SECONDS,
                                               description="Long-poll: answer when something changes (or after "
                                                           "this many seconds)")) -> JobProgress:
        version = jobs.board.version(job_id)
        job = await run_in_threadpool(jobs.get, actor=user, job_id=job_id)
        if wait > 0 and not job.is_terminal:
            await jobs.changed_async(actor=user, job=job, version=version, timeout=wait)
        snapshot = await run_in_threadpool(jobs.progress, actor=user, job_id=job_id)
        return progress_public(snapshot)

    @router.get("/{job_id}/events", response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}}})
    def stream_events(job_id: str, user: CurrentUser) -> StreamingResponse:
        """Server-Sent Events: ``progress`` events while it runs, then one ``done`` event with the job."""
        jobs.get(actor=user, job_id=job_id)  # 404 before the stream starts
        return StreamingResponse(_events(jobs, user, job_id), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    return router


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


async def _events(jobs: JobService, user: User, job_id: str) -> AsyncIterator[str]:
    while True:
        version = jobs.board.version(job_id)  # read before the state, so no change slips between them
        try:
            job = await run_in_threadpool(jobs.get, actor=user, job_id=job_id)
            if job.is_terminal:
                yield _sse("done", job_public(job).model_dump(mode="json"))
                return
            snapshot = await run_in_threadpool(jobs.progress, actor=user, job_id=job_id)
        except NotFound:
            yield _sse("deleted", {"id": job_id})
            return
        yield _sse("progress", progress_public(snapshot).model_dump(mode="json"))
        try:  # the board's news, or the row's when another studio instance runs the job
            changed = await jobs.changed_async(actor=user, job=job, version=version, timeout=SSE_HEARTBEAT_SECONDS)
        except NotFound:
            yield _sse("deleted", {"id": job_id})
            return
        if not changed:
            yield ": keep-alive\n\n"
