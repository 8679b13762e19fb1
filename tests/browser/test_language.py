"""The UI in the user's language: their choice over the browser's; no choice → the browser's; back to English."""

from __future__ import annotations

import pytest

from tests.live import serve

pytestmark = pytest.mark.browser


@pytest.fixture
def server(studio):
    admin = studio.users.get_by_name("admin")
    studio.users.create_user(actor=admin, username="hana", password="hana-password")
    studio.users.create_user(actor=admin, username="wei", password="wei-password")
    studio.users.set_language(actor=studio.users.get_by_name("hana"), language="ja")
    with serve(studio.app) as base:
        yield base


def _sign_in(browser, base: str, username: str, password: str, locale: str):
    context = browser.new_context(locale=locale)
    page = context.new_page()
    page.goto(base + "/login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#login-button")
    page.wait_for_url("**/ui/**")
    return context, page


def test_a_japanese_user_sees_japanese_in_an_english_browser(browser, server):
    context, page = _sign_in(browser, server, "hana", "hana-password", "en-US")
    page.get_by_role("tab", name="モデル").wait_for(timeout=60_000)
    assert page.get_by_role("tab", name="アカウント").count() == 1
    assert page.get_by_role("tab", name="Models").count() == 0
    page.get_by_text("hana としてサインイン中").wait_for()
    assert page.locator("#logout-button").inner_text() == "ログアウト"
    context.close()


def test_no_choice_follows_the_browser_then_english_is_chosen(browser, server):
    context, page = _sign_in(browser, server, "wei", "wei-password", "zh-CN")
    page.get_by_role("tab", name="模型").wait_for(timeout=60_000)
    page.get_by_text("已登录：wei").wait_for()
    page.get_by_role("tab", name="账户").click()
    choice = page.locator("#account-language input")
    choice.wait_for()
    choice.click()
    page.get_by_role("option", name="English").click()
    with page.expect_navigation():  # the page reloads in the new language
        page.locator("#save-language").click()
    page.get_by_role("tab", name="Models").wait_for(timeout=60_000)
    page.get_by_text("Signed in as wei").wait_for()
    assert page.get_by_role("tab", name="模型").count() == 0
    assert context.cookies()[0]["name"] in {"studio_session", "studio_lang"}
    assert {c["name"]: c["value"] for c in context.cookies()}.get("studio_lang") == "en"
    context.close()
