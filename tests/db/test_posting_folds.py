"""Posting blocks are folded by a transaction-id horizon and never deleted (migration 0027).

A checkpoint folds the blocks left for its shard whose transactions had all ended when it
read them, and appends the horizon; readers add the blocks at or above it. These tests
hold a block's transaction open across a checkpoint, roll one back, run writers,
checkpoints and readers at once against a real server, and check that every balance is
always exactly the sum of the committed blocks, which all stay in the table.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg
import numpy as np
import pytest

from actors.ledger.store import FoldHorizonError, LedgerStore, OwnEffects
from processor.ledger import PartitionMap, partition_of
from tests.unit.ledger_sim import account_ids_on_shards

pytestmark = pytest.mark.asyncio

PARTITIONS = PartitionMap.uniform(2)
SHARD = 1  # the shard whose accounts the blocks are for
OWN = PARTITIONS.partitions_of_shard(SHARD)
BLOCK_SQL = (
    "INSERT INTO remote_posting_blocks (shard, account_ids, debits_pending, debits_posted, "
    "credits_pending, credits_posted) VALUES ($1, $2::bigint[], $3::bigint[], $4::bigint[], "
    "$5::bigint[], $6::bigint[])"
)
# Per account of the shard: its stored balance (row plus blocks at or above the horizon,
# what every reader answers) and the sum of every block it sees, in one snapshot. Blocks
# are never deleted, so the second is the truth the first must equal.
BOTH_SQL = """
SELECT a.id, a.credits_posted AS answered,
       coalesce((SELECT sum(l.c) FROM remote_posting_blocks b,
                 unnest(b.account_ids, b.credits_posted) AS l(id, c)
                 WHERE b.shard = $2 AND l.id = a.id), 0)::bigint AS blocks
FROM account_balances a WHERE a.id = ANY($1::bigint[]) ORDER BY a.id
"""


async def _setup(owner_url: str, url: str, accounts: list[int]) -> tuple[LedgerStore, int]:
    """A store connected as the service (``url``, the application role) for a ledger of
    two shards whose partition map and ``accounts`` the owner wrote."""
    owner = await LedgerStore.connect(owner_url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=30)
    try:
        await owner.ensure_partition_map(PARTITIONS)
    finally:
        await owner.close()
    store = await LedgerStore.connect(url, pool_size_max=4, connect_timeout_s=10,
                                      command_timeout_s=30)
    epoch = await store.take_epoch(SHARD)
    conn = await asyncpg.connect(url)
    try:
        await conn.executemany(
            "INSERT INTO accounts (id, currency, flags, code, user_data, \"timestamp\", "
            "partition, tenant) VALUES ($1, 'EUR', 0, 1, '', 1, $2, 0)",
            [(i, partition_of(i)) for i in accounts])
    finally:
        await conn.close()
    return store, epoch


async def _block(conn: asyncpg.Connection, account: int, credit: int) -> None:
    await conn.execute(BLOCK_SQL, SHARD, [account], [0], [0], [0], [credit])


async def _rows(conn: asyncpg.Connection, ids: list[int]) -> dict[int, int]:
    """Each account's folded credits (its balance row alone)."""
    rows = await conn.fetch(
        "SELECT id, credits_posted FROM accounts WHERE id = ANY($1::bigint[])", ids)
    return {r["id"]: r["credits_posted"] for r in rows}


async def _answered(store: LedgerStore, ids: list[int]) -> dict[int, int]:
    return {i: a.credits_posted for i, a in (await store.lookup_accounts(ids)).items()}


