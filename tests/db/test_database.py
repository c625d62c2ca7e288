"""Tests of actors.database and the ledger schema against a real PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import asyncpg
import psutil
import pytest

from actors.database import (
    CONNECT_TIMEOUT_S,
    EmbeddedPostgres,
    ShutdownMode,
    create_database,
    database_url_with_name,
    drop_database,
)
from actors.migrate import migrate

ACCOUNT_SQL = (
    "INSERT INTO accounts (id, currency, flags, code, user_data, debits_pending,"
    " debits_posted, credits_pending, credits_posted, timestamp, partition, tenant)"
    " VALUES ($1, 'EUR', 0, 1, '', $2, $3, $4, $5, 1, 0, 1)"
)
TRANSFER_SQL = (
    "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, flags,"
    " pending_id, timeout_s, code, user_data, timestamp, partition, local_legs, tenant)"
    " VALUES ($1, 1, 2, $2, 'EUR', 0, 0, 0, 1, '', 1, 0, 3, 1)"
)
RESOLUTION_SQL = (
    "INSERT INTO pending_resolutions (pending_id, kind, transfer_id, timestamp)"
    " VALUES ($1, $2, $3, 1)"
)


# What a query on a connection whose server session has ended raises.
CONNECTION_LOST = (asyncpg.InterfaceError, asyncpg.PostgresError, OSError)


async def _connect(url: str) -> asyncpg.Connection:
    """Open a connection with an explicit timeout."""
    return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)


@pytest.fixture(scope="module")
async def shared_db_url(pg_admin_url: str) -> AsyncIterator[str]:
    """Yield a migrated database shared by this module's table-style cases, which roll back."""
    # One database for all rows of a table saves a CREATE DATABASE per row; each row runs in
    # a transaction that is rolled back, so rows cannot see each other.
    name = f"txproc_test_{uuid.uuid4().hex[:16]}"
    url = await create_database(pg_admin_url, name)
    try:
        await migrate(url)
        yield url
    finally:
        await drop_database(pg_admin_url, name)


def _server_gone(pid: int) -> bool:
    """Tell whether no process, not even a zombie, is left with the postmaster's pid."""
    return not psutil.pid_exists(pid)


@pytest.mark.parametrize(
    ("statement", "args"),
    [
        pytest.param(ACCOUNT_SQL, (1, -1, 0, 0, 0), id="negative debits_pending"),
        pytest.param(ACCOUNT_SQL, (1, 0, -1, 0, 0), id="negative debits_posted"),
        pytest.param(ACCOUNT_SQL, (1, 0, 0, -1, 0), id="negative credits_pending"),
        pytest.param(ACCOUNT_SQL, (1, 0, 0, 0, -1), id="negative credits_posted"),
        pytest.param(ACCOUNT_SQL, (0, 0, 0, 0, 0), id="account id zero"),
        pytest.param(TRANSFER_SQL, (1, 0), id="zero amount"),
        pytest.param(TRANSFER_SQL, (1, -5), id="negative amount"),
        pytest.param(TRANSFER_SQL, (0, 5), id="transfer id zero"),
        pytest.param(RESOLUTION_SQL, (1, 4, 0), id="unknown resolution kind"),
    ],
)
async def test_schema_checks_reject_invalid_rows(
    shared_db_url: str, statement: str, args: tuple[int, ...]
) -> None:
    """The schema's CHECK constraints refuse each invalid row even if the code let it through."""
    connection = await _connect(shared_db_url)
    try:
        with pytest.raises(asyncpg.CheckViolationError):
            async with connection.transaction():
                await connection.execute(statement, *args, timeout=CONNECT_TIMEOUT_S)
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)


@pytest.mark.parametrize(
    ("statement", "args"),
    [
        pytest.param(ACCOUNT_SQL, (1, 0, 0, 0, 0), id="zero balances"),
        pytest.param(ACCOUNT_SQL, (2**63 - 1, 1, 1, 1, 1), id="largest account id"),
        pytest.param(TRANSFER_SQL, (1, 1), id="amount 1"),
        pytest.param(TRANSFER_SQL, (1, 2**63 - 1), id="amount AMOUNT_MAX"),
        pytest.param(RESOLUTION_SQL, (1, 3, 0), id="expired resolution"),
    ],
)
async def test_schema_accepts_boundary_rows(
    shared_db_url: str, statement: str, args: tuple[int, ...]
) -> None:
    """The rows just inside each CHECK are accepted, so the rejections above are the checks."""
    connection = await _connect(shared_db_url)
    transaction = connection.transaction()
    await transaction.start()
    try:
        await connection.execute(statement, *args, timeout=CONNECT_TIMEOUT_S)
    finally:
        await transaction.rollback()
        await connection.close(timeout=CONNECT_TIMEOUT_S)


