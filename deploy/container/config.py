"""The worker's typed settings: flags of ``serve`` and ``STUDIO_WORKER_*`` environment variables.

Flags win over the environment, the environment over the defaults (pydantic-settings, as the app's own
settings). The shared secret is read from ``STUDIO_WORKER_SECRET`` or ``--secret-file`` — never a flag, so
it never shows in ``ps`` — and the process keeps only its sha256 (``secret_digest``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIN_SECRET_CHARS = 16
"""The control plane refuses shorter secrets (``HttpWorkerOptions``); so does the worker."""


class WorkerSettingsError(ValueError):
    """The worker cannot start with these settings; ``field`` names the flag or variable."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class WorkerSettings(BaseSettings):
    """Everything ``serve`` needs; see ``python -m deploy.container serve --help``."""

    model_config = SettingsConfigDict(env_prefix="STUDIO_WORKER_", extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    """0: any free port (tests read the bound port from the log line)."""
    backend: Literal["local", "fake"] = "local"
    backend_options: dict[str, Any] = Field(default_factory=dict)
    """Extra options of the backend kind (JSON), validated by ``deploy.backends.options`` (the fake's
    ``step_delay``, ``slots`` ...)."""
    store: str | None = None
    """The asset store model files come from: a directory or ``s3://bucket/prefix``."""
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "studio-worker" / "models")
    cache_gb: float = Field(50.0, gt=0)
    """Disk budget of the model file cache (least recently used files go first; pinned ones never)."""
    devices: str = "auto"
    skeleton_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    annotators_dir: Path | None = None
    pipeline_cache_gb: float | None = Field(None, gt=0)
    preview_every: int = Field(5, ge=0)
    dtype: str | None = None
    secret: SecretStr | None = None
    secret_file: Path | None = None
    max_waiting: int = Field(4, ge=0, le=128)
    """``/invocations`` requests that may wait for a slot; more get 503 ``busy`` (each waits on a thread of the
    server's wait pool, ``server.WAIT_THREADS``)."""
    max_body_mb: float = Field(64.0, gt=0)
    """Largest job spec (init images travel inside it, base64) accepted by ``/invocations`` and ``/v1/jobs``."""
    heartbeat_seconds: float = Field(2.0, gt=0, le=60)
    buffer_ttl_seconds: float = Field(900.0, gt=0)
    """Finished jobs' events are dropped this long after the end unless the client DELETEs them first."""
    progress_interval_seconds: float = Field(1.0, ge=0)
    """At most one progress object per this interval for async invocations (``progress=<key>``)."""
    stop_timeout_seconds: float = Field(20.0, gt=0)
    """SIGTERM: how long running jobs get to end (SageMaker kills the container 30 s after SIGTERM)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("skeleton_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        """The variable holds a ``:``-separated list, as ``PATH`` does."""
        return [part for part in value.split(":") if part.strip()] if isinstance(value, str) else value

    @field_validator("backend_options", mode="before")
    @classmethod
    def _options_json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        from deploy.backends.local import parse_devices

        parse_devices(value)  # raises naming the bad entry
        return value

    @property
    def loopback(self) -> bool:
        """True when only this machine can reach the server."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def secret_digest(settings: WorkerSettings) -> bytes | None:
    """sha256 of the shared secret (from the file or the variable), or None when auth is off."""
    if settings.secret is not None and settings.secret_file is not None:
        raise WorkerSettingsError("give the secret either in STUDIO_WORKER_SECRET or in --secret-file, not both",
                                  field="secret_file")
    if settings.secret_file is not None:
        try:
            text = settings.secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise WorkerSettingsError(f"cannot read the secret file {settings.secret_file}: {exc.strerror}",
                                      field="secret_file") from None
        field = "secret_file"
    elif settings.secret is not None:
        text, field = settings.secret.get_secret_value(), "secret"
    else:
        return None
    if len(text) < MIN_SECRET_CHARS:
        raise WorkerSettingsError(f"the shared secret must be at least {MIN_SECRET_CHARS} characters", field=field)
    return hashlib.sha256(text.encode("utf-8")).digest()
