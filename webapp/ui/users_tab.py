"""Users tab (administrators): list, create, reset password, delete."""

from __future__ import annotations

import gradio as gr

from webapp.records import Role
from webapp.ui.account_tab import REVOKE_TOKENS_LABEL
from webapp.ui.context import UiContext, ui_errors

HEADERS = ["User", "Role", "Created (UTC)"]


def _rows(ctx: UiContext, request: gr.Request) -> list[list[str]]:
    users = ctx.users.list_users(actor=ctx.user(request))
    return [[u.username, u.role.value, u.created_at.strftime("%Y-%m-%d %H:%M")] for u in users]


def _refresh(ctx: UiContext, request: gr.Request) -> tuple:
    rows = _rows(ctx, request)
    names = [r[0] for r in rows]
    return rows, gr.update(choices=names, value=None), gr.update(choices=names, value=None)


class UsersTab:
    """Widgets and handlers; handlers are methods so tests can call them as Gradio would."""

    admin_only = True

    def __init__(self, ctx: UiContext) -> None:
        self.ctx = ctx

    @ui_errors
    def refresh(self, request: gr.Request) -> tuple:
        return _refresh(self.ctx, request)

    @ui_errors
    def create(self, username: str, password: str, role: str, request: gr.Request) -> tuple:
        user = self.ctx.users.create_user(actor=self.ctx.user(request), username=username, password=password, role=role)
        gr.Info(f"Created user {user.username}")
        return (*_refresh(self.ctx, request), "", "")

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
        return _refresh(self.ctx, request)

    def build(self) -> gr.Tab:
        with gr.Tab("Users", id="users", visible=False) as tab:
            table = gr.Dataframe(headers=HEADERS, interactive=False, label="Users", elem_id="users-table")
            refresh = gr.Button("Refresh", size="sm")
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### Create user")
                    new_name = gr.Textbox(label="User name", elem_id="new-user-name")
                    new_password = gr.Textbox(label="Password", type="password", elem_id="new-user-password")
                    new_role = gr.Radio([r.value for r in Role], value=Role.USER.value, label="Role")
                    create = gr.Button("Create user", variant="primary", elem_id="create-user")
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
        refresh.click(self.refresh, None, [table, reset_name, delete_name], api_visibility="private")
        create.click(
            self.create, [new_name, new_password, new_role], [table, reset_name, delete_name, new_name, new_password],
            api_visibility="private",
        )
        reset.click(self.reset_password, [reset_name, reset_password, revoke_tokens], [reset_password],
                    api_visibility="private")
        delete.click(self.delete, [delete_name], [table, reset_name, delete_name], api_visibility="private")
        tab.select(self.refresh, None, [table, reset_name, delete_name], api_visibility="private")
        return tab
