"""ControlNet units through the Engine on the tiny models: every unit field changes the image as the
extension's does, in txt2img, img2img, inpaint and the hires pass, and nothing stays on the pipelines."""

from __future__ import annotations

import base64
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.controlnet.apply import SOFT_DECAY, ControlNetSource, build_sources, pixel_perfect_resolution
from pipelines.controlnet.loader import BaseMismatch, load_controlnet
from pipelines.controlnet.preprocessors import Annotators
from pipelines.controlnet.units import ControlMode, ControlUnit, HiresOption, ResizeMode, parse_indexed_units
from pipelines.engine import Engine
from pipelines.types import ModelRef
from tests.pipelines.test_gen_fixtures import (
    PIPE_FILES,
    Provider,
    diff,
    fresh_pipeline,
    png,
    request,
    sha256_file,
    world,
)
from tests.tiny import controlnets

_RNG = np.random.default_rng(3)
HINT = Image.fromarray(_RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def b64(image: Image.Image) -> str:
    """As a client sends an image in ``alwayson_scripts`` (parsed units hold the bytes)."""
    return base64.b64encode(png(image)).decode("ascii")


@cache
def cn_files() -> dict[str, ModelRef]:
    w = world()
    root = w.root / "controlnet"
    root.mkdir(exist_ok=True)
    refs = {}
    for name, kind, seed in (("cn15", "sd15", 7), ("cn15b", "sd15", 11), ("cnxl", "sdxl", 7)):
        model = controlnets.tiny_controlnet(w.pipes[PIPE_FILES[kind]].unet, seed=seed)
        path = controlnets.write_diffusers_file(root / f"{name}.safetensors", model)
        refs[name] = ModelRef(name=name, path=path, sha256=sha256_file(path), kind="controlnet")
    return refs


def load(path: Path, sha256: str | None = None):
    return load_controlnet(path)


@pytest.fixture(scope="module")
def eng() -> Engine:
    return Engine(Provider(world().pipes))


@pytest.fixture(scope="module")
def annotators(tmp_path_factory) -> Annotators:
    return Annotators(tmp_path_factory.mktemp("annotators"))


def run(eng: Engine, annotators: Annotators, units=(), models=None, kind: str = "sd15", **kw):
    req = request(**kw)
    names = models or ["cn15"] * len(units)
    refs = [cn_files()[n] for n in names]
    warnings: list[str] = []
    sources = build_sources(units, refs, req, world().pipes[PIPE_FILES[kind]].unet.config, load, annotators,
                            warnings)
    result = eng.generate(req, world().models(kind), controls=sources)
    return result, sources


def unit(**kw) -> ControlUnit:
    values = {"model": "cn15", "module": "none", "image": png(HINT)}
    values.update(kw)
    return ControlUnit(**values)


def test_a_unit_changes_the_image_and_weight_zero_equals_no_unit(eng, annotators):
    plain, _ = run(eng, annotators)
    on, _ = run(eng, annotators, [unit()])
    off, _ = run(eng, annotators, [unit(weight=0.0)])
    half, _ = run(eng, annotators, [unit(weight=0.5)])
    assert diff(on.images[0], plain.images[0]) > 0.5
    assert diff(off.images[0], plain.images[0]) == 0
    assert 0 < diff(half.images[0], plain.images[0]) < diff(on.images[0], plain.images[0])


def test_guidance_start_and_end_change_the_image(eng, annotators):
    full, _ = run(eng, annotators, [unit()], steps=4)
    late, _ = run(eng, annotators, [unit(guidance_start=0.5)], steps=4)
    early, _ = run(eng, annotators, [unit(guidance_end=0.5)], steps=4)
    outs = [full.images[0], late.images[0], early.images[0]]
    assert all(diff(a, b) > 0 for i, a in enumerate(outs) for b in outs[i + 1:])


def test_control_modes_differ(eng, annotators):
    outs = {mode: run(eng, annotators, [unit(control_mode=mode)])[0].images[0] for mode in ControlMode}
    assert diff(outs[ControlMode.BALANCED], outs[ControlMode.PROMPT]) > 0
    assert diff(outs[ControlMode.PROMPT], outs[ControlMode.CONTROLNET]) > 0
    assert diff(outs[ControlMode.BALANCED], outs[ControlMode.CONTROLNET]) > 0
    assert pytest.approx(0.099, abs=1e-3) == SOFT_DECAY ** 12


def test_two_units_differ_from_one(eng, annotators):
    one, _ = run(eng, annotators, [unit()])
    other = unit(model="cn15b", image=png(HINT.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    two, _ = run(eng, annotators, [unit(), other], models=["cn15", "cn15b"])
    assert diff(one.images[0], two.images[0]) > 0


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpaint_with_a_unit(eng, annotators, mode):
    init = png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    images = {"mode": mode, "init_images": (init,), "denoising_strength": 0.8}
    if mode == "inpaint":
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (8, 8, 56, 56))
        images["mask"] = png(mask)
    plain, _ = run(eng, annotators, **images)
    with_unit, _ = run(eng, annotators, [unit()], **images)
    assert diff(plain.images[0], with_unit.images[0]) > 0


@pytest.mark.parametrize("hires", [False, True])
def test_an_inpainting_checkpoint_runs_a_unit_also_in_a_latent_hires_pass(eng, annotators, hires):
    kw = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6} if hires else {}
    plain, _ = run(eng, annotators, kind="sd15_inpaint", **kw)
    on, _ = run(eng, annotators, [unit()], kind="sd15_inpaint", **kw)
    assert diff(plain.images[0], on.images[0]) > 0


def test_a_unit_without_image_uses_the_init_image(eng, annotators):
    init = png(HINT)
    own, _ = run(eng, annotators, [unit()], mode="img2img", init_images=(init,), denoising_strength=0.8)
    borrowed, _ = run(eng, annotators, [unit(image=None)], mode="img2img", init_images=(init,),
                      denoising_strength=0.8)
    assert diff(own.images[0], borrowed.images[0]) == 0


def test_hires_option_low_res_only_leaves_the_hires_pass_uncontrolled(eng, annotators):
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6}
    both, sources = run(eng, annotators, [unit()], **hires)
    low, _ = run(eng, annotators, [unit(hr_option=HiresOption.LOW_RES_ONLY)], **hires)
    assert diff(both.images[0], low.images[0]) > 0
    assert set(sources[0]._maps) == {(64, 64), (96, 96)}, "Both prepares a map for the hires size too"
    high = ControlNetSource(0, unit(hr_option=HiresOption.HIGH_RES_ONLY), None, HINT, annotators, hires=True)
    assert not high.joins("base") and high.joins("hires") and not high.joins("refiner")
    assert ControlNetSource(0, unit(hr_option=HiresOption.HIGH_RES_ONLY), None, HINT, annotators).joins("base")


