"""Security headers on every response (pure ASGI middleware).

- ``Content-Security-Policy: frame-ancestors 'self'`` (and ``X-Frame-Options: SAMEORIGIN`` for browsers
  that predate it): no other site can frame the UI and trick a signed-in user into clicking in it.
- ``X-Content-Type-Options: nosniff``: a served file is never run as a type the server did not name.
- ``Referrer-Policy: same-origin``: URLs of the studio (job ids, file names) are not sent to other sites.

A header a route set itself is kept; otherwise these are added, on refusals (401, 403, 413) as well.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", b"frame-ancestors 'self'"),
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)


class SecurityHeaders:
    """Add ``SECURITY_HEADERS`` to every HTTP response that does not already set them."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend((name, value) for name, value in SECURITY_HEADERS if name not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
