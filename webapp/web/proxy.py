"""Reverse-proxy headers, trusted only from configured peers (``forwarded_allow_ips``).

The client address (login throttle, session records) and the public origin (the gate's same-origin
check) must not come from headers any client can send. uvicorn's ``ProxyHeadersMiddleware`` already
rewrites the client and scheme from ``X-Forwarded-For``/``-Proto`` for trusted peers; this adds
``X-Forwarded-Host`` on the same terms, and runs inside the app so every ASGI server (and the tests)
applies the same rule. ``app.py`` therefore turns uvicorn's own copy off: its default trusts 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware


class ForwardedHeaders(ProxyHeadersMiddleware):
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            if client and client[0] in self.trusted_hosts:  # checked before the parent replaces the client
                forwarded = [value for key, value in scope["headers"] if key == b"x-forwarded-host"]
                if forwarded:
                    host = forwarded[0].split(b",")[0].strip()  # the first proxy saw the browser's Host
                    scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", host)]
        await super().__call__(scope, receive, send)
