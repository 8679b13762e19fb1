"""In a real browser: a non-image dropped on img2img's editor is not silently ignored — the page hands it to
the Upload image button, and the server's popup names the file and why it is not an image."""

from __future__ import annotations

import pytest

from tests.browser.session import signed_in_page
from tests.fixtures.studio_models import model_studio, tiny_model_files  # noqa: F401 - fixtures
from tests.live import serve

pytestmark = pytest.mark.browser

PASSWORD = "alice-password-1"
DROP_TEXT_FILE = """() => {
  const data = new DataTransfer();
  data.items.add(new File(['just some text, not pixels'], 'notes.txt', {type: 'text/plain'}));
  const target = document.querySelector('#img2img-image');
  target.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
}"""


def test_a_dropped_text_file_is_named_in_an_error(browser, model_studio):  # noqa: F811
    model_studio.users.create_user(actor=model_studio.admin, username="alice", password=PASSWORD)
    with serve(model_studio.app) as base:
        context, page = signed_in_page(browser, base, "alice", PASSWORD)
        page.get_by_role("tab", name="img2img").click()
        page.locator("#img2img-image").wait_for(state="visible", timeout=30_000)
        page.evaluate(DROP_TEXT_FILE)
        toast = page.locator(".toast-body", has_text="notes.txt")
        toast.wait_for(timeout=30_000)
        assert "is not an image" in toast.inner_text()
        context.close()
