"""Users tab (``user:*``): list, create with roles, change roles, reset password, delete."""

from __future__ import annotations

import gradio as gr

from webapp.services.audit import AuditLog
from webapp.services.roles import RoleService
from webapp.ui.account_tab import REVOKE_TOKENS_LABEL
from webapp.ui.context import UiContext, ui_errors
from webapp.ui.roles_panel import RolesPanel

HEADERS = ["User", "Roles", "Created (UTC)"]


def _rows(ctx: UiContext, request: gr.Request) -> list[list[str]]:
    users = ctx.users.list_users(actor=ctx.user(request))
    return [[u.username, ", ".join(u.roles), u.created_at.strftime("%Y-%m-%d %H:%M")] for u in users]


class UsersTab:
    """Widgets and handlers; handlers are methods so tests can call them as Gradio would."""

    permission: str | None = "user:list"

    def __init__(self, ctx: UiContext, *, roles: RoleService, audit: AuditLog | None = None) -> None:
        self.ctx = ctx
        self.roles = roles
        self.panel = RolesPanel(ctx, roles=roles, audit=audit) if audit is not None else None

    def _refresh(self, request: gr.Request) -> tuple:
        rows = _rows(self.ctx, request)
        names = [r[0] for r in rows]
        role_names = sorted(self.roles.role_names().values())
        return (rows, gr.update(choices=names, value=None), gr.update(choices=names, value=None),
                gr.update(choices=names, value=None), gr.update(choices=role_names), gr.update(choices=role_names))

    @ui_errors
    def refresh(self, request: gr.Request) -> tuple:
        return self._refresh(request)

    @ui_errors
    def create(self, username: str, password: str, roles: list[str] | None, request: gr.Request) -> tuple:
        user = self.ctx.users.create_user(actor=self.ctx.user(request), username=username, password=password,
                                          roles=list(roles) if roles else None)
        gr.Info(f"Created user {user.username}")
        return (*self._refresh(request), "", "")

    @ui_errors
    def member_roles(self, username: str | None, request: gr.Request) -> dict:
        """The chosen user's roles, to edit."""
        if not username:
            return gr.update(value=[])
        users = {u.username: u for u in self.ctx.users.list_users(actor=self.ctx.user(request))}
        return gr.update(value=users[username].roles if username in users else [])

    @ui_errors
    def set_roles(self, username: str | None, roles: list[str] | None, request: gr.Request) -> tuple:
        if not username:
            raise gr.Error("Choose the user whose roles to change")
        names = self.roles.set_user_roles(actor=self.ctx.user(request), username=username, roles=list(roles or []))
        gr.Info(f"Roles of {username}: {', '.join(names) or 'none'}")
        return (_rows(self.ctx, request),)

    @ui_errors
    def reset_password(
        self, username: str | None, password: str, request: gr.Request, revoke_tokens: bool = True,
    ) -> tuple:
        if not username:
            raise gr.Error("Choose the user whose password to reset")
        self.ctx.users.reset_password(actor=self.ctx.user(request), username=username, new_password=password,
                                      revoke_tokens=bool(revoke_tokens))
        tokens = "their API tokens were revoked" if revoke_tokens else "their API tokens still work"
        gr.Info(f"Password of {username} reset; their sessions were ended and {tokens}")
        return ("",)

    @ui_errors
    def delete(self, username: str | None, request: gr.Request) -> tuple:
        if not username:
            raise gr.Error("Choose the user to delete")
        self.ctx.users.delete_user(actor=self.ctx.user(request), username=username)
        gr.Info(f"Deleted user {username}")
        return self._refresh(request)

    def build(self) -> gr.Tab:
        with gr.Tab("Users", id="users", visible=False) as tab, gr.Tabs(elem_id="users-subtabs"):
            with gr.Tab("Accounts", id="users-accounts") as accounts:
                outputs = self._build_accounts()
            if self.panel is not None:
                self.panel.build_roles()
                self.panel.build_audit()
        gr.on([tab.select, accounts.select], self.refresh, None, outputs, api_visibility="private")
        return tab

    def _build_accounts(self) -> list:
        table = gr.Dataframe(headers=HEADERS, interactive=False, label="Users", elem_id="users-table")
        refresh = gr.Button("Refresh", size="sm")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Create user")
                new_name = gr.Textbox(label="User name", elem_id="new-user-name")
                new_password = gr.Textbox(label="Password", type="password", elem_id="new-user-password")
                new_roles = gr.Dropdown(label="Roles (empty: Designer)", choices=[], multiselect=True,
                                        allow_custom_value=True, elem_id="new-user-roles")
                create = gr.Button("Create user", variant="primary", elem_id="create-user")
            with gr.Column():
                gr.Markdown("### Roles")
                roles_name = gr.Dropdown(label="User", choices=[], elem_id="roles-user")
                roles_value = gr.Dropdown(label="Roles", choices=[], multiselect=True, allow_custom_value=True,
                                          elem_id="roles-value")
                save_roles = gr.Button("Save roles", elem_id="save-roles")
            with gr.Column():
                gr.Markdown("### Reset password")
                reset_name = gr.Dropdown(label="User", choices=[])
                reset_password = gr.Textbox(label="New password", type="password")
                revoke_tokens = gr.Checkbox(value=True, label=REVOKE_TOKENS_LABEL)
                reset = gr.Button("Reset password")
            with gr.Column():
                gr.Markdown("### Delete user")
                delete_name = gr.Dropdown(label="User", choices=[])
                delete = gr.Button("Delete user", variant="stop")
        outputs = [table, reset_name, delete_name, roles_name, new_roles, roles_value]
        refresh.click(self.refresh, None, outputs, api_visibility="private")
        create.click(self.create, [new_name, new_password, new_roles], [*outputs, new_name, new_password],
                     api_visibility="private")
        roles_name.change(self.member_roles, [roles_name], [roles_value], api_visibility="private")
        save_roles.click(self.set_roles, [roles_name, roles_value], [table], api_visibility="private")
        reset.click(self.reset_password, [reset_name, reset_password, revoke_tokens], [reset_password],
                    api_visibility="private")
        delete.click(self.delete, [delete_name], outputs, api_visibility="private")
        return outputs
