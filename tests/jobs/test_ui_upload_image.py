"""img2img's "Upload image" button takes any file and says what is wrong with one that is not an image.

Gradio's ImageEditor handles a drop in the browser and its canvas ignores a non-image without telling
anyone; the upload button reaches the server, which opens the file header-first and names the problem.
"""

from __future__ import annotations

import io
from pathlib import Path

import gradio as gr
import pytest
from gradio.utils import get_upload_folder
from PIL import Image

from tests.fixtures.images import bomb_png
from tests.jobs.test_ui import Tabs, req


@pytest.fixture(scope="module")
def tabs(shared_fake_studio) -> Tabs:
    return Tabs(shared_fake_studio)


def _uploaded(name: str, data: bytes) -> str:
    folder = Path(get_upload_folder()) / "test-upload-image"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return str(path)


def test_an_uploaded_image_becomes_the_editors_image(fake_studio, tabs):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 10, 10)).save(buffer, format="PNG")
    loaded = tabs.img2img.load_image(_uploaded("red.png", buffer.getvalue()), req(fake_studio.admin))
    assert isinstance(loaded, Image.Image) and loaded.size == (40, 24) and loaded.getpixel((0, 0)) == (200, 10, 10)


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("notes.txt", b"just some text, not pixels", "not a readable image"),
    ("bomb.png", bomb_png(30_000, 30_000), "too large to decode safely"),
])
def test_a_file_that_is_not_an_image_is_named_in_the_error(fake_studio, tabs, name, data, reason):
    with pytest.raises(gr.Error) as caught:
        tabs.img2img.load_image(_uploaded(name, data), req(fake_studio.admin))
    assert f"{name} is not an image" in caught.value.message and reason in caught.value.message


def test_a_server_path_is_refused(fake_studio, tabs, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    with pytest.raises(gr.Error, match="not a file uploaded"):
        tabs.img2img.load_image(str(outside), req(fake_studio.admin))
