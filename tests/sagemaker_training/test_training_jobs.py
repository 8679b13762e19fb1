"""``deploy.sagemaker.training`` against the moto server: the create call's arguments, status, progress from the
checkpoint prefix, collecting LoRAs from ``model.tar.gz`` (and refusing a hostile one), stop.

moto completes a training job at once and has no ``stop_training_job``: other states are forced through moto's
in-process backend (the server runs in this process), and ``stop`` is checked with botocore's ``Stubber``.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from typing import Any

import pytest
from botocore.stub import Stubber
from moto.sagemaker.models import sagemaker_backends

from deploy.container.train import payload_from_hyperparameters
from deploy.sagemaker.training import (
    CHECKPOINT_LOCAL_PATH,
    InvalidTrainingPlan,
    SageMakerTraining,
    TrainingPlan,
    UnsafeArtifact,
    model_archive_uri,
    training_job_arguments,
)
from deploy.storage import MemoryStore
from deploy.trainer_process import TrainerFailure, failure_reason
from tests.fixtures.moto_server import ACCOUNT_ID, REGION

ROLE = f"arn:aws:iam::{ACCOUNT_ID}:role/studio-training"
PAYLOAD = {"base_type": "sd15", "config": {"network_dim": 8, "max_train_epochs": 4,
                                          "sample_prompts": ["a red square --s 20"]},
           "dataset_id": "d1", "dataset_prefix": "datasets/d1/", "output_name": "mylora", "base_model_name": "base"}


def _plan(bucket: str, name: str = "studio-train-job1", **overrides: Any) -> TrainingPlan:
    values = dict(job_name=name, image_uri=f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/studio-worker:1",
                  role_arn=ROLE, dataset_uri=f"s3://{bucket}/studio/datasets/d1/",
                  model_uri=f"s3://{bucket}/studio/models/checkpoint/base.safetensors",
                  output_path=f"s3://{bucket}/training/output", checkpoint_uri=f"s3://{bucket}/training/{name}/",
                  payload=PAYLOAD, tags={"studio:job": "job1"})
    return TrainingPlan(**(values | overrides))


@pytest.fixture
def training(moto_server: str) -> SageMakerTraining:
    return SageMakerTraining(store=MemoryStore(), max_file_bytes=1 << 20)


def _backend() -> Any:
    return sagemaker_backends[ACCOUNT_ID][REGION]


def test_start_sends_the_documented_arguments(training, s3_bucket):
    plan = _plan(s3_bucket)
    arn = training.start(plan)

    assert arn.endswith(":training-job/studio-train-job1")
    job = training.sagemaker.describe_training_job(TrainingJobName=plan.job_name)
    channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
    assert set(channels) == {"dataset", "model"}
    for channel, uri in (("dataset", plan.dataset_uri), ("model", plan.model_uri)):
        assert channels[channel]["DataSource"]["S3DataSource"] == {
            "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
        assert channels[channel]["InputMode"] == "File"
    assert job["AlgorithmSpecification"]["TrainingImage"] == plan.image_uri
    assert job["AlgorithmSpecification"]["TrainingInputMode"] == "File"
    assert job["RoleArn"] == ROLE
    assert job["OutputDataConfig"] == {"S3OutputPath": plan.output_path}
    assert job["ResourceConfig"] == {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 125}
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400}
    assert job["CheckpointConfig"] == {"S3Uri": plan.checkpoint_uri, "LocalPath": CHECKPOINT_LOCAL_PATH}
    assert all(isinstance(v, str) and len(v) <= 2500 for v in job["HyperParameters"].values())
    assert payload_from_hyperparameters(job["HyperParameters"]) == PAYLOAD
    assert training.sagemaker.list_tags(ResourceArn=arn)["Tags"] == [{"Key": "studio:job", "Value": "job1"}]
    assert job["ModelArtifacts"]["S3ModelArtifacts"] == model_archive_uri(plan.output_path, plan.job_name)


@pytest.mark.parametrize(("change", "field"), [
    ({"job_name": "x" * 64}, "job_name"),
    ({"job_name": "has_underscore"}, "job_name"),
    ({"role_arn": "studio-role"}, "role_arn"),
    ({"dataset_uri": "s3://b-1/datasets/d1"}, "dataset_uri"),  # no '/': would also match datasets/d10
    ({"model_uri": "s3://b-1/models/"}, "model_uri"),
    ({"checkpoint_uri": "https://example.com/x/"}, "checkpoint_uri"),
    ({"volume_gb": 0}, "volume_gb"),
    ({"max_runtime_seconds": "86400"}, "max_runtime_seconds"),
    ({"instance_type": "g5.2xlarge"}, "instance_type"),
    ({"tags": {"aws:owner": "me"}}, "tags"),
    ({"payload": {"config": {"caption": "x" * 300_000}}}, "payload"),
])
def test_a_plan_sagemaker_would_refuse_names_its_field(change, field):
    with pytest.raises(InvalidTrainingPlan) as refused:
        training_job_arguments(_plan("b-1", **change))
    assert refused.value.field == field and f"`{field}`" in str(refused.value)


def test_status_maps_completed_in_progress_failed_and_unknown(training, s3_bucket):
    training.start(_plan(s3_bucket, "job-a"))
    done = training.status("job-a")
    assert done is not None and done.status == "Completed" and done.terminal and done.failure is None
    assert done.model_artifacts == model_archive_uri(_plan(s3_bucket).output_path, "job-a")

    job = _backend().training_jobs["job-a"]
    job.training_job_status, job.secondary_status = "InProgress", "Training"
    running = training.status("job-a")
    assert running is not None and (running.status, running.secondary_status) == ("InProgress", "Training")
    assert not running.terminal

    reason = failure_reason(TrainerFailure("bad_request", "`network_dim` must be at least 1, not 0", "network_dim"))
    job.training_job_status, job.secondary_status = "Failed", "Failed"
    job.failure_reason = f"AlgorithmError: {reason}"
    failed = training.status("job-a")
    assert failed is not None and failed.status == "Failed" and failed.terminal
    assert failed.failure == TrainerFailure("bad_request", "`network_dim` must be at least 1, not 0", "network_dim")

    assert training.status("no-such-job") is None


def test_stop_calls_stop_training_job_and_tolerates_a_finished_job(training, s3_bucket):
    """moto does not implement stop_training_job: botocore's Stubber stands in for SageMaker's answers."""
    training.start(_plan(s3_bucket, "job-s"))  # Completed in moto: status() is asked after the refusal below
    with Stubber(training.sagemaker) as stub:
        stub.add_response("stop_training_job", {}, {"TrainingJobName": "job-s"})
        training.stop("job-s")
        stub.assert_no_pending_responses()
    with Stubber(training.sagemaker) as stub:
        stub.add_client_error("stop_training_job", "ValidationException",
                              "The request was rejected because the training job is in status Completed.",
                              expected_params={"TrainingJobName": "job-s"})
        stub.add_response("describe_training_job", training_response("Completed"), {"TrainingJobName": "job-s"})
        training.stop("job-s")  # already over: nothing to stop
    with Stubber(training.sagemaker) as stub, pytest.raises(Exception, match="ThrottlingException"):
        stub.add_client_error("stop_training_job", "ThrottlingException", "slow down")
        training.stop("job-s")


def training_response(status: str) -> dict[str, Any]:
    return {"TrainingJobName": "job-s", "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT_ID}:training-job/job-s",
            "TrainingJobStatus": status, "SecondaryStatus": status, "ModelArtifacts": {"S3ModelArtifacts": "s3://b/x"},
            "AlgorithmSpecification": {"TrainingInputMode": "File"}, "ResourceConfig": {"VolumeSizeInGB": 1},
            "StoppingCondition": {}, "CreationTime": 0}


def test_progress_reads_new_complete_lines_from_the_checkpoint_prefix(training, s3_client, s3_bucket):
    uri = f"s3://{s3_bucket}/training/job-p/"
    assert training.progress(uri, 0) == ([], 0)  # nothing synced yet
    lines = [{"event": "start", "total_steps": 8}, {"event": "step", "step": 1, "loss": 0.25}]
    body = "".join(json.dumps(e) + "\n" for e in lines) + '{"event": "step", "st'  # mid-sync
    s3_client.put_object(Bucket=s3_bucket, Key="training/job-p/events.jsonl", Body=body.encode())

    events, offset = training.progress(uri, 0)
    assert (events, offset) == (lines, 2)
    later = [{"event": "step", "step": 2, "loss": 0.2}, {"event": "saved", "epoch": 1, "lora": "mylora-000001.safetensors"}]
    body = "".join(json.dumps(e) + "\n" for e in lines + later) + "not json\n"
    s3_client.put_object(Bucket=s3_bucket, Key="training/job-p/events.jsonl", Body=body.encode())
    assert training.progress(uri, offset) == (later, 5)
    assert training.progress(uri, 5) == ([], 5)


def _lora(tensor_bytes: bytes = b"\0" * 16) -> bytes:
    """A minimal safetensors file: one F32 tensor of four values."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, len(tensor_bytes)]}}).encode()
    return struct.pack("<Q", len(header)) + header + tensor_bytes


