"""The sharing pickers of the Models and Datasets tabs: "Visible to" (private / everyone / roles) and "Roles",
and how a shared item's visibility reads in a table (``webapp.services.sharing`` holds the rule)."""

from __future__ import annotations

from collections.abc import Mapping

import gradio as gr

from webapp.records import Visibility
from webapp.services.sharing import names_of
from webapp.ui.context import ui_errors


def shared_with(visibility: str | None, roles: list[str] | None) -> list[str] | None:
    """The roles dropdown counts only with visibility "roles" (it is hidden otherwise and may hold old picks)."""
    return list(roles or []) if visibility == Visibility.ROLES.value else None


@ui_errors
def roles_shown(visibility: str | None) -> dict:
    """The roles dropdown is shown when "roles" is chosen."""
    return gr.update(visible=visibility == Visibility.ROLES.value)


def shown_visibility(visibility: Visibility, allowed_roles: str, names: Mapping[int, str]) -> str:
    """A table's visibility cell: "roles: Team, Design" for an item shared with roles."""
    if visibility != Visibility.ROLES:
        return visibility.value
    return f"roles: {', '.join(names_of(allowed_roles, names))}"
