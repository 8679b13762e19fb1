"""argon2id's cost is a setting: too light a pair is refused at start, and a user whose stored hash was made
with other parameters gets a new one at their next successful login — without losing their sessions."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlmodel import select

from tests.conftest import login

PASSWORD = "alice-password-1"


def test_a_pair_lighter_than_owasps_lightest_is_refused_naming_both_settings(tmp_path):
    from webapp.settings import Settings

    with pytest.raises(ValidationError) as refused:
        Settings(data_dir=tmp_path, password_hash_memory_kib=8192, password_hash_time_cost=2)
    assert "password_hash_memory_kib × password_hash_time_cost" in str(refused.value)
    accepted = Settings(data_dir=tmp_path, password_hash_memory_kib=19456, password_hash_time_cost=2)
    assert (accepted.password_hash_memory_kib, accepted.password_hash_time_cost) == (19456, 2)


def _stored_hash(studio, username: str) -> str:
    from webapp.records import User

    with studio.db.read() as s:
        return s.exec(select(User.password_hash).where(User.username == username)).one()


def test_an_old_hash_is_remade_at_the_next_login_and_sessions_stay(make_settings):
    import app

    studio = app.build(make_settings(password_hash_memory_kib=19456, password_hash_time_cost=2,
                                     password_hash_parallelism=1))
    try:
        studio.users.create_user(actor=studio.users.get_by_name("admin"), username="alice", password=PASSWORD)
        assert "m=19456,t=2,p=1" in _stored_hash(studio, "alice")
        old = PasswordHasher(memory_cost=65536, time_cost=3, parallelism=4).hash(PASSWORD)  # an earlier setting
        from webapp.records import User

        with studio.db.write() as s:
            user = s.exec(select(User).where(User.username == "alice")).one()
            user.password_hash = old
            s.add(user)
        with TestClient(studio.app, follow_redirects=False) as first, \
                TestClient(studio.app, follow_redirects=False) as second:
            login(first, "alice", PASSWORD)  # verified against the old hash, which is then replaced
            remade = _stored_hash(studio, "alice")
            assert remade != old and "m=19456,t=2,p=1" in remade
            assert first.get("/api/v1/me").status_code == 200, "the session that re-made the hash is kept"
            login(second, "alice", PASSWORD)  # the new hash verifies the same password
            assert _stored_hash(studio, "alice") == remade, "a current hash is not re-made again"
            bad = second.post("/login", data={"username": "alice", "password": "not-her-password", "next": "/ui/"})
            assert bad.status_code != 303
    finally:
        studio.close()
