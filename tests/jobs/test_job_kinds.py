"""Job kinds beyond generation go through the same queue, dispatcher and rows: metrics, log lines and artifacts
reported by the worker are recorded; an endpoint runs only the kinds its backend declares."""

from __future__ import annotations

import io
import json
import threading

import pytest

from deploy.backends.base import Capabilities
from deploy.backends.messages import (
    Cancelled,
    Event,
    JobModels,
    JobSpec,
    MessageError,
    ModelSpec,
    Progress,
    Succeeded,
)
from deploy.backends.workers import ThreadedBackend, Worker
from deploy.jobkinds import GENERATE, TRAIN_LORA, get_kind, kind_of_mode
from deploy.model_files import ModelFileRef
from tests.jobs.conftest import add_user, extra_endpoint
from webapp.records import JobStatus
from webapp.services.errors import Conflict, InvalidInput
from webapp.services.jobs.reports import MAX_HISTORY, JobReport

SHA = "ab" * 32


def _models(name: str = "base-model") -> JobModels:
    ref = ModelFileRef(sha256=SHA, store_key="models/x.safetensors", local_path=None, size=10)
    return JobModels(checkpoint=ModelSpec(kind="checkpoint", name=name, sha256=SHA, file=ref))


class ScriptedTaskBackend(ThreadedBackend):
    """A worker for a non-generate kind that reports what a trainer would: three steps with metrics and log
    lines, a file written to the store mid-run, and a final file; with ``hold`` it waits for a cancel."""

    kind = "scripted"

    def __init__(self, name: str, store, *, hold: bool = False) -> None:
        super().__init__(name)
        self.store = store
        self.hold = hold
        self.specs: list[JobSpec] = []
        self.started = threading.Event()

    def is_configured(self) -> bool:
        return True

    def capabilities(self) -> Capabilities:
        return Capabilities(slots=1, devices=("cpu",), kinds=(GENERATE, TRAIN_LORA))

    def worker_labels(self) -> list[str]:
        return ["w0"]

    def run_job(self, worker: Worker, spec: JobSpec) -> Event:
        self.specs.append(spec)
        prefix = f"jobs/{spec.job_id}/artifacts"
        self.store.put(f"{prefix}/epoch1.safetensors", io.BytesIO(b"epoch-one"))
        self.store.put(f"jobs/{spec.job_id}/state/optimizer.pt", io.BytesIO(b"state"))
        for step, loss in enumerate((0.9, 0.5, 0.3), start=1):
            self.emit(Progress(job_id=spec.job_id, step=step, total=3, metrics={"loss": loss, "lr": 1e-4},
                               log=(f"step {step} loss {loss}",), artifact_keys=(f"{prefix}/epoch1.safetensors",)))
        self.started.set()
        if self.hold:
            while not self.is_cancelled(spec.job_id):
                threading.Event().wait(0.01)
            return Cancelled(job_id=spec.job_id, artifact_keys=(f"{prefix}/epoch1.safetensors",))
        self.store.put(f"{prefix}/final.safetensors", io.BytesIO(b"final"))
        return Succeeded(job_id=spec.job_id, artifact_keys=(f"{prefix}/final.safetensors",))


@pytest.fixture
def task_endpoint(fake_studio):
    """A second endpoint, ``tasks``, whose backend runs ``train_lora`` jobs (the local fake runs generation only)."""
    backend = ScriptedTaskBackend("tasks", fake_studio.store)
    with extra_endpoint(fake_studio, "tasks", backend):
        yield backend


def test_the_registry_knows_generation_and_training():
    assert kind_of_mode("img2img").name == GENERATE and kind_of_mode("train").name == TRAIN_LORA
    assert get_kind(TRAIN_LORA).runner == "deploy.training_runner:TrainingRunner"
    with pytest.raises(ValueError, match="unknown job kind"):
        get_kind("nope")


def test_a_task_spec_round_trips_and_a_generation_spec_needs_its_request():
    spec = JobSpec(job_id="j1", mode="train", request=None, models=_models(), kind=TRAIN_LORA,
                   payload={"base": "sd15", "config": {"network_dim": 4}})
    back = JobSpec.from_json(spec.to_json())
    assert back.kind == TRAIN_LORA and back.payload == spec.payload and back.request is None
    assert back.models.checkpoint.name == "base-model"
    with pytest.raises(MessageError):
        JobSpec(job_id="j2", mode="txt2img", request=None, models=_models())
    event = Progress(job_id="j1", step=2, total=9, metrics={"loss": 0.25}, log=("a", "b"), artifact_keys=("k",))
    again = Progress.from_json(event.to_json())
    assert again.metrics == {"loss": 0.25} and again.log == ("a", "b") and again.artifact_keys == ("k",)
    done = Succeeded.from_json(Succeeded(job_id="j1", artifact_keys=("x", "y")).to_json())
    assert done.artifact_keys == ("x", "y") and done.images == ()


