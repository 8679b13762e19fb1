"""The ASGI application: login routes, APIs and the Gradio UI on one FastAPI app behind the gate."""

from __future__ import annotations

from collections.abc import Iterable

import gradio as gr
from fastapi import APIRouter, FastAPI, Request

from webapp.services.auth import AuthService
from webapp.ui.files import guard_uploads
from webapp.web.docs import install_docs
from webapp.web.errors import install_error_handlers
from webapp.web.gate import AuthGate, scope_user
from webapp.web.limits import BodySizeLimit
from webapp.web.login import UI_PATH, build_login_router
from webapp.web.origin import OriginPolicy
from webapp.web.proxy import ForwardedHeaders

# Routes that take large bodies and bound them themselves (see webapp/web/limits.py).
BODY_LIMIT_EXEMPT = (("PUT", "/api/v1/uploads/"), ("POST", UI_PATH.rstrip("/") + "/gradio_api/upload"))


def gradio_user(request: Request) -> str | None:
    """Gradio's ``auth_dependency``: the gate has already identified the caller."""
    user = scope_user(request.scope)
    return user.username if user is not None else None


def create_app(
    *, auth: AuthService, ui: gr.Blocks, secure_cookie: bool = False, routers: Iterable[APIRouter] = (),
    allowed_origins: Iterable[str] = (), forwarded_allow_ips: list[str] | None = None,
    max_body_bytes: int | None = None,
) -> FastAPI:
    app = FastAPI(title="the studio", version="0.1.0", docs_url=None, redoc_url=None)
    install_docs(app)  # self-hosted Swagger UI (no CDN)
    install_error_handlers(app)
    app.include_router(build_login_router(auth, secure_cookie=secure_cookie))
    for router in routers:
        app.include_router(router)
    gr.mount_gradio_app(
        app, ui, path=UI_PATH.rstrip("/"), auth_dependency=gradio_user, footer_links=[], ssr_mode=False,
    )
    guard_uploads(ui)  # handlers get uploaded files only, never a server path a client names
    app.add_middleware(AuthGate, auth=auth, origins=OriginPolicy(allowed_origins))
    app.add_middleware(ForwardedHeaders, trusted_hosts=forwarded_allow_ips or [])  # before the gate reads them
    if max_body_bytes is not None:  # outside the gate: an oversized body is refused before anything else
        app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, exempt=BODY_LIMIT_EXEMPT)
    return app
