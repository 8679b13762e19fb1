"""The ControlNet accordion's handlers, called as Gradio calls them: Preview shows the map, the form builds the
units into the request (refused for now with the clear message), PNG Info restores the units."""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from pipelines.infotext import encode_image
from webapp.records import ModelRecord, ModelStatus, ModelType
from webapp.ui.context import UiContext
from webapp.ui.controlnet_ui import ControlNetPanel
from webapp.ui.generate_tab import GenerateTab
from webapp.ui.pnginfo_tab import PngInfoTab

CANNY = "control_v11p_sd15_canny"


class Tabs:
    def __init__(self, studio: Any) -> None:
        ctx = UiContext(users=studio.users)

        def panel(mode: str) -> ControlNetPanel:
            return ControlNetPanel(ctx, studio.controlnet, studio.registry, mode=mode, unit_count=2,
                                   max_image_bytes=2**20)

        self.txt2img = GenerateTab(ctx, jobs=studio.jobs, registry=studio.registry, mode="txt2img",
                                   controlnet=panel("txt2img"))
        self.pnginfo = PngInfoTab(ctx, registry=studio.registry, target=self.txt2img)
        with gr.Blocks() as self.blocks, gr.Tabs():
            for tab in (self.txt2img, self.pnginfo):
                tab.build()


@pytest.fixture(scope="module")
def tabs(shared_fake_studio) -> Tabs:
    with shared_fake_studio.studio.db.write() as session:
        session.add(ModelRecord(name=CANNY, type=ModelType.CONTROLNET, base="sd1", status=ModelStatus.ACTIVE,
                                sha256="c1" * 32, autov2="c1" * 5,
                                store_key="models/controlnet/canny.safetensors"))
        session.add(ModelRecord(name="control_xl_depth", type=ModelType.CONTROLNET, base="sdxl",
                                status=ModelStatus.ACTIVE, sha256="e3" * 32, autov2="e3" * 5,
                                store_key="models/controlnet/xl.safetensors"))
    return Tabs(shared_fake_studio)


def req(user: Any) -> gr.Request:
    return gr.Request(username=user.username)


def _picture(path) -> str:
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 16:48] = 255
    Image.fromarray(pixels).save(path)
    return str(path)


def _values(tab: GenerateTab, **units: dict[str, Any]) -> dict[Any, Any]:
    out = {component: getattr(component, "value", None) for component in tab.form.c.values()}
    out.update({component: getattr(component, "value", None) for component in tab.controlnet.inputs})
    for key, fields in units.items():
        widgets = tab.controlnet.units[int(key[-1])]
        out.update({widgets[name]: value for name, value in fields.items()})
    return out


def test_model_choices_follow_the_checkpoints_base(fake_studio, tabs):
    panel = tabs.txt2img.controlnet
    values = {panel._checkpoint: fake_studio.models.checkpoint.title,
              **{u["model"]: None for u in panel.units}}
    updates = panel.load_models(values, req(fake_studio.admin))
    assert len(updates) == 2 and updates[0]["choices"] == ["None", f"{CANNY} [{'c1' * 4}]"]


def test_preview_returns_the_map(fake_studio, tabs, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    image = _picture(tmp_path / "in.png")
    result = tabs.txt2img.controlnet.preview("canny", image, None, 64, 100, 200, req(fake_studio.admin))
    edges = np.asarray(result.convert("L"))
    assert edges.max() == 255 and edges.mean() < 128  # edges of the square, not the square
    with pytest.raises(gr.Error, match="add an image"):
        tabs.txt2img.controlnet.preview("canny", None, None, 64, 100, 200, req(fake_studio.admin))
    with pytest.raises(gr.Error, match="That is not a file uploaded"):
        tabs.txt2img.controlnet.preview("canny", "/etc/hostname", None, 64, 100, 200, req(fake_studio.admin))


def test_the_form_builds_the_units_into_the_request(fake_studio, tabs, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    image = _picture(tmp_path / "in.png")
    values = _values(tabs.txt2img, unit0={"enabled": True, "module": "canny", "model": CANNY, "image": image,
                                          "weight": 0.6, "control_mode": "ControlNet is more important"},
                     unit1={"enabled": False})
    values[tabs.txt2img.form.c["checkpoint"]] = fake_studio.models.checkpoint.title
    args = tabs.txt2img.controlnet.to_args(values)
    assert [a["enabled"] for a in args] == [True, False]
    assert args[0]["module"] == "canny" and args[0]["weight"] == 0.6 and args[0]["image"]
    assert "image" not in args[1]
    job_id = tabs.txt2img.submit(values, req(fake_studio.admin))[0]
    sent = fake_studio.jobs.get(actor=fake_studio.admin, job_id=job_id).request["alwayson_scripts"]["controlnet"]
    assert sent["args"][0]["weight"] == 0.6
    values[tabs.txt2img.controlnet.units[0]["weight"]] = 5
    with pytest.raises(gr.Error, match=r"args\[0\]\.weight"):
        tabs.txt2img.submit(values, req(fake_studio.admin))


def test_png_info_restores_the_units(fake_studio, tabs, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    text = ("a fox\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, "
            f'ControlNet 0: "Module: canny, Model: renamed [{"c1" * 4}], Weight: 0.7, Resize Mode: Just Resize, '
            'Processor Res: 256, Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.1, Guidance End: 0.9, '
            'Pixel Perfect: True, Control Mode: Balanced, Hr Option: Both", '
            'ControlNet 1: "Module: depth_midas, Model: someone_elses [deadbeef], Weight: 1.0"')
    path = tmp_path / "cn.png"
    path.write_bytes(encode_image(Image.new("RGB", (8, 8)), text, "png"))
    state = tabs.pnginfo.read(str(path), req(fake_studio.admin))[3]
    updates = tabs.pnginfo.send(state)
    first, second = tabs.txt2img.controlnet.units
    assert updates[first["enabled"]] is True and updates[first["module"]] == "canny"
    assert updates[first["model"]]["value"] == f"{CANNY} [{'c1' * 4}]"
    assert updates[first["weight"]] == 0.7 and updates[first["processor_res"]] == 256
    assert updates[first["resize_mode"]] == "Just Resize" and updates[first["pixel_perfect"]] is True
    assert updates[second["module"]] == "depth_midas" and updates[second["model"]]["value"] == "None"
