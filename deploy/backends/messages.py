"""What travels between the control plane and a backend: a job spec in, events out.

Remote backends (a self-hosted HTTP worker, SageMaker endpoints) share no memory with the app, so
every message is a frozen dataclass with ``to_json()``/``from_json()``; models travel as ``ModelFileRef``s
the worker materialises with ``deploy.model_files.ModelFiles``. In a process images are bytes (a ``JobSpec``
holds the typed ``GenerationRequest`` and ``ControlUnit``s); they become base64 only on the wire (or
asset-store keys when the worker wrote its results itself). Nothing here imports torch or webapp.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from deploy.jobkinds import GENERATE
from deploy.model_files import ModelFileRef
from pipelines.controlnet.units import ControlUnit, parse_unit
from pipelines.types import GenerationRequest

VAE_AUTOMATIC = "Automatic"
VAE_NONE = "None"
FAILURE_KINDS = ("oom", "bad_request", "internal", "interrupted")
FailureKind = Literal["oom", "bad_request", "internal", "interrupted"]


class MessageError(ValueError):
    """A message could not be decoded (wrong type tag, missing field): a protocol bug, not user input."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _ref_to_dict(ref: ModelFileRef) -> dict[str, Any]:
    to_dict = getattr(ref, "to_dict", None)
    return to_dict() if callable(to_dict) else dataclasses.asdict(ref)


def _ref_from_dict(data: Mapping[str, Any]) -> ModelFileRef:
    from_dict = getattr(ModelFileRef, "from_dict", None)
    return from_dict(data) if callable(from_dict) else ModelFileRef(**data)


# -- the job -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """One model file a job uses: the name users wrote for it, its identity and where its bytes are."""

    kind: str  # checkpoint / vae / lora / embedding / hypernetwork
    name: str
    sha256: str
    file: ModelFileRef
    lora_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256, "file": _ref_to_dict(self.file),
                "lora_hash": self.lora_hash}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(kind=data["kind"], name=data["name"], sha256=data["sha256"], file=_ref_from_dict(data["file"]),
                   lora_hash=data.get("lora_hash"))


