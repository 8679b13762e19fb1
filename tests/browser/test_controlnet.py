"""In a real browser: enable one ControlNet unit in the txt2img accordion with an uploaded image, generate,
and get the image followed by the unit's detected map, with the unit in the infotext."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.browser.session import set_number, signed_in_page
from tests.fixtures.studio_models import model_studio, tiny_model_files  # noqa: F401 - fixtures
from tests.live import serve

pytestmark = pytest.mark.browser

PASSWORD = "alice-password-1"


@pytest.fixture
def server(model_studio, tmp_path):  # noqa: F811
    from tests.tiny import controlnets
    from tests.tiny.fixtures import tiny_files

    model = controlnets.tiny_controlnet(tiny_files().pipeline("sd15").unet)
    path = controlnets.write_ldm(tmp_path / "tinycanny.safetensors", model)
    model_studio.registry.register_file(actor=model_studio.admin, path=path, declared_type="controlnet",
                                        name="tinycanny")
    model_studio.users.create_user(actor=model_studio.admin, username="alice", password=PASSWORD)
    with serve(model_studio.app) as base:
        yield base


def test_one_unit_from_the_accordion_gives_the_image_and_its_map(browser, server, tmp_path):
    hint = tmp_path / "hint.png"
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    image.save(hint)
    context, page = signed_in_page(browser, server, "alice", PASSWORD)
    page.wait_for_function("() => document.querySelector('#txt2img-checkpoint input')?.value.includes('tiny-sd15')",
                           timeout=60_000)
    page.locator("#txt2img-prompt textarea").fill("a lighthouse")
    set_number(page, "#txt2img-steps", 3)
    set_number(page, "#txt2img-width", 64)
    set_number(page, "#txt2img-height", 64)

    page.click("#txt2img-controlnet button, #txt2img-controlnet .label-wrap")
    page.locator("#txt2img-cn0-enable input").check()
    page.locator("#txt2img-cn0-image input[type=file]").set_input_files(str(hint))
    page.locator("#txt2img-cn0-image img").wait_for(timeout=30_000)
    page.locator("#txt2img-cn0-module input").click()
    page.get_by_role("option", name="canny", exact=True).click()
    page.locator("#txt2img-cn0-model input").click()
    page.get_by_role("option").filter(has_text="tinycanny").first.click()
    page.click("#txt2img-generate")

    results = page.locator("#txt2img-results img.studio-result")
    results.nth(1).wait_for(timeout=120_000)
    assert results.count() == 2, "the generated image, then the detected map"
    infotext = page.locator("#txt2img-infotext textarea").input_value()
    assert 'ControlNet 0: "Module: canny, Model: tinycanny [' in infotext
    context.close()