def test_a_task_runs_on_an_endpoint_that_declares_its_kind_and_its_reports_are_recorded(fake_studio, task_endpoint):
    actor = add_user(fake_studio, "kinds-user")
    payload = {"base": "sd15", "output_name": "mine", "config": {"network_dim": 4}}
    job = fake_studio.jobs.submit_task(actor=actor, kind=TRAIN_LORA, payload=payload, models=_models(),
                                       endpoint="tasks")
    assert job.kind == TRAIN_LORA and job.mode == "train"
    done = fake_studio.jobs.wait(actor=actor, job_id=job.id, timeout=20)
    assert done.status == JobStatus.SUCCEEDED, done.error
    spec = task_endpoint.specs[-1]
    assert spec.kind == TRAIN_LORA and spec.payload == payload and spec.request is None
    assert spec.models.checkpoint.name == "base-model"
    history = done.metrics["history"]
    assert [p["step"] for p in history] == [1, 2, 3] and [p["loss"] for p in history] == [0.9, 0.5, 0.3]
    assert done.metrics["latest"]["loss"] == 0.3
    assert done.log_lines == ["step 1 loss 0.9", "step 2 loss 0.5", "step 3 loss 0.3"]
    assert done.artifact_keys == [f"jobs/{job.id}/artifacts/epoch1.safetensors",
                                  f"jobs/{job.id}/artifacts/final.safetensors"]
    assert done.image_keys == []
    assert done.stored_bytes >= len(b"epoch-one") + len(b"final")  # the disk quota counts artifacts
    # training jobs stay out of the generation history
    listed, _ = fake_studio.jobs.list_jobs(actor=actor, mode=["txt2img", "img2img", "inpaint"])
    assert job.id not in [j.id for j in listed]
    assert [j.id for j in fake_studio.jobs.list_jobs(actor=actor, mode="train")[0]] == [job.id]
    # deleting the job deletes its artifacts and the state its worker kept
    fake_studio.jobs.delete(actor=actor, job_id=job.id)
    assert list(fake_studio.store.list(f"jobs/{job.id}/")) == []


def test_an_endpoint_that_does_not_run_the_kind_refuses_it_and_nothing_is_queued(fake_studio):
    actor = add_user(fake_studio, "kinds-user")
    with pytest.raises(Conflict) as caught:
        fake_studio.jobs.submit_task(actor=actor, kind=TRAIN_LORA, payload={}, models=_models(), endpoint="local")
    assert caught.value.field == "endpoint" and "train" in caught.value.message.lower()
    with pytest.raises(InvalidInput) as generate:
        fake_studio.jobs.submit_task(actor=actor, kind=GENERATE, payload={}, models=_models())
    assert generate.value.field == "kind"
    assert fake_studio.jobs.list_jobs(actor=actor)[1] == 0


def test_a_dispatcher_claims_only_the_kinds_its_backend_runs(fake_studio):
    """A training job queued on a generation-only endpoint (e.g. recorded before the endpoint changed) waits
    there; the generation job behind it runs."""
    from webapp.records import Job

    actor = add_user(fake_studio, "kinds-user")
    queue = fake_studio.jobs.queue
    waiting = queue.enqueue(Job(owner_id=actor.id, owner_name=actor.username, mode="train", kind=TRAIN_LORA,
                                endpoint="local", request_json="{}", models_json=json.dumps(_models().to_dict())))
    job = fake_studio.jobs.submit(actor=actor, mode="txt2img", request={"prompt": "after", "steps": 2, "width": 64,
                                                                        "height": 64})
    assert fake_studio.jobs.wait(actor=actor, job_id=job.id, timeout=20).status == JobStatus.SUCCEEDED
    assert fake_studio.jobs.get(actor=actor, job_id=waiting.id).status == JobStatus.QUEUED


def test_a_cancelled_task_keeps_the_artifacts_it_made(fake_studio, task_endpoint):
    task_endpoint.hold = True
    actor = add_user(fake_studio, "kinds-user")
    job = fake_studio.jobs.submit_task(actor=actor, kind=TRAIN_LORA, payload={}, models=_models(), endpoint="tasks")
    assert task_endpoint.started.wait(20)
    fake_studio.jobs.cancel(actor=actor, job_id=job.id)
    done = fake_studio.jobs.wait(actor=actor, job_id=job.id, timeout=20)
    assert done.status == JobStatus.CANCELLED
    assert done.artifact_keys == [f"jobs/{job.id}/artifacts/epoch1.safetensors"]
    assert done.metrics["latest"]["loss"] == 0.3


def test_a_report_rewinds_to_a_resumed_step_and_stays_bounded():
    report = JobReport()
    for step in range(1, 11):
        report.add(step=step, metrics={"loss": 1 / step}, log=(), artifact_keys=())
    report.add(step=6, metrics={"loss": 0.5}, log=("resumed",), artifact_keys=())
    assert [p["step"] for p in report.history] == [1, 2, 3, 4, 5, 6]
    for step in range(7, 7 + 2 * MAX_HISTORY):
        report.add(step=step, metrics={"loss": 0.1, "note": "text is dropped"}, log=(), artifact_keys=())
    assert len(report.history) <= MAX_HISTORY and report.history[-1]["step"] == 6 + 2 * MAX_HISTORY
    assert "note" not in report.history[-1]
    stored = json.loads(report.columns()["metrics_json"])
    assert JobReport(metrics=stored).history == report.history


def test_a1111_progress_and_interrupt_leave_a_running_task_alone(fake_studio, task_endpoint):
    task_endpoint.hold = True
    actor = add_user(fake_studio, "kinds-a1111")
    job = fake_studio.jobs.submit_task(actor=actor, kind=TRAIN_LORA, payload={}, models=_models(), endpoint="tasks")
    assert task_endpoint.started.wait(20)
    assert fake_studio.jobs.current_job(actor=actor) is None
    assert fake_studio.jobs.interrupt(actor=actor) is None
    assert fake_studio.jobs.get(actor=actor, job_id=job.id).status == JobStatus.RUNNING
    fake_studio.jobs.cancel(actor=actor, job_id=job.id)
    assert fake_studio.jobs.wait(actor=actor, job_id=job.id, timeout=20).status == JobStatus.CANCELLED
