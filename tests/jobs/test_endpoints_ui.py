"""The Endpoints tab's handlers, called as Gradio calls them (and once over Gradio's HTTP queue), and the
option widgets built from any kind's options model."""

from __future__ import annotations

import enum
import json
from typing import Any, Literal

import gradio as gr
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field, SecretStr

from tests.conftest import login
from tests.fixtures.gradio_queue import queue_messages
from tests.jobs.conftest import USER_PASSWORD, add_user, txt2img
from webapp.records import EndpointStatus, JobStatus
from webapp.services.errors import InvalidInput
from webapp.ui.context import UiContext
from webapp.ui.endpoints_tab import EndpointsTab
from webapp.ui.generate_tab import GenerateTab
from webapp.ui.options_form import build_widget, describe, read_value

SECRET = "ui-worker-secret-0123456789"


@pytest.fixture(scope="module")
def tab(shared_fake_studio) -> EndpointsTab:
    studio = shared_fake_studio.studio
    built = EndpointsTab(UiContext(users=studio.users), endpoints=studio.jobs.endpoints, admin=studio.endpoint_admin)
    with gr.Blocks(), gr.Tabs():
        built.build()
    return built


def req(user: Any) -> gr.Request:
    return gr.Request(username=user.username)


def form(tab: EndpointsTab, kind: str, name: str = "", **options: Any) -> dict[Any, Any]:
    """Every Deploy widget's value as Gradio hands it over: defaults, then the chosen kind's ``options``."""
    values: dict[Any, Any] = {w: getattr(w, "value", None) for ws in tab.widgets.values() for w in ws.values()}
    values.update({tab.kind: kind, tab.name: name, tab.min_instances: 1.0, tab.max_instances: 2.0,
                   tab.autoscale: False})
    for key, value in options.items():
        values[tab.widgets[kind][key]] = value
    return values


def test_admin_deploys_and_deletes_through_the_tab(fake_studio, tab):
    admin = fake_studio.admin
    rows, delete_choices, admin_area, cleared = tab.deploy(form(tab, "fake", "ui-made", slots=3.0), req(admin))
    row = next(r for r in rows if r[0] == "ui-made")
    assert row[1:6] == ["fake", "InService", "no", 3, "1–2"] and cleared == ""
    assert "ui-made" in delete_choices["choices"] and "local" not in delete_choices["choices"]
    assert admin_area["visible"] is True

    with pytest.raises(gr.Error, match="confirm"):
        tab.delete("ui-made", False, False, req(admin))
    assert fake_studio.studio.jobs.endpoints.find("ui-made") is not None
    rows, delete_choices, _, confirm, force = tab.delete("ui-made", True, False, req(admin))
    assert all(r[0] != "ui-made" for r in rows) and confirm is False and force is False


def test_a_worker_secret_typed_in_the_form_is_stored_encrypted_and_never_shown(fake_studio, tab):
    admin = fake_studio.admin
    rows, *_ = tab.deploy(form(tab, "http", "ui-worker", url="http://127.0.0.1:9", secret=SECRET), req(admin))
    try:
        assert SECRET not in json.dumps(rows)
        endpoint = fake_studio.studio.jobs.endpoints.find("ui-worker")
        assert endpoint.kind == "http" and SECRET not in endpoint.config_json and endpoint.secrets_token
    finally:
        tab.delete("ui-worker", True, False, req(admin))


def test_bad_form_values_are_popups_naming_the_field(fake_studio, tab):
    admin = fake_studio.admin
    with pytest.raises(gr.Error, match="secret"):
        tab.deploy(form(tab, "http", "ui-short", url="http://127.0.0.1:9", secret="short"), req(admin))
    with pytest.raises(gr.Error, match="fail_prompts"):
        tab.deploy(form(tab, "fake", "ui-json", fail_prompts="{not json"), req(admin))
    with pytest.raises(gr.Error, match="name"):
        tab.deploy(form(tab, "fake", "Not A Name"), req(admin))
    assert all(fake_studio.studio.jobs.endpoints.find(n) is None for n in ("ui-short", "ui-json"))


def test_non_admins_see_the_list_but_cannot_deploy_or_delete(fake_studio, tab):
    alice = add_user(fake_studio.studio, "alice")
    rows, _, admin_area = tab.refresh(req(alice))
    assert any(r[0].startswith("local") for r in rows) and admin_area["visible"] is False
    with pytest.raises(gr.Error, match="lacks the permission"):
        tab.deploy(form(tab, "fake", "alices"), req(alice))
    with pytest.raises(gr.Error, match="lacks the permission"):
        tab.delete("local", True, False, req(alice))
    assert fake_studio.studio.jobs.endpoints.find("alices") is None


