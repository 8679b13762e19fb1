"""Datasets tab in a real browser: upload two images and a caption, see the dataset listed, its gallery with
captions and its location; click an image and save a new caption."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.browser.session import signed_in_page
from tests.conftest import ADMIN_PASSWORD
from tests.live import serve

pytestmark = pytest.mark.browser


def test_create_browse_and_caption_in_the_datasets_tab(browser, studio, tmp_path):
    for name, color in (("red.png", (220, 0, 0)), ("blue.png", (0, 0, 220))):
        out = io.BytesIO()
        Image.new("RGB", (48, 32), color).save(out, format="PNG")
        (tmp_path / name).write_bytes(out.getvalue())
    (tmp_path / "red.txt").write_text("a red square")
    with serve(studio.app) as base:
        context, page = signed_in_page(browser, base, "admin", ADMIN_PASSWORD)
        page.get_by_role("tab", name="Datasets").click()
        page.fill("#datasets-name textarea, #datasets-name input", "squares")
        files = page.locator("#datasets-files input[type=file]")
        files.set_input_files([str(tmp_path / n) for n in ("red.png", "red.txt", "blue.png")])
        page.locator('#datasets-files td.filename[aria-label="blue.png"]').wait_for(timeout=30_000)
        page.get_by_role("button", name="Create dataset").click()
        page.locator("#datasets-created").get_by_text("2 image(s)").wait_for(timeout=30_000)
        assert "1_squares/blue.png" in page.locator("#datasets-created").inner_text()
        page.locator("#datasets-gallery").get_by_text("1_squares/red.png: a red square").wait_for(timeout=30_000)
        dataset = studio.datasets.list_datasets(actor=studio.users.get_by_name("admin"))[0]
        assert page.locator("#datasets-location input, #datasets-location textarea").input_value().endswith(
            f"/datasets/{dataset.id}/")
        page.locator("#datasets-gallery button.thumbnail-item").nth(1).click()
        caption = page.locator("#datasets-caption textarea")
        page.wait_for_function("() => document.querySelector('#datasets-caption textarea').value === 'a red square'",
                               timeout=30_000)  # the selection arrived: editing now cannot be overwritten by it
        caption.fill("a redder square")
        page.get_by_role("button", name="Save caption").click()
        page.locator("#datasets-gallery").get_by_text("1_squares/red.png: a redder square").wait_for(timeout=30_000)
        context.close()
    items = studio.datasets.items(actor=studio.users.get_by_name("admin"), dataset_id=dataset.id)
    assert [(i.file_name, i.caption) for i in items] == [("blue.png", None), ("red.png", "a redder square")]
