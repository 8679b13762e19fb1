"""Generation beside a training on one device (``share_training_device``): off, a generation job waits for the
device a training holds; on, one generation job runs there while the training runs, a second training never
starts beside the first, and cancel and stop reach both. A scripted backend stands in for the devices: each job
runs until the test releases it (or cancels it), so every assertion is about order, never about time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from deploy.backends.base import STOPPED_MESSAGE, BackendBusy, Capabilities
from deploy.backends.messages import (
    Cancelled,
    Event,
    Failed,
    JobModels,
    JobSpec,
    ModelSpec,
    Started,
    Succeeded,
)
from deploy.backends.workers import ThreadedBackend, Worker
from deploy.jobkinds import GENERATE, TRAIN_LORA
from deploy.model_files import ModelFileRef
from tests.backends.events import Sink
from tests.container.worker import fake_spec
from tests.jobs.conftest import add_user, extra_endpoint, txt2img
from webapp.records import JobStatus

SHA = "cd" * 32
WAIT = 20.0


def training_spec(job_id: str) -> JobSpec:
    ref = ModelFileRef(sha256=SHA, store_key="models/base.safetensors", local_path=None, size=10)
    models = JobModels(checkpoint=ModelSpec(kind="checkpoint", name="base", sha256=SHA, file=ref))
    return JobSpec(job_id=job_id, mode="train", request=None, models=models, kind=TRAIN_LORA, payload={})


class DeviceBackend(ThreadedBackend):
    """Devices that run each job until ``release(job_id)`` (or a cancel, or stop); generation jobs end at once
    unless ``hold_generation``. ``timeline`` records ("start" | "end", job id, "main" | "guest") in order."""

    kind = "scripted-device"

    def __init__(self, name: str, *, share: bool, devices: tuple[str, ...] = ("gpu0",)) -> None:
        super().__init__(name, share_training_device=share)
        self.devices = devices
        self.hold_generation = False
        self.timeline: list[tuple[str, str, str]] = []
        self._gates: dict[str, threading.Event] = {}
        self._gates_lock = threading.Lock()

    def is_configured(self) -> bool:
        return True

    def capabilities(self) -> Capabilities:
        return Capabilities(slots=len(self.devices), devices=self.devices, kinds=(GENERATE, TRAIN_LORA))

    def worker_labels(self) -> list[str]:
        return list(self.devices)

    def gate(self, job_id: str) -> threading.Event:
        with self._gates_lock:
            return self._gates.setdefault(job_id, threading.Event())

    def release(self, job_id: str) -> None:
        self.gate(job_id).set()

    def run_job(self, worker: Worker, spec: JobSpec) -> Event:
        role = "guest" if worker.guest else "main"
        self.timeline.append(("start", spec.job_id, role))
        self.emit(Started(job_id=spec.job_id, worker=f"{self.name}/{worker.label}"))
        gate = self.gate(spec.job_id)
        if spec.kind == GENERATE and not self.hold_generation:
            gate.set()
        try:
            while not gate.wait(0.01):
                if self.is_cancelled(spec.job_id):
                    if self.stopping:
                        return self.stopped_event(spec.job_id)
                    return Cancelled(job_id=spec.job_id, reason="cancelled while running")
            return Succeeded(job_id=spec.job_id)
        finally:
            self.timeline.append(("end", spec.job_id, role))

    def started(self, job_id: str) -> list[str]:
        return [role for what, job, role in self.timeline if what == "start" and job == job_id]


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def devices(sink: Sink) -> Iterator[Any]:
    """``devices(share=..., devices=(...))``: a started backend whose jobs report to ``sink``, holding its generation
    jobs too (released or cancelled by the test); stopped after the test."""
    made: list[DeviceBackend] = []

    def start(**kwargs: Any) -> DeviceBackend:
        backend = DeviceBackend("devices", **kwargs)
        backend.hold_generation = True
        backend.start(sink)
        made.append(backend)
        return backend

    yield start
    for backend in made:
        backend.stop()


def wait_started(sink: Sink, job_id: str) -> Started:
    return sink._wait(Started, job_id, WAIT)


def running(backend: DeviceBackend, sink: Sink, spec: JobSpec) -> Started:
    """Submit ``spec`` and wait until it runs (it holds its worker until released or cancelled)."""
    backend.submit(spec)
    return wait_started(sink, spec.job_id)


# -- the backend ------------------------------------------------------------------------------------------------
def test_without_sharing_a_training_holds_its_device_for_every_kind(devices, sink):
    backend = devices(share=False)
    assert backend.claimable_kinds() == (GENERATE, TRAIN_LORA) and backend.free_slots() == 1
    running(backend, sink, training_spec("train-1"))
    assert backend.claimable_kinds() == () and backend.free_slots() == 0
    with pytest.raises(BackendBusy, match="generate"):
        backend.submit(fake_spec("gen-1"))
    backend.release("train-1")
    assert isinstance(sink.wait_terminal("train-1"), Succeeded)
    assert backend.claimable_kinds() == (GENERATE, TRAIN_LORA)
    assert sink.for_job("gen-1") == []


def test_with_sharing_one_generation_runs_beside_a_training_and_a_second_training_waits(devices, sink):
    backend = devices(share=True)
    running(backend, sink, training_spec("train-1"))
    assert backend.claimable_kinds() == (GENERATE,) and backend.free_slots() == 1
    with pytest.raises(BackendBusy, match="train_lora"):
        backend.submit(training_spec("train-2"))
    started = running(backend, sink, fake_spec("gen-1"))
    assert started.worker == "devices/gpu0", "the generation runs on the training's device"
    assert backend.started("gen-1") == ["guest"]
    assert backend.claimable_kinds() == () and backend.free_slots() == 0, "one generation beside a training"
    with pytest.raises(BackendBusy):
        backend.submit(fake_spec("gen-2"))
    # the training ends first: the device is not free while the generation still runs on it
    backend.release("train-1")
    assert isinstance(sink.wait_terminal("train-1"), Succeeded)
    assert backend.claimable_kinds() == () and backend.free_slots() == 0
    backend.release("gen-1")
    assert isinstance(sink.wait_terminal("gen-1"), Succeeded)
    assert backend.claimable_kinds() == (GENERATE, TRAIN_LORA) and backend.free_slots() == 1
    assert sink.for_job("train-2") == [] and sink.for_job("gen-2") == []


def test_with_sharing_nothing_runs_beside_a_generation(devices, sink):
    backend = devices(share=True)
    running(backend, sink, fake_spec("gen-1"))
    assert backend.started("gen-1") == ["main"]
    assert backend.claimable_kinds() == () and backend.free_slots() == 0
    with pytest.raises(BackendBusy):
        backend.submit(fake_spec("gen-2"))
    assert backend.cancel("gen-1")
    assert isinstance(sink.wait_terminal("gen-1"), Cancelled)


def test_with_sharing_a_free_device_is_preferred_and_cancel_reaches_both_jobs_of_a_device(devices, sink):
    backend = devices(share=True, devices=("gpu0", "gpu1"))
    running(backend, sink, training_spec("train-1"))
    assert backend.free_slots() == 2  # gpu1, and a generation beside the training on gpu0
    assert running(backend, sink, fake_spec("gen-1")).worker == "devices/gpu1"
    assert backend.started("gen-1") == ["main"] and backend.claimable_kinds() == (GENERATE,)
    assert running(backend, sink, fake_spec("gen-2")).worker == "devices/gpu0"
    assert backend.started("gen-2") == ["guest"] and backend.claimable_kinds() == ()
    assert backend.cancel("train-1") and backend.cancel("gen-2")
    assert isinstance(sink.wait_terminal("train-1"), Cancelled)
    assert isinstance(sink.wait_terminal("gen-2"), Cancelled)
    assert backend.claimable_kinds() == (GENERATE, TRAIN_LORA) and backend.free_slots() == 1


def test_stop_interrupts_a_training_and_the_generation_beside_it(devices, sink):
    backend = devices(share=True)
    running(backend, sink, training_spec("train-1"))
    running(backend, sink, fake_spec("gen-1"))
    backend.stop()
    for job_id in ("train-1", "gen-1"):
        terminal = sink.wait_terminal(job_id)
        assert isinstance(terminal, Failed) and terminal.kind == "interrupted" and terminal.message == STOPPED_MESSAGE
    assert backend.claimable_kinds() == () and backend.free_slots() == 0


# -- through the queue and the dispatcher ---------------------------------------------------------------------------
@pytest.fixture
def device_endpoint(fake_studio, request) -> Iterator[DeviceBackend]:
    """An endpoint ``devices`` (one device) whose dispatcher claims from the studio's queue; sharing per param."""
    backend = DeviceBackend("devices", share=request.param)
    with extra_endpoint(fake_studio, "devices", backend):
        yield backend