def test_non_admin_calling_deploy_over_gradio_http_is_refused(fake_studio):
    studio = fake_studio.studio
    add_user(studio, "alice")
    blocks = next(r.app.get_blocks() for r in studio.app.routes if getattr(r, "path", "") == "/ui")
    index, dependency = next((i, d) for i, d in blocks.fns.items()
                             if getattr(d.fn, "__qualname__", "") == "EndpointsTab.deploy")
    kind = next(c for c in dependency.inputs if getattr(c, "elem_id", None) == "endpoint-kind")
    name = next(c for c in dependency.inputs if getattr(c, "elem_id", None) == "endpoint-name")
    data = [{kind: "fake", name: "over-http"}.get(c, getattr(c, "value", None)) for c in dependency.inputs]
    with TestClient(studio.app, follow_redirects=False) as c:
        login(c, "alice", USER_PASSWORD)
        done = queue_messages(c, index, data, session="endpoints-deploy")[-1]
    assert done["success"] is False and "lacks the permission endpoint:create" in json.dumps(done)
    assert studio.jobs.endpoints.find("over-http") is None


def test_only_the_chosen_kinds_options_are_shown(tab):
    updates = tab.kind_changed("fake")
    assert [u["visible"] for u in updates] == [k == "fake" for k in tab.groups]


def test_the_generate_tabs_list_an_endpoint_deployed_after_they_were_built(fake_studio, tab):
    studio, admin = fake_studio.studio, fake_studio.admin
    generate = GenerateTab(UiContext(users=studio.users), jobs=studio.jobs, registry=studio.models, mode="txt2img")
    tab.deploy(form(tab, "fake", "late-comer", remote=True), req(admin))
    try:
        _, _, endpoint, *_ = generate.load_choices(None, None, None, None, req(admin))
        assert "late-comer" in [value for _, value in endpoint["choices"]]
        job = studio.jobs.submit(actor=admin, mode="txt2img", request=txt2img(), endpoint="late-comer")
        assert studio.jobs.wait(actor=admin, job_id=job.id, timeout=30).status == JobStatus.SUCCEEDED
    finally:
        tab.delete("late-comer", True, False, req(admin))
    assert studio.jobs.endpoints.find("late-comer") is None
    assert studio.jobs.endpoints.get(actor=admin, name="local").status == EndpointStatus.IN_SERVICE


# -- widgets from any options model ------------------------------------------------------------------------------
class Region(enum.Enum):
    EU = "eu-west-1"
    US = "us-east-1"


class EveryType(BaseModel):
    endpoint: str = Field(..., description="the endpoint's name")
    api_key: SecretStr
    count: int = 2
    ratio: float | None = None
    warm: bool = True
    subnets: list[str] = Field(default_factory=list)
    mode: Literal["async", "real-time"] = "async"
    region: Region = Region.EU
    tags: dict[str, str] = Field(default_factory=dict)
    devices: str | list[str] | None = "auto"


def test_every_field_type_gets_its_widget_and_values_come_back_typed():
    fields = {f.name: f for f in describe(EveryType)}
    assert {n: f.widget for n, f in fields.items()} == {
        "endpoint": "text", "api_key": "secret", "count": "int", "ratio": "float", "warm": "bool", "subnets": "list",
        "mode": "choice", "region": "choice", "tags": "json", "devices": "text"}
    assert fields["endpoint"].required and not fields["count"].required
    assert fields["region"].choices == ("eu-west-1", "us-east-1")
    with gr.Blocks():
        widgets = {n: build_widget(f, f"w-{n}") for n, f in fields.items()}
    assert isinstance(widgets["api_key"], gr.Textbox) and widgets["api_key"].type == "password"
    assert isinstance(widgets["warm"], gr.Checkbox) and widgets["warm"].value is True
    assert isinstance(widgets["mode"], gr.Dropdown) and widgets["region"].value == "eu-west-1"
    assert isinstance(widgets["count"], gr.Number) and widgets["count"].value == 2

    assert read_value(fields["count"], 3.0) == (True, 3)
    assert read_value(fields["ratio"], None) == (False, None)
    assert isinstance(widgets["ratio"], gr.Textbox)  # an optional number: an empty box means the default
    assert read_value(fields["ratio"], "") == (False, None) and read_value(fields["ratio"], " 0.5") == (True, 0.5)
    assert read_value(fields["subnets"], "a\n b \n\n") == (True, ["a", "b"])
    assert read_value(fields["tags"], '{"team": "art"}') == (True, {"team": "art"})
    assert read_value(fields["endpoint"], "  ") == (False, None)
    assert read_value(fields["warm"], False) == (True, False)
    with pytest.raises(InvalidInput) as caught:
        read_value(fields["tags"], "{")
    assert caught.value.field == "options.tags"
    with pytest.raises(InvalidInput) as caught:
        read_value(fields["ratio"], "half")
    assert caught.value.field == "options.ratio"


def test_the_autoscale_box_follows_the_kinds_default(tab):
    assert tab.autoscale_default("sagemaker")["value"] is True  # the seeds: autoscaling on by default
    assert tab.autoscale_default("http")["value"] is False
