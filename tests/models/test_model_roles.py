"""Models and the roles: importing needs model:create, changing model:update, deleting model:delete (on the
model: its owner, or model:all); visibility "roles" shares a model with the users of its allowed roles — in the
registry, the Models tab's handlers (called as Gradio calls them), /api/v1/models and A1111's listings."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest
from fastapi.testclient import TestClient
from sqlmodel import func, select

from tests.conftest import login
from tests.models.conftest import USER_PASSWORD, admin_of
from webapp.records import ModelRecord, UploadSession, Visibility
from webapp.services.errors import InvalidInput, NotFound, PermissionDenied
from webapp.ui.context import UiContext
from webapp.ui.models_tab import ALL, HEADERS, ModelsTab


def _user(studio: Any, name: str, *roles: str) -> Any:
    return studio.users.create_user(actor=admin_of(studio), username=name, password=USER_PASSWORD,
                                    roles=list(roles) or None)


def _client(studio: Any, name: str) -> TestClient:
    client = TestClient(studio.app, follow_redirects=False)
    login(client, name, USER_PASSWORD)
    return client


def _counts(studio: Any) -> tuple[int, int]:
    with studio.db.read() as s:
        return (s.exec(select(func.count()).select_from(ModelRecord)).one(),
                s.exec(select(func.count()).select_from(UploadSession)).one())


def _req(user: Any) -> SimpleNamespace:
    return SimpleNamespace(username=user.username)


@pytest.fixture
def world(mstudio) -> SimpleNamespace:
    """Role Team (it may list and use models); olivia owns models (Designer), alice is in Team as well, bob is only
    a Designer, ivan an IT Operator (model:all), vic may only look (Viewer: model:list/use)."""
    admin = admin_of(mstudio)
    mstudio.roles.create_role(actor=admin, name="Team", permissions=["model:list", "model:use"])
    mstudio.roles.create_role(actor=admin, name="Viewer", permissions=["model:list", "model:use"])
    return SimpleNamespace(
        studio=mstudio, admin=admin, olivia=_user(mstudio, "olivia"), alice=_user(mstudio, "alice", "Designer", "Team"),
        bob=_user(mstudio, "bob"), ivan=_user(mstudio, "ivan", "IT Operator"), vic=_user(mstudio, "vic", "Viewer"),
        tab=ModelsTab(UiContext(users=mstudio.users), mstudio.model_services),
    )


def test_a_model_shared_with_a_role_is_seen_and_found_by_its_members_only(world, tiny):
    studio, registry = world.studio, world.studio.models
    record = registry.register_file(actor=world.olivia, path=tiny.lora, visibility="roles", allowed_roles=["Team"])
    assert (record.visibility, record.allowed_roles) == (Visibility.ROLES, f",{_role_id(studio, 'Team')},")

    for who, sees in ((world.olivia, True), (world.alice, True), (world.ivan, True), (world.bob, False),
                      (world.vic, False)):
        assert [r.id for r in registry.list_models(actor=who, type="lora")] == ([record.id] if sees else []), who
        assert (registry.find(actor=who, type="lora", ref=record.name) is not None) is sees
    with pytest.raises(NotFound):
        registry.get(actor=world.bob, model_id=record.id)

    # the same answer in A1111's listing, /api/v1/models (allowed roles by name) and the tab
    assert [m["name"] for m in _client(studio, "alice").get("/sdapi/v1/loras").json()] == [record.name]
    assert _client(studio, "bob").get("/sdapi/v1/loras").json() == []
    item = _client(studio, "alice").get(f"/api/v1/models/{record.id}").json()
    assert (item["visibility"], item["allowed_roles"]) == ("roles", ["Team"])
    assert _client(studio, "bob").get(f"/api/v1/models/{record.id}").status_code == 404
    rows = world.tab.refresh(ALL, ALL, ALL, "", _req(world.alice))[0]
    assert [(r[0], r[HEADERS.index("Visibility")]) for r in rows] == [(record.name, "roles: Team")]
    assert world.tab.refresh(ALL, ALL, ALL, "", _req(world.bob))[0] == []
    shown = world.tab.show(record.id, _req(world.olivia))
    assert shown[3] == "roles" and shown[4]["value"] == ["Team"] and shown[4]["visible"] is True

    # the owner opens it to Designers too (through the tab), then takes Team away again: alice loses it
    world.tab.save(record.id, record.name, "", "roles", ["Team", "Designer"], _req(world.olivia))
    assert registry.find(actor=world.bob, type="lora", ref=record.name) is not None
    patched = _client(studio, "olivia").patch(f"/api/v1/models/{record.id}", json={"allowed_roles": ["Designer"]})
    assert patched.status_code == 200 and patched.json()["allowed_roles"] == ["Designer"]
    assert registry.find(actor=world.vic, type="lora", ref=record.name) is None
    assert [m["name"] for m in _client(studio, "bob").get("/sdapi/v1/loras").json()] == [record.name]
    registry.update(actor=world.olivia, model_id=record.id, allowed_roles=["Team"])
    assert registry.find(actor=world.bob, type="lora", ref=record.name) is None
    assert _client(studio, "bob").get("/sdapi/v1/loras").json() == []

    # another visibility forgets the roles
    private = registry.update(actor=world.olivia, model_id=record.id, visibility="private")
    assert (private.visibility, private.allowed_roles) == (Visibility.PRIVATE, "")
    assert registry.find(actor=world.alice, type="lora", ref=record.name) is None


def test_sharing_is_checked_and_a_refusal_changes_nothing(world, tiny):
    studio, registry = world.studio, world.studio.models
    before = _counts(studio)
    with pytest.raises(InvalidInput, match="'Nope'") as unknown:
        registry.register_file(actor=world.olivia, path=tiny.lora, visibility="roles", allowed_roles=["Team", "Nope"])
    assert unknown.value.field == "allowed_roles"
    with pytest.raises(InvalidInput, match="only with visibility 'roles'") as mixed:
        studio.model_services.uploads.create(actor=world.olivia, file_name="x.safetensors", size=10, type="lora",
                                             visibility="everyone", allowed_roles=["Team"])
    assert mixed.value.field == "allowed_roles"
    with pytest.raises(InvalidInput, match="at least one role") as empty:
        studio.model_services.uploads.create(actor=world.olivia, file_name="x.safetensors", size=10, type="lora",
                                             visibility="roles")
    assert empty.value.field == "allowed_roles"
    answer = _client(studio, "olivia").post("/api/v1/uploads", json={
        "file_name": "x.safetensors", "size": 10, "type": "lora", "visibility": "roles", "allowed_roles": ["Nope"]})
    assert answer.status_code == 422 and "Nope" in answer.text
    assert _counts(studio) == before

    record = registry.register_file(actor=world.olivia, path=tiny.lora, visibility="roles", allowed_roles=["Team"])
    with pytest.raises(InvalidInput, match="at least one role"):
        registry.update(actor=world.olivia, model_id=record.id, visibility="roles", allowed_roles=[])
    with pytest.raises(InvalidInput, match="only with visibility 'roles'"):
        registry.update(actor=world.olivia, model_id=record.id, visibility="everyone", allowed_roles=["Team"])
    with pytest.raises(gr.Error, match="Nope"):
        world.tab.save(record.id, "renamed", "", "roles", ["Nope"], _req(world.olivia))
    kept = registry.get(actor=world.olivia, model_id=record.id)
    assert (kept.name, kept.visibility, kept.allowed_roles) == (record.name, Visibility.ROLES, record.allowed_roles)
    # the tab sends its (hidden) roles only with visibility "roles"
    world.tab.save(record.id, record.name, "", "everyone", ["Team"], _req(world.olivia))
    assert registry.get(actor=world.olivia, model_id=record.id).visibility == Visibility.EVERYONE


def test_importing_needs_model_create_everywhere(world, tiny):
    studio, vic = world.studio, world.vic
    before = _counts(studio)
    with pytest.raises(PermissionDenied, match="model:create"):
        studio.models.register_file(actor=vic, path=tiny.lora)
    with pytest.raises(PermissionDenied, match="model:create"):
        studio.model_services.uploads.create(actor=vic, file_name="x.safetensors", size=10, type="lora")
    with pytest.raises(PermissionDenied, match="model:create"):
        studio.model_services.urls.start(actor=vic, urls="https://example.com/x.safetensors", declared_type="lora")
    with pytest.raises(gr.Error, match="lacks the permission model:create"):
        list(world.tab.import_urls("https://example.com/x.safetensors", "lora", "", "everyone", [], _req(vic)))
    client = _client(studio, "vic")
    assert client.post("/api/v1/uploads", json={"file_name": "x.safetensors", "size": 10,
                                                "type": "lora"}).status_code == 403
    assert client.post("/api/v1/models/import/url", json={"urls": "https://example.com/x.safetensors",
                                                          "type": "lora"}).status_code == 403
    assert _counts(studio) == before
    assert studio.model_services.tasks.list_tasks(actor=world.admin) == []


def test_a_designer_cannot_change_or_delete_anothers_model_but_an_it_operator_can(world, tiny):
    studio, registry = world.studio, world.studio.models
    record = registry.register_file(actor=world.olivia, path=tiny.lora)  # everyone sees it
    assert registry.find(actor=world.bob, type="lora", ref=record.name) is not None
    with pytest.raises(PermissionDenied, match="model:all"):
        registry.delete(actor=world.bob, model_id=record.id)
    with pytest.raises(PermissionDenied, match="model:all"):
        registry.update(actor=world.bob, model_id=record.id, visibility="private")
    with pytest.raises(gr.Error, match="model:all"):
        world.tab.delete(record.id, _req(world.bob))
    with pytest.raises(gr.Error, match="model:all"):
        world.tab.save(record.id, "mine-now", "", "roles", ["Designer"], _req(world.bob))
    bob = _client(studio, "bob")
    assert bob.delete(f"/api/v1/models/{record.id}").status_code == 403
    assert bob.patch(f"/api/v1/models/{record.id}", json={"name": "mine-now"}).status_code == 403
    assert bob.request("DELETE", "/api/v1/checkpoints",
                       json={"checkpoint_id_list": [record.id]}).status_code == 403
    kept = registry.get(actor=world.olivia, model_id=record.id)
    assert (kept.name, kept.visibility, kept.allowed_roles) == (record.name, Visibility.EVERYONE, "")

    # changing needs model:update and deleting model:delete, even on one's own model
    studio.roles.create_role(actor=world.admin, name="Curator", permissions=["model:list", "model:create",
                                                                             "model:update"])
    carla = _user(studio, "carla", "Curator")
    own = registry.register_file(actor=carla, path=tiny.lora2)
    assert registry.update(actor=carla, model_id=own.id, description="kept").description == "kept"
    with pytest.raises(PermissionDenied, match="lacks the permission model:delete"):
        registry.delete(actor=carla, model_id=own.id)
    assert registry.get(actor=carla, model_id=own.id).id == own.id

    registry.delete(actor=world.ivan, model_id=record.id)
    with pytest.raises(NotFound):
        registry.get(actor=world.admin, model_id=record.id)


def _role_id(studio: Any, name: str) -> int:
    return next(i for i, n in studio.models.role_names().items() if n == name)
