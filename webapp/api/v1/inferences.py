"""``/api/v1/inferences``: ESD's name for jobs, over the same JobService as the UI and ``/sdapi/v1``.

Users of the AWS extension (ESD) create an inference with a task type, the models by A1111 folder
name and the A1111 payload, start it, poll it and fetch its images. Here the payload goes in the
create call (``payload`` as JSON, or ESD's ``payload_string``) — there is no S3 upload step — and the
job is queued at once; ``PUT /inferences/{id}/start`` is accepted for scripts that call it. Answers
use ESD's envelope ``{statusCode, message, data}`` and its status words (created / inprogress /
succeed / failed). Another user's inference is reported as absent (404).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Body, Response, status
from pydantic import BaseModel, Field

from webapp.api.deps import CurrentUser
from webapp.records import Job, JobStatus, User
from webapp.services.errors import InvalidInput, NotFound

_ESD_STATUS = {JobStatus.QUEUED: "inprogress", JobStatus.RUNNING: "inprogress", JobStatus.SUCCEEDED: "succeed",
               JobStatus.FAILED: "failed", JobStatus.CANCELLED: "failed"}
_TASK_TYPES = ("txt2img", "img2img")


class InferenceCreate(BaseModel):
    task_type: str = Field(description="txt2img or img2img (an img2img payload with a mask runs as inpaint)")
    inference_type: str | None = Field(default=None, description="ESD's Async / Real-time; every job is queued")
    models: dict[str, list[str]] = Field(default_factory=dict,
                                         description='By A1111 folder: {"Stable-diffusion": [name], "VAE": [name]}')
    sagemaker_endpoint_name: str | None = Field(default=None, description="The endpoint to run on (default: the "
                                                                          "default endpoint)")
    endpoint: str | None = None
    payload: dict[str, Any] | None = Field(default=None, description="The A1111 txt2img/img2img body")
    payload_string: str | None = Field(default=None, description="ESD: the same body as a JSON string")
    task_id: str | None = Field(default=None, max_length=128)


class InferenceDelete(BaseModel):
    inference_id_list: list[str]


def envelope(data: Any, message: str = "OK", status_code: int = 200) -> dict[str, Any]:
    return {"statusCode": status_code, "message": message, "data": data}


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def inference_item(job: Job, image_count: int) -> dict[str, Any]:
    base = f"/api/v1/inferences/{job.id}/images"
    return {
        "InferenceJobId": job.id, "id": job.id, "status": _ESD_STATUS[JobStatus(job.status)],
        "studio_status": str(job.status), "taskType": "img2img" if job.mode == "inpaint" else str(job.mode),
        "mode": str(job.mode), "inference_type": "Async", "createTime": _iso(job.created_at),
        "startTime": _iso(job.started_at), "completeTime": _iso(job.finished_at),
        "image_names": [f"{i}.png" for i in range(image_count)],
        "img_presigned_urls": [f"{base}/{i}" for i in range(image_count)], "output_presigned_urls": [],
        "params": {"used_models": {"Stable-diffusion": [job.checkpoint] if job.checkpoint else []},
                   "sagemaker_inference_endpoint_name": job.endpoint, "task_id": job.task_id},
        "progress": job.progress, "info": job.info, "warnings": job.warnings,
        "error": job.error, "owner_group_or_role": [job.owner_name],
    }


def _payload(body: InferenceCreate) -> dict[str, Any]:
    if body.payload is not None and body.payload_string is not None:
        raise InvalidInput("send either `payload` or `payload_string`, not both", field="payload")
    if body.payload_string is not None:
        try:
            payload = json.loads(body.payload_string)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"`payload_string` is not JSON: {exc.msg}", field="payload_string") from None
    else:
        payload = body.payload
    if not isinstance(payload, dict):
        raise InvalidInput("`payload` (the A1111 request body) is required and must be a JSON object",
                           field="payload")
    settings = dict(payload.get("override_settings") or {})
    for folder, key in (("Stable-diffusion", "sd_model_checkpoint"), ("VAE", "sd_vae")):
        names = body.models.get(folder) or []
        if names and key not in settings:
            settings[key] = names[0]
    return {**payload, "override_settings": settings}


def build_router(jobs: Any) -> APIRouter:
    """``jobs`` is the ``JobService``."""
    router = APIRouter(prefix="/api/v1/inferences", tags=["inferences (ESD names)"])

    def item(user: User, job: Job) -> dict[str, Any]:
        return inference_item(job, jobs.image_count(job))

    @router.post("", status_code=status.HTTP_201_CREATED)
    def create_inference(user: CurrentUser, body: InferenceCreate) -> dict[str, Any]:
        """Queue a job from an A1111 payload; poll ``GET /inferences/{id}`` for its status and images."""
        if body.task_type not in _TASK_TYPES:
            raise InvalidInput(f"`task_type` must be one of {', '.join(_TASK_TYPES)} but is {body.task_type!r}",
                               field="task_type")
        job = jobs.submit(actor=user, mode=body.task_type, request=_payload(body),
                          endpoint=body.endpoint or body.sagemaker_endpoint_name, task_id=body.task_id)
        return envelope({"inference": {**item(user, job), "type": body.task_type, "models": body.models}},
                        "inference created", 201)

    @router.put("/{inference_id}/start", status_code=status.HTTP_202_ACCEPTED)
    def start_inference(user: CurrentUser, inference_id: str) -> dict[str, Any]:
        """ESD's start call: the job was queued at creation, so this reports where it stands."""
        job = jobs.get(actor=user, job_id=inference_id)
        return envelope({"inference_id": job.id, "status": _ESD_STATUS[JobStatus(job.status)],
                         "endpoint_name": job.endpoint, "output_path": f"/api/v1/inferences/{job.id}/images"},
                        "inference started", 202)

    @router.post("/{inference_id}/cancel")
    def cancel_inference(user: CurrentUser, inference_id: str) -> dict[str, Any]:
        """Cancel a queued inference now, or stop a running one within a sampling step."""
        return envelope(item(user, jobs.cancel(actor=user, job_id=inference_id)), "cancel requested")

    @router.get("/{inference_id}")
    def get_inference(user: CurrentUser, inference_id: str) -> dict[str, Any]:
        return envelope(item(user, jobs.get(actor=user, job_id=inference_id)))

    @router.get("/{inference_id}/images/{index}")
    def get_image(user: CurrentUser, inference_id: str, index: int) -> Response:
        return Response(jobs.image(actor=user, job_id=inference_id, index=index), media_type="image/png")

    @router.get("")
    def list_inferences(user: CurrentUser, type: str | None = None, status: str | None = None,  # noqa: A002
                        limit: int = 10, exclusive_start_key: str | None = None) -> dict[str, Any]:
        """Newest first; page with ``limit`` and the ``last_evaluated_key`` of the previous page."""
        if not 1 <= limit <= 1000:
            raise InvalidInput("`limit` must be between 1 and 1000", field="limit")
        offset = 0
        if exclusive_start_key:
            if not exclusive_start_key.isdigit():
                raise InvalidInput("`exclusive_start_key` must be the `last_evaluated_key` of a previous page",
                                   field="exclusive_start_key")
            offset = int(exclusive_start_key)
        found, total = jobs.list_jobs(actor=user, mode=type, status=status, limit=limit, offset=offset)
        after = offset + len(found)
        return envelope({"inferences": [item(user, j) for j in found], "total": total,
                         "last_evaluated_key": str(after) if after < total else None})

    @router.delete("")
    def delete_inferences(user: CurrentUser, body: InferenceDelete = Body(...)) -> dict[str, Any]:  # noqa: B008
        """Delete inferences and their images; an unknown id refuses the whole request."""
        if not body.inference_id_list:
            raise InvalidInput("`inference_id_list` must name at least one inference", field="inference_id_list")
        missing = []
        for job_id in body.inference_id_list:
            try:
                jobs.get(actor=user, job_id=job_id)
            except NotFound:
                missing.append(job_id)
        if missing:
            raise NotFound(f"no inference {', '.join(map(repr, missing))}", field="inference_id_list")
        for job_id in body.inference_id_list:
            jobs.delete(actor=user, job_id=job_id)
        return envelope({"deleted": body.inference_id_list}, "inferences deleted")

    return router
