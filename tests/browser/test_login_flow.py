"""Log in, see the tabs, log out, log in as a second user; two users at once see only themselves."""

from __future__ import annotations

import pytest

from tests.browser.session import sign_in
from tests.conftest import ADMIN_PASSWORD
from tests.live import serve

pytestmark = pytest.mark.browser


@pytest.fixture
def server(studio):
    admin = studio.users.get_by_name("admin")
    studio.users.create_user(actor=admin, username="alice", password="alice-password")
    with serve(studio.app) as base:
        yield base


def test_login_tabs_logout_and_switch_user(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server + "/login")
    page.fill("#username", "admin")
    page.fill("#password", "wrong-password")
    page.click("#login-button")
    assert page.locator(".error").inner_text() == "Incorrect username or password"

    sign_in(page, server, "admin", ADMIN_PASSWORD)
    users_tab = page.get_by_role("tab", name="Users")
    users_tab.wait_for()
    users_tab.click()
    page.locator("#users-table").get_by_text("alice").wait_for()

    page.click("#logout-button")
    page.wait_for_url("**/login")
    page.goto(server + "/ui/")
    page.wait_for_url("**/login*")  # the session is gone

    sign_in(page, server, "alice", "alice-password")
    assert page.get_by_role("tab", name="Users").count() == 0
    context.close()


def test_two_browsers_two_users_at_once(browser, server):
    first, second = browser.new_context(), browser.new_context()
    a, b = first.new_page(), second.new_page()
    sign_in(a, server, "admin", ADMIN_PASSWORD)
    sign_in(b, server, "alice", "alice-password")
    a.reload()
    b.reload()
    a.get_by_text("Signed in as admin").wait_for()
    b.get_by_text("Signed in as alice").wait_for()
    assert b.get_by_text("Signed in as admin").count() == 0
    assert a.get_by_role("tab", name="Users").count() == 1
    assert b.get_by_role("tab", name="Users").count() == 0
    first.close()
    second.close()
