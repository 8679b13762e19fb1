"""From an A1111-shaped request to what a backend runs: the engine request and the model files.

Every entry point (UI, /sdapi/v1, /api/v1) hands ``JobService.submit`` the same A1111 JSON, so this
is the one place that reads it: nulls and unknown keys are ignored, ``override_settings`` picks the
checkpoint, VAE and clip skip, legacy ``sampler_index`` is honoured, ``mask`` turns img2img into
inpaint, and every model (checkpoint, VAE, refiner, the LoRAs, hypernetworks and embeddings the
prompts name) is resolved through the registry *as the submitting user*, so nobody runs a model they
cannot see, and each must be one they may use (``model:use``, ``webapp.services.access``: their own, shared
with them, or any with ``model:all``); a model they may not use is refused naming it. Validation uses the engine's own rules (pipelines.types) without importing torch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from deploy.backends.messages import VAE_AUTOMATIC, VAE_NONE, JobModels, ModelSpec
from deploy.model_files import ModelFileRef
from pipelines.controlnet.units import FIELD_PREFIX, ControlUnit, parse_indexed_units
from pipelines.prompts import parse_extra_networks, referenced_words
from pipelines.types import GenerationRequest, InvalidRequestError, RequestLimits
from webapp.records import JobMode, ModelRecord, ModelType, User
from webapp.services.access import can
from webapp.services.errors import InvalidInput, NotFound, PermissionDenied
from webapp.services.text import check_text

log = logging.getLogger(__name__)

_FIELDS = {f.name: f for f in dataclasses.fields(GenerationRequest)}
_INT_FIELDS = {name for name, f in _FIELDS.items() if str(f.type).replace(" ", "") in ("int", "int|None")}
_SAMPLER_FIELDS = ("sampler_name", "hr_sampler_name")
_IMG_ONLY = ("init_images", "mask", "resize_mode", "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill",
             "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert")
_TXT_ONLY = ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
             "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt")
_KIND = {ModelType.CHECKPOINT: "checkpoint", ModelType.VAE: "vae", ModelType.LORA: "lora",
         ModelType.EMBEDDING: "embedding", ModelType.HYPERNETWORK: "hypernetwork", ModelType.CONTROLNET: "controlnet"}


class Registry(Protocol):
    """What the jobs service needs from the models engineer's ``ModelRegistry``."""

    def find(self, *, actor: User, type: ModelType, ref: str) -> ModelRecord | None: ...  # noqa: A002

    def list_models(self, *, actor: User, type: ModelType | None = None, **kwargs: Any) -> list[ModelRecord]: ...  # noqa: A002

    def file_ref(self, record: ModelRecord) -> ModelFileRef: ...


DefaultCheckpoint = Callable[[User], str | None]


@dataclass(frozen=True)
class PreparedJob:
    mode: JobMode
    request: GenerationRequest
    models: JobModels
    checkpoint: ModelRecord
    controlnet_units: tuple[ControlUnit, ...] = ()
    """The enabled units, in the order of ``models.controlnets``."""
    warnings: tuple[str, ...] = ()

    @property
    def units_by_arg(self) -> dict[int, ControlUnit]:
        """The units by their index in ``alwayson_scripts.controlnet.args`` (where their images were read)."""
        return {unit.arg_index: unit for unit in self.controlnet_units if unit.arg_index is not None}


def _settings(request: Mapping[str, Any]) -> Mapping[str, Any]:
    value = request.get("override_settings")
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput(f"`override_settings` must be an object of option names and values but is "
                           f"{type(value).__name__}", field="override_settings")
    return value


def derive_mode(mode: str, request: Mapping[str, Any]) -> JobMode:
    """``txt2img`` / ``img2img`` / ``inpaint``; an img2img request with a mask is an inpaint job."""
    try:
        parsed = JobMode(str(mode))
    except ValueError:
        raise InvalidInput(f"`mode` must be one of {', '.join(m.value for m in JobMode)} but is {mode!r}",
                           field="mode") from None
    if parsed is JobMode.IMG2IMG and request.get("mask") not in (None, ""):
        return JobMode.INPAINT
    return parsed


def _coerce(name: str, value: Any) -> Any:
    """JSON and UI widgets give 20.0 for 20; accept integral floats where the engine wants ints."""
    if name in _INT_FIELDS and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def engine_request(mode: JobMode, request: Mapping[str, Any], limits: RequestLimits | None = None) -> GenerationRequest:
    """The validated engine request for an A1111-shaped dict (pure: no models, no database).

    ``limits`` are the server's request limits, checked when a job is submitted (not again when it runs).
    """
    if not isinstance(request, Mapping):
        raise InvalidInput("the request must be a JSON object", field="request")
    check_text(request)
    values: dict[str, Any] = {}
    for key, value in request.items():
        if key in _FIELDS and key != "mode" and value is not None:
            values[key] = _coerce(key, value)
    if "sampler_name" not in values and request.get("sampler_index"):
        values["sampler_name"] = request["sampler_index"]
    clip_skip = _settings(request).get("CLIP_stop_at_last_layers")
    if clip_skip is not None:
        values["clip_skip"] = _coerce("clip_skip", clip_skip)
    drop = _TXT_ONLY if mode is not JobMode.TXT2IMG else _IMG_ONLY
    for key in drop:
        values.pop(key, None)
    if values.get("mask") == "":
        values.pop("mask")
    if mode is JobMode.IMG2IMG:
        values.pop("mask", None)
    if not request.get("refiner_checkpoint"):
        values.pop("refiner_switch_at", None)
    try:
        built = GenerationRequest.from_dict({**values, "mode": mode.value})
        built.validate(limits)
    except InvalidRequestError as exc:
        if exc.field in _SAMPLER_FIELDS and "not found" in str(exc):
            raise NotFound(str(exc), field=exc.field) from None
        raise InvalidInput(str(exc), field=exc.field) from None
    except TypeError as exc:  # a wrongly typed value the dataclass itself refused
        raise InvalidInput(f"invalid request: {exc}", field="request") from None
    return built


