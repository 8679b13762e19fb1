"""Datasets tab: create a training dataset (images + captions, or a zip in kohya's layout), list, browse as a
gallery with captions, edit a caption, resize into a new dataset, delete; the location shown to copy.

Handlers are thin: they read uploads through `webapp.ui.files` and call `DatasetService`, which validates and
authorises (another user's private dataset is "not found", a shared one cannot be changed but may be resized
into a dataset of one's own).
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from pipelines.images import decode_image
from pipelines.types import InvalidRequestError
from webapp.i18n import translate
from webapp.records import Visibility
from webapp.services.datasets import RESIZE_MODES, Created, DatasetService
from webapp.services.datasets.layout import SourceFile
from webapp.services.datasets.views import resolution_text
from webapp.services.quota import format_bytes
from webapp.services.sharing import choices, names_of
from webapp.ui.context import UiContext, ui_errors
from webapp.ui.files import read_upload, upload_path
from webapp.ui.sharing_ui import roles_shown, shared_with, shown_visibility

HEADERS = ["Name", "Images", "Resolution", "Size", "Owner", "Visible to", "Source", "Created (UTC)"]
PAGE = 24
LAYOUT_HELP = (
    "kohya's layout: images in `<repeats>_<name>/` folders (such as `10_sks dog/`), each with an optional "
    "same-name `.txt` caption. Images at the top level (or uploaded as single files) go to one folder "
    "`<repeats>_<dataset name>` with the repeats below. PNG, JPEG, WebP and BMP images."
)


class DatasetsTab:
    """Widgets and handlers; handlers are methods so tests can call them as Gradio would."""

    permission: str | None = "dataset:list"
    """Shown to users holding it (None: everyone)."""

    def __init__(self, ctx: UiContext, datasets: DatasetService, *, max_file_bytes: int) -> None:
        self.ctx = ctx
        self.datasets = datasets
        self.max_file_bytes = max_file_bytes

    # -- list --------------------------------------------------------------------------------------------

    @ui_errors
    def refresh(self, request: gr.Request) -> tuple:
        user = self.ctx.user(request)
        found = self.datasets.list_datasets(actor=user, limit=1000)
        owners, names = self.datasets.owner_names(found), self.datasets.role_names()
        rows = [[d.name, d.image_count, resolution_text(d), format_bytes(d.bytes), owners.get(d.owner_id, "?"),
                 shown_visibility(d.visibility, d.allowed_roles, names), d.source, d.created_at.strftime("%Y-%m-%d %H:%M")] for d in found]
        choices = [(f"{d.name} ({owners.get(d.owner_id, '?')})", d.id) for d in found]
        return rows, gr.update(choices=choices)

    # -- create --------------------------------------------------------------------------------------------

    @ui_errors
    def create_dataset(self, name: str, repeats: float | None, visibility: str, roles: list[str] | None,
                       files: list[str] | None, zip_path: str | None, request: gr.Request) -> tuple:
        user = self.ctx.user(request)
        if bool(files) == bool(zip_path):
            raise gr.Error("Choose either images and captions, or one zip")
        allowed = shared_with(visibility, roles)
        if zip_path:
            with upload_path(zip_path).open("rb") as handle:
                created = self.datasets.create_from_zip(actor=user, name=name, zip_file=handle,
                                                        repeats=int(repeats or 1), visibility=visibility,
                                                        allowed_roles=allowed)
        else:
            sources = [self._source(path) for path in files or []]
            created = self.datasets.create(actor=user, name=name, files=sources, repeats=int(repeats or 1),
                                           visibility=visibility, allowed_roles=allowed)
        rows, choices = self.refresh(request)
        return self._created_text(created), rows, gr.update(choices=choices["choices"], value=created.dataset.id)

    def _source(self, path: str) -> SourceFile:
        data = read_upload(path, max_bytes=self.max_file_bytes, what="image or caption")
        return SourceFile(name=Path(path).name, size=len(data), load=lambda: data)

    @staticmethod
    def _created_text(created: Created) -> str:
        lines = [f"Created **{html.escape(created.dataset.name)}**: {created.dataset.image_count} image(s)."]
        lines += [f"- ⚠ {html.escape(w)}" for w in created.warnings]
        return "\n".join(lines)

    # -- one dataset ------------------------------------------------------------------------------------

    @ui_errors
    def show(self, dataset_id: str | None, page: float | None, request: gr.Request) -> tuple:
        """Summary, location, one page of the gallery (image + caption) and the page label."""
        if not dataset_id:
            return "", "", [], "", None, ""
        user = self.ctx.user(request)
        dataset = self.datasets.get(actor=user, dataset_id=dataset_id)
        pages = max(1, -(-dataset.image_count // PAGE))
        number = min(max(1, int(page or 1)), pages)
        items = self.datasets.items(actor=user, dataset_id=dataset_id, limit=PAGE, offset=(number - 1) * PAGE)
        gallery = []
        for item in items:
            data, _ = self.datasets.image_bytes(actor=user, dataset_id=dataset_id, item_id=item.id)
            try:
                image = decode_image(data, item.relative_path)
            except InvalidRequestError as exc:
                gr.Warning(translate(f"{item.relative_path} not shown: {exc}"))
                continue
            label = f"{item.relative_path}: {item.caption}" if item.caption is not None else \
                f"{item.relative_path} (no caption)"
            gallery.append((image, label))
        summary = (f"**{html.escape(dataset.name)}** — {dataset.image_count} image(s), {resolution_text(dataset)}, "
                   f"{format_bytes(dataset.bytes)}, {dataset.visibility.value}")
        return summary, self.datasets.location(dataset, actor=user), gallery, f"Page {number} of {pages}", None, ""

    @ui_errors
    def select_item(self, dataset_id: str | None, page: float | None, evt: gr.SelectData,
                    request: gr.Request) -> tuple:
        """The gallery's n-th image of the page: its id (for the caption editor) and caption."""
        if not dataset_id:
            raise gr.Error("Choose a dataset first")
        number = max(1, int(page or 1))
        items = self.datasets.items(actor=self.ctx.user(request), dataset_id=dataset_id, limit=PAGE,
                                    offset=(number - 1) * PAGE)
        index = evt.index if isinstance(evt.index, int) else 0
        if not 0 <= index < len(items):
            raise gr.Error("That image is no longer in the dataset; reload it")
        return items[index].id, items[index].caption or ""

    @ui_errors
    def save_caption(self, dataset_id: str | None, item_id: str | None, caption: str, request: gr.Request) -> None:
        if not dataset_id or not item_id:
            raise gr.Error("Click an image in the gallery first")
        item = self.datasets.set_caption(actor=self.ctx.user(request), dataset_id=dataset_id, item_id=item_id,
                                         caption=caption)
        gr.Info(translate(f"Caption of {item.relative_path} saved"))

    @ui_errors
    def resize_dataset(self, dataset_id: str | None, width: float | None, height: float | None, mode: str, name: str,
                       visibility: str, roles: list[str] | None, request: gr.Request) -> tuple:
        if not dataset_id:
            raise gr.Error("Choose a dataset first")
        created = self.datasets.resize(actor=self.ctx.user(request), dataset_id=dataset_id, width=int(width or 0),
                                       height=int(height or 0), mode=mode, name=name or None, visibility=visibility,
                                       allowed_roles=shared_with(visibility, roles))
        rows, choices = self.refresh(request)
        return self._created_text(created), rows, gr.update(choices=choices["choices"], value=created.dataset.id)

    @ui_errors
    def sharing_of(self, dataset_id: str | None, request: gr.Request) -> tuple:
        """The chosen dataset's visibility and allowed roles, for the Sharing row."""
        if not dataset_id:
            return Visibility.PRIVATE.value, gr.update(value=[], visible=False)
        dataset = self.datasets.get(actor=self.ctx.user(request), dataset_id=dataset_id)
        names = self.datasets.role_names()
        return dataset.visibility.value, gr.update(value=names_of(dataset.allowed_roles, names), choices=choices(names),
                                                   visible=dataset.visibility == Visibility.ROLES)

    @ui_errors
    def share(self, dataset_id: str | None, visibility: str, roles: list[str] | None, request: gr.Request) -> tuple:
        """Change who sees the dataset (its owner, or ``dataset:all``)."""
        if not dataset_id:
            raise gr.Error("Choose a dataset first")
        dataset = self.datasets.update(actor=self.ctx.user(request), dataset_id=dataset_id, visibility=visibility,
                                       allowed_roles=shared_with(visibility, roles))
        gr.Info(translate(f"Dataset {dataset.name} is now visible to {shown_visibility(dataset.visibility, dataset.allowed_roles, self.datasets.role_names())}"))
        rows, listed = self.refresh(request)
        return rows, listed

    @ui_errors
    def role_choices(self, request: gr.Request) -> tuple:
        """The roles the sharing dropdowns offer (names; the service resolves and checks them)."""
        self.ctx.user(request)
        offered = choices(self.datasets.role_names())
        return tuple(gr.update(choices=offered) for _ in range(3))

    @ui_errors
    def delete_dataset(self, dataset_id: str | None, request: gr.Request) -> tuple:
        if not dataset_id:
            raise gr.Error("Choose a dataset first")
        user = self.ctx.user(request)
        name = self.datasets.get(actor=user, dataset_id=dataset_id).name
        self.datasets.delete(actor=user, dataset_id=dataset_id)
        gr.Info(translate(f"Deleted dataset {name}"))
        rows, choices = self.refresh(request)
        return rows, gr.update(choices=choices["choices"], value=None)

    # -- layout --------------------------------------------------------------------------------------------

    def build(self) -> gr.Tab:
        visibilities = [v.value for v in Visibility]
        private = {"api_visibility": "private"}
        with gr.Tab("Datasets", id="datasets") as tab:
            with gr.Accordion("Create a dataset", open=True):
                gr.Markdown(LAYOUT_HELP)
                with gr.Row():
                    name = gr.Textbox(label="Dataset name", elem_id="datasets-name")
                    repeats = gr.Number(1, label="Repeats (top-level images)", precision=0, minimum=1)
                    visibility = gr.Dropdown(visibilities, value=Visibility.PRIVATE.value, label="Visible to")
                    roles = gr.Dropdown([], value=[], multiselect=True, label="Roles", visible=False,
                                        elem_id="datasets-roles")
                with gr.Row():
                    files = gr.File(label="Images and .txt captions", file_count="multiple", type="filepath",
                                    file_types=["image", ".txt"], elem_id="datasets-files")
                    zip_file = gr.File(label="…or one zip", file_count="single", type="filepath", file_types=[".zip"])
                create = gr.Button("Create dataset", variant="primary")
                created = gr.Markdown(elem_id="datasets-created")
            with gr.Row():
                gr.Markdown("### Datasets")
                refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
            table = gr.Dataframe(headers=HEADERS, interactive=False, label="Datasets", wrap=True)
            selected = gr.Dropdown(label="Dataset", choices=[], elem_id="datasets-selected")
            summary = gr.Markdown()
            location = gr.Textbox(label="Location (local folder or s3:// URI)", interactive=False,
                                  buttons=["copy"], elem_id="datasets-location")
            with gr.Row():
                page = gr.Number(1, label="Page", precision=0, minimum=1, scale=0, min_width=100)
                page_label = gr.Markdown()
            gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height="auto",
                                 allow_preview=False, elem_id="datasets-gallery")
            item_id = gr.State(None)
            with gr.Row():
                caption = gr.Textbox(label="Caption", lines=2, scale=4, elem_id="datasets-caption")
                save_caption = gr.Button("Save caption", size="sm", scale=1)
            with gr.Accordion("Resize / crop into a new dataset", open=False):
                with gr.Row():
                    width = gr.Number(512, label="Width", precision=0)
                    height = gr.Number(512, label="Height", precision=0)
                    mode = gr.Radio(list(RESIZE_MODES), value="crop", label="Mode")
                    new_name = gr.Textbox(label="New name (optional)")
                    new_vis = gr.Dropdown(visibilities, value=Visibility.PRIVATE.value, label="Visible to")
                    new_roles = gr.Dropdown([], value=[], multiselect=True, label="Roles", visible=False)
                resize = gr.Button("Resize into a new dataset")
            with gr.Row():
                share_vis = gr.Dropdown(visibilities, value=Visibility.PRIVATE.value, label="Visible to",
                                        elem_id="datasets-share-visibility")
                share_roles = gr.Dropdown([], value=[], multiselect=True, label="Roles", visible=False,
                                          elem_id="datasets-share-roles")
                share = gr.Button("Save sharing", size="sm", scale=0, min_width=140)
            delete = gr.Button("Delete dataset", variant="stop", size="sm")

        shown = [summary, location, gallery, page_label, item_id, caption]
        tab.select(self.refresh, None, [table, selected], **private)
        tab.select(self.role_choices, None, [roles, new_roles, share_roles], **private)
        for chooser, dropdown in ((visibility, roles), (new_vis, new_roles), (share_vis, share_roles)):
            chooser.change(roles_shown, [chooser], [dropdown], **private)
        selected.change(self.sharing_of, [selected], [share_vis, share_roles], **private)
        share.click(self.share, [selected, share_vis, share_roles], [table, selected], **private)
        refresh.click(self.refresh, None, [table, selected], **private)
        create.click(self.create_dataset, [name, repeats, visibility, roles, files, zip_file], [created, table, selected],
                     **private)
        selected.change(self.show, [selected, page], shown, **private)
        page.submit(self.show, [selected, page], shown, **private)
        gallery.select(self.select_item, [selected, page], [item_id, caption], **private)
        save_caption.click(self.save_caption, [selected, item_id, caption], None, **private).then(
            self.show, [selected, page], shown, **private)
        resize.click(self.resize_dataset, [selected, width, height, mode, new_name, new_vis, new_roles],
                     [created, table, selected], **private)
        delete.click(self.delete_dataset, [selected], [table, selected], **private)
        return tab
