"""Fixtures for trainings: one fake-backend studio per module with the tiny models registered, users with
datasets, and a ``trainers`` endpoint whose scripted backend does what a training runner does to the store
and the job (epoch LoRAs, state, samples, metrics) without training anything.

The trainers' dispatcher starts held, so a created training stays queued until a test lets it run.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy.backends.base import Capabilities
from deploy.backends.messages import Cancelled, Event, JobSpec, Progress, Succeeded
from deploy.backends.workers import ThreadedBackend, Worker
from deploy.jobkinds import GENERATE, TRAIN_LORA
from tests.conftest import ADMIN_PASSWORD, login
from tests.datasets.conftest import png
from tests.fixtures.studio_models import ModelStudio, build_model_studio, tiny_model_files  # noqa: F401
from tests.jobs.conftest import USER_PASSWORD, add_user, empty_queue
from webapp.records import EndpointStatus

ENDPOINT = "trainers"


@dataclass(frozen=True)
class LoraFiles:
    epoch: Path
    final: Path
    epoch2: Path
    """What a resumed training saves after epoch 1."""


_LORAS: list[LoraFiles] = []


def lora_files() -> LoraFiles:
    """Three different kohya LoRAs of the tiny SD1.5 (two epochs' and the final), written once per process."""
    if not _LORAS:
        from tests.tiny import networks
        from tests.tiny.fixtures import tiny_files

        tf = tiny_files()
        pipe = tf.pipeline("sd15")
        root = tf.root / "training-loras"
        root.mkdir(parents=True, exist_ok=True)
        _LORAS.append(LoraFiles(
            epoch=networks.write_kohya_lora(root / "epoch.safetensors", pipe, rank=4, alpha=4.0, seed=21),
            final=networks.write_kohya_lora(root / "final.safetensors", pipe, rank=4, alpha=4.0, seed=22),
            epoch2=networks.write_kohya_lora(root / "epoch2.safetensors", pipe, rank=4, alpha=4.0, seed=23)))
    return _LORAS[0]


class ScriptedTrainer(ThreadedBackend):
    """Runs ``train_lora`` specs as the training runner looks from outside: epoch 1 saved (LoRA, state, a
    sample), metrics per step, then the final LoRA — or, with ``hold``, it waits after epoch 1 until cancelled.
    A job that finds a saved state (a resume) goes on after epoch 1 as the runner does: it reports the files
    already under its ``jobs/<id>/lora/`` and ``samples/``, saves epoch 2 (LoRA and sample), then the final.
    ``state_at_start`` records the state each job found in the store when it started (a resume's); a job that
    succeeds deletes its state, as the runner does."""

    kind = "scripted-trainer"

    def __init__(self, store: Any) -> None:
        super().__init__(ENDPOINT)
        self.store = store
        self.hold = False
        self.specs: list[JobSpec] = []
        self.state_at_start: dict[str, bytes | None] = {}
        self.saved = threading.Event()

    def is_configured(self) -> bool:
        return True

    def capabilities(self) -> Capabilities:
        return Capabilities(slots=1, devices=("cpu",), kinds=(GENERATE, TRAIN_LORA))

    def worker_labels(self) -> list[str]:
        return ["w0"]

    def _put(self, key: str, data: bytes) -> str:
        self.store.put(key, io.BytesIO(data))
        return key

    def run_job(self, worker: Worker, spec: JobSpec) -> Event:
        self.specs.append(spec)
        prefix, name = f"jobs/{spec.job_id}", spec.payload["output_name"]
        state_key = f"{prefix}/state/state.pt"
        self.state_at_start[spec.job_id] = self.store.open(state_key).read() if self.store.exists(state_key) else None
        files = lora_files()
        if self.state_at_start[spec.job_id] is None:
            made = (self._put(f"{prefix}/lora/{name}-000001.safetensors", files.epoch.read_bytes()),
                    self._put(f"{prefix}/samples/{name}-e000001-00.png", png(32, 32)))
            self._put(state_key, b"state after epoch 1")
        else:  # resumed after epoch 1: what is there already is this job's too
            made = tuple(blob.key for folder in ("lora", "samples") for blob in self.store.list(f"{prefix}/{folder}/"))
        for step, loss in enumerate((0.9, 0.5), start=1):
            self.emit(Progress(job_id=spec.job_id, step=step, total=4, metrics={"loss": loss, "lr": 1e-4, "epoch": 1},
                               log=(f"step {step} loss {loss}",), artifact_keys=made))
        self.saved.set()
        if self.hold:
            while not self.is_cancelled(spec.job_id):
                threading.Event().wait(0.01)
            return Cancelled(job_id=spec.job_id, artifact_keys=made)
        if self.state_at_start[spec.job_id] is not None:
            made += (self._put(f"{prefix}/lora/{name}-000002.safetensors", files.epoch2.read_bytes()),
                     self._put(f"{prefix}/samples/{name}-e000002-00.png", png(32, 32, (0, 0, 200))))
        final = self._put(f"{prefix}/lora/{name}.safetensors", files.final.read_bytes())
        self.store.delete(state_key)  # as the runner: no use once the final LoRA is stored
        return Succeeded(job_id=spec.job_id, artifact_keys=(*made, final),
                         info={"lora": final, "epochs": 2, "steps": 4})


@dataclass
class TrainingStudio:
    built: ModelStudio
    trainer: ScriptedTrainer
    dispatcher: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.built, name)


