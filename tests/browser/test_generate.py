"""In a real browser: log in, generate on the tiny model, see the image and its History entry, open the
API curl and run it — it reproduces the image pixel for pixel."""

from __future__ import annotations

import base64
import io
import json
import subprocess

import pytest

from tests.browser.session import choose_history_entry, set_number, signed_in_page
from tests.fixtures.studio_models import model_studio, tiny_model_files  # noqa: F401 - fixtures
from tests.live import serve

pytestmark = pytest.mark.browser

PASSWORD = "alice-password-1"


@pytest.fixture
def server(model_studio):  # noqa: F811
    model_studio.users.create_user(actor=model_studio.admin, username="alice", password=PASSWORD)
    with serve(model_studio.app) as base:
        yield base


def _pixels(png: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


def test_generate_see_history_and_reproduce_with_curl(browser, server, model_studio):  # noqa: F811
    context, page = signed_in_page(browser, server, "alice", PASSWORD)

    checkpoint = page.locator("#txt2img-checkpoint input")
    page.wait_for_function("() => document.querySelector('#txt2img-checkpoint input')?.value.includes('tiny-sd15')",
                           timeout=60_000)
    assert "tiny-sd15" in checkpoint.input_value()
    page.locator("#txt2img-prompt textarea").fill("a lighthouse at dusk")
    set_number(page, "#txt2img-steps", 6)
    set_number(page, "#txt2img-width", 64)
    set_number(page, "#txt2img-height", 64)
    page.locator("#txt2img-seed input").fill("1234")
    page.click("#txt2img-generate")

    result = page.locator("#txt2img-results img.studio-result").first
    result.wait_for(timeout=120_000)
    src = result.get_attribute("src")
    assert src.startswith("/files/jobs/") and src.endswith("/0.png")
    page.wait_for_function("(img) => img.complete && img.naturalWidth === 64", arg=result.element_handle())
    assert "Seed: 1234" in page.locator("#txt2img-infotext textarea").input_value()
    shown = page.request.get(server + src)
    assert shown.status == 200 and shown.headers["content-type"] == "image/png"
    job_id = src.split("/")[3]

    choose_history_entry(page, "txt2img", f"-txt2img-succeeded-{job_id}")
    page.locator(f'#txt2img-history-images img[src="{src}"]').wait_for(timeout=30_000)

    page.click("#txt2img-history-api")
    code = page.locator("#txt2img-history-curl .cm-content")
    code.wait_for(timeout=30_000)
    curl = code.inner_text()
    assert "/sdapi/v1/txt2img" in curl and "USER:PASSWORD" in curl
    first_command = curl.split("\n\n# Or queue it")[0].replace("USER:PASSWORD", f"alice:{PASSWORD}")
    out = subprocess.run(["bash", "-c", first_command], capture_output=True, text=True, timeout=300, check=True)
    answer = json.loads(out.stdout)
    assert "images" in answer, answer
    reproduced = base64.b64decode(answer["images"][0])
    assert json.loads(answer["info"])["seed"] == 1234
    assert _pixels(reproduced) == _pixels(shown.body()), "the curl call reproduces the job's image"
    context.close()
