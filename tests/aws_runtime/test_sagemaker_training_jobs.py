"""``train_lora`` jobs on a SageMaker endpoint: each one a SageMaker training job (moto records it), run for real by
``LocalTrainingJobs`` — our container's ``train`` command on the tiny SD1.5, its checkpoint folder synced to S3,
its ``model/`` uploaded as ``model.tar.gz`` — or forced into a state through moto's in-process backend.

What the backend must do: send the dataset and the base model as channels from the studio's S3 store, report the
trainer's loss from ``events.jsonl``, bring the LoRAs, samples and log home on Completed, keep going after a studio
restart (adopt), stop the training job on cancel, and report SageMaker's failures with the container's reason.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from deploy.backends.messages import (
    Cancelled,
    Failed,
    JobModels,
    JobSpec,
    ModelSpec,
    Progress,
    Started,
    Succeeded,
)
from deploy.backends.registry import BackendConfig, create_backend
from deploy.backends.sagemaker_training import HANDLE_KEY
from deploy.jobkinds import TRAIN_LORA
from deploy.model_files import ModelFileRef
from deploy.trainer_process import TrainerFailure, failure_reason
from tests.aws_runtime.test_studio_sagemaker import _deploy, _wait, studio_factory  # noqa: F401
from tests.backends.events import Sink
from tests.datasets.conftest import png
from tests.fixtures.moto_server import moto_client
from tests.fixtures.sagemaker_router import CONTAINER_URL_VARIABLE, ROLE_ARN
from tests.fixtures.sagemaker_training_jobs import LocalTrainingJobs, local_training_jobs  # noqa: F401
from tests.fixtures.studio_models import register_tiny_models
from tests.training.conftest import tiny_config, write_dataset
from webapp.records import EndpointStatus, JobStatus, ModelType

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/studio-worker:test"
DATASET = "datasets/d1/"


@pytest.fixture(scope="module")
def base_model(sagemaker_data_plane, tmp_path_factory) -> ModelSpec:
    """The tiny SD1.5 and a kohya dataset in the studio's S3 store, as the studio keeps them."""
    from tests.tiny.fixtures import tiny_files

    store = sagemaker_data_plane.store
    folder = write_dataset(tmp_path_factory.mktemp("dataset"))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.put_file(f"{DATASET}{path.relative_to(folder).as_posix()}", path)
    checkpoint = tiny_files().checkpoint("sd15")
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    key = f"models/checkpoint/{sha}/tiny-sd15.safetensors"
    store.put_file(key, checkpoint)
    ref = ModelFileRef(sha256=sha, store_key=key, local_path=None, size=checkpoint.stat().st_size)
    return ModelSpec(kind="checkpoint", name="tiny-sd15", sha256=sha, file=ref)


@pytest.fixture
def training_jobs(local_training_jobs) -> Iterator[LocalTrainingJobs]:  # noqa: F811
    yield local_training_jobs
    local_training_jobs.run_jobs = True


def _spec(job_id: str, model: ModelSpec, **config: Any) -> JobSpec:
    payload = {"base_type": "sd15", "config": tiny_config(**config), "dataset_id": "d1", "dataset_prefix": DATASET,
               "output_name": "mylora", "base_model_name": model.name}
    return JobSpec(job_id=job_id, mode="train", request=None, models=JobModels(checkpoint=model), kind=TRAIN_LORA,
                   payload=payload)


def _backend(plane: Any, name: str, *, provision: bool = True) -> Any:
    config = BackendConfig(
        name=name, kind="sagemaker", store=plane.store, provision=provision, min_instances=0, max_instances=1,
        autoscale=False,
        options={"endpoint_type": "async", "image_uri": IMAGE, "role_arn": ROLE_ARN, "state_seconds": 0.05,
                 "poll_seconds": 0.05, "training_instance_type": "ml.g5.xlarge",
                 "environment": {CONTAINER_URL_VARIABLE: plane.container.url}})
    return create_backend(config)


def _started(backend: Any, sink: Sink) -> Any:
    deadline = time.monotonic() + 20
    while backend.free_slots() == 0:
        assert time.monotonic() < deadline, "the endpoint never came InService"
        time.sleep(0.02)
    return backend