@pytest.fixture(scope="module")
def shared_training_studio(tmp_path_factory, tiny_model_files) -> Iterator[TrainingStudio]:  # noqa: F811
    from webapp.services.jobs.dispatcher import Dispatcher
    from webapp.settings import Settings

    data_dir = tmp_path_factory.mktemp("training-studio") / "data"

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=data_dir, admin_password=ADMIN_PASSWORD, **overrides)

    lora_files()
    with build_model_studio(make, tiny_model_files, backend="fake", max_queued_jobs_per_user=50) as built:
        trainer = ScriptedTrainer(built.store)
        built.jobs.endpoints.ensure(name=ENDPOINT, kind="scripted", remote=False,
                                    capabilities=trainer.capabilities().to_dict(), config={}, is_default=False,
                                    status=EndpointStatus.IN_SERVICE)
        dispatcher = Dispatcher(endpoint=ENDPOINT, backend=trainer, queue=built.jobs.queue, store=built.store,
                                board=built.jobs.board)
        dispatcher.hold()
        built.jobs.attach(dispatcher)
        try:
            yield TrainingStudio(built=built, trainer=trainer, dispatcher=dispatcher)
        finally:
            built.jobs.detach(ENDPOINT)
            dispatcher.stop()


@pytest.fixture
def tstudio(shared_training_studio) -> Iterator[TrainingStudio]:
    """The module's studio; after the test its trainers are held again, and every job and trained LoRA is gone."""
    yield shared_training_studio
    shared_training_studio.dispatcher.hold()
    shared_training_studio.trainer.hold = False
    empty_queue(shared_training_studio)
    registry, admin = shared_training_studio.registry, shared_training_studio.admin
    shared_training_studio.training_registrar.wait(20)
    for model in registry.list_models(actor=admin, type="lora"):
        if model.source == "training":  # the scripted LoRAs' bytes are the same in every test
            registry.delete(actor=admin, model_id=model.id)


def user(studio: Any, name: str) -> Any:
    return add_user(studio, name)


def dataset_of(studio: Any, owner: Any, name: str = "cats", *, visibility: str = "private") -> Any:
    """A one-image dataset of ``owner``'s (made once per name)."""
    for found in studio.datasets.list_datasets(actor=owner):
        if found.name == name and found.owner_id == owner.id:
            return found
    return studio.datasets.create(actor=owner, name=name, files=[("a.png", png(64, 64)), ("a.txt", b"a cat")],
                                  visibility=visibility).dataset


def job_count(studio: Any) -> int:
    admin = studio.users.get_by_name("admin")
    return studio.jobs.list_jobs(actor=admin, all_users=True, limit=None)[1]


def http_as(studio: Any, name: str) -> Any:
    from fastapi.testclient import TestClient

    client = TestClient(studio.app, follow_redirects=False)
    login(client, name, ADMIN_PASSWORD if name == "admin" else USER_PASSWORD)
    return client
