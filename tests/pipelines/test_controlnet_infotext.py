"""ControlNet units in infotext: written as sd-webui-controlnet writes them, parsed back into unit fields."""

from __future__ import annotations

from pipelines import infotext
from pipelines.controlnet.infotext import controlnet_params, units_from_infotext
from pipelines.controlnet.units import parse_units

CANNY = "control_v11p_sd15_canny [c1c1c1c1]"
POSE = "control_v11p_sd15_openpose [d2d2d2d2]"


def _units():
    units, _ = parse_units({"controlnet": {"args": [
        {"module": "canny", "model": CANNY, "processor_res": 512, "threshold_a": 100, "threshold_b": 200},
        {"module": "openpose_full", "model": POSE, "weight": 0.55, "guidance_start": 0.1, "guidance_end": 0.9,
         "control_mode": 2, "resize_mode": 0, "pixel_perfect": True, "hr_option": "Low res only"},
    ]}})
    return units


def test_the_extension_format_is_written():
    params = controlnet_params(_units(), [CANNY, POSE])
    assert params["ControlNet 0"] == (
        f"Module: canny, Model: {CANNY}, Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 512, "
        "Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, "
        "Control Mode: Balanced, Hr Option: Both")
    assert "Processor Res" not in params["ControlNet 1"] and "Threshold A" not in params["ControlNet 1"]
    text = infotext.build("a fox", "", {"Steps": 20, "Seed": 1, "Sampler": "Euler", **params})
    assert f'ControlNet 0: "Module: canny, Model: {CANNY}, Weight: 1.0,' in text
    assert controlnet_params([], []) == {}


def test_two_units_round_trip_through_infotext():
    units = _units()
    text = infotext.build("a fox", "ugly", {"Steps": 20, "Seed": 1, "Sampler": "Euler",
                                            **controlnet_params(units, [CANNY, POSE]), "Version": "studio"})
    parsed = infotext.parse(text)
    assert parsed["Steps"] == "20" and parsed["Version"] == "studio"
    assert parsed["ControlNet 1"].startswith("Module: openpose_full, Model: " + POSE)
    restored = units_from_infotext(parsed)
    assert [u["model"] for u in restored] == [CANNY, POSE]
    again, _ = parse_units({"controlnet": {"args": restored}})
    assert again == units
