"""Infotext: A1111's exact text, round trips through the parser, and embedding in PNG/JPEG/WebP."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from pipelines import infotext
from pipelines.types import GenerationRequest

A1111_TXT2IMG = """masterpiece, best quality, 1girl, (blue eyes:1.2), <lora:add_detail:0.5>
Negative prompt: EasyNegative, lowres, bad anatomy
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1"""

A1111_LEGACY = """a castle on a hill
Negative prompt: blurry
Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 925997e9, Hypernet: anime, Hypernet strength: 0.6, ENSD: 31337"""

A1111_INPAINT = """a red door
Negative prompt:
Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 99, Size: 512x512, Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, Masked content: latent noise, Version: v1.9.0"""


def test_writer_uses_a1111_order_and_quoting():
    text = infotext.build("a cat", "ugly", {
        "Version": "studio 0.1.0", "Lora hashes": "a: 0123456789ab, b: ba9876543210", "Seed": 5, "Steps": 20,
        "Sampler": "Euler a", "Size": "64x64", "CFG scale": 7.0, "Clip skip": None, "Model": "m, odd: name",
        "Tiling": "Tiling",
    })
    assert text == ('a cat\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, '
                    'Model: "m, odd: name", Tiling, Lora hashes: "a: 0123456789ab, b: ba9876543210", '
                    'Version: studio 0.1.0')
    assert infotext.build("a cat", "", {"Steps": 1, "Seed": 2, "Size": "8x8"}) == "a cat\nSteps: 1, Seed: 2, Size: 8x8"


def test_parser_reads_real_a1111_infotexts():
    p = infotext.parse(A1111_TXT2IMG)
    assert p["Prompt"].endswith("<lora:add_detail:0.5>") and p["Negative prompt"].startswith("EasyNegative")
    assert (p["Size-1"], p["Size-2"], p["Steps"], p["Schedule type"]) == ("512", "768", "20", "Karras")
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54" and p["Clip skip"] == "2"
    assert p["Hires sampler"] == "Use same sampler" and p["RNG"] == "GPU"  # defaults
    fields = infotext.request_fields(p)
    assert fields["width"] == 512 and fields["height"] == 768
    assert fields["enable_hr"] is True and fields["hr_scale"] == 2.0 and fields["hr_second_pass_steps"] == 10
    assert fields["scheduler"] == "Karras" and fields["clip_skip"] == 2 and fields["cfg_scale"] == 7.0
    GenerationRequest(**fields).validate()


def test_parser_handles_legacy_names_and_hypernet():
    p = infotext.parse(A1111_LEGACY)
    assert p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    assert p["Prompt"] == "a castle on a hill<hypernet:anime:0.6>"
    assert p["Clip skip"] == "1" and p["Masked area padding"] == 32


def test_parser_reads_inpaint_fields():
    fields = infotext.request_fields(infotext.parse(A1111_INPAINT))
    assert fields["inpainting_fill"] == 2 and fields["inpaint_full_res"] is True and fields["mask_blur"] == 4
    assert fields["inpaint_full_res_padding"] == 32 and fields["negative_prompt"] == ""


def test_inpaint_and_refiner_keys_in_a1111_order_and_back():
    from pipelines.results import JobFacts, parameters
    from pipelines.samplers import resolve
    from pipelines.types import ModelRef

    req = GenerationRequest(prompt="a red door", mode="inpaint", steps=25, seed=99, mask_blur_x=4, mask_blur_y=8,
                            inpainting_fill=2, inpaint_full_res=True, inpaint_full_res_padding=32,
                            init_images=(b"x",), mask=b"m", denoising_strength=0.75)
    refiner = ModelRef("sdxl-refiner.safetensors", Path("/r"), "cd" * 32, "checkpoint")
    facts = JobFacts(resolve("Euler a", "Automatic"), None, ModelRef("v1-5.safetensors", Path("/m"), "ab" * 32,
                     "checkpoint"), None, None, None, None, None)
    text = infotext.build(req.prompt, "", parameters(req, facts, 99, -1))
    order = ["Mask blur x:", "Mask blur y:", "Inpaint area:", "Masked area padding:", "Masked content:"]
    assert [text.index(k) for k in order] == sorted(text.index(k) for k in order)
    fields = infotext.request_fields(infotext.parse(text))
    assert (fields["mask_blur_x"], fields["mask_blur_y"], fields["inpainting_fill"]) == (4, 8, 2)

    xl = GenerationRequest(prompt="a castle", refiner_switch_at=0.8)
    facts = JobFacts(resolve("Euler a", "Automatic"), None, ModelRef("base.safetensors", Path("/b"), "ab" * 32,
                     "checkpoint"), None, refiner, None, None, None)
    parsed = infotext.parse(infotext.build(xl.prompt, "", parameters(xl, facts, 1, -1)))
    assert parsed["Refiner"] == f"sdxl-refiner [{refiner.short_hash}]"
    assert infotext.request_fields(parsed)["refiner_switch_at"] == 0.8
    assert infotext.refiner_refs(parsed) == [refiner.short_hash, "sdxl-refiner"]
    assert infotext.refiner_refs({"Refiner": "plain-name"}) == ["plain-name"] and infotext.refiner_refs({}) == []


def test_parser_keeps_short_last_lines_as_prompt():
    p = infotext.parse("just a prompt\nwith: two lines")
    assert p["Prompt"] == "just a prompt\nwith: two lines" and p["Negative prompt"] == ""
    multi = infotext.parse("line one\nNegative prompt: bad\nworse\nSteps: 5, Seed: 1, Size: 64x64")
    assert multi["Negative prompt"] == "bad\nworse" and multi["Steps"] == "5"


@pytest.mark.parametrize("kwargs", [
    {},
    {"prompt": 'a "quoted", prompt: with colon', "negative_prompt": "bad, worse", "clip_skip": 2,
     "sampler_name": "DPM++ 2M SDE", "scheduler": "Exponential", "cfg_scale": 4.5},
    {"subseed": 77, "subseed_strength": 0.25, "seed_resize_from_w": 512, "seed_resize_from_h": 384},
    {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (bicubic)", "hr_second_pass_steps": 7,
     "denoising_strength": 0.55, "hr_prompt": "sharp, detailed", "hr_sampler_name": "Euler"},
])
def test_request_survives_infotext_round_trip(kwargs):
    from pipelines.results import JobFacts, parameters
    from pipelines.samplers import resolve
    from pipelines.types import ModelRef

    req = GenerationRequest(**({"prompt": "a cat", "steps": 12, "seed": 9, "width": 512, "height": 640} | kwargs))
    sampler = resolve(req.sampler_name, req.scheduler)
    hr = resolve(req.hr_sampler_name or req.sampler_name, req.scheduler) if req.enable_hr else None
    facts = JobFacts(sampler, hr, ModelRef("model.safetensors", Path("/m"), "ab" * 32, "checkpoint"), None, None,
                     None, None, req.hr_target_size() if req.enable_hr else None)
    text = infotext.build(req.prompt, req.negative_prompt, parameters(req, facts, req.seed, req.subseed))
    fields = infotext.request_fields(infotext.parse(text))
    for key, value in fields.items():
        if key == "scheduler" and req.scheduler == "Automatic":
            continue  # the label actually used is written; it resolves to the same schedule
        assert getattr(req, key) == value, key
    assert GenerationRequest(**fields).validate() is None


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_infotext_is_embedded_and_read_back(fmt):
    text = "a cat, ünïcödé ✓\nNegative prompt: dog\nSteps: 5, Seed: 1, Size: 64x64, Version: studio 0.1.0"
    data = infotext.encode_image(Image.new("RGB", (32, 32), (10, 20, 30)), text, fmt)
    assert Image.open(io.BytesIO(data)).format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    assert infotext.read_infotext(data) == text
    if fmt == "png":
        assert Image.open(io.BytesIO(data)).info["parameters"] == text
    else:  # EXIF UserComment with the UNICODE prefix, UTF-16 big-endian (what A1111/piexif write)
        raw = Image.open(io.BytesIO(data)).getexif().get_ifd(0x8769)[0x9286]
        assert raw.startswith(b"UNICODE\x00") and raw[8:].decode("utf-16-be") == text


def test_version_string_matches_the_package():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert f"studio {pyproject['project']['version']}" == infotext.VERSION
