"""What UI handlers get: the services they call and who is asking.

Gradio exposes every event handler over HTTP, so hiding a tab is cosmetic: each handler resolves the
user from the request and the service authorises the action.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import gradio as gr

from webapp.records import User
from webapp.services.errors import ServiceError
from webapp.services.users import UserService

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class UiContext:
    users: UserService

    def user(self, request: gr.Request | None) -> User:
        """The signed-in user behind a Gradio event (set by our auth_dependency)."""
        username = getattr(request, "username", None) if request is not None else None
        user = self.users.get_by_name(username) if username else None
        if user is None:
            raise gr.Error("You are not signed in (or your account was removed). Reload the page.")
        return user


def ui_errors(fn: F) -> F:
    """Turn service errors into ``gr.Error`` popups naming the problem."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except ServiceError as exc:
                raise gr.Error(exc.message) from exc
        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ServiceError as exc:
            raise gr.Error(exc.message) from exc
    return wrapper  # type: ignore[return-value]
