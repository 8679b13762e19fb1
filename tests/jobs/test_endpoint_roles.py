"""Endpoints and the roles: allowed roles set at deploy restrict who lists, gets and sends jobs to an endpoint;
holders of endpoint:update change them later (service, the Endpoints tab's handlers called as Gradio calls them,
``PUT /api/v1/endpoints/{name}/allowed_roles``), each change audited; anyone else is refused and nothing changes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import gradio as gr
import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from tests.conftest import login
from tests.jobs.conftest import USER_PASSWORD
from webapp.records import AuditEvent
from webapp.services.errors import InvalidInput, NotFound, PermissionDenied
from webapp.services.jobs import Deployment
from webapp.ui.context import UiContext
from webapp.ui.endpoints_tab import HEADERS, EndpointsTab

NAME = "team-only"


def _user(studio: Any, name: str, *roles: str) -> Any:
    found = studio.users.get_by_name(name)
    if found is not None:
        return found
    return studio.users.create_user(actor=studio.users.get_by_name("admin"), username=name, password=USER_PASSWORD,
                                    roles=list(roles) or None)


def _req(user: Any) -> gr.Request:
    return gr.Request(username=user.username)


def _client(studio: Any, name: str) -> TestClient:
    client = TestClient(studio.app, follow_redirects=False)
    login(client, name, USER_PASSWORD)
    return client


@pytest.fixture
def world(fake_studio) -> Iterator[Any]:
    """Role Team (endpoint:list/use); tina is a Designer in Team, bob a Designer only, ivan an IT Operator; the
    endpoint ``team-only`` is deployed for Team (and removed afterwards)."""
    studio = fake_studio.studio
    admin = fake_studio.admin
    if "Team" not in studio.jobs.endpoints.role_names().values():
        studio.roles.create_role(actor=admin, name="Team", permissions=["endpoint:list", "endpoint:use"])
    people = {"tina": _user(studio, "tina", "Designer", "Team"), "bob": _user(studio, "bob"),
              "ivan": _user(studio, "ivan", "IT Operator")}
    endpoint = studio.endpoint_admin.deploy(actor=admin, request=Deployment(kind="fake", options={}, name=NAME,
                                                                            allowed_roles=("Team",)))
    tab = EndpointsTab(UiContext(users=studio.users), endpoints=studio.jobs.endpoints, admin=studio.endpoint_admin)
    yield type("World", (), {"studio": studio, "admin": admin, "endpoint": endpoint, "tab": tab, **people})
    if studio.jobs.endpoints.find(NAME) is not None:
        studio.endpoint_admin.delete(actor=admin, name=NAME, force=True)


def _names(studio: Any, user: Any) -> list[str]:
    return [e.name for e in studio.jobs.endpoints.list_endpoints(actor=user)]


def test_allowed_roles_restrict_listing_getting_and_sending_jobs(world):
    studio, endpoints = world.studio, world.studio.jobs.endpoints
    assert world.endpoint.allowed_roles == f",{_role_id(studio, 'Team')},"
    for who, sees in ((world.tina, True), (world.ivan, True), (world.admin, True), (world.bob, False)):
        assert (NAME in _names(studio, who)) is sees, who.username
    with pytest.raises(NotFound):
        endpoints.get(actor=world.bob, name=NAME)
    with pytest.raises(NotFound):  # where a job would go
        endpoints.resolve(actor=world.bob, name=NAME)
    assert endpoints.resolve(actor=world.tina, name=NAME).name == NAME
    assert NAME not in [e["name"] for e in _client(studio, "bob").get("/api/v1/endpoints").json()["endpoints"]]
    assert _client(studio, "bob").get(f"/api/v1/endpoints/{NAME}").status_code == 404
    item = _client(studio, "tina").get(f"/api/v1/endpoints/{NAME}").json()
    assert item["allowed_roles"] == ["Team"]
    rows = world.tab.refresh(_req(world.tina))[0]
    assert next(r for r in rows if r[0] == NAME)[HEADERS.index("Allowed roles")] == "Team"
    assert all(r[0] != NAME for r in world.tab.refresh(_req(world.bob))[0])


def test_only_endpoint_update_holders_change_the_roles_and_each_change_is_audited(world):
    studio, endpoints = world.studio, world.studio.jobs.endpoints
    before = endpoints.find(NAME).allowed_roles
    with pytest.raises(PermissionDenied, match="lacks the permission endpoint:update"):
        endpoints.set_allowed_roles(actor=world.tina, name=NAME, roles=[])
    with pytest.raises(gr.Error, match="lacks the permission endpoint:update"):
        world.tab.save_roles(NAME, [], _req(world.tina))
    answer = _client(studio, "tina").put(f"/api/v1/endpoints/{NAME}/allowed_roles", json={"allowed_roles": []})
    assert answer.status_code == 403
    assert world.tab.roles_editor(_req(world.tina))[0]["visible"] is False
    with pytest.raises(InvalidInput, match="'Nope'") as unknown:
        endpoints.set_allowed_roles(actor=world.ivan, name=NAME, roles=["Team", "Nope"])
    assert unknown.value.field == "allowed_roles"
    assert endpoints.find(NAME).allowed_roles == before and NAME not in _names(studio, world.bob)

    # an IT Operator opens it to every user (the tab), then gives it to Designers only (the API)
    editor = world.tab.roles_editor(_req(world.ivan))
    assert editor[0]["visible"] is True and NAME in editor[1]["choices"] and "Team" in editor[2]["choices"]
    assert world.tab.roles_of(NAME, _req(world.ivan))["value"] == ["Team"]
    world.tab.save_roles(NAME, [], _req(world.ivan))
    assert NAME in _names(studio, world.bob)
    answer = _client(studio, "ivan").put(f"/api/v1/endpoints/{NAME}/allowed_roles",
                                         json={"allowed_roles": ["Designer"]})
    assert answer.status_code == 200 and answer.json()["allowed_roles"] == ["Designer"]
    assert NAME in _names(studio, world.bob) and NAME in _names(studio, world.tina)  # tina is a Designer too
    endpoints.set_allowed_roles(actor=world.ivan, name=NAME, roles=["Team"])  # Designer removed: bob loses it
    assert NAME not in _names(studio, world.bob)

    with studio.db.read() as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.action == "endpoint.allowed_roles",
                                                 AuditEvent.target == NAME).order_by(AuditEvent.id)).all()
    assert [json.loads(e.detail_json) for e in events] == [
        {"before": ["Team"], "after": []}, {"before": [], "after": ["Designer"]},
        {"before": ["Designer"], "after": ["Team"]}]
    assert {e.actor_id for e in events} == {world.ivan.id}


def test_a_deployment_naming_an_unknown_role_stores_nothing(world):
    studio = world.studio
    with pytest.raises(InvalidInput, match="'Nope'") as unknown:
        studio.endpoint_admin.deploy(actor=world.admin, request=Deployment(kind="fake", options={}, name="nope-made",
                                                                           allowed_roles=("Nope",)))
    assert unknown.value.field == "allowed_roles" and studio.jobs.endpoints.find("nope-made") is None


def _role_id(studio: Any, name: str) -> int:
    return next(i for i, n in studio.jobs.endpoints.role_names().items() if n == name)