def _tar(entries: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """A tar.gz of (name, content or None for a symlink, type) entries."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        tar.addfile(root)
        for name, content, kind in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(content or b"")
                tar.addfile(info, io.BytesIO(content or b""))
    return buffer.getvalue()


def _put_archive(s3_client: Any, bucket: str, job: str, body: bytes) -> str:
    output = f"s3://{bucket}/training/output"
    key = model_archive_uri(output, job).split(f"s3://{bucket}/", 1)[1]
    s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    return output


def test_collect_stores_the_loras_of_model_tar_gz(training, s3_client, s3_bucket):
    final, epoch = _lora(b"\1" * 16), _lora(b"\2" * 16)
    output = _put_archive(s3_client, s3_bucket, "job-c", _tar([("./mylora.safetensors", final, tarfile.REGTYPE),
                                                                ("mylora-000001.safetensors", epoch, tarfile.REGTYPE)]))
    keys = training.collect("job-c", output, "job1")

    assert keys == ["jobs/job1/lora/mylora.safetensors", "jobs/job1/lora/mylora-000001.safetensors"]
    assert training.store.open(keys[0]).read() == final and training.store.open(keys[1]).read() == epoch
    assert training.collect("job-never-uploaded", output, "job2") == []


@pytest.mark.parametrize(("entry", "content", "kind"), [
    ("../escape.safetensors", _lora(), tarfile.REGTYPE),
    ("/abs.safetensors", _lora(), tarfile.REGTYPE),
    ("sub/nested.safetensors", _lora(), tarfile.REGTYPE),
    ("link.safetensors", None, tarfile.SYMTYPE),
    ("notes.txt", b"hello", tarfile.REGTYPE),
    ("fake.safetensors", b"MZ not a safetensors file at all", tarfile.REGTYPE),
    ("huge.safetensors", _lora(b"\0" * (2 << 20)), tarfile.REGTYPE),  # over the test's 1 MiB a file
])
def test_a_hostile_archive_is_refused_naming_the_entry_and_stores_nothing(training, s3_client, s3_bucket, entry,
                                                                           content, kind):
    good = ("good.safetensors", _lora(), tarfile.REGTYPE)  # read first: even it must not be stored
    output = _put_archive(s3_client, s3_bucket, "job-h", _tar([good, (entry, content, kind)]))

    with pytest.raises(UnsafeArtifact) as refused:
        training.collect("job-h", output, "job1")
    assert refused.value.entry == entry and repr(entry) in str(refused.value)
    assert list(training.store.list("")) == []


def test_an_archive_that_is_not_a_tar_gz_is_refused(training, s3_client, s3_bucket):
    output = _put_archive(s3_client, s3_bucket, "job-x", b"\x1f\x8b not really gzip")
    with pytest.raises(UnsafeArtifact, match="model.tar.gz"):
        training.collect("job-x", output, "job1")
    assert list(training.store.list("")) == []


def test_the_bounds_on_count_and_archive_size_hold(moto_server, s3_client, s3_bucket):
    entries = [(f"lora-{i}.safetensors", _lora(), tarfile.REGTYPE) for i in range(3)]
    output = _put_archive(s3_client, s3_bucket, "job-n", _tar(entries))

    few = SageMakerTraining(store=MemoryStore(), max_files=2)
    with pytest.raises(UnsafeArtifact) as refused:
        few.collect("job-n", output, "job1")
    assert refused.value.entry == "lora-2.safetensors" and list(few.store.list("")) == []
    small = SageMakerTraining(store=MemoryStore(), max_archive_bytes=64)
    with pytest.raises(UnsafeArtifact, match="model.tar.gz is \\d+ bytes"):
        small.collect("job-n", output, "job1")
    assert len(SageMakerTraining(store=MemoryStore()).collect("job-n", output, "job1")) == 3


def test_samples_and_the_log_are_copied_from_the_checkpoint_prefix_by_the_names_events_give(training, s3_client,
                                                                                           s3_bucket):
    uri = f"s3://{s3_bucket}/training/job-f/"
    s3_client.put_object(Bucket=s3_bucket, Key="training/job-f/samples/mylora-e000001-00.png", Body=b"\x89PNG x")
    s3_client.put_object(Bucket=s3_bucket, Key="training/job-f/train.log", Body=b"step 1\n")

    assert training.copy_checkpoint_file(uri, "samples/mylora-e000001-00.png", "job1") == \
        "jobs/job1/samples/mylora-e000001-00.png"
    assert training.copy_checkpoint_file(uri, "train.log", "job1") == "jobs/job1/train.log"
    assert training.store.open("jobs/job1/train.log").read() == b"step 1\n"
    for bad in ("state.pt", "samples/../state.pt", "../other/train.log", "samples/x.png/../../y.png"):
        with pytest.raises(UnsafeArtifact):
            training.copy_checkpoint_file(uri, bad, "job1")
    assert sorted(b.key for b in training.store.list("")) == ["jobs/job1/samples/mylora-e000001-00.png",
                                                             "jobs/job1/train.log"]
