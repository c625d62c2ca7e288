"""A database added to a populated ledger by moving a shard (`txproc move-shard`;
docs/design.md §12, "Moving a shard"; docs/operations.md, "Adding a database").

A `txproc serve` with three shards on one database takes accounts and transfers (each
shard's within it, a two-phase one and a refused one among them, and cross-shard ones of
every kind joining the moved shard to a staying one); while it runs, the move is refused;
stopped, the move is refused into a database not yet migrated and into one holding a row
of the shard; then shard 2 moves to a second PostgreSQL server (where dealing would not
put it), each database keeping mirrors of the other's transfers that reach its accounts
(migration 0037), `txproc verify` passes over both, and `serve` started again with both
URLs answers every account and transfer as before and commits new transfers on the moved
shard, in its new database.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
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
from processor.history import AccountBalancesAt
from processor.identity import DEFAULT_TENANT, SCOPES, issue_token, load_or_create_ring
from processor.ledger import PartitionMap
from processor.types import Account, AccountFlags, Transfer, TransferFlags
from tests.e2e.test_several_databases import _run, _sleep, _start, _stop
from tests.ports import free_port

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
    rpc_port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TXPROC_DATABASE_URL")}
    proc = _start(["serve", "--data-dir", str(data_dir), "--http-port", str(free_port()),
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
    """Shard 2 of a populated one-database ledger moves to a second server. Its accounts
    carry transfers within it (a two-phase one and a refused one among them) and transfers
    joining it to shard 0 of every cross-shard kind, both ways (plain, posted, voided,
    expired). While serve runs, the move is refused; stopped, it is refused into a database
    not yet migrated and into one holding a row of the shard. Then nothing of the shard
    stays behind, each database keeps mirrors of the other's transfers that reach its
    accounts, and verify passes over both (each database's balances explained by its stored
    transfers and mirrors, every mirror equal to its stored original). serve over both
    answers every balance, transfer lookup, account history and balance at an instant as
    before, the query and the stream list each transfer once, a refused id stays refused,
    and new transfers commit within the moved shard (in its new database), across shards
    within a database and between the databases. A mirror changed is then found by verify.

    One ledger serves both stories (a shard on its own, a shard joined to a staying one):
    every serve start is a Ray of its own, the suite's most expensive step."""
    data_dir, (main, second) = databases
    base = int(time.time()) * 1_000_000
    # Within shards: a0, b0 on shard 0; a1, b1, c1 on the moved one.
    a0, b0 = _ids(0, base, 2)
    a1, b1, c1 = _ids(MOVED, base, 3)
    # Across shards: j0, k0 on shard 0, c2 on shard 1, a2, b2 on the moved one.
    j0, k0 = _ids(0, base + 7_000, 2)
    (c2,) = _ids(1, base + 7_000, 1)
    a2, b2 = _ids(MOVED, base + 7_000, 2)
    tids = iter(range(base + 900_000, base + 999_999))

    def t(debit: int, credit: int, amount: int, **kw: Any) -> Transfer:
        return Transfer(id=next(tids), debit_account_id=debit, credit_account_id=credit,
                        amount=amount, currency="EUR", **kw)

    watched = [a0, b0, a1, b1, c1, j0, k0, c2, a2, b2]
    async with _serving(data_dir, [main]) as (rpc_port, token):
        async with Client("127.0.0.1", rpc_port, token) as client:
            accounts = [Account(id=a, currency="EUR", flags=AccountFlags.HISTORY
                                if a in (a1, a2) else AccountFlags.NONE) for a in watched]
            assert await client.create_accounts(accounts) == [AccountResult.ok] * 10
            hold = t(b1, c1, 50, flags=TransferFlags.PENDING, timeout_s=3600)
            within = [t(a0, b0, 700), t(a1, b1, 300), hold,
                      t(b1, c1, 20, flags=TransferFlags.POST_PENDING, pending_id=hold.id)]
            hold_in, hold_out, lapsing = (
                t(j0, a2, 50, flags=TransferFlags.PENDING, timeout_s=3600),
                t(a2, k0, 20, flags=TransferFlags.PENDING, timeout_s=3600),
                t(j0, b2, 10, flags=TransferFlags.PENDING, timeout_s=1))
            across = [t(j0, a2, 100), t(a2, k0, 30), t(a2, b2, 7), t(j0, c2, 3), hold_in,
                      hold_out, lapsing]
            across += [t(j0, a2, 40, flags=TransferFlags.POST_PENDING, pending_id=hold_in.id),
                       t(a2, k0, 20, flags=TransferFlags.VOID_PENDING, pending_id=hold_out.id)]
            for one in within + across:
                assert await client.create_transfers([one]) == [R.ok], one
            missing = next(_ids(MOVED, base + 500_000, 1))
            refused = t(a1, missing, 1)
            assert await client.create_transfers([refused]) != [R.ok]
            deadline = time.monotonic() + 30  # the short hold expires
            while _plus((await client.lookup_accounts([b2]))[0]).credits_pending:
                assert time.monotonic() < deadline, "the hold never expired"
                await _sleep(0.5)
            stamps = [s.timestamp for s in
                      await client.lookup_transfers([across[0].id, across[1].id])
                      if s is not None]
            instants = [stamps[0], stamps[1] - 1, time.time_ns()]
            ids = [one.id for one in within + across]
            before = await _seen(client, watched, within + across, a2, instants)
        # While the processor runs, nothing moves.
        code, said = _move([main, second])
        assert code == 1 and "server_running" in said, said
    assert len(before.history) == 7 and before.queried == before.streamed == sorted(ids)
    assert before.accounts[8] is not None and before.accounts[8].credits_posted == 140

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
    # Each database keeps mirrors of the transfers stored in the other with a leg on its
    # accounts: the main one of the moved shard's (30, the hold of 20 and its void), the
    # new one of shard 0's (100, the hold of 50 and its post, the lapsed hold). Transfers
    # within a shard need none.
    mirrors = "SELECT array_agg(id ORDER BY id) FROM mirrored_transfers"
    assert await _fetchval(main, mirrors) == sorted([across[1].id, hold_out.id, across[8].id])
    assert await _fetchval(second, mirrors) == sorted(
        [across[0].id, hold_in.id, across[7].id, lapsing.id])
    assert await _fetchval(second, "SELECT count(*) FROM mirrored_resolutions") == 2
    code, said = _move([main, second])
    assert code == 1 and "same_database" in said, said
    checked = _verified([main, second])["checked"]
    assert checked["mirrors_checked"] == 7 + 3 and checked["mirrored_transfers"] == 7

    async with _serving(data_dir, [main, second]) as (rpc_port, token), \
            Client("127.0.0.1", rpc_port, token) as client:
        after = await _seen(client, watched, within + across, a2, instants)
        assert after == before
        again = Transfer(id=refused.id, debit_account_id=a1, credit_account_id=b1, amount=1,
                         currency="EUR")
        assert await client.create_transfers([again]) == [R.id_already_failed]
        new = t(a1, b1, 5)
        fresh = [new, t(j0, c2, 2), t(a2, b2, 1), t(j0, a2, 5), t(a2, k0, 4)]
        assert await client.create_transfers(fresh) == [R.ok] * 5
        was = before.accounts
        assert await client.lookup_accounts([a1, j0, c2, a2]) == [
            _plus(was[2], debits_posted=5), _plus(was[5], debits_posted=7),
            _plus(was[7], credits_posted=2), _plus(was[8], debits_posted=5, credits_posted=5)]
        assert await _count(second, "SELECT count(*) FROM transfers WHERE id = $1",
                            new.id) == 1
        assert await _count(main, "SELECT count(*) FROM transfers WHERE id = $1", new.id) == 0
    _verified([main, second])

    # A mirror changed: the moved account's balance no longer follows from the rows, and
    # the mirror equals no stored transfer.
    conn = await asyncpg.connect(second)
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE mirrored_transfers DISABLE TRIGGER USER")
            await conn.execute("UPDATE mirrored_transfers SET amount = amount + 1 "
                               "WHERE id = $1", across[0].id)
            await conn.execute("ALTER TABLE mirrored_transfers ENABLE TRIGGER USER")
    finally:
        await conn.close()
    done = _run(["verify", "--json", "--database-url", main, "--database-url", second])
    problems = {(str(p["id"]), p["kind"]) for p in json.loads(done.stdout)["problems"]}
    assert done.returncode == 1
    assert {(str(a2), "credits_posted_mismatch"),
            (str(across[0].id), "mirror_without_original")} <= problems, problems


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


