"""Build the worker from its settings and serve it until SIGTERM/SIGINT.

One composition root for the container: the asset store and the model file cache (``ModelFiles`` over
``--store`` with its LRU disk budget), the backend (``LocalBackend`` on this machine's devices, or the fake
for tests), the ``WorkerHost`` around it and the HTTP app, served by uvicorn. A stop signal first stops the
host — waiting and running jobs end ``Failed(kind="interrupted")`` and their streams deliver that — while
uvicorn closes the listening socket and waits for the open responses, so the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import uvicorn

from deploy.backends.base import Backend
from deploy.backends.registry import BackendConfig
from deploy.container.config import WorkerSettings, secret_digest
from deploy.container.host import WorkerHost
from deploy.storage import BlobStore, MemoryStore, open_store

log = logging.getLogger(__name__)


def build_store(settings: WorkerSettings) -> BlobStore | None:
    return open_store(settings.store) if settings.store else None


def build_backend(settings: WorkerSettings, store: BlobStore | None) -> Backend:
    """The backend kind the settings name, with the flags as its options (``--backend-options`` on top)."""
    from deploy.backends.options import parse_options, plain_options

    if settings.backend == "fake":
        from deploy.backends.fake import create as create_fake

        return create_fake(BackendConfig(name="worker", kind="fake", options=settings.backend_options))
    from deploy.backends.local import LocalBackend, training_command
    from deploy.model_files import ModelFiles

    if store is None:
        log.warning("no --store: only models the control plane registered at paths this machine sees can run")
        store = MemoryStore()  # empty: a ref without a readable local_path fails naming the model file
    files = ModelFiles(store, settings.cache_dir, int(settings.cache_gb * 1024**3))
    raw: dict[str, Any] = {"devices": settings.devices, "skeleton_dirs": [str(d) for d in settings.skeleton_dirs],
                           "cache_gb": settings.pipeline_cache_gb, "preview_every": settings.preview_every,
                           "dtype": settings.dtype,
                           "annotators_dir": str(settings.annotators_dir) if settings.annotators_dir else None}
    options = plain_options(parse_options("local", {**raw, **settings.backend_options}))
    return LocalBackend("worker", model_files=files, training_command=training_command(), **options)


def build(settings: WorkerSettings) -> tuple[WorkerHost, Any]:
    """The started host and its ASGI app."""
    from deploy.container.server import create_app

    digest = secret_digest(settings)
    if digest is None and not settings.loopback:
        log.warning("no shared secret (STUDIO_WORKER_SECRET or --secret-file): anyone who reaches %s:%d can run "
                    "jobs; fine behind SageMaker's private network, not on an open one", settings.host, settings.port)
    store = build_store(settings)
    backend = build_backend(settings, store)
    if "cpu" in backend.capabilities().devices:
        from deploy.runner import start_cpu_threads

        start_cpu_threads()  # here, on the main thread: see its docstring (jobs on the CPU ran 50x slower)
    host = WorkerHost(backend, max_waiting=settings.max_waiting, buffer_ttl=settings.buffer_ttl_seconds)
    host.start()
    app = create_app(host, secret_digest=digest, heartbeat=settings.heartbeat_seconds, store=store,
                     progress_interval=settings.progress_interval_seconds,
                     max_body_bytes=int(settings.max_body_mb * 1024**2))
    return host, app


def serve(settings: WorkerSettings) -> None:
    """Run until a stop signal; returns once the jobs ended and the server closed."""
    host, app = build(settings)
    caps = host.backend.capabilities()
    log.info("worker ready: %s backend, %d slot(s) on %s", host.backend.kind, caps.slots,
             ", ".join(caps.devices) or "-")
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.stop_timeout_seconds) + 5, lifespan="off")
    server = _Server(config, host, settings.stop_timeout_seconds)
    try:
        server.run()
    finally:
        server.stop_host()


class _Server(uvicorn.Server):
    """uvicorn's server, stopping the host first on a signal and exiting 0 afterwards (not re-raising it)."""

    def __init__(self, config: Any, host: WorkerHost, stop_timeout: float) -> None:
        super().__init__(config)
        self.host = host
        self.stop_timeout = stop_timeout
        self._stopper: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        log.info("signal %d: stopping (running jobs end interrupted)", sig)
        self.stop_host(wait=False)
        self.should_exit = True

    def stop_host(self, wait: bool = True) -> None:
        if self._stopper is None:
            self._stopper = threading.Thread(target=self.host.stop, args=(self.stop_timeout,), name="worker-stop")
            self._stopper.start()
        if wait:
            self._stopper.join()

