"""SageMaker training jobs for ``train_lora``: start one, follow it, stop it, and bring its LoRAs home.

The job runs our image's ``train`` command (``deploy.container.train``, which documents the container's side):
the dataset and the base model arrive as the S3 channels ``dataset`` and ``model``, the payload as
hyperparameters, the LoRAs leave as ``{output_path}/{job}/output/model.tar.gz``. While it runs, SageMaker syncs
the container's ``/opt/ml/checkpoints`` with ``checkpoint_uri``; the container appends the trainer's events
there (``events.jsonl``), so ``progress`` reads loss and saves from S3 without CloudWatch, and
``copy_checkpoint_file`` brings the samples and ``train.log`` it names to the asset store where the local runner
keeps them.

``collect`` treats ``model.tar.gz`` as untrusted input — it was written by code running on a machine we do not
watch, from a payload a user chose: only regular ``*.safetensors`` files at the archive's top level, each with a
safetensors header, within bounded counts and sizes, are accepted, and one bad entry refuses the whole archive
before anything reaches the asset store.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
from botocore.exceptions import ClientError

from deploy.container.train import HYPERPARAMETER_VALUE_MAX, HYPERPARAMETERS_MAX, payload_hyperparameters
from deploy.sagemaker.control import ROLE_ARN
from deploy.storage import BlobStore
from deploy.trainer_process import TrainerFailure, parse_failure_reason
from deploy.training_runner import job_keys

CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
EVENTS_FILE = "events.jsonl"
MODEL_ARCHIVE = "model.tar.gz"
TERMINAL = frozenset({"Completed", "Failed", "Stopped"})

_JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
_S3_URI = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>\S*)")
_TAG = re.compile(r"[\w\s.:/=+\-@]*")
_LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\.safetensors")
_SAMPLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\.png")
_SAFETENSORS_HEADER_MAX = 100 * 1024 * 1024


class TrainingError(Exception):
    """A training job could not be started, followed or collected."""


class InvalidTrainingPlan(TrainingError, ValueError):
    """A ``TrainingPlan`` SageMaker would refuse; ``field`` names the plan's attribute."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class UnsafeArtifact(TrainingError, ValueError):
    """``model.tar.gz`` holds something ``collect`` will not store; ``entry`` names it. Nothing was stored."""

    def __init__(self, message: str, entry: str) -> None:
        super().__init__(message)
        self.entry = entry


@dataclass(frozen=True)
class TrainingPlan:
    """One ``train_lora`` job as a SageMaker training job."""

    job_name: str
    """1 to 63 letters, digits and hyphens (SageMaker's rule); unique in the account and region."""
    image_uri: str
    role_arn: str
    dataset_uri: str
    """``s3://bucket/prefix/`` of the dataset in kohya's layout (the asset store's ``datasets/<id>/``)."""
    model_uri: str
    """``s3://bucket/key`` of the base model file; SageMaker matches it as a prefix, so the key must not also
    begin another object's key."""
    output_path: str
    """``s3://bucket/prefix`` (sent without a trailing '/'): SageMaker writes
    ``{output_path}/{job_name}/output/model.tar.gz``."""
    checkpoint_uri: str
    """``s3://bucket/prefix/`` synced with the container's /opt/ml/checkpoints (state, events, samples, log)."""
    payload: Mapping[str, Any]
    """The ``train_lora`` payload, as ``deploy.training_runner.TrainPayload`` checks it."""
    instance_type: str = "ml.g5.2xlarge"
    volume_gb: int = 125
    max_runtime_seconds: int = 86400
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingStatus:
    """What ``describe_training_job`` says of a job, in the studio's terms."""

    status: str
    """InProgress, Completed, Failed, Stopping or Stopped."""
    secondary_status: str | None = None
    """Starting, Downloading, Training, Uploading, MaxRuntimeExceeded, Interrupted ..."""
    failure_reason: str | None = None
    failure: TrainerFailure | None = None
    """The container's own account of a failure (kind, message, field), when it wrote one."""
    status_message: str | None = None
    """The latest secondary status transition's message (for the UI's log)."""
    model_artifacts: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def split_s3_uri(uri: str) -> tuple[str, str]:
    found = _S3_URI.fullmatch(uri or "")
    if found is None:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return found["bucket"], found["key"]


