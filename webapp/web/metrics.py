"""``GET /metrics`` (Prometheus text format): for administrators, or for a scraper holding the metrics token.

A scraper is no user, so its token is not an API token: ``MetricsScrape`` sits just outside the
authentication gate and answers ``/metrics`` itself when the request carries ``Authorization: Bearer
<metrics token>`` (compared in constant time). Everything else goes on to the gate as usual, and the
route then serves administrators only: another signed-in user gets 403, an anonymous caller the gate's
401, and a wrong token the gate's 401 for an unknown API token. The token opens ``/metrics`` and nothing
else: on any other path it is just an unknown bearer token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Response
from pydantic import SecretStr

from webapp.api.deps import CurrentUser
from webapp.services.errors import PermissionDenied
from webapp.services.metrics import CONTENT_TYPE

METRICS_PATH = "/metrics"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


@dataclass(frozen=True)
class MetricsAccess:
    """What create_app needs to serve ``/metrics``: the exposition and the optional scrape token."""

    render: Callable[[], bytes]
    token: SecretStr | None = None
    content_type: str = CONTENT_TYPE


def build_metrics_router(access: MetricsAccess) -> APIRouter:
    router = APIRouter()

    @router.get(METRICS_PATH, include_in_schema=False)
    def metrics(user: CurrentUser) -> Response:
        if not user.is_admin:
            raise PermissionDenied("only administrators (or a scraper with the metrics token) can read /metrics")
        return Response(access.render(), media_type=access.content_type)

    return router


def _digest(token: str) -> bytes:
    """Digests have one length, so the comparison says nothing about the token's length either."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _bearer(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class MetricsScrape:
    """Pure ASGI: serve ``GET /metrics`` to the metrics token's holder; pass everything else on."""

    def __init__(self, app: Callable, access: MetricsAccess) -> None:
        self.app = app
        self.access = access
        self._digest = _digest(access.token.get_secret_value()) if access.token is not None else None

    def _holds_token(self, scope: Scope) -> bool:
        if self._digest is None or scope["type"] != "http" or scope.get("path") != METRICS_PATH:
            return False
        offered = _bearer(scope)
        return offered is not None and hmac.compare_digest(_digest(offered), self._digest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._holds_token(scope) or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        body = await anyio.to_thread.run_sync(self.access.render)  # the gauges read the database
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", self.access.content_type.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body if scope.get("method") == "GET" else b""})
