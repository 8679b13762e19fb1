"""A1111's error shape and ``X-Process-Time`` for the ``/sdapi/v1`` routes.

A1111 answers every failure as ``{"error": "<ExceptionClass>", "detail": ..., "body": "", "errors":
"<str(e)>"}`` with the exception's status (500 when it has none), and clients (webuiapi raises
``RuntimeError(status, text)``, SillyTavern shows ``detail``) read it that way. The studio's own
``/api/v1`` keeps its ``{"error", "detail", "field"}`` shape, so the translation is scoped to these
routes through a route class instead of app-wide exception handlers. ``field`` is added to the A1111
shape so a client can tell which input was wrong.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from pipelines.errors import PipelineError
from pipelines.types import InvalidRequestError
from webapp.i18n import translate
from webapp.services.errors import ServiceError
from webapp.web.errors import field_of, log_refusal
from webapp.web.gate import scope_language

log = logging.getLogger(__name__)


class A1111Error(Exception):
    """An error answered exactly as A1111 would (class name, status, detail)."""

    def __init__(self, status: int, error: str, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.field = field


def a1111_body(error: str, detail: Any, errors: str, *, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": error, "detail": detail, "body": "", "errors": errors}
    if field:
        body["field"] = field
    return body


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """422 naming the first bad field, in A1111's shape (``errors`` lists every problem)."""
    problems = exc.errors()
    messages = [f"{field_of(p.get('loc', ()))}: {p.get('msg', 'invalid')}" for p in problems]
    field = field_of(problems[0].get("loc", ())) if problems else "body"
    detail = messages[0] if messages else "invalid request"
    return JSONResponse(a1111_body("RequestValidationError", detail, "; ".join(messages), field=field), 422)


def error_response(exc: Exception, language: str = "en") -> JSONResponse:
    """A1111's shape; ``detail`` in ``language`` when it is text (``errors`` keeps the exception's own text)."""
    def human(text: Any) -> Any:
        return translate(text, language) if isinstance(text, str) else text

    if isinstance(exc, A1111Error):
        return JSONResponse(a1111_body(exc.error, human(exc.detail), str(exc), field=exc.field), exc.status)
    if isinstance(exc, ServiceError):
        retry_after = getattr(exc, "retry_after", None)  # Throttled, and the daily job quotas
        headers = {"retry-after": str(retry_after)} if retry_after is not None else None
        return JSONResponse(a1111_body(type(exc).__name__, human(exc.message), exc.message, field=exc.field),
                            exc.status, headers=headers)
    if isinstance(exc, InvalidRequestError):
        return JSONResponse(a1111_body(type(exc).__name__, human(str(exc)), str(exc), field=exc.field), 422)
    if isinstance(exc, HTTPException):
        return JSONResponse(a1111_body("HTTPException", human(exc.detail), f"{exc.status_code}: {exc.detail}"),
                            exc.status_code, headers=exc.headers)
    if isinstance(exc, PipelineError):
        return JSONResponse(a1111_body(type(exc).__name__, str(exc), str(exc)), 500)
    log.exception("unexpected error in an A1111 API route")
    return JSONResponse(a1111_body(type(exc).__name__, "", str(exc)), 500)


class A1111Route(APIRoute):
    """Route class of the ``/sdapi/v1`` router: errors in A1111's shape, whatever raised them."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def a1111_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                response = validation_response(exc)
            except Exception as exc:  # noqa: BLE001 - every failure must reach the client in A1111's shape
                response = error_response(exc)
                if response.status_code < 500:  # expected (bad input, refused): one line, in English
                    log_refusal(request, response.status_code, json.loads(response.body).get("detail"))
                    language = scope_language(request.scope)
                    if language != "en":
                        response = error_response(exc, language)
                return response
            log_refusal(request, response.status_code, json.loads(response.body).get("detail"))
            return response

        return a1111_handler


class ProcessTimeMiddleware:
    """Pure-ASGI: ``X-Process-Time`` (seconds, as A1111 sends it) on every HTTP response.

    Installed outermost so answers of the authentication gate carry it too.
    """

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-process-time", f"{time.perf_counter() - start:.4f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)
