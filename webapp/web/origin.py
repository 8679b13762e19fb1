"""Same-origin check for requests that carry ambient credentials.

Browsers attach the session cookie (and Basic credentials they cached after a ``WWW-Authenticate``
prompt) to requests that other pages start. SameSite=lax stops cross-site sub-requests but not
*same-site* ones (a sibling subdomain, another port of the host), and Gradio's CORS middleware reflects
any Origin with ``Access-Control-Allow-Credentials`` when the Host is not localhost. So the gate refuses
every request with ambient credentials whose origin is not the server's own, whatever the method: a
foreign page can then neither change state nor read an answer (the Gradio SSE stream included).

How the origin is judged (OWASP CSRF cheat sheet, "Verifying origin with standard headers"; Fetch
Metadata, https://www.w3.org/TR/fetch-metadata/):

1. ``Origin`` when present (browsers send it on every CORS request and every non-GET request); ``null``
   (sandboxed frames, ``data:`` pages) is foreign.
2. Else, for a state-changing method, the ``Referer``'s origin.
3. Else ``Sec-Fetch-Site``: ``cross-site`` or ``same-site`` is refused, except a top-level GET navigation
   (a link from a chat or a wiki: the other site cannot read the page it opens).
4. Else (curl with a cookie, an old browser's same-origin GET) the request is allowed.

The server's own origin is the request's scheme and ``Host`` header; behind a reverse proxy the
``ForwardedHeaders`` middleware rewrites both from ``X-Forwarded-Proto``/``-Host`` when the peer is
trusted (``forwarded_allow_ips``), and ``allowed_origins`` names extra origins.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
_WS_SCHEMES = {"ws": "http", "wss": "https"}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Navigations that render in a frame inside another site's page can be clickjacked: not exempt.
_FRAME_DESTINATIONS = frozenset({"iframe", "frame", "embed", "object"})


def normalize_origin(value: str, *, allow_path: bool = False) -> str | None:
    """``scheme://host:port`` in lower case with the default port filled in, or None if not an origin."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = _WS_SCHEMES.get(parts.scheme.lower(), parts.scheme.lower())
    host = parts.hostname
    if scheme not in DEFAULT_PORTS or not host or parts.username is not None or parts.password is not None:
        return None
    if not allow_path and (parts.path not in ("", "/") or parts.query or parts.fragment):
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or DEFAULT_PORTS[scheme]}"


def _headers(scope: dict[str, Any]) -> dict[bytes, str]:
    found: dict[bytes, str] = {}
    for key, value in scope.get("headers", []):
        found.setdefault(key, value.decode("latin-1"))
    return found


class OriginPolicy:
    """Decides whether a request with ambient credentials comes from the server's own origin."""

    def __init__(self, allowed_origins: Iterable[str] = ()) -> None:
        origins = list(allowed_origins)
        allowed = {normalize_origin(origin) for origin in origins}
        if None in allowed:
            raise ValueError(f"allowed origins must be scheme://host[:port], got {origins}")
        self._allowed = frozenset(o for o in allowed if o is not None)

    @staticmethod
    def own_origin(scope: dict[str, Any]) -> str | None:
        host = _headers(scope).get(b"host")
        return normalize_origin(f"{scope.get('scheme', 'http')}://{host}") if host else None

    def refusal(self, scope: dict[str, Any]) -> str | None:
        """Why the request must be refused as cross-origin, or None when it may proceed."""
        headers = _headers(scope)
        method = scope.get("method", "GET").upper()  # a websocket handshake is a GET
        claimed, source = headers.get(b"origin"), "Origin"
        if claimed is None and method not in SAFE_METHODS and headers.get(b"referer"):
            claimed, source = headers[b"referer"], "Referer"
        if claimed is not None:
            origin = normalize_origin(claimed, allow_path=source == "Referer")
            own = self.own_origin(scope)
            if origin is not None and (origin == own or origin in self._allowed):
                return None
            return (f"cross-origin request refused: {source} {claimed[:200]!r} is not this server's origin "
                    f"({own or 'unknown: no Host header'}); behind a reverse proxy an administrator sets "
                    "forwarded_allow_ips to the proxy's address, or adds the public origin to allowed_origins")
        site = headers.get(b"sec-fetch-site")
        if site in ("cross-site", "same-site"):
            navigation = (method in ("GET", "HEAD") and headers.get(b"sec-fetch-mode") == "navigate"
                          and headers.get(b"sec-fetch-dest") not in _FRAME_DESTINATIONS)
            if not navigation:
                return f"cross-site request refused (Sec-Fetch-Site: {site})"
        return None
