"""Training tab: start a LoRA training (base type, base checkpoint, dataset, a kohya-keyed TOML config, output
name), follow it (loss plot, sample images, log tail) and stop, resume or delete it.

Handlers are thin: they call `TrainingService`, which checks everything before a job is stored (a bad config key
is named in the popup) and authorises (another user's training is "not found"). The selected training is
polled by a `gr.Timer` that runs only while that training is queued or running.
"""

from __future__ import annotations

import html
import io
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from training.config import BASE_TYPES
from webapp.i18n import translate
from webapp.records import Job, JobStatus
from webapp.services.datasets import DatasetService
from webapp.services.jobs import ProgressSnapshot
from webapp.services.trainings import TrainingService, sample_keys
from webapp.services.trainings.views import training_summary
from webapp.ui.context import UiContext, ui_errors

HEADERS = ["Output", "Status", "Progress", "Loss", "Epoch", "Base model", "Owner", "Created (UTC)"]
POLL_SECONDS = 2.0
LOG_LINES = 40
CONFIG_HELP = (
    "kohya's keys (`network_dim`, `network_alpha`, `unet_lr`, `text_encoder_lr`, `max_train_epochs`, `resolution`, "
    "`sample_prompts` …). Missing keys take the base type's defaults; **Format config** checks the config and "
    "fills them in. The model, dataset and output folder are set by the studio."
)
EMPTY_PLOT = pd.DataFrame({"step": [], "loss": []})


def _loss_frame(job: Job, snapshot: ProgressSnapshot) -> pd.DataFrame:
    """The loss by step: the history the row holds (written about once a second) plus the live latest point."""
    points = [(p["step"], p["loss"]) for p in job.metrics.get("history", []) if "step" in p and "loss" in p]
    live = snapshot.metrics or {}
    if "loss" in live and snapshot.step and (not points or snapshot.step > points[-1][0]):
        points.append((snapshot.step, live["loss"]))
    return pd.DataFrame(points, columns=["step", "loss"]) if points else EMPTY_PLOT


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, int | float) else ""


