"""A1111-compatible ``/sdapi/v1`` on the studio's own port, over the same services as the UI.

Clients written for A1111 (webuiapi, SillyTavern, Open WebUI, LibreChat, plain scripts) work
unchanged with each user's own credentials (HTTP Basic, or a personal ``Bearer`` token); every
generation goes through ``JobService``. See each module for the routes of one area.
"""

from __future__ import annotations

from fastapi import APIRouter

from webapp.api.sdapi import generation, listings, misc, options, progress
from webapp.api.sdapi.context import SdapiContext
from webapp.api.sdapi.errors import ProcessTimeMiddleware

PREFIX = "/sdapi/v1"


def build_routers(ctx: SdapiContext) -> list[APIRouter]:
    """The ``/sdapi/v1`` router and A1111's ``/internal/progress``."""
    api = APIRouter(prefix=PREFIX, tags=["A1111 API (/sdapi/v1)"])
    for module in (generation, options, listings, progress, misc):
        api.include_router(module.build_router(ctx))
    return [api, progress.build_internal_router(ctx)]


__all__ = ["PREFIX", "ProcessTimeMiddleware", "SdapiContext", "build_routers"]
