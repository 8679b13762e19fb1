"""Typed, serialisable contract of the generation engine: requests, resolved models, results, events.

Requests and results travel to remote workers as JSON messages, so every type here is a frozen dataclass
of plain values with ``to_dict``/``from_dict`` (images as base64 PNG/JPEG bytes). Nothing in here imports
torch or diffusers: the web/API layer builds and validates requests without loading the model stack.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipelines.errors import PipelineError

logger = logging.getLogger(__name__)

MODEL_KINDS = ("checkpoint", "lora", "embedding", "hypernetwork", "vae", "controlnet")
MODES = ("txt2img", "img2img", "inpaint")
MODEL_EXTENSIONS = ("safetensors", "ckpt", "pt", "pth", "bin", "sft")
VAE_AUTOMATIC = "Automatic"
VAE_NONE = "None"
MAX_SEED = 2**63 - 1
RANDOM_SEED_RANGE = 4294967294  # A1111 draws random seeds from [0, 4294967294)

LATENT_UPSCALERS = (
    "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
    "Latent (nearest)", "Latent (nearest-exact)",
)
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")
HR_UPSCALERS = LATENT_UPSCALERS + IMAGE_UPSCALERS


class InvalidRequestError(PipelineError):
    """A request field holds a value the engine cannot run; ``field`` names it for 4xx answers."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


class OutOfMemoryError(PipelineError):
    """The accelerator ran out of memory; memory was freed and the job can be retried smaller."""


class Cancelled(Exception):  # noqa: N818 - the A1111 vocabulary: a job is "interrupted"/cancelled, not an error
    """The caller's ``should_cancel()`` returned True; the job stopped within one sampling step.

    ``partial`` is set by the engine when whole batches finished before the cancel (A1111's interrupt keeps
    what was done): a ``GenerationResult`` of those images, else None.
    """

    partial: GenerationResult | None = None


class BatchSkipped(Exception):  # noqa: N818 - a signal, not an error
    """The caller's ``should_skip()`` returned True (A1111 /skip): the current batch is dropped, the job
    goes on with its next batch (``n_iter``)."""


def encode_image_b64(data: bytes) -> str:
    """Bare base64 of encoded image bytes (how images travel in JSON)."""
    return base64.b64encode(data).decode("ascii")


def data_uri_header(text: str) -> str:
    """The ``data:image/...;base64,`` header of an A1111-style data URI, or "" for bare base64."""
    if text.startswith("data:image/") and "," in text:
        return text[:text.index(",") + 1]
    return ""


