"""Inpainting: mask preparation helpers and end-to-end jobs that keep unmasked pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines import inpaint
from pipelines.types import GenerationRequest
from tests.pipelines.test_gen_fixtures import diff, engine, pixels, png, request, world


def _scene(size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _mask(size=(96, 64), box=(32, 16, 56, 40)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_crop_region_and_aspect_expansion():
    mask = _mask()
    assert inpaint.crop_region(mask, 4) == (28, 12, 60, 44)
    assert inpaint.crop_region(Image.new("L", (10, 10), 0), 4) is None
    assert inpaint.crop_region(mask, 100) == (0, 0, 96, 64)
    box = inpaint.expand_to_aspect((28, 12, 60, 44), 128, 64, 96, 64)
    assert (box[2] - box[0]) / (box[3] - box[1]) == 2.0 and box[0] >= 0 and box[2] <= 96
    edge = inpaint.expand_to_aspect((0, 0, 10, 40), 64, 64, 96, 64)
    assert edge == (0, 0, 40, 40)


def test_blur_is_separable_and_fill_spreads_known_colours():
    mask = _mask()
    bx = np.asarray(inpaint.blur_mask(mask, 4, 0), dtype=float)
    assert bx[28, 30] > 0 and bx[12, 44] == 0  # spreads sideways only
    red = Image.new("RGB", (96, 64), (200, 10, 10))
    filled = np.asarray(inpaint.fill_masked(red, mask))
    assert np.abs(filled[28, 44] - [200, 10, 10]).max() <= 1
    untouched = inpaint.fill_masked(_scene(), Image.new("L", (96, 64), 0))
    assert np.array_equal(np.asarray(untouched), np.asarray(_scene()))


def _job(**kwargs) -> GenerationRequest:
    values = {"mode": "inpaint", "init_images": (png(_scene()),), "mask": png(_mask()), "width": 64, "height": 64,
              "denoising_strength": 0.9, "mask_blur": 2}
    values.update(kwargs)
    return request(**values)


def _outside(mask_box, size, margin) -> np.ndarray:
    keep = np.ones((size[1], size[0]), dtype=bool)
    x1, y1, x2, y2 = mask_box
    keep[max(y1 - margin, 0):y2 + margin, max(x1 - margin, 0):x2 + margin] = False
    return keep


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_only_masked_keeps_unmasked_pixels_and_the_original_size(fill):
    res = engine().generate(_job(inpaint_full_res=True, inpaint_full_res_padding=8, inpainting_fill=fill),
                            world().models())
    out = pixels(res.images[0])
    assert out.shape[:2] == (64, 96)  # "Only masked" returns the init image's size
    original = np.asarray(_scene(), dtype=np.int16)
    keep = _outside((32, 16, 56, 40), (96, 64), margin=8)
    assert np.abs(out[keep] - original[keep]).max() == 0
    inside = ~_outside((32, 16, 56, 40), (96, 64), margin=-2)
    assert np.abs(out[inside] - original[inside]).mean() > 5
    assert "Inpaint area: Only masked" in res.infotexts[0]


def test_whole_picture_inpaint_keeps_unmasked_pixels_close():
    res = engine().generate(_job(inpaint_full_res=False, width=96, height=64), world().models())
    out = pixels(res.images[0])
    original = np.asarray(_scene(), dtype=np.int16)
    keep = _outside((32, 16, 56, 40), (96, 64), margin=8)
    assert np.abs(out[keep] - original[keep]).max() == 0
    assert "Masked content: fill" in res.infotexts[0] and "Mask blur: 2" in res.infotexts[0]


def test_fill_modes_differ_and_invert_repaints_the_outside():
    eng = engine()
    outs = [eng.generate(_job(inpainting_fill=f), world().models()).images[0] for f in range(4)]
    assert all(diff(outs[i], outs[j]) > 0 for i in range(4) for j in range(i + 1, 4))
    inverted = eng.generate(_job(inpainting_mask_invert=1, inpaint_full_res=False, width=96), world().models())
    out = pixels(inverted.images[0])
    original = np.asarray(_scene(), dtype=np.int16)
    assert np.abs(out[22:34, 38:50] - original[22:34, 38:50]).max() == 0  # inside the mask (beyond the blur) is kept
    assert "Mask mode: Inpaint not masked" in inverted.infotexts[0]


@pytest.mark.parametrize("kind", ["sd15_inpaint", "sdxl"])
def test_inpaint_with_nine_channel_and_sdxl_models(kind):
    res = engine().generate(_job(), world().models(kind))
    out = pixels(res.images[0])
    original = np.asarray(_scene(), dtype=np.int16)
    keep = _outside((32, 16, 56, 40), (96, 64), margin=8)
    assert np.abs(out[keep] - original[keep]).max() == 0


def test_blank_mask_falls_back_to_whole_picture_with_a_warning():
    res = engine().generate(_job(mask=png(Image.new("L", (96, 64), 0)), width=96), world().models())
    assert any("mask is blank" in w for w in res.warnings)
    assert Image.open(io.BytesIO(res.images[0])).size == (96, 64)


def test_transparent_png_mask_uses_its_alpha():
    rgba = Image.new("RGBA", (96, 64), (0, 0, 0, 0))
    rgba.paste((255, 255, 255, 255), (32, 16, 56, 40))
    via_alpha = engine().generate(_job(mask=png(rgba)), world().models())
    via_l = engine().generate(_job(), world().models())
    assert diff(via_alpha.images[0], via_l.images[0]) == 0
