"""``/api/v1/trainings``: LoRA trainings (create, list, follow, stop, resume, delete, files) and their config.

Thin over `TrainingService`, which validates (every bad config key named; the base model, dataset and output
name checked before anything is stored) and authorises (another user's training is a 404, as for jobs). A
training is a ``train_lora`` job: its id works with ``/api/v1/jobs`` too.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from webapp.api.deps import CurrentUser
from webapp.records import Job
from webapp.services.trainings import TrainingService
from webapp.services.trainings.views import artifact_kind, training_summary, training_view

MAX_PAGE = 200
CONTENT_TYPES = {"lora": "application/octet-stream", "sample": "image/png", "log": "text/plain; charset=utf-8"}


class TrainingCreate(BaseModel):
    base_type: str = Field(description="sd15 or sdxl")
    base_model: str = Field(description="The base checkpoint: its model id or name (of the base type)")
    dataset_id: str = Field(description="A dataset you can see (/api/v1/datasets)")
    config: dict[str, Any] | str | None = Field(
        None, description="kohya keys as an object, or TOML / JSON text; missing keys take the base's defaults")
    output_name: str | None = Field(None, description="File name of the LoRA (default: the config's output_name)")
    endpoint: str | None = Field(None, description="Where to run it; default: the default endpoint")


class ConfigText(BaseModel):
    base_type: str = Field(description="sd15 or sdxl")
    config: dict[str, Any] | str = Field(description="kohya keys as an object, or TOML / JSON text")


def build_router(trainings: TrainingService) -> APIRouter:
    router = APIRouter(prefix="/api/v1/trainings", tags=["trainings"])

    def view(job: Job) -> dict[str, Any]:
        return training_view(job, trainings.snapshot(job), resumable=trainings.resumable(job))

    @router.post("", status_code=status.HTTP_201_CREATED)
    def create_training(user: CurrentUser, body: TrainingCreate) -> dict[str, Any]:
        """Queue a LoRA training; answers the training (``id``, ``status`` queued, the checked config)."""
        job = trainings.create(actor=user, base_type=body.base_type, base_model=body.base_model,
                               dataset_id=body.dataset_id, config=body.config, output_name=body.output_name,
                               endpoint=body.endpoint)
        return view(job)

    @router.get("")
    def list_trainings(user: CurrentUser, limit: int = Query(50, ge=1, le=MAX_PAGE),
                       offset: int = Query(0, ge=0)) -> dict[str, Any]:
        """Your trainings, newest first (administrators: everyone's)."""
        jobs, total = trainings.list_trainings(actor=user, limit=limit, offset=offset)
        return {"items": [training_summary(j, trainings.snapshot(j)) for j in jobs], "total": total,
                "limit": limit, "offset": offset}

    @router.get("/defaults")
    def defaults(user: CurrentUser, base_type: str = Query("sd15", description="sd15 or sdxl")) -> dict[str, Any]:
        """The base type's default config, as an object and as TOML text."""
        values = trainings.defaults(base_type)
        text, _ = trainings.format_config(values, base_type)
        return {"base_type": base_type, "config": values, "toml": text}

    @router.post("/format-config")
    def format_config(user: CurrentUser, body: ConfigText) -> dict[str, Any]:
        """Check a config and answer it as normalised TOML (defaults filled in) with its warnings; a bad config
        is a 422 whose ``detail`` names every bad key and ``field`` the first (``config.<key>``)."""
        text, warnings = trainings.format_config(body.config, body.base_type)
        return {"base_type": body.base_type, "toml": text, "warnings": warnings}

    @router.get("/{job_id}")
    def get_training(user: CurrentUser, job_id: str) -> dict[str, Any]:
        """Status, progress, metrics (latest and history), log tail, files and the models registered from it."""
        return view(trainings.get(actor=user, job_id=job_id))

    @router.post("/{job_id}/stop")
    def stop(user: CurrentUser, job_id: str) -> dict[str, Any]:
        """Stop at the next step (queued: at once); saved epochs and samples are kept."""
        return view(trainings.stop(actor=user, job_id=job_id))

    @router.post("/{job_id}/resume", status_code=status.HTTP_201_CREATED)
    def resume(user: CurrentUser, job_id: str) -> dict[str, Any]:
        """A new training continuing a stopped or failed one after its last saved epoch."""
        return view(trainings.resume(actor=user, job_id=job_id))

    @router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT)
    def delete(user: CurrentUser, job_id: str) -> Response:
        """Delete the training and its files; LoRAs registered as models stay."""
        trainings.delete(actor=user, job_id=job_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.get("/{job_id}/file")
    async def artifact(user: CurrentUser, job_id: str,
                       key: str = Query(description="One of the training's artifact keys")) -> StreamingResponse:
        """One file of the training (a LoRA, a sample PNG, the log), streamed."""
        job = await run_in_threadpool(trainings.get, actor=user, job_id=job_id)
        handle = await run_in_threadpool(trainings.artifact, actor=user, job_id=job_id, key=key)
        name = key.rsplit("/", 1)[-1]
        kind = artifact_kind(job, key)
        disposition = "inline" if kind == "sample" else "attachment"

        def chunks():  # noqa: ANN202 - a sync generator Starlette iterates on a worker thread
            with handle:
                while chunk := handle.read(1024 * 1024):
                    yield chunk

        return StreamingResponse(chunks(), media_type=CONTENT_TYPES.get(kind, "application/octet-stream"), headers={
            "content-disposition": f'{disposition}; filename="{name}"', "x-content-type-options": "nosniff",
            "cache-control": "private, max-age=60"})

    return router
