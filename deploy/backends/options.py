"""Typed options per backend kind: one pydantic model each, so the Endpoints form, the API and the
backend factory validate an endpoint's configuration the same way.

``options_model(kind)`` gives the model; ``parse_options(kind, raw)`` validates a plain mapping (what an
endpoint row stores, what a form or ``POST /api/v1/endpoints`` sends) and raises ``OptionsError`` naming
the bad field. Fields typed ``SecretStr`` are write-only: ``public_options`` masks them, and the control
plane stores them encrypted (never in logs or API answers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator


class OptionsError(ValueError):
    """An endpoint's options are not valid for its kind; ``field`` names the first bad one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BackendOptions(BaseModel):
    """Common base: unknown fields are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_autoscale: ClassVar[bool] = False
    """Whether a deployment that does not say turns autoscaling on."""

    def name_prefix(self, kind: str) -> str:
        """The default endpoint name is ``<prefix>-<6 hex>``."""
        return f"studio-{kind}"

    def check_deployment(self, *, name: str, min_instances: int, max_instances: int, autoscale: bool,
                         store: Any = None) -> None:
        """Checks that need the deployment's name, instance bounds and the studio's asset store too (the options
        with the server's defaults for the kind applied); raises ``OptionsError``."""
        return None


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


class SageMakerOptions(BackendOptions):
    """An AWS SageMaker endpoint serving the studio's container (the studio's asset store must be on S3)."""

    default_autoscale: ClassVar[bool] = True  # the seeds: "Enable Autoscaling" on by default

    endpoint_type: Literal["async", "realtime"] = Field(
        "async", description="async: queued in the cloud, scales to zero; realtime: answers within 60 s, ≥ 1 instance")
    instance_type: str = Field("ml.g5.2xlarge", description="e.g. ml.g5.2xlarge, ml.g4dn.xlarge")
    training_instance_type: str = Field("ml.g5.2xlarge", pattern=r"^ml\.[a-z0-9\-]+\.[a-z0-9]+$",
                                        description="the instance each LoRA training job runs on (its own "
                                                    "SageMaker training job, not the endpoint's instances)")
    initial_instance_count: int = Field(1, ge=1, le=100, description="instances at creation (ESD's name)")
    image_uri: str | None = Field(None, description="the serving container's ECR image; default: the server's setting")
    role_arn: str | None = Field(None, description="SageMaker execution role; default: the server's setting")
    region: str | None = Field(None, description="AWS region; default: the server's AWS configuration")
    target_value: float | None = Field(None, gt=0, description="autoscaling target: queued jobs per instance "
                                                              "(async, 3) or invocations per instance-minute (5)")
    scale_in_cooldown: int = Field(180, ge=0, le=86400, description="seconds")
    scale_out_cooldown: int = Field(60, ge=0, le=86400, description="seconds")
    success_topic: str | None = Field(None, description="SNS topic ARN told of finished async jobs (optional)")
    error_topic: str | None = Field(None, description="SNS topic ARN told of failed async jobs (optional)")
    environment: dict[str, str] = Field(default_factory=dict, description="extra environment of the container")
    slots: int = Field(4, ge=1, le=256, description="jobs sent to it at once (async endpoints queue them)")
    create_timeout_minutes: float = Field(30.0, gt=0, le=1440, description="Creating longer than this is Failed")
    state_seconds: float = Field(15.0, ge=0.05, le=600, description="how often its state is read from SageMaker")
    poll_seconds: float = Field(2.0, ge=0.05, le=60, description="how often async results are looked for")
    existing: bool = Field(False, description="use an endpoint created outside the studio (never scaled or "
                                              "deleted here)")
    sagemaker_name: str | None = Field(None, description="the SageMaker endpoint's name; default: this endpoint's")

    def name_prefix(self, kind: str) -> str:
        """``studio-async-<id>`` / ``studio-rt-<id>``, as ESD names its endpoints."""
        return "studio-async" if self.endpoint_type == "async" else "studio-rt"

    @field_validator("endpoint_type", mode="before")
    @classmethod
    def _endpoint_type(cls, value: Any) -> Any:
        """ESD's words too: "Async", "Real-time"."""
        if isinstance(value, str):
            folded = value.strip().lower().replace("-", "").replace("_", "").replace(" ", "")
            return {"async": "async", "realtime": "realtime"}.get(folded, value)
        return value

    def check_deployment(self, *, name: str, min_instances: int, max_instances: int, autoscale: bool,
                         store: Any = None) -> None:
        """The plan SageMaker would get, validated now (names, role, image, limits) so a bad one is never stored."""
        from deploy.sagemaker.control import EndpointPlan, PlanError, ScalingPlan
        from deploy.storage.s3 import S3Store

        if not isinstance(store, S3Store):
            raise OptionsError("SageMaker endpoints need the studio's asset store on S3 (start it with --store "
                               "s3://bucket/prefix): the container reads models from it and writes images to it",
                               field="kind")
        if not self.image_uri:
            raise OptionsError("set `image_uri` (the serving container's ECR image) or the server's "
                               "STUDIO_SAGEMAKER_IMAGE_URI", field="options.image_uri")
        if not self.role_arn:
            raise OptionsError("set `role_arn` (the SageMaker execution role) or the server's "
                               "STUDIO_SAGEMAKER_ROLE_ARN", field="options.role_arn")

        low = min_instances
        try:
            EndpointPlan(
                name=self.sagemaker_name or name, endpoint_type=self.endpoint_type,
                image_uri=self.image_uri, role_arn=self.role_arn,
                instance_type=self.instance_type, initial_instances=min(self.initial_instance_count, max(low, max_instances)),
                environment={"STUDIO_WORKER_STORE": "s3://bucket/prefix", **self.environment},
                output_path="s3://bucket/output/", failure_path="s3://bucket/failure/",
                success_topic=self.success_topic, error_topic=self.error_topic,
                scaling=ScalingPlan(enabled=autoscale, min_instances=low, max_instances=max(low, max_instances),
                                    target_value=self.target_value, scale_in_cooldown=self.scale_in_cooldown,
                                    scale_out_cooldown=self.scale_out_cooldown))
        except PlanError as exc:
            # The bounds are the deployment's own fields; the rest are options
            bound = exc.field.removeprefix("options.scaling.")
            field = bound if bound in ("min_instances", "max_instances") else exc.field.replace("scaling.", "")
            raise OptionsError(str(exc), field=field) from None


_MODELS: dict[str, type[BackendOptions]] = {
    "local": LocalOptions,
    "fake": FakeOptions,
    "http": HttpWorkerOptions,
    "sagemaker": SageMakerOptions,
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
