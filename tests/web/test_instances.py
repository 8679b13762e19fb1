"""Two studio instances on one database (behind one load balancer): a browser session, an API token, a
password and the failed-login lockout are one thing for both, whichever instance a request reaches.
Each instance has its own data dir and process state (caches, throttle object); only the database is shared,
SQLite file or PostgreSQL."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_PASSWORD, login
from webapp.web.gate import SESSION_COOKIE


@pytest.fixture
def two_instances(tmp_path, database_url) -> Iterator[tuple]:
    import app
    from webapp.settings import Settings

    built = []
    try:
        for name in ("a", "b"):
            built.append(app.build(Settings(data_dir=tmp_path / name, admin_password=ADMIN_PASSWORD,
                                            database_url=database_url, login_max_failures_per_user=3)))
        yield tuple(built)
    finally:
        for studio in built:
            studio.close()


def _basic(password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}


def test_a_session_its_logout_and_a_revoked_api_token_hold_on_both_instances(two_instances):
    a, b = two_instances
    with TestClient(a.app, follow_redirects=False) as on_a, TestClient(b.app, follow_redirects=False) as on_b:
        login(on_a, "admin", ADMIN_PASSWORD)
        cookie = {SESSION_COOKIE: on_a.cookies[SESSION_COOKIE]}
        on_b.cookies.update(cookie)
        assert on_b.get("/api/v1/me").json()["username"] == "admin"
        assert on_a.post("/logout").status_code == 303
        on_b.cookies.update(cookie)  # the browser still sends it; the load balancer sends it to b
        assert on_b.get("/api/v1/me").status_code == 401
        on_b.cookies.clear()

        admin = a.users.get_by_name("admin")
        token, public = a.tokens.create(actor=admin, name="script")
        bearer = {"authorization": f"Bearer {token}"}
        assert on_b.get("/api/v1/me", headers=bearer).status_code == 200
        a.tokens.revoke(actor=admin, token_id=public.id)
        assert on_b.get("/api/v1/me", headers=bearer).status_code == 401


def test_a_password_reset_and_the_login_lockout_on_one_instance_hold_on_the_other(two_instances):
    a, b = two_instances
    with TestClient(a.app, follow_redirects=False) as on_a, TestClient(b.app, follow_redirects=False) as on_b:
        assert on_b.get("/api/v1/me", headers=_basic(ADMIN_PASSWORD)).status_code == 200  # now cached on b
        admin = a.users.get_by_name("admin")
        a.users.reset_password(actor=admin, username="admin", new_password="a-new-password-for-admin")
        assert on_b.get("/api/v1/me", headers=_basic(ADMIN_PASSWORD)).status_code == 401  # one failure
        assert on_b.get("/api/v1/me", headers=_basic("a-new-password-for-admin")).status_code == 200

        for i in range(3):
            guess = on_a.post("/login", data={"username": "admin", "password": f"bad-guess-{i}", "next": "/ui/"})
            assert guess.status_code == 401
        locked = on_b.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD, "next": "/ui/"})
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
