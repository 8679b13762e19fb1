"""Same-origin only for ambient credentials (session cookie, browser-cached Basic) and for POST /login.

Gradio's CORS middleware reflects any Origin with ``Access-Control-Allow-Credentials`` when the Host is
not localhost, so the gate must refuse a foreign Origin before Gradio (or any route) sees the request:
otherwise a page on another port or a sibling subdomain could run the Account tab's create-token handler
and read the token back from the SSE stream.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_PASSWORD
from webapp.ui.account_tab import AccountTab
from webapp.web.gate import SESSION_COOKIE

SELF = "http://testserver"
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def studio(tmp_path_factory) -> Iterator:
    import app
    from webapp.settings import Settings

    settings = Settings(data_dir=tmp_path_factory.mktemp("origin") / "data", admin_password=ADMIN_PASSWORD,
                        allowed_origins=["https://studio.example.org"], forwarded_allow_ips=["testclient"])
    built = app.build(settings)
    yield built
    built.close()


def _session(studio, base_url: str = SELF) -> TestClient:
    token, _user = studio.auth.login("admin", ADMIN_PASSWORD)
    return TestClient(studio.app, base_url=base_url, follow_redirects=False, cookies={SESSION_COOKIE: token})


def _create_token_index(studio) -> int:
    blocks: gr.Blocks = next(r.app.get_blocks() for r in studio.app.routes if getattr(r, "path", "") == "/ui")
    for index, dep in blocks.fns.items():
        if isinstance(getattr(dep.fn, "__self__", None), AccountTab) and dep.fn.__name__ == "create":
            return index
    raise AssertionError("no Gradio event bound to AccountTab.create")


def _join(client: TestClient, studio, session: str, name: str, headers: dict[str, str]):
    return client.post("/ui/gradio_api/queue/join", headers=headers, json={
        "data": [name, [], None], "fn_index": _create_token_index(studio), "session_hash": session, "event_data": None,
        "trigger_id": None,
    })


def _token_names(studio) -> list[str]:
    admin = studio.users.get_by_name("admin")
    return [t.name for t in studio.tokens.list_tokens(actor=admin)]


def test_gradio_queue_join_from_a_foreign_origin_is_refused(studio):
    with _session(studio) as c:
        joined = _join(c, studio, "evil1", "stolen", {"origin": EVIL})
        assert joined.status_code == 403, joined.text
        assert "origin" in joined.json()["detail"].lower()
        assert "access-control-allow-origin" not in joined.headers
        # Reading a cookie-authenticated response cross-origin is refused as well (the SSE stream).
        stream = c.get("/ui/gradio_api/queue/data?session_hash=evil1", headers={"origin": EVIL})
        assert stream.status_code == 403
    assert "stolen" not in _token_names(studio)


def test_gradio_queue_join_from_the_same_origin_works(studio):
    with _session(studio) as c:
        assert _join(c, studio, "same1", "mine", {"origin": SELF}).status_code == 200
        with c.stream("GET", "/ui/gradio_api/queue/data?session_hash=same1") as stream:
            for line in stream.iter_lines():
                if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                    assert json.loads(line[5:])["success"] is True
                    break
    assert "mine" in _token_names(studio)


def test_sibling_subdomain_is_not_the_same_origin(studio):
    with _session(studio, base_url="http://studio.example.com") as c:
        refused = c.post("/api/v1/tokens", json={"name": "sibling"}, headers={"origin": "http://evil.example.com"})
        assert refused.status_code == 403
        other_port = c.post("/api/v1/tokens", json={"name": "port"}, headers={"origin": "http://studio.example.com:8080"})
        assert other_port.status_code == 403
        ok = c.post("/api/v1/tokens", json={"name": "own"}, headers={"origin": "http://Studio.Example.com:80"})
        assert ok.status_code == 201
    assert "sibling" not in _token_names(studio) and "port" not in _token_names(studio)


def test_bearer_caller_with_a_foreign_origin_still_works(studio):
    with _session(studio) as c:
        token = c.post("/api/v1/tokens", json={"name": "script"}, headers={"origin": SELF}).json()["token"]
    with TestClient(studio.app, follow_redirects=False) as anonymous:
        bearer = {"authorization": f"Bearer {token}", "origin": EVIL}
        assert anonymous.get("/api/v1/me", headers=bearer).status_code == 200
        assert anonymous.post("/api/v1/tokens", json={"name": "from-bearer"}, headers=bearer).status_code == 201


def test_browser_cached_basic_credentials_are_ambient_too(studio):
    basic = "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    with TestClient(studio.app, follow_redirects=False) as c:
        assert c.get("/api/v1/me", headers={"authorization": basic}).status_code == 200  # a script: no Origin
        refused = c.post("/sdapi/v1/interrupt", headers={"authorization": basic, "origin": EVIL})
        assert refused.status_code == 403 and refused.json()["error"] == "HTTPException"


def test_login_from_a_foreign_origin_is_refused(studio):
    with TestClient(studio.app, follow_redirects=False) as c:
        form = {"username": "admin", "password": ADMIN_PASSWORD, "next": "/ui/"}
        refused = c.post("/login", data=form, headers={"origin": EVIL})
        assert refused.status_code == 403 and SESSION_COOKIE not in refused.headers.get("set-cookie", "")
        assert c.post("/login", data=form, headers={"origin": SELF}).status_code == 303


def test_logout_and_bodyless_posts_from_a_foreign_origin_are_refused(studio):
    with _session(studio) as c:
        token = c.cookies[SESSION_COOKIE]
        assert c.post("/logout", headers={"origin": EVIL}).status_code == 403
        assert c.post("/sdapi/v1/interrupt", headers={"origin": EVIL}).status_code == 403
        # No Origin, but a foreign Referer on a POST (an old browser, or a stripped Origin).
        assert c.post("/logout", headers={"referer": EVIL + "/page"}).status_code == 403
        # An opaque origin (sandboxed iframe, data: URL) is foreign too.
        assert c.post("/logout", headers={"origin": "null"}).status_code == 403
        # No Origin and no Referer, but the browser says it is a cross-site request.
        assert c.post("/logout", headers={"sec-fetch-site": "cross-site"}).status_code == 403
        assert c.post("/logout", headers={"sec-fetch-site": "same-site"}).status_code == 403
        assert studio.auth.user_for_token(token) is not None
        # curl with a cookie sends neither Origin nor Referer: allowed.
        assert c.post("/logout").status_code == 303
    assert studio.auth.user_for_token(token) is None


def test_navigations_from_other_sites_still_open_the_ui(studio):
    """A link from a chat or a wiki is a top-level GET navigation: it cannot be read back, so it is allowed."""
    with _session(studio) as c:
        page = c.get("/ui/", headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate",
                                      "referer": "https://wiki.example/links", "accept": "text/html"})
        assert page.status_code == 200
        fetched = c.get("/api/v1/me", headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"})
        assert fetched.status_code == 403
        # Framed by a sibling subdomain (which still gets the lax cookie): clickjacking, refused.
        framed = c.get("/ui/", headers={"sec-fetch-site": "same-site", "sec-fetch-mode": "navigate",
                                        "sec-fetch-dest": "iframe", "accept": "text/html"})
        assert framed.status_code == 403


def test_allowed_origins_setting_and_trusted_proxy_headers(studio):
    with _session(studio) as c:
        assert c.get("/api/v1/me", headers={"origin": "https://studio.example.org"}).status_code == 200
        # Behind a trusted proxy (the test client's address is in forwarded_allow_ips) the public origin comes
        # from X-Forwarded-Proto/Host.
        proxied = {"x-forwarded-proto": "https", "x-forwarded-host": "public.example", "origin": "https://public.example"}
        assert c.get("/api/v1/me", headers=proxied).status_code == 200
        assert c.get("/api/v1/me", headers={**proxied, "origin": SELF}).status_code == 403


def test_forwarded_headers_from_an_untrusted_peer_are_ignored(make_settings):
    import app

    studio = app.build(make_settings())
    try:
        with _session(studio) as c:
            proxied = {"x-forwarded-proto": "https", "x-forwarded-host": "public.example"}
            assert c.get("/api/v1/me", headers={**proxied, "origin": "https://public.example"}).status_code == 403
            assert c.get("/api/v1/me", headers={**proxied, "origin": SELF}).status_code == 200
    finally:
        studio.close()
