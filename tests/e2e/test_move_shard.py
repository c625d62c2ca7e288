"""A database added to a populated ledger by moving a shard (`txproc move-shard`;
docs/design.md §12, "Moving a shard"; docs/operations.md, "Adding a database").

A `txproc serve` with three shards on one database takes accounts and transfers (each
shard's within it, a two-phase one and a refused one among them); while it runs, the move
is refused; stopped, the move is refused into a database not yet migrated and into one
holding a row of the shard; then shard 2 moves to a second PostgreSQL server (where
dealing would not put it), `txproc verify` passes over both, and `serve` started again
with both URLs answers every account and transfer as before and commits new transfers on
the moved shard, in its new database.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from actors.database import (
    APP_PASSWORD_FILE_NAME,
    APP_ROLE,
    create_database,
    drop_database,
    read_password_file,
    write_password_file,
)
from actors.ledger.relocation import rows_of_shard
from processor.client import Client
from processor.codes import AccountResult, TransferResult
from processor.identity import DEFAULT_TENANT, SCOPES, issue_token, load_or_create_ring
from processor.ledger import PartitionMap
from processor.types import Account, AccountFlags, Transfer, TransferFlags
from tests.e2e.test_several_databases import _free_port, _run, _sleep, _start, _stop

SHARDS = 3
# Shard 2 moves: dealt over two databases it would be in main (shards 0 and 2 in main, 1 in
# db1), so the start after the move finds it only through the layout the databases record.
MOVED = 2
LAYOUT = PartitionMap.uniform(SHARDS)
R = TransferResult


@contextlib.asynccontextmanager
async def _serving(data_dir: Path, urls: list[str]) -> AsyncIterator[tuple[int, str]]:
    """`txproc serve` of three shards over ``urls``, until the block ends: its RPC port
    and a token."""
    rpc_port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TXPROC_DATABASE_URL")}
    proc = _start(["serve", "--data-dir", str(data_dir), "--http-port", str(_free_port()),
                   "--rpc-port", str(rpc_port), "--metrics-port", "0", "--shards", str(SHARDS),
                   "--no-payments", *[a for u in urls for a in ("--database-url", u)]], env)
    try:
        deadline = time.monotonic() + 180
        ready = False
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            try:
                async with Client("127.0.0.1", rpc_port, _token(data_dir)) as c:
                    ready = await c.lookup_accounts([1]) == [None]
            except (OSError, Exception):
                await _sleep(0.5)
        if not ready:
            raise AssertionError(f"never ready; serve said:\n{_stop(proc)[-4000:]}")
        yield rpc_port, _token(data_dir)
    finally:
        _stop(proc)


def _token(data_dir: Path) -> str:
    ring = load_or_create_ring(data_dir, now_s=int(time.time()))
    return issue_token(ring.active.secret, SCOPES, ttl_s=3600, now_s=int(time.time()),
                       tenant=DEFAULT_TENANT, subject="local")


def _move(urls: list[str], *extra: str) -> tuple[int, str]:
    done = _run(["move-shard", "--shard", str(MOVED), "--to", "db1", *extra,
                 *[a for u in urls for a in ("--database-url", u)]])
    return done.returncode, done.stdout + done.stderr


def _ids(shard: int, start: int, count: int) -> Iterator[int]:
    n = start
    made = 0
    while made < count:
        n += 1
        if LAYOUT.shard_of(n) == shard:
            made += 1
            yield n


async def _count(url: str, sql: str, *args: object) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


async def _rows_of_shard(url: str, shard: int, partitions: list[int]) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await rows_of_shard(conn, shard, partitions)
    finally:
        await conn.close()


@pytest.fixture
async def databases(pg_admin_url: str, second_pg_admin_url: str, app_password_file: Path,
                    tmp_path: Path) -> AsyncIterator[tuple[Path, list[str]]]:
    """A data directory and two fresh databases, one on each server."""
    name = f"txproc_move_{uuid.uuid4().hex[:12]}"
    urls = [await create_database(pg_admin_url, name + "_a"),
            await create_database(second_pg_admin_url, name + "_b")]
    password = read_password_file(app_password_file, APP_ROLE)
    assert password is not None
    write_password_file(tmp_path / APP_PASSWORD_FILE_NAME, APP_ROLE, password)
    try:
        yield tmp_path, urls
    finally:
        await drop_database(pg_admin_url, name + "_a")
        await drop_database(second_pg_admin_url, name + "_b")


async def test_a_shard_moves_to_a_new_database(databases: tuple[Path, list[str]]) -> None:
    """Shard 2 of a populated one-database ledger moves to a second server: nothing of it
    stays behind, verify passes over both, and serve over both answers every account and
    transfer as before and commits new ones on the moved shard in its new database."""
    data_dir, (main, second) = databases
    base = int(time.time()) * 1_000_000
    a0, b0 = _ids(0, base, 2)
    a1, b1, c1 = _ids(MOVED, base, 3)
    tids = iter(range(base + 900_000, base + 999_999))
    async with _serving(data_dir, [main]) as (rpc_port, token):
        async with Client("127.0.0.1", rpc_port, token) as client:
            accounts = [Account(id=a, currency="EUR", flags=AccountFlags.HISTORY if a == a1
                                else AccountFlags.NONE) for a in (a0, b0, a1, b1, c1)]
            assert await client.create_accounts(accounts) == [AccountResult.ok] * 5
            hold = next(tids)
            sent = [Transfer(id=next(tids), debit_account_id=a0, credit_account_id=b0,
                             amount=700, currency="EUR"),
                    Transfer(id=next(tids), debit_account_id=a1, credit_account_id=b1,
                             amount=300, currency="EUR"),
                    Transfer(id=hold, debit_account_id=b1, credit_account_id=c1, amount=50,
                             currency="EUR", flags=TransferFlags.PENDING, timeout_s=3600),
                    Transfer(id=next(tids), debit_account_id=b1, credit_account_id=c1,
                             amount=20, currency="EUR", flags=TransferFlags.POST_PENDING,
                             pending_id=hold)]
            for t in sent:
                assert await client.create_transfers([t]) == [R.ok]
            missing = next(_ids(MOVED, base + 500_000, 1))
            refused = Transfer(id=next(tids), debit_account_id=a1, credit_account_id=missing,
                               amount=1, currency="EUR")
            assert await client.create_transfers([refused]) != [R.ok]
            before = await client.lookup_accounts([a0, b0, a1, b1, c1])
            stored = await client.lookup_transfers([t.id for t in sent])
        # While the processor runs, nothing moves.
        code, said = _move([main, second])
        assert code == 1 and "server_running" in said, said

    code, said = _move([main, second])
    assert code == 2 and "not_migrated" in said, said
    done = _run(["migrate", "--database-url", main, "--database-url", second])
    assert done.returncode == 0, done.stdout + done.stderr
    partitions = LAYOUT.partitions_of_shard(MOVED)
    await _plant_and_refuse(main, second, partitions[0])

    code, said = _move([main, second])
    assert code == 0, said
    assert await _rows_of_shard(main, MOVED, partitions) == 0
    assert await _rows_of_shard(second, MOVED, partitions) > 0
    assert await _count(main, "SELECT count(*) FROM account_history WHERE account_id = $1",
                        a1) == 0
    code, said = _move([main, second])
    assert code == 1 and "same_database" in said, said
    _verified([main, second])

    async with _serving(data_dir, [main, second]) as (rpc_port, token), \
            Client("127.0.0.1", rpc_port, token) as client:
        assert await client.lookup_accounts([a0, b0, a1, b1, c1]) == before
        assert await client.lookup_transfers([t.id for t in sent]) == stored
        again = Transfer(id=refused.id, debit_account_id=a1, credit_account_id=b1, amount=1,
                         currency="EUR")
        assert await client.create_transfers([again]) == [R.id_already_failed]
        new = Transfer(id=next(tids), debit_account_id=a1, credit_account_id=b1, amount=5,
                       currency="EUR")
        assert await client.create_transfers([new]) == [R.ok]
        moved = await client.lookup_accounts([a1, b1])
        assert moved[0] is not None and before[2] is not None
        assert moved[0].debits_posted == before[2].debits_posted + 5
        assert await _count(second, "SELECT count(*) FROM transfers WHERE id = $1",
                            new.id) == 1
        assert await _count(main, "SELECT count(*) FROM transfers WHERE id = $1", new.id) == 0
    _verified([main, second])


async def _plant_and_refuse(main: str, second: str, partition: int) -> None:
    """A row of the moved shard already in the target: the move is refused and writes nothing."""
    conn = await asyncpg.connect(second)
    try:
        await conn.execute(
            "INSERT INTO accounts (id, currency, flags, code, user_data, \"timestamp\", "
            "partition, tenant, origin) VALUES (1, 'EUR', 0, 0, '', 1, $1, 0, 0)", partition)
        code, said = _move([main, second])
        assert code == 1 and "target_holds_shard" in said, said
        assert await conn.fetchval("SELECT count(*) FROM transfers") == 0
        async with conn.transaction():  # the test's own row, out again past its trigger
            await conn.execute("ALTER TABLE accounts DISABLE TRIGGER USER")
            await conn.execute("DELETE FROM accounts WHERE id = 1")
            await conn.execute("ALTER TABLE accounts ENABLE TRIGGER USER")
    finally:
        await conn.close()


def _verified(urls: list[str]) -> None:
    done = _run(["verify", "--json", *[a for u in urls for a in ("--database-url", u)]])
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], result["problems"]
    assert result["checked"]["databases"] == 2

