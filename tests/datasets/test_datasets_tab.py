"""Datasets tab handlers, called as Gradio calls them: create from files or a zip, list, gallery, caption edit,
resize, delete, and authorisation in the service (a non-owner cannot change or even see a private dataset)."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from gradio.utils import get_upload_folder

from tests.datasets.conftest import make_user, make_zip, png, stored
from webapp.ui.context import UiContext
from webapp.ui.datasets_tab import HEADERS, DatasetsTab

ALICE, BOB, ADMIN = (SimpleNamespace(username=n) for n in ("alice", "bob", "admin"))


def _tab(studio) -> DatasetsTab:
    return DatasetsTab(UiContext(users=studio.users), studio.datasets, max_file_bytes=2**20)


def _uploaded(files: dict[str, bytes]) -> list[str]:
    """Files where Gradio keeps uploads (handlers read nothing else)."""
    folder = Path(get_upload_folder()) / f"test-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(str(folder / name))
    return paths


def test_create_from_files_then_browse_edit_resize_delete(dstudio):
    make_user(dstudio)
    tab = _tab(dstudio)
    text, rows, choice = tab.create_dataset("cats", 2, "private", [], _uploaded({"a.png": png(), "a.txt": b"a cat",
                                                                     "b.png": png(50, 50)}), None, ALICE)
    assert "2 image(s)" in text and "1 image(s) have no caption: 2_cats/b.png" in text
    assert rows[0][HEADERS.index("Name")] == "cats" and rows[0][HEADERS.index("Images")] == 2
    dataset_id = choice["value"]
    summary, location, gallery, page_label, item_id, caption = tab.show(dataset_id, 1, ALICE)
    assert location == f"asset store: datasets/{dataset_id}/" and page_label == "Page 1 of 1"
    assert [label for _, label in gallery] == ["2_cats/a.png: a cat", "2_cats/b.png (no caption)"]
    assert gallery[1][0].size == (50, 50)
    item_id, caption = tab.select_item(dataset_id, 1, SimpleNamespace(index=1), ALICE)
    assert caption == ""
    tab.save_caption(dataset_id, item_id, "a square cat", ALICE)
    assert tab.show(dataset_id, 1, ALICE)[2][1][1] == "2_cats/b.png: a square cat"
    text, rows, choice = tab.resize_dataset(dataset_id, 64, 64, "crop", "", "private", [], ALICE)
    assert "Created **cats 64x64**" in text and len(rows) == 2
    assert {image.size for image, _ in tab.show(choice["value"], 1, ALICE)[2]} == {(64, 64)}
    rows, choice = tab.delete_dataset(dataset_id, ALICE)
    assert [r[0] for r in rows] == ["cats 64x64"] and choice["value"] is None
    assert not any(f"/{dataset_id}/" in k for k in stored(dstudio))


def test_create_from_a_zip_and_refusals_show_the_file(dstudio):
    make_user(dstudio)
    tab = _tab(dstudio)
    archive = _uploaded({"d.zip": make_zip({"5_dog/x.png": png(), "5_dog/x.txt": b"dog"}).getvalue()})[0]
    text, rows, _ = tab.create_dataset("dogs", 1, "everyone", [], None, archive, ALICE)
    assert "1 image(s)" in text and rows[0][HEADERS.index("Visible to")] == "everyone"
    evil = _uploaded({"e.zip": make_zip({"../x.png": png()}).getvalue()})[0]
    with pytest.raises(gr.Error, match="climbs out"):
        tab.create_dataset("evil", 1, "private", [], None, evil, ALICE)
    with pytest.raises(gr.Error, match="either images"):
        tab.create_dataset("both", 1, "private", [], _uploaded({"a.png": png()}), archive, ALICE)
    with pytest.raises(gr.Error, match="not a file uploaded"):
        tab.create_dataset("server", 1, "private", [], ["/etc/passwd"], None, ALICE)
    assert len(tab.refresh(ALICE)[0]) == 1


def test_a_non_owner_cannot_see_private_or_change_shared_datasets(dstudio):
    make_user(dstudio), make_user(dstudio, "bob")
    tab = _tab(dstudio)
    private_id = tab.create_dataset("p", 1, "private", [], _uploaded({"a.png": png()}), None, ALICE)[2]["value"]
    shared_id = tab.create_dataset("s", 1, "everyone", [], _uploaded({"a.png": png()}), None, ALICE)[2]["value"]
    assert [r[0] for r in tab.refresh(BOB)[0]] == ["s"]
    with pytest.raises(gr.Error, match="no dataset"):
        tab.show(private_id, 1, BOB)
    with pytest.raises(gr.Error, match="no dataset"):
        tab.delete_dataset(private_id, BOB)
    item_id, _ = tab.select_item(shared_id, 1, SimpleNamespace(index=0), BOB)
    with pytest.raises(gr.Error, match="only the owner"):
        tab.save_caption(shared_id, item_id, "bob was here", BOB)
    with pytest.raises(gr.Error, match="only the owner"):
        tab.delete_dataset(shared_id, BOB)
    assert tab.resize_dataset(shared_id, 64, 64, "fit", "mine", "private", [], BOB)[2]["value"]  # a copy of his own
    assert {r[0] for r in tab.refresh(ADMIN)[0]} == {"p", "s", "mine"}
    tab.delete_dataset(private_id, ADMIN)
    assert {r[0] for r in tab.refresh(ALICE)[0]} == {"s"}
