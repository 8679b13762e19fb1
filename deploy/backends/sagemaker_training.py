"""``train_lora`` jobs on a SageMaker endpoint: each one a SageMaker training job, followed from S3.

A training does not run on the endpoint's instances: ``CloudTrainings`` (owned by ``SageMakerBackend``, which
routes ``train_lora`` specs here) starts a training job on its own instance (``training_instance_type``) with the
endpoint's image and role and the container's ``train`` command (``deploy.container.train``), and ends the studio
job when SageMaker ends it:

* ``submit``: the dataset (``datasets/<id>/``) and the base model file travel as S3 channels straight from the
  studio's asset store; a resumed training's ``jobs/<id>/state/state.pt`` is first copied into the job's checkpoint
  prefix (``sagemaker/training/<job_id>/checkpoints/``), where the container resumes from it. The ``Started``
  event carries the training job's name, so the row records it before ``submit`` returns and a restarted studio
  ``adopt``s the job instead of training it twice.
* ``poll`` (the backend's watcher, at most every ``interval`` per job: one describe, one read of ``events.jsonl``,
  one ranged read of ``train.log``): the trainer's events become ``Progress`` exactly as the local runner makes
  them (``TrainerProgress``, ``progress_event``), samples are copied to ``jobs/<id>/samples/``; at the end, on a
  thread of its own (an archive of many epochs takes a while and the watcher also serves the endpoint),
  ``train.log`` goes to ``jobs/<id>/train.log`` and the LoRAs of ``model.tar.gz`` to ``jobs/<id>/lora/``
  (``SageMakerTraining.collect``, which refuses a hostile archive); a failed collection is tried again.
* Completed → ``Succeeded``; Failed → ``Failed`` with the container's own kind and field when it wrote them
  (else SageMaker's reason); Stopped → ``Cancelled`` with the epochs saved so far. A stopped or failed job's state
  is copied back to ``jobs/<id>/state/state.pt`` so the training can be resumed, as after a local run.
* ``cancel`` asks SageMaker to stop the job (the container stops at a step boundary, keeping its epochs) and the
  job ends when SageMaker says Stopped; ``stop`` (the studio shutting down) only forgets: the job trains on.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from deploy.backends.messages import Cancelled, Event, Failed, JobSpec, Started, Succeeded
from deploy.sagemaker.training import (
    InvalidTrainingPlan,
    SageMakerTraining,
    TrainingError,
    TrainingPlan,
    TrainingStatus,
    split_s3_uri,
)
from deploy.storage import StorageError
from deploy.trainer_process import TrainerProgress
from deploy.training_runner import (
    MAX_LOG_LINES_PER_EVENT,
    InvalidPayload,
    TrainPayload,
    job_keys,
    progress_event,
)

log = logging.getLogger(__name__)

HANDLE_KEY = "training_job"
"""The key of ``Started.handle`` that marks a SageMaker training (``adopt`` tells it from an async invocation)."""
LOG_BYTES_PER_POLL = 256 * 1024
"""At most this much of ``train.log`` is read per poll (the rest comes with the next ones)."""
MISSING_POLLS = 5
"""A job SageMaker does not know for this many polls in a row (deleted outside the studio) fails."""
_NAME_CHARS = re.compile(r"[^A-Za-z0-9]+")

Emit = Callable[[Event], None]


class TrainingRefused(Exception):
    """SageMaker (or the store) refused to start the job now: the backend raises ``BackendError`` (requeued)."""


def training_job_name(job_id: str, attempt: int) -> str:
    """``studio-<job id>-<attempt>-<random>``: SageMaker's 1-63 letters, digits and hyphens, unique per attempt
    (a name is never reused in an account, so a retried submit of the same attempt gets a new one)."""
    stem = _NAME_CHARS.sub("-", job_id).strip("-")[:36] or "job"
    return f"studio-{stem}-{max(1, int(attempt))}-{secrets.token_hex(3)}"


@dataclass
class _Training:
    spec: JobSpec
    name: str
    checkpoint_uri: str
    output_path: str
    output_name: str
    after_line: int = 0
    log_offset: int = 0
    log_rest: str = ""
    progress: TrainerProgress = field(default_factory=TrainerProgress)
    artifacts: list[str] = field(default_factory=list)
    last_poll: float = 0.0
    last_status: str | None = None
    missing: int = 0
    cancelled: bool = False
    ending: bool = False
    """SageMaker ended it; its files are being collected (on a thread of their own)."""

    def handle(self) -> dict[str, Any]:
        return {HANDLE_KEY: self.name, "checkpoint_uri": self.checkpoint_uri, "output_path": self.output_path,
                "after_line": self.after_line, "log_offset": self.log_offset, "job_id": self.spec.job_id}


class CloudTrainings:
    """The ``train_lora`` jobs of one SageMaker endpoint."""

    def __init__(self, *, endpoint: str, image_uri: str, role_arn: str, instance_type: str, store: Any, emit: Emit,
                 interval: float = 5.0, training: SageMakerTraining | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        """``store``: the studio's S3 asset store (``bucket``, ``prefix``): channels and checkpoints are its
        objects. ``interval``: how often one job is looked at (seconds)."""
        self.endpoint = endpoint
        self.image_uri = image_uri
        self.role_arn = role_arn
        self.instance_type = instance_type
        self.store = store
        self.emit = emit
        self.interval = float(interval)
        self.training = training or SageMakerTraining(store=store)
        self.tags = dict(tags or {})
        self.root = f"s3://{store.bucket}/{store.prefix}".rstrip("/")
        self._lock = threading.Lock()
        self._jobs: dict[str, _Training] = {}

    def uri(self, key: str) -> str:
        """The s3:// URI of the asset-store key ``key``."""
        return f"{self.root}/{key}"

    def count(self) -> int:
        with self._lock:
            return len(self._jobs)

    def holds(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._jobs

    # -- submit, adopt, cancel, stop -------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> None:
        """Start ``spec`` as a training job and emit ``Started`` with its handle, or ``Failed(bad_request)`` for a
        payload no training could run; ``TrainingRefused`` when SageMaker or S3 refused (worth trying later)."""
        try:
            plan = self.plan(spec)
        except (InvalidPayload, InvalidTrainingPlan) as exc:
            self.emit(Failed(job_id=spec.job_id, message=str(exc), kind="bad_request", field=exc.field))
            return
        job = _Training(spec=spec, name=plan.job_name, checkpoint_uri=plan.checkpoint_uri,
                        output_path=plan.output_path, output_name=TrainPayload.parse(spec.payload).output_name)
        try:
            self._seed_checkpoint(job)
            # an earlier attempt of this job left its events and log in the checkpoint prefix: read on from there
            _, job.after_line = self.training.progress(job.checkpoint_uri, 0)
            job.log_offset = self._size(*split_s3_uri(f"{job.checkpoint_uri}train.log")) or 0
            self.training.start(plan)
        except InvalidTrainingPlan as exc:
            self.emit(Failed(job_id=spec.job_id, message=str(exc), kind="bad_request", field=exc.field))
            return
        except (ClientError, BotoCoreError, StorageError, TrainingError) as exc:
            raise TrainingRefused(f"starting SageMaker training job {plan.job_name} failed: {exc}") from exc
        job.last_poll = time.monotonic()
        with self._lock:
            self._jobs[spec.job_id] = job
        log.info("endpoint %s: job %s trains as SageMaker training job %s (%s)", self.endpoint, spec.job_id,
                 plan.job_name, plan.instance_type)
        self.emit(Started(job_id=spec.job_id, worker=self.endpoint, handle=job.handle()))

    def plan(self, spec: JobSpec) -> TrainingPlan:
        payload = TrainPayload.parse(spec.payload)
        model_key = spec.models.checkpoint.file.store_key
        if not model_key:
            raise InvalidPayload(f"the base model {spec.models.checkpoint.name!r} is not in the asset store, so a "
                                 "SageMaker training cannot read it", "base_model")
        base = f"{self.root}/sagemaker/training/{spec.job_id}"
        return TrainingPlan(
            job_name=training_job_name(spec.job_id, spec.attempt), image_uri=self.image_uri, role_arn=self.role_arn,
            dataset_uri=self.uri(payload.dataset_prefix), model_uri=self.uri(model_key), output_path=f"{base}/output",
            checkpoint_uri=f"{base}/checkpoints/", payload=dict(spec.payload), instance_type=self.instance_type,
            tags={"studio:job": spec.job_id, "studio:endpoint": self.endpoint, **self.tags})

    def _seed_checkpoint(self, job: _Training) -> None:
        """A resumed training (``jobs/<id>/state/state.pt`` in the store) starts from that state, unless an
        earlier attempt of this job already left a newer one in the checkpoint prefix."""
        state = job_keys(job.spec.job_id)["state"]
        if not self.store.exists(state):
            return
        bucket, prefix = split_s3_uri(job.checkpoint_uri)
        target = f"{prefix}state.pt"
        if self._size(bucket, target) is not None:
            return
        source_bucket, source_key = split_s3_uri(self.uri(state))
        self.training.s3.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": source_bucket,
                                                                            "Key": source_key})

    def adopt(self, spec: JobSpec, handle: Mapping[str, Any]) -> bool:
        """Follow a training an earlier run of the studio started (its ``Started.handle``)."""
        name, checkpoint, output = (handle.get(k) for k in (HANDLE_KEY, "checkpoint_uri", "output_path"))
        if not all(isinstance(v, str) and v for v in (name, checkpoint, output)):
            return False
        try:
            output_name = TrainPayload.parse(spec.payload).output_name
        except InvalidPayload:
            return False
        after, offset = handle.get("after_line"), handle.get("log_offset")
        job = _Training(spec=spec, name=str(name), checkpoint_uri=str(checkpoint), output_path=str(output),
                        output_name=output_name, after_line=after if isinstance(after, int) and after >= 0 else 0,
                        log_offset=offset if isinstance(offset, int) and offset >= 0 else 0)
        with self._lock:
            self._jobs[spec.job_id] = job
        log.info("endpoint %s: following SageMaker training job %s (job %s) again", self.endpoint, name,
                 spec.job_id)
        return True

    def cancel(self, job_id: str) -> bool:
        """Ask SageMaker to stop the job; it ends ``Cancelled`` (keeping its saved epochs) once SageMaker says
        Stopped — at once when it cannot be asked."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            return False
        job.cancelled = True
        try:
            self.training.stop(job.name)
        except (ClientError, BotoCoreError) as exc:
            log.warning("endpoint %s: stopping SageMaker training job %s failed: %s", self.endpoint, job.name, exc)
            if self._forget(job):
                self.emit(Cancelled(job_id=job_id, reason=f"cancelled; SageMaker could not be asked to stop "
                                                          f"training job {job.name}: {exc}"))
        return True

    def stop(self) -> None:
        """The studio is stopping: forget every job (they train on; the next start adopts them)."""
        with self._lock:
            self._jobs.clear()

    # -- following -----------------------------------------------------------------------------------------
    def poll(self) -> None:
        """One look at every job due for one; a failed look is tried again at the next."""
        now = time.monotonic()
        with self._lock:
            due = [job for job in self._jobs.values() if not job.ending and now - job.last_poll >= self.interval]
        for job in due:
            job.last_poll = now
            try:
                self._poll(job)
            except (ClientError, BotoCoreError, StorageError, TrainingError) as exc:
                log.warning("endpoint %s: following SageMaker training job %s: %s (trying again)", self.endpoint,
                            job.name, exc)

    def _poll(self, job: _Training) -> None:
        status = self.training.status(job.name)
        if status is None:
            job.missing += 1
            if job.missing >= MISSING_POLLS:
                self._finish(job, Failed(job_id=job.spec.job_id, kind="internal",
                                         message=f"SageMaker no longer knows training job {job.name}"))
            return
        job.missing = 0
        lines = self._status_lines(job, status)
        events, job.after_line = self.training.progress(job.checkpoint_uri, job.after_line)
        new_files = False
        for event in events:
            job.progress.apply(event)
            if event.get("event") == "sample" and isinstance(event.get("path"), str):
                new_files = self._copy(job, event["path"]) or new_files
            elif event.get("event") == "saved":
                lines.append(f"[studio] epoch {event.get('epoch')} saved (collected when the training job ends)")
            elif event.get("event") == "error":
                lines.append(f"[trainer] error: {event.get('message')}")
        lines += self._log_lines(job)
        if events or new_files or lines:
            self.emit(progress_event(job.spec.job_id, job.progress, log=tuple(lines[-MAX_LOG_LINES_PER_EVENT:]),
                                     artifact_keys=tuple(job.artifacts)))
        if status.terminal:  # collecting may take minutes (GBs of LoRAs): not on the watcher's thread
            job.ending = True
            threading.Thread(target=self._end, args=(job, status), name=f"sagemaker-training-{job.name}",
                             daemon=True).start()

    def _status_lines(self, job: _Training, status: TrainingStatus) -> list[str]:
        """A line when SageMaker's (secondary) status changes: Starting, Downloading, Training, Uploading ..."""
        now = f"{status.status}/{status.secondary_status or ''}"
        if now == job.last_status:
            return []
        job.last_status = now
        message = f": {status.status_message}" if status.status_message else ""
        return [f"[sagemaker] training job {job.name}: {status.secondary_status or status.status}{message}"]

    def _log_lines(self, job: _Training) -> list[str]:
        """The complete lines ``train.log`` gained since the last poll (a ranged read)."""
        bucket, prefix = split_s3_uri(job.checkpoint_uri)
        try:
            body = self.training.s3.get_object(Bucket=bucket, Key=f"{prefix}train.log",
                                               Range=f"bytes={job.log_offset}-{job.log_offset + LOG_BYTES_PER_POLL - 1}"
                                               )["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "InvalidRange", "416"):
                return []
            raise
        job.log_offset += len(body)
        text = job.log_rest + body.decode("utf-8", "replace")
        *lines, job.log_rest = text.split("\n")
        return [line.rstrip("\r") for line in lines]

    def _copy(self, job: _Training, relative: str) -> bool:
        try:
            key = self.training.copy_checkpoint_file(job.checkpoint_uri, relative, job.spec.job_id)
        except (ClientError, TrainingError) as exc:  # UnsafeArtifact, or gone: the sample is a nicety
            log.warning("endpoint %s: sample %r of training job %s not copied: %s", self.endpoint, relative,
                        job.name, exc)
            return False
        if key in job.artifacts:
            return False
        job.artifacts.append(key)
        return True

    def _end(self, job: _Training, status: TrainingStatus) -> None:
        try:
            self._collect_and_finish(job, status)
        except (ClientError, BotoCoreError, StorageError, TrainingError) as exc:
            log.warning("endpoint %s: collecting SageMaker training job %s: %s (trying again)", self.endpoint,
                        job.name, exc)
            job.ending = False

    def _collect_and_finish(self, job: _Training, status: TrainingStatus) -> None:
        """The training job ended: its log and LoRAs come home, then the studio job ends."""
        job_id = job.spec.job_id
        if self._size(*split_s3_uri(f"{job.checkpoint_uri}train.log")) is not None:
            self._copy(job, "train.log")
        if status.status == "Failed":
            self._keep_state(job)
            failure = status.failure
            reason = status.failure_reason or "no reason given"
            self._finish(job, Failed(job_id=job_id, kind=failure.kind if failure else "internal",
                                     field=failure.field if failure else None,
                                     message=failure.message if failure else
                                     f"SageMaker training job {job.name} failed: {reason}"))
            return
        loras = self._collect(job)
        if loras is None:
            return
        keys = tuple(dict.fromkeys([*loras, *job.artifacts]))
        if status.status == "Stopped":
            self._keep_state(job)
            how = "cancelled" if job.cancelled else "stopped outside the studio"
            self._finish(job, Cancelled(job_id=job_id, reason=f"{how}; SageMaker stopped training job {job.name}",
                                        artifact_keys=keys))
            return
        final = next((k for k in loras if k.endswith(f"/{job.output_name}.safetensors")), None)
        if final is None:
            self._finish(job, Failed(job_id=job_id, kind="internal", message=f"SageMaker training job {job.name} "
                                     f"completed without the final LoRA in its model.tar.gz (found {len(loras)})"))
            return
        done = job.progress.done or {}
        info = {"lora": final, "epochs": int(done.get("epoch") or job.progress.epochs),
                "steps": int(done.get("step") or job.progress.step), "training_job": job.name}
        self._finish(job, Succeeded(job_id=job_id, info=info, artifact_keys=keys))

    def _collect(self, job: _Training) -> list[str] | None:
        """The job's LoRAs in the store; None (the job failed, reported) when its archive was refused."""
        try:
            return self.training.collect(job.name, job.output_path, job.spec.job_id)
        except TrainingError as exc:  # UnsafeArtifact: nothing was stored
            self._finish(job, Failed(job_id=job.spec.job_id, kind="internal",
                                     message=f"the LoRAs of SageMaker training job {job.name} were refused: {exc}"))
            return None

    def _keep_state(self, job: _Training) -> None:
        """Copy the checkpoint's state.pt to ``jobs/<id>/state/state.pt``: a stopped or failed training resumes
        from its last saved epoch (``TrainingService.resume``), wherever it trains next."""
        bucket, prefix = split_s3_uri(job.checkpoint_uri)
        if self._size(bucket, f"{prefix}state.pt") is None:
            return
        target_bucket, target = split_s3_uri(self.uri(job_keys(job.spec.job_id)["state"]))
        try:
            self.training.s3.copy_object(Bucket=target_bucket, Key=target,
                                         CopySource={"Bucket": bucket, "Key": f"{prefix}state.pt"})
        except ClientError as exc:
            log.warning("endpoint %s: keeping the state of training job %s failed: %s", self.endpoint, job.name, exc)

    def _size(self, bucket: str, key: str) -> int | None:
        """The object's size, None when there is none."""
        try:
            return int(self.training.s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _forget(self, job: _Training) -> bool:
        with self._lock:
            return self._jobs.pop(job.spec.job_id, None) is job

    def _finish(self, job: _Training, event: Event) -> None:
        if self._forget(job):
            self.emit(event)