# -- the call --------------------------------------------------------------------------------------------------
def _check_s3(name: str, uri: object, *, folder: bool | None) -> str:
    """``folder``: True must end in '/', False must not, None either."""
    if not isinstance(uri, str) or _S3_URI.fullmatch(uri) is None or len(uri) > 1024:
        raise InvalidTrainingPlan(f"`{name}` must be an s3://bucket/... URI of at most 1024 characters, not {uri!r}",
                                  name)
    if folder is True and not uri.endswith("/"):
        raise InvalidTrainingPlan(f"`{name}` must end in '/' (a prefix that matches only its own folder), not "
                                  f"{uri!r}", name)
    if folder is False and uri.endswith("/"):
        raise InvalidTrainingPlan(f"`{name}` must name a file, not the folder {uri!r}", name)
    return uri


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidTrainingPlan(f"`{name}` must be an integer of at least {low}, not {value!r}", name)
    return value


def _hyperparameters(payload: Mapping[str, Any]) -> dict[str, str]:
    try:
        values = payload_hyperparameters(payload)
    except (TypeError, ValueError) as exc:
        raise InvalidTrainingPlan(f"`payload` cannot travel as hyperparameters: {exc}", "payload") from None
    if len(values) > HYPERPARAMETERS_MAX or any(len(k) > 256 or len(v) > HYPERPARAMETER_VALUE_MAX
                                                for k, v in values.items()):
        raise InvalidTrainingPlan("`payload` exceeds SageMaker's hyperparameter limits", "payload")
    return values


def _tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    if len(tags) > 50:
        raise InvalidTrainingPlan(f"`tags`: at most 50, not {len(tags)}", "tags")
    for key, value in tags.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 128 or not _TAG.fullmatch(key) \
                or key.lower().startswith("aws:"):
            raise InvalidTrainingPlan(f"`tags`: key {key!r} must be 1 to 128 letters, digits, spaces or _.:/=+-@ "
                                      "and not start with aws:", "tags")
        if not isinstance(value, str) or len(value) > 256 or not _TAG.fullmatch(value):
            raise InvalidTrainingPlan(f"`tags`: the value of {key!r} must be at most 256 letters, digits, spaces "
                                      "or _.:/=+-@", "tags")
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def _channel(name: str, uri: str) -> dict[str, Any]:
    return {"ChannelName": name, "InputMode": "File",
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                            "S3DataDistributionType": "FullyReplicated"}}}


def training_job_arguments(plan: TrainingPlan) -> dict[str, Any]:
    """``create_training_job``'s arguments for ``plan``; ``InvalidTrainingPlan`` names the first attribute
    SageMaker would refuse (checked here, so a bad plan fails before any call and with our words)."""
    if not isinstance(plan.job_name, str) or not _JOB_NAME.fullmatch(plan.job_name):
        raise InvalidTrainingPlan(f"`job_name` must be 1 to 63 letters, digits and hyphens, starting and ending "
                                  f"with a letter or digit, not {plan.job_name!r}", "job_name")
    if not isinstance(plan.image_uri, str) or not plan.image_uri or len(plan.image_uri) > 255 \
            or any(c.isspace() for c in plan.image_uri):
        raise InvalidTrainingPlan(f"`image_uri` must be an image URI of at most 255 characters, not "
                                  f"{plan.image_uri!r}", "image_uri")
    if not isinstance(plan.role_arn, str) or not ROLE_ARN.fullmatch(plan.role_arn) or len(plan.role_arn) > 2048:
        raise InvalidTrainingPlan(f"`role_arn` must be an IAM role ARN, not {plan.role_arn!r}", "role_arn")
    if not isinstance(plan.instance_type, str) or not re.fullmatch(r"ml\.[a-z0-9\-]+\.[a-z0-9]+", plan.instance_type):
        raise InvalidTrainingPlan(f"`instance_type` must look like ml.g5.2xlarge, not {plan.instance_type!r}",
                                  "instance_type")
    return {
        "TrainingJobName": plan.job_name,
        "AlgorithmSpecification": {"TrainingImage": plan.image_uri, "TrainingInputMode": "File"},
        "RoleArn": plan.role_arn,
        "InputDataConfig": [_channel("dataset", _check_s3("dataset_uri", plan.dataset_uri, folder=True)),
                            _channel("model", _check_s3("model_uri", plan.model_uri, folder=False))],
        "OutputDataConfig": {"S3OutputPath": _check_s3("output_path", plan.output_path, folder=None).rstrip("/")},
        "ResourceConfig": {"InstanceType": plan.instance_type, "InstanceCount": 1,
                           "VolumeSizeInGB": _check_int("volume_gb", plan.volume_gb, 1)},
        "StoppingCondition": {"MaxRuntimeInSeconds": _check_int("max_runtime_seconds", plan.max_runtime_seconds, 1)},
        "HyperParameters": _hyperparameters(plan.payload),
        "CheckpointConfig": {"S3Uri": _check_s3("checkpoint_uri", plan.checkpoint_uri, folder=True),
                             "LocalPath": CHECKPOINT_LOCAL_PATH},
        "Tags": _tags(plan.tags),
    }


