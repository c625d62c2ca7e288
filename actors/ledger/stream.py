"""The change stream of committed transfers, read from PostgreSQL (processor/stream.py has
the cursor, the window plan and the merge; docs/design.md, "The change stream").

Read by the front through its history pool, never through the shards. A page is one
read-only REPEATABLE READ transaction: each shard's committed position (the greater of its
chain head's ``timestamp_max`` and its checkpoint position, as the history horizon has it
per shard), then, for each shard the cursor is behind, that shard's rows (by the
``partition`` column every row carries, a partition of the shard that wrote it) after the
cursor and up to the position, in timestamp order, window by window. Nothing is written
and no index is added: the BRIN on ``transfers.timestamp`` narrows each window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from actors.ledger.archived import stream_start
from actors.ledger.store import TRANSFER_COLUMNS
from processor.errors import Overloaded
from processor.history import HistoryError
from processor.stream import (
    STREAM_POLL_INTERVAL_S,
    STREAM_SCAN_ROWS_MAX,
    STREAM_WAITERS_MAX,
    STREAM_WINDOW_NS_FIRST,
    STREAM_WINDOW_ROUNDS_MAX,
    ShardRead,
    StreamCursor,
    StreamPage,
    decode_stream_cursor,
    merge_reads,
    next_span_ns,
)
from processor.types import Transfer, require

__all__ = ["MultiStreamReader", "StreamReader"]

_COLUMNS = ", ".join(f't."{c}"' for c in TRANSFER_COLUMNS)
_MATCHED = ", ".join(f'm."{c}"' for c in TRANSFER_COLUMNS)

# Per shard: its partitions and the timestamp up to which all its rows are committed.
_POSITIONS_SQL = """
SELECT c.shard, c.partitions, greatest(c.ts, coalesce(h.timestamp_max, 0)) AS position
FROM (SELECT m.shard, array_agg(m.partition ORDER BY m.partition) AS partitions,
             min(p."timestamp") AS ts
      FROM partition_map m JOIN partition_checkpoints p ON p.partition = m.partition
      GROUP BY m.shard) c
LEFT JOIN LATERAL (
    SELECT l.timestamp_max FROM ledger_chain l WHERE l.shard = c.shard
    ORDER BY l.seq DESC LIMIT 1) h ON true
ORDER BY c.shard
"""

# One window of one shard: its rows (any tenant's) with a timestamp in ($2, $3], at most
# $4 of them in order; how many that was and the last one's timestamp; and of them the
# tenant's ($5), at most $6. Always one row at least (m's columns NULL when none matched).
_WINDOW_SQL = f"""
WITH s AS MATERIALIZED (
    SELECT {_COLUMNS} FROM transfers t
    WHERE t.partition = ANY($1::int[]) AND t."timestamp" > $2 AND t."timestamp" <= $3
    ORDER BY t."timestamp", t.id LIMIT $4),
n AS (SELECT count(*) AS scanned_rows, max(s."timestamp") AS scanned_max FROM s)
SELECT n.scanned_rows, n.scanned_max, {_MATCHED} FROM n
LEFT JOIN LATERAL (
    SELECT * FROM s WHERE s.tenant = $5 ORDER BY s."timestamp", s.id LIMIT $6) m ON true
