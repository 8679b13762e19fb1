"""SQLite settings, serialised writes and schema upgrades that keep rows, on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlmodel import select

from webapp import schema
from webapp.db import Database

DATA = Path(__file__).parent / "data"


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    yield database
    database.dispose()


def test_sqlite_pragmas(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'test.db'}")
    with db.read() as s:
        conn = s.connection()
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    db.dispose()


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
    role = ("role, ", "'USER', ") if start < 17 else ("", "")  # v17 turned user.role into roles
    with db.write() as s:  # columns of the first schema version only
        s.connection().execute(text(
            f'INSERT INTO "user" (username, {role[0]}password_hash, created_at, password_changed_at) '
            f"VALUES ('kept', {role[1]}'h', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
        ))
    schema.upgrade(db)
    assert schema.current_version(db) == schema.LATEST
    with db.read() as s:
        kept = s.exec(select(User).where(User.username == "kept")).one()
        assert kept.password_hash == "h"
        if start < 17:
            assert "model:list" in kept.permissions and "user:list" not in kept.permissions, \
                "an old 'user' became a Designer"
        for table in schema.SQLModel.metadata.tables:
            s.connection().execute(text(f'SELECT COUNT(*) FROM "{table}"'))  # every table exists


def test_newer_database_is_refused(db):
    schema.upgrade(db)
    with db.write() as s:
        s.connection().execute(text("UPDATE schema_version SET version = :v"), {"v": schema.LATEST + 1})
    with pytest.raises(schema.SchemaError, match="newer"):
        schema.upgrade(db)


def _load_release2(db: Database, url: str) -> None:
    """Write the hand-made release-2 database for this dialect (pysqlite runs one statement per call)."""
    if db.is_sqlite:
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.executescript((DATA / "release2.sql").read_text())
    else:
        with db.engine.begin() as conn:
            conn.exec_driver_sql((DATA / "release2.postgresql.sql").read_text())


def _layout(db: Database) -> dict:
    """Every table's columns and indexes (and, on PostgreSQL, the column types: SQLite's are only names)."""
    with db.read() as s:
        found = inspect(s.connection())
        return {t: ({(c["name"], "" if db.is_sqlite else str(c["type"])) for c in found.get_columns(t)},
                    {(i["name"], tuple(i["column_names"])) for i in found.get_indexes(t)})
                for t in found.get_table_names()}


def test_a_release_2_data_dir_upgrades_in_place_to_the_fresh_layout(database_url, new_database_url):
    """A database written by hand as release 2 left it (tests/web/data/release2*.sql), not by today's code:
    after the upgrade it has every column, index (and on PostgreSQL column type) a fresh database has, its rows
    are all there, and it takes what release 2 could not hold (a 5 GiB model on PostgreSQL's 32-bit INTEGER)."""
    from webapp.records import LoginSession, ModelRecord, ModelStatus, ModelType, User

    upgraded, fresh = Database(database_url), Database(new_database_url())
    try:
        _load_release2(upgraded, database_url)
        assert schema.current_version(upgraded) == 2
        schema.upgrade(upgraded)
        schema.upgrade(fresh)
        assert schema.current_version(upgraded) == schema.LATEST
        assert _layout(upgraded) == _layout(fresh)
        with upgraded.read() as s:
            model = s.exec(select(ModelRecord)).one()
            assert (model.name, model.status, model.size, model.legacy_hash) == ("kept-model", ModelStatus.ACTIVE,
                                                                                1234, None)
            assert s.exec(select(User)).one().username == "admin"
            assert s.exec(select(LoginSession)).one().client_address == "127.0.0.1"
        with upgraded.write() as s:
            s.add(ModelRecord(name="big", type=ModelType.CHECKPOINT, status=ModelStatus.ACTIVE, size=5 * 2**30,
                              source="upload"))
            s.add(User(username="second", password_hash="h"))  # the id sequence goes on after the kept admin
        with upgraded.read() as s:
            assert s.exec(select(ModelRecord).where(ModelRecord.name == "big")).one().size == 5 * 2**30
            assert s.exec(select(User).where(User.username == "second")).one().id == 2
    finally:
        upgraded.dispose()
        fresh.dispose()


def test_an_enum_member_added_since_the_type_was_created_is_accepted_after_the_upgrade(postgres_url):
    """PostgreSQL keeps an enum column as a native type fixed when it was created: a job table made before
    training jobs existed refuses mode TRAIN until the upgrade adds the member (SQLite takes any text)."""
    from webapp.records import Job, JobMode, User

    db = Database(postgres_url)
    try:
        with db.write() as s:  # the job modes as release 4 created them
            s.connection().exec_driver_sql("CREATE TYPE jobmode AS ENUM ('TXT2IMG', 'IMG2IMG', 'INPAINT')")
        schema.upgrade(db, target=4)
        schema.upgrade(db)
        with db.write() as s:
            user = User(username="trainer", password_hash="h")
            s.add(user)
            s.flush()
            s.add(Job(owner_id=user.id, owner_name=user.username, mode=JobMode.TRAIN, kind="train_lora",
                      endpoint="local", request_json="{}"))
        with db.read() as s:
            assert s.exec(select(Job)).one().mode == JobMode.TRAIN
    finally:
        db.dispose()


def test_instances_starting_together_upgrade_one_database_once(database_url, monkeypatch):
    """Several studio instances on one database upgrade it at the same moment: each migration is applied
    once, none fails on another's half-made tables, and every instance ends at the latest version."""
    applied: list[int] = []

    def counted(migration: schema.Migration) -> schema.Migration:
        def apply(conn) -> None:  # noqa: ANN001 - SQLAlchemy Connection
            applied.append(migration.version)
            migration.apply(conn)

        return schema.Migration(migration.version, migration.description, apply)

    monkeypatch.setattr(schema, "MIGRATIONS", [counted(m) for m in schema.MIGRATIONS])
    databases = [Database(database_url) for _ in range(3)]
    start = threading.Barrier(len(databases))
    results: list[int | BaseException] = []

    def upgrade(db: Database) -> None:
        start.wait()
        try:
            results.append(schema.upgrade(db))
        except BaseException as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=upgrade, args=(db,)) for db in databases]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [schema.LATEST] * len(databases)
        assert sorted(applied) == sorted(m.version for m in schema.MIGRATIONS)
        assert schema.current_version(databases[0]) == schema.LATEST
    finally:
        for db in databases:
            db.dispose()
