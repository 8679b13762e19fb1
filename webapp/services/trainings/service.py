"""`TrainingService`: LoRA trainings as ``train_lora`` jobs — checked, submitted, followed, stopped, resumed.

A training is a job of kind ``train_lora`` (``deploy.jobkinds``) whose payload is the training contract's:
base type, the checked config (``training.config``), the dataset and its place in the asset store, the output
name and the base model's name; the base checkpoint travels as the job's ``models.checkpoint`` like a
generation's. Everything is checked before anything is stored, so a refused training leaves no row: the base
model must be a checkpoint the actor can see whose architecture matches the base type, the dataset one they
can see with images, the config valid for that base (every bad key named), the output name a plain file name.

Authorisation (``webapp.services.access``): creating or resuming needs ``training:create``, ``model:use`` on the
base checkpoint, ``dataset:use`` on the dataset and ``endpoint:use`` on the endpoint; stopping ``training:update``
and deleting ``training:delete`` (the job service checks both). Who sees what follows the job service: owners
and holders of ``training:all``; anyone else gets NotFound. Files (LoRAs, samples, the log) are read only by
artifact key of a job the actor may see.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import IO, Any

from deploy.backends.messages import JobModels, ModelSpec
from deploy.jobkinds import GENERATE, TRAIN_LORA
from deploy.storage import BlobNotFound, BlobStore, StorageError
from training.config import BASE_TYPES, ConfigError, TrainingConfig, default_config, parse_config
from training.config import format_config as normalise_config
from webapp.records import (
    Dataset,
    Endpoint,
    Job,
    JobStatus,
    ModelRecord,
    ModelStatus,
    ModelType,
    User,
    new_id,
)
from webapp.services.access import authorize, can
from webapp.services.datasets import DatasetService
from webapp.services.errors import Conflict, InvalidInput, NotFound, PermissionDenied, Unavailable
from webapp.services.jobs import JobService, ProgressSnapshot
from webapp.services.models import ModelRegistry

log = logging.getLogger(__name__)

BASE_OF_TYPE = {"sd15": "sd1", "sdxl": "sdxl"}
"""The registry's detected base (``ModelRecord.base``) a checkpoint must have for each training base type."""
STATE_KEY = "state/state.pt"
"""Below ``jobs/<id>/``: the resumable state the training runner keeps (not an artifact)."""
RESUMABLE = frozenset({JobStatus.CANCELLED, JobStatus.FAILED})
REGISTERED = "registered_models"
"""``Job.info`` key: artifact key → id of the model the registrar made of that LoRA."""
HANDED = "handed_to_models"
"""``Job.info`` key: the LoRAs whose only stored copy is now their model's (the job gave its copy up)."""


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def lora_keys(job: Job) -> list[str]:
    """The job's LoRA files (epochs and final) among its artifacts, in the order they were made."""
    prefix = f"{job_prefix(job.id)}lora/"
    return [k for k in job.artifact_keys if k.startswith(prefix) and k.endswith(".safetensors")]


def sample_keys(job: Job) -> list[str]:
    prefix = f"{job_prefix(job.id)}samples/"
    return [k for k in job.artifact_keys if k.startswith(prefix) and k.lower().endswith(".png")]


def _config_error(exc: ConfigError) -> InvalidInput:
    """A config problem for the edge: the message names every bad key, ``field`` the first."""
    field = f"config.{exc.field}" if exc.field else "config"
    return InvalidInput(f"config: {exc.message}", field=field)


def _check_base_type(base_type: str) -> str:
    if base_type not in BASE_TYPES:
        raise InvalidInput(f"`base_type` must be one of {', '.join(BASE_TYPES)} but is {base_type!r}",
                           field="base_type")
    return base_type


