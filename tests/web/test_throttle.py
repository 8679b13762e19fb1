"""The failed-login throttle: attempts are reserved before argon2 runs, counted per user name *and* address,
so an attacker neither gets more guesses by asking in parallel nor locks the owner out; forwarded client
addresses are believed only from trusted proxies. The counters are rows: instances on one database (SQLite
or PostgreSQL) share them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from tests.conftest import ADMIN_PASSWORD
from webapp import schema
from webapp.db import Database
from webapp.records import LoginAttempt, LoginSession
from webapp.services.errors import NotAuthenticated, Throttled
from webapp.services.throttle import LoginThrottle
from webapp.web.gate import SESSION_COOKIE


@pytest.fixture
def db(upgraded_db):
    return upgraded_db


def _form(password: str) -> dict[str, str]:
    return {"username": "admin", "password": password, "next": "/ui/"}


def test_parallel_guesses_verify_at_most_the_limit(make_settings, database_url, monkeypatch):
    import app

    studio = app.build(make_settings(login_max_failures_per_user=5, login_max_failures_per_address=1000,
                                     database_url=database_url))
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


def test_failures_from_many_addresses_slow_the_account_without_locking_it(db):
    """The per-account ceiling bounds a botnet's total guessing rate; the owner waits seconds, not the window."""
    now = [1000.0]
    throttle = LoginThrottle(db, max_per_user=5, max_per_address=100, max_per_account=4, window_seconds=60,
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


def test_throttle_window_slides(db):
    now = [1000.0]
    throttle = LoginThrottle(db, max_per_user=2, max_per_address=10, window_seconds=60, clock=lambda: now[0])
    throttle.reserve("bob", "1.2.3.4")  # a reservation stands as a failure until it is forgiven
    throttle.reserve("bob", "1.2.3.4")
    with pytest.raises(Throttled) as exc:
        throttle.reserve("bob", "1.2.3.4")
    assert exc.value.retry_after == 60
    now[0] += 61
    throttle.reserve("bob", "1.2.3.4")  # the window slid past both failures
    with db.read() as s:  # rows older than the window are gone: the table does not grow without bound
        assert {row.at for row in s.exec(select(LoginAttempt)).all()} == {now[0]}


def test_success_forgives_its_own_reservation_and_the_pair_but_not_the_address(db):
    now = [1000.0]
    throttle = LoginThrottle(db, max_per_user=2, max_per_address=3, max_per_account=100, window_seconds=60,
                             clock=lambda: now[0])
    throttle.reserve("bob", "1.2.3.4")  # a typo
    throttle.succeeded(throttle.reserve("bob", "1.2.3.4"))
    throttle.reserve("bob", "1.2.3.4")  # the earlier typo is forgiven, so this one is allowed
    throttle.reserve("carol", "1.2.3.4")  # the address has 2 failures now (bob's typo is no longer one)
    with pytest.raises(Throttled, match="address"):
        throttle.reserve("dave", "1.2.3.4")


def test_two_instances_on_one_database_count_the_same_failures(database_url):
    """Two studio instances behind one load balancer (two engines, two throttles, one database): a guess
    counted by either counts for both, and a success on one forgives that user's address on the other."""
    now = [1000.0]
    databases = [Database(database_url) for _ in range(2)]
    try:
        schema.upgrade(databases[0])
        first, second = (LoginThrottle(d, max_per_user=3, max_per_address=100, window_seconds=60,
                                       clock=lambda: now[0]) for d in databases)
        first.reserve("bob", "6.6.6.6")
        second.reserve("bob", "6.6.6.6")
        first.reserve("bob", "6.6.6.6")
        for instance in (first, second):
            with pytest.raises(Throttled, match="this user from your address"):
                instance.reserve("bob", "6.6.6.6")
        first.reserve("carol", "1.2.3.4")  # a typo on one instance ...
        first.reserve("carol", "1.2.3.4")
        second.succeeded(second.reserve("carol", "1.2.3.4"))  # ... forgiven by a login on the other
        for _ in range(3):
            first.reserve("carol", "1.2.3.4")
        with pytest.raises(Throttled):
            second.reserve("carol", "1.2.3.4")
        now[0] += 61
        second.reserve("bob", "6.6.6.6")  # the window slid for both
    finally:
        for d in databases:
            d.dispose()


def test_parallel_guesses_on_two_instances_pass_the_limit_at_most_once(database_url):
    """Reservations are atomic across instances, not only across one process's threads."""
    databases = [Database(database_url) for _ in range(2)]
    try:
        schema.upgrade(databases[0])
        throttles = [LoginThrottle(d, max_per_user=5, max_per_address=1000, window_seconds=60) for d in databases]
        start = threading.Barrier(20)

        def guess(i: int) -> bool:
            start.wait()
            try:
                throttles[i % 2].reserve("admin", "6.6.6.6")
            except Throttled:
                return False
            return True

        with ThreadPoolExecutor(20) as pool:
            allowed = list(pool.map(guess, range(20)))
        assert allowed.count(True) == 5
    finally:
        for d in databases:
            d.dispose()


def test_a_user_name_with_a_nul_is_an_ordinary_failed_login(make_settings, database_url):
    """PostgreSQL refuses NUL in any text it is sent, even a query's parameter; the form must still answer 401."""
    import app

    studio = app.build(make_settings(database_url=database_url))
    try:
        with TestClient(studio.app, follow_redirects=False) as c:
            form = {"username": "ad\x00min", "password": "not-the-password", "next": "/ui/"}
            assert c.post("/login", data=form).status_code == 401
            assert c.get("/api/v1/me", auth=("ad\x00min", "not-the-password")).status_code == 401
    finally:
        studio.close()


def test_a_nul_in_an_id_or_a_name_is_a_clear_4xx_on_every_database(make_settings, database_url):
    """An id in a path or a name in a body holding NUL: PostgreSQL refuses such text even as a lookup's
    parameter; the answer must be a 4xx naming the problem, never a 500."""
    import app

    studio = app.build(make_settings(database_url=database_url))
    try:
        with TestClient(studio.app, follow_redirects=False) as c:
            auth = ("admin", ADMIN_PASSWORD)
            job = c.get("/api/v1/jobs/ab%00cd", auth=auth)
            assert 400 <= job.status_code < 500, job.text
    finally:
        studio.close()
