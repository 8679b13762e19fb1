"""Models tab handlers, called as Gradio calls them: table filters, server/URL imports streaming their
progress lines, rename/delete/preview, and authorisation in the services (not just hidden widgets)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import gradio as gr
import pytest

from tests.models.conftest import make_user
from tests.models.http_files import serve_files
from webapp.ui.context import UiContext
from webapp.ui.models_tab import ALL, AUTO, HEADERS, ModelsTab


def _tab(studio) -> ModelsTab:
    return ModelsTab(UiContext(users=studio.users), studio.model_services)


ADMIN = SimpleNamespace(username="admin")


def test_server_import_streams_lines_then_table_filters(mstudio, tiny, import_root):
    tab = _tab(mstudio)
    lora = shutil.copy(tiny.lora, import_root / "style.safetensors")
    vae = shutil.copy(tiny.vae, import_root / "tinyvae.safetensors")
    lines = list(tab.import_server(f"{lora}\n{vae}", AUTO, "in place", '{"description": "mine"}', "everyone", [], ADMIN))
    assert "style: done — registered in place" in lines[-1] and "— succeeded: 2 of 2 file(s) imported" in lines[-1]
    rows, bases, choices = tab.refresh(ALL, ALL, ALL, "", ADMIN)
    assert sorted(r[0] for r in rows) == ["style", "tinyvae"]
    assert rows[0][3] == "Active" and rows[0][HEADERS.index("Source")] == "in place"
    assert "sd1" in bases["choices"]
    lora_rows, _, _ = tab.refresh("lora", "Active", "sd1", "", ADMIN)
    assert [r[0] for r in lora_rows] == ["style"] and tab.on_select(SimpleNamespace(row_value=lora_rows[0]), ADMIN)[
        -1]["sha256"] == mstudio.models.list_models(actor=mstudio.users.get_by_name("admin"), type="lora")[0].sha256
    assert tab.refresh(ALL, "Failed", ALL, "", ADMIN)[0] == []
    assert [r[0] for r in tab.refresh(ALL, ALL, ALL, "vae", ADMIN)[0]] == ["tinyvae"]


def test_non_admins_cannot_import_from_the_server_even_by_calling_the_handler(mstudio, tiny, import_root):
    make_user(mstudio)
    tab = _tab(mstudio)
    lora = shutil.copy(tiny.lora, import_root / "style.safetensors")
    with pytest.raises(gr.Error, match="lacks the permission"):
        list(tab.import_server(str(lora), AUTO, "in place", "", "everyone", [], SimpleNamespace(username="alice")))
    assert tab.on_open(SimpleNamespace(username="alice"))[0]["visible"] is False
    assert tab.on_open(ADMIN)[0]["visible"] is True


def test_url_import_lines_and_bad_input(build_studio, tiny):
    with serve_files({"style.safetensors": tiny.lora}) as files:
        studio = build_studio(url_import_allow=[f"127.0.0.1:{files.port}"])
        tab = _tab(studio)
        lines = list(tab.import_urls(f"{files.base}/files/style.safetensors", "lora", "", "everyone", [], ADMIN))
        assert "style: done — imported" in lines[-1]
        with pytest.raises(gr.Error, match="not valid JSON"):
            list(tab.import_urls(f"{files.base}/files/style.safetensors", "lora", "{oops", "everyone", [], ADMIN))
        with pytest.raises(gr.Error, match="loopback"):
            list(tab.import_urls("http://127.0.0.1:1/x.safetensors", "lora", "", "everyone", [], ADMIN))


def test_select_rename_preview_and_delete(mstudio, tiny, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # handlers read files Gradio received, from its folder

    tab = _tab(mstudio)
    admin = mstudio.users.get_by_name("admin")
    record = mstudio.models.register_file(actor=admin, path=tiny.lora)
    selected, name, description, visibility, roles, image, details = tab.show(record.id, ADMIN)
    assert (name, visibility, image) == ("style", "everyone", None)
    assert roles["visible"] is False and roles["value"] == []
    tab.save(record.id, "styles/ink", "an ink look", "private", [], ADMIN)
    assert mstudio.models.get(actor=admin, model_id=record.id).name == "styles/ink"
    with pytest.raises(gr.Error, match="contains"):
        tab.save(record.id, "bad:name", "", "private", [], ADMIN)
    picture = tmp_path / "preview.png"
    Image.new("RGB", (4, 4), "green").save(picture)
    tab.set_preview(record.id, str(picture), ADMIN)
    assert tab.show(record.id, ADMIN)[5].size == (4, 4)
    alice = make_user(mstudio)
    assert alice is not None
    with pytest.raises(gr.Error):  # private now: alice cannot even see it
        tab.delete(record.id, SimpleNamespace(username="alice"))
    assert tab.delete(record.id, ADMIN)[0] is None
    assert tab.refresh(ALL, ALL, ALL, "", ADMIN)[0] == []
    with pytest.raises(gr.Error, match="Choose a model"):
        tab.delete(None, ADMIN)


def test_refresh_button_registers_files_dropped_into_the_models_folder(build_studio, tiny, tmp_path):
    folder = tmp_path / "a1111-models"
    (folder / "Lora").mkdir(parents=True)
    studio = build_studio(models_dir=folder)
    tab = _tab(studio)
    rows, *_ = tab.refresh(ALL, ALL, ALL, "", ADMIN)
    assert rows == []
    shutil.copy(tiny.lora, folder / "Lora" / "dropped.safetensors")
    rows, _, choices = tab.rescan(ALL, ALL, ALL, "", ADMIN)
    assert [r[0] for r in rows] == ["dropped"] and len(choices["choices"]) == 1