class RequestResolver:
    """Resolves a request's models for one user through the registry."""

    def __init__(self, registry: Registry, default_checkpoint: DefaultCheckpoint | None = None,
                 limits: RequestLimits | None = None) -> None:
        self.registry = registry
        self.default_checkpoint = default_checkpoint
        self.limits = limits if limits is not None else RequestLimits()

    def prepare(self, *, actor: User, mode: str, request: Mapping[str, Any]) -> PreparedJob:
        job_mode = derive_mode(mode, request)
        built = engine_request(job_mode, request, self.limits)
        checkpoint = self._checkpoint(actor, request)
        vae = self._vae(actor, request)
        units, warnings = self._units(request)
        controlnets = tuple(self._controlnet(actor, index, unit, checkpoint) for index, unit in units)
        models = JobModels(
            checkpoint=self._spec(actor, checkpoint, "sd_model_checkpoint"),
            vae=vae,
            companion_vae=self._companion_vae(actor, checkpoint, vae),
            refiner=self._refiner(actor, request),
            loras=self._tagged(actor, ModelType.LORA, built, "loras"),
            hypernetworks=self._tagged(actor, ModelType.HYPERNETWORK, built, "hypernets"),
            embeddings=self._embeddings(actor, built),
            controlnets=controlnets,
        )
        return PreparedJob(mode=job_mode, request=built, models=models, checkpoint=checkpoint,
                           controlnet_units=tuple(unit for _, unit in units), warnings=tuple(warnings))

    # -- models --------------------------------------------------------------------------------------
    def _spec(self, actor: User, record: ModelRecord, field: str) -> ModelSpec:
        """The job's spec of a model ``actor`` found; refused (``field``) unless they may use it."""
        if not can(actor, "model:use", record):
            lacks = "model:use" not in actor.permissions
            raise PermissionDenied(
                f"{actor.username!r} lacks the permission model:use, needed for {record.type} {record.name!r}" if lacks
                else f"{actor.username!r} may not use {record.type} {record.name!r} (model:use)", field=field)
        if not record.sha256:
            raise InvalidInput(f"model {record.name!r} has no hash yet: its file is still being registered (hashed); "
                               "try again when it is listed with a hash", field="model")
        return ModelSpec(kind=_KIND[ModelType(record.type)], name=record.name, sha256=record.sha256,
                         file=self.registry.file_ref(record), lora_hash=record.lora_hash)

    def _find(self, actor: User, model_type: ModelType, ref: str) -> ModelRecord | None:
        # Active, or still registering (no hash yet): `_spec` refuses the latter with the reason
        return self.registry.find(actor=actor, type=model_type, ref=ref)

    def _checkpoint(self, actor: User, request: Mapping[str, Any]) -> ModelRecord:
        ref = _settings(request).get("sd_model_checkpoint") or request.get("sd_model_checkpoint") \
            or request.get("checkpoint")
        field = "sd_model_checkpoint"
        if not ref and self.default_checkpoint is not None:
            ref = self.default_checkpoint(actor)
        if ref:
            record = self._find(actor, ModelType.CHECKPOINT, str(ref))
            if record is None:
                raise NotFound(f"checkpoint {ref!r} not found; choose one of: {self._names(actor)}", field=field)
            return record
        available = self.registry.list_models(actor=actor, type=ModelType.CHECKPOINT)
        if not available:
            raise InvalidInput("no checkpoint is registered yet: add one in the Models tab", field=field)
        return sorted(available, key=lambda r: r.name.lower())[0]

    def _names(self, actor: User) -> str:
        names = sorted(r.title for r in self.registry.list_models(actor=actor, type=ModelType.CHECKPOINT))
        return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "(none registered)"

    def _vae(self, actor: User, request: Mapping[str, Any]) -> ModelSpec | str:
        ref = _settings(request).get("sd_vae") or request.get("sd_vae") or VAE_AUTOMATIC
        if ref in (VAE_AUTOMATIC, VAE_NONE):
            return str(ref)
        record = self._find(actor, ModelType.VAE, str(ref))
        if record is None:
            raise NotFound(f"VAE {ref!r} not found (use 'Automatic', 'None' or a registered VAE)", field="sd_vae")
        return self._spec(actor, record, "sd_vae")

    def _companion_vae(self, actor: User, checkpoint: ModelRecord, vae: ModelSpec | str) -> ModelSpec | None:
        """A1111's "Automatic": a VAE named like the checkpoint (``model.vae.pt`` beside ``model.safetensors``).
        One listing, matched here: this runs for every job."""
        if vae != VAE_AUTOMATIC:
            return None
        by_name = {r.name.lower(): r for r in self.registry.list_models(actor=actor, type=ModelType.VAE)
                   if can(actor, "model:use", r)}  # chosen by the server, not named: one they may not use is skipped
        for name in (f"{checkpoint.name}.vae", checkpoint.name):
            record = by_name.get(name.lower())
            if record is not None:
                return self._spec(actor, record, "sd_vae")
        return None

    def _refiner(self, actor: User, request: Mapping[str, Any]) -> ModelSpec | None:
        ref = request.get("refiner_checkpoint")
        if not ref or ref == "None":
            return None
        record = self._find(actor, ModelType.CHECKPOINT, str(ref))
        if record is None:
            raise NotFound(f"refiner checkpoint {ref!r} not found", field="refiner_checkpoint")
        return self._spec(actor, record, "refiner_checkpoint")

    def _tagged(self, actor: User, model_type: ModelType, request: GenerationRequest, attr: str) -> dict[str, ModelSpec]:
        """Networks named by ``<lora:...>`` / ``<hypernet:...>`` tags; unknown names are left to the engine,
        which reports them as A1111 does ("Networks not found: ...")."""
        found: dict[str, ModelSpec] = {}
        for text in (request.prompt, request.hr_prompt):
            try:
                _, nets = parse_extra_networks(text)
            except InvalidRequestError as exc:
                raise InvalidInput(str(exc), field=exc.field) from None
            for call in getattr(nets, attr):
                if call.name in found:
                    continue
                record = self._find(actor, model_type, call.name)
                if record is not None:
                    found[call.name] = self._spec(actor, record, "prompt")
        return found

    def _embeddings(self, actor: User, request: GenerationRequest) -> dict[str, ModelSpec]:
        """Embeddings whose names occur as words in any prompt (A1111 has no tag for them)."""
        text = " ".join((request.prompt, request.negative_prompt, request.hr_prompt, request.hr_negative_prompt))
        if not text.strip():
            return {}
        records = {r.name: r for r in self.registry.list_models(actor=actor, type=ModelType.EMBEDDING)}
        return {name: self._spec(actor, records[name], "prompt") for name in referenced_words(text, list(records))}

    # -- ControlNet ----------------------------------------------------------------------------------
    def _units(self, request: Mapping[str, Any]) -> tuple[list[tuple[int, ControlUnit]], list[str]]:
        """The enabled ControlNet units with their ``args`` index (messages name the unit by it)."""
        scripts = request.get("alwayson_scripts") or {}
        if not isinstance(scripts, Mapping):
            raise InvalidInput("`alwayson_scripts` must be an object of script titles", field="alwayson_scripts")
        try:
            return parse_indexed_units(scripts, self.limits.max_job_pixels)
        except InvalidRequestError as exc:
            raise InvalidInput(str(exc), field=exc.field) from None

    def _controlnet(self, actor: User, index: int, unit: ControlUnit, checkpoint: ModelRecord) -> ModelSpec:
        """The unit's model as ``actor`` sees it, refused when its base differs from the checkpoint's."""
        field = f"{FIELD_PREFIX}[{index}].model"
        listed = self.registry.list_models(actor=actor, type=ModelType.CONTROLNET)
        names = ", ".join(sorted(controlnet_title(r) for r in listed)) or "(none registered)"
        if not unit.has_model:
            raise InvalidInput(f"ControlNet unit {index} is enabled but names no model; choose one of: {names}",
                               field=field)
        record = self._find(actor, ModelType.CONTROLNET, unit.model)
        if record is None:  # the extension's names are matched case-insensitively
            wanted = unit.model.lower()
            record = next((r for r in listed if wanted in (r.name.lower(), controlnet_title(r).lower())), None)
        if record is None:
            raise InvalidInput(f"ControlNet model {unit.model!r} not found; choose one of: {names}", field=field)
        unit_base, checkpoint_base = base_family(record.base), base_family(checkpoint.base)
        if unit_base and checkpoint_base and unit_base != checkpoint_base:
            raise InvalidInput(f"ControlNet unit {index} ({record.name}) is {unit_base} but the checkpoint is "
                               f"{checkpoint_base}", field=field)
        return self._spec(actor, record, field)


def base_family(base: str | None) -> str | None:
    """sd1-inpaint and sd1 take the same ControlNets; so do sdxl and sdxl-inpaint."""
    if not base:
        return None
    return base.lower().replace("_inpaint", "").replace("-inpaint", "")


def controlnet_title(record: ModelRecord) -> str:
    """The extension's model name: ``basename [first 8 hex of sha256]``."""
    return f"{record.name} [{record.sha256[:8]}]" if record.sha256 else record.name