def test_sdxl_unit_runs(eng, annotators):
    plain, _ = run(eng, annotators, kind="sdxl")
    on, _ = run(eng, annotators, [unit(model="cnxl")], models=["cnxl"], kind="sdxl")
    assert diff(plain.images[0], on.images[0]) > 0


def test_base_mismatch_is_refused_naming_the_unit(eng, annotators):
    with pytest.raises(BaseMismatch, match=r"ControlNet unit 1 \(cnxl\)"):
        run(eng, annotators, [unit(), unit(model="cnxl")], models=["cn15", "cnxl"])


def test_errors_in_the_worker_name_the_units_args_index_not_its_enabled_position(eng, annotators):
    args = [{"enabled": False}, {"model": "cn15", "module": "none", "image": b64(HINT)},
            {"model": "cnxl", "module": "none", "image": b64(HINT)}]
    units = [u for _, u in parse_indexed_units({"controlnet": {"args": args}})[0]]
    assert [u.arg_index for u in units] == [1, 2]
    shipped = [ControlUnit.from_dict(u.to_dict()) for u in units]  # as a JobSpec carries them
    with pytest.raises(BaseMismatch, match=r"ControlNet unit 2 \(cnxl\)"):
        run(eng, annotators, shipped, models=["cn15", "cnxl"])


def test_an_inpaint_unit_without_image_or_mask_uses_the_inpaint_jobs_own_mask(eng, annotators):
    init = png(HINT)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    job = {"mode": "inpaint", "init_images": (init,), "mask": png(mask), "denoising_strength": 0.8}
    _, borrowed = run(eng, annotators, [unit(module="inpaint_only", image=None)], **job)
    _, explicit = run(eng, annotators, [unit(module="inpaint_only", image=None, mask=png(mask))], **job)
    assert np.array_equal(np.asarray(borrowed[0].mask), np.asarray(mask))
    assert np.array_equal(np.asarray(borrowed[0].detected_map), np.asarray(explicit[0].detected_map))
    inverted = {**job, "inpainting_mask_invert": 1}
    _, flipped = run(eng, annotators, [unit(module="inpaint_only", image=None)], **inverted)
    assert np.array_equal(np.asarray(flipped[0].mask), 255 - np.asarray(mask))


def test_canny_map_is_resized_by_the_resize_mode_and_pixel_perfect(annotators):
    wide = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 128, 3), dtype=np.uint8))
    assert pixel_perfect_resolution(wide, 64, 64, ResizeMode.CROP_AND_RESIZE) == 64
    assert pixel_perfect_resolution(wide, 64, 64, ResizeMode.RESIZE_AND_FILL) == 32
    maps = {}
    for mode in ResizeMode:
        src = ControlNetSource(0, unit(module="canny", resize_mode=mode, pixel_perfect=True), None, wide, annotators)
        maps[mode] = np.asarray(src.control_map(64, 48))
        assert maps[mode].shape == (48, 64, 3)
        assert src.detected_map is not None and src.detected_map.size == (64, 48)
    assert not np.array_equal(maps[ResizeMode.JUST_RESIZE], maps[ResizeMode.CROP_AND_RESIZE])
    assert not np.array_equal(maps[ResizeMode.CROP_AND_RESIZE], maps[ResizeMode.RESIZE_AND_FILL])


def test_after_a_controlnet_job_the_pipeline_is_bit_identical_to_a_fresh_one(eng, annotators):
    run(eng, annotators, [unit()], enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6)
    run(eng, annotators, [unit()], mode="img2img", init_images=(png(HINT),), denoising_strength=0.8)
    after, _ = run(eng, annotators)
    fresh = Engine(Provider({**world().pipes, PIPE_FILES["sd15"]: fresh_pipeline("sd15")}))
    reference = fresh.generate(request(), world().models("sd15"))
    assert diff(after.images[0], reference.images[0]) == 0
    for pipe in eng.derived_pipelines(world().pipes[PIPE_FILES["sd15"]]):
        assert getattr(pipe, "controlnet", None) is None, f"{type(pipe).__name__} keeps a ControlNet"
    assert torch.is_grad_enabled()