async def test_pending_transfer_resolves_once(db_url: str) -> None:
    """A second resolution of the same pending id hits the primary key, whatever its kind."""
    connection = await _connect(db_url)
    try:
        await connection.execute(RESOLUTION_SQL, 7, 1, 8, timeout=CONNECT_TIMEOUT_S)
        with pytest.raises(asyncpg.UniqueViolationError):
            await connection.execute(RESOLUTION_SQL, 7, 2, 9, timeout=CONNECT_TIMEOUT_S)
        kinds = await connection.fetch(
            "SELECT kind FROM pending_resolutions", timeout=CONNECT_TIMEOUT_S
        )
        assert [row["kind"] for row in kinds] == [1]
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_keeps_committed_data(
    embedded_pg: EmbeddedPostgres | None, db_url: str, mode: ShutdownMode
) -> None:
    """After a restart, clean or crash-like, the old postmaster is gone and committed rows stay."""
    if embedded_pg is None:
        pytest.skip("restarting needs the embedded server")
    old_connection = await _connect(db_url)
    try:
        await old_connection.execute(ACCOUNT_SQL, 42, 0, 5, 5, 0, timeout=CONNECT_TIMEOUT_S)
        old_pid = embedded_pg.pid
        assert old_pid is not None

        embedded_pg.restart(mode=mode)

        assert _server_gone(old_pid)
        assert embedded_pg.pid not in (None, old_pid)
        with pytest.raises(CONNECTION_LOST):
            await old_connection.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT_S)
    finally:
        old_connection.terminate()
    connection = await _connect(db_url)
    try:
        posted = await connection.fetchval(
            "SELECT debits_posted FROM accounts WHERE id = 42", timeout=CONNECT_TIMEOUT_S
        )
        assert posted == 5
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)


async def test_stop_leaves_no_server_and_is_idempotent(
    embedded_pg: EmbeddedPostgres | None, pg_admin_url: str
) -> None:
    """A stopped server has no process left, refuses connections, and stops again quietly."""
    if embedded_pg is None:
        pytest.skip("stopping needs the embedded server")
    pid = embedded_pg.pid
    assert pid is not None
    backends = psutil.Process(pid).children(recursive=True)
    assert backends, "a running postmaster has background processes"

    embedded_pg.stop()
    embedded_pg.stop()
    try:
        assert embedded_pg.pid is None
        assert _server_gone(pid)
        assert not any(backend.is_running() for backend in backends)
        with pytest.raises(OSError):
            await _connect(pg_admin_url)
    finally:
        embedded_pg.start(embedded_pg.data_dir)
    connection = await _connect(pg_admin_url)
    try:
        assert await connection.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT_S) == 1
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)


async def test_create_and_drop_database(pg_admin_url: str) -> None:
    """A created database accepts connections; dropping it ends its sessions and is repeatable."""
    name = f"txproc_test_{uuid.uuid4().hex[:16]}"
    url = await create_database(pg_admin_url, name)
    assert url == database_url_with_name(pg_admin_url, name)
    connection = await _connect(url)
    assert await connection.fetchval("SELECT current_database()") == name

    await drop_database(pg_admin_url, name)
    await drop_database(pg_admin_url, name)

    with pytest.raises(CONNECTION_LOST):
        await connection.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT_S)
    connection.terminate()
    admin = await _connect(pg_admin_url)
    try:
        assert not await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name)
    finally:
        await admin.close(timeout=CONNECT_TIMEOUT_S)


