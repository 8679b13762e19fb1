"""``POST /sdapi/v1/txt2img`` and ``/img2img``: A1111 requests through the studio's queue.

The request is checked and normalised here (A1111 types and defaults, the user's options, features
the studio does not have named in warnings), then goes through ``JobService.submit`` like every UI
job — same queue, same backends, same per-user limits — and the HTTP request waits for the job as
A1111's does. The wait awaits the job board's events and holds no thread, so one client's many waiting
requests cannot delay another's.

Decisions where A1111 versions differ or the studio has no equivalent:

* an unknown sampler answers 404 naming ``sampler_name`` (A1111 before v1.10; v1.10 silently runs
  its default sampler, which hides typos), an unknown checkpoint in ``override_settings`` 404 too;
* warnings (unsupported fields that were set, ``override_settings`` keys with no effect, missing
  prompt styles) are returned in ``info`` as ``warnings`` and logged; the job's own warnings
  (e.g. networks not found) are added to them;
* every job is kept in the user's history whatever ``save_images``/``do_not_save_*`` say (a warning
  says so when ``do_not_save_samples`` is set), and no grid image is inserted (``index_of_first_image``
  is always 0);
* an interrupted job answers 200 with the images of the batches finished before the interrupt (A1111
  also decodes the half-denoised current batch; the studio drops it) and a warning;
* ``/skip`` drops the current batch and the job goes on with its next one (``n_iter``).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from datetime import datetime
from typing import Any

import anyio
from fastapi import APIRouter

from pipelines import infotext
from webapp.api.deps import CurrentUser
from webapp.api.sdapi.context import SdapiContext
from webapp.api.sdapi.errors import A1111Error, A1111Route
from webapp.api.sdapi.schemas import GenerationBody, Img2ImgBody, Txt2ImgBody
from webapp.records import Job, JobStatus, User
from webapp.services.a1111_options import HONOURED
from webapp.services.errors import InvalidInput
from webapp.services.options import GenerationDefaults

log = logging.getLogger(__name__)

_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")
_FIELD_IN_MESSAGE = re.compile(r"`(\w+)`")
# alwayson_scripts titles the studio knows; their units are parsed in the shared request path (jobs/requests.py).
_KNOWN_SCRIPTS = {"controlnet"}
# Fields A1111 has and the studio does not act on, with the value that means "not used".
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "restore_faces": (None, False), "tiling": (None, False), "script_name": (None, ""),
    "s_min_uncond": (None, 0, 0.0), "s_churn": (None, 0, 0.0), "s_tmax": (None, 0, 0.0), "s_tmin": (None, 0, 0.0),
    "s_noise": (None, 1, 1.0), "firstpass_image": (None, ""), "firstphase_width": (0,), "firstphase_height": (0,),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"), "initial_noise_multiplier": (None, 1, 1.0),
    "latent_mask": (None, ""), "mask_round": (True,),
    "image_cfg_scale": (None, 1.5),  # instruct-pix2pix models only
}


def _warn_unsupported(body: GenerationBody, warnings: list[str]) -> None:
    for name, neutral in _UNSUPPORTED.items():
        if name in type(body).model_fields and getattr(body, name) not in neutral:
            warnings.append(f"`{name}` is not supported by this server and was ignored")
    if body.styles:
        warnings.append(f"prompt styles {', '.join(map(repr, body.styles))} do not exist here and were ignored")
    if body.override_settings and not body.override_settings_restore_afterwards:
        warnings.append("`override_settings_restore_afterwards: false` was ignored: override_settings apply to this "
                        "job only (set defaults with POST /sdapi/v1/options)")
    if body.do_not_save_samples:
        warnings.append("`do_not_save_samples` was ignored: every job's images are kept in your history "
                        "(delete them there or with DELETE /api/v1/jobs/{id})")


def _check_alwayson(scripts: dict[str, Any]) -> None:
    """Unknown titles are refused as A1111 does (422); each value must have A1111's shape ``{"args": [...]}``.
    The units themselves are validated with the rest of the request, as for the UI and /api/v1."""
    for title, value in scripts.items():
        key = title.strip().lower()
        if key not in _KNOWN_SCRIPTS:
            raise A1111Error(422, "HTTPException", f"always on script {title} not found", field="alwayson_scripts")
        args = value.get("args", []) if isinstance(value, dict) else None
        if not isinstance(args, list):
            raise A1111Error(422, "HTTPException", f'always on script {title} must be {{"args": [...]}}',
                             field="alwayson_scripts")


def _apply_infotext(body: GenerationBody, request: dict[str, Any]) -> None:
    """A1111 v1.8+: ``infotext`` fills the fields the request did not set; Clip skip goes to settings."""
    raw = infotext.parse(body.infotext or "")
    parsed = infotext.request_fields(raw)
    clip_skip = parsed.pop("clip_skip", None)
    for key, value in parsed.items():
        if key in request and key not in body.model_fields_set:
            request[key] = value
    refiner = infotext.refiner_refs(raw)
    if refiner and "refiner_checkpoint" not in body.model_fields_set and "refiner_switch_at" in parsed:
        request["refiner_checkpoint"] = refiner[0]  # "Refiner: name [hash]": the hash names it exactly
    if clip_skip is not None and "CLIP_stop_at_last_layers" not in body.override_settings:
        request["override_settings"]["CLIP_stop_at_last_layers"] = clip_skip


def _override_settings(body: GenerationBody, defaults: GenerationDefaults, warnings: list[str]) -> dict[str, Any]:
    """The request's overrides over the caller's options (checkpoint, VAE, clip skip)."""
    settings = dict(body.override_settings)
    ignored = sorted(k for k in settings if k not in HONOURED)
    if ignored:
        warnings.append(f"override_settings {', '.join(ignored)} have no effect on this server")
    if not settings.get("sd_model_checkpoint") and defaults.checkpoint is not None and defaults.checkpoint.sha256:
        settings["sd_model_checkpoint"] = defaults.checkpoint.sha256  # resolved once, kept with the job
    if "sd_vae" not in settings and defaults.vae != "Automatic":
        settings["sd_vae"] = defaults.vae if isinstance(defaults.vae, str) else defaults.vae.sha256
    settings.setdefault("CLIP_stop_at_last_layers", defaults.clip_skip)
    return settings


def build_job_request(body: GenerationBody, defaults: GenerationDefaults) -> tuple[dict[str, Any], list[str]]:
    """The A1111-shaped dict handed to ``JobService.submit``, and the warnings to report."""
    warnings: list[str] = []
    _check_alwayson(body.alwayson_scripts)
    _warn_unsupported(body, warnings)
    request = body.model_dump()
    request["override_settings"] = _override_settings(body, defaults, warnings)
    if body.infotext:
        _apply_infotext(body, request)
    if body.disable_extra_networks:
        for key in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
            if isinstance(request.get(key), str):
                request[key] = _EXTRA_NETWORK_RE.sub("", request[key])
    for key in ("script_args", "comments", "infotext", "force_task_id", "send_images",
                "save_images", "do_not_save_samples", "do_not_save_grid"):
        request.pop(key, None)
    return request, warnings


def encode_for_client(png: bytes, defaults: GenerationDefaults, settings: dict[str, Any]) -> str:
    """Bare base64 in the caller's ``samples_format``; PNGs pass through untouched when nothing changes."""
    fmt = str(settings.get("samples_format") or defaults.samples_format).lower()
    pnginfo = bool(settings.get("enable_pnginfo", defaults.enable_pnginfo))
    if fmt == "png" and pnginfo:
        return base64.b64encode(png).decode("ascii")
    from PIL import Image

    text = infotext.read_infotext(png) if pnginfo else None
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        quality = int(settings.get("jpeg_quality", defaults.jpeg_quality))
        data = infotext.encode_image(image, text, fmt if fmt in ("png", "webp") else "jpeg", quality=quality)
    return base64.b64encode(data).decode("ascii")


