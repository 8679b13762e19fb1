"""Translate service errors into JSON responses at the HTTP edge."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from webapp.services.errors import ServiceError, Throttled


def service_error_response(exc: ServiceError) -> JSONResponse:
    body: dict = {"error": type(exc).__name__, "detail": exc.message}
    if exc.field:
        body["field"] = exc.field
    headers = {"retry-after": str(exc.retry_after)} if isinstance(exc, Throttled) else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc)
