"""Translate service errors into JSON responses at the HTTP edge (one log line each, no traceback)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from webapp.services.errors import ServiceError, Throttled
from webapp.web.gate import scope_user

log = logging.getLogger(__name__)


def log_refusal(request: Request, status: int, message: str) -> None:
    """One line for an expected error (bad input, refused action): route, user, status and message."""
    user = getattr(scope_user(request.scope), "username", None) or "-"
    log.info("api %s %s by %s: %d %s", request.method, request.url.path, user, status, message)


def service_error_response(exc: ServiceError) -> JSONResponse:
    body: dict = {"error": type(exc).__name__, "detail": exc.message}
    if exc.field:
        body["field"] = exc.field
    headers = {"retry-after": str(exc.retry_after)} if isinstance(exc, Throttled) else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        log_refusal(request, exc.status, exc.message)
        return service_error_response(exc)
