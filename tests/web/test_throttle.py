"""The failed-login throttle: attempts are reserved before argon2 runs, counted per user name *and* address,
so an attacker neither gets more guesses by asking in parallel nor locks the owner out; forwarded client
addresses are believed only from trusted proxies."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from tests.conftest import ADMIN_PASSWORD
from webapp.records import LoginSession
from webapp.services.errors import NotAuthenticated, Throttled
from webapp.services.throttle import LoginThrottle
from webapp.web.gate import SESSION_COOKIE


def _form(password: str) -> dict[str, str]:
    return {"username": "admin", "password": password, "next": "/ui/"}


def test_parallel_guesses_verify_at_most_the_limit(make_settings, monkeypatch):
    import app

    studio = app.build(make_settings(login_max_failures_per_user=5, login_max_failures_per_address=1000))
    try:
        passwords = studio.auth._passwords
        real_verify = passwords.verify
        calls: list[int] = []
        monkeypatch.setattr(passwords, "verify", lambda h, p: calls.append(1) or real_verify(h, p))
        start = threading.Barrier(40)

        def guess(i: int) -> str:
            start.wait()
            try:
                studio.auth.verify_password("admin", f"wrong-guess-{i}", client_address="6.6.6.6")
            except Throttled:
                return "throttled"
            except NotAuthenticated:
                return "refused"
            return "accepted"

        with ThreadPoolExecutor(40) as pool:
            outcomes = list(pool.map(guess, range(40)))
        assert len(calls) <= 5, f"{len(calls)} passwords were verified in parallel; the limit is 5"
        assert outcomes.count("refused") == len(calls) and outcomes.count("throttled") == 40 - len(calls)
    finally:
        studio.close()


def test_owner_gets_in_from_a_fresh_address_while_the_attackers_is_locked(make_settings):
    import app

    studio = app.build(make_settings(login_max_failures_per_user=3, forwarded_allow_ips=["testclient"]))
    try:
        with TestClient(studio.app, follow_redirects=False) as c:
            attacker = {"x-forwarded-for": "6.6.6.6"}
            for i in range(3):
                assert c.post("/login", data=_form(f"bad-guess-{i}"), headers=attacker).status_code == 401
            locked = c.post("/login", data=_form(ADMIN_PASSWORD), headers=attacker)
            assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
            owner = c.post("/login", data=_form(ADMIN_PASSWORD), headers={"x-forwarded-for": "7.7.7.7"})
            assert owner.status_code == 303 and SESSION_COOKIE in owner.headers["set-cookie"]
            # The owner's success does not reopen the attacker's address.
            assert c.post("/login", data=_form("bad-guess-4"), headers=attacker).status_code == 429
    finally:
        studio.close()


def test_spoofed_forwarded_for_is_ignored_unless_the_peer_is_trusted(make_settings):
    import app

    studio = app.build(make_settings(login_max_failures_per_user=3))
    try:
        with TestClient(studio.app, follow_redirects=False) as c:
            for i in range(3):
                spoofed = {"x-forwarded-for": f"10.0.0.{i}"}
                assert c.post("/login", data=_form(f"bad-guess-{i}"), headers=spoofed).status_code == 401
            # A new X-Forwarded-For per guess does not make the same peer a fresh address.
            assert c.post("/login", data=_form(ADMIN_PASSWORD), headers={"x-forwarded-for": "10.0.0.99"}).status_code == 429
    finally:
        studio.close()


def test_session_records_the_forwarded_client_only_from_a_trusted_proxy(make_settings):
    import app

    for trusted, expected in (([], "testclient"), (["testclient"], "203.0.113.9")):
        studio = app.build(make_settings(forwarded_allow_ips=trusted))
        try:
            with TestClient(studio.app, follow_redirects=False) as c:
                login = c.post("/login", data=_form(ADMIN_PASSWORD), headers={"x-forwarded-for": "203.0.113.9"})
                assert login.status_code == 303
            with studio.db.read() as s:
                addresses = [row.client_address for row in s.exec(select(LoginSession)).all()]
            assert addresses[-1] == expected
        finally:
            studio.close()


def test_failures_from_many_addresses_slow_the_account_without_locking_it():
    """The per-account ceiling bounds a botnet's total guessing rate; the owner waits seconds, not the window."""
    now = [1000.0]
    throttle = LoginThrottle(max_per_user=5, max_per_address=100, max_per_account=4, window_seconds=60,
                             clock=lambda: now[0])
    for i in range(4):
        throttle.reserve("bob", f"10.0.0.{i}")  # four failed guesses from four addresses
    first = throttle.reserve("bob", "192.0.2.1")  # the owner, from a fresh address: one paced attempt
    with pytest.raises(Throttled) as paced:
        throttle.reserve("bob", "10.0.0.9")
    assert paced.value.retry_after == 15  # the window spread over the ceiling: 60 s / 4
    throttle.succeeded(first)
    now[0] += 15
    throttle.reserve("bob", "10.0.0.9")
    throttle.reserve("alice", "10.0.0.1")  # other accounts are untouched


def test_success_forgives_its_own_reservation_and_the_pair_but_not_the_address():
    now = [1000.0]
    throttle = LoginThrottle(max_per_user=2, max_per_address=3, max_per_account=100, window_seconds=60,
                             clock=lambda: now[0])
    throttle.reserve("bob", "1.2.3.4")  # a typo
    throttle.succeeded(throttle.reserve("bob", "1.2.3.4"))
    throttle.reserve("bob", "1.2.3.4")  # the earlier typo is forgiven, so this one is allowed
    throttle.reserve("carol", "1.2.3.4")  # the address has 2 failures now (bob's typo is no longer one)
    with pytest.raises(Throttled, match="address"):
        throttle.reserve("dave", "1.2.3.4")