def _training(fake_studio: Any, actor: Any) -> Any:
    return fake_studio.jobs.submit_task(actor=actor, kind=TRAIN_LORA, payload={}, endpoint="devices",
                                        models=training_spec("x").models)


def _wait_running(fake_studio: Any, backend: DeviceBackend, actor: Any, job_id: str) -> None:
    deadline = time.monotonic() + WAIT
    while not (backend.started(job_id)
               and fake_studio.jobs.get(actor=actor, job_id=job_id).status == JobStatus.RUNNING):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not start within {WAIT}s")
        time.sleep(0.01)


@pytest.mark.parametrize("device_endpoint", [False], indirect=True)
def test_without_sharing_a_queued_generation_waits_until_the_training_ends(fake_studio, device_endpoint):
    actor = add_user(fake_studio, "share-user")
    training = _training(fake_studio, actor)
    _wait_running(fake_studio, device_endpoint, actor, training.id)
    generation = fake_studio.jobs.submit(actor=actor, mode="txt2img", request=txt2img(), endpoint="devices")
    fake_studio.jobs.cancel(actor=actor, job_id=training.id)
    assert fake_studio.jobs.wait(actor=actor, job_id=training.id, timeout=WAIT).status == JobStatus.CANCELLED
    done = fake_studio.jobs.wait(actor=actor, job_id=generation.id, timeout=WAIT)
    assert done.status == JobStatus.SUCCEEDED, done.error
    timeline = device_endpoint.timeline
    assert timeline.index(("end", training.id, "main")) < timeline.index(("start", generation.id, "main"))


