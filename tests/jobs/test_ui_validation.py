"""The generate form over Gradio's HTTP queue: out-of-range numbers reach the shared validation, which
names the field, instead of being clamped or refused with Gradio's anonymous bounds message."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_PASSWORD, login
from tests.fixtures.gradio_queue import queue_call
from webapp.ui.localize import text_of


def _blocks(studio: Any) -> gr.Blocks:
    return next(r.app.get_blocks() for r in studio.app.routes if getattr(r, "path", "") == "/ui")


def _event(blocks: gr.Blocks, name: str, elem_id: str) -> tuple[int, Any]:
    """The event bound to handler `name` whose inputs hold the component with `elem_id`."""
    for index, dep in blocks.fns.items():
        if getattr(dep.fn, "__name__", "") == name and any(c.elem_id == elem_id for c in dep.inputs):
            return index, dep
    raise AssertionError(f"no Gradio event {name} reading #{elem_id}")




def _submit(studio: Any, by_label: dict[str, Any], session: str) -> dict:
    """Fill the per-user choices (as the page does on load), then press Generate with `by_label` values."""
    blocks = _blocks(studio)
    load_index, load = _event(blocks, "load_choices", "txt2img-checkpoint")
    submit_index, submit = _event(blocks, "submit", "txt2img-width")
    with TestClient(studio.app, follow_redirects=False) as client:
        login(client, "admin", ADMIN_PASSWORD)
        loaded = queue_call(client, load_index, [None] * len(load.inputs), session)
        assert loaded["success"], loaded
        checkpoint = loaded["output"]["data"][0]["value"]
        values = {"Stable Diffusion checkpoint": checkpoint, "Endpoint": "local", **by_label}
        # labels are i18n keys once the page is built (webapp/ui/localize.py); text_of gives their English
        data = [values.get(text_of(c.label), c.value) for c in submit.inputs]
        return queue_call(client, submit_index, data, session)


@pytest.mark.parametrize(("label", "value", "field"), [
    ("Width", -100, "width"), ("Sampling steps", 100000, "steps"), ("CFG scale", 500, "cfg_scale"),
])
def test_out_of_range_numbers_are_refused_naming_the_field(fake_studio, label, value, field):
    done = _submit(fake_studio, {label: value}, session=f"range-{field}")
    assert done["success"] is False
    text = json.dumps(done["output"])
    assert label in text and str(value) in text and f"`{field}`" in text, text
    assert fake_studio.jobs.list_jobs(actor=fake_studio.admin, all_users=True, limit=None)[0] == []


def test_in_range_numbers_still_generate(fake_studio):
    done = _submit(fake_studio, {"Width": 64, "Height": 64, "Sampling steps": 3, "Prompt": "a fox"}, session="ok")
    assert done["success"] is True, done
    jobs = fake_studio.jobs.list_jobs(actor=fake_studio.admin, all_users=True, limit=None)[0]
    assert [(j.request["width"], j.request["steps"]) for j in jobs] == [(64, 3)]
