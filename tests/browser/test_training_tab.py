"""Training tab in a real browser: the config editor holds the base type's defaults and follows the base type;
Format config answers in the page."""

from __future__ import annotations

import pytest

from tests.browser.session import signed_in_page
from tests.conftest import ADMIN_PASSWORD
from tests.live import serve

pytestmark = pytest.mark.browser


def test_the_config_follows_the_base_type_and_formats(browser, studio):
    with serve(studio.app) as base:
        context, page = signed_in_page(browser, base, "admin", ADMIN_PASSWORD)
        page.get_by_role("tab", name="Training").click()
        editor = page.locator("#training-config .cm-content")
        editor.get_by_text("resolution = 512").wait_for(timeout=30_000)
        page.locator("#training-base-type").get_by_text("sdxl").click()
        editor.get_by_text("resolution = 1024").wait_for(timeout=30_000)
        assert "clip_skip" not in editor.inner_text()
        page.get_by_role("button", name="Format config").click()
        page.locator("#training-message").get_by_text("Config is valid.").wait_for(timeout=30_000)
        context.close()
