"""The txt2img and img2img tabs: one class, two modes (img2img has an inpaint mode: paint the mask).

Generate submits an A1111-shaped request through ``JobService`` — exactly what the APIs do — and a
follow-up generator streams the job's progress (bar, step, ETA, live preview) until it ends, then
shows its images through the authorised /files route with the infotext. Clicking Generate again
queues another job and follows the new one; earlier ones keep running and land in History. The
button reads "Generate on Cloud" when the chosen endpoint is remote.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.context import get_blocks_context

from pipelines.images import decode_image
from pipelines.infotext import parse, request_fields
from pipelines.types import InvalidRequestError
from webapp.records import JobMode, ModelType
from webapp.services.errors import ServiceError
from webapp.services.jobs import JobService
from webapp.ui.context import UiContext, ui_errors
from webapp.ui.controlnet_ui import ControlNetPanel
from webapp.ui.files import MAX_IMAGE_BYTES, read_upload
from webapp.ui.generate_form import (
    CLOUD_LABEL,
    ENGINE_WIDGETS,
    LOCAL_LABEL,
    GenerationForm,
    choices_for,
    engine_choices,
    insert_token,
    network_token,
)
from webapp.ui.history import HistoryPanel
from webapp.ui.job_views import gallery_html, infotext_of, outcome_html, progress_html

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
"""Longest a follower sleeps without news; progress events wake it sooner."""
MIN_UPDATE_SECONDS = 0.25
"""Shortest gap between two progress updates sent to the browser."""


def switch_tab_js(label: str) -> str:
    return ("() => { const tab = [...document.querySelectorAll('#studio-tabs button[role=\"tab\"]')]"
            f".find(b => b.textContent.trim() === '{label}'); if (tab) tab.click(); }}")


def forward_non_images_js(editor_id: str, upload_id: str) -> str:
    """Page script: a non-image file dropped on the editor (whose canvas would drop it silently) goes to
    the Upload image button instead, so the server names the file and the reason in a popup."""
    return f"""() => {{
  document.addEventListener('drop', (event) => {{
    const file = event.dataTransfer?.files?.[0];
    if (!file || file.type.startsWith('image/') || !event.target.closest?.('#{editor_id}')) return;
    const button = document.getElementById('{upload_id}');  // Gradio puts its file input right beside it
    const input = [button?.previousElementSibling, button?.nextElementSibling]
      .find((el) => el?.matches('input[type=file]'));
    if (!input) return;
    event.preventDefault();
    event.stopPropagation();
    const forwarded = new DataTransfer();
    forwarded.items.add(file);
    input.files = forwarded.files;
    input.dispatchEvent(new Event('change', {{bubbles: true}}));
  }}, true);
}}"""


class GenerateTab:
    """``mode`` is "txt2img" or "img2img"; ``senders`` are tabs whose "Send to img2img" land here."""

    permission: str | None = None
    """Shown to users holding it (None: everyone)."""

    def __init__(self, ctx: UiContext, *, jobs: JobService, registry: Any, mode: str,
                 senders: Sequence[GenerateTab] = (), controlnet: ControlNetPanel | None = None) -> None:
        if mode not in ("txt2img", "img2img"):
            raise ValueError(f"mode must be txt2img or img2img, not {mode!r}")
        self.ctx = ctx
        self.jobs = jobs
        self.registry = registry
        self.mode = mode
        self.senders = list(senders)
        self.form = GenerationForm(mode)
        self.controlnet = controlnet
        self.history = HistoryPanel(ctx, jobs, mode, ("txt2img",) if mode == "txt2img" else ("img2img", "inpaint"))

    # -- handlers ------------------------------------------------------------------------------------------
    @ui_errors
    def load_choices(self, checkpoint: str | None, vae: str | None, endpoint: str | None, refiner: str | None,
                     request: gr.Request) -> tuple:
        """Fill the per-user lists (models they may use, endpoints) and the chosen endpoint's own samplers,
        schedule types and upscalers, keeping current choices that still exist."""
        user = self.ctx.user(request)
        rows = self.jobs.endpoints.list_endpoints(actor=user)
        choices = choices_for(user, self.registry, rows)
        names = [value for _, value in choices.endpoints]
        endpoint = endpoint if endpoint in names else (names[0] if names else None)
        checkpoint = checkpoint if checkpoint in choices.checkpoints else (
            choices.checkpoints[0] if choices.checkpoints else None)
        chosen = next((e for e in rows if e.name == endpoint), None)
        return (
            gr.update(choices=choices.checkpoints, value=checkpoint),
            gr.update(choices=choices.vaes, value=vae if vae in choices.vaes else "Automatic"),
            gr.update(choices=choices.endpoints, value=endpoint),
            gr.update(choices=choices.networks, value=None),
            gr.update(choices=["None", *choices.checkpoints], value=refiner if refiner in choices.checkpoints else "None"),
            gr.update(value=CLOUD_LABEL if endpoint in choices.remote else LOCAL_LABEL),
            *self._engine_updates(chosen.capabilities if chosen else {}),
        )

    @ui_errors
    def endpoint_changed(self, endpoint: str | None, request: gr.Request) -> tuple:
        """The Generate button's words ("Generate on Cloud" for a remote endpoint) and the endpoint's own lists."""
        if not endpoint:
            return (gr.update(value=LOCAL_LABEL), *self._engine_updates({}))
        chosen = self.jobs.endpoints.get(actor=self.ctx.user(request), name=endpoint)
        return (gr.update(value=CLOUD_LABEL if chosen.remote else LOCAL_LABEL), *self._engine_updates(chosen.capabilities))

    def _engine_widgets(self) -> list[str]:
        return [name for name in ENGINE_WIDGETS if name in self.form.c]

    def _engine_updates(self, capabilities: dict) -> list[Any]:
        updates = engine_choices(capabilities)
        return [updates[name] for name in self._engine_widgets()]

    @staticmethod
    @ui_errors
    def insert_network(prompt: str, choice: str | None) -> str:
        if not choice:
            raise gr.Error("Choose a LoRA, embedding or hypernetwork to insert")
        return insert_token(prompt, network_token(choice))

    @ui_errors
    def submit(self, values: dict[Any, Any], request: gr.Request) -> tuple:
        """Queue the job; the follower (chained on success) streams it."""
        user = self.ctx.user(request)
        mode, a1111, endpoint = self.form.to_request(values)
        units = self.controlnet.to_args(values) if self.controlnet is not None else []
        if any(unit["enabled"] for unit in units):  # none enabled: the request (and its curl) stays plain
            a1111["alwayson_scripts"] = {"controlnet": {"args": units}}
        try:
            job = self.jobs.submit(actor=user, mode=mode, request=a1111, endpoint=endpoint)
        except ServiceError as exc:
            raise self.form.labelled(exc) from None
        snapshot = self.jobs.snapshot_of(job)
        return job.id, progress_html(snapshot), "", "", gr.update(choices=[], value=None)

    @ui_errors
    def follow(self, job_id: str | None, request: gr.Request) -> Iterator[dict[Any, Any]]:
        """Stream the job's progress until it ends, then its images and infotext."""
        if not job_id:
            return
        user = self.ctx.user(request)
        board = self.jobs.board
        while True:
            started = time.monotonic()
            version = board.version(job_id)  # before reading the state: no change slips through
            job = self.jobs.get(actor=user, job_id=job_id)
            if job.is_terminal:
                indices = [(f"#{i + 1}", i) for i in range(len(job.image_keys))]
                yield {
                    self.progress: outcome_html(job), self.results: gallery_html(job),
                    self.infotext: infotext_of(job), self.index: gr.update(choices=indices, value=0 if indices else None),
                    self.last_seed: (job.info or {}).get("seed", -1),
                }
                return
            yield {self.progress: progress_html(self.jobs.snapshot_of(job))}
            board.wait(job_id, version, POLL_SECONDS)
            spare = MIN_UPDATE_SECONDS - (time.monotonic() - started)
            if spare > 0:
                time.sleep(spare)

    @ui_errors
    def cancel(self, job_id: str | None, request: gr.Request) -> Any:
        if not job_id:
            raise gr.Error("Nothing is running here")
        job = self.jobs.cancel(actor=self.ctx.user(request), job_id=job_id)
        if job.is_terminal:
            return outcome_html(job)
        return gr.update()

    @ui_errors
    def load_image(self, path: str | None, request: gr.Request) -> Any:
        """img2img's "Upload image": any file; one that is not an image is named with the reason."""
        self.ctx.user(request)
        if not path:
            return gr.update()
        data = read_upload(path, max_bytes=MAX_IMAGE_BYTES, what="image")
        try:
            return decode_image(data, "image")  # header-first: garbage and decompression bombs refused
        except InvalidRequestError as exc:
            raise gr.Error(f"{Path(path).name} is not an image ({exc})") from None

    @ui_errors
    def receive(self, job_id: str | None, index: int | None, request: gr.Request) -> dict[Any, Any]:
        """"Send to img2img": the chosen result becomes this tab's input image and, as in A1111, its
        generation parameters (read from that image's infotext) fill the form. Read through the service,
        so only the job's owner or an administrator can send it."""
        from PIL import Image

        if not job_id:
            raise gr.Error("There is no image to send yet")
        user, position = self.ctx.user(request), int(index or 0)
        job = self.jobs.get(actor=user, job_id=job_id)
        data = self.jobs.image(actor=user, job_id=job_id, index=position)
        with Image.open(io.BytesIO(data)) as image:
            updates: dict[Any, Any] = {self.form.c["image"]: image.convert("RGB")}
        infotexts = job.infotexts
        if infotexts:
            fields = request_fields(parse(infotexts[min(position, len(infotexts) - 1)]))
            if job.mode == JobMode.TXT2IMG:
                fields.pop("denoising_strength", None)  # the hires pass's, not an img2img strength
            ref = job.checkpoint_hash or job.checkpoint
            checkpoint = self.registry.find(actor=user, type=ModelType.CHECKPOINT, ref=ref) if ref else None
            updates.update(self.form.updates_from_fields(fields, checkpoint.title if checkpoint else None))
        return updates

    # -- widgets -------------------------------------------------------------------------------------------
    def build(self) -> gr.Tab:
        m = self.mode
        with gr.Tab(m, id=m, elem_id=f"tab-{m}") as tab:
            self.job_id = gr.State(None)
            self.last_seed = gr.State(-1)
            with gr.Row():
                with gr.Column(scale=3):
                    self.form.build()
                    if self.controlnet is not None:
                        self.controlnet.build()
                with gr.Column(scale=2):
                    with gr.Row():
                        self.generate = gr.Button(LOCAL_LABEL, variant="primary", elem_id=f"{m}-generate", scale=3)
                        self.cancel_button = gr.Button("Cancel", elem_id=f"{m}-cancel", scale=1)
                    self.progress = gr.HTML(elem_id=f"{m}-progress")
                    self.results = gr.HTML(elem_id=f"{m}-results")
                    self.infotext = gr.Textbox(label="Parameters", lines=4, interactive=False, elem_id=f"{m}-infotext")
                    with gr.Row():
                        self.index = gr.Dropdown(label="Image", choices=[], value=None, scale=1)
                        self.send = gr.Button("Send to img2img", elem_id=f"{m}-send-to-img2img", scale=2)
            self.history.build()
        self._wire(tab)
        return tab

    def _wire(self, tab: gr.Tab) -> None:
        private = {"api_visibility": "private"}
        c = self.form.c
        engine = [c[name] for name in self._engine_widgets()]
        choice_inputs = [c["checkpoint"], c["vae"], c["endpoint"], c["refiner_checkpoint"]]
        choice_outputs = [c["checkpoint"], c["vae"], c["endpoint"], self.form.network, c["refiner_checkpoint"],
                          self.generate, *engine]
        root = get_blocks_context().root_block
        for trigger in (root.load, tab.select, self.form.refresh.click):
            trigger(self.load_choices, choice_inputs, choice_outputs, **private)
            trigger(self.history.refresh, self.history.filters, self.history.refresh_outputs, **private)
        if self.controlnet is not None:
            self.controlnet.wire(c["checkpoint"], [root.load, tab.select, self.form.refresh.click])
        c["endpoint"].input(self.endpoint_changed, [c["endpoint"]], [self.generate, *engine], **private)
        self.form.insert.click(self.insert_network, [c["prompt"], self.form.network], [c["prompt"]], **private)
        self.form.random_seed.click(ui_errors(lambda: -1), None, [c["seed"]], **private)
        self.form.reuse_seed.click(ui_errors(lambda seed: seed), [self.last_seed], [c["seed"]], **private)

        submitted = self.generate.click(
            self.submit, self.form.inputs | (self.controlnet.inputs if self.controlnet else set()), [self.job_id, self.progress, self.results, self.infotext, self.index],
            trigger_mode="multiple", **private)
        submitted.success(self.history.refresh, self.history.filters, self.history.refresh_outputs, **private)
        followed = submitted.success(
            self.follow, [self.job_id], [self.progress, self.results, self.infotext, self.index, self.last_seed],
            show_progress="hidden", concurrency_limit=None, **private)  # followers mostly sleep: no queue slot cap
        followed.then(self.history.refresh, self.history.filters, self.history.refresh_outputs, **private)
        # A new Generate follows the new job; the previous follower stops (its job keeps running).
        self.generate.click(None, None, None, cancels=[followed], **private)
        self.cancel_button.click(self.cancel, [self.job_id], [self.progress], **private)

        if self.mode == "img2img":
            self.form.upload.upload(self.load_image, [self.form.upload], [c["image"]], **private)
            get_blocks_context().root_block.load(None, js=forward_non_images_js(f"{self.mode}-image",
                                                                               f"{self.mode}-upload-image"))
            receive_outputs = [c["image"], *self.form.field_widgets]
            for source in (*self.senders, self):
                for button, job_state, index in ((source.send, source.job_id, source.index),
                                                 (source.history.send_button, source.history.selected,
                                                  source.history.index)):
                    button.click(self.receive, [job_state, index], receive_outputs, **private).success(
                        None, js=switch_tab_js("img2img"), **private)
