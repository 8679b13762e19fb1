"""Models tab: upload from the server / the computer / URLs, and the table of models with its actions.

Handlers are thin: they resolve the user from the request and call the model services, which
authorise (server imports are admin-only there, not just hidden here). Long imports stream their
progress lines from the task row. The browser upload runs in JavaScript (static/uploader.js) against
/api/v1/uploads, because Gradio's own upload neither resumes nor bounds memory for multi-GB files.
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from pipelines.images import open_image
from pipelines.types import InvalidRequestError
from webapp.i18n import translate
from webapp.records import ModelRecord, ModelStatus, ModelType, Visibility
from webapp.services.access import can
from webapp.services.models.registry import MAX_PREVIEW_BYTES
from webapp.services.models.views import item_line, model_details
from webapp.services.models.wiring import ModelServices
from webapp.services.sharing import choices, names_of
from webapp.ui.context import UiContext, ui_errors
from webapp.ui.files import read_upload
from webapp.ui.sharing_ui import roles_shown, shared_with, shown_visibility

log = logging.getLogger(__name__)

HEADERS = ["Name", "Type", "Base", "Status", "Size", "Owner", "Visibility", "Source", "Created (UTC)"]
"""Hashes, ids and paths are in the details panel of the selected model; name + type identify a row."""
TYPE_BY_LABEL = {t.label: t for t in ModelType}
ALL = "All"
AUTO = "Auto-detect"
TYPE_CHOICES = [(t.label, t.value) for t in ModelType]
POLL_SECONDS = 0.5
UPLOADER_JS = (Path(__file__).parent / "static" / "uploader.js").read_text(encoding="utf-8")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


UPLOAD_SHARING_DEFAULT = json.dumps({"visibility": Visibility.EVERYONE.value, "allowed_roles": None})
UPLOAD_SHARING_JS = ("(visibility, roles) => JSON.stringify({visibility, "
                     "allowed_roles: visibility === 'roles' ? (roles || []) : null})")


def _upload_block() -> str:
    options = "".join(f'<option value="{html.escape(v)}">{html.escape(label)}</option>' for label, v in TYPE_CHOICES)
    return (
        '<div class="studio-uploader">'
        f'<label>Type <select class="studio-upload-type">{options}</select></label><br>'
        '<input class="studio-upload-input" type="file" multiple '
        'accept=".safetensors,.ckpt,.pt,.pth,.bin,.sft"> '
        '<button class="studio-upload-button lg primary" type="button">Upload models</button>'
        '<div class="studio-upload-lines" aria-live="polite"></div>'
        "</div>"
    )


class ModelsTab:
    """Widgets and handlers; handlers are methods so tests can call them as Gradio would."""

    permission: str | None = "model:list"
    """Shown to users holding it (None: everyone)."""

    def __init__(self, ctx: UiContext, services: ModelServices) -> None:
        self.ctx = ctx
        self.services = services
        self.registry = services.registry

    # -- table -------------------------------------------------------------------------------------------

    def _rows(self, request: gr.Request, type_: str, status: str, base: str,
              query: str) -> tuple[list[ModelRecord], list[list[str]]]:
        user = self.ctx.user(request)
        records = self.registry.list_models(
            actor=user, type=None if type_ in (ALL, "", None) else type_,
            status=None if status in (ALL, "", None) else status, base=None if base in (ALL, "", None) else base,
            query=query or None, limit=1000,
        )
        owners, names = self.registry.owner_names(records), self.registry.role_names()
        return records, [[
            r.name, r.type.label, r.base or "", r.status.value + (f": {r.failure_reason}" if r.failure_reason else ""),
            _size(r.size) if r.size else "", owners.get(r.owner_id, "server" if r.owner_id is None else "?"),
            shown_visibility(r.visibility, r.allowed_roles, names), "in place" if r.local_path else r.source, r.created_at.strftime("%Y-%m-%d %H:%M"),
        ] for r in records]

    @ui_errors
    def refresh(self, type_: str, status: str, base: str, query: str, request: gr.Request) -> tuple:
        records, rows = self._rows(request, type_, status, base, query)
        bases = [ALL, *self.registry.bases(actor=self.ctx.user(request))]
        choices = [(f"{r.name} ({r.type.label})", r.id) for r in records]
        return rows, gr.update(choices=bases), gr.update(choices=choices)

    @ui_errors
    def rescan(self, type_: str, status: str, base: str, query: str, request: gr.Request) -> tuple:
        summary = self.registry.refresh(actor=self.ctx.user(request))
        if summary is None:
            gr.Info(translate("The models folder was rescanned moments ago; this is the current list"))
        elif summary.folder:
            gr.Info(translate(f"Models folder rescanned: {summary.line}"))
        return self.refresh(type_, status, base, query, request)

    @ui_errors
    def on_select(self, evt: gr.SelectData, request: gr.Request) -> tuple:
        """A row is a model by its name and type label (unique per type), resolved by the registry."""
        row = evt.row_value or []
        model_type = TYPE_BY_LABEL.get(row[1]) if len(row) > 1 else None
        if model_type is None:
            return self.show(None, request)
        record = self.registry.get_by_name(actor=self.ctx.user(request), type=model_type, name=str(row[0]))
        return self.show(record.id, request)

    @ui_errors
    def show(self, model_id: str | None, request: gr.Request) -> tuple:
        if not model_id:
            return None, "", "", Visibility.EVERYONE.value, gr.update(value=[], visible=False), None, None
        user = self.ctx.user(request)
        record = self.registry.get(actor=user, model_id=model_id)
        preview = self.registry.preview(actor=user, model_id=model_id)
        image = None
        if preview is not None:
            try:
                with open_image(preview[0], "preview") as stored:  # header-first: a stored bomb is not decoded
                    image = stored.copy()
            except (InvalidRequestError, OSError) as exc:
                log.warning("model %s: stored preview not shown: %s", record.id, exc)
                gr.Warning(translate(f"The stored preview image was not shown: {exc}"))
        names = self.registry.role_names()
        roles = gr.update(value=names_of(record.allowed_roles, names), choices=choices(names),
                          visible=record.visibility == Visibility.ROLES)
        return (gr.update(value=record.id), record.name, record.description or "", record.visibility.value, roles,
                image, model_details(record, actor=user))

    # -- actions on one model ------------------------------------------------------------------------------

    @ui_errors
    def save(self, model_id: str | None, name: str, description: str, visibility: str, roles: list[str] | None,
             request: gr.Request) -> None:
        if not model_id:
            raise gr.Error("Choose a model in the table first")
        record = self.registry.update(actor=self.ctx.user(request), model_id=model_id, name=name,
                                      description=description, visibility=visibility,
                                      allowed_roles=shared_with(visibility, roles))
        gr.Info(translate(f"Saved {record.type.label} {record.name}"))

    @ui_errors
    def delete(self, model_id: str | None, request: gr.Request) -> tuple:
        if not model_id:
            raise gr.Error("Choose a model in the table first")
        user = self.ctx.user(request)
        record = self.registry.get(actor=user, model_id=model_id)
        self.registry.delete(actor=user, model_id=model_id)
        gr.Info(translate(f"Deleted {record.type.label} {record.name}"))
        return None, "", "", Visibility.EVERYONE.value, gr.update(value=[], visible=False), None, None

    @ui_errors
    def set_preview(self, model_id: str | None, image_path: str | None, request: gr.Request) -> None:
        if not model_id:
            raise gr.Error("Choose a model in the table first")
        if not image_path:
            raise gr.Error("Drop an image on the preview first")
        data = read_upload(image_path, max_bytes=MAX_PREVIEW_BYTES, what="preview image")
        self.registry.set_preview(actor=self.ctx.user(request), model_id=model_id, data=data)
        gr.Info(translate("Preview image saved"))

    # -- imports -----------------------------------------------------------------------------------------

    def _follow(self, task_id: str, request: gr.Request) -> Iterator[str]:
        """Progress lines from the task row until it finishes."""
        user = self.ctx.user(request)
        while True:
            task = self.services.tasks.get(actor=user, task_id=task_id)
            items = json.loads(task.items_json)
            lines = [item_line(i) for i in items]
            if task.status.finished:
                yield "\n".join([*lines, f"— {task.status.value}: {task.message}"])
                return
            yield "\n".join(lines)
            time.sleep(POLL_SECONDS)

    @ui_errors
    def import_server(self, paths: str, type_: str, mode: str, description: str, visibility: str,
                      roles: list[str] | None, request: gr.Request) -> Iterator[str]:
        task = self.services.server.start(
            actor=self.ctx.user(request), paths=paths, declared_type=None if type_ in (AUTO, "", None) else type_,
            in_place=mode == "in place", description=description, visibility=visibility,
            allowed_roles=shared_with(visibility, roles),
        )
        yield from self._follow(task.id, request)

    @ui_errors
    def import_urls(self, urls: str, type_: str, description: str, visibility: str, roles: list[str] | None,
                    request: gr.Request) -> Iterator[str]:
        task = self.services.urls.start(actor=self.ctx.user(request), urls=urls, declared_type=type_,
                                        description=description, visibility=visibility,
                                        allowed_roles=shared_with(visibility, roles))
        yield from self._follow(task.id, request)

    @ui_errors
    def on_open(self, request: gr.Request) -> tuple:
        """The "From server" tab and its import folders: administrators only (the service says which)."""
        user = self.ctx.user(request)
        if not can(user, "model:all"):
            return gr.update(visible=False), ""
        roots = self.services.server.roots_for(user)
        listed = "\n".join(f"- `{root}`" for root in roots) or "- (none configured: see `--import-root`)"
        return gr.update(visible=True), f"Import folders on this server:\n\n{listed}"

    @ui_errors
    def role_choices(self, request: gr.Request) -> tuple:
        """The roles the sharing dropdowns offer (names; the service resolves and checks them)."""
        self.ctx.user(request)
        offered = choices(self.registry.role_names())
        return tuple(gr.update(choices=offered) for _ in range(4))

    # -- layout --------------------------------------------------------------------------------------------

    def build(self) -> gr.Tab:
        visibilities = [v.value for v in Visibility]
        with gr.Tab("Models", id="models") as tab:
            with gr.Tabs():
                with gr.Tab("From server", visible=False) as server_tab:
                    gr.Markdown("Files or folders on this server (one per line), under the configured import "
                                "roots. A folder laid out like A1111's `models/` imports every model in it.")
                    server_roots = gr.Markdown(elem_id="models-import-roots")
                    server_paths = gr.Textbox(label="Paths on the server", lines=3, elem_id="models-server-paths")
                    with gr.Row():
                        server_type = gr.Dropdown([AUTO, *TYPE_CHOICES], value=AUTO, label="Type")
                        server_mode = gr.Radio(["in place", "copy into the store"], value="in place",
                                               label="Register")
                        server_vis = gr.Dropdown(visibilities, value=Visibility.EVERYONE.value, label="Visible to")
                        server_roles = gr.Dropdown([], value=[], multiselect=True, label="Roles", visible=False,
                                                   elem_id="models-server-roles")
                    server_desc = gr.Textbox(label='Description (optional; text or JSON like {"description": "..."})')
                    server_go = gr.Button("Import from server", variant="primary")
                    server_out = gr.Textbox(label="Progress", lines=4, interactive=False)
                with gr.Tab("From computer"):
                    gr.Markdown("Choose several files at once; each is sent in chunks and resumes by itself after "
                                "a dropped connection. A line per file shows its progress.")
                    with gr.Row():
                        upload_vis = gr.Dropdown(visibilities, value=Visibility.EVERYONE.value, label="Visible to",
                                                 elem_id="models-upload-visibility")
                        upload_roles = gr.Dropdown([], value=[], multiselect=True, label="Roles", visible=False,
                                                   elem_id="models-upload-roles")
                    # what the uploader sends as the upload's visibility and allowed roles, kept by the browser
                    upload_sharing = gr.Textbox(UPLOAD_SHARING_DEFAULT, visible="hidden", show_label=False,
                                                elem_id="models-upload-sharing")
                    uploader = gr.HTML(_upload_block(), js_on_load=UPLOADER_JS, elem_id="models-uploader")
                with gr.Tab("From URL"):
                    url_list = gr.Textbox(label="URL list (comma-separated)", lines=2, elem_id="models-url-list")
                    with gr.Row():
                        url_type = gr.Dropdown(TYPE_CHOICES, value=ModelType.CHECKPOINT.value, label="Type")
                        url_vis = gr.Dropdown(visibilities, value=Visibility.EVERYONE.value, label="Visible to")
                        url_roles = gr.Dropdown([], value=[], multiselect=True, label="Roles", visible=False,
                                                elem_id="models-url-roles")
                    url_desc = gr.Textbox(label='Models description (optional; JSON like {"description": "..."})')
                    url_go = gr.Button("Import from URLs", variant="primary")
                    url_out = gr.Textbox(label="Progress", lines=4, interactive=False)
            gr.Markdown("### Models")
            with gr.Row():
                f_type = gr.Dropdown([ALL, *TYPE_CHOICES], value=ALL, label="Type", scale=1)
                f_status = gr.Dropdown([ALL, *(s.value for s in ModelStatus)], value=ALL, label="Status", scale=1)
                f_base = gr.Dropdown([ALL], value=ALL, label="Base", scale=1)
                f_query = gr.Textbox(label="Search", scale=2)
                refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100, elem_id="models-refresh")
            table = gr.Dataframe(headers=HEADERS, interactive=False, label="Models", elem_id="models-table",
                                 wrap=True)
            with gr.Row():
                with gr.Column(scale=2):
                    selected = gr.Dropdown(label="Model", choices=[], elem_id="models-selected")
                    new_name = gr.Textbox(label="Name")
                    description = gr.Textbox(label="Description", lines=2)
                    with gr.Row():
                        visibility = gr.Dropdown(visibilities, value=Visibility.EVERYONE.value, label="Visible to",
                                                 elem_id="models-visibility")
                        roles = gr.Dropdown([], value=[], multiselect=True, label="Roles", visible=False,
                                            elem_id="models-roles")
                    with gr.Row():
                        save = gr.Button("Save name / description", size="sm")
                        delete = gr.Button("Delete model", variant="stop", size="sm")
                with gr.Column(scale=1):
                    preview = gr.Image(label="Preview image", type="filepath", sources=["upload"], height=220)
                    set_preview = gr.Button("Set preview image", size="sm")
            details = gr.JSON(label="Details (hashes, file, origin)", elem_id="models-details")

        filters = [f_type, f_status, f_base, f_query]
        table_out = [table, f_base, selected]
        detail_out = [selected, new_name, description, visibility, roles, preview, details]
        private = {"api_visibility": "private"}
        refresh.click(self.rescan, filters, table_out, **private)
        for control in (f_type, f_status, f_base):
            control.change(self.refresh, filters, table_out, **private)
        f_query.submit(self.refresh, filters, table_out, **private)
        tab.select(self.refresh, filters, table_out, **private)
        tab.select(self.on_open, None, [server_tab, server_roots], **private)
        tab.select(self.role_choices, None, [roles, server_roles, url_roles, upload_roles], **private)
        for chooser, dropdown in ((visibility, roles), (server_vis, server_roles), (url_vis, url_roles),
                                  (upload_vis, upload_roles)):
            chooser.change(roles_shown, [chooser], [dropdown], **private)
        for control in (upload_vis, upload_roles):  # in the browser, at once: no round trip to race the click
            control.change(None, [upload_vis, upload_roles], [upload_sharing], js=UPLOAD_SHARING_JS, **private)
        uploader.change(self.refresh, filters, table_out, **private)
        table.select(self.on_select, None, detail_out, **private)
        selected.input(self.show, [selected], detail_out, **private)
        save.click(self.save, [selected, new_name, description, visibility, roles], None, **private).then(
            self.refresh, filters, table_out, **private)
        delete.click(self.delete, [selected], detail_out, **private).then(self.refresh, filters, table_out, **private)
        set_preview.click(self.set_preview, [selected, preview], None, **private)
        server_go.click(self.import_server, [server_paths, server_type, server_mode, server_desc, server_vis,
                                             server_roles],
                        [server_out], **private).then(self.refresh, filters, table_out, **private)
        url_go.click(self.import_urls, [url_list, url_type, url_desc, url_vis, url_roles], [url_out], **private).then(
            self.refresh, filters, table_out, **private)
        return tab
