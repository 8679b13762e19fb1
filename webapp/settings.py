"""Typed settings: environment (prefix ``STUDIO_``) first, command-line flags override.

One ``Settings`` object is built in app.py and handed to whatever needs it; nothing reads the
environment behind its back.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipelines.types import RequestLimits


def _listed(value: Any, split: Callable[[str], list[str]]) -> Any:
    """A list setting given as text (environment, flag): a JSON list, else ``split`` of the text."""
    if isinstance(value, str):
        text = value.strip()
        return json.loads(text) if text.startswith("[") else split(text)
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STUDIO_", env_file=None, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    data_dir: Path = Path("data")
    database_url: str | None = None
    """SQLAlchemy URL; default ``sqlite:///<data_dir>/studio.db``. PostgreSQL URLs work too."""
    store: str | None = None
    """Asset store URL: a directory, ``file:///abs/dir`` or ``s3://bucket/prefix``; default ``<data_dir>/store``."""
    store_endpoint_url: str | None = None
    admin_password: SecretStr | None = None
    session_ttl_hours: float = Field(24 * 7, gt=0)
    cookie_secure: bool = False
    """Set the Secure flag on the session cookie (serve behind HTTPS)."""
    login_max_failures_per_user: int = Field(5, ge=1)
    login_max_failures_per_address: int = Field(20, ge=1)
    login_window_seconds: int = Field(300, ge=1)
    password_hash_memory_kib: int = Field(65536, ge=7168, le=4 * 1024**2)
    """argon2id memory per password hash, in KiB (argon2-cffi's default, 64 MiB). With the time cost it sets
    what a login costs here and what a guess costs an attacker holding the database; OWASP's minimums are
    equivalent pairs such as 19456 KiB × 2 passes or 7168 KiB × 5. Stored hashes made with other values are
    re-made at their user's next successful login."""
    password_hash_time_cost: int = Field(3, ge=1, le=20)
    """argon2id passes per password hash (argon2-cffi's default, 3)."""
    password_hash_parallelism: int = Field(4, ge=1, le=16)
    """argon2id lanes per password hash (argon2-cffi's default, 4)."""
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _check_password_hash_cost(self) -> Settings:
        floor = 7168 * 5  # OWASP's lightest pair; every pair it lists holds at least this much memory × passes
        if self.password_hash_memory_kib * self.password_hash_time_cost < floor:
            raise ValueError(
                f"password_hash_memory_kib × password_hash_time_cost must be at least {floor} (e.g. 19456 × 2), "
                f"got {self.password_hash_memory_kib} × {self.password_hash_time_cost}")
        return self

    # -- models (registry, imports, cache) ----------------------------------------------------------
    models_dir: Path | None = None
    """An A1111 install registered in place at start and rescanned on refresh: its webui root (``models/``
    and ``embeddings/`` inside) or its ``models/`` folder (the root's ``embeddings/`` is found too)."""
    import_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Server folders admins may import from; default ``<data_dir>/imports`` and the models dir.
    Environment: paths separated by ``:`` (or a JSON list)."""
    model_cache_dir: Path | None = None
    """Where engines materialise models from the asset store; default ``<data_dir>/cache/models``."""
    model_cache_budget_gb: float = Field(50.0, gt=0)
    url_import_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Hosts, ``host:port`` or CIDRs that URL imports may reach despite being private/loopback. For tests and
    trusted mirrors only; empty by default. Environment: comma-separated."""
    civitai_token: SecretStr | None = None
    """Sent (as a bearer token, to civitai.com only) with Civitai downloads; never logged or stored."""
    hf_token: SecretStr | None = None
    """Sent (as a bearer token, to huggingface.co only) with Hugging Face downloads; never logged or stored."""
    max_upload_gb: float = Field(64.0, gt=0)
    """Largest model file accepted through the browser or from a URL."""
    import_workers: int = Field(2, ge=1, le=32)

    @field_validator("import_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        return _listed(value, lambda text: [part for part in text.split(":") if part.strip()])

    @field_validator("url_import_allow", "allowed_origins", "forwarded_allow_ips", mode="before")
    @classmethod
    def _split_allow(cls, value: Any) -> Any:
        return _listed(value, lambda text: [part.strip() for part in text.split(",") if part.strip()])

    # -- exposure (what ordinary users may trigger and read) ----------------------------------------------
    refresh_min_interval_seconds: float = Field(60.0, ge=0)
    """Non-administrators' model-folder refreshes (A1111 ``refresh-*``, the Models tab's Refresh) rescan at
    most once per this many seconds, server-wide; the others answer at once with the lists as they are.
    Administrators always rescan."""

    # -- jobs (queue, backends) ------------------------------------------------------------------------
    backend: str = "local"
    """Backend kind of the ``local`` endpoint: ``local`` (this machine's devices) or ``fake`` (tests, demos)."""
    backend_options: dict[str, Any] = Field(default_factory=dict)
    """Extra options of that backend, JSON in ``STUDIO_BACKEND_OPTIONS`` (e.g. the fake's ``step_delay``)."""
    devices: str = "auto"
    """Local devices: ``auto`` (every CUDA device, else one CPU worker) or a list such as ``cuda:0,cuda:1``."""
    max_queued_jobs_per_user: int = Field(100, ge=1)
    job_max_attempts: int = Field(3, ge=1, le=20)
    """A job a crash left running is retried until it has been started this many times, then failed."""
    job_lease_seconds: float = Field(30.0, ge=0.5, le=3600)
    """How long a studio instance holds a running job without renewing its lease (it renews every third of
    this). When an instance dies, the other instances on the same database put its running jobs back in the
    queue once their leases run out; a restart on the same data dir takes them back at once."""
    skeleton_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Extra config-skeleton folders searched before the shipped ones (``:``-separated or a JSON list)."""
    pipeline_cache_gb: float | None = Field(None, gt=0)
    """Loaded checkpoints kept per device (RAM on CPU, VRAM on CUDA); unset: sized from the device's memory
    (``pipelines.cache.auto_budget``)."""
    preview_every: int = Field(5, ge=0)
    """A live preview every N sampling steps (0: none)."""
    share_training_device: bool = False
    """The ``local`` endpoint lets one generation job run on a device beside its training (both share the
    device's memory, so either may run out of it); off: generation waits for the devices trainings hold."""
    endpoint_health_seconds: float = Field(5.0, ge=0)
    """How often running endpoints' backends are asked whether they are healthy (an unhealthy one is shown
    ``Degraded`` and its queued jobs wait); 0: never."""
    sagemaker_image_uri: str | None = None
    """The serving container's image (ECR URI) SageMaker endpoints run unless their options name another."""
    sagemaker_role_arn: str | None = None
    """The SageMaker execution role endpoints get unless their options name another."""
    sagemaker_region: str | None = None
    """AWS region of SageMaker endpoints; unset: boto3's own configuration (``AWS_DEFAULT_REGION`` ...)."""

    # -- request limits (body size, prompt length, pixels and images per job) ------------------------------
    max_body_mb: float = Field(64.0, gt=0)
    """Largest HTTP request body; model-upload chunks (``max_upload_gb``) and Gradio's file upload route are
    limited elsewhere. 64 MB carries an img2img request with several base64 images at 2048x2048."""
    max_prompt_chars: int = Field(RequestLimits.max_prompt_chars, ge=1)
    """Characters in each prompt, negative prompt and hires-fix prompt."""
    max_job_pixels: int = Field(RequestLimits.max_job_pixels, ge=64 * 64)
    """width x height x batch_size of a job (and of its hires-fix target); the limit of each input image too."""
    max_job_images: int = Field(RequestLimits.max_job_images, ge=1)
    """n_iter x batch_size of a job."""

    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(max_prompt_chars=self.max_prompt_chars, max_job_pixels=self.max_job_pixels,
                             max_job_images=self.max_job_images)

    # -- disk quota and UI uploads (issue 9: per-user quota, Gradio's upload route) --------------------
    user_quota_gb: float = Field(50.0, ge=0)
    """Disk each user may fill with job results (images and requests) and the model files they imported
    (0: unlimited). Administrators are not limited."""
    ui_max_file_mb: float = Field(64.0, gt=0)
    """Largest file the web UI's upload route accepts (init images, PNG Info); model files use the
    chunked upload and ``max_upload_gb``."""
    dataset_max_mb: float = Field(2048.0, gt=0)
    """Largest training dataset (images and captions, uncompressed) one upload or zip may create."""
    dataset_max_files: int = Field(10000, ge=1)
    """Most files (images and captions) in one dataset upload or zip."""
    ui_temp_max_age_hours: float = Field(24.0, gt=0)
    """Files uploaded to the web UI (kept in ``<data_dir>/tmp/gradio``) are deleted after this long."""

    # -- idle hooks and monitoring (issue 11: VM image and cost) -------------------------------------------
    idle_unload_minutes: float = Field(30.0, ge=0)
    """After this long with no job queued, started or finished, every endpoint backend releases its loaded
    models (once per idle period; the next job loads them again). 0: never."""
    idle_shutdown_minutes: float = Field(0.0, ge=0)
    """After this long with nothing queued or running, run ``idle_shutdown_command`` once (a VM billed by the
    hour stops costing). 0 (the default): never."""
    idle_shutdown_command: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["systemctl", "poweroff"])
    """The program and arguments run for the idle shutdown (no shell). Environment and flag: a JSON list or a
    shell-quoted string. The default asks logind, which needs a polkit rule for the service user
    (deploy/vm/cloud-init.yaml writes one); ``sudo`` cannot work under the unit's NoNewPrivileges."""
    metrics_token: SecretStr | None = None
    """A bearer token that may read ``/metrics`` (Prometheus) and nothing else; administrators can read it
    with their own login anyway. At least 16 characters. Environment only (flags show in ``ps``)."""

    @field_validator("idle_shutdown_command", mode="before")
    @classmethod
    def _split_command(cls, value: Any) -> Any:
        return _listed(value, shlex.split)

    @field_validator("idle_shutdown_command")
    @classmethod
    def _check_command(cls, value: list[str]) -> list[str]:
        if not value or not value[0].strip():
            raise ValueError("idle_shutdown_command must name a program")
        return value

    @field_validator("metrics_token")
    @classmethod
    def _check_metrics_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("metrics_token must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        return value

    @field_validator("skeleton_dirs", mode="before")
    @classmethod
    def _split_skeleton_dirs(cls, value: Any) -> Any:
        return _listed(value, lambda text: [part for part in text.split(":") if part.strip()])

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        for item in (v.strip() for v in value.split(",")):
            if item != "auto" and item.split(":")[0] not in ("cpu", "cuda", "mps"):
                raise ValueError(f"devices entry {item!r} must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _defaults_from_data_dir(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'studio.db'}"
        if self.store is None:
            self.store = str(self.data_dir / "store")
        if self.models_dir is not None:
            self.models_dir = self.models_dir.expanduser().resolve()
        if not self.import_roots:
            self.import_roots = [self.data_dir / "imports", *self.install_folders()]
        self.import_roots = [Path(root).expanduser().resolve() for root in self.import_roots]
        if self.model_cache_dir is None:
            self.model_cache_dir = self.data_dir / "cache" / "models"
        return self

    # -- HTTP gate: origins, reverse proxies, login throttle -------------------------------------------
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Origins (``scheme://host[:port]``) accepted besides the server's own for cookie-authenticated requests,
    e.g. the public address when a proxy rewrites the Host header. Environment: comma-separated."""
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Peers (IPs, CIDRs or ``*``) whose X-Forwarded-For/-Proto/-Host are trusted, as uvicorn's option of that
    name; empty by default: forwarded headers are ignored. Environment: comma-separated."""
    login_max_failures_per_account: int = Field(100, ge=1)
    """Failed logins for one user name from all addresses per window; past it, attempts for that user are
    spaced ``login_window_seconds / this`` seconds apart (slowed, never locked)."""

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        from webapp.web.origin import normalize_origin

        normalized = []
        for item in value:
            origin = normalize_origin(item)
            if origin is None:
                raise ValueError(f"allowed_origins entry {item!r} must be scheme://host[:port] (no path)")
            normalized.append(origin)
        return normalized

    # -- ControlNet ---------------------------------------------------------------------------------------------
    annotators_dir: Path | None = None
    """ControlNet preprocessor weights (file names as in lllyasviel/Annotators), dropped in by an admin and read
    only from here, never downloaded; default ``<data_dir>/annotators``, created at start."""
    controlnet_unit_count: int = Field(3, ge=1, le=10)
    """ControlNet units in the txt2img/img2img accordion (and ``/controlnet/settings``)."""
    controlnet_detect_max_images: int = Field(4, ge=1, le=64)
    """Images one ``/controlnet/detect`` call may preprocess."""
    controlnet_detect_concurrency: int = Field(1, ge=1, le=16)
    """Preprocessor runs (Preview, ``/controlnet/detect``) at once on this server; more wait, then get 429."""

    @model_validator(mode="after")
    def _default_annotators_dir(self) -> Settings:
        self.annotators_dir = (self.annotators_dir or self.data_dir / "annotators").expanduser().resolve()
        return self

    def install_folders(self) -> list[Path]:
        """The models dir, and the install's embeddings folder when it lies outside (``--models-dir`` named
        the webui's ``models/``)."""
        if self.models_dir is None:
            return []
        from webapp.services.models.scan import find_install  # the A1111 layout lives with the scan

        embeddings = find_install(self.models_dir).embeddings
        outside = embeddings is not None and not embeddings.is_relative_to(self.models_dir)
        return [self.models_dir, *([embeddings] if outside else [])]

    @property
    def listens_publicly(self) -> bool:
        return self.host not in ("127.0.0.1", "localhost", "::1")

    @property
    def db_url(self) -> str:
        assert self.database_url is not None  # filled by the validator
        return self.database_url

    @property
    def store_url(self) -> str:
        assert self.store is not None  # filled by the validator
        return self.store


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description="Run the studio (web UI + APIs on one port).")
    p.add_argument("--listen", action="store_true", default=None, help="bind 0.0.0.0 instead of 127.0.0.1")
    p.add_argument("--host", help="address to bind (overrides --listen)")
    p.add_argument("--port", type=int, help="port (default 7860)")
    p.add_argument("--data-dir", type=Path, help="data directory (default ./data)")
    p.add_argument("--database-url", help="SQLAlchemy database URL (default SQLite in the data dir)")
    p.add_argument("--store", help="asset store: a directory or s3://bucket/prefix")
    p.add_argument("--log-level", help="logging level (default INFO)")
    p.add_argument("--models-dir", type=Path,
                   help="an A1111 install (its webui root or models/ folder) to register in place and rescan on refresh")
    p.add_argument("--import-root", dest="import_roots", type=Path, action="append",
                   help="a server folder admins may import models from (repeatable)")
    p.add_argument("--model-cache-dir", type=Path, help="local cache for models materialised from the asset store")
    p.add_argument("--model-cache-budget-gb", type=float, help="disk budget of the model cache (default 50)")
    p.add_argument("--max-upload-gb", type=float, help="largest model upload accepted (default 64)")
    p.add_argument("--import-workers", type=int, help="model imports running at once (default 2)")
    p.add_argument("--backend", help="backend kind of the local endpoint: local (default) or fake")
    p.add_argument("--devices", help="local devices: auto (default), cpu, or a list such as cuda:0,cuda:1")
    p.add_argument("--share-training-device", action=argparse.BooleanOptionalAction, default=None,
                   help="let one generation job run on a device beside its training (default: off)")
    p.add_argument("--endpoint-health-seconds", type=float,
                   help="how often endpoints' backends are health-checked (default 5; 0: never)")
    p.add_argument("--forwarded-allow-ips",
                   help="comma-separated proxy addresses (IPs, CIDRs or *) whose X-Forwarded-* headers are trusted")
    p.add_argument("--allowed-origins", help="comma-separated extra origins (scheme://host[:port]) browsers may use")
    p.add_argument("--max-body-mb", type=float, help="largest HTTP request body in MB (default 64)")
    p.add_argument("--max-job-pixels", type=int, help="width x height x batch size of one job (default 2048*2048*8)")
    p.add_argument("--user-quota-gb", type=float, help="disk each user may fill with results and models (default 50; "
                   "0: unlimited)")
    p.add_argument("--dataset-max-mb", type=float, help="largest dataset upload or zip, uncompressed (default 2048)")
    p.add_argument("--dataset-max-files", type=int, help="most files in one dataset upload or zip (default 10000)")
    p.add_argument("--ui-max-file-mb", type=float, help="largest file the web UI accepts (default 64)")
    p.add_argument("--annotators-dir", type=Path,
                   help="folder of ControlNet preprocessor weights, never downloaded (default <data-dir>/annotators)")
    p.add_argument("--controlnet-unit-count", type=int, help="ControlNet units in the generate tabs (default 3)")
    p.add_argument("--idle-unload-minutes", type=float,
                   help="release the backends' loaded models after this many idle minutes (default 30; 0: never)")
    p.add_argument("--idle-shutdown-minutes", type=float,
                   help="run --idle-shutdown-command after this many minutes with nothing queued or running "
                        "(default 0: never)")
    p.add_argument("--idle-shutdown-command",
                   help="the idle shutdown's command, shell-quoted or a JSON list, run without a shell "
                        "(default: systemctl poweroff)")
    return p


def settings_from_args(argv: list[str] | None = None) -> Settings:
    """Parse flags and build Settings; flags given on the command line win over ``STUDIO_*`` env vars."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["host"] = "0.0.0.0"
    for name in ("host", "port", "data_dir", "database_url", "store", "log_level", "models_dir", "import_roots",
                 "model_cache_dir", "model_cache_budget_gb", "max_upload_gb", "import_workers", "backend",
                 "devices", "share_training_device", "endpoint_health_seconds", "forwarded_allow_ips", "allowed_origins", "max_body_mb", "max_job_pixels",
                 "user_quota_gb", "ui_max_file_mb", "dataset_max_mb", "dataset_max_files",
                 "annotators_dir", "controlnet_unit_count", "idle_unload_minutes", "idle_shutdown_minutes",
                 "idle_shutdown_command"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)
