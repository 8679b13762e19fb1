"""An ordinary validation error is one log line naming the handler or route, the user and the message —
no traceback on the console — whether it comes through a UI handler (over Gradio's queue) or an API."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_PASSWORD, login
from tests.fixtures.gradio_queue import queue_call
from tests.web.test_users import _fn_index

SHORT_PASSWORD = "short"


def _lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if needle in r.getMessage()]


def _no_traceback(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture) -> None:
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    # (asyncio's note about the test client leaving Gradio's SSE stream early is not the studio's log)
    logged = [r for r in caplog.records if r.exc_info and r.name != "asyncio"]
    assert not logged, "an expected error is logged without a traceback"


def test_a_ui_validation_error_is_one_line_without_traceback(studio, caplog, capfd):
    blocks = next(r.app.get_blocks() for r in studio.app.routes if getattr(r, "path", "") == "/ui")
    create = _fn_index(blocks, "create")
    caplog.set_level(logging.INFO)
    with TestClient(studio.app, follow_redirects=False) as c:
        login(c, "admin", ADMIN_PASSWORD)
        capfd.readouterr()
        done = queue_call(c, create, ["bob", SHORT_PASSWORD, []], session=f"s{create}")
    assert done["success"] is False and "password" in str(done["output"])
    (line,) = _lines(caplog, "password")
    assert line.levelno == logging.INFO and "create" in line.getMessage() and "admin" in line.getMessage()
    _no_traceback(caplog, capfd)


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/v1/users", {"username": "bob", "password": SHORT_PASSWORD}, "password"),
    ("/sdapi/v1/txt2img", {"prompt": "a fox", "width": -100}, "width"),
])
def test_an_api_validation_error_is_one_line_without_traceback(studio, caplog, capfd, path, body, field):
    caplog.set_level(logging.INFO)
    with TestClient(studio.app) as c:
        capfd.readouterr()
        response = c.post(path, json=body, auth=("admin", ADMIN_PASSWORD))
    assert response.status_code == 422 and response.json()["field"] == field
    (line,) = _lines(caplog, f"`{field}`")
    message = line.getMessage()
    assert line.levelno == logging.INFO and path in message and "admin" in message and "422" in message
    _no_traceback(caplog, capfd)


def test_an_unexpected_error_keeps_its_traceback(studio, caplog, monkeypatch):
    def broken(**_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(studio.options, "get", broken)
    with TestClient(studio.app, raise_server_exceptions=False) as c:
        response = c.get("/sdapi/v1/options", auth=("admin", ADMIN_PASSWORD))
    assert response.status_code == 500
    assert [r for r in caplog.records if r.exc_info and "a bug" in str(r.exc_info[1])]
