"""Every route needs a login; sessions, logout, Basic auth and the failed-login rate limit."""

from __future__ import annotations

import base64
import re

from fastapi.testclient import TestClient
from starlette.routing import Mount, Route, WebSocketRoute

from tests.conftest import ADMIN_PASSWORD, login
from webapp.web.gate import PUBLIC_PATHS, SESSION_COOKIE


def _concrete_paths(routes, prefix: str = "") -> list[tuple[str, set[str]]]:
    found: list[tuple[str, set[str]]] = []
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's lazily included APIRouter
        if included is not None:
            found += _concrete_paths(included.routes, prefix + route.include_context.prefix)
        elif isinstance(route, Mount):
            found += _concrete_paths(route.routes, prefix + route.path)
            found.append((prefix + route.path + "/", {"GET"}))
        elif isinstance(route, (Route, WebSocketRoute)):
            path = re.sub(r"\{[^}]+\}", "x", prefix + route.path)
            methods = set(getattr(route, "methods", None) or {"GET"}) - {"HEAD"}
            found.append((path, methods))
    return found


def test_every_route_requires_login(studio, client):
    paths = _concrete_paths(studio.app.routes)
    assert len(paths) > 30, "expected the UI, login and API routes to be enumerated"
    checked = 0
    for path, methods in paths:
        if path in PUBLIC_PATHS or path == "/":
            continue
        for method in methods:
            response = client.request(method, path)
            assert response.status_code == 401, f"{method} {path} answered {response.status_code} without login"
            checked += 1
    # A browser navigation is sent to the login page instead, remembering where it wanted to go.
    page = client.get("/ui/", headers={"accept": "text/html"})
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Fui%2F"
    assert client.get("/", headers={"accept": "text/html"}).headers["location"] == "/login"
    assert checked > 30


def test_files_and_static_urls_need_login(client):
    for path in ("/ui/gradio_api/file=/etc/passwd", "/ui/assets/index.js", "/ui/config", "/files/anything.png"):
        assert client.get(path).status_code == 401, path


def test_login_page_is_public_and_sets_httponly_session_cookie(client):
    page = client.get("/login")
    assert page.status_code == 200 and 'name="password"' in page.text
    response = login(client, "admin", ADMIN_PASSWORD)
    cookie = response.headers["set-cookie"]
    assert SESSION_COOKIE in cookie and "HttpOnly" in cookie and "samesite=lax" in cookie.lower()
    assert response.headers["location"] == "/ui/"
    assert client.get("/ui/config").status_code == 200


def test_wrong_password_is_refused_without_a_session(client):
    response = client.post("/login", data={"username": "admin", "password": "nope-nope", "next": "/ui/"})
    assert response.status_code == 401 and "Incorrect username or password" in response.text
    assert SESSION_COOKIE not in response.headers.get("set-cookie", "")
    assert client.get("/ui/config").status_code == 401


def test_next_parameter_cannot_redirect_off_site(client):
    response = client.post(
        "/login", data={"username": "admin", "password": ADMIN_PASSWORD, "next": "//evil.example/x"},
    )
    assert response.status_code == 303 and response.headers["location"] == "/ui/"


def test_logout_invalidates_the_session_server_side(studio, admin_client):
    token = admin_client.cookies[SESSION_COOKIE]
    # A link or <img> on another site must not log anyone out: GET is refused, the session stays.
    assert admin_client.get("/logout").status_code == 405
    assert studio.auth.user_for_token(token) is not None
    assert admin_client.post("/logout").status_code == 303
    assert studio.auth.user_for_token(token) is None
    # Even a client that kept the cookie is refused now.
    with TestClient(studio.app, cookies={SESSION_COOKIE: token}) as replay:
        assert replay.get("/ui/config").status_code == 401


def test_session_survives_restart(make_settings):
    import app

    first = app.build(make_settings())
    with TestClient(first.app, follow_redirects=False) as c:
        login(c, "admin", ADMIN_PASSWORD)
        token = c.cookies[SESSION_COOKIE]
    first.close()
    second = app.build(make_settings())
    try:
        with TestClient(second.app, cookies={SESSION_COOKIE: token}) as c:
            assert c.get("/ui/config").status_code == 200
    finally:
        second.close()


def test_expired_session_is_refused(make_settings):
    import app

    studio = app.build(make_settings(session_ttl_hours=1e-6))
    try:
        with TestClient(studio.app, follow_redirects=False) as c:
            login(c, "admin", ADMIN_PASSWORD)
            assert c.get("/ui/config").status_code == 401
    finally:
        studio.close()


def _basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_http_basic_with_own_login(client):
    assert client.get("/ui/config", headers=_basic("admin", ADMIN_PASSWORD)).status_code == 200
    refused = client.get("/api/v1/anything", headers=_basic("admin", "wrong-password"))
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
    assert client.get("/ui/config", headers={"authorization": "Basic !!!"}).status_code == 401


def test_rate_limit_per_user(make_settings):
    import app

    studio = app.build(make_settings(login_max_failures_per_user=3, login_max_failures_per_address=100))
    try:
        with TestClient(studio.app, follow_redirects=False) as c:
            for _ in range(3):
                assert c.post("/login", data={"username": "admin", "password": "bad-pass-1"}).status_code == 401
            throttled = c.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD})
            assert throttled.status_code == 429
            assert int(throttled.headers["retry-after"]) > 0
            # Basic auth draws on the same budget.
            assert c.get("/ui/config", headers=_basic("admin", ADMIN_PASSWORD)).status_code == 429
    finally:
        studio.close()


def test_rate_limit_per_address_covers_many_user_names(make_settings):
    import app

    studio = app.build(make_settings(login_max_failures_per_user=100, login_max_failures_per_address=4))
    try:
        with TestClient(studio.app, follow_redirects=False) as c:
            for i in range(4):
                assert c.post("/login", data={"username": f"guess{i}", "password": "x" * 9}).status_code == 401
            response = c.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD})
            assert response.status_code == 429 and "retry-after" in response.headers
    finally:
        studio.close()
