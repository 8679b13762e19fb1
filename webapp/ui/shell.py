"""The page frame: who is signed in, Logout, and the tabs this user may see."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Protocol

import gradio as gr

from webapp.i18n import translate
from webapp.services.access import can
from webapp.ui.context import UiContext, ui_errors
from webapp.ui.localize import localize

# Logout is a POST to our own route (not Gradio's), then back to the login page.
LOGOUT_JS = """() => { fetch('/logout', {method: 'POST', credentials: 'same-origin'})
  .finally(() => { window.location.href = '/login'; }); }"""


class Tab(Protocol):
    """A tab module: ``build()`` creates its widgets and wires its events inside the page's ``gr.Tabs``."""

    permission: str | None
    """The permission a user needs to see the tab (None: every user). Hiding is cosmetic: services authorise."""

    def build(self) -> gr.Tab: ...


def build_ui(ctx: UiContext, tabs: Sequence[Tab]) -> gr.Blocks:
    with gr.Blocks(title="the studio", analytics_enabled=False) as demo:
        with gr.Row(elem_id="studio-header"):
            gr.Markdown("## the studio")
            whoami = gr.Markdown(elem_id="studio-user")
            logout = gr.Button("Logout", size="sm", scale=0, min_width=100, elem_id="logout-button")
        with gr.Tabs(elem_id="studio-tabs"):
            built = [(tab, tab.build()) for tab in tabs]
        guarded = [(tab.permission, widget) for tab, widget in built if tab.permission is not None]

        @ui_errors
        def on_load(request: gr.Request) -> list:
            user = ctx.user(request)
            language = ctx.language(request)  # ui_errors finds a tab's ctx on its method; this is a closure
            badge = translate(" · administrator", language) if user.is_admin else ""
            header = translate(f"Signed in as **{html.escape(user.username)}**", language) + badge
            return [header, *(gr.update(visible=can(user, permission)) for permission, _ in guarded)]

        demo.load(on_load, None, [whoami, *(widget for _, widget in guarded)], api_visibility="private")
        logout.click(None, js=LOGOUT_JS)
    demo.queue(default_concurrency_limit=16)
    localize(demo)  # every fixed English text → an i18n key Gradio resolves in the browser's language
    return demo