@pytest.mark.parametrize("name", ["", "Upper", "1starts_with_digit", 'quote"d', "a" * 64])
async def test_invalid_database_names_are_refused(pg_admin_url: str, name: str) -> None:
    """Names that would need quoting or exceed 63 bytes are refused before reaching SQL."""
    with pytest.raises(ValueError, match="database name"):
        await create_database(pg_admin_url, name)
    with pytest.raises(ValueError, match="database name"):
        await drop_database(pg_admin_url, name)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://postgres@/postgres?host=/tmp/pg/data&port=5432",
            "postgresql://postgres@/ledger_1?host=/tmp/pg/data&port=5432",
        ),
        (
            "postgresql://postgres:@/postgres?host=/tmp/pg",
            "postgresql://postgres:@/ledger_1?host=/tmp/pg",
        ),
        ("postgresql:///postgres?host=/run/pg", "postgresql:///ledger_1?host=/run/pg"),
        (
            "postgresql://postgres@127.0.0.1:5432/postgres",
            "postgresql://postgres@127.0.0.1:5432/ledger_1",
        ),
        (
            "postgres://app:s%40cret@db.example:6432/app?sslmode=require",
            "postgres://app:s%40cret@db.example:6432/ledger_1?sslmode=require",
        ),
        ("postgresql://postgres@localhost", "postgresql://postgres@localhost/ledger_1"),
        (
            "postgresql://postgres@/?host=/tmp/pg&dbname=postgres",
            "postgresql://postgres@/ledger_1?host=/tmp/pg",
        ),
    ],
)
def test_database_url_with_name(url: str, expected: str) -> None:
    """Only the database part of a socket or TCP URL changes; host, port and options stay."""
    assert database_url_with_name(url, "ledger_1") == expected


def test_database_url_with_name_refuses_other_schemes() -> None:
    """A URL that is not postgresql:// is refused rather than silently rewritten."""
    with pytest.raises(ValueError, match="postgresql"):
        database_url_with_name("mysql://root@localhost/x", "ledger_1")


async def test_embedded_url_reaches_the_server_through_its_socket(
    embedded_pg: EmbeddedPostgres | None,
) -> None:
    """The embedded URL connects asyncpg as superuser through the socket the server listens on."""
    if embedded_pg is None:
        pytest.skip("needs the embedded server")
    socket_dir = embedded_pg.url.split("host=", 1)[1].split("&", 1)[0]
    assert os.path.exists(os.path.join(socket_dir, ".s.PGSQL.5432"))
    connection = await _connect(embedded_pg.url)
    try:
        assert await connection.fetchval("SHOW unix_socket_directories") == socket_dir
        assert await connection.fetchval("SHOW listen_addresses") == ""
        assert await connection.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = user")
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE transfers SET amount = amount + 1 WHERE id = 91",
        "DELETE FROM transfers WHERE id = 91",
        "TRUNCATE transfers",
        "UPDATE pending_resolutions SET kind = 2 WHERE pending_id = 92",
        "DELETE FROM pending_resolutions",
        "TRUNCATE pending_resolutions",
        "UPDATE failed_transfers SET result = 1",
        "DELETE FROM failed_transfers",
        "TRUNCATE failed_transfers CASCADE",
    ],
)
async def test_ledger_rows_are_append_only(shared_db_url: str, statement: str) -> None:
    """A committed transfer, resolution or burned id cannot be changed or removed by any
    statement, even the tables' owner's (migration 0011; the service's role is refused
    before the trigger, by privilege: test_app_role.py), even one editing an amount and
    its balance together."""
    connection = await _connect(shared_db_url)
    transaction = connection.transaction()
    await transaction.start()
    try:
        await connection.execute(TRANSFER_SQL, 91, 5, timeout=CONNECT_TIMEOUT_S)
        await connection.execute(RESOLUTION_SQL, 92, 1, 0, timeout=CONNECT_TIMEOUT_S)
        await connection.execute(
            "INSERT INTO failed_transfers (id, result, timestamp) VALUES (93, 48, 1)",
            timeout=CONNECT_TIMEOUT_S)
        with pytest.raises(asyncpg.PostgresError, match="append-only") as refused:
            await connection.execute(statement, timeout=CONNECT_TIMEOUT_S)
        assert refused.value.sqlstate == "TXA01"
    finally:
        await transaction.rollback()
        await connection.close(timeout=CONNECT_TIMEOUT_S)


