"""Translate service errors into JSON responses at the HTTP edge (one log line each, no traceback), with
``detail`` in the caller's language: the signed-in user's choice, else the request's Accept-Language."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from webapp.i18n import translate
from webapp.services.errors import ServiceError
from webapp.web.gate import scope_language, scope_user

log = logging.getLogger(__name__)


def log_refusal(request: Request, status: int, message: str) -> None:
    """One line for an expected error (bad input, refused action): route, user, status and message."""
    user = getattr(scope_user(request.scope), "username", None) or "-"
    log.info("api %s %s by %s: %d %s", request.method, request.url.path, user, status, message)


def field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    """A validation error's location as the field name clients send (``request.prompt``), or ``body``."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


class EscapedJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a validation error echoes the client's input, which may hold a lone
    surrogate that UTF-8 cannot encode (Starlette's JSONResponse would fail with a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def service_error_response(exc: ServiceError, language: str = "en") -> JSONResponse:
    """``detail`` in ``language`` (``webapp.i18n``); ``error``, ``field`` and the status stay as they are."""
    body: dict = {"error": type(exc).__name__, "detail": translate(exc.message, language)}
    if exc.field:
        body["field"] = exc.field
    retry_after = getattr(exc, "retry_after", None)  # Throttled, and the daily job quotas
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        log_refusal(request, exc.status, exc.message)  # logs stay in English
        return service_error_response(exc, scope_language(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's own 422 (``detail`` lists the problems) plus ``field`` naming the first one."""
        problems = jsonable_encoder(exc.errors())
        body = {"detail": problems, "field": field_of(problems[0].get("loc", ())) if problems else "body"}
        return EscapedJSONResponse(body, status_code=422)
