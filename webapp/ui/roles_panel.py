"""The Users tab's Roles and Audit log sub-tabs: thin handlers over RoleService and AuditLog."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from webapp.services.access import ACTIONS, DESCRIPTIONS, RESOURCES, can
from webapp.services.audit import AuditFilter, AuditLog
from webapp.services.roles import QUOTA_FIELDS, QUOTA_LABELS, RoleService, RoleView
from webapp.ui.context import UiContext, ui_errors
from webapp.ui.history import parse_day

ROLE_HEADERS = ["Role", "Permissions", "Queued jobs", "Jobs / day", "GPU-s / day", "Storage (MB)", "Members",
                "Description"]
AUDIT_HEADERS = ["When (UTC)", "Who", "Action", "Target", "Details"]
AUDIT_ACTIONS = ["", "user", "role", "endpoint", "token", "options", "user.create", "user.delete", "user.roles",
                 "user.password_reset", "role.create", "role.update", "role.delete", "endpoint.deploy",
                 "endpoint.delete", "endpoint.status"]


def _limit(value: int | None) -> str:
    return "—" if value is None else str(value)


def _role_rows(views: list[RoleView]) -> list[list[Any]]:
    return [[v.name, " ".join(v.permissions), *(_limit(getattr(v, f)) for f in QUOTA_FIELDS), v.members,
             v.description] for v in views]


def _permissions(groups: tuple[list[str] | None, ...]) -> list[str]:
    """The per-resource checkbox groups as permissions (``all`` alone stands for the resource's every action)."""
    out: list[str] = []
    for resource, actions in zip(RESOURCES, groups, strict=True):
        chosen = list(actions or [])
        out.extend([f"{resource}:all"] if "all" in chosen else [f"{resource}:{a}" for a in chosen])
    return out


def _quota(value: float | None) -> int | None:
    return None if value is None or value == "" else int(value)


class RolesPanel:
    """Roles: list, create, edit (name, description, permissions, quotas), delete. Audit log: filter and read."""

    def __init__(self, ctx: UiContext, *, roles: RoleService, audit: AuditLog) -> None:
        self.ctx = ctx
        self.roles = roles
        self.audit = audit

    # -- roles -----------------------------------------------------------------------------------------------
    def _listing(self, request: gr.Request, selected: str | None = None) -> tuple:
        views = self.roles.list_roles(actor=self.ctx.user(request))
        names = [v.name for v in views]
        return _role_rows(views), gr.update(choices=["", *names], value=selected if selected in names else "")

    @ui_errors
    def refresh(self, request: gr.Request) -> tuple:
        return self._listing(request)

    @ui_errors
    def load(self, name: str | None, request: gr.Request) -> tuple:
        """The chosen role in the editor (empty choice: a blank editor for a new role)."""
        if not name:
            return ("", "", *([[]] * len(RESOURCES)), *([None] * len(QUOTA_FIELDS)))
        view = self.roles.get_role(actor=self.ctx.user(request), role=name)
        held = set(view.permissions)
        groups = [["all"] if f"{r}:all" in held else [a for a in ACTIONS if f"{r}:{a}" in held] for r in RESOURCES]
        return (view.name, view.description, *groups, *(getattr(view, f) for f in QUOTA_FIELDS))

    @ui_errors
    def create(self, name: str, description: str, *values: Any) -> tuple:
        *fields, request = values
        groups, quotas = tuple(fields[:len(RESOURCES)]), fields[len(RESOURCES):]
        view = self.roles.create_role(actor=self.ctx.user(request), name=name, description=description,
                                      permissions=_permissions(groups),
                                      **{f: _quota(q) for f, q in zip(QUOTA_FIELDS, quotas, strict=True)})
        gr.Info(f"Created role {view.name}")
        return self._listing(request, view.name)

    @ui_errors
    def save(self, selected: str | None, name: str, description: str, *values: Any) -> tuple:
        *fields, request = values
        if not selected:
            raise gr.Error("Choose the role to change (or use Create role for a new one)")
        groups, quotas = tuple(fields[:len(RESOURCES)]), fields[len(RESOURCES):]
        view = self.roles.update_role(actor=self.ctx.user(request), role=selected, name=name,
                                      description=description, permissions=_permissions(groups),
                                      **{f: _quota(q) for f, q in zip(QUOTA_FIELDS, quotas, strict=True)})
        gr.Info(f"Saved role {view.name}")
        return self._listing(request, view.name)

    @ui_errors
    def delete(self, selected: str | None, request: gr.Request) -> tuple:
        if not selected:
            raise gr.Error("Choose the role to delete")
        self.roles.delete_role(actor=self.ctx.user(request), role=selected)
        gr.Info(f"Deleted role {selected}")
        return self._listing(request)

    # -- audit log -------------------------------------------------------------------------------------------
    @ui_errors
    def search(self, who: str, action: str | None, target: str, since: str, until: str,
               request: gr.Request) -> list[list[str]]:
        where = AuditFilter(actor=(who or "").strip() or None, action=action or None,
                            target=(target or "").strip() or None, since=parse_day(since, "From"),
                            until=parse_day(until, "To", end=True))
        events = self.audit.list_events(actor=self.ctx.user(request), where=where, limit=200)
        return [[e.at.strftime("%Y-%m-%d %H:%M:%S"), e.actor_name, e.action, e.target,
                 ", ".join(f"{k}: {v}" for k, v in json.loads(e.detail_json).items())] for e in events]

    @ui_errors
    def search_on_open(self, who: str, action: str | None, target: str, since: str, until: str,
                       request: gr.Request) -> list[list[str]]:
        """Opening the sub-tab: the latest events for those who may read the log, nothing (no popup) for others."""
        if not can(self.ctx.user(request), "user:all"):
            return []
        return self.search(who, action, target, since, until, request)

    # -- layout ------------------------------------------------------------------------------------------------
    def build_roles(self) -> gr.Tab:
        with gr.Tab("Roles", id="users-roles") as tab:
            table = gr.Dataframe(headers=ROLE_HEADERS, interactive=False, label="Roles", elem_id="roles-table")
            with gr.Row():
                chosen = gr.Dropdown(label="Role to edit (empty: a new role)", choices=[""], value="",
                                     elem_id="role-chosen")
                refresh = gr.Button("Refresh", size="sm", scale=0)
            with gr.Row():
                name = gr.Textbox(label="Name", elem_id="role-name")
                description = gr.Textbox(label="Description", elem_id="role-description")
            gr.Markdown("Permissions: **all** is every action, on every user's items too; without it an action "
                        "reaches the user's own items and those shared with them.")
            groups = []
            with gr.Row():
                for resource in RESOURCES:
                    groups.append(gr.CheckboxGroup(list(ACTIONS), label=f"{resource} — {DESCRIPTIONS[resource]}",
                                                   elem_id=f"role-perm-{resource}", min_width=160))
            gr.Markdown("Quotas (empty: no limit from this role; a user gets the most generous of their roles)")
            with gr.Row():
                quotas = [gr.Number(label=QUOTA_LABELS[f], precision=0, minimum=0, value=None,
                                    elem_id=f"role-{f}") for f in QUOTA_FIELDS]
            with gr.Row():
                create = gr.Button("Create role", variant="primary", elem_id="role-create")
                save = gr.Button("Save changes", elem_id="role-save")
                delete = gr.Button("Delete role", variant="stop", elem_id="role-delete")
        editor = [name, description, *groups, *quotas]
        refresh.click(self.refresh, None, [table, chosen], api_visibility="private")
        tab.select(self.refresh, None, [table, chosen], api_visibility="private")
        chosen.change(self.load, [chosen], editor, api_visibility="private")
        create.click(self.create, editor, [table, chosen], api_visibility="private")
        save.click(self.save, [chosen, *editor], [table, chosen], api_visibility="private")
        delete.click(self.delete, [chosen], [table, chosen], api_visibility="private")
        return tab

    def build_audit(self) -> gr.Tab:
        with gr.Tab("Audit log", id="users-audit") as tab:
            with gr.Row():
                who = gr.Textbox(label="Who (user name)", elem_id="audit-who")
                action = gr.Dropdown(AUDIT_ACTIONS, value="", label="Action", allow_custom_value=True,
                                     elem_id="audit-action")
                target = gr.Textbox(label="Target contains", elem_id="audit-target")
                since = gr.Textbox(label="From", placeholder="2026-12-01", elem_id="audit-since")
                until = gr.Textbox(label="To", placeholder="2026-12-31", elem_id="audit-until")
            search = gr.Button("Search", elem_id="audit-search")
            table = gr.Dataframe(headers=AUDIT_HEADERS, interactive=False, label="Audit log", elem_id="audit-table",
                                 wrap=True)
        inputs = [who, action, target, since, until]
        search.click(self.search, inputs, [table], api_visibility="private")
        tab.select(self.search_on_open, inputs, [table], api_visibility="private")
        return tab