def _describe(plane: Any, name: str) -> dict[str, Any]:
    return moto_client("sagemaker", plane.moto).describe_training_job(TrainingJobName=name)


def _force(name: str, status: str, reason: str | None = None) -> None:
    job = LocalTrainingJobs.jobs()[name]
    job.training_job_status = job.secondary_status = status
    if reason is not None:
        job.failure_reason = reason


def test_a_training_runs_as_a_training_job_survives_a_restart_and_brings_its_loras_home(
        sagemaker_data_plane, training_jobs, base_model):
    plane = sagemaker_data_plane
    backend = _backend(plane, "sm-train")
    sink = Sink()
    backend.start(sink)
    assert TRAIN_LORA in backend.capabilities().kinds
    spec = _spec("tj-1", base_model, max_train_epochs=3, sample_prompts=["red square --s 2"],
                 sample_every_n_epochs=1)
    try:
        _started(backend, sink).submit(spec)
        started = sink.of(Started, "tj-1")[0]  # emitted before submit returned
        name = started.handle[HANDLE_KEY]
        assert name.startswith("studio-tj-1-1-") and len(name) <= 63

        job = _describe(plane, name)
        root = f"s3://{plane.bucket}/studio"
        channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]}
        assert channels == {"dataset": f"{root}/{DATASET}", "model": f"{root}/{base_model.file.store_key}"}
        assert job["CheckpointConfig"]["S3Uri"] == f"{root}/sagemaker/training/tj-1/checkpoints/"
        assert job["OutputDataConfig"]["S3OutputPath"] == f"{root}/sagemaker/training/tj-1/output"
        assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE and job["RoleArn"] == ROLE_ARN
        assert job["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"

        # the studio restarts while the job trains: the first backend says nothing more, the next one adopts it
        deadline = time.monotonic() + 240
        while not any("loss" in p.metrics for p in sink.of(Progress, "tj-1")):
            assert time.monotonic() < deadline, sink.for_job("tj-1")
            time.sleep(0.05)
    finally:
        backend.stop()
    assert not sink.of((Succeeded, Failed, Cancelled), "tj-1")
    second = _backend(plane, "sm-train", provision=False)
    sink2 = Sink()
    second.start(sink2)
    try:
        assert second.adopt(spec, started.handle)
        done = sink2.wait_terminal("tj-1", timeout=300)
    finally:
        second.stop()
        second.teardown()

    assert isinstance(done, Succeeded), done
    loras = [k for k in done.artifact_keys if k.startswith("jobs/tj-1/lora/")]
    assert sorted(loras) == ["jobs/tj-1/lora/mylora-000001.safetensors", "jobs/tj-1/lora/mylora-000002.safetensors",
                             "jobs/tj-1/lora/mylora.safetensors"]
    assert done.info["lora"] == "jobs/tj-1/lora/mylora.safetensors" and done.info["epochs"] == 3
    store = plane.store
    header = store.open("jobs/tj-1/lora/mylora.safetensors").read(9)
    assert header[8:9] == b"{"  # a safetensors file, from the container's model/ folder
    samples = [k for k in done.artifact_keys if k.startswith("jobs/tj-1/samples/")]
    assert len(samples) == 3 and all(store.stat(k) is not None for k in samples)
    assert "jobs/tj-1/train.log" in done.artifact_keys
    assert "trainer exited with code 0" in store.open("jobs/tj-1/train.log").read().decode()
    progress = sink2.of(Progress, "tj-1")
    assert any(p.metrics.get("loss", 0) > 0 for p in progress) and all(p.phase == "train" for p in progress)
    assert any("[studio] training 'mylora'" in line for p in progress for line in p.log)  # train.log's lines
    assert not store.exists("jobs/tj-1/state/state.pt")  # nothing to resume after a success


def test_cancel_stops_the_training_job_and_keeps_the_saved_epochs_and_state(sagemaker_data_plane, training_jobs,
                                                                            base_model, monkeypatch):
    plane = sagemaker_data_plane
    backend = _backend(plane, "sm-train-stop")
    monkeypatch.setattr(backend.trainings.training, "stop", training_jobs.stop)  # moto has no StopTrainingJob
    sink = Sink()
    backend.start(sink)
    try:
        _started(backend, sink).submit(_spec("tj-stop", base_model, max_train_epochs=40))
        name = sink.of(Started, "tj-stop")[0].handle[HANDLE_KEY]
        deadline = time.monotonic() + 240
        while not any("epoch 1 saved" in line for p in sink.of(Progress, "tj-stop") for line in p.log):
            assert time.monotonic() < deadline, sink.for_job("tj-stop")
            time.sleep(0.05)
        assert backend.cancel("tj-stop")
        done = sink.wait_terminal("tj-stop", timeout=120)
    finally:
        backend.stop()
        backend.teardown()

    assert training_jobs.stops == [name] and training_jobs.exit_codes[name] == 3
    assert isinstance(done, Cancelled) and "SageMaker stopped" in done.reason
    assert "jobs/tj-stop/lora/mylora-000001.safetensors" in done.artifact_keys
    assert "jobs/tj-stop/lora/mylora.safetensors" not in done.artifact_keys
    assert all(plane.store.stat(k) is not None for k in done.artifact_keys)
    assert plane.store.exists("jobs/tj-stop/state/state.pt")  # TrainingService.resume starts from it


def test_failures_report_the_containers_reason_and_a_resume_seeds_the_checkpoint(sagemaker_data_plane, training_jobs,
                                                                                base_model):
    plane = sagemaker_data_plane
    training_jobs.run_jobs = False  # states are forced here
    plane.store.put("jobs/tj-resumed/state/state.pt", io.BytesIO(b"saved after epoch 2"))
    backend = _backend(plane, "sm-train-fail")
    sink = Sink()
    backend.start(sink)
    try:
        _started(backend, sink)
        for job_id in ("tj-bad", "tj-capacity", "tj-empty", "tj-resumed"):
            backend.submit(_spec(job_id, base_model))
        names = {job_id: sink.of(Started, job_id)[0].handle[HANDLE_KEY]
                 for job_id in ("tj-bad", "tj-capacity", "tj-empty", "tj-resumed")}
        seeded = plane.s3.get_object(Bucket=plane.bucket,
                                     Key="studio/sagemaker/training/tj-resumed/checkpoints/state.pt")["Body"].read()
        assert seeded == b"saved after epoch 2"
        assert backend.free_slots() == 0  # four trainings fill the endpoint's four slots

        reason = failure_reason(TrainerFailure("bad_request", "`network_dim` must be at least 1, not 0",
                                               "network_dim"))
        _force(names["tj-bad"], "Failed", f"AlgorithmError: {reason}")
        _force(names["tj-capacity"], "Failed", "CapacityError: Unable to provision requested ML compute capacity.")
        _force(names["tj-empty"], "Completed")
        bad, capacity, empty = (sink.wait_terminal(j, timeout=30) for j in ("tj-bad", "tj-capacity", "tj-empty"))

        stops: list[str] = []
        backend.trainings.training.stop = stops.append
        assert backend.cancel("tj-resumed")
        assert stops == [names["tj-resumed"]] and not sink.of(Cancelled, "tj-resumed")  # until SageMaker says so
        _force(names["tj-resumed"], "Stopped")
        stopped = sink.wait_terminal("tj-resumed", timeout=30)
    finally:
        backend.stop()
        backend.teardown()

    assert isinstance(bad, Failed) and (bad.kind, bad.field) == ("bad_request", "network_dim")
    assert "`network_dim` must be at least 1" in bad.message
    assert isinstance(capacity, Failed) and capacity.kind == "internal" and "CapacityError" in capacity.message
    assert isinstance(empty, Failed) and "without the final LoRA" in empty.message
    assert isinstance(stopped, Cancelled) and stopped.artifact_keys == ()
    assert plane.store.open("jobs/tj-resumed/state/state.pt").read() == b"saved after epoch 2"


def test_a_spec_no_training_job_could_run_fails_without_creating_one(sagemaker_data_plane, training_jobs,
                                                                    base_model):
    backend = _backend(sagemaker_data_plane, "sm-train-bad")
    sink = Sink()
    backend.start(sink)
    before = set(LocalTrainingJobs.jobs())
    try:
        _started(backend, sink)
        spec = _spec("tj-prefix", base_model)
        backend.submit(replace(spec, payload={**spec.payload, "dataset_prefix": "elsewhere/"}))
        local = ModelSpec(kind="checkpoint", name="on-disk", sha256=base_model.sha256,
                          file=ModelFileRef(sha256=base_model.sha256, store_key=None, local_path="/models/x.safetensors",
                                            size=1))
        backend.submit(_spec("tj-local", local))
        prefix, on_disk = sink.wait_terminal("tj-prefix"), sink.wait_terminal("tj-local")
    finally:
        backend.stop()
        backend.teardown()
    assert isinstance(prefix, Failed) and (prefix.kind, prefix.field) == ("bad_request", "dataset_prefix")
    assert isinstance(on_disk, Failed) and on_disk.field == "base_model" and "'on-disk'" in on_disk.message
    assert set(LocalTrainingJobs.jobs()) == before


def test_a_training_started_in_the_studio_on_a_sagemaker_endpoint_is_registered_as_a_lora(
        sagemaker_data_plane, training_jobs, studio_factory, tiny_model_files):  # noqa: F811
    studio = studio_factory()
    admin = studio.users.get_by_name("admin")
    checkpoint = register_tiny_models(studio, tiny_model_files).checkpoint
    _deploy(studio, sagemaker_data_plane, "studio-trains")
    _wait(lambda: studio.jobs.endpoints.find("studio-trains").status == EndpointStatus.IN_SERVICE)
    dataset = studio.datasets.create(actor=admin, name="squares", files=[
        ("a.png", png(64, 64)), ("a.txt", b"a red square"), ("b.png", png(64, 64, (0, 0, 200))),
        ("b.txt", b"a blue square")]).dataset
    try:
        job = studio.trainings.create(actor=admin, base_type="sd15", base_model=checkpoint.name,
                                      dataset_id=dataset.id, config=tiny_config(max_train_epochs=2),
                                      output_name="squares", endpoint="studio-trains")
        done = studio.jobs.wait(actor=admin, job_id=job.id, timeout=300)
        assert done.status == JobStatus.SUCCEEDED, done.error
        assert done.remote_handle is not None and done.remote_handle[HANDLE_KEY] in LocalTrainingJobs.jobs()
        assert done.attempts == 1 and done.remote_handle[HANDLE_KEY].startswith(f"studio-{job.id}-")
        assert any("loss" in point for point in done.metrics["history"])
        studio.training_registrar.wait(120)
        registered = studio.trainings.get(actor=admin, job_id=job.id).info["registered_models"]
        assert set(registered) == {f"jobs/{job.id}/lora/squares.safetensors",
                                   f"jobs/{job.id}/lora/squares-000001.safetensors"}
        models = {m.name for m in studio.models.list_models(actor=admin, type=ModelType.LORA)
                  if m.id in registered.values()}
        assert models == {"squares", "squares-000001"}
    finally:
        studio.endpoint_admin.delete(actor=admin, name="studio-trains", force=True)


def test_the_training_instance_type_is_an_option_checked_by_its_name():
    from deploy.backends.options import OptionsError, parse_options

    assert parse_options("sagemaker", {}).training_instance_type == "ml.g5.2xlarge"
    with pytest.raises(OptionsError) as bad:
        parse_options("sagemaker", {"training_instance_type": "g5.2xlarge"})
    assert bad.value.field == "options.training_instance_type"


def test_a_cancel_sagemaker_cannot_carry_out_ends_the_job_at_once(sagemaker_data_plane, training_jobs, base_model):
    from botocore.exceptions import ClientError

    training_jobs.run_jobs = False
    backend = _backend(sagemaker_data_plane, "sm-train-nostop")
    sink = Sink()
    backend.start(sink)

    def refuse(name: str) -> None:
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "not allowed"}}, "StopTrainingJob")

    backend.trainings.training.stop = refuse
    try:
        _started(backend, sink).submit(_spec("tj-nostop", base_model))
        assert backend.cancel("tj-nostop")
        cancelled = sink.wait_terminal("tj-nostop", timeout=5)
        assert backend.free_slots() == 4 and not backend.cancel("tj-nostop")
    finally:
        backend.stop()
        backend.teardown()
    assert isinstance(cancelled, Cancelled) and "not allowed" in cancelled.reason
