"""The History panel under each generation tab: the user's jobs, newest first, and what each made.

Entries read ``Time-Type-Status-UUID`` (the seeds' naming); the latest 10 by default, "Show all" for
everything; filters by type, status, endpoint, checkpoint and date range. Selecting one shows its
images (through the authorised /files route), infotext and details; Delete, Cancel, and "API" — the
exact curl call that reproduces it. Administrators can include every user's jobs.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any

import gradio as gr

from webapp.i18n import translate
from webapp.records import JobMode, JobStatus
from webapp.services.access import can
from webapp.services.jobs import JobService
from webapp.ui.context import UiContext, ui_errors
from webapp.ui.job_views import curl_command, details_markdown, gallery_html, infotext_of, outcome_html

ANY = "Any"
DEFAULT_LIMIT = 10


def parse_day(text: str | None, field: str, *, end: bool = False) -> datetime | None:
    """``YYYY-MM-DD`` (or a full ISO time) in UTC; the ``until`` day includes the whole day."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise gr.Error(f"{field}: {text!r} is not a date like 2026-11-22") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    if end and len(text) <= 10:
        value = datetime.combine(value.date(), time.max, tzinfo=UTC)
    return value


def base_url(request: gr.Request | None) -> str:
    """The address the browser used (for curl): the request's own scheme and host.

    A reverse proxy's ``X-Forwarded-Proto/-Host`` are already applied to the request by
    ``webapp.web.proxy.ForwardedHeaders``, and only when the peer is in ``forwarded_allow_ips``.
    """
    url = getattr(request, "url", None) if request is not None else None
    if url is None or not url.netloc:
        return "http://127.0.0.1:7860"
    return f"{url.scheme}://{url.netloc}"


