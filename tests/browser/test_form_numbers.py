"""In a real browser: a width typed out of range is neither clamped by the page nor queued — the error
popup names the field and the value, as the API answers."""

from __future__ import annotations

import pytest

from tests.browser.session import signed_in_page
from tests.fixtures.studio_models import model_studio, tiny_model_files  # noqa: F401 - fixtures
from tests.live import serve

pytestmark = pytest.mark.browser

PASSWORD = "alice-password-1"


def test_an_out_of_range_width_shows_the_error(browser, model_studio):  # noqa: F811
    model_studio.users.create_user(actor=model_studio.admin, username="alice", password=PASSWORD)
    with serve(model_studio.app) as base:
        context, page = signed_in_page(browser, base, "alice", PASSWORD)
        page.wait_for_function(
            "() => document.querySelector('#txt2img-checkpoint input')?.value.includes('tiny-sd15')", timeout=60_000)
        width = page.locator("#txt2img-width input[type=number]")
        width.fill("-100")
        width.press("Tab")  # leaving the box is where a Slider clamps
        assert width.input_value() == "-100"
        page.click("#txt2img-generate")
        toast = page.locator(".toast-body", has_text="Width")
        toast.wait_for(timeout=30_000)
        assert "-100" in toast.inner_text() and "`width`" in toast.inner_text()
        jobs, _total = model_studio.jobs.list_jobs(actor=model_studio.admin, all_users=True)
        assert jobs == []
        context.close()