def _info(job: Job, body: GenerationBody, warnings: list[str]) -> dict[str, Any]:
    info: dict[str, Any] = dict(job.info or {})
    stamp = (job.started_at or job.created_at or datetime.now()).strftime("%Y%m%d%H%M%S")
    info.setdefault("prompt", body.prompt)
    info.setdefault("negative_prompt", body.negative_prompt)
    info.setdefault("all_seeds", [])
    info.setdefault("infotexts", job.infotexts)
    info.update({
        "subseed_strength": body.subseed_strength, "restore_faces": bool(body.restore_faces),
        "face_restoration_model": None, "seed_resize_from_w": body.seed_resize_from_w,
        "seed_resize_from_h": body.seed_resize_from_h, "denoising_strength": body.denoising_strength,
        "extra_generation_params": {}, "styles": body.styles, "job_timestamp": stamp,
        "batch_size": body.batch_size, "index_of_first_image": 0,
        "is_using_inpainting_conditioning": bool(job.mode == "inpaint"),
        "job_id": job.id, "task_id": job.task_id, "warnings": [*warnings, *job.warnings],
    })
    return info


def _failure(job: Job) -> A1111Error:
    message = job.error or f"the job ended {job.status}"
    if job.error_kind == "bad_request":
        match = _FIELD_IN_MESSAGE.search(message)
        return A1111Error(422, "InvalidRequestError", message, field=match.group(1) if match else None)
    if job.error_kind == "oom":
        return A1111Error(500, "OutOfMemoryError", message)
    return A1111Error(500, "RuntimeError", message)


