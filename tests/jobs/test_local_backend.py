"""The local backend really generates: tiny SD1.5 through pipelines' Engine on the CPU, via the queue."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ADMIN_PASSWORD
from tests.fixtures.studio_models import ModelStudio, build_model_studio
from tests.jobs.conftest import empty_queue, txt2img
from webapp.records import JobStatus


@pytest.fixture(scope="module")
def local_studio(tmp_path_factory, tiny_model_files) -> Iterator[ModelStudio]:
    from webapp.settings import Settings

    data_dir = tmp_path_factory.mktemp("local-studio") / "data"

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=data_dir, admin_password=ADMIN_PASSWORD, **overrides)

    with build_model_studio(make, tiny_model_files, backend="local", devices="cpu", preview_every=1) as built:
        yield built


@pytest.fixture
def studio(local_studio) -> Iterator[ModelStudio]:
    yield local_studio
    empty_queue(local_studio)


def _run(studio: ModelStudio, mode: str = "txt2img", **request: Any):
    job = studio.jobs.submit(actor=studio.admin, mode=mode, request=txt2img(**request))
    done = studio.jobs.wait(actor=studio.admin, job_id=job.id, timeout=120)
    assert done.is_terminal, "the job did not finish in time"
    return done


def _b64_png(color: str, mode: str = "RGB") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (64, 64), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_txt2img_with_networks_is_deterministic_and_the_lora_changes_the_image(studio):
    plain = _run(studio, prompt="a red fox tinyemb", seed=11)
    again = _run(studio, prompt="a red fox tinyemb", seed=11)
    lora = _run(studio, prompt="a red fox tinyemb <lora:tinylora:1>", seed=11)
    for job in (plain, again, lora):
        assert job.status == JobStatus.SUCCEEDED, job.error
        assert job.worker == "local/cpu"
    images = [studio.jobs.images(actor=studio.admin, job_id=j.id)[0] for j in (plain, again, lora)]
    assert images[0] == images[1], "same request and seed: the same PNG"
    assert images[0] != images[2], "the LoRA changes the image"
    assert 'TI hashes: "tinyemb: ' in plain.infotexts[0] and "Model: tiny-sd15" in plain.infotexts[0]
    # AutoV3, as A1111 and Civitai compute it: sha256 of the bytes after the safetensors header
    import hashlib
    import struct

    data = studio.files.lora.read_bytes()
    autov3 = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()[:12]
    assert f'Lora hashes: "tinylora: {autov3}"' in lora.infotexts[0]
    assert lora.info["sd_model_hash"] == studio.models.checkpoint.autov2


def test_vae_and_hypernetwork_are_applied(studio):
    base = _run(studio, seed=3)
    vae = _run(studio, seed=3, override_settings={"sd_vae": "tinyvae"})
    hyper = _run(studio, seed=3, prompt="a red fox <hypernet:tinyhyper:1>")
    assert vae.status == hyper.status == JobStatus.SUCCEEDED, (vae.error, hyper.error)
    assert "VAE: tinyvae" in vae.infotexts[0]
    pngs = {studio.jobs.images(actor=studio.admin, job_id=j.id)[0] for j in (base, vae, hyper)}
    assert len(pngs) == 3


def test_img2img_and_inpaint_run_on_the_engine(studio):
    from PIL import Image

    init = _b64_png("red")
    img2img = _run(studio, "img2img", init_images=[init], denoising_strength=0.5)
    inpaint = _run(studio, "img2img", init_images=[init], mask=_b64_png("white", "L"), inpainting_fill=1)
    assert (img2img.mode, inpaint.mode) == ("img2img", "inpaint")
    assert img2img.status == inpaint.status == JobStatus.SUCCEEDED, (img2img.error, inpaint.error)
    png = studio.jobs.image(actor=studio.admin, job_id=inpaint.id, index=0)
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (64, 64) and "Denoising strength" in image.info["parameters"]


def test_progress_previews_and_cancel_within_a_step(studio):
    jobs, admin = studio.jobs, studio.admin
    job = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=150, n_iter=3))
    deadline = time.monotonic() + 60
    snapshot = jobs.progress(actor=admin, job_id=job.id)
    while snapshot.step < 2:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
        snapshot = jobs.progress(actor=admin, job_id=job.id)
    assert snapshot.total == 150 and snapshot.job_count == 3 and snapshot.preview_png.startswith(b"\x89PNG")
    assert jobs.get(actor=admin, job_id=job.id).worker == "local/cpu"  # recorded when it started, not at the end
    jobs.cancel(actor=admin, job_id=job.id)
    done = jobs.wait(actor=admin, job_id=job.id, timeout=30)
    assert done.status == JobStatus.CANCELLED and done.image_keys == []
    assert done.step < 150 and done.job_no == 0, "stopped in the first pass, long before the end"
    assert _run(studio, seed=1).status == JobStatus.SUCCEEDED, "the worker is free again"


def test_an_engine_refusal_fails_the_job_with_the_engines_message(studio):
    refused = _run(studio, refiner_checkpoint="tiny-sd15", refiner_switch_at=0.5)
    assert refused.status == JobStatus.FAILED and refused.error_kind == "bad_request"
    assert "refiner needs an SDXL" in refused.error


def test_interrupt_keeps_finished_batches_and_skip_moves_on(studio):
    jobs, admin = studio.jobs, studio.admin

    def started_batch(job_id: str, n: int) -> None:
        deadline = time.monotonic() + 60
        while jobs.progress(actor=admin, job_id=job_id).job_no < n:
            assert time.monotonic() < deadline, f"batch {n + 1} never started"
            time.sleep(0.01)

    job = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=60, n_iter=3, seed=70))
    started_batch(job.id, 1)
    assert jobs.skip(actor=admin).id == job.id
    done = jobs.wait(actor=admin, job_id=job.id, timeout=120)
    assert done.status == JobStatus.SUCCEEDED and len(done.image_keys) == 2
    assert done.info["all_seeds"] == [70, 72] and any("skipped" in w for w in done.warnings)

    job = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=60, n_iter=3, seed=70))
    started_batch(job.id, 1)
    jobs.interrupt(actor=admin)
    done = jobs.wait(actor=admin, job_id=job.id, timeout=60)
    assert done.status == JobStatus.CANCELLED and len(done.image_keys) == 1 and done.info["all_seeds"] == [70]
    kept = jobs.images(actor=admin, job_id=job.id)[0]
    assert b"Seed: 70," in kept  # the PNG carries its infotext


def test_out_of_memory_fails_the_job_and_the_next_one_runs(studio, monkeypatch):
    import torch

    import pipelines.engine as engine_module

    real = engine_module.run_pass

    def oom_once(*args, **kwargs):
        monkeypatch.setattr(engine_module, "run_pass", real)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine_module, "run_pass", oom_once)
    failed = _run(studio, seed=3, batch_size=2)
    assert failed.status == JobStatus.FAILED and failed.error_kind == "oom"
    assert "out of GPU memory" in failed.error and "lower the batch size" in failed.error
    assert _run(studio, seed=3).status == JobStatus.SUCCEEDED


def test_unload_releases_every_loaded_model(studio):
    from webapp.services.errors import PermissionDenied

    assert _run(studio, seed=5).status == JobStatus.SUCCEEDED
    runtime = next(iter(studio.jobs.backend("local").runners.values())).runtime
    assert len(runtime.cache) == 1
    alice = studio.users.create_user(actor=studio.admin, username="unload-alice", password="alice-password-9")
    with pytest.raises(PermissionDenied):
        studio.jobs.release_memory(actor=alice)
    assert len(runtime.cache) == 1
    assert studio.jobs.release_memory(actor=studio.admin) == ["local"]
    assert len(runtime.cache) == 0
    assert _run(studio, seed=5).status == JobStatus.SUCCEEDED and len(runtime.cache) == 1


def test_a_request_is_validated_once_per_process_boundary(studio, monkeypatch):
    """Submit validates (images opened header-first once); the dispatcher, the backend and the engine trust
    the JobSpec; a spec that crosses the wire is validated once more, on the receiving side."""
    import pipelines.images
    from deploy.backends.messages import JobSpec
    from pipelines.types import GenerationRequest

    validated, opened = [], []
    validate, image_size = GenerationRequest.validate, pipelines.images.image_size

    def counting_validate(self, limits=None):
        validated.append(self.mode)
        return validate(self, limits)

    def counting_image_size(data, field_name, max_pixels=None):
        opened.append(field_name)
        return image_size(data, field_name, max_pixels)

    monkeypatch.setattr(GenerationRequest, "validate", counting_validate)
    monkeypatch.setattr(pipelines.images, "image_size", counting_image_size)
    backend, specs = studio.jobs.backend("local"), []
    submit = backend.submit
    monkeypatch.setattr(backend, "submit", lambda spec: (specs.append(spec), submit(spec))[1])

    done = _run(studio, "img2img", init_images=[_b64_png("red")], denoising_strength=0.5, steps=2)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert validated == ["img2img"] and opened == ["init_images[0]"], "one validation in this process"

    received = JobSpec.from_json(specs[0].to_json())  # what a worker process does with what arrives
    assert validated == ["img2img", "img2img"] and opened == ["init_images[0]"] * 2
    assert received == specs[0]
