"""The generation parameters form shared by the txt2img and img2img tabs.

Widgets are created once per tab and kept by name (``form.c["steps"]``); a handler receives them as a
set and gets a ``{component: value}`` dict, which ``to_request`` turns into one A1111-shaped request
— the same JSON /sdapi/v1 takes — so the UI has no private protocol. Choices that depend on the user
(checkpoints, VAEs, networks, endpoints) are filled per user by ``choices_for``.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import gradio as gr

from deploy.backends.base import engine_lists
from webapp.i18n import translate
from webapp.records import Endpoint, ModelRecord, ModelType, User
from webapp.services.errors import ServiceError
from webapp.ui.localize import text_of

RESIZE_MODES = ["Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"]
MASKED_CONTENT = ["fill", "original", "latent noise", "latent nothing"]
INPAINT_AREAS = ["Whole picture", "Only masked"]
MASK_MODES = ["Inpaint masked", "Inpaint not masked"]
NETWORK_PREFIX = {"LoRA": ModelType.LORA, "Embedding": ModelType.EMBEDDING, "Hypernetwork": ModelType.HYPERNETWORK}
_WIDGET_OF = {"sd_model_checkpoint": "checkpoint", "sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip",
              "mask_blur_x": "mask_blur", "mask_blur_y": "mask_blur", "init_images": "image",
              "init_images[0]": "image"}
"""Request fields whose widget has another name."""
_PASTED = ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width", "height", "seed",
           "clip_skip", "denoising_strength", "enable_hr", "hr_upscaler", "hr_scale", "hr_second_pass_steps",
           "hr_resize_x", "hr_resize_y", "refiner_switch_at")
"""Request fields an infotext fills into the form (PNG Info → txt2img, Send to img2img)."""
CLOUD_LABEL = "Generate on Cloud"
LOCAL_LABEL = "Generate"


ENGINE_LISTS = engine_lists()
"""What the widgets offer before an endpoint is chosen; then they show that endpoint's own lists
(``engine_choices``)."""
ENGINE_WIDGETS = {"sampler_name": "samplers", "scheduler": "schedulers", "hr_upscaler": "upscalers"}
"""Form widget -> the ``Capabilities`` list it offers."""


def engine_choices(capabilities: dict[str, Any]) -> dict[str, Any]:
    """Updates for the engine-dependent dropdowns from an endpoint's capabilities: its own samplers, schedule
    types and upscalers (a list the endpoint does not report keeps the engine's). Only the choices change: a
    current value the endpoint lacks stays shown, and Generate then says it is not among the choices."""
    return {widget: gr.update(choices=[str(v) for v in capabilities.get(key) or ()] or list(ENGINE_LISTS[key]))
            for widget, key in ENGINE_WIDGETS.items()}


@dataclass(frozen=True)
class UserChoices:
    checkpoints: list[str]
    vaes: list[str]
    networks: list[str]
    endpoints: list[tuple[str, str]]
    remote: frozenset[str]


def choices_for(user: User, registry: Any, endpoints: list[Endpoint]) -> UserChoices:
    def names(model_type: ModelType) -> list[ModelRecord]:
        return sorted(registry.list_models(actor=user, type=model_type, registering=True), key=lambda r: r.name.lower())

    networks = [f"{label}: {r.name}" for label, t in NETWORK_PREFIX.items() for r in names(t)]
    return UserChoices(
        checkpoints=[r.title for r in names(ModelType.CHECKPOINT)],
        vaes=["Automatic", "None", *(r.name for r in names(ModelType.VAE))],
        networks=networks,
        endpoints=[(f"{e.name} ({'cloud' if e.remote else e.kind}, {e.status})", e.name) for e in endpoints],
        remote=frozenset(e.name for e in endpoints if e.remote),
    )


def network_token(choice: str) -> str:
    """What the extra-networks picker inserts: ``<lora:name:1>``, ``<hypernet:name:1>`` or the embedding word."""
    label, _, name = choice.partition(": ")
    if label == "LoRA":
        return f"<lora:{name}:1>"
    if label == "Hypernetwork":
        return f"<hypernet:{name}:1>"
    return name


def insert_token(prompt: str, token: str) -> str:
    prompt = (prompt or "").rstrip()
    if not token:
        return prompt
    return f"{prompt}, {token}" if prompt and not prompt.endswith(",") else f"{prompt} {token}".strip()


def _index(value: Any, options: list[str]) -> int:
    """A radio's choice as its index (Gradio gives the index for ``type="index"``; accept the label too)."""
    if isinstance(value, str):
        return options.index(value) if value in options else 0
    return int(value or 0)


def _number(value: float, *, step: float, label: str, **kwargs: Any) -> gr.Number:
    """A number box without bounds: Gradio's Slider/Number clamp (browser) or refuse without naming the
    field (server) when given ``minimum``/``maximum``, so the range is left to the shared validation
    (``pipelines.types``), which names the field and the accepted range as the API does."""
    return gr.Number(value=value, step=step, label=label, **kwargs)


def _png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def editor_images(value: Any) -> tuple[Any, Any]:
    """(init image RGB, mask L or None) from an ImageEditor value: background + what was painted on it."""
    from PIL import ImageChops

    if not value:
        return None, None
    background = value.get("background") if isinstance(value, dict) else value
    if background is None:
        return None, None
    init = background.convert("RGB")
    mask = None
    for layer in (value.get("layers") or []) if isinstance(value, dict) else []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A").resize(init.size)
        painted = alpha.point(lambda a: 255 if a > 0 else 0)
        mask = painted if mask is None else ImageChops.lighter(mask, painted)
    if mask is not None and mask.getbbox() is None:
        mask = None
    return init, mask


class GenerationForm:
    """The widgets of one tab's form (``mode`` txt2img or img2img) and the request they describe."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.c: dict[str, Any] = {}

    # -- widgets --------------------------------------------------------------------------------------
    def build_models_row(self) -> None:
        c, m = self.c, self.mode
        with gr.Row():
            c["checkpoint"] = gr.Dropdown(label="Stable Diffusion checkpoint", choices=[], scale=3,
                                          elem_id=f"{m}-checkpoint")
            c["vae"] = gr.Dropdown(label="SD VAE", choices=["Automatic", "None"], value="Automatic", scale=2,
                                   elem_id=f"{m}-vae")
            c["endpoint"] = gr.Dropdown(label="Endpoint", choices=[], scale=2, elem_id=f"{m}-endpoint")
            self.refresh = gr.Button("Refresh", scale=0, min_width=80, elem_id=f"{m}-refresh")

    def build_prompts(self) -> None:
        c, m = self.c, self.mode
        c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{m}-prompt")
        c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{m}-negative-prompt")
        with gr.Row():
            self.network = gr.Dropdown(label="Extra networks (LoRA, embeddings, hypernetworks)", choices=[],
                                       scale=4, elem_id=f"{m}-network")
            self.insert = gr.Button("Insert into prompt", scale=1, elem_id=f"{m}-insert-network")

    def build_image_input(self) -> None:
        c, m = self.c, self.mode
        c["image"] = gr.ImageEditor(
            label="Image (in inpaint mode, paint the area to repaint)", type="pil", sources=("upload", "clipboard"),
            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), layers=False, elem_id=f"{m}-image",
            height=420)
        # The editor ignores a dropped non-image in the browser; this button reaches the server, which says why.
        self.upload = gr.UploadButton("Upload image (any file; says why one cannot be used)", file_count="single",
                                      type="filepath", size="sm", elem_id=f"{m}-upload-image")
        with gr.Row():
            c["img_mode"] = gr.Radio(["img2img", "inpaint"], value="img2img", label="Mode", elem_id=f"{m}-mode")
            c["resize_mode"] = gr.Radio(RESIZE_MODES, value=RESIZE_MODES[0], label="Resize mode", type="index")
        with gr.Accordion("Inpaint", open=False):
            with gr.Row():
                c["mask_blur"] = _number(4, step=1, label="Mask blur")
                c["inpaint_full_res_padding"] = _number(32, step=4, label="Only masked padding (px)")
            c["inpainting_fill"] = gr.Radio(MASKED_CONTENT, value="original", type="index", label="Masked content")
            with gr.Row():
                c["inpaint_full_res"] = gr.Radio(INPAINT_AREAS, value=INPAINT_AREAS[0], type="index",
                                                 label="Inpaint area")
                c["inpainting_mask_invert"] = gr.Radio(MASK_MODES, value=MASK_MODES[0], type="index", label="Mask mode")

    def build_sampling(self) -> None:
        c, m = self.c, self.mode
        with gr.Row():
            c["sampler_name"] = gr.Dropdown(list(ENGINE_LISTS["samplers"]), value="DPM++ 2M",
                                            label="Sampling method", elem_id=f"{m}-sampler")
            c["scheduler"] = gr.Dropdown(list(ENGINE_LISTS["schedulers"]), value="Automatic",
                                         label="Schedule type", elem_id=f"{m}-scheduler")
            c["steps"] = _number(20, step=1, label="Sampling steps", elem_id=f"{m}-steps")
        with gr.Row():
            c["width"] = _number(512, step=8, label="Width", elem_id=f"{m}-width")
            c["height"] = _number(512, step=8, label="Height", elem_id=f"{m}-height")
        with gr.Row():
            c["n_iter"] = _number(1, step=1, label="Batch count")
            c["batch_size"] = _number(1, step=1, label="Batch size")
            c["cfg_scale"] = _number(7, step=0.5, label="CFG scale", elem_id=f"{m}-cfg")
        with gr.Row():
            c["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id=f"{m}-seed", scale=3)
            self.random_seed = gr.Button("Random", scale=0, min_width=80, elem_id=f"{m}-random-seed")
            self.reuse_seed = gr.Button("Reuse last", scale=0, min_width=80, elem_id=f"{m}-reuse-seed")
            c["clip_skip"] = _number(1, step=1, label="Clip skip", scale=3)
        if m == "img2img":
            c["denoising_strength"] = _number(0.75, step=0.01, label="Denoising strength",
                                                elem_id=f"{m}-denoising")

    def build_hires(self) -> None:
        c = self.c
        with gr.Accordion("Hires. fix", open=False):
            c["enable_hr"] = gr.Checkbox(label="Enable hires. fix", value=False, elem_id="txt2img-enable-hr")
            with gr.Row():
                c["hr_upscaler"] = gr.Dropdown(list(ENGINE_LISTS["upscalers"]), value="Latent", label="Upscaler")
                c["hr_scale"] = _number(2, step=0.05, label="Upscale by")
                c["hr_second_pass_steps"] = _number(0, step=1, label="Hires steps (0: same)")
            with gr.Row():
                c["hr_resize_x"] = _number(0, step=8, label="Resize width to (0: by scale)")
                c["hr_resize_y"] = _number(0, step=8, label="Resize height to (0: by scale)")
                c["denoising_strength"] = _number(0.7, step=0.01, label="Denoising strength")

    def build_refiner(self) -> None:
        c = self.c
        with gr.Accordion("Refiner (SDXL)", open=False), gr.Row():
            c["refiner_checkpoint"] = gr.Dropdown(["None"], value="None", label="Refiner checkpoint")
            c["refiner_switch_at"] = _number(0.8, step=0.01, label="Switch at")

    def build(self) -> None:
        self.build_models_row()
        self.build_prompts()
        if self.mode == "img2img":
            self.build_image_input()
        self.build_sampling()
        if self.mode == "txt2img":
            self.build_hires()
        self.build_refiner()

    @property
    def inputs(self) -> set[Any]:
        return set(self.c.values())

    # -- the request ----------------------------------------------------------------------------------
    def to_request(self, values: dict[Any, Any]) -> tuple[str, dict[str, Any], str | None]:
        """(mode, A1111 request, endpoint) from the widget values; ``gr.Error`` for what cannot be sent."""
        v = {name: values.get(component) for name, component in self.c.items()}
        if not v.get("checkpoint"):
            raise gr.Error("Choose a checkpoint (register one in the Models tab first)")

        def number(name: str) -> Any:
            """The value as typed; its range and type are checked by the shared validation."""
            if v[name] is None:
                raise gr.Error(f"{translate(text_of(self.c[name].label))}: enter a number")
            return v[name]

        request: dict[str, Any] = {
            "prompt": v["prompt"] or "", "negative_prompt": v["negative_prompt"] or "",
            "sampler_name": v["sampler_name"], "scheduler": v["scheduler"], "steps": number("steps"),
            "cfg_scale": number("cfg_scale"), "width": number("width"), "height": number("height"),
            "seed": v["seed"] if v["seed"] is not None else -1, "n_iter": number("n_iter"),
            "batch_size": number("batch_size"),
            "override_settings": {"sd_model_checkpoint": v["checkpoint"], "sd_vae": v["vae"] or "Automatic",
                                  "CLIP_stop_at_last_layers": number("clip_skip")},
        }
        if v.get("refiner_checkpoint") and v["refiner_checkpoint"] != "None":
            request["refiner_checkpoint"] = v["refiner_checkpoint"]
            request["refiner_switch_at"] = number("refiner_switch_at")
        mode = self.mode
        if self.mode == "txt2img":
            if v["enable_hr"]:
                request.update(enable_hr=True, hr_upscaler=v["hr_upscaler"], hr_scale=number("hr_scale"),
                               hr_second_pass_steps=number("hr_second_pass_steps"),
                               hr_resize_x=number("hr_resize_x"), hr_resize_y=number("hr_resize_y"),
                               denoising_strength=number("denoising_strength"))
        else:
            init, mask = editor_images(v["image"])
            if init is None:
                raise gr.Error("Add an image to start from (drop one on the image box)")
            request.update(init_images=[_png_b64(init)], denoising_strength=number("denoising_strength"),
                           resize_mode=_index(v["resize_mode"], RESIZE_MODES))
            if v["img_mode"] == "inpaint":
                if mask is None:
                    raise gr.Error("Inpaint mode: paint the area to repaint on the image first")
                mode = "inpaint"
                request.update(mask=_png_b64(mask), mask_blur=number("mask_blur"),
                               inpainting_fill=_index(v["inpainting_fill"], MASKED_CONTENT),
                               inpaint_full_res=bool(_index(v["inpaint_full_res"], INPAINT_AREAS)),
                               inpaint_full_res_padding=number("inpaint_full_res_padding"),
                               inpainting_mask_invert=_index(v["inpainting_mask_invert"], MASK_MODES))
        return mode, request, v.get("endpoint") or None

    def labelled(self, exc: ServiceError) -> ServiceError:
        """`exc` with the message led by the label of the widget its field comes from (users see labels)."""
        name = _WIDGET_OF.get(exc.field or "", exc.field)
        component = self.c.get(name) if name else None
        label = text_of(getattr(component, "label", None))  # the page holds an i18n key: its English
        if not label or exc.message.startswith(label):
            return exc
        return type(exc)(f"{translate(label)}: {translate(exc.message)}", field=exc.field)

    # -- filling it from an infotext (PNG Info → txt2img) ------------------------------------------------
    def updates_from_fields(self, fields: dict[str, Any], checkpoint: str | None,
                            refiner: str | None = None) -> dict[Any, Any]:
        """Widget updates for request fields parsed from an infotext (only what it states)."""
        c = self.c
        out: dict[Any, Any] = {c[name]: fields[name] for name in _PASTED if name in fields and name in c}
        if checkpoint:
            out[c["checkpoint"]] = checkpoint
        if refiner and "refiner_checkpoint" in c:
            out[c["refiner_checkpoint"]] = refiner
        return out

    @property
    def field_widgets(self) -> list[Any]:
        """Every widget `updates_from_fields` may fill (the outputs of the events that use it)."""
        return [self.c[name] for name in (*_PASTED, "checkpoint", "refiner_checkpoint") if name in self.c]
