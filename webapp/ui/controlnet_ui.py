"""The ControlNet accordion of the txt2img and img2img tabs: N units (``controlnet_unit_count``), each with its
image, preprocessor, model (the caller's ControlNet models of the checkpoint's base) and settings.

The form's values become ``alwayson_scripts.controlnet.args`` in the tab's request, so the shared request
validation (pipelines.controlnet.units) checks them exactly as for the APIs. "Preview" runs the preprocessor
alone through ``ControlNetService``; images are read only from Gradio's upload folder (webapp/ui/files.py).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

import gradio as gr
from PIL import Image

from pipelines.controlnet import preprocessors
from pipelines.controlnet.infotext import units_from_infotext
from pipelines.controlnet.units import ControlMode, HiresOption, ResizeMode
from webapp.i18n import translate
from webapp.records import ModelType
from webapp.services.controlnet import ControlNetService
from webapp.ui.context import UiContext, ui_errors
from webapp.ui.files import read_upload

_SLIDERS = ("processor_res", "threshold_a", "threshold_b")
_SETTINGS = ("weight", "guidance_start", "guidance_end", "processor_res", "threshold_a", "threshold_b",
             "control_mode", "resize_mode", "pixel_perfect", "hr_option")


@ui_errors
def _slider_updates(module: str | None) -> list[Any]:
    """Labels, ranges and defaults of the three sliders for ``module`` (hidden where it has none)."""
    sliders = preprocessors.module_detail().get(module or "none", {}).get("sliders", [])
    out = []
    for position in range(3):
        detail = sliders[position] if position < len(sliders) else None
        if detail is None:
            out.append(gr.update(visible=False, minimum=-1, value=-1))  # -1: the module's default
        else:
            out.append(gr.update(visible=True, label=detail["name"], minimum=detail.get("min", 0),
                                 maximum=detail.get("max", 2048), value=detail.get("value", -1)))
    return out


class ControlNetPanel:
    """One tab's units; ``mode`` names the tab (element ids)."""

    def __init__(self, ctx: UiContext, service: ControlNetService, registry: Any, *, mode: str, unit_count: int,
                 max_image_bytes: int) -> None:
        self.ctx = ctx
        self.service = service
        self.registry = registry
        self.mode = mode
        self.unit_count = unit_count
        self.max_image_bytes = max_image_bytes
        self.units: list[dict[str, Any]] = []
        self._checkpoint: Any = None

    # -- handlers ------------------------------------------------------------------------------------------
    @ui_errors
    def load_models(self, values: dict[Any, Any], request: gr.Request) -> list[Any]:
        """Each unit's model choices: the caller's ControlNet models of the checkpoint's base."""
        user = self.ctx.user(request)
        checkpoint = values.get(self._checkpoint)
        current = [values.get(unit["model"]) for unit in self.units]
        record = self.registry.find(actor=user, type=ModelType.CHECKPOINT, ref=checkpoint) if checkpoint else None
        titles = ["None", *self.service.model_titles(actor=user, base=record.base if record else None)]
        return [gr.update(choices=titles, value=value if value in titles else "None") for value in current]

    @ui_errors
    def preview(self, module: str | None, image: str | None, mask: str | None, processor_res: float,
                threshold_a: float, threshold_b: float, request: gr.Request) -> Image.Image:
        """The preprocessor's map of the unit's image, nothing else run."""
        user = self.ctx.user(request)
        if not image:
            raise gr.Error("ControlNet: add an image to preview first")
        masks = [self._read(mask)] if mask else []
        found = self.service.detect(actor=user, module=module or "none", images=[self._read(image)], masks=masks,
                                    processor_res=processor_res, threshold_a=threshold_a,
                                    threshold_b=threshold_b, field_prefix="ControlNet ")
        if found.warnings:
            gr.Warning("; ".join(translate(warning) for warning in found.warnings))
        with Image.open(io.BytesIO(found.images[0])) as result:
            result.load()
            return result

    def _read(self, path: str) -> bytes:
        return read_upload(path, max_bytes=self.max_image_bytes, what="ControlNet image")

    # -- the request ---------------------------------------------------------------------------------------
    def to_args(self, values: Mapping[Any, Any]) -> list[dict[str, Any]]:
        """The units as ``alwayson_scripts.controlnet.args`` (values as typed: the shared validation checks)."""
        args = []
        for unit in self.units:
            v = {name: values.get(component) for name, component in unit.items() if name != "preview"}
            arg: dict[str, Any] = {"enabled": bool(v["enabled"]), "module": v["module"] or "none",
                                   "model": v["model"] or "None"}
            arg.update({name: v[name] for name in _SETTINGS})
            if v["enabled"]:
                arg["image"] = base64.b64encode(self._read(v["image"])).decode("ascii") if v["image"] else None
                arg["mask"] = base64.b64encode(self._read(v["mask"])).decode("ascii") if v["mask"] else None
            args.append(arg)
        return args

    # -- filling it from an infotext (PNG Info → txt2img) ------------------------------------------------------
    def restore(self, actor: Any, parsed: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The infotext's units with each model named as the caller's own (by hash, then name), or "None"."""
        units = units_from_infotext(parsed)[: self.unit_count]
        for unit in units:
            model = str(unit.get("model") or "None")
            refs = [model.rsplit("[", 1)[-1].rstrip("]").strip(), model] if "[" in model else [model]
            found = next((r for ref in refs if ref and ref != "None"
                          and (r := self.service.find_title(actor=actor, ref=ref)) is not None), None)
            unit["model"] = found if found is not None else "None"
        return units

    def updates(self, units: list[dict[str, Any]]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for unit, widgets in zip(units, self.units, strict=False):
            out[widgets["enabled"]] = True
            for name in ("module", *_SETTINGS):
                if name in unit:
                    out[widgets[name]] = unit[name]
            out[widgets["model"]] = gr.update(choices=["None", unit["model"]], value=unit["model"])
        return out

    @property
    def inputs(self) -> set[Any]:
        return {component for unit in self.units for name, component in unit.items() if name != "preview"}

    @property
    def widgets(self) -> list[Any]:
        return [unit[name] for unit in self.units for name in ("enabled", "module", "model", *_SETTINGS)]

    # -- widgets -------------------------------------------------------------------------------------------
    def build(self) -> None:
        modules = preprocessors.list_modules()
        with gr.Accordion("ControlNet", open=False, elem_id=f"{self.mode}-controlnet"), gr.Tabs():
            for index in range(self.unit_count):
                with gr.Tab(f"Unit {index}"):
                    self.units.append(self._build_unit(index, modules))

    def _build_unit(self, index: int, modules: list[str]) -> dict[str, Any]:
        prefix = f"{self.mode}-cn{index}"
        u: dict[str, Any] = {}
        u["enabled"] = gr.Checkbox(label="Enable", value=False, elem_id=f"{prefix}-enable")
        with gr.Row():
            u["image"] = gr.Image(label="Image", type="filepath", sources=("upload", "clipboard"), height=240,
                                  elem_id=f"{prefix}-image")
            u["mask"] = gr.Image(label="Mask (optional)", type="filepath", sources=("upload",), height=240,
                                 elem_id=f"{prefix}-mask")
            u["preview"] = gr.Image(label="Preprocessor preview", type="pil", interactive=False, height=240,
                                    elem_id=f"{prefix}-preview")
        with gr.Row():
            u["module"] = gr.Dropdown(modules, value="none", label="Preprocessor", elem_id=f"{prefix}-module")
            u["model"] = gr.Dropdown(["None"], value="None", label="Model", elem_id=f"{prefix}-model")
            self_preview = gr.Button("Preview", scale=0, min_width=90, elem_id=f"{prefix}-run-preview")
        with gr.Row():
            u["weight"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Control weight")
            u["guidance_start"] = gr.Slider(0, 1, value=0.0, step=0.01, label="Starting control step")
            u["guidance_end"] = gr.Slider(0, 1, value=1.0, step=0.01, label="Ending control step")
        with gr.Row():
            u["processor_res"] = gr.Slider(64, 2048, value=512, step=1, label="Preprocessor resolution",
                                           visible=False)
            u["threshold_a"] = gr.Slider(-1, 256, value=-1, step=0.01, label="Threshold A", visible=False)
            u["threshold_b"] = gr.Slider(-1, 256, value=-1, step=0.01, label="Threshold B", visible=False)
        u["control_mode"] = gr.Radio([m.value for m in ControlMode], value=ControlMode.BALANCED.value,
                                     label="Control mode")
        u["resize_mode"] = gr.Radio([m.value for m in ResizeMode], value=ResizeMode.CROP_AND_RESIZE.value,
                                    label="Resize mode")
        with gr.Row():
            u["pixel_perfect"] = gr.Checkbox(label="Pixel perfect", value=False)
            u["hr_option"] = gr.Radio([m.value for m in HiresOption], value=HiresOption.BOTH.value,
                                      label="Hires. fix option")
        private = {"api_visibility": "private"}
        sliders = [u[name] for name in _SLIDERS]
        u["module"].change(_slider_updates, [u["module"]], sliders, **private)
        self_preview.click(self.preview, [u["module"], u["image"], u["mask"], *sliders], [u["preview"]], **private)
        return u

    def wire(self, checkpoint: Any, triggers: list[Any]) -> None:
        """Refresh the model choices when the checkpoint (its base) or the user's lists may have changed."""
        self._checkpoint = checkpoint
        models = [unit["model"] for unit in self.units]
        for trigger in (*triggers, checkpoint.change):
            trigger(self.load_models, {checkpoint, *models}, models, api_visibility="private")
