"""The history's curl example names the address the proxy-resolved request has, never a header any client sends.

``X-Forwarded-Host``/``-Proto`` count only from ``forwarded_allow_ips`` peers (``ForwardedHeaders``); the
curl URL follows the same rule by reading the request's own scheme and host.
"""

from __future__ import annotations

import gradio as gr
from starlette.requests import Request

from tests.live import run_async
from webapp.ui.history import base_url
from webapp.web.proxy import ForwardedHeaders

HEADERS = [(b"host", b"studio.lan:7860"), (b"x-forwarded-host", b"evil.example"), (b"x-forwarded-proto", b"https")]


def _resolved(peer: str, trusted: list[str]) -> gr.Request:
    seen: list[Request] = []

    async def app(scope, receive, send) -> None:
        seen.append(Request(scope))

    scope = {"type": "http", "scheme": "http", "method": "POST", "path": "/ui/gradio_api/queue/join",
             "raw_path": b"/ui/gradio_api/queue/join", "query_string": b"", "root_path": "",
             "headers": list(HEADERS), "client": (peer, 50000), "server": ("studio.lan", 7860)}
    run_async(ForwardedHeaders(app, trusted_hosts=trusted)(scope, None, None))
    return gr.Request(request=seen[0])


def test_forwarded_headers_from_an_untrusted_peer_are_ignored():
    assert base_url(_resolved("10.0.0.9", trusted=["10.0.0.1"])) == "http://studio.lan:7860"


def test_forwarded_headers_from_the_trusted_proxy_are_used():
    assert base_url(_resolved("10.0.0.1", trusted=["10.0.0.1"])) == "https://evil.example"


def test_no_request_gives_the_local_default():
    assert base_url(None) == "http://127.0.0.1:7860"
