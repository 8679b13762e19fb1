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
from deploy.backends.messages import JobModels, JobSpec, ModelSpec
from deploy.model_files import ModelFileRef
from tests.backends.events import Sink
from tests.container.worker import fake_spec
from tests.fixtures.studio_models import TinyModelFiles, tiny_model_file_set
from tests.fixtures.worker_process import WorkerProcess

CASES = ["fake", "local", "http-fake", "http-local"]
FAIL_PROMPTS = {"oom": "OOM-PLEASE", "internal": "CRASH-PLEASE", "bad_request": "BAD-PLEASE"}
FAKE_OPTIONS = {"slots": 1, "step_delay": 0.01, "preview_every": 1, "fail_prompts": FAIL_PROMPTS}
CHECKPOINT_KEY = "models/checkpoint/tiny-sd15.safetensors"
LORA_KEY = "models/lora/tinylora.safetensors"


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


@dataclass(frozen=True)
class TinyStore:
    """The tiny checkpoint and LoRA in an asset-store directory, as the studio stores uploads."""

    root: Path
    models: JobModels
    files: TinyModelFiles


def _model(kind: str, name: str, path: Path, key: str, **extra: Any) -> ModelSpec:
    from pipelines.hashes import sha256_file

    sha = sha256_file(path)
    ref = ModelFileRef(sha256=sha, store_key=key, local_path=None, size=path.stat().st_size)
    return ModelSpec(kind=kind, name=name, sha256=sha, file=ref, **extra)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> TinyStore:
    from deploy.storage import LocalStore
    from pipelines.hashes import lora_hash

    files = tiny_model_file_set()
    root = tmp_path_factory.mktemp("backend-store")
    store = LocalStore(root)
    store.put_file(CHECKPOINT_KEY, files.checkpoint)
    store.put_file(LORA_KEY, files.lora)
    models = JobModels(checkpoint=_model("checkpoint", "tiny-sd15", files.checkpoint, CHECKPOINT_KEY),
                       loras={"tinylora": _model("lora", "tinylora", files.lora, LORA_KEY,
                                                 lora_hash=lora_hash(files.lora))})
    return TinyStore(root, models, files)


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
                worker = WorkerProcess(workdir, backend="local", store=tiny_store.root, extra_args=(
                    "--devices", "cpu", "--preview-every", "1", "--pipeline-cache-gb", "1",
                    "--skeleton-dirs", str(tiny_store.files.skeleton_root)))
            running[kind] = worker.start()
        return running[kind]

    yield get
    for worker in running.values():
        worker.stop(10)


def local_backend(name: str, tiny: TinyStore, cache_dir: Path) -> Backend:
    from deploy.backends.local import LocalBackend
    from deploy.model_files import ModelFiles
    from deploy.storage import LocalStore

    files = ModelFiles(LocalStore(tiny.root), cache_dir, 1 << 30)
    return LocalBackend(name, model_files=files, devices="cpu", skeleton_dirs=[tiny.files.skeleton_root],
                        preview_every=1, cache_gb=1.0)


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
                       long_steps=400 if inside == "fake" else 150)
    try:
        yield case
    finally:
        backend.stop()
