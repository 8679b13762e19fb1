"""ControlNet units through the queue and the real local backend: the job's images, its detected map and
infotext; a unit whose model cannot feed the checkpoint or whose annotator is missing fails the job clearly."""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from deploy.backends.messages import Failed, JobModels, JobSpec, ModelSpec
from pipelines.controlnet.units import ControlUnit
from tests.conftest import ADMIN_PASSWORD
from tests.fixtures.studio_models import ModelStudio, build_model_studio
from tests.jobs.conftest import empty_queue, txt2img
from webapp.records import JobMode, JobStatus
from webapp.services.jobs.requests import engine_request


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_files) -> Iterator[ModelStudio]:
    from tests.tiny import controlnets
    from tests.tiny.fixtures import tiny_files
    from webapp.settings import Settings

    data_dir = tmp_path_factory.mktemp("cn-studio") / "data"
    root = tmp_path_factory.mktemp("cn-files")

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=data_dir, admin_password=ADMIN_PASSWORD, **overrides)

    with build_model_studio(make, tiny_model_files, backend="local", devices="cpu") as built:
        for name, kind in (("cn15", "sd15"), ("cnxl", "sdxl")):
            model = controlnets.tiny_controlnet(tiny_files().pipeline(kind).unet)
            path = controlnets.write_diffusers_file(root / f"{name}.safetensors", model)
            built.registry.register_file(actor=built.admin, path=path, declared_type="controlnet", name=name)
        yield built
        empty_queue(built)


def _png_b64() -> str:
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _unit(**kw: Any) -> dict[str, Any]:
    return {"enabled": True, "module": "canny", "model": "cn15", "image": _png_b64(), **kw}


def _run(studio: ModelStudio, *units: dict[str, Any]):
    request = txt2img(steps=3, alwayson_scripts={"controlnet": {"args": list(units)}})
    job = studio.jobs.submit(actor=studio.admin, mode="txt2img", request=request)
    done = studio.jobs.wait(actor=studio.admin, job_id=job.id, timeout=120)
    assert done.is_terminal
    return done


def test_a_unit_changes_the_image_and_its_map_follows_without_a_seed(studio):
    plain = _run(studio)
    job = _run(studio, _unit())
    quiet = _run(studio, _unit(save_detected_map=False))
    assert job.status == plain.status == quiet.status == JobStatus.SUCCEEDED, (job.error, plain.error)
    assert len(job.image_keys) == 2 and len(job.infotexts) == 1 and job.info["all_seeds"] == [7]
    images = studio.jobs.images(actor=studio.admin, job_id=job.id)
    assert images[0] != studio.jobs.images(actor=studio.admin, job_id=plain.id)[0]
    assert 'ControlNet 0: "Module: canny, Model: cn15 [' in job.infotexts[0]
    assert Image.open(io.BytesIO(images[1])).size == (64, 64)
    assert len(quiet.image_keys) == 1


def test_a_missing_annotator_fails_the_job_naming_the_file(studio):
    job = _run(studio, _unit(module="depth_midas"))
    assert job.status == JobStatus.FAILED
    assert "annotators" in job.error and ".pt" in job.error


def test_a_controlnet_that_cannot_feed_the_checkpoint_fails_naming_the_unit(studio):
    """The service refuses most base mismatches at submit; the worker checks the tensors themselves."""
    backend = studio.jobs.backend("local")
    record = next(r for r in studio.registry.list_models(actor=studio.admin, type="controlnet") if r.name == "cnxl")
    ok = _run(studio, _unit())
    models = JobModels.from_dict(ok.models)
    xl = ModelSpec(kind="controlnet", name="cnxl", sha256=record.sha256, file=studio.registry.file_ref(record))
    unit = ControlUnit(model="cnxl", module="canny", image=base64.b64decode(_png_b64()))
    spec = JobSpec.from_dict(JobSpec(
        job_id="direct-1", mode="txt2img", request=engine_request(JobMode.TXT2IMG, ok.request),
        models=dataclasses.replace(models, controlnets=(xl,)), controlnet_units=(unit,)).to_dict())
    outcome = backend.run_job(SimpleNamespace(label="cpu"), spec)
    assert isinstance(outcome, Failed) and outcome.kind == "bad_request"
    assert outcome.message.startswith("ControlNet unit 0 (cnxl) is for SDXL but the checkpoint is")



def test_a_unit_is_parsed_once_in_this_process(studio, monkeypatch):
    """Its image is checked at submit; the dispatcher and the runner use the parsed unit."""
    import pipelines.controlnet.units as units_module

    checked = []
    image_size = units_module.image_size

    def counting_image_size(data, field_name, max_pixels=None):
        checked.append(field_name)
        return image_size(data, field_name, max_pixels)

    monkeypatch.setattr(units_module, "image_size", counting_image_size)
    job = _run(studio, _unit(save_detected_map=False))
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert checked == ["alwayson_scripts.controlnet.args[0].image"]