def model_archive_uri(output_path: str, job_name: str) -> str:
    """Where SageMaker puts a job's ``/opt/ml/model`` (``ModelArtifacts.S3ModelArtifacts``)."""
    return f"{output_path.rstrip('/')}/{job_name}/output/{MODEL_ARCHIVE}"


def _is_missing(error: ClientError) -> bool:
    code = error.response.get("Error", {}).get("Code", "")
    message = error.response.get("Error", {}).get("Message", "").lower()
    return code in ("NoSuchKey", "404", "NotFound", "ResourceNotFound") or (
        code in ("ValidationException", "ValidationError") and ("not found" in message or "could not find" in message))


# -- the client ------------------------------------------------------------------------------------------------
class SageMakerTraining:
    """Training jobs over boto3; the asset store receives the collected LoRAs."""

    def __init__(self, *, store: BlobStore, session: boto3.session.Session | None = None,
                 max_archive_bytes: int = 16 << 30, max_files: int = 200, max_file_bytes: int = 4 << 30,
                 max_total_bytes: int = 32 << 30) -> None:
        self.store = store
        session = session or boto3.session.Session()
        self.sagemaker = session.client("sagemaker")
        self.s3 = session.client("s3")
        self.max_archive_bytes = max_archive_bytes
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes

    def start(self, plan: TrainingPlan) -> str:
        """Create the training job; its ARN."""
        return str(self.sagemaker.create_training_job(**training_job_arguments(plan))["TrainingJobArn"])

    def status(self, job_name: str) -> TrainingStatus | None:
        """The job's status, or None when SageMaker does not know it."""
        try:
            job = self.sagemaker.describe_training_job(TrainingJobName=job_name)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        reason = job.get("FailureReason")
        transitions = job.get("SecondaryStatusTransitions") or []
        return TrainingStatus(status=job["TrainingJobStatus"], secondary_status=job.get("SecondaryStatus"),
                              failure_reason=reason, failure=parse_failure_reason(reason) if reason else None,
                              status_message=(transitions[-1].get("StatusMessage") if transitions else None),
                              model_artifacts=(job.get("ModelArtifacts") or {}).get("S3ModelArtifacts"))

    def stop(self, job_name: str) -> None:
        """Ask SageMaker to stop the job (SIGTERM in the container; it keeps the epochs saved so far). Stopping
        a job that has already ended, or is unknown, is not an error."""
        try:
            self.sagemaker.stop_training_job(TrainingJobName=job_name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("ValidationException", "ValidationError"):
                raise
            current = self.status(job_name)
            if current is not None and not current.terminal and current.status != "Stopping":
                raise

    def progress(self, checkpoint_uri: str, after_line: int) -> tuple[list[dict[str, Any]], int]:
        """The trainer events the container has appended to ``events.jsonl`` since the first ``after_line``
        complete lines, and the new count of complete lines (a line still being synced waits for the next
        call). Lines that are not JSON objects are skipped but counted."""
        bucket, prefix = split_s3_uri(checkpoint_uri)
        key = f"{prefix.rstrip('/')}/{EVENTS_FILE}" if prefix else EVENTS_FILE
        try:
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if _is_missing(exc):
                return [], after_line
            raise
        lines = body.split(b"\n")[:-1]  # the piece after the last newline is not a complete line yet
        events: list[dict[str, Any]] = []
        for raw in lines[after_line:]:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                events.append(event)
        return events, max(after_line, len(lines))

    def copy_checkpoint_file(self, checkpoint_uri: str, relative: str, job_id: str) -> str:
        """Copy a file the container left under the checkpoint prefix — ``samples/<image>.png`` as a sample event
        names it, or ``train.log`` — to where the local runner keeps it (``jobs/<id>/samples/<image>``,
        ``jobs/<id>/train.log``); its store key. ``UnsafeArtifact`` for any other path or an oversized file."""
        keys = job_keys(job_id)
        parts = PurePosixPath(relative).parts if isinstance(relative, str) else ()
        if relative == "train.log":
            key = keys["log"]
        elif len(parts) == 2 and parts[0] == "samples" and _SAMPLE_NAME.fullmatch(parts[1]) \
                and f"samples/{parts[1]}" == relative:
            key = f"{keys['samples']}{parts[1]}"
        else:
            raise UnsafeArtifact(f"checkpoint file {relative!r} is neither train.log nor samples/<image>.png",
                                 str(relative))
        bucket, prefix = split_s3_uri(checkpoint_uri)
        source = f"{prefix.rstrip('/')}/{relative}" if prefix else relative
        size = int(self.s3.head_object(Bucket=bucket, Key=source)["ContentLength"])
        if size > self.max_file_bytes:
            raise UnsafeArtifact(f"checkpoint file {relative!r} is {size} bytes, over {self.max_file_bytes}", relative)
        with tempfile.TemporaryDirectory(prefix="studio-checkpoint-") as work:
            local = Path(work) / "file"
            self.s3.download_file(bucket, source, str(local))
            content_type = "text/plain; charset=utf-8" if relative == "train.log" else "image/png"
            self.store.put_file(key, local, content_type=content_type)
        return key

    def collect(self, job_name: str, output_path: str, job_id: str) -> list[str]:
        """Store the job's LoRAs from its ``model.tar.gz`` under ``jobs/<job_id>/lora/<file>``; their keys. An
        absent archive (a job that ended before writing one) gives []; any entry that is not a plain, regular
        ``*.safetensors`` file within the bounds raises ``UnsafeArtifact`` and stores nothing."""
        bucket, key = split_s3_uri(model_archive_uri(output_path, job_name))
        try:
            size = int(self.s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if _is_missing(exc):
                return []
            raise
        if size > self.max_archive_bytes:
            raise UnsafeArtifact(f"{MODEL_ARCHIVE} is {size} bytes, over the {self.max_archive_bytes} allowed",
                                 MODEL_ARCHIVE)
        prefix = job_keys(job_id)["lora"]
        with tempfile.TemporaryDirectory(prefix="studio-collect-") as work:
            archive = Path(work) / MODEL_ARCHIVE
            self.s3.download_file(bucket, key, str(archive))
            files = self._extract(archive, Path(work) / "files")
            stored: list[str] = []
            try:
                for path in files:
                    self.store.put_file(f"{prefix}{path.name}", path, content_type="application/octet-stream")
                    stored.append(f"{prefix}{path.name}")
            except BaseException:
                for done in stored:
                    self.store.delete(done)
                raise
        return stored

    def _extract(self, archive: Path, target: Path) -> list[Path]:
        """Every entry checked as it is read (declared sizes bound what the stream inflates), files written under
        ``target``; the list of files, or ``UnsafeArtifact`` for the first entry refused."""
        target.mkdir()
        files: list[Path] = []
        total = 0
        try:
            with tarfile.open(archive, mode="r:*") as tar:
                for member in tar:
                    name = self._check_member(member, files, total)
                    if name is None:
                        continue
                    total += member.size
                    source = tar.extractfile(member)
                    if source is None:
                        raise UnsafeArtifact(f"entry {member.name!r} has no content", member.name)
                    path = target / name
                    with source, path.open("xb") as sink:
                        shutil.copyfileobj(source, sink)
                    self._check_header(path, member.name)
                    files.append(path)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise UnsafeArtifact(f"{MODEL_ARCHIVE} is not a readable tar.gz: {exc}", MODEL_ARCHIVE) from None
        return files

    def _check_member(self, member: tarfile.TarInfo, files: list[Path], total: int) -> str | None:
        """The file name to extract ``member`` as, None for the archive's root folder entry; else refused."""
        name = member.name
        plain = name[2:] if name.startswith("./") else name
        if member.isdir() and plain.rstrip("/") in ("", "."):
            return None
        if not member.isreg():
            what = "a link" if member.issym() or member.islnk() else "not a regular file"
            raise UnsafeArtifact(f"entry {name!r} is {what}; only LoRA files are collected", name)
        if "/" in plain or "\\" in plain or not _LORA_NAME.fullmatch(plain) or ".." in PurePosixPath(plain).parts:
            raise UnsafeArtifact(f"entry {name!r} is not a *.safetensors file at the archive's top level", name)
        if any(path.name == plain for path in files):
            raise UnsafeArtifact(f"entry {name!r} appears twice", name)
        if len(files) >= self.max_files:
            raise UnsafeArtifact(f"entry {name!r}: more than {self.max_files} files", name)
        if member.size > self.max_file_bytes or total + member.size > self.max_total_bytes:
            raise UnsafeArtifact(f"entry {name!r} is {member.size} bytes, over the bound (at most "
                                 f"{self.max_file_bytes} a file, {self.max_total_bytes} in all)", name)
        return plain

    @staticmethod
    def _check_header(path: Path, entry: str) -> None:
        """A safetensors file starts with an 8-byte little-endian header length, then a JSON object."""
        with path.open("rb") as handle:
            head = handle.read(9)
        length = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
        if not 2 <= length <= min(_SAFETENSORS_HEADER_MAX, path.stat().st_size - 8) or head[8:9] != b"{":
            raise UnsafeArtifact(f"entry {entry!r} is not a safetensors file", entry)