def _verified(urls: list[str]) -> dict[str, Any]:
    done = _run(["verify", "--json", *[a for u in urls for a in ("--database-url", u)]])
    result: dict[str, Any] = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], result["problems"]
    assert result["checked"]["databases"] == 2
    return result



# What the reads answer about the moved shard's accounts and the ledger's transfers, to be
# the same before and after the move (the stream and the query: each id exactly once).
@dataclass(frozen=True)
class _Seen:
    accounts: list[Account | None]
    transfers: list[Transfer | None]
    history: list[int]
    balances_at: list[AccountBalancesAt]
    queried: list[int]
    streamed: list[int]


async def _seen(client: Client, accounts: list[int], transfers: list[Transfer], moved: int,
                instants: list[int]) -> _Seen:
    """The reads once every transfer is inside the horizon (lists serve only rows at or
    below it; an idle shard moves it within seconds) and ``moved``'s history holds each of
    its transfers (the history indexer copies rows below the horizon a window at a time,
    so it may trail the query and the stream by a window)."""
    ids = [one.id for one in transfers]
    mine = {one.id for one in transfers if moved in (one.debit_account_id,
                                                     one.credit_account_id)}
    deadline = time.monotonic() + 60
    while True:
        history = [t.id for t in (await client.get_account_transfers(moved, limit=100)).data]
        queried = [t.id for t in (await client.query_transfers(limit=100)).data]
        streamed: list[int] = []
        cursor = ""
        while page := await client.stream_transfers(cursor, limit=100):
            streamed += [t.id for t in page.data]
            cursor = page.next_cursor
            if not page.data:
                break
        if (set(ids) <= set(queried) and set(ids) <= set(streamed) and mine <= set(history)) \
                or time.monotonic() > deadline:
            break
        await _sleep(0.5)
    return _Seen(await client.lookup_accounts(accounts), await client.lookup_transfers(ids),
                 history, [await client.get_account_balances(moved, at) for at in instants],
                 sorted(queried), sorted(streamed))


def _plus(account: Account | None, **added: int) -> Account:
    """``account`` (which must exist) with ``added`` added to those balances."""
    assert account is not None
    return msgspec.structs.replace(
        account, **{field: getattr(account, field) + n for field, n in added.items()})


async def _fetchval(url: str, sql: str) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()