class TrainingTab:
    """Widgets and handlers; handlers are methods so tests can call them as Gradio would."""

    permission: str | None = "training:list"
    """Shown to users holding it (None: everyone)."""

    def __init__(self, ctx: UiContext, trainings: TrainingService, datasets: DatasetService) -> None:
        self.ctx = ctx
        self.trainings = trainings
        self.datasets = datasets

    # -- the form -------------------------------------------------------------------------------------------

    @ui_errors
    def training_base_changed(self, base_type: str, request: gr.Request) -> tuple:
        """The base type's checkpoints and default config."""
        user = self.ctx.user(request)
        choices = [(m.title, m.id) for m in self.trainings.checkpoints(actor=user, base_type=base_type)]
        text, _ = self.trainings.format_config(self.trainings.defaults(base_type), base_type)
        return gr.update(choices=choices, value=choices[0][1] if choices else None), text

    @ui_errors
    def format_training_config(self, text: str, base_type: str) -> tuple:
        """The config normalised (defaults filled in) and its warnings; a bad config names its keys."""
        formatted, warnings = self.trainings.format_config(text or "", base_type)
        lines = ["Config is valid."] + [f"- ⚠ {html.escape(w)}" for w in warnings]
        return formatted, "\n".join(lines)

    @ui_errors
    def create_training(self, base_type: str, base_model: str | None, dataset_id: str | None, config: str,
                        output_name: str, endpoint: str | None, request: gr.Request) -> tuple:
        user = self.ctx.user(request)
        if not base_model:
            raise gr.Error(f"Choose a {base_type} checkpoint to train on")
        if not dataset_id:
            raise gr.Error("Choose a dataset (make one in the Datasets tab)")
        job = self.trainings.create(actor=user, base_type=base_type, base_model=base_model, dataset_id=dataset_id,
                                    config=config or "", output_name=output_name or None, endpoint=endpoint or None)
        rows, choices = self.refresh_trainings(request)
        text = f"Queued training **{html.escape(job.request['output_name'])}** ({job.id})."
        return text, rows, gr.update(choices=choices["choices"], value=job.id)

    # -- the list -------------------------------------------------------------------------------------------

    @ui_errors
    def refresh_trainings(self, request: gr.Request) -> tuple:
        user = self.ctx.user(request)
        jobs, _ = self.trainings.list_trainings(actor=user, limit=200)
        rows, choices = [], []
        for job in jobs:
            row = training_summary(job, self.trainings.snapshot(job))
            rows.append([row["output_name"], row["status"], f"{row['progress'] * 100:.0f}%", _number(row["loss"]),
                         row["epoch"] if row["epoch"] is not None else "", row["base_model"], row["owner"],
                         job.created_at.strftime("%Y-%m-%d %H:%M")])
            choices.append((f"{row['output_name']} · {row['status']} · {job.created_at:%m-%d %H:%M} · {job.id[:8]}",
                            job.id))
        return rows, gr.update(choices=choices)

    @ui_errors
    def refresh_training_form(self, base_type: str, request: gr.Request) -> tuple:
        """Everything the tab lists (on opening it): trainings, datasets, the base type's checkpoints, the
        endpoints that train."""
        user = self.ctx.user(request)
        rows, trainings = self.refresh_trainings(request)
        found = self.datasets.list_datasets(actor=user, limit=1000)
        owners = self.datasets.owner_names(found)
        datasets = [(f"{d.name} ({owners.get(d.owner_id, '?')}, {d.image_count} images)", d.id) for d in found
                    if d.image_count > 0]
        checkpoints = [(m.title, m.id) for m in self.trainings.checkpoints(actor=user, base_type=base_type)]
        endpoints = [(f"{e.name} ({'cloud' if e.remote else e.kind}, {e.status})", e.name)
                     for e in self.trainings.endpoints(actor=user)]
        return (rows, trainings, gr.update(choices=datasets), gr.update(choices=checkpoints),
                gr.update(choices=endpoints))

    # -- one training ---------------------------------------------------------------------------------------

    @ui_errors
    def show_training(self, job_id: str | None, shown: list[str] | None, request: gr.Request) -> tuple:
        """Summary, loss plot, samples, log tail, the poll timer (on while it is queued or running) and the
        sample keys shown: the gallery is sent again only when they change (a poll would resend every PNG)."""
        if not job_id:
            return "", EMPTY_PLOT, [], "", gr.Timer(active=False), []
        user = self.ctx.user(request)
        job = self.trainings.get(actor=user, job_id=job_id)
        snapshot = self.trainings.snapshot(job)
        row = training_summary(job, snapshot)
        keys = [f"{job.id}:{key}" for key in sample_keys(job)]
        gallery: Any = gr.skip()
        if keys != (shown or []):
            gallery = []
            for key, data in self.trainings.samples(actor=user, job_id=job_id):
                with Image.open(io.BytesIO(data)) as image:
                    gallery.append((image.convert("RGB"), key.rsplit("/", 1)[-1]))
        return (self._summary(job, row), _loss_frame(job, snapshot), gallery, "\n".join(job.log_lines[-LOG_LINES:]),
                gr.Timer(active=not job.is_terminal), keys)

    def _summary(self, job: Job, row: dict[str, Any]) -> str:
        lines = [f"**{html.escape(str(row['output_name']))}** — {row['status']}, "
                 f"step {row['step']} of {row['total_steps'] or '?'} ({row['progress'] * 100:.0f}%)"
                 + (f", loss {_number(row['loss'])}" if row["loss"] is not None else "")
                 + (f", epoch {row['epoch']}" if row["epoch"] is not None else ""),
                 f"{row['base_type']} on {html.escape(str(row['base_model']))}, dataset {row['dataset_id']}, "
                 f"endpoint {row['endpoint']}"]
        if row["queue_position"]:
            lines.append(f"Position in the queue: {row['queue_position']}")
        if job.error and job.status != JobStatus.SUCCEEDED:
            lines.append(f"⚠ {html.escape(job.error)}")
        registered = (job.info or {}).get("registered_models") or {}
        if registered:
            names = ", ".join(html.escape(k.rsplit("/", 1)[-1]) for k in registered)
            lines.append(f"Registered as LoRA models (Models tab): {names}")
        if self.trainings.resumable(job):
            lines.append("Saved state found: **Resume** continues after the last saved epoch.")
        return "\n\n".join(lines)

    @ui_errors
    def stop_training(self, job_id: str | None, request: gr.Request) -> None:
        if not job_id:
            raise gr.Error("Choose a training first")
        self.trainings.stop(actor=self.ctx.user(request), job_id=job_id)
        gr.Info(translate("Stopping: a running training stops at the next step; saved epochs are kept"))

    @ui_errors
    def resume_training(self, job_id: str | None, request: gr.Request) -> tuple:
        if not job_id:
            raise gr.Error("Choose a training first")
        job = self.trainings.resume(actor=self.ctx.user(request), job_id=job_id)
        rows, choices = self.refresh_trainings(request)
        gr.Info(translate(f"Resumed as a new training ({job.id})"))
        return rows, gr.update(choices=choices["choices"], value=job.id)

    @ui_errors
    def delete_training(self, job_id: str | None, request: gr.Request) -> tuple:
        if not job_id:
            raise gr.Error("Choose a training first")
        self.trainings.delete(actor=self.ctx.user(request), job_id=job_id)
        gr.Info(translate("Training deleted (LoRAs registered as models stay)"))
        rows, choices = self.refresh_trainings(request)
        return rows, gr.update(choices=choices["choices"], value=None)

    # -- layout ---------------------------------------------------------------------------------------------

    def build(self) -> gr.Tab:
        private = {"api_visibility": "private"}
        default_text, _ = self.trainings.format_config(self.trainings.defaults(BASE_TYPES[0]), BASE_TYPES[0])
        with gr.Tab("Training", id="training") as tab:
            with gr.Accordion("New LoRA training", open=True):
                with gr.Row():
                    base_type = gr.Radio(list(BASE_TYPES), value=BASE_TYPES[0], label="Base type",
                                         elem_id="training-base-type")
                    base_model = gr.Dropdown(label="Base checkpoint", choices=[], elem_id="training-base-model")
                    dataset = gr.Dropdown(label="Dataset", choices=[], elem_id="training-dataset")
                    output_name = gr.Textbox("lora", label="Output name", elem_id="training-output-name")
                    endpoint = gr.Dropdown(label="Endpoint (default: the first that trains)", choices=[],
                                           elem_id="training-endpoint")
                gr.Markdown(CONFIG_HELP)
                config = gr.Code(default_text, language=None, label="Config (TOML, kohya keys)", lines=16,
                                 interactive=True, elem_id="training-config")
                with gr.Row():
                    format_button = gr.Button("Format config", size="sm")
                    create = gr.Button("Start training", variant="primary")
                message = gr.Markdown(elem_id="training-message")
            with gr.Row():
                gr.Markdown("### Trainings")
                refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
            table = gr.Dataframe(headers=HEADERS, interactive=False, label="Trainings", wrap=True)
            selected = gr.Dropdown(label="Training", choices=[], elem_id="training-selected")
            summary = gr.Markdown(elem_id="training-summary")
            with gr.Row():
                plot = gr.LinePlot(EMPTY_PLOT, x="step", y="loss", title="Loss", height=260, scale=2)
                samples = gr.Gallery(label="Samples", columns=4, height=260, scale=2, allow_preview=True)
            log_tail = gr.Textbox(label="Log (last lines)", lines=8, max_lines=16, interactive=False,
                                  elem_id="training-log")
            with gr.Row():
                stop = gr.Button("Stop", size="sm")
                resume = gr.Button("Resume", size="sm")
                delete = gr.Button("Delete", variant="stop", size="sm")
            timer = gr.Timer(POLL_SECONDS, active=False)
            shown_samples = gr.State([])

        shown = [summary, plot, samples, log_tail, timer, shown_samples]
        tab.select(self.refresh_training_form, [base_type], [table, selected, dataset, base_model, endpoint],
                   **private)
        refresh.click(self.refresh_trainings, None, [table, selected], **private)
        base_type.change(self.training_base_changed, [base_type], [base_model, config], **private)
        format_button.click(self.format_training_config, [config, base_type], [config, message], **private)
        create.click(self.create_training, [base_type, base_model, dataset, config, output_name, endpoint],
                     [message, table, selected], **private)
        selected.change(self.show_training, [selected, shown_samples], shown, **private)
        timer.tick(self.show_training, [selected, shown_samples], shown, **private).then(
            self.refresh_trainings, None, [table, selected], **private)
        stop.click(self.stop_training, [selected], None, **private).then(
            self.show_training, [selected, shown_samples], shown, **private)
        resume.click(self.resume_training, [selected], [table, selected], **private)
        delete.click(self.delete_training, [selected], [table, selected], **private)
        return tab