@dataclass(frozen=True)
class JobModels:
    """Every model file a job may use, by role (mirrors ``pipelines.types.ResolvedModels`` with file refs)."""

    checkpoint: ModelSpec
    vae: ModelSpec | str = VAE_AUTOMATIC
    companion_vae: ModelSpec | None = None
    refiner: ModelSpec | None = None
    loras: Mapping[str, ModelSpec] = field(default_factory=dict)
    embeddings: Mapping[str, ModelSpec] = field(default_factory=dict)
    hypernetworks: Mapping[str, ModelSpec] = field(default_factory=dict)
    controlnets: Sequence[ModelSpec] = ()
    """One per enabled ControlNet unit, in unit order."""

    def all_specs(self) -> list[ModelSpec]:
        specs = [self.checkpoint]
        specs += [m for m in (self.vae, self.companion_vae, self.refiner) if isinstance(m, ModelSpec)]
        for group in (self.loras, self.embeddings, self.hypernetworks):
            specs += list(group.values())
        return specs + list(self.controlnets)

    def to_dict(self) -> dict[str, Any]:
        def group(g: Mapping[str, ModelSpec]) -> dict[str, Any]:
            return {k: v.to_dict() for k, v in g.items()}

        return {
            "checkpoint": self.checkpoint.to_dict(),
            "vae": self.vae.to_dict() if isinstance(self.vae, ModelSpec) else self.vae,
            "companion_vae": self.companion_vae.to_dict() if self.companion_vae else None,
            "refiner": self.refiner.to_dict() if self.refiner else None,
            "loras": group(self.loras), "embeddings": group(self.embeddings),
            "hypernetworks": group(self.hypernetworks),
            "controlnets": [spec.to_dict() for spec in self.controlnets],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobModels:
        def group(g: Mapping[str, Any] | None) -> dict[str, ModelSpec]:
            return {k: ModelSpec.from_dict(v) for k, v in (g or {}).items()}

        vae = data.get("vae", VAE_AUTOMATIC)
        return cls(
            checkpoint=ModelSpec.from_dict(data["checkpoint"]),
            vae=ModelSpec.from_dict(vae) if isinstance(vae, Mapping) else str(vae),
            companion_vae=ModelSpec.from_dict(data["companion_vae"]) if data.get("companion_vae") else None,
            refiner=ModelSpec.from_dict(data["refiner"]) if data.get("refiner") else None,
            loras=group(data.get("loras")), embeddings=group(data.get("embeddings")),
            hypernetworks=group(data.get("hypernetworks")),
            controlnets=tuple(ModelSpec.from_dict(spec) for spec in data.get("controlnets") or ()),
        )


@dataclass(frozen=True)
class JobSpec:
    """One job for a backend: its kind, what it runs on (``models``) and its input.

    A ``generate`` spec holds the engine request and its ControlNet units, already validated where it entered
    this process (the control plane at submit; ``from_dict`` for one that arrived over the wire), so whoever runs
    it does not validate it again. Any other kind (``deploy.jobkinds``: ``train_lora``) carries a JSON-safe
    ``payload`` that its own runner validates; ``request`` is None and ``models.checkpoint`` is its base model.
    """

    job_id: str
    mode: str
    request: GenerationRequest | None
    models: JobModels
    attempt: int = 1
    controlnet_units: Sequence[ControlUnit] = ()
    """The enabled ControlNet units, in the order of ``models.controlnets``."""
    kind: str = GENERATE
    payload: Mapping[str, Any] = field(default_factory=dict)
    """The input of a non-generate kind (JSON-safe); empty for ``generate``."""

    def __post_init__(self) -> None:
        if (self.kind == GENERATE) != (self.request is not None):
            raise MessageError(f"a {self.kind!r} job spec {'needs' if self.kind == GENERATE else 'has no'} "
                               f"generation request")

    def to_dict(self) -> dict[str, Any]:
        """The wire form: images as base64."""
        return {"job_id": self.job_id, "kind": self.kind, "mode": self.mode,
                "request": self.request.to_dict() if self.request is not None else None,
                "payload": dict(self.payload), "models": self.models.to_dict(), "attempt": self.attempt,
                "controlnet_units": [u.to_dict() for u in self.controlnet_units]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Decode and validate a spec from the wire, once: ``InvalidRequestError`` (naming the field) when the
        request or a unit is invalid, ``MessageError`` when it is not a job spec at all."""
        try:
            kind = str(data.get("kind") or GENERATE)
            if kind != GENERATE:
                payload = data.get("payload") or {}
                if not isinstance(payload, Mapping):
                    raise TypeError("payload must be an object")
                return cls(job_id=data["job_id"], mode=data["mode"], request=None,
                           models=JobModels.from_dict(data["models"]), attempt=int(data.get("attempt", 1)),
                           kind=kind, payload=dict(payload))
            request = GenerationRequest.from_dict(data["request"])
            units = tuple(parse_unit(_arg_index(unit, position), unit, [], None)
                          for position, unit in enumerate(data.get("controlnet_units") or ()))
            spec = cls(job_id=data["job_id"], mode=data["mode"], request=request,
                       models=JobModels.from_dict(data["models"]), attempt=int(data.get("attempt", 1)),
                       controlnet_units=units)
        except (KeyError, TypeError, AttributeError) as exc:
            raise MessageError(f"not a job spec: {exc}") from exc
        request.validate()
        return spec

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> JobSpec:
        return cls.from_dict(json.loads(text))


def _arg_index(unit: Mapping[str, Any], position: int) -> int:
    """Where the unit sat in the client's ``alwayson_scripts.controlnet.args`` (errors name it)."""
    index = unit.get("arg_index")
    return index if isinstance(index, int) and not isinstance(index, bool) and index >= 0 else position


# -- events ------------------------------------------------------------------------------------------

class _Event:
    """JSON codec shared by the events: ``{"type": <tag>, ...fields}``; bytes fields as base64."""

    type: ClassVar[str]
    _bytes_fields: ClassVar[tuple[str, ...]] = ()
    job_id: str

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self._bytes_fields:
                value = [_b64(v) for v in value]
            elif isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        if data.get("type") != cls.type:
            raise MessageError(f"expected a {cls.type!r} event, got {data.get('type')!r}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in cls._bytes_fields:
                value = tuple(_unb64(v) for v in value)
            elif isinstance(value, list):
                value = tuple(value)
            values[f.name] = value
        try:
            return cls(**values)
        except TypeError as exc:
            raise MessageError(f"bad {cls.type!r} event: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> Any:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Started(_Event):
    """A worker picked the job up (``worker`` names the device or instance)."""

    type: ClassVar[str] = "started"
    job_id: str
    worker: str = ""
    handle: Mapping[str, Any] | None = None
    """How to find the job again after the control plane restarts, for a job that goes on running elsewhere
    meanwhile (a SageMaker async invocation: its InferenceId and output locations). JSON-safe. A backend that
    sets it sends this event from ``submit`` itself, and the control plane records it before ``submit``
    returns; ``Backend.adopt`` takes the job over again with it."""


@dataclass(frozen=True)
class Progress(_Event):
    """Sampling progress; ``job_no``/``job_count`` count passes (batches, hires, refiner); ``eta`` in seconds."""

    type: ClassVar[str] = "progress"
    job_id: str
    step: int
    total: int
    job_no: int = 0
    job_count: int = 1
    eta: float | None = None
    preview_png: str | None = None
    """Base64 PNG of the current latents, every ``preview_every`` steps; None otherwise."""
    phase: str = "base"
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Numbers the job reports (a training's loss, loss_avg, lr, epoch); empty for generation."""
    log: tuple[str, ...] = ()
    """Log lines written since the job's previous event."""
    artifact_keys: tuple[str, ...] = ()
    """Asset-store keys of the files the worker has written so far (epoch LoRAs, samples)."""

    @property
    def fraction(self) -> float:
        """0..1 across all passes."""
        if self.total <= 0 or self.job_count <= 0:
            return 0.0
        return min(1.0, (self.job_no + self.step / self.total) / self.job_count)

    @property
    def preview(self) -> bytes | None:
        return _unb64(self.preview_png) if self.preview_png else None


@dataclass(frozen=True)
class _Outcome(_Event):
    """The images a job made (PNG bytes with the ``parameters`` chunk, or store keys the worker wrote) and
    the facts about them: all of them for ``Succeeded``, those finished before the cancel for ``Cancelled``."""

    _bytes_fields: ClassVar[tuple[str, ...]] = ("images",)
    job_id: str
    images: tuple[bytes, ...] = ()
    image_keys: tuple[str, ...] = ()
    infotexts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    warnings: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)
    """A1111's ``info`` object (``GenerationResult.a1111_info()``)."""
    artifact_keys: tuple[str, ...] = ()
    """Asset-store keys of every file besides images the job leaves (a training's LoRAs, samples, log), written
    by the worker."""

    @property
    def count(self) -> int:
        return len(self.images) or len(self.image_keys)


@dataclass(frozen=True)
class Succeeded(_Outcome):
    """The job finished: every image it was asked for."""

    type: ClassVar[str] = "succeeded"


@dataclass(frozen=True)
class Failed(_Event):
    """The job failed. ``kind``: oom (out of memory), bad_request (the input), internal (a bug or the
    environment), interrupted (the worker went away mid-job: the job may be retried)."""

    type: ClassVar[str] = "failed"
    job_id: str
    message: str
    kind: str = "internal"
    field: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAILURE_KINDS:
            raise MessageError(f"failure kind must be one of {FAILURE_KINDS}, not {self.kind!r}")


@dataclass(frozen=True)
class Cancelled(_Outcome):
    """The job stopped because it was cancelled (within one sampling step when it was running).

    Like A1111's interrupt it keeps what was finished: the images of the batches done before the cancel
    (none when it stopped in its first batch)."""

    type: ClassVar[str] = "cancelled"
    reason: str = "cancelled"


Event = Started | Progress | Succeeded | Failed | Cancelled
EVENT_TYPES: dict[str, type] = {cls.type: cls for cls in (Started, Progress, Succeeded, Failed, Cancelled)}
TERMINAL_EVENTS = (Succeeded, Failed, Cancelled)


def event_from_dict(data: Mapping[str, Any]) -> Event:
    cls = EVENT_TYPES.get(str(data.get("type")))
    if cls is None:
        raise MessageError(f"unknown event type {data.get('type')!r}; known: {', '.join(EVENT_TYPES)}")
    return cls.from_dict(data)


def event_from_json(text: str | bytes) -> Event:
    """Decode any event by its ``type`` tag (what a remote backend's transport calls)."""
    return event_from_dict(json.loads(text))
