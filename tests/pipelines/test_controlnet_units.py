"""ControlNet units from ``alwayson_scripts``: webuiapi's payload, legacy aliases, image forms, enums and every
validation error naming its field."""

from __future__ import annotations

import base64
import json

import pytest
import webuiapi
from PIL import Image

from pipelines.controlnet.units import ControlMode, ControlUnit, HiresOption, ResizeMode, parse_units
from pipelines.types import InvalidRequestError
from tests.fixtures.images import bomb_png, png_b64


def _scripts(*units: dict, key: str = "controlnet") -> dict:
    return {key: {"args": list(units)}}


def test_webuiapi_unit_payload_parses():
    image = Image.new("RGB", (32, 24), (200, 10, 10))
    unit = webuiapi.ControlNetUnit(image=image, module="canny", model="control_canny [abcd1234]", weight=0.5,
                                   resize_mode="Just Resize", guidance_start=0.1, guidance_end=0.8, control_mode=2,
                                   threshold_a=50, threshold_b=150, pixel_perfect=True, hr_option="Low res only")
    units, warnings = parse_units(_scripts(unit.to_dict(), key="ControlNet"))
    assert len(units) == 1
    parsed = units[0]
    assert parsed.module == "canny" and parsed.model == "control_canny [abcd1234]"
    assert parsed.weight == 0.5 and parsed.guidance_start == 0.1 and parsed.guidance_end == 0.8
    assert parsed.control_mode is ControlMode.CONTROLNET and parsed.resize_mode is ResizeMode.JUST_RESIZE
    assert parsed.hr_option is HiresOption.LOW_RES_ONLY and parsed.pixel_perfect is True
    assert parsed.threshold_a == 50 and parsed.threshold_b == 150 and parsed.mask is None
    with Image.open(__import__("io").BytesIO(parsed.image)) as decoded:
        assert decoded.size == (32, 24)
    assert warnings == []
    assert ControlUnit.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed


def test_disabled_units_are_skipped_and_any_key_case_is_found():
    units, _ = parse_units(_scripts({"enabled": False, "module": "canny"}, {"module": "none"}, key="CONTROLNET"))
    assert [u.module for u in units] == ["none"]
    assert parse_units({"other": {"args": []}}) == ([], [])


def test_legacy_aliases_and_modes():
    img, mask = png_b64(8, 8), png_b64(8, 8)
    img_bytes, mask_bytes = base64.b64decode(img), base64.b64decode(mask)
    units, warnings = parse_units(_scripts(
        {"input_image": "data:image/png;base64," + img, "mask_image": mask, "guidance": 0.6, "lowvram": True,
         "resize_mode": "Inner Fit (Scale to Fit)", "control_mode": "my prompt is more important"},
        {"image": {"image": img, "mask": mask}, "resize_mode": 2, "control_mode": 1},
        {"image": [img, mask], "resize_mode": "Envelope (Outer Fit)", "union_control_type": "Canny"},
        {"image": img},
    ))
    first, second, third, fourth = units
    assert first.image == img_bytes and first.mask == mask_bytes and first.guidance_end == 0.6 and first.low_vram
    assert first.resize_mode is ResizeMode.CROP_AND_RESIZE and first.control_mode is ControlMode.PROMPT
    assert second.image == img_bytes and second.mask == mask_bytes and second.resize_mode is ResizeMode.RESIZE_AND_FILL
    assert third.mask == mask_bytes and third.resize_mode is ResizeMode.RESIZE_AND_FILL
    assert fourth.resize_mode is ResizeMode.CROP_AND_RESIZE and fourth.save_detected_map is True
    assert any("low_vram" in w for w in warnings)
    assert any("union_control_type" in w and "unit 2" in w for w in warnings)


def test_module_resolves_through_the_registry():
    units, _ = parse_units(_scripts({"module": "Canny"}))
    assert units[0].module == "canny"


@pytest.mark.parametrize(("unit", "field"), [
    ({"module": "no_such_module"}, "module"),
    ({"model": 3}, "model"),
    ({"weight": 2.5}, "weight"),
    ({"weight": "heavy"}, "weight"),
    ({"guidance_start": -0.1}, "guidance_start"),
    ({"guidance_end": 1.5}, "guidance_end"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start"),
    ({"control_mode": 3}, "control_mode"),
    ({"control_mode": "loud"}, "control_mode"),
    ({"resize_mode": "Stretch"}, "resize_mode"),
    ({"hr_option": "Never"}, "hr_option"),
    ({"pixel_perfect": "yes"}, "pixel_perfect"),
    ({"processor_res": -5}, "processor_res"),
    ({"threshold_a": "x"}, "threshold_a"),
    ({"threshold_b": float("nan")}, "threshold_b"),
    ({"save_detected_map": 1}, "save_detected_map"),
    ({"enabled": "yes"}, "enabled"),
    ({"image": "not base64!"}, "image"),
    ({"image": base64.b64encode(b"not an image").decode()}, "image"),
    ({"image": base64.b64encode(bomb_png(40000, 40000)).decode()}, "image"),
    ({"image": png_b64(8, 8), "mask": base64.b64encode(b"junk").decode()}, "mask"),
    ({"image": [1, 2, 3]}, "image"),
])
def test_each_bad_field_is_named(unit, field):
    with pytest.raises(InvalidRequestError) as caught:
        parse_units(_scripts({"module": "none"}, unit))
    assert caught.value.field == f"alwayson_scripts.controlnet.args[1].{field}"
    assert caught.value.field in str(caught.value)


def test_pixel_limit_and_shape_errors():
    with pytest.raises(InvalidRequestError) as caught:
        parse_units(_scripts({"image": png_b64(64, 64)}), max_pixels=1000)
    assert caught.value.field == "alwayson_scripts.controlnet.args[0].image"
    with pytest.raises(InvalidRequestError) as caught:
        parse_units(_scripts("canny"))
    assert caught.value.field == "alwayson_scripts.controlnet.args[0]"
    with pytest.raises(InvalidRequestError) as caught:
        parse_units({"controlnet": {"args": "canny"}})
    assert caught.value.field == "alwayson_scripts.controlnet.args"
