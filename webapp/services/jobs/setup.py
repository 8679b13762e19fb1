"""Building the jobs subsystem from settings (called once by app.py, the composition root).

The ``local`` endpoint is written from configuration at every start: its backend kind (``local`` or,
for tests and demos, ``fake``), options and capabilities. Every other endpoint stored in the database
(added by an administrator: a worker, a SageMaker endpoint) gets its backend from the registry by its
``kind`` and stored options, and a dispatcher like ``local`` — a new backend kind needs a
``register_backend`` line and nothing here. A backend that cannot be built leaves its endpoint
``Failed`` with the reason instead of stopping the server: the UI and the queue stay up and say why
jobs cannot run there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlmodel import select

from deploy.backends.base import BackendError
from deploy.backends.registry import BackendConfig, create_backend
from deploy.storage import BlobStore
from webapp.db import Database
from webapp.records import Endpoint, EndpointStatus
from webapp.services.jobs.board import JobBoard
from webapp.services.jobs.dispatcher import Dispatcher
from webapp.services.jobs.endpoints import EndpointService
from webapp.services.jobs.observers import JobObserver
from webapp.services.jobs.queue import JobQueue
from webapp.services.jobs.requests import Registry, RequestResolver
from webapp.services.jobs.service import JobService
from webapp.services.quota import DiskQuota

if TYPE_CHECKING:
    from deploy.model_files import ModelFiles
    from webapp.settings import Settings

log = logging.getLogger(__name__)

LOCAL_ENDPOINT = "local"


def backend_options(settings: Settings) -> dict[str, Any]:
    """The local endpoint's backend options: settings for the ``local`` kind, then ``backend_options``."""
    options: dict[str, Any] = {}
    if settings.backend == "local":
        options = {"devices": settings.devices, "skeleton_dirs": [str(d) for d in settings.skeleton_dirs],
                   "cache_gb": settings.pipeline_cache_gb, "preview_every": settings.preview_every,
                   "annotators_dir": str(settings.annotators_dir) if settings.annotators_dir else None}
    options.update(settings.backend_options)
    return options


def _stored_endpoints(db: Database) -> list[Endpoint]:
    """Endpoints other than ``local`` recorded by earlier runs (configuration lives in their rows)."""
    with db.read() as s:
        return list(s.exec(select(Endpoint).where(Endpoint.name != LOCAL_ENDPOINT).order_by(Endpoint.name)).all())


def build_job_service(*, settings: Settings, db: Database, store: BlobStore, registry: Registry,
                      model_files: ModelFiles | None, quota: DiskQuota | None = None,
                      observers: Sequence[JobObserver] = ()) -> JobService:
    """Queue, board, endpoints, the local endpoint's backend and dispatcher, and the service over them.

    ``observers`` hear of every job's changes (metrics, the idle watcher). Not started: call
    ``JobService.start()`` (restart recovery, then the dispatchers) once the app is built.
    """
    board = JobBoard()
    queue = JobQueue(db, max_queued_per_user=settings.max_queued_jobs_per_user,
                     max_attempts=settings.job_max_attempts, observers=observers)
    endpoints = EndpointService(db)
    service = JobService(db=db, store=store, queue=queue, board=board, endpoints=endpoints,
                         resolver=RequestResolver(registry, limits=settings.request_limits), quota=quota)

    def start_endpoint(config: BackendConfig, *, is_default: bool, keep: EndpointStatus | None = None) -> None:
        try:
            backend = create_backend(config)
        except (BackendError, ValueError, TypeError) as exc:
            log.error("the %s endpoint cannot run jobs: %s", config.name, exc)
            endpoints.ensure(name=config.name, kind=config.kind, remote=False, capabilities={},
                             config=config.options, is_default=is_default, status=EndpointStatus.FAILED,
                             error=str(exc))
            return
        caps = backend.capabilities()
        configured = backend.is_configured()
        status = (keep or EndpointStatus.IN_SERVICE) if configured else EndpointStatus.FAILED
        endpoints.ensure(
            name=config.name, kind=backend.kind, remote=caps.remote, capabilities=caps.to_dict(),
            config=config.options, is_default=is_default, status=status,
            error=None if configured else f"the {backend.kind} backend is not configured")
        if configured:
            service.attach(Dispatcher(endpoint=config.name, backend=backend, queue=queue, store=store, board=board))

    start_endpoint(BackendConfig(name=LOCAL_ENDPOINT, kind=settings.backend, options=backend_options(settings),
                                 model_files=model_files), is_default=True)
    for row in _stored_endpoints(db):
        try:
            options = json.loads(row.config_json or "{}")
        except ValueError:
            options = None
        if not isinstance(options, dict):
            endpoints.set_status(row.name, EndpointStatus.FAILED, "its stored configuration is not a JSON object")
            continue
        # An administrator's Stopped survives a restart; anything else is re-checked now.
        keep = EndpointStatus.STOPPED if row.status == EndpointStatus.STOPPED else None
        start_endpoint(BackendConfig(name=row.name, kind=row.kind, options=options, model_files=model_files),
                       is_default=row.is_default, keep=keep)
    set_check = getattr(registry, "set_in_use_check", None)
    if callable(set_check):
        set_check(service.model_in_use)
    return service
