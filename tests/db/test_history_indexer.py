"""The account-history indexer and the reads over it, against a real PostgreSQL.

A random ledger of plain, pending, post, void and expired transfers (some sharing a
timestamp) is written straight into ``transfers`` and ``pending_resolutions``, with a fixed
horizon above all of it. The indexer (as the service's role) copies it into
``account_history`` in small windows and is killed (its backend terminated) in the middle
of a window's INSERT; a new one goes on. The table must then equal the recomputation from
the rows (one row per leg and per expiry, nothing missing or doubled, the running balances
of the flagged accounts), and ``txproc verify``'s check must agree. The reads must give the
same pages and the same balances at every instant, equal to the reference replay, whatever
the indexer's position: 0 (nothing indexed), in the middle, or caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from actors.ledger.history import HistoryStore
from actors.ledger.indexer import HistoryIndexer
from actors.ledger.verify import VerifyContext, check_account_history
from processor.history import AccountTransfersFilter, Expiry, balances_at
from processor.identity import PROCESSOR_TENANT
from processor.ledger import Report
from processor.types import AccountFlags, Transfer, TransferFlags

pytestmark = pytest.mark.asyncio

PENDING, POST, VOID = (int(TransferFlags.PENDING), int(TransferFlags.POST_PENDING),
                       int(TransferFlags.VOID_PENDING))
HISTORY = int(AccountFlags.HISTORY)
BASE_NS = 1_790_000_000_000_000_000
ACCOUNTS = [11, 12, 13, 14, 15]
FLAGGED = {11, 13}


@dataclass
class Workload:
    transfers: list[Transfer]
    expiries: list[Expiry]
    resolutions: list[tuple[int, int, int, int]]  # pending_id, kind, transfer_id, timestamp
    horizon: int


def _workload(seed: int, steps: int = 160) -> Workload:
    rng = random.Random(seed)
    ts = BASE_NS
    transfers: list[Transfer] = []
    expiries: list[Expiry] = []
    resolutions: list[tuple[int, int, int, int]] = []
    holds: list[Transfer] = []
    next_id = 1000
    for _ in range(steps):
        # Now and then two movements share an instant (two shards' clocks).
        ts += 0 if rng.random() < 0.1 else rng.randrange(1, 5_000_000)
        kind = rng.choice(["plain", "plain", "pending", "post", "void", "expire"])
        next_id += rng.randrange(1, 4)
        if kind in ("post", "void", "expire"):
            if not holds:
                continue
            hold = holds.pop(rng.randrange(len(holds)))
            if kind == "expire":
                ts += 1
                expiries.append(Expiry(hold.id, ts))
                resolutions.append((hold.id, 3, 0, ts))
                continue
            t = Transfer(id=next_id, debit_account_id=hold.debit_account_id,
                         credit_account_id=hold.credit_account_id,
                         amount=rng.randrange(1, hold.amount + 1) if kind == "post"
                         else hold.amount, currency="EUR",
                         flags=POST if kind == "post" else VOID, pending_id=hold.id,
                         timestamp=ts)
            resolutions.append((hold.id, 1 if kind == "post" else 2, t.id, ts))
        else:
            debit, credit = rng.sample(ACCOUNTS, 2)
            t = Transfer(id=next_id, debit_account_id=debit, credit_account_id=credit,
                         amount=rng.randrange(1, 1_000), currency="EUR",
                         flags=PENDING if kind == "pending" else 0, timestamp=ts)
            if kind == "pending":
                holds.append(t)
        transfers.append(t)
    return Workload(transfers, expiries, resolutions, ts + 1)


def _expected_rows(w: Workload, flagged: set[int]) -> list[tuple[Any, ...]]:
    """account_history as it must be: one row per leg and per expiry, in key order, with
    running balances for the flagged accounts."""
    by_id = {t.id: t for t in w.transfers}
    moves: list[tuple[int, int, int, int, bool, int, int]] = []
    for t in w.transfers:
        if t.flags & PENDING:
            pend, post = t.amount, 0
        elif t.flags & (POST | VOID):
            pend, post = -by_id[t.pending_id].amount, t.amount if t.flags & POST else 0
        else:
            pend, post = 0, t.amount
        moves.append((t.debit_account_id, t.timestamp, t.id, 1, False, pend, post))
        moves.append((t.credit_account_id, t.timestamp, t.id, 2, False, pend, post))
    for e in w.expiries:
        hold = by_id[e.pending_id]
        moves.append((hold.debit_account_id, e.timestamp, hold.id, 1, True, -hold.amount, 0))
        moves.append((hold.credit_account_id, e.timestamp, hold.id, 2, True, -hold.amount, 0))
    moves.sort(key=lambda m: m[:3])
    rows: list[tuple[Any, ...]] = []
    running: dict[int, list[int]] = {}
    for m in moves:
        if m[0] not in flagged:
            rows.append((*m, None, None, None, None))
            continue
        b = running.setdefault(m[0], [0, 0, 0, 0])
        offset = 0 if m[3] == 1 else 2
        b[offset] += m[5]
        b[offset + 1] += m[6]
        rows.append((*m, *b))
    return rows


async def _write(url: str, w: Workload, flagged: set[int]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.executemany(
            "INSERT INTO accounts (id, currency, flags, code, user_data, \"timestamp\", "
            "partition, tenant) VALUES ($1, 'EUR', $2, 1, '', $3, 0, 1)",
            [(a, HISTORY if a in flagged else 0, BASE_NS - 10 + i)
             for i, a in enumerate(ACCOUNTS)])
        await conn.executemany(
            "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency,"
            " flags, pending_id, timeout_s, code, user_data, \"timestamp\", partition,"
            " local_legs, tenant) VALUES ($1, $2, $3, $4, 'EUR', $5, $6, 0, 1, '', $7, 0, 3, 1)",
            [(t.id, t.debit_account_id, t.credit_account_id, t.amount, t.flags, t.pending_id,
              t.timestamp) for t in w.transfers])
        await conn.executemany(
            "INSERT INTO pending_resolutions (pending_id, kind, transfer_id, \"timestamp\")"
            " VALUES ($1, $2, $3, $4)", w.resolutions)
    finally:
        await conn.close()


async def _stored(url: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            'SELECT account_id, "timestamp", transfer_id, side, expiry, pending_delta, '
            "posted_delta, debits_pending, debits_posted, credits_pending, credits_posted "
            'FROM account_history ORDER BY account_id, "timestamp", transfer_id')
    finally:
        await conn.close()
    return [tuple(r) for r in rows]


def _indexer(url: str, w: Workload) -> HistoryIndexer:
    async def horizon(conn: Any) -> int:
        return w.horizon

    indexer = HistoryIndexer(url, connect_timeout_s=10, command_timeout_s=30,
                             horizon=horizon, rows_target=8)
    indexer.width_ns = 20_000_000
    return indexer


async def _run_to_horizon(indexer: HistoryIndexer) -> None:
    for _ in range(10_000):
        _, caught_up = await indexer.step()
        if caught_up:
            return
    raise AssertionError("the indexer never reached the horizon")


@pytest.mark.parametrize("flagged", [FLAGGED, set()], ids=["flagged", "none_flagged"])
async def test_indexer_killed_mid_window_leaves_no_gap_or_double(
        db_url: str, app_db_url: str, flagged: set[int]) -> None:
    """Windows, a backend terminated in the middle of a window's INSERT, a new indexer:
    account_history equals the recomputation; verify's check agrees, and names a row
    removed behind its back. With flagged accounts (running balances) and without (the
    indexer's plain INSERT)."""
    w = _workload(seed=7)
    await _write(db_url, w, flagged)
    expected = _expected_rows(w, flagged)
    first = _indexer(app_db_url, w)
    for _ in range(4):
        await first.step()
    position = first.position
    assert BASE_NS < position < w.horizon
    # The next window's rows, in insertion order: block its INSERT at a row in the middle
    # (a concurrent uncommitted insert of the same key), then kill the indexer's backend.
    end = min(w.horizon, position + first.width_ns)
    window = [r for r in expected if position < r[1] <= end]
    assert len(window) >= 4, "the killed window has rows on both sides of the block"
    blocker = window[len(window) // 2]
    admin = await asyncpg.connect(db_url)
    try:
        blocking = admin.transaction()
        await blocking.start()
        await admin.execute(
            'INSERT INTO account_history (account_id, "timestamp", transfer_id, side, expiry, '
            "pending_delta, posted_delta) VALUES ($1, $2, $3, 1, false, 0, 0)", *blocker[:3])
        step = asyncio.create_task(first.step())
        for _ in range(200):
            waiting = await admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = "
                "'txproc-history-indexer' AND wait_event_type = 'Lock'")
            if waiting is not None:
                break
            await asyncio.sleep(0.02)
        assert waiting is not None, "the indexer's INSERT waits on the blocking row"
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", waiting)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await step
        await blocking.rollback()
    finally:
        await admin.close()
    await first.close()
    second = _indexer(app_db_url, w)
    await _run_to_horizon(second)
    await second.close()
    assert await _stored(db_url) == expected
    report = await _verify_history(db_url)
    assert report.ok and report.checked["account_history"] == len(expected)
    # A row removed behind the indexer's back is named.
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("DELETE FROM account_history WHERE account_id = $1 AND "
                           '"timestamp" = $2 AND transfer_id = $3', *blocker[:3])
    finally:
        await conn.close()
    broken = await _verify_history(db_url)
    assert [(p.table, p.kind) for p in broken.problems] == [("account_history", "missing")]


async def _verify_history(url: str) -> Report:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            ctx = VerifyContext(conn, Report(), await conn.fetchval("SELECT now()"))
            await check_account_history(ctx)
    finally:
        await conn.close()
    return ctx.report


class _FixedStore(HistoryStore):
    """The reads with a fixed horizon (no shards here) and the indexer's position as set."""

    horizon_ns = 0
    position_ns = 0

    async def horizon(self, conn: Any) -> int:
        return self.horizon_ns

    async def position(self, conn: Any) -> int:
        return min(self.position_ns, int(await conn.fetchval(
            'SELECT "timestamp" FROM account_history_position')))


async def _pages(store: HistoryStore, query: AccountTransfersFilter) -> list[int]:
    out: list[int] = []
    cursor = ""
    while True:
        page = await store.account_transfers(
            AccountTransfersFilter(**{**_fields(query), "cursor": cursor}), PROCESSOR_TENANT)
        assert page is not None
        out.extend(t.id for t in page.data)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def _fields(query: AccountTransfersFilter) -> dict[str, Any]:
    return {f: getattr(query, f) for f in query.__struct_fields__}


async def test_reads_are_the_same_at_any_indexer_position(db_url: str) -> None:
    """Pages (both orders, each side, ranges, small pages) and balances at every instant
    are the same with nothing indexed, part of it, or all of it, and balances equal the
    reference replay for flagged and unflagged accounts."""
    w = _workload(seed=11, steps=120)
    await _write(db_url, w, FLAGGED)
    indexer = _indexer(db_url, w)
    await _run_to_horizon(indexer)
    await indexer.close()
    store = _FixedStore(await asyncpg.create_pool(db_url, min_size=1, max_size=2))
    store.horizon_ns = w.horizon
    rng = random.Random(3)
    moments = sorted({t.timestamp for t in w.transfers} | {e.timestamp for e in w.expiries})
    positions = [0, moments[len(moments) // 3], moments[2 * len(moments) // 3] + 1, w.horizon]
    # Around every position, and a sample of the moments and the instants just before.
    instants = sorted({0, w.horizon + 10, *(p + d for p in positions for d in (-1, 0, 1)),
                       *rng.sample([*moments, *(m - 1 for m in moments)], 24)})
    queries = []
    for account in ACCOUNTS[:3]:
        lo, hi = sorted(rng.sample(moments, 2))
        queries += [AccountTransfersFilter(account_id=account, limit=3),
                    AccountTransfersFilter(account_id=account, limit=4, order="desc"),
                    AccountTransfersFilter(account_id=account, side="debits", limit=5),
                    AccountTransfersFilter(account_id=account, side="credits", order="desc"),
                    AccountTransfersFilter(account_id=account, from_ns=lo, to_ns=hi, limit=2)]
    try:
        for position in positions:
            store.position_ns = position
            for q in queries:
                mine = sorted((t for t in w.transfers
                               if q.account_id in (t.debit_account_id, t.credit_account_id)
                               and q.from_ns <= t.timestamp < q.to_ns
                               and (q.side == "both"
                                    or (t.debit_account_id == q.account_id)
                                    == (q.side == "debits"))),
                              key=lambda t: (t.timestamp, t.id), reverse=q.order == "desc")
                assert await _pages(store, q) == [t.id for t in mine], (position, q)
            for at in instants:
                for account in ACCOUNTS:
                    got = await store.balances_at(account, at, PROCESSOR_TENANT)
                    assert got == balances_at(w.transfers, w.expiries, account, at), (
                        position, account, at)
    finally:
        await store.close()


async def test_indexer_yields_to_ingest_until_its_lag_bound(db_url: str) -> None:
    """While the front is busy writing, the indexer waits, unless its lag reached
    lag_max_s; then it indexes regardless."""
    w = _workload(seed=5, steps=40)
    await _write(db_url, w, set())

    async def horizon(conn: Any) -> int:
        return w.horizon

    def clock_ns() -> int:  # ten seconds after the position it reaches first
        return indexer.position + 10 * 10**9

    indexer = HistoryIndexer(db_url, connect_timeout_s=10, command_timeout_s=30,
                             horizon=horizon, clock_ns=clock_ns, interval_s=0.01,
                             busy=lambda: True, lag_max_s=60.0)
    indexer.width_ns = 1_000_000
    await indexer.step()
    first = indexer.position
    assert BASE_NS < first < w.horizon
    task = asyncio.create_task(indexer.run())
    await asyncio.sleep(0.3)
    assert indexer.position == first  # busy, lag 10 s under 60 s: waiting
    indexer.lag_max_s = 5.0  # the lag bound passed: it indexes although busy
    for _ in range(300):
        if indexer.position == w.horizon:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await indexer.close()
    assert indexer.position == w.horizon
