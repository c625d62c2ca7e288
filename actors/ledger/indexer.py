"""The account-history indexer: ``account_history`` (migration 0028), off the commit path.

One background task of the front, with its own connection, copies every movement of an
account (each leg of a transfer, each expiry of a hold) committed at or below the history
horizon (actors/ledger/history.py) into ``account_history``, ordered by account, one
timestamp window ``(position, end]`` per transaction:

1. lock the position row (``account_history_position``, FOR UPDATE);
2. read the horizon: everything at or below it is committed on every shard, so the
   window's rows are final and no later commit can land inside it;
3. one INSERT ... SELECT of the window's movements sorted by (account, timestamp,
   transfer), with, for accounts with the ``history`` flag, the four balances after each
   movement: the account's last stored row plus a running sum in timestamp order (exact,
   because every earlier movement is already stored or in this window);
4. move the position to ``end``; commit.

Rows and position commit together, so a crash or a kill at any point leaves the table
exactly the movements at or below the stored position, and the next run goes on from
there (restart-safe, nothing doubled or missing). The lock makes a second indexer wait
and then continue after the first one's window, never repeat it; still, one per cluster
is the intent: today there is one front; with several, a lease should pick the one that
runs it (docs/design.md §16). It yields to ingest: while the front is routing writes it
waits, unless its lag (``txproc_history_indexer_lag_seconds``) reached ``lag_max_s``
(10 s), so its PostgreSQL CPU lands between bursts and, under sustained load, in windows
of about ten seconds. Reads stay exact at any lag, reading the movements above the
position from ``transfers`` as before.

The commit path is untouched: the shards write nothing here. The indexer's cost is
PostgreSQL CPU on its own backend (``application_name`` txproc-history-indexer), measured
in docs/design.md §16.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from actors.ledger.history import read_horizon
from actors.ops import metrics
from processor.history_index import (
    WINDOW_NS_INITIAL,
    WINDOW_NS_MIN,
    WINDOW_ROWS_TARGET,
    next_width_ns,
    window_end,
)

__all__ = ["HISTORY_COLUMNS", "MOVEMENTS_SQL", "HistoryIndexer"]

log = logging.getLogger("txproc.history.indexer")

# The four balance columns, in the order rows carry them.
BALANCES = ("debits_pending", "debits_posted", "credits_pending", "credits_posted")

# Each movement in ($1, $2] of an account of this database: the legs of every transfer
# stored or mirrored here (migration 0037), the sides of every expiry. A leg whose account
# moved to another database with its shard is that database's (docs/design.md §12).
_MOVES = """
    SELECT l.account_id, t."timestamp", t.id AS transfer_id, l.side, false AS expiry,
           CASE WHEN (t.flags & 2) <> 0 THEN t.amount
                WHEN (t.flags & 12) <> 0
                THEN -(SELECT p.amount FROM transfers_and_mirrors p
                       WHERE p.id = t.pending_id AND p.mirrored = t.mirrored)
                ELSE 0 END AS pending_delta,
           CASE WHEN (t.flags & 14) = 0 OR (t.flags & 4) <> 0 THEN t.amount
                ELSE 0 END AS posted_delta
    FROM transfers_and_mirrors t
    CROSS JOIN LATERAL (VALUES (t.debit_account_id, 1::smallint),
                               (t.credit_account_id, 2::smallint)) l(account_id, side)
    WHERE t."timestamp" > $1 AND t."timestamp" <= $2
      AND EXISTS (SELECT 1 FROM accounts a WHERE a.id = l.account_id)
    UNION ALL
    SELECT l.account_id, r."timestamp", r.pending_id, l.side, true, -p.amount, 0
    FROM resolutions_and_mirrors r JOIN transfers_and_mirrors p
        ON p.id = r.pending_id AND p.mirrored = r.mirrored
    CROSS JOIN LATERAL (VALUES (p.debit_account_id, 1::smallint),
                               (p.credit_account_id, 2::smallint)) l(account_id, side)
    WHERE r.kind = 3 AND r."timestamp" > $1 AND r."timestamp" <= $2
      AND EXISTS (SELECT 1 FROM accounts a WHERE a.id = l.account_id)