class HistoryPanel:
    """Widgets and handlers of one tab's history (``modes``: the job types listed by default)."""

    def __init__(self, ctx: UiContext, jobs: JobService, tab: str, modes: tuple[str, ...]) -> None:
        self.ctx = ctx
        self.jobs = jobs
        self.tab = tab
        self.modes = modes

    # -- handlers ------------------------------------------------------------------------------------------
    @ui_errors
    def refresh(self, show_all: bool, all_users: bool, mode: str, status: str, endpoint: str, checkpoint: str,
                since: str, until: str, current: str | None, request: gr.Request) -> tuple:
        user = self.ctx.user(request)
        modes: list[str] | None = list(self.modes) if mode in (None, "", ANY) else [mode]
        jobs, total = self.jobs.list_jobs(
            actor=user, mode=modes, status=None if status in (None, "", ANY) else status,
            endpoint=None if endpoint in (None, "", ANY) else endpoint,
            checkpoint=None if checkpoint in (None, "", ANY) else checkpoint,
            since=parse_day(since, "From"), until=parse_day(until, "To", end=True),
            limit=None if show_all else DEFAULT_LIMIT, all_users=bool(all_users))
        choices = [(j.title + (f" ({j.owner_name})" if j.owner_id != user.id else ""), j.id) for j in jobs]
        ids = [j.id for j in jobs]
        summary = f"{len(jobs)} of {total} job{'s' if total != 1 else ''}"
        endpoints = [ANY, *self.jobs.endpoints.names()]
        checkpoints = [ANY, *self.jobs.checkpoints_used(actor=user, all_users=bool(all_users))]
        return (gr.update(choices=choices, value=current if current in ids else None), summary,
                gr.update(choices=endpoints), gr.update(choices=checkpoints), gr.update(visible=can(user, "inference:all")))

    @ui_errors
    def select(self, job_id: str | None, request: gr.Request) -> tuple:
        if not job_id:
            return "", "", "", gr.update(choices=[], value=None), gr.update(visible=False, value="")
        job = self.jobs.get(actor=self.ctx.user(request), job_id=job_id)
        indices = [(f"#{i + 1}", i) for i in range(len(job.image_keys))]
        return (outcome_html(job) + gallery_html(job), infotext_of(job), details_markdown(job),
                gr.update(choices=indices, value=0 if indices else None), gr.update(visible=False, value=""))

    @ui_errors
    def delete(self, job_id: str | None, request: gr.Request) -> tuple:
        if not job_id:
            raise gr.Error("Choose a job in the history first")
        self.jobs.delete(actor=self.ctx.user(request), job_id=job_id)
        gr.Info(translate("Job deleted with its images"))
        return None, "", "", "", gr.update(visible=False, value="")

    @ui_errors
    def cancel(self, job_id: str | None, request: gr.Request) -> tuple:
        if not job_id:
            raise gr.Error("Choose a job in the history first")
        job = self.jobs.cancel(actor=self.ctx.user(request), job_id=job_id)
        return outcome_html(job) + gallery_html(job), details_markdown(job)

    @ui_errors
    def api(self, job_id: str | None, request: gr.Request) -> Any:
        if not job_id:
            raise gr.Error("Choose a job in the history first")
        job = self.jobs.get(actor=self.ctx.user(request), job_id=job_id)
        return gr.update(value=curl_command(job, self.jobs.submitted_request(job), base_url(request)), visible=True)

    # -- widgets -------------------------------------------------------------------------------------------
    def build(self) -> None:
        t = self.tab
        with gr.Accordion("History", open=True, elem_id=f"{t}-history"):
            with gr.Row():
                self.show_all = gr.Checkbox(label="Show all", value=False, elem_id=f"{t}-history-show-all")
                self.all_users = gr.Checkbox(label="All users", value=False, visible=False,
                                             elem_id=f"{t}-history-all-users")
                self.summary = gr.Markdown(elem_id=f"{t}-history-summary")
                self.refresh_button = gr.Button("Refresh", size="sm", scale=0, elem_id=f"{t}-history-refresh")
            with gr.Accordion("Filter", open=False):
                with gr.Row():
                    self.mode = gr.Dropdown([ANY, *(m.value for m in JobMode if m.value in self.modes)], value=ANY,
                                            label="Type")
                    self.status = gr.Dropdown([ANY, *(s.value for s in JobStatus)], value=ANY, label="Status")
                    self.endpoint = gr.Dropdown([ANY], value=ANY, label="Endpoint")
                    self.checkpoint = gr.Dropdown([ANY], value=ANY, label="Checkpoint")
                with gr.Row():
                    self.since = gr.Textbox(label="From (YYYY-MM-DD, UTC)", placeholder="2026-11-01")
                    self.until = gr.Textbox(label="To (YYYY-MM-DD, UTC)", placeholder="2026-11-30")
            self.selected = gr.Dropdown(label="Jobs (newest first)", choices=[], value=None,
                                        elem_id=f"{t}-history-jobs")
            with gr.Row():
                with gr.Column(scale=3):
                    self.images = gr.HTML(elem_id=f"{t}-history-images")
                    self.infotext = gr.Textbox(label="Parameters", lines=3, interactive=False,
                                               elem_id=f"{t}-history-infotext")
                with gr.Column(scale=2):
                    self.details = gr.Markdown(elem_id=f"{t}-history-details")
                    with gr.Row():
                        self.index = gr.Dropdown(label="Image", choices=[], value=None, scale=1)
                        self.send_button = gr.Button("Send to img2img", size="sm", elem_id=f"{t}-history-send")
                    with gr.Row():
                        self.api_button = gr.Button("API", size="sm", elem_id=f"{t}-history-api")
                        self.cancel_button = gr.Button("Cancel", size="sm", elem_id=f"{t}-history-cancel")
                        self.delete_button = gr.Button("Delete", size="sm", variant="stop",
                                                       elem_id=f"{t}-history-delete")
            self.curl = gr.Code(label="Reproduce with curl", language="shell", visible=False, interactive=False,
                                elem_id=f"{t}-history-curl")
        self._wire()

    @property
    def filters(self) -> list[Any]:
        return [self.show_all, self.all_users, self.mode, self.status, self.endpoint, self.checkpoint, self.since,
                self.until, self.selected]

    @property
    def refresh_outputs(self) -> list[Any]:
        return [self.selected, self.summary, self.endpoint, self.checkpoint, self.all_users]

    def _wire(self) -> None:
        private = {"api_visibility": "private"}
        for trigger in (self.refresh_button.click, self.show_all.change, self.all_users.change, self.mode.change,
                        self.status.change, self.endpoint.input, self.checkpoint.input, self.since.submit,
                        self.until.submit):
            trigger(self.refresh, self.filters, self.refresh_outputs, **private)
        select_outputs = [self.images, self.infotext, self.details, self.index, self.curl]
        self.selected.change(self.select, [self.selected], select_outputs, **private)
        self.delete_button.click(
            self.delete, [self.selected], [self.selected, self.images, self.infotext, self.details, self.curl],
            **private).then(self.refresh, self.filters, self.refresh_outputs, **private)
        self.cancel_button.click(self.cancel, [self.selected], [self.images, self.details], **private).then(
            self.refresh, self.filters, self.refresh_outputs, **private)
        self.api_button.click(self.api, [self.selected], [self.curl], **private)