def decode_image_bytes(value: str | bytes, field_name: str) -> bytes:
    """Accept raw bytes, bare base64 or an A1111-style data URI and return the encoded image bytes."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise InvalidRequestError(field_name, f"`{field_name}` must be base64 image data but is {type(value).__name__}")
    text = value[len(data_uri_header(value)):]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(field_name, f"`{field_name}` is not valid base64 image data") from exc


ImageEncoder = Callable[[bytes], str]
"""Encoded image bytes -> the JSON string that stands for them (base64 on the wire, a store reference at rest)."""
ImageDecoder = Callable[[Any, str], bytes]
"""(JSON value, field name) -> encoded image bytes; raises ``InvalidRequestError`` naming the field."""


@dataclass(frozen=True)
class ModelRef:
    """A model file the caller resolved (by name, from its catalogue) together with its hashes.

    ``lora_hash`` is the A1111 "addnet" hash of a LoRA (sha256 of the safetensors tensor data, or
    ``sshs_model_hash``); A1111 writes it, not the file hash, into ``Lora hashes``.
    """

    name: str
    path: Path
    sha256: str
    kind: str
    lora_hash: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.kind not in MODEL_KINDS:
            raise InvalidRequestError("kind", f"`kind` must be one of {', '.join(MODEL_KINDS)} but is {self.kind!r}")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256 or ""):
            raise InvalidRequestError("sha256", f"`sha256` of {self.name!r} must be 64 hex digits but is {self.sha256!r}")
        object.__setattr__(self, "sha256", self.sha256.lower())
        if self.lora_hash is not None:
            if not re.fullmatch(r"[0-9a-fA-F]{12,64}", self.lora_hash):
                raise InvalidRequestError("lora_hash", f"`lora_hash` of {self.name!r} must be hex but is {self.lora_hash!r}")
            object.__setattr__(self, "lora_hash", self.lora_hash.lower())

    @property
    def short_hash(self) -> str:
        """AutoV2 (10 hex) for checkpoints/VAEs/hypernetworks/ControlNets, 12 hex for LoRA and TI (a1111 §8)."""
        if self.kind == "lora":
            return (self.lora_hash or self.sha256)[:12]
        if self.kind == "embedding":
            return self.sha256[:12]
        return self.sha256[:10]

    @property
    def stem(self) -> str:
        """The name A1111 writes as ``Model``/``VAE``: the file name without folders and extension."""
        base = self.name.replace("\\", "/").rsplit("/", 1)[-1]
        stem, dot, ext = base.rpartition(".")
        return stem if dot and ext.lower() in MODEL_EXTENSIONS else base

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "kind": self.kind,
                "lora_hash": self.lora_hash}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRef:
        return cls(name=data["name"], path=Path(data["path"]), sha256=data["sha256"], kind=data["kind"],
                   lora_hash=data.get("lora_hash"))


VaeChoice = ModelRef | Literal["Automatic", "None"]


@dataclass(frozen=True)
class ResolvedModels:
    """Every model file a job may use, already resolved to paths by the caller.

    ``loras``/``embeddings``/``hypernetworks`` hold everything the caller has available, keyed by the name
    users write in prompts; the engine applies only what the prompt references. ``vae`` is ``"Automatic"``
    (``companion_vae`` if the caller found one for the checkpoint, else the checkpoint's own), ``"None"``
    (always the checkpoint's own) or a VAE ``ModelRef``.
    """

    checkpoint: ModelRef
    vae: VaeChoice = VAE_AUTOMATIC
    companion_vae: ModelRef | None = None
    loras: Mapping[str, ModelRef] = field(default_factory=dict)
    embeddings: Mapping[str, ModelRef] = field(default_factory=dict)
    hypernetworks: Mapping[str, ModelRef] = field(default_factory=dict)
    refiner: ModelRef | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vae, str) and self.vae not in (VAE_AUTOMATIC, VAE_NONE):
            raise InvalidRequestError("vae", f"`vae` must be 'Automatic', 'None' or a VAE model but is {self.vae!r}")

    def selected_vae(self) -> ModelRef | None:
        """The external VAE file this job decodes with, or None for the checkpoint's own VAE."""
        if isinstance(self.vae, ModelRef):
            return self.vae
        return self.companion_vae if self.vae == VAE_AUTOMATIC else None

    def to_dict(self) -> dict[str, Any]:
        def refs(m: Mapping[str, ModelRef]) -> dict[str, Any]:
            return {k: v.to_dict() for k, v in m.items()}

        return {
            "checkpoint": self.checkpoint.to_dict(),
            "vae": self.vae.to_dict() if isinstance(self.vae, ModelRef) else self.vae,
            "companion_vae": self.companion_vae.to_dict() if self.companion_vae else None,
            "loras": refs(self.loras), "embeddings": refs(self.embeddings),
            "hypernetworks": refs(self.hypernetworks),
            "refiner": self.refiner.to_dict() if self.refiner else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResolvedModels:
        def refs(m: Mapping[str, Any] | None) -> dict[str, ModelRef]:
            return {k: ModelRef.from_dict(v) for k, v in (m or {}).items()}

        vae = data.get("vae", VAE_AUTOMATIC)
        return cls(
            checkpoint=ModelRef.from_dict(data["checkpoint"]),
            vae=ModelRef.from_dict(vae) if isinstance(vae, Mapping) else vae,
            companion_vae=ModelRef.from_dict(data["companion_vae"]) if data.get("companion_vae") else None,
            loras=refs(data.get("loras")), embeddings=refs(data.get("embeddings")),
            hypernetworks=refs(data.get("hypernetworks")),
            refiner=ModelRef.from_dict(data["refiner"]) if data.get("refiner") else None,
        )


@dataclass(frozen=True)
class RequestLimits:
    """How much one request may ask for, so no single job can occupy a worker (or fill the disk) for hours.

    The defaults fit real SDXL use: a batch of 8 at 2048x2048 (or 1024x1024 with a 2x hires fix), 100
    images per job (A1111's largest batch count), prompts far longer than anyone writes by hand.
    """

    max_prompt_chars: int = 10_000
    """Characters in each of prompt, negative_prompt, hr_prompt, hr_negative_prompt."""
    max_job_pixels: int = 2048 * 2048 * 8
    """width x height x batch_size of one pass (the hires-fix target counts too); each input image alone."""
    max_job_images: int = 100
    """n_iter x batch_size."""


_IMAGE_FIELDS = ("init_images", "mask")


@dataclass(frozen=True)
class GenerationRequest:
    """One txt2img / img2img / inpaint job with A1111 field names, defaults and meanings (a1111-api.md §3).

    Images are encoded image bytes (PNG/JPEG/WebP). ``validate()`` checks everything that can be checked
    without the model; it raises ``InvalidRequestError`` naming the field and the bad value.
    """

    mode: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = -1
    seed_resize_from_h: int = -1
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    clip_skip: int = 1
    eta: float | None = None
    denoising_strength: float = 0.75
    # img2img / inpaint
    init_images: tuple[bytes, ...] = ()
    resize_mode: int = 0
    mask: bytes | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    # hires fix (txt2img)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    # SDXL refiner (the refiner model itself comes in ResolvedModels.refiner)
    refiner_switch_at: float | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable-friendly and immutable.
        if not isinstance(self.init_images, tuple):
            object.__setattr__(self, "init_images", tuple(self.init_images))
        if self.mask_blur is not None:
            object.__setattr__(self, "mask_blur_x", self.mask_blur)
            object.__setattr__(self, "mask_blur_y", self.mask_blur)

    # -- derived values -------------------------------------------------------------------------
    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def effective_hr_upscaler(self) -> str:
        return self.hr_upscaler or "Latent"

    def hr_target_size(self) -> tuple[int, int]:
        """Second-pass size as A1111 computes it (hr_resize_x/y override hr_scale; one 0 keeps aspect), floored to /8."""
        if self.hr_resize_x == 0 and self.hr_resize_y == 0:
            w, h = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        elif self.hr_resize_y == 0:
            w, h = self.hr_resize_x, self.hr_resize_x * self.height // self.width
        elif self.hr_resize_x == 0:
            w, h = self.hr_resize_y * self.width // self.height, self.hr_resize_y
        else:
            w, h = self.hr_resize_x, self.hr_resize_y
        return w // 8 * 8, h // 8 * 8

    # -- validation -----------------------------------------------------------------------------
    def validate(self, limits: RequestLimits | None = None) -> None:
        """Raise ``InvalidRequestError`` for the first invalid field (model-independent checks only).

        ``limits`` are the server's request limits (checked where a job is submitted); without them only
        the engine's own ranges apply, so a job accepted under an administrator's higher limits still runs.
        """
        from pipelines import samplers  # local: samplers imports nothing heavy, but keeps types.py a leaf

        if self.mode not in MODES:
            _fail("mode", f"`mode` must be one of {', '.join(MODES)} but is {self.mode!r}")
        for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
            text = getattr(self, name)
            if not isinstance(text, str):
                _fail(name, f"`{name}` must be a string but is {type(text).__name__}")
            if limits is not None and len(text) > limits.max_prompt_chars:
                _fail(name, f"`{name}` is {len(text):,} characters long; at most {limits.max_prompt_chars:,} are "
                            f"allowed")
        for name in ("width", "height"):
            _check_int(name, getattr(self, name), 64, 8192)
            if getattr(self, name) % 8:
                _fail(name, f"`{name}` must be a multiple of 8 but is {getattr(self, name)}")
        _check_int("steps", self.steps, 1, 150)
        _check_int("batch_size", self.batch_size, 1, 64)
        _check_int("n_iter", self.n_iter, 1, 100)
        _check_int("clip_skip", self.clip_skip, 1, 12)
        _check_float("cfg_scale", self.cfg_scale, 0.0, 100.0)
        _check_float("denoising_strength", self.denoising_strength, 0.0, 1.0)
        _check_float("subseed_strength", self.subseed_strength, 0.0, 1.0)
        if self.eta is not None:
            _check_float("eta", self.eta, 0.0, 1.0)
        for name in ("seed", "subseed"):
            _check_int(name, getattr(self, name), -1, MAX_SEED)
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            value = getattr(self, name)
            _check_int(name, value, -1, 8192)
            if value > 0 and value % 8:
                _fail(name, f"`{name}` must be a multiple of 8 (or -1/0 to disable) but is {value}")
        samplers.resolve(self.sampler_name, self.scheduler, field_name="sampler_name")
        if limits is not None:
            self._check_size(limits)
        if self.mode == "txt2img":
            self._validate_hires(limits)
        else:
            self._validate_images(limits)
        if self.refiner_switch_at is not None:
            _check_float("refiner_switch_at", self.refiner_switch_at, 0.0, 1.0)
            if not 0.0 < self.refiner_switch_at < 1.0:
                _fail("refiner_switch_at", f"`refiner_switch_at` must be between 0 and 1 (exclusive) but is {self.refiner_switch_at}")

    def _check_size(self, limits: RequestLimits) -> None:
        """Pixels of one pass (width x height x batch_size) and images (n_iter x batch_size) per job."""
        pixels = self.width * self.height * self.batch_size
        if pixels > limits.max_job_pixels:
            _fail("batch_size" if self.batch_size > 1 else "width",
                  f"`width` x `height` x `batch_size` = {self.width}x{self.height}x{self.batch_size} = {pixels:,} "
                  f"pixels, more than the {limits.max_job_pixels:,} a job may use")
        if self.total_images > limits.max_job_images:
            _fail("n_iter", f"`n_iter` x `batch_size` = {self.n_iter}x{self.batch_size} = {self.total_images} images, "
                            f"more than the {limits.max_job_images} a job may make")

    def _validate_hires(self, limits: RequestLimits | None) -> None:
        from pipelines import samplers

        if self.init_images or self.mask is not None:
            _fail("init_images", "`init_images`/`mask` are only used by img2img and inpaint, not txt2img")
        if not self.enable_hr:
            return
        _check_float("hr_scale", self.hr_scale, 1.0, 8.0)
        if self.effective_hr_upscaler not in HR_UPSCALERS:
            _fail("hr_upscaler", f"could not find upscaler named {self.hr_upscaler!r}; available: {', '.join(HR_UPSCALERS)}")
        _check_int("hr_second_pass_steps", self.hr_second_pass_steps, 0, 150)
        for name in ("hr_resize_x", "hr_resize_y"):
            _check_int(name, getattr(self, name), 0, 8192)
        w, h = self.hr_target_size()
        size_field = "hr_resize_x" if self.hr_resize_x or self.hr_resize_y else "hr_scale"
        if w < 64 or h < 64 or w > 8192 or h > 8192:
            _fail(size_field, f"hires fix target size must be between 64 and 8192 px per side but is {w}x{h}")
        if limits is not None and w * h * self.batch_size > limits.max_job_pixels:
            _fail(size_field, f"the hires fix makes {w}x{h}x{self.batch_size} = {w * h * self.batch_size:,} pixels, "
                              f"more than the {limits.max_job_pixels:,} a job may use")
        if self.hr_sampler_name or self.hr_scheduler:
            samplers.resolve(self.hr_sampler_name or self.sampler_name, self.hr_scheduler or self.scheduler,
                             field_name="hr_sampler_name")

    def _validate_images(self, limits: RequestLimits | None) -> None:
        from pipelines.images import image_size  # local: images imports this module

        max_pixels = limits.max_job_pixels if limits is not None else None
        if not self.init_images:
            _fail("init_images", f"`init_images` must hold at least one image for {self.mode}")
        sizes = [image_size(data, f"init_images[{i}]", max_pixels) for i, data in enumerate(self.init_images)]
        if len(self.init_images) > self.batch_size:
            _fail("init_images", f"`init_images` holds {len(self.init_images)} images but `batch_size` is {self.batch_size}")
        _check_int("resize_mode", self.resize_mode, 0, 3)
        if self.mode == "img2img":
            if self.mask is not None:
                _fail("mask", "`mask` is given but `mode` is img2img; use mode inpaint")
            return
        if self.mask is None:
            _fail("mask", "`mask` is required for inpaint")
        mask_size = image_size(self.mask, "mask", max_pixels)
        if mask_size != sizes[0]:
            _fail("mask", f"`mask` size {mask_size[0]}x{mask_size[1]} does not match the init image size "
                          f"{sizes[0][0]}x{sizes[0][1]}")
        _check_int("mask_blur_x", self.mask_blur_x, 0, 64)
        _check_int("mask_blur_y", self.mask_blur_y, 0, 64)
        _check_int("inpainting_fill", self.inpainting_fill, 0, 3)
        _check_int("inpaint_full_res_padding", self.inpaint_full_res_padding, 0, 1024)
        _check_int("inpainting_mask_invert", int(self.inpainting_mask_invert), 0, 1)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self, encode_image: ImageEncoder = encode_image_b64) -> dict[str, Any]:
        """JSON-safe dict; images become base64 strings (or what ``encode_image`` makes of them)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["init_images"] = [encode_image(b) for b in self.init_images]
        data["mask"] = encode_image(self.mask) if self.mask is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], decode_image: ImageDecoder = decode_image_bytes) -> GenerationRequest:
        """Inverse of ``to_dict``: decodes, does not ``validate()``. Accepts data URIs. Unknown keys are ignored
        (logged) for version skew."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.warning("ignoring unknown request fields: %s", ", ".join(unknown))
        values = {k: v for k, v in data.items() if k in names}
        if "init_images" in values:
            values["init_images"] = tuple(decode_image(v, f"init_images[{i}]")
                                          for i, v in enumerate(values["init_images"] or ()))
        if values.get("mask") is not None:
            values["mask"] = decode_image(values["mask"], "mask")
        return cls(**values)


def _fail(name: str, message: str) -> None:
    raise InvalidRequestError(name, message)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"`{name}` must be an integer but is {value!r}")
    if not low <= value <= high:
        _fail(name, f"`{name}` must be between {low} and {high} but is {value}")


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(name, f"`{name}` must be a number but is {value!r}")
    if not math.isfinite(value):
        _fail(name, f"`{name}` must be a finite number but is {value}")
    if not low <= value <= high:
        _fail(name, f"`{name}` must be between {low:g} and {high:g} but is {value:g}")


@dataclass(frozen=True)
class Progress:
    """Sampling progress of one pass; ``job_no``/``job_count`` count passes (hires/refiner add passes)."""

    step: int
    total: int
    job_no: int
    job_count: int
    phase: str = "base"
    preview: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": "progress", "step": self.step, "total": self.total, "job_no": self.job_no,
                "job_count": self.job_count, "phase": self.phase,
                "preview": encode_image_b64(self.preview) if self.preview is not None else None}


