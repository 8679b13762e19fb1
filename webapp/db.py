"""Database engine and transactions.

SQLite is the embedded default: WAL (readers never block the writer), a busy timeout (writers wait
instead of failing), foreign keys on, and ``BEGIN IMMEDIATE`` for write transactions. Without the
last one, two read-modify-write transactions can both read under a SHARED lock and one of them fails
(or, with retries, loses its update) when it upgrades to write. Reads use plain deferred ``BEGIN``.

PostgreSQL (``postgresql+psycopg://...``, several studio instances on one database) keeps the same
contract: every write transaction first takes one transaction-level advisory lock
(``pg_advisory_xact_lock``), so write transactions run one at a time across every instance, as
``BEGIN IMMEDIATE`` makes them on SQLite. Services are written as read-modify-write blocks inside
``Database.write()``; under PostgreSQL's default READ COMMITTED two such blocks would both read the old
value and one update would be lost (tested). Reads never take the lock. The wait for it is bounded like
SQLite's busy timeout (``lock_timeout``). Connections use UTC, so timestamps read back are UTC whatever
the server's ``TimeZone`` is.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
# Arbitrary, fixed: the one advisory lock key every studio instance's write transactions share.
WRITE_LOCK_KEY = 0x5354_5544_494F  # "STUDIO"


def _enter_wal(cursor) -> None:  # noqa: ANN001 - DB-API cursor
    """Switch to WAL. On a brand-new file several connections (instances starting together) race for the exclusive
    lock the switch needs, and SQLite answers "database is locked" at once, without its busy handler: retry, bounded
    by the busy timeout. Once the file is in WAL (the mode persists) the pragma takes no lock."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API object
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's implicit BEGIN is always DEFERRED).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _enter_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001 - SQLAlchemy Connection
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API object
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'")
        dbapi_connection.commit()

    @event.listens_for(engine, "before_cursor_execute")
    def _no_nul(_conn, _cursor, _statement, parameters, _context, _executemany) -> None:  # noqa: ANN001
        # PostgreSQL refuses NUL in any text, even a lookup's parameter: a client's "a\x00b" (an id in a path, a
        # name in a body) must be a 4xx naming the problem, not a driver error answered 500.
        if _holds_nul(parameters):
            from webapp.services.errors import InvalidInput

            raise InvalidInput("the request holds a NUL character, which cannot be stored or looked up", field="body")

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001 - SQLAlchemy Connection
        if conn.get_execution_options().get("serialized_write"):
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {BUSY_TIMEOUT_MS}")
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")


def _holds_nul(parameters: object) -> bool:
    """True when a statement's parameters (a mapping, a sequence, or a list of either) hold a str with NUL."""
    if isinstance(parameters, str):
        return "\x00" in parameters
    if isinstance(parameters, dict):
        return any(_holds_nul(value) for value in parameters.values())
    if isinstance(parameters, list | tuple):
        return any(_holds_nul(value) for value in parameters)
    return False


class Database:
    """Owns the engine; hands out sessions for reads and for (serialised) writes."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.is_postgresql = parsed.get_backend_name() == "postgresql"
        kwargs: dict = {"echo": echo, "pool_pre_ping": not self.is_sqlite}
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        elif self.is_postgresql:
            _configure_postgresql(self.engine)
        self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE", serialized_write=True)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; objects stay usable after the block (no expiry on commit)."""
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction, one at a time (BEGIN IMMEDIATE on SQLite, the advisory lock on PostgreSQL),
        committed on success, rolled back on error."""
        with Session(self._write_engine, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()
