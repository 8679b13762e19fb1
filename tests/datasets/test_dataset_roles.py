"""Datasets and the roles: creating needs dataset:create, sharing and renaming dataset:update, deleting
dataset:delete (on the dataset: its owner, or dataset:all); visibility "roles" shares a dataset with the users of
its allowed roles — in the service, the Datasets tab's handlers (called as Gradio calls them) and the API."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest
from gradio.utils import get_upload_folder

from tests.datasets.conftest import USER_PASSWORD, admin_of, http_as, png, row_count, stored
from webapp.records import Visibility
from webapp.services.errors import InvalidInput, NotFound, PermissionDenied
from webapp.ui.context import UiContext
from webapp.ui.datasets_tab import HEADERS, DatasetsTab


def _user(studio: Any, name: str, *roles: str) -> Any:
    return studio.users.create_user(actor=admin_of(studio), username=name, password=USER_PASSWORD,
                                    roles=list(roles) or None)


def _req(user: Any) -> SimpleNamespace:
    return SimpleNamespace(username=user.username)


def _files() -> list[tuple[str, bytes]]:
    return [("a.png", png()), ("a.txt", b"a red square")]


def _uploaded() -> list[str]:
    """The files where Gradio keeps uploads (the tab's handlers read nothing else)."""
    folder = Path(get_upload_folder()) / f"test-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    for name, data in _files():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name, _ in _files()]


@pytest.fixture
def world(dstudio) -> SimpleNamespace:
    """Team may list datasets; alice (Designer) owns them, tina is in Team as well, bob is a Designer only, vic may
    only look (Viewer: dataset:list)."""
    admin = admin_of(dstudio)
    dstudio.roles.create_role(actor=admin, name="Team", permissions=["dataset:list"])
    dstudio.roles.create_role(actor=admin, name="Viewer", permissions=["dataset:list"])
    return SimpleNamespace(
        studio=dstudio, admin=admin, alice=_user(dstudio, "alice"), tina=_user(dstudio, "tina", "Designer", "Team"),
        bob=_user(dstudio, "bob"), vic=_user(dstudio, "vic", "Viewer"),
        tab=DatasetsTab(UiContext(users=dstudio.users), dstudio.datasets, max_file_bytes=1 << 20),
    )


def test_a_dataset_shared_with_a_role_is_seen_by_its_members_only(world):
    datasets = world.studio.datasets
    dataset = datasets.create(actor=world.alice, name="squares", files=_files(), visibility="roles",
                              allowed_roles=["Team"]).dataset
    for who, sees in ((world.alice, True), (world.tina, True), (world.admin, True), (world.bob, False),
                      (world.vic, False)):
        assert [d.id for d in datasets.list_datasets(actor=who)] == ([dataset.id] if sees else []), who
    with pytest.raises(NotFound):
        datasets.get(actor=world.bob, dataset_id=dataset.id)
    assert http_as(world.studio, "bob").get(f"/api/v1/datasets/{dataset.id}").status_code == 404
    item = http_as(world.studio, "tina").get(f"/api/v1/datasets/{dataset.id}").json()
    assert (item["visibility"], item["allowed_roles"], item["can_manage"]) == ("roles", ["Team"], False)
    rows = world.tab.refresh(_req(world.tina))[0]
    assert [(r[0], r[HEADERS.index("Visible to")]) for r in rows] == [("squares", "roles: Team")]
    shared, roles = world.tab.sharing_of(dataset.id, _req(world.alice))
    assert shared == "roles" and roles["value"] == ["Team"] and roles["visible"] is True

    # seeing is not changing: a Team member cannot share it further
    with pytest.raises(PermissionDenied, match="dataset:all"):
        datasets.update(actor=world.tina, dataset_id=dataset.id, allowed_roles=["Team", "Designer"])

    # the owner adds Designer (the tab's Sharing row), then removes Team (the API): tina loses it, bob keeps it
    world.tab.share(dataset.id, "roles", ["Team", "Designer"], _req(world.alice))
    assert [d.id for d in datasets.list_datasets(actor=world.bob)] == [dataset.id]
    assert [d.id for d in datasets.list_datasets(actor=world.vic)] == []
    answer = http_as(world.studio, "alice").patch(f"/api/v1/datasets/{dataset.id}",
                                                  json={"allowed_roles": ["Designer"]})
    assert answer.status_code == 200 and answer.json()["allowed_roles"] == ["Designer"]
    datasets.update(actor=world.alice, dataset_id=dataset.id, allowed_roles=["Team"])
    assert datasets.list_datasets(actor=world.bob) == []
    assert [d.id for d in datasets.list_datasets(actor=world.tina)] == [dataset.id]
    private = datasets.update(actor=world.alice, dataset_id=dataset.id, visibility="private")
    assert (private.visibility, private.allowed_roles) == (Visibility.PRIVATE, "")
    assert datasets.list_datasets(actor=world.tina) == []


def test_sharing_is_checked_and_a_refusal_stores_nothing(world):
    datasets, studio = world.studio.datasets, world.studio
    with pytest.raises(InvalidInput, match="'Nope'") as unknown:
        datasets.create(actor=world.alice, name="x", files=_files(), visibility="roles", allowed_roles=["Nope"])
    assert unknown.value.field == "allowed_roles"
    with pytest.raises(InvalidInput, match="only with visibility 'roles'"):
        datasets.create(actor=world.alice, name="x", files=_files(), visibility="private", allowed_roles=["Team"])
    with pytest.raises(gr.Error, match="at least one role"):
        world.tab.create_dataset("x", 1, "roles", [], _uploaded(), None, _req(world.alice))
    answer = http_as(studio, "alice").post("/api/v1/datasets", data={"name": "x", "visibility": "roles",
                                                                     "allowed_roles": "Team,Nope"},
                                           files=[("files", ("a.png", png(), "image/png"))])
    assert answer.status_code == 422 and "Nope" in answer.text
    assert row_count(studio) == (0, 0) and stored(studio) == []

    created = http_as(studio, "alice").post("/api/v1/datasets", data={"name": "x", "visibility": "roles",
                                                                      "allowed_roles": "Team"},
                                            files=[("files", ("a.png", png(), "image/png"))])
    assert created.status_code == 201 and created.json()["allowed_roles"] == ["Team"]


def test_creating_changing_and_deleting_need_their_permission_everywhere(world):
    datasets, studio = world.studio.datasets, world.studio
    with pytest.raises(PermissionDenied, match="lacks the permission dataset:create"):
        datasets.create(actor=world.vic, name="v", files=_files())
    with pytest.raises(gr.Error, match="lacks the permission dataset:create"):
        world.tab.create_dataset("v", 1, "private", [], _uploaded(), None, _req(world.vic))
    refused = http_as(studio, "vic").post("/api/v1/datasets", data={"name": "v"},
                                          files=[("files", ("a.png", png(), "image/png"))])
    assert refused.status_code == 403
    assert row_count(studio) == (0, 0) and stored(studio) == []

    dataset = datasets.create(actor=world.alice, name="open", files=_files(), visibility="everyone").dataset
    keys = stored(studio)
    with pytest.raises(PermissionDenied, match="dataset:all"):
        datasets.delete(actor=world.bob, dataset_id=dataset.id)
    with pytest.raises(gr.Error, match="dataset:all"):
        world.tab.delete_dataset(dataset.id, _req(world.bob))
    with pytest.raises(gr.Error, match="dataset:all"):
        world.tab.share(dataset.id, "private", [], _req(world.bob))
    bob = http_as(studio, "bob")
    assert bob.delete(f"/api/v1/datasets/{dataset.id}").status_code == 403
    assert bob.patch(f"/api/v1/datasets/{dataset.id}", json={"name": "bobs"}).status_code == 403
    kept = datasets.get(actor=world.alice, dataset_id=dataset.id)
    assert (kept.name, kept.visibility) == ("open", Visibility.EVERYONE) and stored(studio) == keys

    # the owner needs dataset:delete too; dataset:all reaches anyone's
    studio.roles.create_role(actor=world.admin, name="Keeper", permissions=["dataset:list", "dataset:create",
                                                                            "dataset:update"])
    kim = _user(studio, "kim", "Keeper")
    own = datasets.create(actor=kim, name="kims", files=_files()).dataset
    with pytest.raises(PermissionDenied, match="lacks the permission dataset:delete"):
        datasets.delete(actor=kim, dataset_id=own.id)
    assert datasets.get(actor=kim, dataset_id=own.id).id == own.id
    datasets.delete(actor=world.admin, dataset_id=dataset.id)
    assert row_count(studio)[0] == 1