def _submit(ctx: SdapiContext, user: User, mode: str, body: GenerationBody
            ) -> tuple[Job, GenerationDefaults, dict[str, Any], list[str]]:
    if isinstance(body, Img2ImgBody) and not body.init_images:
        raise A1111Error(404, "HTTPException", "Init image not found", field="init_images")
    # An infotext holds a prompt, a negative prompt and the parameters: three prompts' worth at most.
    if body.infotext and len(body.infotext) > 3 * ctx.settings.max_prompt_chars:
        raise InvalidInput(f"`infotext` is {len(body.infotext):,} characters long; at most "
                           f"{3 * ctx.settings.max_prompt_chars:,} are allowed", field="infotext")
    defaults = ctx.options.generation_defaults(actor=user)
    request, warnings = build_job_request(body, defaults)
    job = ctx.jobs.submit(actor=user, mode=mode, request=request, task_id=body.force_task_id)
    if warnings:
        log.info("job %s of %s: %s", job.id, user.username, "; ".join(warnings))
    return job, defaults, request, warnings


def _answer(ctx: SdapiContext, user: User, job: Job, body: GenerationBody, defaults: GenerationDefaults,
            request: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    if job.status == JobStatus.FAILED:
        raise _failure(job)
    if job.status == JobStatus.CANCELLED:
        warnings.append(f"the job was interrupted; {len(job.image_keys)} finished image(s) were kept")
    images: list[str] = []
    if body.send_images and job.status in (JobStatus.SUCCEEDED, JobStatus.CANCELLED):
        images = [encode_for_client(png, defaults, request["override_settings"])
                  for png in ctx.jobs.images(actor=user, job_id=job.id)]
    parameters = body.model_dump()
    if isinstance(body, Img2ImgBody) and not body.include_init_images:
        parameters["init_images"] = None
        parameters["mask"] = None
    return {"images": images, "parameters": parameters, "info": json.dumps(_info(job, body, warnings))}


async def run_generation(ctx: SdapiContext, user: User, mode: str, body: GenerationBody) -> dict[str, Any]:
    """Submit, wait, answer. Submitting and answering (database, image encoding) run on worker threads;
    the wait between them awaits the job board and holds no thread, however many requests wait."""
    job, defaults, request, warnings = await anyio.to_thread.run_sync(_submit, ctx, user, mode, body)
    job = await ctx.jobs.wait_async(actor=user, job_id=job.id)
    return await anyio.to_thread.run_sync(_answer, ctx, user, job, body, defaults, request, warnings)


def build_router(ctx: SdapiContext) -> APIRouter:
    router = APIRouter(route_class=A1111Route)

    @router.post("/txt2img")
    async def txt2img(user: CurrentUser, body: Txt2ImgBody) -> dict[str, Any]:
        """A1111 txt2img: queued like every job, answered when it is done (``info`` is a JSON string)."""
        return await run_generation(ctx, user, "txt2img", body)

    @router.post("/img2img")
    async def img2img(user: CurrentUser, body: Img2ImgBody) -> dict[str, Any]:
        """A1111 img2img; with a ``mask`` it is an inpaint job. Images as bare base64 or data URIs."""
        return await run_generation(ctx, user, "img2img", body)

    return router
