"""The Gradio page is built at the first request that needs it (or by ``ready()``, as ``python app.py`` does
before serving), and Gradio's queue runs whenever the page and the studio's app both do."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import ADMIN_PASSWORD, login


def test_the_api_answers_without_building_the_page_and_the_first_visit_builds_it(studio):
    ui = studio.ui
    with TestClient(studio.app, follow_redirects=False) as client:
        login(client, "admin", ADMIN_PASSWORD)
        assert client.get("/api/v1/jobs").status_code == 200
        assert not ui.built, "an API call does not build the page"
        page = client.get("/ui/")
        assert page.status_code == 200 and "gradio" in page.text.lower()
        assert ui.built
        blocks = ui.get_blocks()
        assert blocks.is_running, "built while serving: Gradio's queue started at once"
        config = client.get("/ui/config")
        assert config.status_code == 200 and len(config.json()["components"]) > 100
    assert studio.ui.get_blocks() is blocks, "built once"


def test_a_page_built_before_serving_starts_with_the_app_and_stays_behind_the_gate(studio):
    blocks = studio.ui.ready()
    assert not blocks.is_running, "nothing runs before the app starts"
    with TestClient(studio.app, follow_redirects=False) as client:
        assert blocks.is_running, "the studio's startup started Gradio's queue"
        refused = client.get("/ui/config")
        assert refused.status_code in (302, 303, 401), "the page is still behind the login gate"
        assert not refused.text.startswith("{\"components")
