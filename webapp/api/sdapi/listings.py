"""The A1111 list routes: models of each type, samplers, schedulers, upscalers, scripts, styles.

Everything listed really exists for the caller: models come from the registry (filtered by what the
caller may see, Active only), samplers and upscalers from what the engine can run. Empty lists are
the honest answer for what the studio does not have (face restorers, prompt styles, scripts).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from pipelines import samplers
from pipelines.types import IMAGE_UPSCALERS, LATENT_UPSCALERS
from webapp.api.deps import CurrentUser
from webapp.api.sdapi.context import SdapiContext, file_details, model_path
from webapp.api.sdapi.errors import A1111Route
from webapp.records import ModelRecord, ModelStatus, ModelType, User

# Base families whose text encoders share embedding widths (an SD1 embedding fits every SD1 model).
_FAMILIES = {"sd1": "sd1", "sd1-inpaint": "sd1", "sd2": "sd2", "sd2-inpaint": "sd2", "sdxl": "sdxl",
             "sdxl-inpaint": "sdxl", "sdxl-refiner": "sdxl-refiner"}


def sd_model_item(record: ModelRecord, actor: User) -> dict[str, Any]:
    return {
        "title": record.title, "model_name": record.name.replace("/", "_"), "hash": record.autov2,
        "sha256": record.sha256, "filename": model_path(record, actor), "config": None,
    }


def lora_item(record: ModelRecord, actor: User) -> dict[str, Any]:
    _details, header = file_details(record)
    alias = header.get("ss_output_name") or record.name
    return {"name": record.name, "alias": alias, "path": model_path(record, actor), "metadata": header}


def embedding_item(record: ModelRecord, checkpoint: ModelRecord | None) -> dict[str, Any]:
    details, header = file_details(record)
    step = header.get("step") or details.get("step")
    return {
        "step": int(step) if isinstance(step, int | str) and str(step).isdigit() else None,
        "sd_checkpoint": checkpoint.autov2 if checkpoint else None,
        "sd_checkpoint_name": checkpoint.name if checkpoint else None,
        "shape": details.get("width"), "vectors": details.get("vectors"),
    }


def build_router(ctx: SdapiContext) -> APIRouter:
    router = APIRouter(route_class=A1111Route)

    @router.get("/sd-models")
    def sd_models(user: CurrentUser) -> list[dict[str, Any]]:
        return [sd_model_item(r, user) for r in ctx.models(user, ModelType.CHECKPOINT)]

    @router.get("/sd-vae")
    def sd_vae(user: CurrentUser) -> list[dict[str, Any]]:
        return [{"model_name": r.name, "filename": model_path(r, user)} for r in ctx.models(user, ModelType.VAE)]

    @router.get("/loras")
    def loras(user: CurrentUser) -> list[dict[str, Any]]:
        return [lora_item(r, user) for r in ctx.models(user, ModelType.LORA)]

    @router.get("/hypernetworks")
    def hypernetworks(user: CurrentUser) -> list[dict[str, Any]]:
        return [{"name": r.name, "path": model_path(r, user)} for r in ctx.models(user, ModelType.HYPERNETWORK)]

    @router.get("/embeddings")
    def embeddings(user: CurrentUser) -> dict[str, dict[str, Any]]:
        """``loaded``: embeddings usable with the caller's current checkpoint; ``skipped``: the others."""
        checkpoint = ctx.options.current_checkpoint(user)
        family = _FAMILIES.get(checkpoint.base or "") if checkpoint else None
        loaded: dict[str, Any] = {}
        skipped: dict[str, Any] = {}
        for record in ctx.models(user, ModelType.EMBEDDING):
            usable = record.status == ModelStatus.ACTIVE  # not while its file is still being hashed
            fits = usable and (family is None or record.base is None or _FAMILIES.get(record.base) == family)
            (loaded if fits else skipped)[record.name] = embedding_item(record, checkpoint)
        return {"loaded": loaded, "skipped": skipped}

    @router.get("/samplers")
    def list_samplers(user: CurrentUser) -> list[dict[str, Any]]:
        return samplers.list_samplers()

    @router.get("/schedulers")
    def list_schedulers(user: CurrentUser) -> list[dict[str, Any]]:
        return samplers.list_schedulers()

    @router.get("/upscalers")
    def upscalers(user: CurrentUser) -> list[dict[str, Any]]:
        """Image upscalers the engine runs itself (no ESRGAN models here); latent modes are listed apart."""
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None,
                 "scale": 1.0 if name == "None" else 4.0} for name in IMAGE_UPSCALERS]

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes(user: CurrentUser) -> list[dict[str, str]]:
        return [{"name": name} for name in LATENT_UPSCALERS]

    @router.get("/scripts")
    def scripts(user: CurrentUser) -> dict[str, list[str]]:
        """No A1111 scripts or extensions run here; webuiapi reads this to decide what to send."""
        return {"txt2img": [], "img2img": []}

    @router.get("/script-info")
    def script_info(user: CurrentUser) -> list[dict[str, Any]]:
        return []

    @router.get("/extensions")
    def extensions(user: CurrentUser) -> list[dict[str, Any]]:
        return []

    @router.get("/prompt-styles")
    def prompt_styles(user: CurrentUser) -> list[dict[str, str]]:
        return []

    @router.get("/face-restorers")
    def face_restorers(user: CurrentUser) -> list[dict[str, Any]]:
        return []

    @router.get("/realesrgan-models")
    def realesrgan_models(user: CurrentUser) -> list[dict[str, Any]]:
        return []

    return router
