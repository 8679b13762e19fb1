"""Our own login page (form post -> session cookie) and logout."""

from __future__ import annotations

import html
from importlib import resources
from string import Template
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from webapp.i18n import translate
from webapp.services.auth import AuthService
from webapp.services.errors import NotAuthenticated, Throttled
from webapp.web.gate import SESSION_COOKIE, client_address, scope_language, scope_user

UI_PATH = "/ui/"
_PAGE = Template(resources.files("webapp.web").joinpath("templates/login.html").read_text(encoding="utf-8"))


def safe_next(target: str | None) -> str:
    """Only same-site relative paths: ``//evil.example`` or ``https://...`` would be an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return UI_PATH
    return target


def _page(*, error: str | None = None, username: str = "", next_path: str = UI_PATH, status: int = 200) -> HTMLResponse:
    block = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    body = _PAGE.substitute(error_block=block, username=html.escape(username), next=html.escape(next_path))
    return HTMLResponse(body, status_code=status, headers={"cache-control": "no-store"})


def build_login_router(auth: AuthService, *, secure_cookie: bool) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse(UI_PATH, status_code=303)

    @router.get("/login", include_in_schema=False)
    def login_page(request: Request, next: str | None = None) -> Response:  # noqa: A002 - query name
        if scope_user(request.scope) is not None:
            return RedirectResponse(safe_next(next), status_code=303)
        return _page(next_path=safe_next(next))

    @router.post("/login", include_in_schema=False)
    def login_submit(
        request: Request,
        username: Annotated[str, Form()] = "",
        password: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = UI_PATH,  # noqa: A002 - form field name
    ) -> Response:
        target = safe_next(next)
        try:
            token, _user = auth.login(
                username, password, client_address=client_address(request.scope),
                user_agent=request.headers.get("user-agent"),
            )
        except Throttled as exc:
            error = translate(exc.message, scope_language(request.scope))
            response = _page(error=error, username=username, next_path=target, status=429)
            response.headers["retry-after"] = str(exc.retry_after)
            return response
        except NotAuthenticated as exc:
            error = translate(exc.message, scope_language(request.scope))
            return _page(error=error, username=username, next_path=target, status=401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE, token, max_age=int(auth.session_ttl.total_seconds()), httponly=True,
            samesite="lax", secure=secure_cookie, path="/",
        )
        return response

    # POST only: a GET would let any other site log our users out with a link or an <img> (the session
    # cookie is SameSite=lax, which still travels on cross-site top-level GET navigations).
    @router.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        auth.logout(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    return router
