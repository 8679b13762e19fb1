"""A training from the service to the models list on the real local backend (tiny SD1.5 on the CPU): the training
runner runs ``python -m training``, the loss and samples come back, a stop keeps the saved epoch, the resumed
training continues from it, and the succeeded training's LoRAs are registered as the owner's models."""

from __future__ import annotations

import json
import time

import pytest

from tests.datasets.conftest import png
from tests.fixtures.studio_models import model_studio, tiny_model_files  # noqa: F401 - fixtures
from webapp.records import JobStatus, ModelType

pytest.importorskip("deploy.training_runner", reason="the training runner (issue 13) is not in this tree")

# Enough epochs that the stop lands mid-run: the row learns of epoch 1's file up to a second late (progress writes
# are batched), and a tiny epoch takes a fraction of that.
CONFIG = """network_dim = 4
network_alpha = 4
max_train_epochs = 40
resolution = 64
enable_bucket = false
mixed_precision = "no"
sample_prompts = ["a red square --w 64 --h 64 --s 2 --d 1"]
sample_every_n_epochs = 10
"""


def _until(predicate, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_train_stop_resume_and_register_on_the_local_backend(model_studio):  # noqa: F811
    studio, admin = model_studio, model_studio.admin
    dataset = studio.datasets.create(actor=admin, name="squares", files=[
        ("a.png", png(64, 64)), ("a.txt", b"a red square"), ("b.png", png(64, 64, (0, 0, 200))),
        ("b.txt", b"a blue square")]).dataset
    job = studio.trainings.create(actor=admin, base_type="sd15", base_model="tiny-sd15", dataset_id=dataset.id,
                                  config=CONFIG, output_name="squares")
    epoch_one = f"jobs/{job.id}/lora/squares-000001.safetensors"
    _until(lambda: epoch_one in studio.trainings.get(actor=admin, job_id=job.id).artifact_keys)
    studio.trainings.stop(actor=admin, job_id=job.id)
    stopped = studio.jobs.wait(actor=admin, job_id=job.id, timeout=120)
    assert stopped.status == JobStatus.CANCELLED and studio.trainings.resumable(stopped)

    resumed = studio.trainings.resume(actor=admin, job_id=job.id)
    done = studio.jobs.wait(actor=admin, job_id=resumed.id, timeout=300)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert any("resuming from the saved state" in line for line in done.log_lines)
    assert done.info["epochs"] == 40 and done.info["lora"] == f"jobs/{resumed.id}/lora/squares.safetensors"
    losses = [p["loss"] for p in done.metrics["history"] if "loss" in p]
    assert losses and all(loss > 0 for loss in losses)
    # the epochs saved before the stop were carried over to the resumed job: it holds every epoch's LoRA
    before_stop = [key.rsplit("/", 1)[1] for key in stopped.artifact_keys if "/lora/" in key]
    assert before_stop and "squares-000001.safetensors" in before_stop
    loras = [key.rsplit("/", 1)[1] for key in done.artifact_keys if "/lora/" in key]
    assert loras == [*before_stop, *(f"squares-{e:06d}.safetensors" for e in range(len(before_stop) + 1, 40)),
                     "squares.safetensors"], loras
    assert studio.trainings.samples(actor=admin, job_id=resumed.id)

    studio.training_registrar.wait(120)
    finished = studio.trainings.get(actor=admin, job_id=resumed.id)
    registered = finished.info["registered_models"]
    assert sorted(finished.info["handed_to_models"]) == sorted(registered), "the models hold the LoRAs' only copy"
    assert finished.stored_bytes == len(finished.request_json.encode()) + sum(
        blob.size for blob in studio.store.list(f"jobs/{resumed.id}/")), "the job counts what it still stores"
    models = {m.name: m for m in studio.registry.list_models(actor=admin, type=ModelType.LORA)
              if m.id in registered.values()}
    assert sorted(models) == sorted(name.removesuffix(".safetensors") for name in loras), "every epoch, once"
    assert len(set(registered.values())) == len(loras) == len(registered)
    assert "squares" in models and models["squares"].base == "sd1"
    assert json.loads(models["squares"].metadata_json)["summary"]["epoch"] == 40
