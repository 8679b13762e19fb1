"""Typed options per backend kind: one pydantic model each, so the Endpoints form, the API and the
backend factory validate an endpoint's configuration the same way.

``options_model(kind)`` gives the model; ``parse_options(kind, raw)`` validates a plain mapping (what an
endpoint row stores, what a form or ``POST /api/v1/endpoints`` sends) and raises ``OptionsError`` naming
the bad field. Fields typed ``SecretStr`` are write-only: ``public_options`` masks them, and the control
plane stores them encrypted (never in logs or API answers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator


class OptionsError(ValueError):
    """An endpoint's options are not valid for its kind; ``field`` names the first bad one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BackendOptions(BaseModel):
    """Common base: unknown fields are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalOptions(BackendOptions):
    """The GPUs (or the CPU) of the machine the studio runs on."""

    devices: str | list[str] | None = Field("auto", description="auto, or cuda:0,cuda:1 ...")
    skeleton_dirs: list[str] = Field(default_factory=list)
    cache_gb: float | None = Field(None, gt=0, description="pipeline cache budget; default from the device")
    preview_every: int = Field(5, ge=0, le=1000)
    dtype: str | None = None
    cpu_threads: int | None = Field(None, ge=1, le=1024)
    annotators_dir: str | None = None
    work_dir: str | None = Field(None, description="scratch space for training jobs; default: the system temp dir")
    share_training_device: bool = Field(
        False, description="let one generation job run on a device beside its training (both share its memory: "
                           "may run out of it); off: generation waits for the training's device")


class FakeOptions(BackendOptions):
    """The deterministic test/demo backend (no model runs)."""

    slots: int = Field(1, ge=1, le=64)
    step_delay: float = Field(0.0, ge=0, le=60)
    steps: int | None = Field(None, ge=1, le=1000)
    preview_every: int = Field(1, ge=0, le=1000)
    fail_prompts: dict[str, str] = Field(default_factory=dict)
    remote: bool = False


class HttpWorkerOptions(BackendOptions):
    """A self-hosted worker: our serving container on any GPU box, reached over HTTP(S)."""

    url: str = Field(..., description="the worker's base URL, e.g. https://gpu-box:8080")
    secret: SecretStr = Field(..., description="the shared secret the worker was started with")
    slots: int = Field(1, ge=1, le=64, description="jobs sent to it at once")
    timeout_seconds: float = Field(30.0, gt=0, le=600, description="connect/read timeout of control calls")
    verify_tls: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must not carry a query, a fragment or credentials (the secret goes in `secret`)")
        return value

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value


_MODELS: dict[str, type[BackendOptions]] = {
    "local": LocalOptions,
    "fake": FakeOptions,
    "http": HttpWorkerOptions,
}


def register_options(kind: str, model: type[BackendOptions]) -> None:
    """Declare the options model of a new backend kind (SageMaker adds its own)."""
    _MODELS[kind] = model


def option_kinds() -> list[str]:
    """The kinds that declared an options model (what the Endpoints form and API can configure)."""
    return sorted(_MODELS)


def options_model(kind: str) -> type[BackendOptions] | None:
    return _MODELS.get(kind)


def parse_options(kind: str, raw: Mapping[str, Any] | BackendOptions | None) -> BackendOptions:
    """Validate ``raw`` for ``kind``; ``OptionsError`` names the first bad field as ``options.<name>``."""
    model = _MODELS.get(kind)
    if model is None:
        raise OptionsError(f"unknown backend kind {kind!r}; known: {', '.join(sorted(_MODELS))}", field="kind")
    if isinstance(raw, model):
        return raw
    try:
        return model.model_validate(dict(raw or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first.get("loc", ()))
        raise OptionsError(f"{kind} option `{name}`: {first.get('msg')}", field=f"options.{name}" if name
                           else "options") from None


def secret_fields(kind: str) -> tuple[str, ...]:
    """The write-only fields of ``kind``'s options (stored encrypted, masked in answers)."""
    model = _MODELS.get(kind)
    if model is None:
        return ()
    return tuple(name for name, info in model.model_fields.items() if info.annotation is SecretStr)


def plain_options(options: BackendOptions) -> dict[str, Any]:
    """The options as plain values, secrets revealed (for the backend factory only)."""
    data = options.model_dump()
    for name in secret_fields_of(options):
        value = getattr(options, name)
        data[name] = value.get_secret_value() if value is not None else None
    return data


def public_options(kind: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with secret fields masked (for API answers, the UI and logs)."""
    hidden = secret_fields(kind)
    return {k: ("********" if k in hidden and v else v) for k, v in raw.items()}


def secret_fields_of(options: BackendOptions) -> tuple[str, ...]:
    return tuple(name for name, info in type(options).model_fields.items() if info.annotation is SecretStr)
