"""The Engine end to end on tiny models: seeds, batches, modes, hires, refiner, events, cancel, errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import infotext
from pipelines.types import (
    Cancelled,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    OutOfMemoryError,
    Progress,
    ResolvedModels,
)
from tests.pipelines.test_gen_fixtures import diff, engine, pixels, png, request, world


@pytest.fixture(scope="module")
def eng():
    return engine(preview_every=2)


def _image(size=(64, 64), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    return png(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)))


# -- seeds ----------------------------------------------------------------------------------------------

def test_seed_reproduces_bit_identically(eng):
    a = eng.generate(request(), world().models())
    b = eng.generate(request(), world().models())
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    c = eng.generate(request(seed=43), world().models())
    assert diff(a.images[0], c.images[0]) > 0


def test_batch_images_use_seed_plus_i_and_match_single_runs(eng):
    w = world()
    batch = eng.generate(request(seed=100, batch_size=2, n_iter=2), w.models())
    assert batch.seeds == [100, 101, 102, 103]
    assert len(batch.images) == 4 and len(set(batch.infotexts)) == 4
    for i in (1, 3):
        single = eng.generate(request(seed=100 + i), w.models())
        assert diff(batch.images[i], single.images[0]) < 0.5  # batched convs differ only in float rounding
    assert "Seed: 103," in batch.infotexts[3]


def test_random_seed_is_chosen_once_per_request(eng):
    res = eng.generate(request(seed=-1, batch_size=2), world().models())
    assert 0 <= res.seeds[0] < 4294967294 and res.seeds[1] == res.seeds[0] + 1


def test_subseed_strength_moves_the_image_smoothly(eng):
    w = world()
    base = eng.generate(request(seed=7), w.models())
    steps = [eng.generate(request(seed=7, subseed=99, subseed_strength=s), w.models()) for s in (0.1, 0.5, 1.0)]
    distances = [diff(base.images[0], r.images[0]) for r in steps]
    assert 0 < distances[0] < distances[1] < distances[2]
    assert steps[0].subseeds[0] == 99 and "Variation seed: 99, Variation seed strength: 0.1" in steps[0].infotexts[0]
    zero = eng.generate(request(seed=7, subseed=99, subseed_strength=0.0), w.models())
    assert diff(base.images[0], zero.images[0]) == 0
    variation_batch = eng.generate(request(seed=7, subseed=99, subseed_strength=0.3, batch_size=2), w.models())
    assert variation_batch.seeds == [7, 7] and variation_batch.subseeds == [99, 100]


def test_seed_resize_from_keeps_the_noise_centred(eng):
    res = eng.generate(request(width=96, seed_resize_from_w=64, seed_resize_from_h=64), world().models())
    assert res.width == 96 and "Seed resize from: 64x64" in res.infotexts[0]


# -- modes ------------------------------------------------------------------------------------------------

def test_img2img_all_resize_modes(eng):
    w = world()
    init = _image((80, 48))
    outs = {}
    for mode in range(4):
        res = eng.generate(request(mode="img2img", init_images=(init,), resize_mode=mode, denoising_strength=0.6),
                           w.models())
        assert (res.width, res.height) == (64, 64)
        outs[mode] = res.images[0]
        assert "Denoising strength: 0.6" in res.infotexts[0]
    assert diff(outs[0], outs[1]) > 0 and diff(outs[1], outs[2]) > 0
    # the random tiny VAE cannot reproduce pixels, so compare against an almost-untouched reconstruction
    near, low, high = (eng.generate(request(mode="img2img", init_images=(init,), denoising_strength=s, steps=10),
                                    w.models()) for s in (0.02, 0.2, 0.9))
    assert diff(low.images[0], near.images[0]) < diff(high.images[0], near.images[0])
    untouched = eng.generate(request(mode="img2img", init_images=(init,), denoising_strength=0.0), w.models())
    resized = png(Image.open(io.BytesIO(init)).resize((64, 64), Image.Resampling.LANCZOS))
    assert diff(untouched.images[0], resized) == 0


def test_img2img_sdxl_and_inpaint_checkpoint(eng):
    w = world()
    init = _image()
    xl = eng.generate(request(mode="img2img", init_images=(init,), denoising_strength=0.5), w.models("sdxl"))
    nine = eng.generate(request(mode="img2img", init_images=(init,), denoising_strength=0.5), w.models("sd15_inpaint"))
    t2i_nine = eng.generate(request(), w.models("sd15_inpaint"))
    assert len(xl.images) == len(nine.images) == len(t2i_nine.images) == 1


@pytest.mark.parametrize(("kwargs", "size"), [
    ({"hr_scale": 2.0, "hr_upscaler": "Latent"}, (128, 128)),
    ({"hr_scale": 1.5, "hr_upscaler": "Latent (nearest)"}, (96, 96)),
    ({"hr_resize_x": 96, "hr_resize_y": 0, "hr_upscaler": "Lanczos"}, (96, 96)),
    ({"hr_resize_x": 128, "hr_resize_y": 96, "hr_upscaler": "Nearest", "hr_second_pass_steps": 2}, (128, 96)),
])
def test_hires_fix_output_size(eng, kwargs, size):
    res = eng.generate(request(enable_hr=True, denoising_strength=0.5, **kwargs), world().models())
    assert (res.width, res.height) == size
    assert Image.open(io.BytesIO(res.images[0])).size == size
    parsed = infotext.parse(res.infotexts[0])
    assert parsed["Hires upscaler"] == kwargs["hr_upscaler"] and parsed["Denoising strength"] == "0.5"


def test_hires_changes_with_its_own_prompt_and_sampler(eng):
    w = world()
    a = eng.generate(request(enable_hr=True, hr_scale=1.5, denoising_strength=0.6), w.models())
    b = eng.generate(request(enable_hr=True, hr_scale=1.5, denoising_strength=0.6, hr_prompt="a red house",
                             hr_sampler_name="DPM++ 2M"), w.models())
    assert diff(a.images[0], b.images[0]) > 0
    assert "Hires prompt: a red house" in b.infotexts[0] and "Hires sampler: DPM++ 2M" in b.infotexts[0]


def test_sdxl_refiner_takes_over_at_the_switch(eng):
    w = world()
    events: list[Progress] = []
    plain = eng.generate(request(steps=4), w.models("sdxl"))
    refined = eng.generate(request(steps=4, refiner_switch_at=0.5), w.models("sdxl", refiner=w.checkpoints["sdxl_refiner"]),
                           on_event=events.append)
    assert diff(plain.images[0], refined.images[0]) > 0
    phases = [e.phase for e in events]
    assert "base" in phases and "refiner" in phases and events[-1].job_count == 2
    assert "Refiner: tiny-sdxl-refiner [" in refined.infotexts[0] and "Refiner switch at: 0.5" in refined.infotexts[0]
    with pytest.raises(InvalidRequestError, match="SDXL") as err:
        eng.generate(request(refiner_switch_at=0.5), w.models("sd15", refiner=w.checkpoints["sdxl_refiner"]))
    assert err.value.field == "refiner_checkpoint"


def test_eta_drives_ddim_and_is_reported(eng):
    w = world()
    zero = eng.generate(request(sampler_name="DDIM", eta=0.0, steps=4), w.models())
    one = eng.generate(request(sampler_name="DDIM", eta=1.0, steps=4), w.models())
    assert diff(zero.images[0], one.images[0]) > 0 and "Eta DDIM: 1" in one.infotexts[0]
    other = eng.generate(request(sampler_name="Euler", eta=0.5), w.models())
    assert any("eta is only used by the DDIM sampler" in m for m in other.warnings)
    assert "Eta" not in other.infotexts[0]


def test_prompt_editing_changes_conditioning_mid_way(eng):
    w = world()
    cat = eng.generate(request(prompt="a photo of a cat", steps=4), w.models())
    dog = eng.generate(request(prompt="a photo of a dog", steps=4), w.models())
    edit = eng.generate(request(prompt="a photo of a [cat:dog:0.5]", steps=4), w.models())
    assert diff(edit.images[0], cat.images[0]) > 0 and diff(edit.images[0], dog.images[0]) > 0
    long = eng.generate(request(prompt="cat, " * 60, negative_prompt="ugly"), w.models())
    assert len(long.images) == 1


# -- events and cancel --------------------------------------------------------------------------------------

def test_progress_events_and_previews(eng):
    events: list[Progress] = []
    eng.generate(request(steps=4, n_iter=2), world().models(), on_event=events.append)
    assert [(e.step, e.total, e.job_no) for e in events] == [(s, 4, j) for j in (0, 1) for s in (1, 2, 3, 4)]
    previews = [e.preview for e in events if e.preview is not None]
    assert len(previews) == 4 and Image.open(io.BytesIO(previews[0])).size == (32, 32)
    json.dumps(events[1].to_dict())  # serialisable for remote workers


def test_cancel_stops_within_one_step_and_restores(eng):
    w = world()
    unet = w.pipes["tiny-sd15.safetensors"].unet
    calls = []
    handle = unet.register_forward_hook(lambda *_: calls.append(1))
    events: list[Progress] = []
    try:
        with pytest.raises(Cancelled):
            eng.generate(request(prompt="a cat <lora:style:1>", steps=10), w.models(), on_event=events.append,
                         should_cancel=lambda: len(events) >= 2)
    finally:
        handle.remove()
    assert len(events) == 2 and len(calls) == 3  # asked after step 2, stopped after the step in flight
    after = eng.generate(request(), w.models())
    fresh = engine().generate(request(), w.models())
    assert diff(after.images[0], fresh.images[0]) == 0
    with pytest.raises(Cancelled):
        eng.generate(request(), w.models(), should_cancel=lambda: True)


def test_skip_drops_one_batch_and_cancel_keeps_the_finished_ones(eng):
    w = world()
    full = eng.generate(request(seed=200, n_iter=3), w.models())
    events: list[Progress] = []
    asked = []

    def skip_in_second_batch() -> bool:  # answers True once, like the backends' skip flag
        if not asked and events and events[-1].job_no == 1:
            asked.append(True)
            return True
        return False

    skipped = eng.generate(request(seed=200, n_iter=3), w.models(), on_event=events.append,
                           should_skip=skip_in_second_batch)
    assert skipped.seeds == [200, 202] and len(skipped.images) == 2
    assert np.array_equal(pixels(skipped.images[0]), pixels(full.images[0]))
    assert np.array_equal(pixels(skipped.images[1]), pixels(full.images[2]))
    assert "Seed: 202," in skipped.infotexts[1] and "batch 2 of 3 was skipped" in skipped.warnings
    assert {e.job_no for e in events} == {0, 1, 2}

    events.clear()
    with pytest.raises(Cancelled) as caught:
        eng.generate(request(seed=200, n_iter=3), w.models(), on_event=events.append,
                     should_cancel=lambda: bool(events) and events[-1].job_no == 2)
    partial = caught.value.partial
    assert partial is not None and partial.seeds == [200, 201] and len(partial.images) == 2
    assert np.array_equal(pixels(partial.images[1]), pixels(full.images[1]))
    with pytest.raises(Cancelled) as caught:
        eng.generate(request(), w.models(), should_cancel=lambda: True)
    assert caught.value.partial is None


def test_out_of_memory_becomes_a_pipeline_error(eng, monkeypatch):
    import pipelines.engine as engine_module

    def boom(*_a, **_k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine_module, "run_pass", boom)
    with pytest.raises(OutOfMemoryError, match="batch size") as err:
        eng.generate(request(batch_size=4), world().models())
    assert isinstance(err.value, ValueError)


# -- result / request types ----------------------------------------------------------------------------------

def test_result_and_request_round_trip_as_json(eng):
    req = request(mode="img2img", init_images=(_image(),), denoising_strength=0.4)
    wire = json.loads(json.dumps(req.to_dict()))
    assert GenerationRequest.from_dict(wire) == req
    res = eng.generate(req, world().models())
    back = GenerationResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back == res
    info = res.a1111_info()
    assert info["all_seeds"] == [42] and info["sd_model_hash"] == world().checkpoints["sd15"].short_hash
    assert infotext.read_infotext(res.images[0]) == res.infotexts[0]
    models = world().models()
    assert ResolvedModels.from_dict(json.loads(json.dumps(models.to_dict()))) == models


def test_data_uri_images_are_accepted():
    import base64

    img = _image()
    req = GenerationRequest.from_dict({"mode": "img2img", "init_images": [
        "data:image/png;base64," + base64.b64encode(img).decode()], "steps": 2, "width": 64, "height": 64})
    assert req.init_images == (img,)


@pytest.mark.parametrize(("kwargs", "field", "text"), [
    ({"height": 500}, "height", "`height` must be a multiple of 8 but is 500"),
    ({"width": 32}, "width", "between 64 and 8192 but is 32"),
    ({"steps": 0}, "steps", "`steps` must be between 1 and 150 but is 0"),
    ({"steps": 151}, "steps", "but is 151"),
    ({"cfg_scale": float("nan")}, "cfg_scale", "finite"),
    ({"cfg_scale": float("inf")}, "cfg_scale", "finite"),
    ({"batch_size": 0}, "batch_size", "between 1 and 64 but is 0"),
    ({"n_iter": 101}, "n_iter", "but is 101"),
    ({"denoising_strength": 1.5}, "denoising_strength", "between 0 and 1 but is 1.5"),
    ({"seed": -2}, "seed", "but is -2"),
    ({"mode": "outpaint"}, "mode", "'outpaint'"),
    ({"clip_skip": 0}, "clip_skip", "but is 0"),
    ({"mode": "img2img"}, "init_images", "at least one image"),
    ({"mode": "img2img", "init_images": (b"not an image",)}, "init_images[0]", "not a readable image"),
    ({"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "hr_upscaler", "could not find upscaler named 'ESRGAN_4x'"),
    ({"refiner_switch_at": 1.0}, "refiner_switch_at", "exclusive"),
    ({"subseed_strength": -0.1}, "subseed_strength", "but is -0.1"),
    ({"steps": 2.5}, "steps", "integer"),
])
def test_bad_inputs_are_named(kwargs, field, text):
    with pytest.raises(InvalidRequestError) as err:
        request(**kwargs).validate()
    assert err.value.field == field and text in str(err.value)
    assert isinstance(err.value, ValueError)


def test_inpaint_mask_size_mismatch_is_named():
    req = request(mode="inpaint", init_images=(_image((64, 64)),), mask=_image((80, 64)))
    with pytest.raises(InvalidRequestError, match="`mask` size 80x64 does not match the init image size 64x64"):
        req.validate()


def test_a_refiner_refines_images_but_cannot_start_from_text(eng):
    w = world()
    with pytest.raises(InvalidRequestError, match="is an SDXL refiner") as err:
        eng.generate(request(), w.models("sdxl_refiner"))
    assert err.value.field == "sd_model_checkpoint"
    init = _image()
    refined = eng.generate(request(mode="img2img", init_images=(init,), denoising_strength=0.3), w.models("sdxl_refiner"))
    assert len(refined.images) == 1 and diff(refined.images[0], init) > 0
    inpainted = eng.generate(request(mode="inpaint", init_images=(init,), mask=_image(seed=1), denoising_strength=0.5),
                             w.models("sdxl_refiner"))
    assert len(inpainted.images) == 1


def test_a_sampler_run_by_its_nearest_equivalent_says_so(eng):
    result = eng.generate(request(sampler_name="DPM++ 2S a"), world().models())
    assert any("DPM++ 2S a ran as the nearest diffusers equivalent" in w for w in result.warnings)
    assert not any("ran as" in w for w in eng.generate(request(), world().models()).warnings)


def test_clip_skip_is_ignored_on_sdxl_with_a_warning(eng):
    w = world()
    plain = eng.generate(request(), w.models("sdxl"))
    skipped = eng.generate(request(clip_skip=2), w.models("sdxl"))
    assert diff(plain.images[0], skipped.images[0]) == 0
    assert any("clip skip 2 is not applied to SDXL" in warning for warning in skipped.warnings)


def test_clip_skip_beyond_the_encoder_is_named(eng):
    with pytest.raises(InvalidRequestError, match="clip_skip"):
        eng.generate(request(clip_skip=4), world().models())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_generation_reproduces():
    from pipelines.engine import Engine
    from tests.pipelines.test_gen_fixtures import PIPE_FILES, Provider, fresh_pipeline

    pipe = fresh_pipeline("sd15").to("cuda", torch.float16)
    eng = Engine(Provider({PIPE_FILES["sd15"]: pipe}), device="cuda", dtype=torch.float16)
    a = eng.generate(request(steps=4, batch_size=2), world().models())
    b = eng.generate(request(steps=4, batch_size=2), world().models())
    assert np.array_equal(pixels(a.images[1]), pixels(b.images[1]))
    assert diff(a.images[0], a.images[1]) > 0
