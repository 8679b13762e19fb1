"""Building the jobs subsystem from settings (called once by app.py, the composition root).

The ``local`` endpoint is written from configuration at every start: its backend kind (``local`` or,
for tests and demos, ``fake``), options and capabilities. Every other endpoint stored in the database
(added by an administrator: a worker, a SageMaker endpoint) is rebuilt by the ``Fleet`` from its row —
a new backend kind needs a ``register_backend`` line and nothing here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deploy.storage import BlobStore
from webapp.db import Database
from webapp.services.jobs.board import JobBoard
from webapp.services.jobs.cloud_inventory import SageMakerInventory
from webapp.services.jobs.endpoint_admin import EndpointAdmin
from webapp.services.jobs.endpoints import EndpointService
from webapp.services.jobs.fleet import LOCAL_ENDPOINT, Fleet
from webapp.services.jobs.leases import Instance
from webapp.services.jobs.observers import JobObserver
from webapp.services.jobs.queue import JobQueue
from webapp.services.jobs.quotas import JobQuotas
from webapp.services.jobs.requests import Registry, RequestResolver
from webapp.services.jobs.service import JobService
from webapp.services.quota import DiskQuota
from webapp.services.secrets import KEY_FILE, SecretBox

if TYPE_CHECKING:
    from deploy.model_files import ModelFiles
    from webapp.settings import Settings

__all__ = ["LOCAL_ENDPOINT", "Jobs", "backend_options", "build_jobs"]

log = logging.getLogger(__name__)


def backend_options(settings: Settings) -> dict[str, Any]:
    """The local endpoint's backend options: settings for the ``local`` kind, then ``backend_options``."""
    options: dict[str, Any] = {}
    if settings.backend == "local":
        options = {"devices": settings.devices, "skeleton_dirs": [str(d) for d in settings.skeleton_dirs],
                   "cache_gb": settings.pipeline_cache_gb, "preview_every": settings.preview_every,
                   "annotators_dir": str(settings.annotators_dir) if settings.annotators_dir else None,
                   "work_dir": str(settings.data_dir / "work"),
                   "share_training_device": settings.share_training_device}
    options.update(settings.backend_options)
    return options


def local_defaults(settings: Settings) -> dict[str, Any]:
    """Options every ``local``-kind endpoint gets unless its own say otherwise: this server's config skeletons,
    annotators, preview rate and scratch space for training jobs (the devices and cache are each endpoint's own)."""
    return {"skeleton_dirs": [str(d) for d in settings.skeleton_dirs], "preview_every": settings.preview_every,
            "annotators_dir": str(settings.annotators_dir) if settings.annotators_dir else None,
            "work_dir": str(settings.data_dir / "work")}


def sagemaker_defaults(settings: Settings) -> dict[str, Any]:
    """What SageMaker endpoints get from the server's settings unless their own options say otherwise."""
    values = {"image_uri": settings.sagemaker_image_uri, "role_arn": settings.sagemaker_role_arn,
              "region": settings.sagemaker_region}
    return {key: value for key, value in values.items() if value}


@dataclass(frozen=True)
class Jobs:
    """What ``build_jobs`` made: the service every job goes through, the fleet running its endpoints and the
    administrators' deploy/delete service."""

    service: JobService
    fleet: Fleet
    admin: EndpointAdmin
    inventory: SageMakerInventory


def build_jobs(*, settings: Settings, db: Database, store: BlobStore, registry: Registry,
               model_files: ModelFiles | None, quota: DiskQuota | None = None,
               observers: Sequence[JobObserver] = (), instance: Instance | None = None,
               quotas: JobQuotas | None = None) -> Jobs:
    """Queue, board, endpoints, the local endpoint's backend and dispatcher, the stored endpoints', and the
    service over them.

    ``observers`` hear of every job's changes (metrics, the idle watcher). Not started: call
    ``JobService.start()`` (restart recovery, then the dispatchers) once the app is built. ``instance`` is this
    process's (app.py shares it with the import tasks); by default the data dir's.
    """
    board = JobBoard()
    instance = instance or Instance.of_data_dir(settings.data_dir)
    log.info("studio instance %s (job leases of %.0f s)", instance.id, settings.job_lease_seconds)
    queue = JobQueue(db, max_queued_per_user=settings.max_queued_jobs_per_user,
                     max_attempts=settings.job_max_attempts, observers=observers, instance=instance,
                     lease_seconds=settings.job_lease_seconds)
    endpoints = EndpointService(db)
    service = JobService(db=db, store=store, queue=queue, board=board, endpoints=endpoints,
                         resolver=RequestResolver(registry, limits=settings.request_limits), quota=quota,
                         quotas=quotas)
    secrets = SecretBox(settings.data_dir / KEY_FILE)
    fleet = Fleet(db=db, service=service, endpoints=endpoints, queue=queue, store=store, board=board,
                  model_files=model_files, secrets=secrets,
                  kind_defaults={"local": local_defaults(settings), "sagemaker": sagemaker_defaults(settings)})
    admin = EndpointAdmin(endpoints=endpoints, fleet=fleet, jobs=service, queue=queue, secrets=secrets,
                          configured_backend=settings.backend)
    fleet.start_endpoint(LOCAL_ENDPOINT, settings.backend, backend_options(settings), is_default=True)
    fleet.restore()
    admin.resume()
    set_check = getattr(registry, "set_in_use_check", None)
    if callable(set_check):
        set_check(service.model_in_use)
    inventory = SageMakerInventory(endpoints=endpoints, region=settings.sagemaker_region,
                                   configured=bool(settings.sagemaker_role_arn or settings.sagemaker_image_uri))
    return Jobs(service=service, fleet=fleet, admin=admin, inventory=inventory)
