"""Schema versions: upgrade an existing data dir in place, never losing rows.

Each release that changes tables appends a ``Migration``. A fresh database runs them all, an old one
runs the missing ones, each in its own transaction, and the version row moves with it. Migrations
create tables from the current metadata with ``checkfirst`` and add columns only when missing, so they
stay correct when a table later grows (the later migration then finds the column already there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import BigInteger, Connection, Enum, inspect, text
from sqlmodel import SQLModel

import webapp.records  # noqa: F401 - registers every table on SQLModel.metadata
from webapp.db import Database

log = logging.getLogger(__name__)


class SchemaError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def create_tables(conn: Connection, *names: str) -> None:
    for name in names:
        SQLModel.metadata.tables[name].create(conn, checkfirst=True)


def add_column(conn: Connection, table: str, column: str, ddl_type: str, default_sql: str | None = None) -> None:
    """``ALTER TABLE ... ADD COLUMN`` unless the column exists (dialect-neutral DDL)."""
    existing = {c["name"] for c in inspect(conn).get_columns(table)}
    if column in existing:
        return
    default = f" DEFAULT {default_sql}" if default_sql is not None else ""
    conn.execute(text(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {ddl_type}{default}'))


def create_missing_indexes(conn: Connection) -> None:
    """Every index the current tables declare and the database lacks (``add_column`` adds none)."""
    found = inspect(conn)
    for table in SQLModel.metadata.sorted_tables:
        if not found.has_table(table.name):
            continue
        existing = {i["name"] for i in found.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in existing:
                index.create(conn)
                log.info("schema: created missing index %s", index.name)


def widen_big_integers(conn: Connection) -> None:
    """PostgreSQL: make 64-bit every column the tables declare ``BigInteger`` that an older release made INTEGER.

    SQLite's INTEGER is 64-bit whatever the declared type, so only PostgreSQL (32-bit INTEGER) needs this:
    a model's size passes 2**31 at 2 GiB and a file's mtime in nanoseconds always does."""
    narrow = set(conn.execute(text(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND data_type = 'integer'")).tuples())
    for table in SQLModel.metadata.sorted_tables:
        for column in table.columns:
            if isinstance(column.type, BigInteger) and (table.name, column.name) in narrow:
                conn.execute(text(f'ALTER TABLE "{table.name}" ALTER COLUMN "{column.name}" TYPE BIGINT'))
                log.info("schema: widened %s.%s to BIGINT", table.name, column.name)


def add_missing_enum_labels(conn: Connection) -> None:
    """PostgreSQL: add the members an enum gained since its type was created (``JobMode.TRAIN`` came after v4).

    PostgreSQL stores an enum column as a native type fixed at ``CREATE TYPE``; SQLite stores the name as text
    and takes any. Run at every upgrade, not as one migration, because adding a member to a Python enum
    changes no migration and a developer on SQLite would never see the row PostgreSQL refuses."""
    found: dict[str, set[str]] = {}
    for type_name, label in conn.execute(text(
            "SELECT t.typname, e.enumlabel FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid "
            "WHERE t.typnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())")).tuples():
        found.setdefault(type_name, set()).add(label)
    for table in SQLModel.metadata.sorted_tables:
        for column in table.columns:
            kind = column.type
            if not isinstance(kind, Enum) or not kind.native_enum or kind.name not in found:
                continue
            for label in kind.enums:
                if label not in found[kind.name]:
                    quoted = label.replace("'", "''")
                    conn.execute(text(f"ALTER TYPE \"{kind.name}\" ADD VALUE IF NOT EXISTS '{quoted}'"))
                    found[kind.name].add(label)
                    log.info("schema: added %r to the enum type %s", label, kind.name)


def _v1(conn: Connection) -> None:
    create_tables(conn, "user", "login_session")
    # Release 1's users had a role (admin/user) that v17 turned into roles; the current table lacks the column.
    add_column(conn, "user", "role", "VARCHAR(8)", "'USER'")


def _v2(conn: Connection) -> None:
    create_tables(conn, "model")


def _v4(conn: Connection) -> None:
    create_tables(conn, "job", "endpoint")


def _v3(conn: Connection) -> None:
    create_tables(conn, "import_task", "upload_session", "scanned_file")
    add_column(conn, "model", "legacy_hash", "VARCHAR(8)")
    add_column(conn, "model", "source_sha256", "VARCHAR(64)")
    add_column(conn, "model", "file_name", "VARCHAR(1024)")


def _v5(conn: Connection) -> None:
    create_tables(conn, "api_token", "server_option", "user_option")


def _v6(conn: Connection) -> None:
    # v3 added model.source_sha256 to existing databases without its index (found by the release-2 test).
    create_missing_indexes(conn)


def _v7(conn: Connection) -> None:
    # Disk quota: job sizes (NULL on older jobs until the start-up sweep measures them) and their index.
    add_column(conn, "job", "stored_bytes", "BIGINT")
    create_missing_indexes(conn)


def _v8(conn: Connection) -> None:
    # Endpoints deployed by administrators: instance bounds, autoscaling, encrypted secret options.
    add_column(conn, "endpoint", "min_instances", "INTEGER", "1")
    add_column(conn, "endpoint", "max_instances", "INTEGER", "1")
    add_column(conn, "endpoint", "autoscale", "BOOLEAN", "FALSE")
    add_column(conn, "endpoint", "secrets_token", "TEXT")


def _v9(conn: Connection) -> None:
    # Inputs in the asset store: the validated engine request (NULL on older jobs, which hold inline base64).
    add_column(conn, "job", "engine_request_json", "TEXT")


def _v10(conn: Connection) -> None:
    create_tables(conn, "dataset", "dataset_item")


def _v11(conn: Connection) -> None:
    # Job kinds beyond generation (training): the kind, reported metrics, a log tail and artifact keys.
    add_column(conn, "job", "kind", "VARCHAR(32)", "'generate'")
    add_column(conn, "job", "metrics_json", "TEXT")
    add_column(conn, "job", "log_tail", "TEXT")
    add_column(conn, "job", "artifact_keys_json", "TEXT", "'[]'")
    conn.execute(text("UPDATE job SET kind = 'generate' WHERE kind IS NULL"))
    conn.execute(text("UPDATE job SET artifact_keys_json = '[]' WHERE artifact_keys_json IS NULL"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_job_kind ON job (kind)"))


def _v12(conn: Connection) -> None:
    # Jobs that run elsewhere (SageMaker async): how to find them again after a restart.
    add_column(conn, "job", "remote_handle_json", "TEXT")


def _v13(conn: Connection) -> None:
    # Failed-login counters in the database, shared by every instance on it (they were in each process).
    create_tables(conn, "login_attempt")


def _v14(conn: Connection) -> None:
    # Several studio instances on one database: who holds a running job, and until when (leases with heartbeats).
    add_column(conn, "job", "lease_owner", "VARCHAR(64)")
    add_column(conn, "job", "lease_expires_at", "TIMESTAMP")
    create_missing_indexes(conn)


def _v15(conn: Connection) -> None:
    # Several instances on one database: an import task belongs to the instance whose disk holds its files.
    # Existing tasks keep NULL; the first instance to start takes them (ImportTasks.recover).
    add_column(conn, "import_task", "home", "VARCHAR(32)")
    create_missing_indexes(conn)


def _v16(conn: Connection) -> None:
    # Several instances on one database: which one registers a succeeded training's LoRAs (claimed once).
    add_column(conn, "job", "registered_by", "VARCHAR(64)")


def _v17(conn: Connection) -> None:
    # Roles with resource:action permissions and quotas, allowed roles on shared things, scoped and expiring
    # API tokens, the audit log, a UI language per user. The old user.role (admin/user) becomes the seeded
    # Admin / Designer role.
    import json

    from webapp.services.access import SEEDED_ROLES, expand

    create_tables(conn, "access_role", "access_role_member", "audit_event")
    add_column(conn, "user", "language", "VARCHAR(16)")
    add_column(conn, "user", "role_ids_json", "TEXT", "'[]'")
    add_column(conn, "user", "permissions_json", "TEXT", "'[]'")
    add_column(conn, "api_token", "expires_at", "TIMESTAMP")
    add_column(conn, "api_token", "scopes_json", "TEXT")
    for table in ("model", "dataset", "endpoint"):
        add_column(conn, table, "allowed_roles", "VARCHAR(1024)", "''")
        conn.execute(text(f'UPDATE "{table}" SET allowed_roles = \'\' WHERE allowed_roles IS NULL'))
    role_ids: dict[str, int] = {}
    for key, name, description, permissions in SEEDED_ROLES:
        found = conn.execute(text("SELECT id FROM access_role WHERE name = :n"), {"n": name}).first()
        if found is None:
            conn.execute(text(
                "INSERT INTO access_role (name, description, builtin, permissions_json, created_at, updated_at) "
                "VALUES (:n, :d, :b, :p, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                {"n": name, "d": description, "b": key, "p": json.dumps(sorted(permissions))})
            found = conn.execute(text("SELECT id FROM access_role WHERE name = :n"), {"n": name}).first()
        role_ids[key] = int(found[0])
    seeded = {key: permissions for key, _, _, permissions in SEEDED_ROLES}
    columns = {c["name"] for c in inspect(conn).get_columns("user")}
    if "role" in columns:
        for user_id, old in conn.execute(text('SELECT id, role FROM "user"')).tuples():
            key = "admin" if str(old).lower().endswith("admin") else "designer"
            conn.execute(text("INSERT INTO access_role_member (user_id, role_id) VALUES (:u, :r)"),
                         {"u": user_id, "r": role_ids[key]})
            conn.execute(text('UPDATE "user" SET role_ids_json = :r, permissions_json = :p WHERE id = :u'),
                         {"u": user_id, "r": json.dumps([role_ids[key]]), "p": json.dumps(sorted(expand(seeded[key])))})
        conn.execute(text('ALTER TABLE "user" DROP COLUMN role'))
        if conn.dialect.name == "postgresql":
            conn.execute(text("DROP TYPE IF EXISTS role"))


def _v18(conn: Connection) -> None:
    # Quotas per role: GPU-seconds per day sum the run time of an owner's jobs finished today (ix_job_owner_finished).
    create_missing_indexes(conn)


def _v19(conn: Connection) -> None:
    # Quotas per role: what deleted jobs and requeued attempts used today still counts (the quota_usage ledger).
    create_tables(conn, "quota_usage")


# Append only. Versions are assigned per feature; a gap is harmless on fresh databases.
MIGRATIONS: list[Migration] = [
    Migration(1, "users and login sessions", _v1),
    Migration(2, "model registry", _v2),
    Migration(3, "model imports, uploads and models-folder scan", _v3),
    Migration(4, "jobs and endpoints", _v4),
    Migration(5, "API tokens and per-user options", _v5),
    Migration(6, "indexes that earlier in-place upgrades missed", _v6),
    Migration(7, "disk quota: bytes stored per job", _v7),
    Migration(8, "endpoints: instance bounds, autoscaling, encrypted secrets", _v8),
    Migration(9, "job inputs in the asset store: the validated engine request per job", _v9),
    Migration(10, "training datasets (kohya layout) and their images", _v10),
    Migration(11, "job kinds (training), job metrics, log tail and artifacts", _v11),
    Migration(12, "jobs running elsewhere: the backend's handle to find them again", _v12),
    Migration(13, "failed-login counters shared by every instance on the database", _v13),
    Migration(14, "job leases: the instance holding a running job and until when", _v14),
    Migration(15, "import tasks: the instance home that runs each one", _v15),
    Migration(16, "trainings: the instance that registers a succeeded training's LoRAs", _v16),
    Migration(17, "roles and permissions, allowed roles, scoped expiring API tokens, audit log, UI language", _v17),
    Migration(18, "job quotas per role: an index for the GPU-seconds an owner's jobs ran today", _v18),
    Migration(19, "job quotas per role: a ledger of what deleted jobs and requeued attempts used today", _v19),
]
LATEST = max(m.version for m in MIGRATIONS)  # entries may land out of order; upgrade() sorts

_VERSION_DDL = "CREATE TABLE IF NOT EXISTS schema_version (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)"


def _version(conn: Connection) -> int:
    if not inspect(conn).has_table("schema_version"):
        return 0
    row = conn.execute(text("SELECT version FROM schema_version WHERE id = 1")).first()
    return int(row[0]) if row else 0


def current_version(db: Database) -> int:
    with db.engine.connect() as conn:
        return _version(conn)


def upgrade(db: Database, target: int | None = None) -> int:
    """Bring the database to ``target`` (default: latest); returns the version reached."""
    target = LATEST if target is None else target
    found = current_version(db)
    if found > LATEST:
        raise SchemaError(
            f"the database is at schema version {found}, newer than this release supports ({LATEST}); "
            "upgrade the studio instead of downgrading the data"
        )
    for migration in sorted(MIGRATIONS, key=lambda m: m.version):
        if found < migration.version <= target:
            with db.write() as session:  # one writer at a time, across every instance on this database
                conn = session.connection()
                conn.execute(text(_VERSION_DDL))
                # Instances that start together on one database all found the old version; the first to
                # get here applies the migration, the others see it done and must not apply it again.
                found = max(found, _version(conn))
                if found >= migration.version:
                    continue
                log.info("schema: applying v%d (%s)", migration.version, migration.description)
                migration.apply(conn)
                updated = conn.execute(text("UPDATE schema_version SET version = :v WHERE id = 1"), {"v": migration.version})
                if updated.rowcount == 0:
                    conn.execute(text("INSERT INTO schema_version (id, version) VALUES (1, :v)"), {"v": migration.version})
            found = migration.version
    if db.is_postgresql:
        with db.write() as session:
            conn = session.connection()
            widen_big_integers(conn)
            add_missing_enum_labels(conn)
    return found
