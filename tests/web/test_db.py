"""SQLite settings, serialised writes and schema upgrades that keep rows."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from webapp import schema
from webapp.db import Database


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'test.db'}")
    yield database
    database.dispose()


def test_sqlite_pragmas(db):
    with db.read() as s:
        conn = s.connection()
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000


def test_foreign_keys_are_enforced(db):
    schema.upgrade(db)
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), db.write() as s:
        s.connection().execute(text(
            "INSERT INTO login_session (token_hash, user_id, created_at, expires_at, last_seen_at) "
            "VALUES ('x', 999, '2026-01-01', '2026-01-02', '2026-01-01')"
        ))


def test_concurrent_read_modify_write_loses_no_update(db):
    with db.write() as s:
        s.connection().execute(text("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
        s.connection().execute(text("INSERT INTO counter VALUES (1, 0)"))
    errors: list[BaseException] = []

    def bump(times: int) -> None:
        try:
            for _ in range(times):
                with db.write() as s:
                    conn = s.connection()
                    n = conn.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one()
                    conn.execute(text("UPDATE counter SET n = :n WHERE id = 1"), {"n": n + 1})
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.read() as s:
        assert s.connection().execute(text("SELECT n FROM counter")).scalar_one() == 200


def test_fresh_database_reaches_latest_version(db):
    assert schema.current_version(db) == 0
    assert schema.upgrade(db) == schema.LATEST
    assert schema.current_version(db) == schema.LATEST
    assert schema.upgrade(db) == schema.LATEST  # idempotent


@pytest.mark.parametrize("start", [v.version for v in schema.MIGRATIONS])
def test_upgrade_from_every_older_version_keeps_rows(db, start):
    from webapp.records import User

    schema.upgrade(db, target=start)
    with db.write() as s:  # columns of the first schema version only
        s.connection().execute(text(
            "INSERT INTO user (username, role, password_hash, created_at, password_changed_at) "
            "VALUES ('kept', 'USER', 'h', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
        ))
    schema.upgrade(db)
    assert schema.current_version(db) == schema.LATEST
    with db.read() as s:
        from sqlmodel import select

        assert s.exec(select(User).where(User.username == "kept")).one().password_hash == "h"
        for table in schema.SQLModel.metadata.tables:
            s.connection().execute(text(f'SELECT COUNT(*) FROM "{table}"'))  # every table exists


def test_newer_database_is_refused(db):
    schema.upgrade(db)
    with db.write() as s:
        s.connection().execute(text("UPDATE schema_version SET version = :v"), {"v": schema.LATEST + 1})
    with pytest.raises(schema.SchemaError, match="newer"):
        schema.upgrade(db)


def test_a_release_2_data_dir_upgrades_in_place_to_the_fresh_layout(tmp_path):
    """A database written by hand as release 2 left it (tests/web/data/release2.sql), not by today's code:
    after the upgrade it has every column and index a fresh database has, and its rows are all there."""
    import sqlite3
    from pathlib import Path

    from sqlalchemy import inspect
    from sqlmodel import select

    from webapp.records import LoginSession, ModelRecord, ModelStatus, User

    old = tmp_path / "release2.db"
    with sqlite3.connect(old) as conn:
        conn.executescript((Path(__file__).parent / "data" / "release2.sql").read_text())
    upgraded, fresh = Database(f"sqlite:///{old}"), Database(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        assert schema.current_version(upgraded) == 2
        schema.upgrade(upgraded)
        schema.upgrade(fresh)
        assert schema.current_version(upgraded) == schema.LATEST

        def layout(db: Database) -> dict:
            with db.read() as s:
                found = inspect(s.connection())
                return {t: ({c["name"] for c in found.get_columns(t)},
                            {(i["name"], tuple(i["column_names"])) for i in found.get_indexes(t)})
                        for t in found.get_table_names()}

        assert layout(upgraded) == layout(fresh)
        with upgraded.read() as s:
            model = s.exec(select(ModelRecord)).one()
            assert (model.name, model.status, model.size, model.legacy_hash) == ("kept-model", ModelStatus.ACTIVE,
                                                                                1234, None)
            assert s.exec(select(User)).one().username == "admin"
            assert s.exec(select(LoginSession)).one().client_address == "127.0.0.1"
    finally:
        upgraded.dispose()
        fresh.dispose()
