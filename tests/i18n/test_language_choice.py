"""The Account tab records the user's language; the /ui page carries it as a cookie; the login page speaks it."""

from __future__ import annotations

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from tests.conftest import login
from webapp.services.errors import InvalidInput
from webapp.ui.account_tab import BROWSER_LANGUAGE, AccountTab
from webapp.ui.context import UiContext
from webapp.web.language import LANGUAGE_COOKIE, NAVIGATOR_SCRIPT


@pytest.fixture
def alice(studio):
    admin = studio.users.get_by_name("admin")
    return studio.users.create_user(actor=admin, username="alice", password="alice-password")


def _tab(studio) -> AccountTab:
    return AccountTab(UiContext(users=studio.users), tokens=studio.tokens, auth=studio.auth, quota=studio.quota)


def _request(username: str) -> gr.Request:
    return gr.Request(username=username, headers={"accept-language": "zh-CN,zh;q=0.9"})


def test_the_account_tab_sets_and_clears_the_language(studio, alice):
    tab = _tab(studio)
    assert tab.language(_request("alice")) == BROWSER_LANGUAGE
    assert tab.set_language("ja", _request("alice")) == "ja"
    assert studio.users.get_by_name("alice").language == "ja"
    assert tab.language(_request("alice")) == "ja"
    assert studio.users.get_by_name("admin").language is None  # only the caller's own
    # The handlers now answer alice in Japanese, whatever her browser asks for.
    with pytest.raises(gr.Error) as refused:
        tab.revoke(None, _request("alice"))
    assert refused.value.message == "失効させるトークンを選んでください"

    assert tab.set_language(BROWSER_LANGUAGE, _request("alice")) == BROWSER_LANGUAGE
    assert studio.users.get_by_name("alice").language is None
    with pytest.raises(gr.Error) as refused:  # back to the browser's language: Chinese here
        tab.revoke(None, _request("alice"))
    assert refused.value.message == "请选择要吊销的令牌"


def test_an_unknown_language_is_refused(studio, alice):
    with pytest.raises(gr.Error):
        _tab(studio).set_language("fr", _request("alice"))
    assert studio.users.get_by_name("alice").language is None
    with pytest.raises(InvalidInput):
        studio.users.set_language(actor=alice, language="xx")


def _ui_page(studio, username: str, password: str) -> object:
    with TestClient(studio.app, follow_redirects=False) as c:
        login(c, username, password)
        return c.get("/ui/")


def test_the_ui_page_sets_and_deletes_the_language_cookie(studio, alice):
    studio.users.set_language(actor=alice, language="ja")
    page = _ui_page(studio, "alice", "alice-password")
    assert page.status_code == 200
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{LANGUAGE_COOKIE}=ja;") and "Path=/" in cookie and "SameSite=Lax" in cookie
    assert "HttpOnly" not in cookie  # the page's script reads it
    head = page.text.split("<head>", 1)[1]
    assert head.startswith(NAVIGATOR_SCRIPT)  # before Gradio's own scripts
    assert int(page.headers["content-length"]) == len(page.content)

    studio.users.set_language(actor=alice, language=None)
    page = _ui_page(studio, "alice", "alice-password")
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{LANGUAGE_COOKIE}=") and "Max-Age=0" in cookie  # deleted
    assert not cookie.startswith(f"{LANGUAGE_COOKIE}=ja")


def test_other_responses_are_left_alone(admin_client):
    response = admin_client.get("/ui/config")
    assert LANGUAGE_COOKIE not in response.headers.get("set-cookie", "")
    assert "studio_lang" not in response.text


def test_the_login_page_speaks_the_browser_or_cookie_language(client):
    assert "<button id=\"login-button\" type=\"submit\">Sign in</button>" in client.get("/login").text
    page = client.get("/login", headers={"accept-language": "ja-JP,ja;q=0.9,en;q=0.5"}).text
    assert '<html lang="ja">' in page and ">サインイン</button>" in page and ">ユーザー名</label>" in page
    client.cookies.set(LANGUAGE_COOKIE, "zh-CN")
    page = client.get("/login", headers={"accept-language": "ja"}).text
    assert ">登录</button>" in page
    wrong = client.post("/login", data={"username": "admin", "password": "wrong", "next": "/ui/"})
    assert wrong.status_code == 401 and 'lang="zh-CN"' in wrong.text