@pytest.mark.parametrize("device_endpoint", [True], indirect=True)
def test_with_sharing_a_generation_runs_while_the_training_runs_and_a_second_training_waits(
        fake_studio, device_endpoint):
    actor = add_user(fake_studio, "share-user")
    first = _training(fake_studio, actor)
    _wait_running(fake_studio, device_endpoint, actor, first.id)
    second = _training(fake_studio, actor)
    generation = fake_studio.jobs.submit(actor=actor, mode="txt2img", request=txt2img(), endpoint="devices")
    done = fake_studio.jobs.wait(actor=actor, job_id=generation.id, timeout=WAIT)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.worker == "devices/gpu0" and device_endpoint.started(generation.id) == ["guest"]
    assert fake_studio.jobs.get(actor=actor, job_id=first.id).status == JobStatus.RUNNING
    assert fake_studio.jobs.get(actor=actor, job_id=second.id).status == JobStatus.QUEUED
    # a generation held beside the training is cancelled like any other job
    device_endpoint.hold_generation = True
    held = fake_studio.jobs.submit(actor=actor, mode="txt2img", request=txt2img(), endpoint="devices")
    _wait_running(fake_studio, device_endpoint, actor, held.id)
    fake_studio.jobs.cancel(actor=actor, job_id=held.id)
    assert fake_studio.jobs.wait(actor=actor, job_id=held.id, timeout=WAIT).status == JobStatus.CANCELLED
    assert fake_studio.jobs.get(actor=actor, job_id=first.id).status == JobStatus.RUNNING
    # the second training starts only when the first has ended
    fake_studio.jobs.cancel(actor=actor, job_id=first.id)
    assert fake_studio.jobs.wait(actor=actor, job_id=first.id, timeout=WAIT).status == JobStatus.CANCELLED
    _wait_running(fake_studio, device_endpoint, actor, second.id)
    timeline = device_endpoint.timeline
    assert timeline.index(("end", first.id, "main")) < timeline.index(("start", second.id, "main"))
    device_endpoint.release(second.id)
    assert fake_studio.jobs.wait(actor=actor, job_id=second.id, timeout=WAIT).status == JobStatus.SUCCEEDED


# -- the setting -------------------------------------------------------------------------------------------------------
def test_the_setting_reaches_the_default_local_endpoint(tmp_path, monkeypatch):
    from deploy.backends import local
    from deploy.backends.options import parse_options
    from deploy.backends.registry import BackendConfig
    from webapp.services.jobs.setup import backend_options
    from webapp.settings import Settings, settings_from_args

    assert parse_options("local", {}).model_dump()["share_training_device"] is False
    for settings, shared in [(Settings(data_dir=tmp_path), False),
                             (Settings(data_dir=tmp_path, share_training_device=True), True)]:
        options = backend_options(settings)
        assert options["share_training_device"] is shared
        backend = local.create(BackendConfig(name="local", kind="local", options=options))
        assert backend.share_training_device is shared
    monkeypatch.setenv("STUDIO_SHARE_TRAINING_DEVICE", "true")
    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path))
    assert Settings().share_training_device is True
    assert settings_from_args(["--no-share-training-device"]).share_training_device is False
    monkeypatch.delenv("STUDIO_SHARE_TRAINING_DEVICE")
    assert settings_from_args(["--share-training-device"]).share_training_device is True
