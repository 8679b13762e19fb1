"""Backends by kind: configuration names a kind, the registry builds it.

Built-in kinds are registered lazily (their modules are imported only when a backend of that kind is
created) so importing the registry stays cheap. A new backend — the HTTP worker, SageMaker — adds
one ``register_backend`` line and nothing else changes.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deploy.backends.base import Backend, BackendError

if TYPE_CHECKING:
    from deploy.model_files import ModelFiles
    from deploy.storage import BlobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendConfig:
    """Everything needed to build one endpoint's backend.

    ``options`` are the kind's own settings (devices, URLs, delays ...); ``model_files`` is the
    materialiser for backends that run models on this machine. A cloud backend also gets the studio's asset
    ``store``, the endpoint row's instance bounds, and ``provision`` (an administrator deploys it now: create the
    cloud resources; a restart only watches them).
    """

    name: str
    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)
    model_files: ModelFiles | None = None
    store: BlobStore | None = None
    min_instances: int = 1
    max_instances: int = 1
    autoscale: bool = False
    provision: bool = False


BackendFactory = Callable[[BackendConfig], Backend]

_FACTORIES: dict[str, BackendFactory | str] = {
    # kind -> factory, or "module:attribute" imported on first use
    "local": "deploy.backends.local:create",
    "fake": "deploy.backends.fake:create",
    "http": "deploy.backends.http:create",
    "sagemaker": "deploy.backends.sagemaker:create",
}


def register_backend(kind: str, factory: BackendFactory | str, *, replace: bool = False) -> None:
    """Make ``kind`` available; ``factory`` may be a callable or a lazy ``"module:attribute"`` path."""
    if kind in _FACTORIES and not replace:
        raise BackendError(f"a backend kind {kind!r} is already registered")
    _FACTORIES[kind] = factory


def backend_kinds() -> list[str]:
    return sorted(_FACTORIES)


def _factory(kind: str) -> BackendFactory:
    entry = _FACTORIES.get(kind)
    if entry is None:
        raise BackendError(f"unknown backend kind {kind!r}; available: {', '.join(backend_kinds())}")
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        entry = getattr(importlib.import_module(module), attribute)
        _FACTORIES[kind] = entry
    return entry


def create_backend(config: BackendConfig) -> Backend:
    """Build the backend ``config.kind`` names (not started yet)."""
    backend = _factory(config.kind)(config)
    log.info("backend %r of kind %s created", config.name, config.kind)
    return backend
