"""Pass inputs: the task follows from typed inputs, pipeline classes come by (family, task, control variant),
and per-job controls reach every pass of every mode through one seam."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import passes
from pipelines.errors import PipelineError
from pipelines.passes import ControlInput, InitImage, InpaintMask, PassSpec, PassTarget, Task
from tests.pipelines.test_gen_fixtures import diff, engine, png, request, world


class _Unguided(ControlInput):
    """A test control: its pass runs without classifier-free guidance (visible in the image)."""

    variant = "unguided"
    combined: list[tuple[Task, int]] = []

    @classmethod
    def pipeline_kwargs(cls, inputs: Sequence[ControlInput], task: Task) -> dict[str, Any]:
        cls.combined.append((task, len(inputs)))
        return {"guidance_scale": 1.0}


class _Source:
    def __init__(self, phases: tuple[str, ...] = ("base", "hires")) -> None:
        self.phases = phases
        self.asked: list[PassTarget] = []

    def for_pass(self, target: PassTarget) -> ControlInput | None:
        self.asked.append(target)
        return _Unguided() if target.phase in self.phases else None


@pytest.fixture
def unguided_pipelines(monkeypatch):
    monkeypatch.setattr(passes, "_PIPELINE_CLASSES", dict(passes._PIPELINE_CLASSES))
    passes.register_pipeline_classes("unguided", {(sdxl, task): passes.pipeline_class_name(sdxl, task)
                                                  for sdxl in (False, True) for task in passes.TASKS})
    _Unguided.combined.clear()


def _spec(**kwargs: Any) -> PassSpec:
    values: dict[str, Any] = {"steps": 2, "cfg_scale": 5.0, "conds": None, "noise": torch.zeros(2, 4, 8, 8),
                              "generators": [], "width": 64, "height": 64}
    values.update(kwargs)
    return PassSpec(**values)


def test_the_task_follows_from_the_inputs():
    init = InitImage([Image.new("RGB", (64, 64))] * 2, 0.5)
    assert _spec().task == "txt2img"
    assert _spec(init=init).task == "img2img"
    inpaint = _spec(init=init, mask=InpaintMask(Image.new("L", (64, 64), 255)), phase="hires")
    assert inpaint.task == "inpaint" and inpaint.target == PassTarget("hires", "inpaint", 64, 64, 2)
    with pytest.raises(ValueError, match="init"):
        _spec(mask=InpaintMask(Image.new("L", (64, 64), 255)))


def test_pipeline_classes_are_chosen_by_family_task_and_variant(unguided_pipelines):
    assert passes.pipeline_class_name(True, "inpaint") == "StableDiffusionXLInpaintPipeline"
    assert passes.pipeline_class_name(False, "img2img", "unguided") == "StableDiffusionImg2ImgPipeline"
    with pytest.raises(PipelineError, match="no pipeline runs txt2img with other controls for SDXL"):
        passes.pipeline_class_name(True, "txt2img", "other")
    with pytest.raises(PipelineError, match="one variant"):
        class _Other(_Unguided):
            variant = "other"
        _spec(controls=(_Unguided(), _Other()))


def test_job_controls_reach_every_pass_they_join(unguided_pipelines):
    eng = engine()
    w = world()
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5}
    plain = eng.generate(request(**hires), w.models())
    source = _Source()
    steered = eng.generate(request(**hires), w.models(), controls=[source, _Source(phases=("hires",))])
    assert [(t.phase, t.task, t.width, t.height, t.batch) for t in source.asked] == [
        ("base", "txt2img", 64, 64, 1), ("hires", "img2img", 96, 96, 1)]
    assert _Unguided.combined == [("txt2img", 1), ("img2img", 2)]
    assert diff(plain.images[0], steered.images[0]) > 0
    again = eng.generate(request(**hires), w.models())
    assert diff(plain.images[0], again.images[0]) == 0  # nothing of the controls stays behind


@pytest.mark.parametrize(("mode", "kind", "task"), [
    ("img2img", "sd15", "img2img"), ("inpaint", "sd15", "inpaint"), ("txt2img", "sd15_inpaint", "inpaint"),
])
def test_controls_see_the_task_each_mode_runs(unguided_pipelines, mode, kind, task):
    rng = np.random.default_rng(0)
    init = png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    images = {"init_images": (init,), "denoising_strength": 0.6} if mode != "txt2img" else {}
    if mode == "inpaint":
        images["mask"] = png(mask)
    source = _Source()
    eng = engine()
    eng.generate(request(mode=mode, **images), world().models(kind), controls=[source])
    assert [(t.phase, t.task) for t in source.asked] == [("base", task)]
    assert _Unguided.combined == [(task, 1)]
