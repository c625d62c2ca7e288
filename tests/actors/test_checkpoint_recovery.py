"""Recovery from a checkpoint plus replay, after a SIGKILL between checkpoints.

A separate process holds two shards that commit every kind of transfer after their last
checkpoint (``checkpoint_worker``) and is SIGKILLed. The balance rows are then stale: the
committed balances exist only as checkpoint + appended rows + postings. New shards recover
from that, and must hold exactly the balances the ledger's full recomputation gives, fold
them at their first checkpoint, and enforce limits against them; their hash chains go on
from the killed incarnations' last links.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import asyncpg
import pytest

from actors.ledger import verify
from actors.ledger.store import LedgerStore
from processor.codes import TransferResult
from processor.types import Account, Transfer
from tests.actors.checkpoint_worker import (
    ENCODER,
    RESULTS,
    Gateway,
    account_ids,
    start_shards,
)

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parents[2]
BALANCES = ("debits_pending", "debits_posted", "credits_pending", "credits_posted")
UNFOLDED_SQL = """
SELECT count(*) FROM transfers t JOIN partition_checkpoints c ON c.partition = t.partition
WHERE t."timestamp" > c."timestamp"
"""


async def _run_worker_until_done(db_url: str) -> tuple[asyncio.subprocess.Process, list[dict]]:
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.actors.checkpoint_worker", db_url,
        cwd=REPO, stdout=asyncio.subprocess.PIPE)
    assert worker.stdout is not None
    lines: list[dict] = []
    try:
        while True:
            line = await asyncio.wait_for(worker.stdout.readline(), timeout=120)
            assert line, f"the worker ended early (exit {await worker.wait()})"
            lines.append(json.loads(line))
            if lines[-1].get("done"):
                return worker, lines
    except BaseException:
        worker.kill()
        await worker.wait()
        raise


async def _balances(conn: asyncpg.Connection, table: str, ids: list[int]) -> dict[int, tuple]:
    rows = await conn.fetch(
        f"SELECT id, {', '.join(BALANCES)} FROM {table} WHERE id = ANY($1::bigint[])", ids)
    return {r["id"]: tuple(r[b] for b in BALANCES) for r in rows}


async def test_sigkill_between_checkpoints_recovers_by_replay(db_url: str) -> None:
    worker, lines = await _run_worker_until_done(db_url)
    accounts = account_ids(6)
    conn = await asyncpg.connect(db_url)
    store = await LedgerStore.connect(db_url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=60)
    shards = []
    try:
        # Killed with everything since recovery unfolded: stale rows, appended transfers.
        assert await conn.fetchval(UNFOLDED_SQL) > 2_000
        os.kill(worker.pid, signal.SIGKILL)
        assert await worker.wait() == -signal.SIGKILL
        rows = await _balances(conn, "accounts", accounts)
        committed = await _balances(conn, "account_balances", accounts)
        assert rows != committed
        assert all(v == (0, 0, 0, 0) for v in rows.values())
        assert await conn.fetchval("SELECT count(*) FROM pending_resolutions WHERE kind = 3")
        audit = await store.audit()  # checkpoint + replay equals the full recomputation
        assert audit.passed and audit.transfers > 2_000, audit
        assert sum(1 for line in lines if line.get("failed") == 0) == 2
        [chain] = [line for line in lines if len(line.get("ids", ())) == 2]
        assert chain["codes"] == [0, 0]  # coordinated away from its first debit account

        # Short intervals now: the first checkpoint folds from the rows, later ones fold
        # what the new incarnation's commits answered.
        shards = start_shards(db_url, checkpoint_interval_s=0.2, in_test=True)
        for s in shards:
            await s.ready()
        recovered = {}
        for s in shards:
            book = s._require_book()
            for account_id, state in book.accounts.items():
                recovered[account_id] = tuple(getattr(state, b) for b in BALANCES)
        assert recovered == committed

        # The recovery checkpoint folded it all: rows are the balances, nothing unfolded.
        for _ in range(100):
            stats = [await s.stats() for s in shards]
            if all(st["checkpoints"] >= 1 for st in stats):
                break
            await asyncio.sleep(0.05)
        assert await _balances(conn, "accounts", accounts) == committed
        assert await conn.fetchval(UNFOLDED_SQL) == 0
        # Blocks are kept (never deleted), all below their shard's fold horizon.
        assert await conn.fetchval("SELECT count(*) FROM remote_postings_unfolded") == 0
        newest = await conn.fetchval('SELECT max("timestamp") FROM transfers')
        assert all(s._require_book().last_timestamp >= newest for s in shards)

        # The recovered balance is what the limit is checked against: a customer can spend
        # exactly what it has, and not one unit more.
        ops, customer = accounts[0], accounts[1]
        d_pending, d_posted, _, c_posted = committed[customer]
        available = c_posted - d_posted - d_pending
        assert available > 0
        owner = shards[0] if customer in shards[0]._require_book().accounts else shards[1]

        async def send(tid: int, amount: int) -> int:
            t = Transfer(id=tid, debit_account_id=customer, credit_account_id=ops,
                         amount=amount, currency="EUR")
            raw = await asyncio.wait_for(owner.create_transfers(ENCODER.encode([[t]])), 30)
            return RESULTS.decode(raw)[0][0]

        assert await send(90_000_001, available) == TransferResult.ok
        assert await send(90_000_002, 1) == TransferResult.exceeds_credits
        assert (await store.audit()).passed
        after = await _balances(conn, "account_balances", accounts)
        assert after[customer] == (d_pending, c_posted - d_pending, 0, c_posted)
        counts = [(await s.stats())["checkpoints"] for s in shards]
        for _ in range(100):
            stats = [await s.stats() for s in shards]
            if all(st["checkpoints"] > c + 1 for st, c in zip(stats, counts, strict=True)):
                break
            await asyncio.sleep(0.05)
        assert await _balances(conn, "accounts", accounts) == after
        assert (await store.audit()).passed
        # The killed incarnations' links and the new ones' form one chain per shard, and
        # every row of every kind belongs to it (txproc verify, on the live shards).
        await store.anchor("operator")
        proof = await verify(db_url)
        assert proof.report.problems == []
        assert proof.report.checked["links"] > 2
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        for s in shards:
            await s.stop()
        await store.close()
        await conn.close()



async def test_light_traffic_checkpoints_at_the_long_interval(db_url: str) -> None:
    """Below ``checkpoint_rows`` unfolded transfers a shard waits for the long interval
    (light traffic: a checkpoint's burst of work would slow the commits of single
    requests); from it on, the short interval applies."""
    shards = start_shards(db_url, checkpoint_interval_s=0.1, in_test=True,
                          checkpoint_interval_max_s=3600.0, checkpoint_rows=6)
    try:
        for s in shards:
            await s.ready()
        ids = account_ids(2)
        for n, s in enumerate(shards):  # ids alternate shards, 0 first
            await s.create_accounts(ENCODER.encode([[Account(id=i, currency="EUR")
                                                     for i in ids[n::2]]]))
        gateway = Gateway(shards)

        async def send(first_id: int, count: int) -> None:
            for i in range(first_id, first_id + count):  # all on shard 0's accounts
                assert await gateway.transfers([Transfer(
                    id=i, debit_account_id=ids[0], credit_account_id=ids[2], amount=1,
                    currency="EUR")]) == [0]

        async def checkpoints() -> int:
            return int((await shards[0].stats())["checkpoints"])

        await send(1_000, 5)
        await asyncio.sleep(0.5)
        assert await checkpoints() == 0  # 5 rows: the long interval
        await send(2_000, 1)
        for _ in range(100):
            if await checkpoints() >= 1:
                break
            await asyncio.sleep(0.02)
        assert await checkpoints() == 1
    finally:
        for s in shards:
            await s.stop()