class TrainingService:
    def __init__(self, *, jobs: JobService, registry: ModelRegistry, datasets: DatasetService,
                 store: BlobStore) -> None:
        self._jobs = jobs
        self._registry = registry
        self._datasets = datasets
        self._store = store

    # -- config ---------------------------------------------------------------------------------------------

    @staticmethod
    def defaults(base_type: str) -> dict[str, Any]:
        """The editable per-base defaults (kohya keys)."""
        return default_config(_check_base_type(base_type))

    @staticmethod
    def format_config(text: str | Mapping[str, Any], base_type: str) -> tuple[str, list[str]]:
        """The config as normalised TOML (defaults filled in) and its warnings; InvalidInput names bad keys."""
        _check_base_type(base_type)
        try:
            return normalise_config(text, base_type=base_type)
        except ConfigError as exc:
            raise _config_error(exc) from None

    @staticmethod
    def parse(config: str | Mapping[str, Any] | None, base_type: str, output_name: str | None) -> TrainingConfig:
        """The checked config; ``output_name`` (when given) replaces the config's own."""
        _check_base_type(base_type)
        if config is not None and not isinstance(config, str | Mapping):
            raise InvalidInput("`config` must be an object of kohya keys, or TOML / JSON text", field="config")
        try:
            checked = parse_config(config or {}, base_type=base_type)
        except ConfigError as exc:
            raise _config_error(exc) from None
        if output_name is None or not str(output_name).strip():
            return checked
        try:  # the config's own rule for file names, so both places accept the same names
            named = parse_config({**checked.to_dict(), "output_name": str(output_name).strip()}, base_type=base_type)
        except ConfigError as exc:
            reason = next((why for key, why in exc.problems if key == "output_name"), exc.message)
            raise InvalidInput(f"`output_name` {reason}", field="output_name") from None
        return dataclasses.replace(checked, output_name=named.output_name)

    # -- creating -------------------------------------------------------------------------------------------

    def base_model(self, *, actor: User, base_type: str, ref: str) -> ModelRecord:
        """The checkpoint ``ref`` (a model id or a name / title / hash) that ``actor`` sees, of ``base_type``."""
        _check_base_type(base_type)
        if not isinstance(ref, str) or not ref.strip():
            raise InvalidInput("`base_model` must name a checkpoint (its id or name)", field="base_model")
        try:
            record: ModelRecord | None = self._registry.get(actor=actor, model_id=ref.strip())
        except NotFound:
            record = self._registry.find(actor=actor, type=ModelType.CHECKPOINT, ref=ref.strip())
        if record is None or record.type != ModelType.CHECKPOINT:
            raise InvalidInput(f"no checkpoint {ref!r} (give a checkpoint's id or name)", field="base_model")
        if not can(actor, "model:use", record):
            raise PermissionDenied(f"{actor.username!r} may not use checkpoint {record.name!r} (model:use)",
                                   field="base_model")
        if record.status != ModelStatus.ACTIVE or not record.sha256:
            raise InvalidInput(f"checkpoint {record.name!r} is {record.status.value}, not usable yet",
                               field="base_model")
        wanted = BASE_OF_TYPE[base_type]
        if record.base != wanted:
            raise InvalidInput(f"checkpoint {record.name!r} is a {record.base or 'model of unknown base'} model, not "
                               f"{base_type} ({wanted}); choose a {base_type} checkpoint or change `base_type`",
                               field="base_model")
        return record

    def checkpoints(self, *, actor: User, base_type: str) -> list[ModelRecord]:
        """The checkpoints ``actor`` may train on for ``base_type`` (the UI's dropdown)."""
        return self._registry.list_models(actor=actor, type=ModelType.CHECKPOINT,
                                          base=BASE_OF_TYPE[_check_base_type(base_type)])

    def dataset(self, *, actor: User, dataset_id: str) -> Dataset:
        if not isinstance(dataset_id, str) or not dataset_id.strip():
            raise InvalidInput("`dataset_id` must name a dataset", field="dataset_id")
        try:
            dataset = self._datasets.get(actor=actor, dataset_id=dataset_id.strip())
        except NotFound:
            raise InvalidInput(f"no dataset with id {dataset_id!r}", field="dataset_id") from None
        if not can(actor, "dataset:use", dataset):
            raise PermissionDenied(f"{actor.username!r} may not use dataset {dataset.name!r} (dataset:use)",
                                   field="dataset_id")
        if dataset.image_count < 1:
            raise InvalidInput(f"dataset {dataset.name!r} has no images", field="dataset_id")
        return dataset

    def endpoints(self, *, actor: User) -> list[Endpoint]:
        """The endpoints that run trainings (their backend declares ``train_lora``), the default one first."""
        found = [e for e in self._jobs.endpoints.list_endpoints(actor=actor)
                 if TRAIN_LORA in (e.capabilities.get("kinds") or [GENERATE])]
        return sorted(found, key=lambda e: not e.is_default)

    def endpoint_for(self, *, actor: User, name: str | None) -> str | None:
        """``name``, or when none is given the default endpoint if it trains, else the first that does (None:
        none does, and the job service says so)."""
        if name:
            return name
        found = self.endpoints(actor=actor)
        return found[0].name if found else None

    def create(self, *, actor: User, base_type: str, base_model: str, dataset_id: str,
               config: str | Mapping[str, Any] | None = None, output_name: str | None = None,
               endpoint: str | None = None) -> Job:
        """Check everything, then queue a ``train_lora`` job (the payload of the training contract)."""
        authorize(actor, "training:create")
        _check_base_type(base_type)
        checked = self.parse(config, base_type, output_name)
        record = self.base_model(actor=actor, base_type=base_type, ref=base_model)
        dataset = self.dataset(actor=actor, dataset_id=dataset_id)
        payload = {
            "base_type": base_type, "config": checked.to_dict(), "dataset_id": dataset.id,
            "dataset_prefix": f"datasets/{dataset.id}/", "output_name": checked.output_name,
            "base_model_name": record.name,
        }
        job = self._jobs.submit_task(actor=actor, kind=TRAIN_LORA, payload=payload, models=self._models(record),
                                     endpoint=self.endpoint_for(actor=actor, name=endpoint))
        log.info("training %s (%s on %s, dataset %s) queued by %s", job.id, checked.output_name, record.name,
                 dataset.id, actor.username)
        return job

    def _models(self, record: ModelRecord) -> JobModels:
        ref = self._registry.file_ref(record)
        return JobModels(checkpoint=ModelSpec(kind="checkpoint", name=record.name, sha256=ref.sha256, file=ref))

    # -- reading --------------------------------------------------------------------------------------------

    def list_trainings(self, *, actor: User, limit: int | None = 100, offset: int = 0) -> tuple[list[Job], int]:
        """Trainings the actor may see, newest first: their own; administrators everyone's."""
        return self._jobs.list_jobs(actor=actor, mode="train", limit=limit, offset=offset, all_users=can(actor, "training:all"))

    def get(self, *, actor: User, job_id: str) -> Job:
        job = self._jobs.get(actor=actor, job_id=job_id)
        if job.kind != TRAIN_LORA:
            raise NotFound(f"no training {job_id!r}", field="job_id")
        return job

    def snapshot(self, job: Job) -> ProgressSnapshot:
        """Where a training the caller already loaded stands (live progress and metrics while it runs)."""
        return self._jobs.snapshot_of(job)

    def resumable(self, job: Job) -> bool:
        return job.status in RESUMABLE and self.has_state(job)

    def has_state(self, job: Job) -> bool:
        """Whether the job left resumable state (a saved epoch) in the store."""
        try:
            return self._store.stat(job_prefix(job.id) + STATE_KEY) is not None
        except StorageError:
            return False

    def artifact(self, *, actor: User, job_id: str, key: str) -> IO[bytes]:
        """Any artifact (LoRA, sample, log) of a training the actor may see, open for reading; a LoRA registered
        as a model is read from the model, which holds its only copy."""
        job = self.get(actor=actor, job_id=job_id)
        if key not in job.artifact_keys:  # never the resume state, a dataset or another job's file
            raise NotFound(f"training {job.id!r} has no file {key!r}", field="key")
        info = job.info or {}
        if key in (info.get(HANDED) or ()):
            return self._model_file(actor, job, key, str((info.get(REGISTERED) or {}).get(key, "")))
        try:
            return self._store.open(key)
        except BlobNotFound:
            raise NotFound(f"{key} of training {job_id!r} is missing from the asset store", field="key") from None

    def _model_file(self, actor: User, job: Job, key: str, model_id: str) -> IO[bytes]:
        try:
            record = self._registry.get(actor=actor, model_id=model_id)
            if not record.store_key:
                raise NotFound(f"model {model_id!r} has no stored file", field="key")
            return self._store.open(record.store_key)
        except (NotFound, BlobNotFound):
            raise NotFound(f"{key} of training {job.id!r} was registered as model {model_id!r}, which is gone "
                           "(deleted with its file)", field="key") from None

    def samples(self, *, actor: User, job_id: str) -> list[tuple[str, bytes]]:
        """Every sample of a training as (key, PNG bytes), oldest first; missing ones are left out."""
        job = self.get(actor=actor, job_id=job_id)
        found = []
        for key in sample_keys(job):
            try:
                found.append((key, self._read(key)))
            except NotFound:
                continue
        return found

    def _read(self, key: str) -> bytes:
        try:
            with self._store.open(key) as handle:
                return handle.read()
        except BlobNotFound:
            raise NotFound(f"{key} is missing from the asset store", field="key") from None
        except StorageError as exc:
            raise Unavailable(f"the asset store cannot read {key}: {exc}") from exc

    # -- changing -------------------------------------------------------------------------------------------

    def stop(self, *, actor: User, job_id: str) -> Job:
        """Stop a training: queued ones end now, running ones at the next step (saved epochs are kept)."""
        self.get(actor=actor, job_id=job_id)
        return self._jobs.cancel(actor=actor, job_id=job_id)

    def delete(self, *, actor: User, job_id: str) -> None:
        """Delete the training job and its files; LoRAs already registered as models stay."""
        self.get(actor=actor, job_id=job_id)
        self._jobs.delete(actor=actor, job_id=job_id)

    def resume(self, *, actor: User, job_id: str, endpoint: str | None = None) -> Job:
        """A new job with the stopped or failed training's payload, starting after its last saved epoch: the
        old job's state, epoch LoRAs and samples are copied to the new job's place before the new job can be
        claimed, so the resumed training's LoRAs are every epoch's."""
        old = self.get(actor=actor, job_id=job_id)
        authorize(actor, "training:create")
        if old.status not in RESUMABLE:
            raise Conflict(f"training {job_id!r} is {old.status}; only stopped or failed trainings resume",
                           field="job_id")
        if not self.has_state(old):
            raise Conflict(f"training {job_id!r} saved no epoch to resume from; start a new training instead",
                           field="job_id")
        payload = old.request
        base_type = payload.get("base_type", "")
        checked = self.parse(payload.get("config") or {}, base_type, payload.get("output_name"))
        record = self.base_model(actor=actor, base_type=base_type, ref=str(old.models.get("checkpoint", {})
                                                                             .get("sha256") or ""))
        dataset = self.dataset(actor=actor, dataset_id=str(payload.get("dataset_id") or ""))
        new_payload = {**payload, "config": checked.to_dict(), "dataset_prefix": f"datasets/{dataset.id}/",
                       "base_model_name": record.name}
        new_job_id = new_id()
        copied = self._carry_over(old, new_job_id)
        try:
            job = self._jobs.submit_task(actor=actor, kind=TRAIN_LORA, payload=new_payload,
                                         models=self._models(record),
                                         endpoint=self.endpoint_for(actor=actor, name=endpoint or old.endpoint),
                                         job_id=new_job_id, artifact_keys=copied[1:])
        except BaseException:
            self._delete_quietly(copied)  # a refused resume leaves nothing behind
            raise
        log.info("training %s resumed by %s as %s (%d file(s) carried over)", old.id, actor.username, job.id,
                 len(copied) - 1)
        return job

    def _carry_over(self, old: Job, new_job_id: str) -> list[str]:
        """Copy what the new job continues from to ``jobs/<new>/``: the saved state, then the epoch LoRAs and samples
        made before the stop. The new job owns them (its artifacts from the start, registered with its own LoRAs
        when it succeeds); the old job keeps its files until it is deleted. Returns the new keys, the state's
        first; on a failure nothing copied stays."""
        old_prefix, new_prefix = job_prefix(old.id), job_prefix(new_job_id)
        sources = [old_prefix + STATE_KEY, *lora_keys(old), *sample_keys(old)]
        copied: list[str] = []
        try:
            for source in sources:
                target = new_prefix + source.removeprefix(old_prefix)
                with self._store.open(source) as handle:
                    self._store.put(target, handle, content_type="application/octet-stream"
                                    if source.endswith((".pt", ".safetensors")) else "image/png")
                copied.append(target)
        except StorageError as exc:
            self._delete_quietly(copied)
            what = "saved state" if not copied else PurePosixPath(source).name
            raise Unavailable(f"could not copy the {what} of training {old.id!r}: {exc}", field="job_id") from exc
        return copied

    def _delete_quietly(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self._store.delete(key)
            except StorageError:
                log.warning("could not delete %s after a refused resume", key, exc_info=True)
