"""Request body size limit (pure ASGI middleware): 413 naming ``body`` before a large body is read.

A declared ``Content-Length`` over the limit is answered at once, without reading anything. Bodies sent
without one (chunked transfer) are counted as the route reads them; once the count passes the limit the
route's reading fails, and whatever the route would have answered is replaced by the same 413.

Routes that legitimately take more are exempt and limit themselves: the chunked model upload
(``PUT /api/v1/uploads/{id}``, bounded by ``max_upload_gb`` and the declared size) and Gradio's file
upload route (bounded by the UI's own upload limit).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# A1111 clients parse its error shape (a1111-api.md §1), as the gate answers them.
_A1111_PREFIXES = ("/sdapi/", "/internal/")


class BodyTooLarge(Exception):  # noqa: N818 - raised into the route's body read, never seen by clients
    """The request body passed the limit while the route was reading it."""


class BodySizeLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413, except on the ``exempt`` routes.

    ``exempt`` holds ``(method, path prefix)`` pairs.
    """

    def __init__(self, app: Callable, *, max_bytes: int, exempt: Iterable[tuple[str, str]] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = tuple(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_exempt(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, send)
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the route's own answer to the failed read; ours is sent below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise  # a failure of its own; one caused by the refused read is answered below
        if exceeded and not started:
            await self._refuse(scope, send)

    def _is_exempt(self, scope: Scope) -> bool:
        method, path = scope.get("method", ""), scope.get("path", "")
        return any(method == m and path.startswith(prefix) for m, prefix in self.exempt)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        limit = self.max_bytes / 2**20
        message = f"the request body is larger than the server's limit of {limit:g} MB (STUDIO_MAX_BODY_MB)"
        body: dict[str, Any] = {"error": "RequestTooLarge", "detail": message, "field": "body"}
        if scope.get("path", "").startswith(_A1111_PREFIXES):
            body = {"error": "RequestTooLarge", "detail": message, "body": "", "errors": f"413: {message}",
                    "field": "body"}
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
