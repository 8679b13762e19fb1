"""The page frame: who is signed in, Logout, and the tabs this user may see."""

from __future__ import annotations

import html

import gradio as gr

from webapp.ui.context import UiContext
from webapp.ui.users_tab import UsersTab

CSS = """
#studio-header { align-items: center; }
#studio-user { text-align: right; }
"""

# Logout is a POST to our own route (not Gradio's), then back to the login page.
LOGOUT_JS = """() => { fetch('/logout', {method: 'POST', credentials: 'same-origin'})
  .finally(() => { window.location.href = '/login'; }); }"""


def build_ui(ctx: UiContext) -> gr.Blocks:
    users_tab = UsersTab(ctx)
    with gr.Blocks(title="the studio", analytics_enabled=False) as demo:
        with gr.Row(elem_id="studio-header"):
            gr.Markdown("## the studio")
            whoami = gr.Markdown(elem_id="studio-user")
            logout = gr.Button("Logout", size="sm", scale=0, elem_id="logout-button")
        with gr.Tabs(elem_id="studio-tabs"):
            users = users_tab.build()

        def on_load(request: gr.Request) -> tuple:
            user = ctx.user(request)
            badge = " · administrator" if user.is_admin else ""
            return f"Signed in as **{html.escape(user.username)}**{badge}", gr.update(visible=user.is_admin)

        demo.load(on_load, None, [whoami, users], api_visibility="private")
        logout.click(None, js=LOGOUT_JS)
    demo.queue(default_concurrency_limit=16)
    return demo