@dataclass(frozen=True)
class GenerationResult:
    """Images (PNG bytes with the infotext embedded) and everything A1111's ``info`` reports about them."""

    images: list[bytes]
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    width: int
    height: int
    sampler_name: str
    scheduler: str
    steps: int
    cfg_scale: float
    clip_skip: int
    model_name: str
    model_hash: str
    vae_name: str | None
    vae_hash: str | None
    version: str
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["images"] = [encode_image_b64(b) for b in self.images]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationResult:
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        values["images"] = [decode_image_bytes(v, "images") for v in data.get("images", [])]
        return cls(**values)

    def a1111_info(self) -> dict[str, Any]:
        """The ``info`` object of an A1111 txt2img/img2img answer (the API layer JSON-encodes it)."""
        return {
            "prompt": self.prompts[0] if self.prompts else "", "all_prompts": self.prompts,
            "negative_prompt": self.negative_prompts[0] if self.negative_prompts else "",
            "all_negative_prompts": self.negative_prompts,
            "seed": self.seeds[0] if self.seeds else -1, "all_seeds": self.seeds,
            "subseed": self.subseeds[0] if self.subseeds else -1, "all_subseeds": self.subseeds,
            "width": self.width, "height": self.height, "sampler_name": self.sampler_name,
            "scheduler": self.scheduler, "cfg_scale": self.cfg_scale, "steps": self.steps,
            "batch_size": len(self.images), "sd_model_name": self.model_name, "sd_model_hash": self.model_hash,
            "sd_vae_name": self.vae_name, "sd_vae_hash": self.vae_hash, "clip_skip": self.clip_skip,
            "index_of_first_image": 0, "infotexts": self.infotexts, "version": self.version,
        }
