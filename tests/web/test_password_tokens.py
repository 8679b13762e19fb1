"""A password reset or change revokes the user's API tokens unless the caller says to keep them.

A token minted with a leaked password would otherwise outlive the very reset meant to lock the thief out.
"""

from __future__ import annotations

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_PASSWORD
from webapp.ui.account_tab import AccountTab
from webapp.ui.context import UiContext
from webapp.ui.localize import text_of
from webapp.ui.users_tab import UsersTab

ALICE_PASSWORD = "alice-password"
REVOKE_LABEL = "Also revoke API tokens"


@pytest.fixture
def alice(studio):
    admin = studio.users.get_by_name("admin")
    return studio.users.create_user(actor=admin, username="alice", password=ALICE_PASSWORD)


def _token(studio, user) -> str:
    token, _public = studio.tokens.create(actor=user, name="scripts")
    assert studio.auth.user_for_api_token(token) is not None
    return token


def _request(username: str, cookies: dict | None = None) -> gr.Request:
    return gr.Request(username=username, cookies=cookies or {})


def test_admin_reset_revokes_tokens_unless_asked_to_keep_them(studio, alice, client):
    admin = studio.users.get_by_name("admin")
    token = _token(studio, alice)
    studio.users.reset_password(actor=admin, username="alice", new_password="alice-new-pass-1")
    assert studio.auth.user_for_api_token(token) is None

    kept = _token(studio, alice)
    studio.users.reset_password(actor=admin, username="alice", new_password="alice-new-pass-2", revoke_tokens=False)
    assert studio.auth.user_for_api_token(kept) is not None


def test_reset_over_the_api_takes_an_optional_revoke_tokens(studio, alice):
    admin_auth = ("admin", ADMIN_PASSWORD)
    with TestClient(studio.app, follow_redirects=False) as c:
        kept = _token(studio, alice)
        answer = c.put("/api/v1/users/alice/password", auth=admin_auth,
                       json={"password": "alice-new-pass-1", "revoke_tokens": False})
        assert answer.status_code == 200 and answer.json()["tokens_revoked"] is False
        assert c.get("/api/v1/me", headers={"authorization": f"Bearer {kept}"}).status_code == 200

        answer = c.put("/api/v1/users/alice/password", auth=admin_auth, json={"password": "alice-new-pass-2"})
        assert answer.status_code == 200 and answer.json()["tokens_revoked"] is True
        assert c.get("/api/v1/me", headers={"authorization": f"Bearer {kept}"}).status_code == 401

        bad = c.put("/api/v1/users/alice/password", auth=admin_auth,
                    json={"password": "alice-new-pass-3", "revoke_tokens": "sometimes"})
        assert bad.status_code == 422 and "revoke_tokens" in bad.text


def test_own_change_revokes_tokens_keeps_this_session_and_ends_the_others(studio, alice):
    token = _token(studio, alice)
    here, _ = studio.auth.login("alice", ALICE_PASSWORD)
    elsewhere, _ = studio.auth.login("alice", ALICE_PASSWORD)
    studio.auth.change_own_password(actor=alice, current_password=ALICE_PASSWORD, new_password="alice-new-pass-1",
                                    keep_session=here)
    assert studio.auth.user_for_api_token(token) is None
    assert studio.auth.user_for_token(here) is not None and studio.auth.user_for_token(elsewhere) is None

    kept = _token(studio, alice)
    studio.auth.change_own_password(actor=alice, current_password="alice-new-pass-1",
                                    new_password="alice-new-pass-2", revoke_tokens=False)
    assert studio.auth.user_for_api_token(kept) is not None


def test_ui_handlers_take_the_checkbox(studio, alice):
    ctx = UiContext(users=studio.users)
    account = AccountTab(ctx, tokens=studio.tokens, auth=studio.auth, quota=studio.quota)
    kept = _token(studio, alice)
    account.change_password(ALICE_PASSWORD, "alice-new-pass-1", "alice-new-pass-1", _request("alice"), False)
    assert studio.auth.user_for_api_token(kept) is not None
    account.change_password("alice-new-pass-1", "alice-new-pass-2", "alice-new-pass-2", _request("alice"), True)
    assert studio.auth.user_for_api_token(kept) is None

    users = UsersTab(ctx, roles=studio.roles)
    kept = _token(studio, alice)
    users.reset_password("alice", "alice-new-pass-3", _request("admin"), False)
    assert studio.auth.user_for_api_token(kept) is not None
    users.reset_password("alice", "alice-new-pass-4", _request("admin"), True)
    assert studio.auth.user_for_api_token(kept) is None


@pytest.mark.parametrize(("tab", "handler"), [(AccountTab, "change_password"), (UsersTab, "reset_password")])
def test_the_forms_have_a_revoke_checkbox_that_defaults_to_on(studio, tab, handler):
    blocks: gr.Blocks = next(r.app.get_blocks() for r in studio.app.routes if getattr(r, "path", "") == "/ui")
    dep = next(d for d in blocks.fns.values()
               if isinstance(getattr(d.fn, "__self__", None), tab) and d.fn.__name__ == handler)
    boxes = [c for c in dep.inputs if isinstance(c, gr.Checkbox)]
    # labels are i18n keys once the page is built (webapp/ui/localize.py); text_of gives their English
    assert [(text_of(b.label), b.value) for b in boxes] == [(REVOKE_LABEL, True)]
