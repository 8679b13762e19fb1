"""The UI page in the signed-in user's language.

Gradio's frontend picks its language from ``navigator.language`` when it boots, before it injects a Blocks'
``head`` (tried in chromium: a ``head`` script runs too late). So this middleware, just inside the gate, edits the
``/ui/`` page itself: it sets the ``studio_lang`` cookie from the user's choice (deleted when they have none) and
puts a script first in ``<head>`` that makes ``navigator.language(s)`` report the cookie's language, or, without
one, the first of the browser's languages the studio speaks (any Chinese → ``zh-CN``, as the server's
``webapp.i18n.negotiate`` does). The login page reads the same cookie (``webapp/web/login.py``).
"""

from __future__ import annotations

from http.cookies import SimpleCookie

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webapp.i18n import LANGUAGES
from webapp.web.gate import scope_user

LANGUAGE_COOKIE = "studio_lang"
COOKIE_MAX_AGE = 400 * 24 * 3600  # the longest browsers keep a cookie

NAVIGATOR_SCRIPT = """<script>(function () {
  var known = {"en": "en", "zh": "zh-CN", "ja": "ja"};
  var m = document.cookie.match(/(?:^|;\\s*)studio_lang=([^;]*)/);
  var lang = m ? decodeURIComponent(m[1]) : null;
  if (!lang) {
    var asked = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language];
    for (var i = 0; i < asked.length && !lang; i++) {
      lang = known[String(asked[i] || "").toLowerCase().split("-")[0]] || null;
    }
  }
  if (!lang) return;
  var nav = Object.getPrototypeOf(navigator);
  Object.defineProperty(nav, "language", {get: function () { return lang; }, configurable: true});
  Object.defineProperty(nav, "languages", {get: function () { return [lang]; }, configurable: true});
  document.documentElement.lang = lang;
})();</script>"""


def language_cookie(language: str | None) -> str:
    """The ``Set-Cookie`` value that records ``language`` (None: forget it)."""
    cookie: SimpleCookie = SimpleCookie()
    cookie[LANGUAGE_COOKIE] = language if language in LANGUAGES else ""
    morsel = cookie[LANGUAGE_COOKIE]
    morsel["path"] = "/"
    morsel["samesite"] = "Lax"
    morsel["max-age"] = COOKIE_MAX_AGE if language in LANGUAGES else 0
    if language not in LANGUAGES:
        morsel["expires"] = "Thu, 01 Jan 1970 00:00:00 GMT"
    return morsel.OutputString()


class UiLanguage:
    """Pure ASGI: on GET of the UI page (``path``), the language cookie and the navigator script."""

    def __init__(self, app: ASGIApp, *, path: str) -> None:
        self.app = app
        self.paths = {path.rstrip("/"), path.rstrip("/") + "/"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        user = scope_user(scope)
        cookie = language_cookie(user.language if user is not None else None).encode("latin-1")
        start: Message | None = None
        body: list[bytes] = []

        async def send_edited(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            content = b"".join(body)
            html_page = any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers)
            if html_page and start["status"] == 200:
                content = content.replace(b"<head>", b"<head>" + NAVIGATOR_SCRIPT.encode(), 1)
            headers += [(b"content-length", str(len(content)).encode()), (b"set-cookie", cookie)]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": content})

        await self.app(scope, receive, send_edited)
