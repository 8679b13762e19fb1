"""``GET``/``POST /sdapi/v1/options`` and ``/cmd-flags``.

POST accepts any subset or the whole dict back (Open WebUI); unknown and API-restricted keys are
skipped; a non-administrator's values apply to that user only. An unknown ``sd_model_checkpoint``
answers 404 naming the field with A1111's message "model 'X' not found" (A1111 itself answers 500, which
tells a client nothing about whose mistake it was).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body
from sqlalchemy.engine import make_url

from webapp.api.deps import CurrentUser
from webapp.api.sdapi.context import SdapiContext
from webapp.api.sdapi.errors import A1111Route
from webapp.settings import Settings


def _safe_database_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as nothing rather than risk a secret
        return "(unparsable)"


def cmd_flags(settings: Settings, *, admin: bool) -> dict[str, Any]:
    """The server's flags in A1111's ``cmd-flags`` spirit. Built from an allow-list, so no secret
    (admin password, provider tokens, database password) can ever appear; server paths, the bind
    address, the database URL and the store are shown to administrators only (others get A1111's
    defaults for them: None), so every caller gets the same keys."""
    flags: dict[str, Any] = {
        "listen": settings.listens_publicly, "server_name": None, "port": settings.port,
        "api": True, "nowebui": False, "api_auth": None, "gradio_auth": None,
        "data_dir": None, "models_dir": None, "database_url": None, "store": None, "log_level": settings.log_level,
        "cookie_secure": settings.cookie_secure, "session_ttl_hours": settings.session_ttl_hours,
        "skip_torch_cuda_test": True, "no_download_sd_model": True, "hide_ui_dir_config": True,
    }
    if admin:
        flags.update({
            "server_name": settings.host, "data_dir": str(settings.data_dir),
            "models_dir": str(settings.models_dir) if settings.models_dir else None,
            "database_url": _safe_database_url(settings.db_url), "store": settings.store_url.split("?", 1)[0],
        })
    return flags


def build_router(ctx: SdapiContext) -> APIRouter:
    router = APIRouter(route_class=A1111Route)

    @router.get("/options")
    def get_options(user: CurrentUser) -> dict[str, Any]:
        """Every A1111 option as the caller sees it (their values over the server defaults)."""
        return ctx.options.get(actor=user)

    @router.post("/options")
    def set_options(user: CurrentUser, body: dict[str, Any] = Body(...)) -> None:  # noqa: B008
        """Any subset or the whole dict back; administrators set server defaults, others their own values."""
        ctx.options.set(actor=user, values=body)
        return None

    @router.get("/cmd-flags")
    def get_cmd_flags(user: CurrentUser) -> dict[str, Any]:
        return cmd_flags(ctx.settings, admin=user.is_admin)

    return router
