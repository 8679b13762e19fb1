"""The Account tab in a real browser: create a token (shown once), use it, revoke it."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import ALICE
from tests.browser.session import signed_in_page
from tests.live import serve

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(fake_studio):
    with serve(fake_studio.studio.app) as base:
        yield base


def _table_shows(page, text: str) -> None:
    page.wait_for_function(
        "t => (document.querySelector('#tokens-table')?.innerText || '').includes(t)", arg=text, timeout=30_000)


def test_account_tab_token_lifecycle(browser, server):
    context, page = signed_in_page(browser, server, *ALICE)
    page.get_by_role("tab", name="Account").click()
    page.locator("#token-name textarea, #token-name input").first.fill("browser token")
    page.click("#create-token")
    shown = page.locator("#new-token textarea, #new-token input").first
    shown.wait_for(timeout=30_000)
    page.wait_for_function("() => { const e = document.querySelector('#new-token textarea, #new-token input');"
                           " return e && e.value.startsWith('stk_'); }", timeout=30_000)
    token = shown.input_value()
    bearer = {"authorization": f"Bearer {token}"}
    assert httpx.get(f"{server}/api/v1/me", headers=bearer).json()["username"] == "alice"
    _table_shows(page, "browser token")
    # the page never shows the token again after a reload
    page.reload()
    page.get_by_role("tab", name="Account").click()
    page.click("#refresh-tokens")
    _table_shows(page, "browser token")
    assert token not in page.content()
    # revoke it from the dropdown
    page.locator("#revoke-token-choice input").first.click()
    page.get_by_role("option", name="browser token").first.click()
    page.click("#revoke-token")
    _table_shows(page, "revoked")
    assert httpx.get(f"{server}/api/v1/me", headers=bearer).status_code == 401
    context.close()


def test_account_tab_creates_a_scoped_expiring_token(browser, server):
    context, page = signed_in_page(browser, server, *ALICE)
    page.get_by_role("tab", name="Account").click()
    page.locator("#token-name textarea, #token-name input").first.fill("scoped browser token")
    page.locator("#token-scopes input").first.click()
    page.get_by_role("option", name="inference:list", exact=True).first.click()
    page.locator("#token-expires input").first.fill("7")
    page.click("#create-token")
    page.wait_for_function("() => { const e = document.querySelector('#new-token textarea, #new-token input');"
                           " return e && e.value.startsWith('stk_'); }", timeout=30_000)
    token = page.locator("#new-token textarea, #new-token input").first.input_value()
    bearer = {"authorization": f"Bearer {token}"}
    assert httpx.get(f"{server}/api/v1/me", headers=bearer).json()["permissions"] == ["inference:list"]
    assert httpx.get(f"{server}/ui/config", headers=bearer).status_code == 403  # a scoped token is for the APIs
    _table_shows(page, "scoped browser token")
    _table_shows(page, "inference:list")
    listed = httpx.get(f"{server}/api/v1/tokens", headers=bearer).json()
    assert next(t for t in listed if t["name"] == "scoped browser token")["expires_at"] is not None
    context.close()
