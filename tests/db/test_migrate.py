"""Tests of actors.migrate against a real PostgreSQL: ordering, history, checksums, locking."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import asyncpg
import pytest

from actors.migrate import CONNECT_TIMEOUT_S, MigrationError, load_migrations, migrate

PACKAGED_MIGRATION = Path(__file__).parents[2] / "actors" / "migrations" / "0001_ledger.sql"
LEDGER_TABLES = {
    "accounts",
    "failed_transfers",
    "partition_map",
    "pending_resolutions",
    "shard_epochs",
    "transfers",
}


async def _fetch(url: str, query: str) -> list[asyncpg.Record]:
    """Run one query on a new connection and return its rows."""
    connection = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
    try:
        return await connection.fetch(query, timeout=CONNECT_TIMEOUT_S)
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)


async def _execute(url: str, statement: str) -> None:
    """Run one statement on a new connection."""
    connection = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
    try:
        await connection.execute(statement, timeout=CONNECT_TIMEOUT_S)
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)


async def _tables(url: str) -> set[str]:
    """Return the names of the tables in the public schema."""
    rows = await _fetch(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row["tablename"] for row in rows}


def _write(directory: Path, files: dict[str, str]) -> Path:
    """Write migration files into ``directory`` and return it."""
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


def test_packaged_migrations_load_with_their_file_checksum() -> None:
    """The packaged migrations are found through importlib.resources, checksummed by bytes."""
    migrations = load_migrations()
    assert [m.version for m in migrations][:1] == [1]
    assert migrations[0].name == "ledger"
    assert migrations[0].checksum == hashlib.sha256(PACKAGED_MIGRATION.read_bytes()).hexdigest()


async def test_migrate_applies_every_migration_and_records_it(empty_db_url: str) -> None:
    """A fresh database gets every migration, each recorded with name, checksum and time."""
    migrations = load_migrations()
    applied = await migrate(empty_db_url)
    assert applied == [m.version for m in migrations]
    rows = await _fetch(
        empty_db_url, "SELECT version, name, checksum, applied_at FROM schema_migrations"
    )
    recorded = sorted((row["version"], row["name"], row["checksum"]) for row in rows)
    assert recorded == [(m.version, m.name, m.checksum) for m in migrations]
    assert all(row["applied_at"] is not None for row in rows)
    assert LEDGER_TABLES <= await _tables(empty_db_url)


async def test_second_migrate_applies_nothing(db_url: str) -> None:
    """Migrating an up-to-date database applies nothing and records nothing new."""
    assert await migrate(db_url) == []
    rows = await _fetch(db_url, "SELECT count(*) AS n FROM schema_migrations")
    assert rows[0]["n"] == len(load_migrations())


async def test_changed_applied_migration_is_refused(db_url: str) -> None:
    """A migration whose file no longer matches its recorded checksum stops migrate."""
    await _execute(db_url, "UPDATE schema_migrations SET checksum = repeat('0', 64)")
    with pytest.raises(MigrationError, match="never edit an applied migration"):
        await migrate(db_url)


async def test_recorded_migration_without_file_is_refused(db_url: str) -> None:
    """A version recorded as applied but missing from the files stops migrate."""
    await _execute(
        db_url,
        "INSERT INTO schema_migrations (version, name, checksum)"
        " VALUES (9999, 'gone', repeat('a', 64))",
    )
    with pytest.raises(MigrationError, match="9999 was applied but its file is missing"):
        await migrate(db_url)


async def test_new_migration_applies_alone_and_in_order(empty_db_url: str, tmp_path: Path) -> None:
    """Files added later are applied on the next run, in version order, and only they."""
    source = _write(tmp_path, {"0001_a.sql": "CREATE TABLE a (x int);"})
    assert await migrate(empty_db_url, source=source) == [1]
    _write(tmp_path, {"0003_c.sql": "CREATE TABLE c (x int);", "0002_b.sql": "CREATE TABLE b ();"})
    assert await migrate(empty_db_url, source=source) == [2, 3]
    assert {"a", "b", "c"} <= await _tables(empty_db_url)


async def test_migration_sorting_before_an_applied_one_is_refused(
    empty_db_url: str, tmp_path: Path
) -> None:
    """A new file numbered below an applied migration is refused rather than run late."""
    source = _write(tmp_path, {"0001_a.sql": "SELECT 1;", "0003_c.sql": "SELECT 1;"})
    assert await migrate(empty_db_url, source=source) == [1, 3]
    _write(tmp_path, {"0002_b.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match=r"\[2\] sort before"):
        await migrate(empty_db_url, source=source)


async def test_failing_migration_rolls_back_alone(empty_db_url: str, tmp_path: Path) -> None:
    """A failing migration leaves no trace, while the migrations before it stay applied."""
    source = _write(
        tmp_path,
        {"0001_a.sql": "CREATE TABLE a ();", "0002_b.sql": "CREATE TABLE b (); SELECT 1/0;"},
    )
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(empty_db_url, source=source)
    rows = await _fetch(empty_db_url, "SELECT version FROM schema_migrations")
    assert [row["version"] for row in rows] == [1]
    tables = await _tables(empty_db_url)
    assert "a" in tables
    assert "b" not in tables


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"1_short.sql": ""}, "not NNNN_name.sql"),
        ({"0001_Upper.sql": ""}, "not NNNN_name.sql"),
        ({"0000_zero.sql": ""}, "start at 0001"),
        ({"0001_a.sql": "", "0001_b.sql": ""}, "two migration files have version 1"),
        ({"README.md": ""}, "no migration files"),
    ],
)
def test_bad_migration_files_are_refused(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    """Misnamed, duplicate or missing migration files are refused before any database work."""
    with pytest.raises(MigrationError, match=message):
        load_migrations(_write(tmp_path, files))


async def test_concurrent_migrations_apply_each_version_once(empty_db_url: str) -> None:
    """Processes migrating one fresh database at once take turns and apply each version once."""
    versions = [m.version for m in load_migrations()]
    results = await asyncio.gather(*(migrate(empty_db_url) for _ in range(4)))
    assert sorted(results, key=len) == [[], [], [], versions]
    rows = await _fetch(empty_db_url, "SELECT version FROM schema_migrations ORDER BY version")
    assert [row["version"] for row in rows] == versions


async def test_payments_clearing_layout_is_per_placement_only_on_a_ledger_without_payments(
    empty_db_url: str, db_url: str, tmp_path: Path,
) -> None:
    """Migration 0034: a ledger with no payment or payout yet posts payments against a
    clearing account per placement; one that already has some keeps the provider's one
    clearing account, which its open holds name."""
    packaged = PACKAGED_MIGRATION.parent
    before = _write(tmp_path / "before", {
        path.name: path.read_text() for path in packaged.glob("*.sql") if path.name < "0034"})
    await migrate(empty_db_url, source=before)
    await _execute(empty_db_url, (
        "INSERT INTO payouts (id, merchant_account_id, amount, currency, destination, status,"
        " principal) VALUES ('po_1', 7, 100, 'USD', 'tok_1', 'processing', 'acme')"))
    assert 34 in await migrate(empty_db_url)
    rows = await _fetch(empty_db_url, "SELECT clearing_per_partition FROM payments_layout")
    assert [row["clearing_per_partition"] for row in rows] == [False]
    # The session's ledger was migrated before any payment.
    rows = await _fetch(db_url, "SELECT clearing_per_partition FROM payments_layout")
    assert [row["clearing_per_partition"] for row in rows] == [True]


async def test_several_databases_with_payments_are_refused_on_the_one_clearing_layout(
        empty_db_url: str) -> None:
    """`serve` over several databases with payments needs clearing accounts per placement:
    a ledger that keeps one clearing account per currency is refused, naming the way out."""
    from actors.app.runtime import _require_placed_clearing

    await migrate(empty_db_url)
    await _require_placed_clearing(empty_db_url)  # a new ledger: per placement
    await _execute(empty_db_url, "UPDATE payments_layout SET clearing_per_partition = false")
    with pytest.raises(ValueError, match=r"clearing accounts per placement.*--no-payments"):
        await _require_placed_clearing(empty_db_url)
