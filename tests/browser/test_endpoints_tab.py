"""Endpoints tab in a real browser: an administrator deploys a fake endpoint (its kind's own fields shown),
sees it InService in the list, and deletes it; an ordinary user sees the list without the forms."""

from __future__ import annotations

import pytest

from tests.browser.session import set_number, signed_in_page
from tests.conftest import ADMIN_PASSWORD
from tests.live import serve

pytestmark = pytest.mark.browser


@pytest.fixture
def fake_studio(make_settings):
    import app

    built = app.build(make_settings(backend="fake"))
    yield built
    built.close()


def _row(page, name: str):
    return page.locator('#endpoints-table div[role="row"]', has_text=name)  # not the hidden sizing rows


def test_deploy_and_delete_through_the_endpoints_tab(browser, fake_studio):
    admin = fake_studio.users.get_by_name("admin")
    fake_studio.users.create_user(actor=admin, username="alice", password="alice-password-1")
    with serve(fake_studio.app) as base:
        context, page = signed_in_page(browser, base, "admin", ADMIN_PASSWORD)
        page.get_by_role("tab", name="Endpoints").click()
        page.locator("#endpoint-kind input").wait_for(timeout=30_000)
        assert page.locator("#endpoint-http-secret input[type=password]").is_visible()  # http is shown first
        page.locator("#endpoint-kind input").click()
        page.get_by_role("option", name="fake", exact=True).click()
        page.locator("#endpoint-fake-slots").wait_for(state="visible", timeout=30_000)
        assert not page.locator("#endpoint-http-secret").is_visible()
        page.locator("#endpoint-name").get_by_role("textbox").fill("browser-made")
        set_number(page, "#endpoint-fake-slots", 2)
        page.click("#endpoint-deploy")
        row = _row(page, "browser-made")
        row.wait_for(timeout=30_000)
        assert "InService" in row.inner_text() and "fake" in row.inner_text()
        assert fake_studio.jobs.endpoints.find("browser-made").capabilities["slots"] == 2

        page.locator("#endpoint-delete-name input").click()
        page.get_by_role("option", name="browser-made", exact=True).click()
        page.locator("#endpoint-delete-confirm input").check()
        page.click("#endpoint-delete")
        row.wait_for(state="detached", timeout=30_000)
        context.close()

        context, page = signed_in_page(browser, base, "alice", "alice-password-1")
        page.get_by_role("tab", name="Endpoints").click()
        _row(page, "local").wait_for(timeout=30_000)
        assert not page.locator("#endpoint-deploy").is_visible()
        context.close()
    assert fake_studio.jobs.endpoints.find("browser-made") is None
