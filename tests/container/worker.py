"""Serving-container helpers for tests: job specs for the fake backend, a worker in this process or in another.

``in_process_worker`` runs the worker's app on 127.0.0.1 in a thread (fast; the test can reach the host and
its backend); a real process (as a GPU box or SageMaker runs it) is ``tests.fixtures.worker_process.WorkerProcess``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from deploy.backends.messages import JobModels, JobSpec, ModelSpec
from deploy.model_files import ModelFileRef
from pipelines.types import GenerationRequest
from tests.live import serve

ROOT = Path(__file__).resolve().parents[2]
SECRET = "worker-test-secret-0123456789"
SHA = "ab" * 32


def fake_spec(job_id: str = "job-1", **request: Any) -> JobSpec:
    """A job the fake backend runs (it loads no model file, so the ref need not exist)."""
    ref = ModelFileRef(sha256=SHA, store_key="models/checkpoint/tiny.safetensors", local_path=None, size=10)
    models = JobModels(checkpoint=ModelSpec(kind="checkpoint", name="tiny", sha256=SHA, file=ref))
    body = {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "seed": 7, **request}
    return JobSpec(job_id=job_id, mode="txt2img", request=GenerationRequest(**body), models=models)


def auth(secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def read_stream(client: httpx.Client, job_id: str, after: int = 0, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Every line of a job's event stream until the worker ends it (heartbeats included)."""
    lines: list[dict[str, Any]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", params={"after": after}, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        for line in response.iter_lines():
            if line.strip():
                lines.append(json.loads(line))
    return lines


def events_of(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line["event"] for line in lines if "event" in line]


@dataclass
class InProcessWorker:
    url: str
    host: Any
    backend: Any

    def client(self, secret: str | None = SECRET) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=auth(secret) if secret else {}, timeout=30)


@contextmanager
def in_process_worker(*, secret: str | None = SECRET, heartbeat: float = 0.2, max_waiting: int = 4,
                      store: Any = None, buffer_ttl: float = 900.0, max_body_bytes: int = 64 * 1024**2,
                      **fake_options: Any) -> Iterator[InProcessWorker]:
    """The worker app over a started FakeBackend (``fake_options``: slots, step_delay ...) on 127.0.0.1."""
    import hashlib

    from deploy.backends.fake import FakeBackend
    from deploy.container.host import WorkerHost
    from deploy.container.server import create_app

    backend = FakeBackend("worker", **fake_options)
    host = WorkerHost(backend, max_waiting=max_waiting, buffer_ttl=buffer_ttl)
    host.start()
    digest = hashlib.sha256(secret.encode()).digest() if secret else None
    app = create_app(host, secret_digest=digest, heartbeat=heartbeat, store=store, progress_interval=0.0,
                     max_body_bytes=max_body_bytes)
    try:
        with serve(app) as url:
            yield InProcessWorker(url=url, host=host, backend=backend)
    finally:
        host.stop(timeout=5)