async def test_an_open_block_is_folded_once_after_it_commits(db_url: str,
                                                             app_db_url: str) -> None:
    """A block whose transaction is open while a checkpoint folds is not folded then, nor
    skipped later: readers count it from its commit, the next checkpoint folds it, and a
    rolled-back block never counts; every block stays in the table."""
    [_, [a, b]] = account_ids_on_shards(PARTITIONS, 2)
    store, epoch = await _setup(db_url, app_db_url, [a, b])
    early, open_, late, reader = [await asyncpg.connect(app_db_url) for _ in range(4)]
    try:
        await _block(early, a, 10)  # committed before anything
        slow = open_.transaction()
        await slow.start()
        await _block(open_, a, 100)  # its transaction takes an id and stays open
        await _block(late, b, 1_000)  # a later id, committed at once
        doomed = late.transaction()
        await doomed.start()
        await _block(late, b, 99_999)
        await doomed.rollback()

        await store.checkpoint(SHARD, epoch, OWN)
        # The horizon stops below the open transaction: the early block is folded, the
        # later committed one waits above the horizon (it is still counted by readers).
        assert await _rows(reader, [a, b]) == {a: 10, b: 0}
        assert await _answered(store, [a, b]) == {a: 10, b: 1_000}
        folds = await reader.fetch("SELECT seq, blocks, legs, epoch FROM posting_folds "
                                   "WHERE shard = $1 ORDER BY seq", SHARD)
        assert [tuple(f) for f in folds] == [(1, 1, 1, epoch)]

        # A snapshot taken now keeps its answer across the next fold.
        snapshot = reader.transaction(isolation="repeatable_read")
        await snapshot.start()
        before = {r["id"]: r["credits_posted"] for r in await reader.fetch(
            "SELECT id, credits_posted FROM account_balances WHERE id = ANY($1::bigint[])",
            [a, b])}
        await slow.commit()
        assert await _answered(store, [a, b]) == {a: 110, b: 1_000}
        await store.checkpoint(SHARD, epoch, OWN, own=OwnEffects(
            np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.int64), 0))
        during = {r["id"]: r["credits_posted"] for r in await reader.fetch(
            "SELECT id, credits_posted FROM account_balances WHERE id = ANY($1::bigint[])",
            [a, b])}
        assert during == before == {a: 10, b: 1_000}
        await snapshot.rollback()

        assert await _rows(reader, [a, b]) == {a: 110, b: 1_000}
        assert await _answered(store, [a, b]) == {a: 110, b: 1_000}
        assert await reader.fetchval("SELECT count(*) FROM remote_postings_unfolded") == 0
        assert await reader.fetchval("SELECT count(*) FROM remote_posting_blocks") == 3
        horizons = await reader.fetch(
            "SELECT seq, horizon::text::bigint AS h FROM posting_folds WHERE shard = $1 "
            "ORDER BY seq", SHARD)
        assert [r["seq"] for r in horizons] == [1, 2]
        assert horizons[0]["h"] < horizons[1]["h"]

        # Nothing new: a checkpoint appends no horizon.
        await store.checkpoint(SHARD, epoch, OWN)
        assert await reader.fetchval(
            "SELECT count(*) FROM posting_folds WHERE shard = $1", SHARD) == 2
    finally:
        for c in (early, open_, late, reader):
            await c.close()
        await store.close()


