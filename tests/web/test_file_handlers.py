"""File-taking UI handlers read only what Gradio received from an upload, never a path the client names.

Gradio runs every event over HTTP with ``data`` the client controls, so a client can post
``{"path": "/any/server/file", "meta": {"_type": "gradio.FileData"}}`` where a file is expected. These
tests send that to the real mounted app as a signed-in ordinary user.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from fastapi.testclient import TestClient
from gradio.utils import get_upload_folder

from tests.conftest import login
from tests.fixtures.gradio_queue import queue_call
from tests.live import run_async
from webapp.records import ModelType, Visibility
from webapp.ui.context import UiContext
from webapp.ui.models_tab import ALL, ModelsTab
from webapp.ui.pnginfo_tab import PngInfoTab

SECRET_PROMPT = "a secret prompt only the server knows"


def _png_with_infotext(path: Path) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", f"{SECRET_PROMPT}\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 8x8")
    Image.new("RGB", (8, 8), "red").save(path, pnginfo=info)
    return path


@pytest.fixture
def alice(studio):
    admin = studio.users.get_by_name("admin")
    return studio.users.create_user(actor=admin, username="alice", password="alice-password")


def _blocks(studio) -> gr.Blocks:
    return next(r.app.get_blocks() for r in studio.app.routes if getattr(r, "path", "") == "/ui")


def _fn_index(blocks: gr.Blocks, qualname: str) -> int:
    for index, dep in blocks.fns.items():
        if getattr(dep.fn, "__qualname__", "") == qualname:
            return index
    raise AssertionError(f"no Gradio event bound to {qualname}")




def _file_data(path: Path) -> dict:
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.parametrize("shape", ["filedata", "plain string"])
def test_png_info_over_http_refuses_a_server_path(studio, alice, tmp_path, shape):
    secret = _png_with_infotext(tmp_path / f"server-side-{uuid.uuid4().hex}.png")
    read = _fn_index(_blocks(studio), "PngInfoTab.read")
    value = _file_data(secret) if shape == "filedata" else str(secret)
    with TestClient(studio.app, follow_redirects=False) as c:
        login(c, "alice", "alice-password")
        done = queue_call(c, read, [value], session="files")
    assert done["success"] is False, done
    assert SECRET_PROMPT not in json.dumps(done)
    cached = [p for p in Path(get_upload_folder()).rglob(secret.name)]
    assert cached == [], "the server file was copied into Gradio's cache"


def test_png_info_over_http_reads_an_uploaded_file(studio, alice, tmp_path):
    source = _png_with_infotext(tmp_path / "mine.png")
    read = _fn_index(_blocks(studio), "PngInfoTab.read")
    with TestClient(studio.app, follow_redirects=False) as c:
        login(c, "alice", "alice-password")
        with source.open("rb") as handle:
            uploaded = c.post("/ui/gradio_api/upload", files={"files": ("mine.png", handle, "image/png")})
        assert uploaded.status_code == 200, uploaded.text
        done = queue_call(c, read, [_file_data(Path(uploaded.json()[0]))], session="files")
    assert done["success"] is True, done
    assert SECRET_PROMPT in json.dumps(done["output"]["data"])


def test_model_preview_over_http_refuses_a_server_path(studio, alice, tmp_path):
    secret = _png_with_infotext(tmp_path / "server-preview.png")
    record = studio.models.importer.reserve(
        owner=alice, model_type=ModelType.LORA, file_name="alice.safetensors", name=None, source="upload",
        source_detail=None, visibility=Visibility.PRIVATE, description=None,
    )
    blocks = _blocks(studio)
    with TestClient(studio.app, follow_redirects=False) as c:
        login(c, "alice", "alice-password")
        listed = queue_call(c, _fn_index(blocks, "ModelsTab.refresh"), [ALL, ALL, ALL, ""], session="files")
        assert listed["success"] is True, listed  # the session's model dropdown now offers alice's model
        done = queue_call(c, _fn_index(blocks, "ModelsTab.set_preview"), [record.id, _file_data(secret)], session="files")
    assert done["success"] is False, done
    assert studio.models.preview(actor=alice, model_id=record.id) is None


def test_handlers_called_directly_refuse_paths_outside_the_upload_folder(studio, alice, tmp_path):
    secret = _png_with_infotext(tmp_path / "direct.png")
    ctx = UiContext(users=studio.users)
    request = SimpleNamespace(username="alice")
    pnginfo = PngInfoTab(ctx, registry=studio.models, target=SimpleNamespace())
    with pytest.raises(gr.Error, match="uploaded"):
        pnginfo.read(str(secret), request)
    models = ModelsTab(ctx, studio.model_services)
    with pytest.raises(gr.Error, match="uploaded"):
        models.set_preview("any-model", str(secret), request)


def test_every_file_input_of_the_ui_refuses_a_server_path(studio, tmp_path):
    """Gradio's own step before any handler (preprocess moves input files to its cache) refuses the path,
    for every file-taking component: PNG Info's file, the model preview, img2img's image editor."""

    from gradio import processing_utils
    from gradio.context import LocalContext
    from gradio.exceptions import InvalidPathError

    blocks = _blocks(studio)
    payload = _file_data(_png_with_infotext(tmp_path / f"any-{uuid.uuid4().hex}.png"))
    shapes = {gr.ImageEditor: {"background": payload, "layers": [], "composite": payload}}
    inputs = {block for dep in blocks.fns.values() for block in dep.inputs
              if isinstance(block, gr.File | gr.Image | gr.ImageEditor | gr.UploadButton)}
    assert {type(block) for block in inputs} == {gr.File, gr.Image, gr.ImageEditor, gr.UploadButton}
    token = LocalContext.blocks.set(blocks)  # what Gradio sets while it processes an event
    try:
        for block in inputs:
            with pytest.raises(InvalidPathError):
                run_async(processing_utils.async_move_files_to_cache(
                    shapes.get(type(block), payload), block, check_in_upload_folder=True))
    finally:
        LocalContext.blocks.reset(token)