"""
# The same rows when no account has the history flag: one pipeline, no running sums.
_PLAIN_MOVEMENTS_SQL = f"""
SELECT m.*, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint FROM ({_MOVES}) m
ORDER BY m.account_id, m."timestamp", m.transfer_id
"""  # noqa: S608 - constants only
# The movements with a timestamp in ($1, $2], as account_history rows, sorted by account.
# A pending transfer adds to pending; a post or void releases its hold's whole amount
# (found by primary key) and a post adds its own amount to posted; an expiry releases the
# hold at the expiry's instant; anything else adds to posted (processor.history.balances_at
# is the reference). Accounts with the history flag (bit 4; few, found by a partial index)
# get their balances after each movement: their last row at or before $1 plus the running
# sum of this window's movements. ``txproc verify`` runs the same SELECT from 0 to compare.
MOVEMENTS_SQL = f"""
WITH moves AS MATERIALIZED ({_MOVES}), starts AS (
    SELECT a.id, coalesce(h.debits_pending, 0) AS dp, coalesce(h.debits_posted, 0) AS dq,
           coalesce(h.credits_pending, 0) AS cp, coalesce(h.credits_posted, 0) AS cq
    FROM accounts a LEFT JOIN LATERAL (
        SELECT h.debits_pending, h.debits_posted, h.credits_pending, h.credits_posted
        FROM account_history h WHERE h.account_id = a.id AND h."timestamp" <= $1
        ORDER BY h."timestamp" DESC, h.transfer_id DESC LIMIT 1) h ON true
    WHERE (a.flags & 4) <> 0 AND a.id IN (SELECT account_id FROM moves)
)
SELECT * FROM (
    SELECT m.account_id, m."timestamp", m.transfer_id, m.side, m.expiry, m.pending_delta,
           m.posted_delta, NULL::bigint AS debits_pending, NULL::bigint AS debits_posted,
           NULL::bigint AS credits_pending, NULL::bigint AS credits_posted
    FROM moves m WHERE m.account_id NOT IN (SELECT id FROM starts)
    UNION ALL
    SELECT m.account_id, m."timestamp", m.transfer_id, m.side, m.expiry, m.pending_delta,
           m.posted_delta,
           (s.dp + sum(CASE WHEN m.side = 1 THEN m.pending_delta ELSE 0 END) OVER w)::bigint,
           (s.dq + sum(CASE WHEN m.side = 1 THEN m.posted_delta ELSE 0 END) OVER w)::bigint,
           (s.cp + sum(CASE WHEN m.side = 2 THEN m.pending_delta ELSE 0 END) OVER w)::bigint,
           (s.cq + sum(CASE WHEN m.side = 2 THEN m.posted_delta ELSE 0 END) OVER w)::bigint
    FROM moves m JOIN starts s ON s.id = m.account_id
    WINDOW w AS (PARTITION BY m.account_id ORDER BY m."timestamp", m.transfer_id
                 ROWS UNBOUNDED PRECEDING)
) r
ORDER BY r.account_id, r."timestamp", r.transfer_id
"""  # noqa: S608 - constants only

HISTORY_COLUMNS = ("account_id", "timestamp", "transfer_id", "side", "expiry",
                   "pending_delta", "posted_delta", *BALANCES)
_COLUMN_LIST = ", ".join(f'"{c}"' for c in HISTORY_COLUMNS)
_INSERT_SQL = f"INSERT INTO account_history ({_COLUMN_LIST}) {MOVEMENTS_SQL}"
_PLAIN_INSERT_SQL = f"INSERT INTO account_history ({_COLUMN_LIST}) {_PLAIN_MOVEMENTS_SQL}"
# Whether any account has the history flag (the partial index of migration 0028).
_FLAGGED_SQL = "SELECT EXISTS (SELECT 1 FROM accounts WHERE (flags & 4) <> 0)"
_POSITION_SQL = 'SELECT "timestamp" FROM account_history_position WHERE id = 1'
_MOVE_SQL = 'UPDATE account_history_position SET "timestamp" = $1 WHERE id = 1'
# The earliest movement above $1: read once, when nothing was ever indexed (position 0),
# so the first window starts at the ledger's first transfer rather than at 1970.
_FIRST_SQL = """
SELECT least((SELECT min("timestamp") FROM transfers_and_mirrors WHERE "timestamp" > $1),
             (SELECT min("timestamp") FROM resolutions_and_mirrors
              WHERE kind = 3 AND "timestamp" > $1))