async def test_a_block_records_its_own_transaction(db_url: str, app_db_url: str) -> None:
    """Whatever an INSERT names as a block's transaction id, the inserting transaction's
    is stored, and the service's role may neither change nor remove a block."""
    [_, [a]] = account_ids_on_shards(PARTITIONS, 1)
    store, _ = await _setup(db_url, app_db_url, [a])
    conn = await asyncpg.connect(app_db_url)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO remote_posting_blocks (shard, account_ids, debits_pending, "
                "debits_posted, credits_pending, credits_posted, xid) "
                "VALUES (1, $1::bigint[], '{0}', '{0}', '{0}', '{5}', '3')", [a])
            assert await conn.fetchval(
                "SELECT xid = pg_current_xact_id() FROM remote_posting_blocks") is True
        for statement in ("DELETE FROM remote_posting_blocks",
                          "UPDATE remote_posting_blocks SET xid = '3'",
                          "DELETE FROM posting_folds"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()
        await store.close()


async def test_a_horizon_ahead_of_the_transaction_ids_stops_the_checkpoint(
    db_url: str, app_db_url: str
) -> None:
    """A fold horizon above every transaction id the server can still hand out (a ledger
    restored into another cluster) makes the checkpoint refuse, and a new block for that
    shard refuse itself, rather than let a block count as folded without being folded;
    nothing is folded."""
    [_, [a]] = account_ids_on_shards(PARTITIONS, 1)
    store, epoch = await _setup(db_url, app_db_url, [a])
    owner = await asyncpg.connect(db_url)
    try:
        await _block(owner, a, 5)
        await owner.execute(
            "INSERT INTO posting_folds (shard, seq, horizon, epoch, blocks, legs) "
            "VALUES ($1, 1, (pg_current_xact_id()::text::bigint + 1000000)::text::xid8, "
            "$2, 1, 1)", SHARD, epoch)
        with pytest.raises(FoldHorizonError):
            await store.checkpoint(SHARD, epoch, OWN)
        assert await _rows(owner, [a]) == {a: 0}
        with pytest.raises(asyncpg.PostgresError, match="below its fold horizon") as refused:
            await _block(owner, a, 7)
        assert refused.value.sqlstate == "TXP01"
        assert await owner.fetchval("SELECT count(*) FROM remote_posting_blocks") == 1
    finally:
        await owner.close()
        await store.close()


async def test_balances_equal_the_committed_blocks_under_concurrent_folds(
    db_url: str, app_db_url: str,
) -> None:
    """Writers commit or roll back blocks while holding their transactions open for random
    times, checkpoints fold over and over, and readers check in every snapshot that each
    balance equals the sum of the blocks it sees (which are never deleted); at the end the
    balance rows alone hold exactly what the writers committed."""
    accounts = account_ids_on_shards(PARTITIONS, 4)[SHARD]
    store, epoch = await _setup(db_url, app_db_url, accounts)
    committed = dict.fromkeys(accounts, 0)
    rng = random.Random(12)
    writing = True
    mismatches: list[object] = []
    reads = folds = 0

    async def writer(seed: int) -> None:
        own_rng = random.Random(seed)
        conn = await asyncpg.connect(app_db_url)
        try:
            for _ in range(40):
                account, credit = own_rng.choice(accounts), own_rng.randint(1, 1_000)
                tx = conn.transaction()
                await tx.start()
                await _block(conn, account, credit)
                await asyncio.sleep(own_rng.random() * 0.03)
                if own_rng.random() < 0.2:
                    await tx.rollback()
                else:
                    await tx.commit()
                    committed[account] += credit
        finally:
            await conn.close()

    async def checkpoints() -> None:
        nonlocal folds
        empty = OwnEffects(np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.int64), 0)
        while writing:
            await store.checkpoint(SHARD, epoch, OWN,
                                   own=empty if rng.random() < 0.5 else None)
            folds += 1
            await asyncio.sleep(rng.random() * 0.01)

    async def reader() -> None:
        nonlocal reads
        conn = await asyncpg.connect(app_db_url)
        try:
            while writing:
                for row in await conn.fetch(BOTH_SQL, accounts, SHARD):
                    if row["answered"] != row["blocks"]:
                        mismatches.append(dict(row))
                reads += 1
                await asyncio.sleep(0.002)
        finally:
            await conn.close()

    try:
        background = [asyncio.create_task(checkpoints()), asyncio.create_task(reader())]
        await asyncio.gather(*(writer(seed) for seed in range(4)))
        writing = False
        await asyncio.gather(*background)
        assert not mismatches
        assert reads > 10 and folds > 10
        assert await _answered(store, accounts) == committed
        await store.checkpoint(SHARD, epoch, OWN)
        conn = await asyncpg.connect(app_db_url)
        try:
            assert await _rows(conn, accounts) == committed
            assert await conn.fetchval("SELECT count(*) FROM remote_postings_unfolded") == 0
            # Horizons only move up, and each fold moved at least one block.
            horizons = [r["h"] for r in await conn.fetch(
                "SELECT horizon::text::bigint AS h FROM posting_folds WHERE shard = $1 "
                "ORDER BY seq", SHARD)]
            assert horizons == sorted(horizons) and len(set(horizons)) == len(horizons)
        finally:
            await conn.close()
    finally:
        await store.close()
