"""The ASGI application: login routes, APIs and the Gradio UI on one FastAPI app behind the gate."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from fastapi import APIRouter, FastAPI, Request

from webapp.services.auth import AuthService
from webapp.ui.files import guard_uploads
from webapp.web.docs import install_docs
from webapp.web.errors import install_error_handlers
from webapp.web.gate import AuthGate, scope_user
from webapp.web.headers import SecurityHeaders
from webapp.web.language import UiLanguage
from webapp.web.lazy_ui import LazyUi
from webapp.web.limits import BodySizeLimit
from webapp.web.login import UI_PATH, build_login_router
from webapp.web.metrics import MetricsAccess, MetricsScrape, build_metrics_router
from webapp.web.origin import OriginPolicy
from webapp.web.proxy import ForwardedHeaders

# Routes that take large bodies and bound them themselves (see webapp/web/limits.py).
BODY_LIMIT_EXEMPT = (("PUT", "/api/v1/uploads/"), ("POST", UI_PATH.rstrip("/") + "/gradio_api/upload"))


def gradio_user(request: Request) -> str | None:
    """Gradio's ``auth_dependency``: the gate has already identified the caller."""
    user = scope_user(request.scope)
    return user.username if user is not None else None


@dataclass(frozen=True)
class UiUploads:
    """Gradio's upload route: the largest file it takes and how old its kept files may get."""

    max_bytes: int
    max_age_seconds: float

    @property
    def delete_cache(self) -> tuple[float, float]:
        """Gradio's ``(frequency, age)``: look at least hourly, and as often as the age itself when shorter."""
        return min(self.max_age_seconds, 3600.0), self.max_age_seconds


def use_gradio_temp_dir(folder: Path) -> Path:
    """Make ``folder`` (under the data dir: one per instance) Gradio's cache, emptied first.

    Gradio reads ``GRADIO_TEMP_DIR`` wherever it stores an upload or checks that a path is one, so it is
    set for the process before the UI is built. Gradio's own cleaner knows only the files of this run;
    whatever an earlier run left (a crash skips its shutdown clean-up) is removed here.
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


def create_app(
    *, auth: AuthService, ui: Callable[[], gr.Blocks], secure_cookie: bool = False,
    routers: Iterable[APIRouter] = (),
    allowed_origins: Iterable[str] = (), forwarded_allow_ips: list[str] | None = None,
    max_body_bytes: int | None = None,
    uploads: UiUploads | None = None,
    metrics: MetricsAccess | None = None,
) -> FastAPI:
    """The studio's app; ``ui`` builds the Gradio page, on first use (``app.state.ui``: see webapp/web/lazy_ui.py)."""

    def mount(host: FastAPI, page: gr.Blocks) -> None:
        if uploads is not None:
            # Gradio's cleaner is a Blocks setting (``delete_cache``) that App.create_app reads when it is mounted.
            page.delete_cache = uploads.delete_cache
        gr.mount_gradio_app(
            host, page, path=UI_PATH.rstrip("/"), auth_dependency=gradio_user, footer_links=[], ssr_mode=False,
            max_file_size=uploads.max_bytes if uploads is not None else None,
            i18n=getattr(page, "i18n_instance", None),  # set by webapp.ui.localize
        )
        guard_uploads(page)  # handlers get uploaded files only, never a server path a client names

    lazy_ui = LazyUi(ui, mount, UI_PATH.rstrip("/"))
    app = FastAPI(title="the studio", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lazy_ui.lifespan)
    app.state.ui = lazy_ui
    install_docs(app)  # self-hosted Swagger UI (no CDN)
    install_error_handlers(app)
    app.include_router(build_login_router(auth, secure_cookie=secure_cookie))
    for router in routers:
        app.include_router(router)
    if metrics is not None:
        app.include_router(build_metrics_router(metrics))
    app.mount(UI_PATH.rstrip("/"), lazy_ui)
    app.add_middleware(UiLanguage, path=UI_PATH)  # inside the gate: it reads the signed-in user's language
    app.add_middleware(AuthGate, auth=auth, origins=OriginPolicy(allowed_origins), ui_path=UI_PATH)
    if metrics is not None and metrics.token is not None:  # just outside the gate: the scraper is no user
        app.add_middleware(MetricsScrape, access=metrics)
    app.add_middleware(ForwardedHeaders, trusted_hosts=forwarded_allow_ips or [])  # before the gate reads them
    if max_body_bytes is not None:  # outside the gate: an oversized body is refused before anything else
        app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, exempt=BODY_LIMIT_EXEMPT)
    app.add_middleware(SecurityHeaders)  # outermost: refusals carry the headers too
    return app