@pytest.mark.parametrize(
    ("statement", "refusal"),
    [
        ("UPDATE accounts SET currency = 'USD' WHERE id = 94", "append-only"),
        ("UPDATE accounts SET user_data = 'edited' WHERE id = 94", "append-only"),
        ("DELETE FROM accounts WHERE id = 94", "append-only"),
        ("TRUNCATE accounts CASCADE", "append-only"),
        ('UPDATE partition_checkpoints SET "timestamp" = "timestamp" - 1', "only moves forward"),
        ("DELETE FROM partition_checkpoints", "only moves forward"),
        ("UPDATE shard_epochs SET epoch = epoch - 1", "only moves forward"),
        ("DELETE FROM shard_epochs", "only moves forward"),
        ("UPDATE partition_map SET shard = 1", "append-only"),
        ("TRUNCATE remote_posting_blocks", "append-only"),
        ("DELETE FROM remote_posting_blocks", "append-only"),
        ("UPDATE remote_posting_blocks SET shard = shard", "append-only"),
        ("DELETE FROM posting_folds", "append-only"),
        ("UPDATE posting_folds SET seq = seq + 1", "append-only"),
        ("TRUNCATE posting_folds", "append-only"),
        ("UPDATE ledger_chain SET digest = prev_digest", "append-only"),
        ("DELETE FROM ledger_chain", "append-only"),
        ("TRUNCATE ledger_chain", "append-only"),
        ("DELETE FROM ledger_anchors", "append-only"),
    ],
)
async def test_every_ledger_table_only_grows_or_moves_forward(
    shared_db_url: str, statement: str, refusal: str
) -> None:
    """Beyond transfers, resolutions and burned ids (0011), migration 0024 refuses to the
    tables' owner a change of an account's creation, removing an account, moving a
    checkpoint or an epoch back, rewriting the partition map, truncating posting blocks,
    and any change of the hash chain or its anchors; 0027 any change or removal of a
    posting block or a fold horizon."""
    connection = await _connect(shared_db_url)
    transaction = connection.transaction()
    await transaction.start()
    try:
        await connection.execute(
            "INSERT INTO accounts (id, currency, flags, code, user_data, timestamp, partition,"
            " tenant) VALUES (94, 'EUR', 0, 1, '', 1, 0, 1)", timeout=CONNECT_TIMEOUT_S)
        await connection.execute("INSERT INTO shard_epochs VALUES (7, 3)",
                                 timeout=CONNECT_TIMEOUT_S)
        await connection.execute("INSERT INTO partition_map VALUES (255, 7, 'main')"
                                 " ON CONFLICT DO NOTHING", timeout=CONNECT_TIMEOUT_S)
        await connection.execute(
            "INSERT INTO ledger_chain VALUES (7, 1, 3, 1, 0, 1, 0, 0,"
            " decode(repeat('00', 32), 'hex'), decode(repeat('11', 32), 'hex'),"
            " decode(repeat('22', 128), 'hex'))",
            timeout=CONNECT_TIMEOUT_S)
        await connection.execute(
            "INSERT INTO ledger_anchors (at, reason, shards, seqs, digests)"
            " VALUES (now(), 'operator', '{7}', '{1}', ARRAY[decode(repeat('11', 32), 'hex')])",
            timeout=CONNECT_TIMEOUT_S)
        await connection.execute(
            "INSERT INTO remote_posting_blocks (shard, account_ids, debits_pending,"
            " debits_posted, credits_pending, credits_posted)"
            " VALUES (7, '{94}', '{0}', '{0}', '{0}', '{5}')", timeout=CONNECT_TIMEOUT_S)
        await connection.execute(
            "INSERT INTO posting_folds (shard, seq, horizon, epoch, blocks, legs)"
            " VALUES (7, 1, '1', 3, 1, 1)", timeout=CONNECT_TIMEOUT_S)
        # What checkpoints and recoveries do stays allowed.
        await connection.execute("UPDATE accounts SET debits_posted = 5 WHERE id = 94",
                                 timeout=CONNECT_TIMEOUT_S)
        await connection.execute(
            'UPDATE partition_checkpoints SET "timestamp" = "timestamp" + 1',
            timeout=CONNECT_TIMEOUT_S)
        await connection.execute("UPDATE shard_epochs SET epoch = epoch + 1",
                                 timeout=CONNECT_TIMEOUT_S)
        with pytest.raises(asyncpg.PostgresError, match=refusal) as refused:
            await connection.execute(statement, timeout=CONNECT_TIMEOUT_S)
        assert refused.value.sqlstate == "TXA01"
    finally:
        await transaction.rollback()
        await connection.close(timeout=CONNECT_TIMEOUT_S)
