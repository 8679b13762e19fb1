"""The Users tab's Roles and Audit log sub-tabs, called as Gradio calls them: what an admin changes, what other
users are refused, and that a refused change stores nothing."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

from webapp.services.access import RESOURCES
from webapp.ui.context import UiContext
from webapp.ui.roles_panel import RolesPanel
from webapp.ui.users_tab import UsersTab

PASSWORD = "a-long-enough-password"
NO_PERMISSIONS = [[]] * len(RESOURCES)
NO_QUOTAS = [None] * 4


def request(name: str) -> SimpleNamespace:
    return SimpleNamespace(username=name, headers={})


@pytest.fixture
def panel(studio):
    return RolesPanel(UiContext(users=studio.users), roles=studio.roles, audit=studio.audit)


def _groups(**chosen: list[str]) -> list[list[str]]:
    return [chosen.get(r, []) for r in RESOURCES]


def test_admin_creates_edits_and_deletes_a_role(studio, panel):
    rows, _ = panel.create("Reviewers", "look, don't touch", *_groups(model=["list"], inference=["all"]),
                           5, None, 3600, None, request("admin"))
    row = next(r for r in rows if r[0] == "Reviewers")
    assert row[1] == "model:list inference:all" and row[2] == "5" and row[4] == "3600"
    loaded = panel.load("Reviewers", request("admin"))
    assert loaded[0] == "Reviewers" and loaded[2 + RESOURCES.index("inference")] == ["all"]
    panel.save("Reviewers", "Reviewers", "now with datasets", *_groups(dataset=["list", "use"]), *NO_QUOTAS,
               request("admin"))
    view = studio.roles.get_role(actor=studio.users.get_by_name("admin"), role="Reviewers")
    assert view.permissions == ["dataset:list", "dataset:use"] and view.max_queued_jobs is None
    panel.delete("Reviewers", request("admin"))
    assert "Reviewers" not in studio.roles.role_names().values()
    events = panel.search("admin", "role", "", "", "", request("admin"))
    assert [e[2] for e in events] == ["role.delete", "role.update", "role.create"]


def test_other_users_are_refused_and_nothing_changes(studio, panel):
    admin = studio.users.get_by_name("admin")
    studio.users.create_user(actor=admin, username="dora", password=PASSWORD)                       # Designer
    studio.users.create_user(actor=admin, username="olga", password=PASSWORD, roles=["IT Operator"])
    with pytest.raises(gr.Error, match="role:list"):
        panel.refresh(request("dora"))
    with pytest.raises(gr.Error, match="role:create"):
        panel.create("Mine", "", *_groups(endpoint=["all"]), *NO_QUOTAS, request("olga"))
    with pytest.raises(gr.Error, match="role:update"):
        panel.save("Designer", "Designer", "", *_groups(endpoint=["all"]), *NO_QUOTAS, request("dora"))
    with pytest.raises(gr.Error, match="role:delete"):
        panel.delete("Admin", request("olga"))
    with pytest.raises(gr.Error, match="user:all"):
        panel.search("", "", "", "", "", request("olga"))
    assert panel.search_on_open("", "", "", "", "", request("olga")) == [], "opening the sub-tab: no popup"
    assert set(studio.roles.role_names().values()) == {"Admin", "Designer", "IT Operator"}
    assert studio.roles.get_role(actor=admin, role="Designer").permissions[0] != "endpoint:all"

    tab = UsersTab(UiContext(users=studio.users), roles=studio.roles, audit=studio.audit)
    with pytest.raises(gr.Error, match="user:update"):
        tab.set_roles("dora", ["Admin"], request("olga"))
    assert studio.roles.roles_of([studio.users.get_by_name("dora").id]) == {
        studio.users.get_by_name("dora").id: ["Designer"]}
    rows, = tab.set_roles("dora", ["Designer", "IT Operator"], request("admin"))
    assert next(r[:2] for r in rows if r[0] == "dora") == ["dora", "Designer, IT Operator"]


def test_bad_input_names_the_problem(studio, panel):
    with pytest.raises(gr.Error, match="name"):
        panel.create("", "", *NO_PERMISSIONS, *NO_QUOTAS, request("admin"))
    with pytest.raises(gr.Error, match="Choose the role"):
        panel.save("", "x", "", *NO_PERMISSIONS, *NO_QUOTAS, request("admin"))
    with pytest.raises(gr.Error, match="From"):
        panel.search("", "", "", "yesterday", "", request("admin"))
    with pytest.raises(gr.Error, match="last administrator"):
        panel.save("Admin", "Admin", "", *_groups(model=["all"]), *NO_QUOTAS, request("admin"))
