"""Build the model services once (called from app.py, the composition root), recover, and tear down.

Start-up order matters: tasks interrupted by the last stop are failed (and cleaned up) first, then
uploads drop stale sessions and orphaned ``Initial`` rows, then queued tasks resume, and finally the
models dir's new files are listed (names only) and rescanned — hashing in the background, so the server
answers at once, listing every model, even when a new folder holds hundreds of gigabytes to hash.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from deploy.storage import BlobStore
from webapp.db import Database
from webapp.records import ImportTask, TaskKind, User
from webapp.services.jobs.leases import Instance
from webapp.services.models.importer import Importer
from webapp.services.models.registry import ModelRegistry
from webapp.services.models.scan import ModelsDirScanner
from webapp.services.models.server_import import ServerImports
from webapp.services.models.tasks import ImportTasks, TaskContext
from webapp.services.models.uploads import Uploads
from webapp.services.models.url_import import UrlImports
from webapp.services.quota import DiskQuota
from webapp.settings import Settings

log = logging.getLogger(__name__)

GB = 1024**3


@dataclass
class ModelServices:
    registry: ModelRegistry
    tasks: ImportTasks
    server: ServerImports
    urls: UrlImports
    uploads: Uploads

    def start_scan(self, actor: User | None = None) -> ImportTask | None:
        """List the models dir's new files now, hash them in the background (start-up); None without one.

        Listing is a directory walk, done before the server answers, so a client connecting right after
        start sees every model (without a hash yet) rather than empty lists while hashing runs.
        """
        if self.registry.scanner.models_dir is None:
            return None
        self.registry.scanner.register_names()
        folder = str(self.registry.scanner.models_dir)
        return self.tasks.submit(kind=TaskKind.SCAN, owner=actor, params={"folder": folder},
                                 items=[{"source": folder}])

    def close(self) -> None:
        self.tasks.close()


def _scan_handler(registry: ModelRegistry):  # noqa: ANN202 - a task handler
    def run(ctx: TaskContext) -> None:
        ctx.update(0, state="scanning")
        summary = registry.rescan_models_dir()
        ctx.update(0, state="done", message=summary.line, summary=summary.to_dict())
    return run


def build_model_services(settings: Settings, db: Database, store: BlobStore,
                         quota: DiskQuota | None = None, *, instance: Instance) -> ModelServices:
    """``instance`` is the one the job queue leases with: import tasks belong to its home (``tasks.py``)."""
    assert settings.model_cache_dir is not None  # filled by Settings
    temp_root = settings.data_dir / "tmp" / "imports"
    temp_root.mkdir(parents=True, exist_ok=True)
    max_bytes = int(settings.max_upload_gb * GB)
    importer = Importer(db, store, temp_root, quota)
    scan_roots = [*settings.import_roots, *settings.install_folders()]
    scanner = ModelsDirScanner(db, importer, settings.models_dir, scan_roots)  # the install is always readable
    registry = ModelRegistry(db, store, importer, scanner, refresh_interval=settings.refresh_min_interval_seconds)
    tasks = ImportTasks(db, importer, temp_root, settings.import_workers, instance=instance)
    tasks.register(TaskKind.SCAN, _scan_handler(registry))
    services = ModelServices(
        registry=registry, tasks=tasks,
        server=ServerImports(importer, tasks, settings.import_roots),
        urls=UrlImports(importer, tasks, allow=settings.url_import_allow, max_bytes=max_bytes,
                        civitai_token=settings.civitai_token, hf_token=settings.hf_token),
        uploads=Uploads(db, importer, tasks, settings.data_dir / "uploads", max_bytes, quota),
    )
    tasks.recover()
    services.uploads.cleanup()
    tasks.resume()
    services.start_scan()
    return services
