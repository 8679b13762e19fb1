"""What UI handlers get: the services they call and who is asking.

Gradio exposes every event handler over HTTP, so hiding a tab is cosmetic: each handler resolves the
user from the request and the service authorises the action.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import gradio as gr

from webapp.i18n import language_for, translate, use_language
from webapp.records import User
from webapp.services.errors import ServiceError
from webapp.services.users import UserService

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UiContext:
    users: UserService

    def language(self, request: gr.Request | None) -> str:
        """The language to answer ``request`` in: the user's choice, else the browser's (Accept-Language)."""
        username = getattr(request, "username", None) if request is not None else None
        user = self.users.get_by_name(username) if username else None
        headers = getattr(request, "headers", None) or {}
        return language_for(user.language if user is not None else None, headers.get("accept-language"))

    def user(self, request: gr.Request | None) -> User:
        """The signed-in user behind a Gradio event (set by our auth_dependency)."""
        username = getattr(request, "username", None) if request is not None else None
        user = self.users.get_by_name(username) if username else None
        if user is None:
            raise gr.Error("You are not signed in (or your account was removed). Reload the page.")
        return user


def _expected(fn: Callable[..., Any], args: tuple, kwargs: dict, exc: ServiceError | gr.Error) -> gr.Error:
    """One log line for an expected error (bad input, refused action) and the popup without Gradio's
    console traceback; unexpected exceptions are not handled here and keep theirs."""
    request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)
    user = getattr(request, "username", None) or "-"
    error = exc if isinstance(exc, gr.Error) else gr.Error(exc.message)
    log.info("ui %s by %s: %s", fn.__qualname__, user, error.message)  # logs stay in English
    error.message = translate(error.message)
    error.print_exception = False
    return error


def _language(args: tuple, kwargs: dict) -> str | None:
    """The language of the handler's caller: its tab's ``ctx`` (the user's choice, else Accept-Language)."""
    request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)
    ctx = getattr(args[0], "ctx", None) if args else None
    if request is None or not isinstance(ctx, UiContext):
        return None
    try:
        return ctx.language(request)
    except Exception:  # noqa: BLE001 - a language lookup must never fail the handler itself
        log.debug("no language for %s", getattr(request, "username", None), exc_info=True)
        return None


def ui_errors(fn: F) -> F:
    """Turn service errors into ``gr.Error`` popups naming the problem, each logged as one line; run the
    handler in its caller's language (``webapp.i18n.current_language``), which its messages use."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
            language = _language(args, kwargs)
            steps = fn(*args, **kwargs)
            while True:  # each step in the language: Gradio may run the steps in different threads
                with use_language(language):
                    try:
                        item = next(steps)
                    except StopIteration as done:
                        return done.value
                    except (ServiceError, gr.Error) as exc:
                        raise _expected(fn, args, kwargs, exc) from None
                yield item
        gen_wrapper.__ui_errors__ = True  # type: ignore[attr-defined]
        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with use_language(_language(args, kwargs)):
            try:
                return fn(*args, **kwargs)
            except (ServiceError, gr.Error) as exc:
                raise _expected(fn, args, kwargs, exc) from None
    wrapper.__ui_errors__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def is_ui_errors_wrapped(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` (a function or bound method) was decorated with ``ui_errors``."""
    return bool(getattr(fn, "__ui_errors__", False))