ORDER BY m."timestamp", m.id
"""  # noqa: S608 - built from this module's constants only


def _transfer(row: asyncpg.Record) -> Transfer:
    return Transfer(**{c: row[c] for c in TRANSFER_COLUMNS})


class StreamReader:
    """Pages of the change stream over a read-only pool (the front's history pool)."""

    def __init__(self, pool: asyncpg.Pool, *,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._clock_s = clock_s
        self._waiters = 0

    async def page(self, after: str, *, limit: int, wait_s: float,
                   tenant: int) -> StreamPage:
        """The next page of ``tenant``'s transfers after the cursor ``after`` ("" from the
        beginning), at most ``limit``; if there are none yet, looks again every
        ``STREAM_POLL_INTERVAL_S`` for up to ``wait_s`` seconds, then answers an empty page
        whose cursor may still have moved past other tenants' rows.

        Raises ``HistoryError`` (``invalid_cursor``), and ``Overloaded`` when
        ``STREAM_WAITERS_MAX`` requests wait already."""
        page = await self._read(after, limit, tenant)
        if page.data or wait_s <= 0:
            return page
        if self._waiters >= STREAM_WAITERS_MAX:
            raise Overloaded(f"{STREAM_WAITERS_MAX} stream requests wait already; "
                             "retry, or ask with wait=0", retry_after_s=1.0)
        self._waiters += 1
        try:
            deadline = self._clock_s() + wait_s
            while not page.data and (left_s := deadline - self._clock_s()) > 0:
                await asyncio.sleep(min(STREAM_POLL_INTERVAL_S, left_s))
                page = await self._read(page.next_cursor, limit, tenant)
        finally:
            self._waiters -= 1
        return page

    async def _read(self, after: str, limit: int, tenant: int) -> StreamPage:
        async with self._pool.acquire() as conn, conn.transaction(
                isolation="repeatable_read", readonly=True):
            shards = await conn.fetch(_POSITIONS_SQL)
            require([r["shard"] for r in shards] == list(range(len(shards))),
                    "shards are numbered from 0")
            cursor = decode_stream_cursor(after, len(shards))
            cursor = await stream_start(conn, cursor, bool(after))
            reads = await _read_shards(conn, shards, cursor, limit, tenant)
        return merge_reads(cursor, reads, limit)


async def _read_shards(conn: Any, shards: list[Any], cursor: StreamCursor, limit: int,
                       tenant: int) -> list[ShardRead]:
    """The reads of ``shards`` (rows of _POSITIONS_SQL) the cursor is behind, in the
    transaction that read their positions."""
    if any(cursor.positions[r["shard"]] > r["position"] for r in shards):
        # Positions only move forward, and a cursor never passes one: this one comes from
        # another ledger, or from before a restore of this one.
        raise HistoryError("invalid_cursor",
                           "the cursor is ahead of this ledger's committed transfers")
    return [await _read_shard(conn, r["shard"], r["partitions"], cursor, r["position"],
                              limit, tenant)
            for r in shards if cursor.positions[r["shard"]] < r["position"]]


class MultiStreamReader(StreamReader):
    """The change stream of a ledger over several databases (docs/design.md §12): each
    database's shards read in one transaction of that database, as ``StreamReader`` reads
    all of them. A cursor is per shard, and each shard's rows live in one database, so
    pages from separate snapshots of separate databases still never skip or repeat a row;
    rows of shards of different databases are merged by timestamp as ever."""

    def __init__(self, databases: list[tuple[asyncpg.Pool, list[int]]], *, shards: int,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        super().__init__(databases[0][0], clock_s=clock_s)
        require(sorted(s for _, own in databases for s in own) == list(range(shards)),
                "every shard is in one database")
        self._databases = databases
        self._shards = shards

    async def _read(self, after: str, limit: int, tenant: int) -> StreamPage:
        cursor = decode_stream_cursor(after, self._shards)
        reads: list[ShardRead] = []
        for pool, own in self._databases:
            async with pool.acquire() as conn, conn.transaction(
                    isolation="repeatable_read", readonly=True):
                shards = await conn.fetch(_POSITIONS_SQL)
                require(sorted(r["shard"] for r in shards) == own,
                        "a database holds the map rows of its own shards")
                cursor = await stream_start(conn, cursor, bool(after))
                reads += await _read_shards(conn, shards, cursor, limit, tenant)
        return merge_reads(cursor, reads, limit)


async def _read_shard(conn: Any, shard: int, partitions: list[int], cursor: StreamCursor,
                      position: int, limit: int, tenant: int) -> ShardRead:
    """Up to ``limit`` of the tenant's rows of ``shard`` after its cursor, window by
    window, reading at most ``STREAM_SCAN_ROWS_MAX`` rows of any tenant."""
    rows: list[Transfer] = []
    scan_left = STREAM_SCAN_ROWS_MAX
    low, span = cursor.positions[shard], STREAM_WINDOW_NS_FIRST
    for _ in range(STREAM_WINDOW_ROUNDS_MAX):
        if low >= position:
            break
        high, want = min(position, low + span), limit - len(rows)
        found = await conn.fetch(_WINDOW_SQL, partitions, low, high, scan_left, tenant,
                                 want)
        matched = [_transfer(r) for r in found if r["id"] is not None]
        rows.extend(matched)
        if len(matched) == want:  # the page is full: resume after its last row
            return ShardRead(shard, rows, rows[-1].timestamp)
        scanned_rows = int(found[0]["scanned_rows"])
        if scanned_rows == scan_left:  # the scan's budget ended inside the window
            return ShardRead(shard, rows, int(found[0]["scanned_max"]))
        scan_left -= scanned_rows
        low, span = high, next_span_ns(high - low, len(matched), want - len(matched))
    return ShardRead(shard, rows, low)
