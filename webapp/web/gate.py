"""Authentication gate (pure ASGI middleware): every route needs a logged-in user, except the login page.

Identity comes from the session cookie (browsers) or an ``Authorization`` header (scripts: HTTP Basic
with the user's own login, or ``Bearer <token>`` with a personal API token). The user is put in the
ASGI scope under ``studio.user`` for the routes, the API dependencies and Gradio's ``auth_dependency``.

A scoped API token (``webapp.services.tokens``) acts as its owner narrowed to its scopes; it is for the APIs
only and is refused on the Gradio UI's paths, whose handlers look the user up by name (``UiContext.user``) and
would act with the owner's every permission.

Every request except a Bearer one must come from the server's own origin (``origin.OriginPolicy``):
browsers attach cookies and cached Basic credentials to requests other pages start, never a Bearer
token, so that one check covers every route, the login form (login CSRF) and Gradio's queue alike.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

import anyio

from webapp.i18n import language_for, translate
from webapp.records import User
from webapp.services.auth import AuthService
from webapp.services.errors import NotAuthenticated, Throttled
from webapp.web.origin import OriginPolicy

log = logging.getLogger(__name__)

SESSION_COOKIE = "studio_session"
SCOPE_USER = "studio.user"
SCOPE_TOKEN_EXPIRY = "studio.token_expires_at"  # set when the caller used an API token that expires
PUBLIC_PATHS = frozenset({"/login", "/favicon.ico"})
# Paths whose clients are scripts: they get a Basic challenge instead of a redirect to the login page.
API_PREFIXES = ("/sdapi/", "/api/", "/internal/", "/controlnet/", "/agent-scheduler/", "/docs", "/openapi.json",
                "/redoc")

# Identification does blocking work (a database read; argon2 on a Basic cache miss), so it runs in
# worker threads, on a limiter of its own: requests that hold threads for long (an A1111 txt2img
# waiting for its job) must never starve authentication of the next request.
_IDENTIFY_LIMITER_TOKENS = 16

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def scope_user(scope: Scope) -> User | None:
    return scope.get(SCOPE_USER)


def scope_token_expiry(scope: Scope) -> datetime | None:
    """When the API token the caller used expires (None: no token, or one that does not expire)."""
    return scope.get(SCOPE_TOKEN_EXPIRY)


def scope_language(scope: Scope) -> str:
    """The language to answer a request in: the signed-in user's choice, else its ``Accept-Language``; English
    when neither asks for another (scripts and A1111 clients send no Accept-Language)."""
    user = scope_user(scope)
    return language_for(getattr(user, "language", None), _header(scope, b"accept-language"))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _cookie(scope: Scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _scheme(scope: Scope) -> str | None:
    """The ``Authorization`` scheme in lower case (``basic``, ``bearer``), or None without one."""
    authorization = _header(scope, b"authorization")
    return authorization.partition(" ")[0].lower() if authorization else None


def client_address(scope: Scope) -> str | None:
    """The peer's address; ``web.proxy.ForwardedHeaders`` has replaced it with X-Forwarded-For's client
    when (and only when) the peer is a trusted proxy."""
    client = scope.get("client")
    return client[0] if client else None


class AuthGate:
    def __init__(self, app: Callable, auth: AuthService, origins: OriginPolicy | None = None,
                 ui_path: str = "/ui") -> None:
        self.app = app
        self.auth = auth
        self.origins = origins or OriginPolicy()
        self.ui_path = ui_path.rstrip("/")
        self._limiters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if _scheme(scope) != "bearer":
            reason = self.origins.refusal(scope)
            if reason is not None:
                log.warning("refused %s %s: %s", scope.get("method", "websocket"), path, reason)
                await self._refuse(scope, send, path, 403, reason)
                return
        loop = asyncio.get_running_loop()
        limiter = self._limiters.get(loop)
        if limiter is None:
            limiter = self._limiters[loop] = anyio.CapacityLimiter(_IDENTIFY_LIMITER_TOKENS)
        try:
            user, scopes, token_expiry = await anyio.to_thread.run_sync(self._identify, scope, limiter=limiter)
        except Throttled as exc:
            await self._reply(send, 429, {"detail": translate(exc.message, scope_language(scope))},
                              [(b"retry-after", str(exc.retry_after).encode())])
            return
        except NotAuthenticated as exc:
            await self._deny(scope, send, path, exc.message)
            return
        if user is None and path not in PUBLIC_PATHS:
            await self._deny(scope, send, path, "Not authenticated")
            return
        if scopes is not None and (path == self.ui_path or path.startswith(self.ui_path + "/")):
            log.warning("refused %s %s: scoped API token of %s", scope.get("method", "websocket"), path, user.username)
            await self._refuse(scope, send, path, 403, "a scoped API token is for the APIs only, not the UI "
                               f"({self.ui_path}/), whose handlers would act with the owner's every permission")
            return
        scope[SCOPE_USER] = user
        if token_expiry is not None:
            scope[SCOPE_TOKEN_EXPIRY] = token_expiry
        await self.app(scope, receive, send)

    def _identify(self, scope: Scope) -> tuple[User | None, frozenset[str] | None, datetime | None]:
        """The caller; for a scoped API token its scopes (None: the user's own permissions); for an API token
        its expiry (None: none, or no token)."""
        authorization = _header(scope, b"authorization")
        if authorization:
            _, _, value = authorization.partition(" ")
            if _scheme(scope) == "basic":
                return self._basic(value.strip(), scope), None, None
            if _scheme(scope) == "bearer":
                identity = self.auth.identify_api_token(value.strip())
                if identity is None:
                    raise NotAuthenticated("Invalid or revoked API token")
                return identity.user, identity.scopes, identity.expires_at
        return self.auth.user_for_token(_cookie(scope, SESSION_COOKIE)), None, None

    def _basic(self, value: str, scope: Scope) -> User:
        try:
            username, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise NotAuthenticated("Malformed Basic credentials") from None
        if not sep:
            raise NotAuthenticated("Malformed Basic credentials")
        return self.auth.verify_basic(username, password, client_address=client_address(scope))

    async def _deny(self, scope: Scope, send: Send, path: str, message: str) -> None:
        is_api = path.startswith(API_PREFIXES)
        accept = _header(scope, b"accept") or ""
        if not is_api and scope.get("method") == "GET" and "text/html" in accept:
            query = scope.get("query_string", b"").decode("latin-1")
            target = path + (f"?{query}" if query else "")
            location = "/login" if target in ("", "/") else f"/login?next={quote(target, safe='')}"
            await send({"type": "http.response.start", "status": 303, "headers": [(b"location", location.encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [(b"www-authenticate", b'Basic realm="studio"')] if is_api else []
        await self._refuse(scope, send, path, 401, message, headers)

    async def _refuse(
        self, scope: Scope, send: Send, path: str, status: int, message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4000 + status})
            return
        detail = translate(message, scope_language(scope))  # no user yet: the request's Accept-Language
        body: dict[str, Any] = {"detail": detail}
        if path.startswith(("/sdapi/", "/internal/")):  # A1111 clients parse its error shape (a1111-api.md §1)
            body = {"error": "HTTPException", "detail": detail, "body": "", "errors": f"{status}: {message}"}
        await self._reply(send, status, body, headers or [])

    @staticmethod
    async def _reply(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]]) -> None:
        payload = json.dumps(body).encode()
        await send({
            "type": "http.response.start", "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers],
        })
        await send({"type": "http.response.body", "body": payload})