"""
# A window's rows sort in memory rather than on disk (about 120 bytes per movement).
_WORK_MEM = "64MB"
DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class HistoryIndexer:
    """Appends ``account_history`` one committed window at a time (module docstring)."""

    def __init__(self, url: str, *, connect_timeout_s: float, command_timeout_s: float,
                 interval_s: float = 0.5, clock_ns: Callable[[], int] = time.time_ns,
                 horizon: Callable[[Any], Awaitable[int]] = read_horizon,
                 rows_target: int = WINDOW_ROWS_TARGET,
                 busy: Callable[[], bool] = lambda: False, lag_max_s: float = 10.0) -> None:
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._interval_s = interval_s
        self._clock_ns = clock_ns
        self._horizon = horizon
        self._rows_target = rows_target
        # While ``busy()`` (the front is routing writes), the indexer waits as long as its
        # lag stays under ``lag_max_s``: it takes the cores when the commits do not.
        self._busy = busy
        self.lag_max_s = lag_max_s
        self._conn: asyncpg.Connection | None = None
        self.width_ns = WINDOW_NS_INITIAL
        # The position as last read or written by this indexer (0: not known yet).
        self.position = 0

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self._url, timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s,
                server_settings={"application_name": "txproc-history-indexer",
                                 # Derived rows and their position commit together: a
                                 # crash loses both or neither.
                                 "synchronous_commit": "off",
                                 "work_mem": _WORK_MEM})
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close(timeout=self._connect_timeout_s)
            self._conn = None

    async def step(self) -> tuple[int, bool]:
        """Index one window: (movements copied, whether the position reached the horizon)."""
        conn = await self._connection()
        async with conn.transaction():
            position = int(await conn.fetchval(_POSITION_SQL + " FOR UPDATE"))
            horizon = await self._horizon(conn)
            first: int | None = position + 1
            if position == 0 and horizon > 0:
                value = await conn.fetchval(_FIRST_SQL, position)
                first = None if value is None else int(value)
            end = window_end(position, horizon, self.width_ns, first)
            if end <= position:
                self.position = position
                return 0, True
            flagged = await conn.fetchval(_FLAGGED_SQL)
            status = await conn.execute(_INSERT_SQL if flagged else _PLAIN_INSERT_SQL,
                                        position, end)
            await conn.execute(_MOVE_SQL, end)
        rows = int(status.split()[-1])
        # Two rows per movement: one per side.
        self.width_ns = next_width_ns(self.width_ns, rows // 2, target=self._rows_target)
        self.position = end
        metrics.HISTORY_INDEXER_TRANSFERS.inc(rows // 2)
        return rows // 2, end >= horizon

    def lag_s(self) -> float:
        """Seconds between the wall clock and the position (the newest indexed instant)."""
        if self.position == 0:
            return 0.0
        return max(0.0, (self._clock_ns() - self.position) / 1e9)

    async def run(self) -> None:
        """Index until cancelled: at once while behind, every ``interval_s`` once caught
        up, deferred while ``busy()`` unless the lag reached ``lag_max_s``; a database
        error closes the connection and retries after a pause (a statement timeout also
        halves the window)."""
        pause_s = self._interval_s
        while True:
            if self.position and self._busy() and self.lag_s() < self.lag_max_s:
                metrics.HISTORY_INDEXER_LAG_SECONDS.set(self.lag_s())
                await asyncio.sleep(self._interval_s)
                continue
            try:
                _, caught_up = await self.step()
            except asyncio.CancelledError:
                # Stopped mid-statement (its lease lost, the front stopping): the connection
                # may be mid-protocol; a later run starts on a new one.
                await self._drop_connection()
                raise
            except DATABASE_ERRORS as exc:
                if isinstance(exc, (TimeoutError, asyncpg.QueryCanceledError)):
                    self.width_ns = max(WINDOW_NS_MIN, self.width_ns // 2)
                log.warning("history indexer: %s: %s; retrying in %.1f s",
                            type(exc).__name__, exc, pause_s)
                await self._drop_connection()
                metrics.HISTORY_INDEXER_LAG_SECONDS.set(self.lag_s())
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, 30.0)
                continue
            pause_s = self._interval_s
            metrics.HISTORY_INDEXER_LAG_SECONDS.set(self.lag_s())
            if caught_up:
                await asyncio.sleep(self._interval_s)
            else:
                await asyncio.sleep(0)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
