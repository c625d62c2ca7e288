"""Versioned SQL migrations of the ledger database.

A migration is a file ``actors/migrations/NNNN_name.sql``, applied once, in version order,
each in its own transaction together with its row in ``schema_migrations``. An applied
migration is never edited: its SHA-256 is recorded, and ``migrate`` refuses to run when a
file no longer matches, when a recorded version has lost its file, or when a new file sorts
before one already applied. A change is always a new file.

Migrations run inside a transaction, so statements that refuse one (``CREATE INDEX
CONCURRENTLY``, ``ALTER TYPE ... ADD VALUE`` before PostgreSQL 12) cannot be used in them.

They run as the administrative role, which owns what they create: migration 0015 creates
the service's role ``txproc_app`` (without a password; ``actors.database.app_role_url``
sets it) and grants it, table by table, what the service's statements need. A migration
that creates a table after it gets the default privileges 0015 sets, and revokes there
what its table must not allow (UPDATE and DELETE of an append-only table).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from importlib import resources
from importlib.resources.abc import Traversable

import asyncpg

__all__ = ["Migration", "MigrationError", "load_migrations", "migrate"]

MIGRATIONS_PACKAGE = "actors"
MIGRATIONS_DIR_NAME = "migrations"
FILE_NAME_PATTERN = re.compile(r"(?P<version>[0-9]{4})_(?P<name>[a-z0-9][a-z0-9_]*)\.sql")

# The key of the session-level advisory lock held while migrating: "txprocmg" in ASCII, so it
# can be recognized in pg_locks. Advisory locks are scoped to the current database, so
# migrations of different databases never wait on each other.
ADVISORY_LOCK_KEY = 0x7478_7072_6F63_6D67

CONNECT_TIMEOUT_S = 10.0
# Long enough for another process to finish applying the same migrations.
LOCK_TIMEOUT_S = 120.0
STATEMENT_TIMEOUT_S = 600.0
CLOSE_TIMEOUT_S = 5.0

CREATE_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY CHECK (version > 0),
    name       text        NOT NULL,
    checksum   text        NOT NULL CHECK (checksum ~ '^[0-9a-f]{64}$'),
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The migration files and the database's record of them disagree; nothing was applied."""


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: its version, name, SQL text and the SHA-256 hex digest of its bytes."""

    version: int
    name: str
    sql: str
    checksum: str


def load_migrations(source: Traversable | None = None) -> list[Migration]:
    """Read the migration files in ``source``, by default the packaged ones, in version order.

    Only ``*.sql`` files are considered. Raises ``MigrationError`` if a name does not match
    ``NNNN_name.sql`` or has version 0000, if two files share a version, or if there is no
    file at all (a package installed without its data files).
    """
    if source is None:
        source = resources.files(MIGRATIONS_PACKAGE).joinpath(MIGRATIONS_DIR_NAME)
    migrations: dict[int, Migration] = {}
    for entry in source.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = FILE_NAME_PATTERN.fullmatch(entry.name)
        if match is None:
            raise MigrationError(f"migration file name is not NNNN_name.sql: {entry.name}")
        version = int(match["version"])
        if version == 0:
            raise MigrationError(f"migration versions start at 0001: {entry.name}")
        if version in migrations:
            raise MigrationError(f"two migration files have version {version}")
        data = entry.read_bytes()
        migrations[version] = Migration(
            version=version,
            name=match["name"],
            sql=data.decode("utf-8"),
            checksum=hashlib.sha256(data).hexdigest(),
        )
    if not migrations:
        raise MigrationError(f"no migration files in {source}")
    return [migrations[version] for version in sorted(migrations)]


def _plan(migrations: list[Migration], applied: dict[int, str]) -> list[Migration]:
    """Return the migrations still to apply, given the applied versions and their checksums.

    Raises ``MigrationError`` if the applied history and the files disagree.
    """
    by_version = {migration.version: migration for migration in migrations}
    for version, checksum in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            raise MigrationError(f"migration {version} was applied but its file is missing")
        if migration.checksum != checksum:
            raise MigrationError(
                f"migration {version:04d}_{migration.name}.sql changed after it was applied"
                f" (checksum {checksum} recorded, {migration.checksum} on disk);"
                " never edit an applied migration, add a new one"
            )
    pending = [migration for migration in migrations if migration.version not in applied]
    applied_max = max(applied, default=0)
    late = [migration.version for migration in pending if migration.version < applied_max]
    if late:
        raise MigrationError(
            f"migrations {late} sort before the applied migration {applied_max};"
            " renumber them after it"
        )
    return pending


async def migrate(
    url: str,
    *,
    source: Traversable | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
    statement_timeout_s: float = STATEMENT_TIMEOUT_S,
) -> list[int]:
    """Apply the migrations not yet applied to the database at ``url``; return their versions.

    ``source`` is the directory of migration files, by default the packaged one. Processes
    migrating one database at once take turns; the later ones find nothing left to do.
    Raises ``MigrationError`` before applying anything if files and history disagree,
    ``TimeoutError`` if the lock or a statement takes longer than its timeout, and the
    ``asyncpg`` error of a failing migration, whose transaction is then rolled back (the
    migrations before it stay applied).
    """
    migrations = load_migrations(source)
    connection = await asyncpg.connect(url, timeout=connect_timeout_s)
    try:
        # Released when the session ends, also if the connection breaks, so it is never
        # unlocked by hand. Taken before the table is created, because two concurrent
        # CREATE TABLE IF NOT EXISTS can both try to create it.
        await connection.execute(
            "SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY, timeout=lock_timeout_s
        )
        await connection.execute(CREATE_TABLE_SQL, timeout=statement_timeout_s)
        rows = await connection.fetch(
            "SELECT version, checksum FROM schema_migrations", timeout=statement_timeout_s
        )
        pending = _plan(migrations, {row["version"]: row["checksum"] for row in rows})
        for migration in pending:
            async with connection.transaction():
                await connection.execute(migration.sql, timeout=statement_timeout_s)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                    timeout=statement_timeout_s,
                )
        return [migration.version for migration in pending]
    finally:
        await connection.close(timeout=CLOSE_TIMEOUT_S)
