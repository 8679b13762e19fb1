"""User administration: admins only — in the service, in the UI handlers, and over Gradio's HTTP queue."""

from __future__ import annotations

import json
from types import SimpleNamespace

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_PASSWORD, login
from tests.fixtures.gradio_queue import queue_messages
from webapp.services.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from webapp.ui.context import UiContext
from webapp.ui.users_tab import UsersTab


@pytest.fixture
def admin(studio):
    return studio.users.get_by_name("admin")


@pytest.fixture
def alice(studio, admin):
    return studio.users.create_user(actor=admin, username="alice", password="alice-password")


def test_admin_creates_lists_resets_and_deletes(studio, admin, alice):
    names = [u.username for u in studio.users.list_users(actor=admin)]
    assert names == ["admin", "alice"]
    assert [u.roles for u in studio.users.list_users(actor=admin)] == [["Admin"], ["Designer"]], \
        "a new user gets the seeded Designer role, the first-start admin the Admin role"

    token, _ = studio.auth.login("alice", "alice-password")
    studio.users.reset_password(actor=admin, username="alice", new_password="new-alice-pass")
    assert studio.auth.user_for_token(token) is None, "a reset ends the user's sessions"
    studio.auth.login("alice", "new-alice-pass")

    studio.users.delete_user(actor=admin, username="alice")
    assert studio.users.get_by_name("alice") is None


def test_bad_input_is_rejected_and_nothing_stored(studio, admin, alice):
    with pytest.raises(Conflict):
        studio.users.create_user(actor=admin, username="alice", password="another-password")
    with pytest.raises(InvalidInput, match="password"):
        studio.users.create_user(actor=admin, username="bob", password="short")
    with pytest.raises(InvalidInput, match="username"):
        studio.users.create_user(actor=admin, username="../bob", password="long-enough-pass")
    with pytest.raises(InvalidInput, match="role"):
        studio.users.create_user(actor=admin, username="bob", password="long-enough-pass", role="root")
    with pytest.raises(NotFound):
        studio.users.delete_user(actor=admin, username="nobody")
    with pytest.raises(InvalidInput):
        studio.users.delete_user(actor=admin, username="admin")
    assert [u.username for u in studio.users.list_users(actor=admin)] == ["admin", "alice"]


def test_an_admin_always_remains(studio, admin):
    other = studio.users.create_user(actor=admin, username="root2", password="root2-password", role="admin")
    studio.users.delete_user(actor=other, username="admin")
    with pytest.raises(InvalidInput, match="your own account"):
        studio.users.delete_user(actor=other, username="root2")
    assert studio.users.has_admin()


def test_non_admin_is_refused_by_the_service(studio, alice):
    for call in (
        lambda: studio.users.list_users(actor=alice),
        lambda: studio.users.create_user(actor=alice, username="mallory", password="mallory-pass"),
        lambda: studio.users.reset_password(actor=alice, username="admin", new_password="hijacked-pass"),
        lambda: studio.users.delete_user(actor=alice, username="admin"),
    ):
        with pytest.raises(PermissionDenied):
            call()
    assert studio.users.get_by_name("mallory") is None
    studio.auth.login("admin", ADMIN_PASSWORD)  # the admin password is unchanged


def test_non_admin_calling_the_ui_handlers_directly_gets_an_error(studio, alice):
    tab = UsersTab(UiContext(users=studio.users), roles=studio.roles)
    request = SimpleNamespace(username="alice")
    with pytest.raises(gr.Error, match="lacks the permission"):
        tab.create("mallory", "mallory-pass", "admin", request)
    with pytest.raises(gr.Error, match="lacks the permission"):
        tab.delete("admin", request)
    with pytest.raises(gr.Error, match="lacks the permission"):
        tab.refresh(request)
    assert studio.users.get_by_name("mallory") is None
    rows, *_ = tab.refresh(SimpleNamespace(username="admin"))
    assert [r[0] for r in rows] == ["admin", "alice"]




def _fn_index(blocks: gr.Blocks, name: str) -> int:
    for index, dep in blocks.fns.items():
        fn = getattr(dep.fn, "__name__", "")
        if fn == name:
            return index
    raise AssertionError(f"no Gradio event bound to {name}")


def test_non_admin_over_gradio_http_is_refused(studio, alice):
    blocks = next(r.app.get_blocks() for r in studio.app.routes if getattr(r, "path", "") == "/ui")
    create = _fn_index(blocks, "create")
    with TestClient(studio.app, follow_redirects=False) as c:
        login(c, "alice", "alice-password")
        messages = queue_messages(c, create, ["mallory", "mallory-pass", ["Admin"]], session=f"s{create}")
    done = messages[-1]
    assert done["msg"] == "process_completed" and done["success"] is False
    assert "lacks the permission user:create" in json.dumps(done)
    assert studio.users.get_by_name("mallory") is None

    with TestClient(studio.app, follow_redirects=False) as c:
        login(c, "admin", ADMIN_PASSWORD)
        messages = queue_messages(c, create, ["carol", "carol-password", ["Designer"]], session=f"s{create}")
    assert messages[-1]["success"] is True
    assert studio.users.get_by_name("carol") is not None
