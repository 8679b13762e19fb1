"""Fixtures for the backend contract suite: every backend kind, started, with a sink and jobs it can run.

``backend_case`` is parametrised over ``fake``, ``local`` (tiny SD1.5 on the CPU), ``http-fake`` (the real
serving container process on 127.0.0.1 with the fake inside) and ``http-local`` (the container with the
local backend, reading models from the same asset-store directory). Worker processes are shared by a
module and left idle between tests; each test gets a fresh, started backend and stops it afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deploy.backends.base import Backend
from deploy.backends.fake import FakeBackend
from deploy.backends.messages import JobModels, JobSpec
from tests.backends.events import Sink
from tests.container.worker import fake_spec
from tests.fixtures.tiny_store import TinyStore, local_backend, worker_args
from tests.fixtures.tiny_store import tiny_store as build_tiny_store
from tests.fixtures.worker_process import WorkerProcess

CASES = ["fake", "local", "http-fake", "http-local"]
FAIL_PROMPTS = {"oom": "OOM-PLEASE", "internal": "CRASH-PLEASE", "bad_request": "BAD-PLEASE"}
FAKE_OPTIONS = {"slots": 1, "step_delay": 0.03, "preview_every": 1, "fail_prompts": FAIL_PROMPTS}


@dataclass(frozen=True)
class Failure:
    """A job that must fail: the request changes (or the models) and the failure kind it must report."""

    label: str
    kind: str
    request: dict[str, Any] = field(default_factory=dict)
    missing_checkpoint: bool = False


@dataclass
class BackendCase:
    kind: str
    backend: Backend
    sink: Sink
    models: JobModels
    remote: bool
    failures: tuple[Failure, ...]
    long_steps: int
    """Steps that take long enough (seconds) to cancel, skip or stop a job mid-way."""

    def spec(self, job_id: str, *, missing_checkpoint: bool = False, **request: Any) -> JobSpec:
        models = self.models
        if missing_checkpoint:
            gone = dataclasses.replace(models.checkpoint.file, sha256="0" * 64, store_key="models/checkpoint/gone",
                                       local_path=None)
            models = dataclasses.replace(models, checkpoint=dataclasses.replace(
                models.checkpoint, sha256="0" * 64, file=gone))
        spec = fake_spec(job_id, **{"steps": 3, "seed": 1, "sampler_name": "Euler", **request})
        return dataclasses.replace(spec, models=models)


FAKE_FAILURES = tuple(Failure(kind, kind, {"prompt": f"a cat {text}"}) for kind, text in FAIL_PROMPTS.items())
LOCAL_FAILURES = (Failure("bad sampler", "bad_request", {"sampler_name": "NoSuchSampler"}),
                  Failure("model file gone", "internal", missing_checkpoint=True))


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> TinyStore:
    return build_tiny_store(tmp_path_factory.mktemp("backend-store"))


@pytest.fixture(scope="module")
def worker_processes(tmp_path_factory: pytest.TempPathFactory, tiny_store: TinyStore) -> Iterator[
        Callable[[str], WorkerProcess]]:
    """``get(kind)``: the module's worker process with that backend inside, started on first use."""
    running: dict[str, WorkerProcess] = {}

    def get(kind: str) -> WorkerProcess:
        if kind not in running:
            workdir = tmp_path_factory.mktemp(f"worker-{kind}")
            if kind == "fake":
                worker = WorkerProcess(workdir, backend="fake", backend_options=FAKE_OPTIONS)
            else:
                worker = WorkerProcess(workdir, backend="local", extra_args=worker_args(tiny_store))
            running[kind] = worker.start()
        return running[kind]

    yield get
    for worker in running.values():
        worker.stop(10)


def wait_healthy(backend: Backend, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not backend.health()[0]:
        if time.monotonic() > deadline:
            raise AssertionError(f"{backend.name} did not become healthy: {backend.health()[1]}")
        time.sleep(0.02)


@pytest.fixture(params=CASES)
def backend_case(request: pytest.FixtureRequest, tiny_store: TinyStore, tmp_path: Path) -> Iterator[BackendCase]:
    from deploy.backends.http import HttpWorkerBackend

    kind = request.param
    inside = kind.removeprefix("http-")
    worker = None
    if kind == "fake":
        backend: Backend = FakeBackend("fake", **FAKE_OPTIONS)
    elif kind == "local":
        backend = local_backend("local", tiny_store, tmp_path / "cache")
    else:
        worker = request.getfixturevalue("worker_processes")(inside)
        worker.wait_idle()
        backend = HttpWorkerBackend(kind, url=worker.url, secret=worker.secret, slots=1, poll_seconds=0.5)
    sink = Sink()
    backend.start(sink)
    wait_healthy(backend)
    case = BackendCase(kind=kind, backend=backend, sink=sink, models=tiny_store.models,
                       remote=kind.startswith("http"), failures=FAKE_FAILURES if inside == "fake" else LOCAL_FAILURES,
                       long_steps=150)
    try:
        yield case
    finally:
        backend.stop()
