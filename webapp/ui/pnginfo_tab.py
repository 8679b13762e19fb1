"""PNG Info: drop an image, read its generation parameters, send them to txt2img.

The infotext is read from the PNG ``parameters`` chunk (or JPEG/WebP EXIF) with the engine's own
parser, so what it shows is what a job would use; the checkpoint is matched in the registry by the
recorded hash, then by name, among the models this user may use.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

import gradio as gr

from pipelines.images import open_image
from pipelines.infotext import parse, read_infotext, refiner_refs, request_fields
from webapp.records import ModelType
from webapp.ui.context import UiContext, ui_errors
from webapp.ui.files import MAX_IMAGE_BYTES, read_upload
from webapp.ui.generate_tab import GenerateTab, switch_tab_js

log = logging.getLogger(__name__)


def _thumbnail(data: bytes) -> str:
    with open_image(data, "image") as image:
        image = image.convert("RGB")
        image.thumbnail((384, 384))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="dropped image" src="data:image/png;base64,{encoded}" style="max-width:384px">'


class PngInfoTab:
    permission: str | None = None
    """Shown to users holding it (None: everyone)."""

    def __init__(self, ctx: UiContext, *, registry: Any, target: GenerateTab) -> None:
        self.ctx = ctx
        self.registry = registry
        self.target = target

    @ui_errors
    def read(self, path: str | None, request: gr.Request) -> tuple:
        """Show the image and its parameters; keep the request fields for "Send to txt2img"."""
        user = self.ctx.user(request)
        if not path:
            return "", "", None, None
        data = read_upload(path, max_bytes=MAX_IMAGE_BYTES, what="image")
        try:
            text = read_infotext(data)
            preview = _thumbnail(data)
        except (OSError, ValueError) as exc:
            raise gr.Error(f"That file is not a readable image ({exc})") from None
        if not text:
            return preview, "", {"note": "this image has no generation parameters"}, None
        parsed = parse(text)
        fields = request_fields(parsed)
        checkpoint = self._checkpoint_title(user, [parsed.get("Model hash"), parsed.get("Model")])
        refiner = self._checkpoint_title(user, refiner_refs(parsed)) if "refiner_switch_at" in fields else None
        panel = self.target.controlnet
        controlnet = panel.restore(user, parsed) if panel is not None else []
        return preview, text, parsed, {"fields": fields, "checkpoint": checkpoint, "refiner": refiner,
                                       "controlnet": controlnet}

    def _checkpoint_title(self, user: Any, refs: list[Any]) -> str | None:
        """The title of the first checkpoint the caller may use that ``refs`` (hash, name) name."""
        for ref in refs:
            record = self.registry.find(actor=user, type=ModelType.CHECKPOINT, ref=str(ref)) if ref else None
            if record is not None:
                return record.title
        return None

    @ui_errors
    def send(self, state: dict[str, Any] | None) -> dict[Any, Any]:
        if not state:
            raise gr.Error("Drop an image with generation parameters first")
        updates = self.target.form.updates_from_fields(state["fields"], state.get("checkpoint"), state.get("refiner"))
        if self.target.controlnet is not None:
            updates.update(self.target.controlnet.updates(state.get("controlnet") or []))
        return updates

    def build(self) -> gr.Tab:
        with gr.Tab("PNG Info", id="pnginfo", elem_id="tab-pnginfo") as tab:
            state = gr.State(None)
            with gr.Row():
                with gr.Column():
                    upload = gr.File(label="Drop an image", file_types=["image"], type="filepath",
                                     elem_id="pnginfo-file")
                    preview = gr.HTML(elem_id="pnginfo-preview")
                with gr.Column():
                    text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo-text")
                    table = gr.JSON(label="Parsed", elem_id="pnginfo-parsed")
                    send = gr.Button("Send to txt2img", variant="primary", elem_id="pnginfo-send")
        private = {"api_visibility": "private"}
        upload.change(self.read, [upload], [preview, text, table, state], **private)
        panel = self.target.controlnet.widgets if self.target.controlnet is not None else []
        send.click(self.send, [state], [*self.target.form.c.values(), *panel], **private).success(
            None, js=switch_tab_js("txt2img"), **private)
        return tab
