"""Account history, transfer queries and balances at an instant, read from PostgreSQL.

The front reads these through a pool of its own (``HistoryStore``), never through the
shards: a deep history read must not queue behind commits or hold a shard's event loop.
``transfers`` has no index by account (each would cost every committed transfer a B-tree
insertion; docs/design.md §16 has the measurement). An account's history and its balances
at an instant read ``account_history`` (migration 0028, appended off the commit path by
actors/ledger/indexer.py) up to the indexer's position, and only the movements above it
from ``transfers``, the way all of them were read before it existed. The transfer query
still scans ``transfers``. Per-account reads also take the *mirrors* a shard move left
(migration 0037; docs/design.md §12, "Moving a shard"): transfers stored in another
database with a leg on an account of this one. The transfer query does not: each
transfer is listed once, where it is stored.

**The horizon.** Shards assign timestamps when they plan and commit a little later, each
on its own clock, so a transfer with a timestamp below one already committed can still
commit (another shard's, or the same shard's next batch in flight). A page ending at such
a position would leave that transfer behind its cursor forever. So lists serve only rows
at or below the *horizon*: the least, over the shards, of the position every row of that
shard up to which is committed, which is the greater of its chain head (the last committed
batch's ``timestamp_max``, written in that batch's transaction) and its checkpoint position
(an idle shard's moves to a timestamp it promises never to use). A busy shard's horizon is
its last commit, milliseconds old; an idle shard moves it at every checkpoint, at most
``checkpoint_interval_max_s`` (5 s) apart.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

from actors.database import keep_session
from actors.ledger.archived import active_archive, archived_transfer
from actors.ledger.store import TRANSFER_COLUMNS
from actors.ledger.stream import StreamReader
from processor.history import (
    QUERY_SCAN_ROWS_MAX,
    AccountBalancesAt,
    AccountTransfersFilter,
    Position,
    TransfersPage,
    TransfersQuery,
    decode_cursor,
    encode_cursor,
)
from processor.identity import PROCESSOR_TENANT
from processor.types import ID_MAX, AccountFlags, Transfer, require

__all__ = ["HistoryStore", "query_across", "read_horizon"]

_COLUMNS = ", ".join(f't."{c}"' for c in TRANSFER_COLUMNS)

# The least position, over the shards, up to which all of that shard's rows are committed.
_HORIZON_SQL = """
SELECT min(greatest(c.ts, coalesce(h.timestamp_max, 0))) AS horizon
FROM (SELECT m.shard, min(p."timestamp") AS ts
      FROM partition_checkpoints p JOIN partition_map m ON m.partition = p.partition
      GROUP BY m.shard) c
LEFT JOIN LATERAL (
    SELECT l.timestamp_max FROM ledger_chain l WHERE l.shard = c.shard
    ORDER BY l.seq DESC LIMIT 1) h ON true
"""


async def read_horizon(conn: Any) -> int:
    """The greatest timestamp at or below which every shard's rows are committed."""
    value = await conn.fetchval(_HORIZON_SQL)
    return int(value or 0)


def _side_sql(column: str, descending: bool) -> str:
    """One side's ordered range of an account's transfers, read from ``transfers`` and
    the mirrors (migration 0037; ``transfers_and_mirrors``): $1
    account, ($2, $3) the position to start after (before, newest first), $4 from
    (inclusive), $5 to (exclusive), $6 how many, $7 the indexer's position (only rows
    above it: account_history holds the rest)."""
    if descending:
        where, order = '("timestamp", id) < ($2, $3)', '"timestamp" DESC, id DESC'
    else:
        where, order = '("timestamp", id) > ($2, $3)', '"timestamp", id'
    # Built from this module's constants only.
    sql = (f"(SELECT {_COLUMNS} FROM transfers_and_mirrors t "  # noqa: S608
           f"WHERE {column} = $1 AND {where} ")
    return sql + (f'AND "timestamp" >= $4 AND "timestamp" < $5 AND "timestamp" > $7 '
                  f"ORDER BY {order} LIMIT $6)")


def _indexed_sql(side: str, descending: bool) -> str:
    """The same range at or below the indexer's position ($7), from account_history: one
    range scan of its primary key, each row's transfer by primary key."""
    if descending:
        where, order = '(h."timestamp", h.transfer_id) < ($2, $3)', \
            'h."timestamp" DESC, h.transfer_id DESC'
    else:
        where, order = '(h."timestamp", h.transfer_id) > ($2, $3)', 'h."timestamp", h.transfer_id'
    sides = {"debits": " AND h.side = 1", "credits": " AND h.side = 2", "both": ""}[side]
    # A transfer stored here or mirrored (migration 0037); an id may name one of each (ids
    # are unique per database only), their instants never coincide.
    return (f"(SELECT {_COLUMNS} FROM account_history h JOIN transfers_and_mirrors t "  # noqa: S608
            f'ON t.id = h.transfer_id AND t."timestamp" = h."timestamp" '
            f"WHERE h.account_id = $1 AND NOT h.expiry{sides} AND {where} "
            f'AND h."timestamp" >= $4 AND h."timestamp" < $5 AND h."timestamp" <= $7 '
            f"ORDER BY {order} LIMIT $6)")


def _account_sql(side: str, descending: bool) -> str:
    parts = [_indexed_sql(side, descending)]
    parts += [_side_sql(f"{name}_account_id", descending)
              for name in ("debit", "credit") if side in (f"{name}s", "both")]
    order = '"timestamp" DESC, id DESC' if descending else '"timestamp", id'
    union = " UNION ALL ".join(parts)
    return f"SELECT * FROM ({union}) u ORDER BY {order} LIMIT $6"  # noqa: S608 - constants only


_ACCOUNT_SQL = {(side, descending): _account_sql(side, descending)
                for side in ("debits", "credits", "both") for descending in (False, True)}

# The tenant's rows in order after ($2, $3) and before $4, at most $5 of them read; of
# those, the ones matching the filters ($6 code, $7 user_data; NULL: any), at most $8. The
# inner LIMIT bounds the rows read; the outer one stops the scan once a page is full.
_QUERY_SQL = f"""
SELECT * FROM (
    SELECT {_COLUMNS} FROM transfers t
    WHERE t.tenant = $1 AND (t."timestamp", t.id) > ($2, $3) AND t."timestamp" < $4
    ORDER BY t."timestamp", t.id LIMIT $5) s
WHERE ($6::integer IS NULL OR s.code = $6) AND ($7::text IS NULL OR s.user_data = $7)
ORDER BY s."timestamp", s.id LIMIT $8
"""  # noqa: S608 - built from this module's constants only
# The last row a bounded scan read ($5 is the bound): where the next page starts.
_QUERY_SCANNED_SQL = """
SELECT t."timestamp", t.id FROM transfers t
WHERE t.tenant = $1 AND (t."timestamp", t.id) > ($2, $3) AND t."timestamp" < $4
ORDER BY t."timestamp", t.id OFFSET $5 - 1 LIMIT 1
"""

# An account's balances from its movements in ($3, $2], read from ``transfers`` (the tail
# above the indexer's position; $3 = 0: all of them): the effects of its legs (a pending
# transfer adds to pending; a post or void releases its hold's whole amount, found by
# primary key, and a post adds its own amount to posted; anything else adds to posted),
# then the expiries in that range of its holds (any age), each hold by primary key.
_BALANCES_SQL = """
WITH legs AS (
    SELECT 1 AS side, t.id, t.amount, t.flags, t.pending_id, t.mirrored
    FROM transfers_and_mirrors t
    WHERE t.debit_account_id = $1 AND t."timestamp" <= $2 AND t."timestamp" > $3
    UNION ALL
    SELECT 2, t.id, t.amount, t.flags, t.pending_id, t.mirrored FROM transfers_and_mirrors t
    WHERE t.credit_account_id = $1 AND t."timestamp" <= $2 AND t."timestamp" > $3
), effects AS (
    SELECT l.side,
           CASE WHEN (l.flags & 2) <> 0 THEN l.amount::numeric
                WHEN (l.flags & 12) <> 0
                THEN -(SELECT p.amount FROM transfers_and_mirrors p
                       WHERE p.id = l.pending_id AND p.mirrored = l.mirrored)::numeric
                ELSE 0 END AS pend,
           CASE WHEN (l.flags & 14) = 0 OR (l.flags & 4) <> 0 THEN l.amount::numeric
                ELSE 0 END AS post
    FROM legs l
    UNION ALL
    SELECT CASE WHEN p.debit_account_id = $1 THEN 1 ELSE 2 END, -p.amount::numeric, 0
    FROM resolutions_and_mirrors r JOIN transfers_and_mirrors p
        ON p.id = r.pending_id AND p.mirrored = r.mirrored
    WHERE r.kind = 3 AND r."timestamp" <= $2 AND r."timestamp" > $3
      AND $1 IN (p.debit_account_id, p.credit_account_id)
)
SELECT side, coalesce(sum(pend), 0) AS pend, coalesce(sum(post), 0) AS post
FROM effects GROUP BY side
"""
# The same sums over the account's movements at or before $2 from account_history (the
# caller keeps $2 at or below the indexer's position): one range of its primary key.
_INDEXED_SUMS_SQL = """
SELECT side, coalesce(sum(pending_delta), 0) AS pend, coalesce(sum(posted_delta), 0) AS post
FROM account_history WHERE account_id = $1 AND "timestamp" <= $2 GROUP BY side
"""
# An account with the history flag: its balances after its last movement at or before $2
# (at or below the indexer's position): one index lookup, newest first.
_STORED_BALANCES_SQL = """
SELECT debits_pending, debits_posted, credits_pending, credits_posted FROM account_history
WHERE account_id = $1 AND "timestamp" <= $2
ORDER BY "timestamp" DESC, transfer_id DESC LIMIT 1
"""
# Every movement at or below this instant is in account_history (actors/ledger/indexer.py).
_POSITION_SQL = 'SELECT "timestamp" FROM account_history_position WHERE id = 1'
HISTORY_FLAG = int(AccountFlags.HISTORY)
# The tail above the indexer's position is a narrow timestamp range of ``transfers``: read
# it through the timestamp's BRIN, never a scan of the table (which a planner without
# fresh statistics, or with unsummarized ranges, would otherwise choose). And without
# parallel workers: the BRIN's estimate for the tail is a fraction of the whole table
# (about 235,000 rows of 300,000 where the tail held none), so past a few hundred thousand
# transfers the planner gathered each tail with two workers, and starting them cost 11-15
# ms per tail: a page of 100 took 31 ms where its rows take 0.5 (docs/design.md §16).
_TAIL_BY_TIMESTAMP = ("SET LOCAL enable_seqscan = off; "
                      "SET LOCAL max_parallel_workers_per_gather = 0")


def _transfer(row: asyncpg.Record) -> Transfer:
    return Transfer(**{c: row[c] for c in TRANSFER_COLUMNS})


class HistoryStore:
    """The front's reads of history: its own small pool, read-only statements."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.stream = StreamReader(pool)  # the change stream's pages, on the same pool

    @classmethod
    async def connect(cls, url: str, *, pool_size_max: int, connect_timeout_s: float,
                      command_timeout_s: float) -> HistoryStore:
        require(pool_size_max >= 1, "a history read needs a connection")
        pool = await asyncpg.create_pool(
            url, min_size=1, max_size=pool_size_max, timeout=connect_timeout_s,
            command_timeout=command_timeout_s,
            server_settings={"application_name": "txproc-history",
                             "default_transaction_read_only": "on",
                             # A plan per call, for its values: a generic plan cannot
                             # tell a narrow tail above the indexer's position (a BRIN
                             # range) from the whole table.
                             "plan_cache_mode": "force_custom_plan"},
            reset=keep_session)
        return cls(pool)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def close(self) -> None:
        await self._pool.close()

    async def horizon_now(self) -> int:
        """The horizon as of now (``horizon``), in a statement of its own."""
        async with self._pool.acquire() as conn:
            return await read_horizon(conn)

    async def horizon(self, conn: Any) -> int:
        """The greatest timestamp at or below which every shard's rows are committed."""
        return await read_horizon(conn)

    async def position(self, conn: Any) -> int:
        """The indexer's position: every movement at or below it is in account_history
        (actors/ledger/indexer.py); the reads take what is above it from ``transfers``."""
        return int(await conn.fetchval(_POSITION_SQL))

    @staticmethod
    async def _visible(conn: Any, account_id: int, tenant: int) -> bool:
        """Whether the account exists and ``tenant`` may see it (actors/edge/tenancy.py):
        its own tenant's, or any for the processor's token. Every transfer on a visible
        account is visible too: the rules let only its tenant's and the processor's
        transfers touch it."""
        return await HistoryStore._visible_flags(conn, account_id, tenant) is not None

    @staticmethod
    async def _visible_flags(conn: Any, account_id: int, tenant: int) -> int | None:
        """The account's flags if ``tenant`` may see it (``_visible``), else None."""
        row = await conn.fetchrow("SELECT tenant, flags FROM accounts WHERE id = $1",
                                  account_id)
        if row is None or tenant not in (row["tenant"], PROCESSOR_TENANT):
            return None
        return int(row["flags"])

    async def archive_of(self, transfer_id: int, tenant: int) -> str | None:
        """The name of the archive in force holding transfer ``transfer_id``, if ``tenant``
        may see it (its own tenant's, or any for the processor's token); else None."""
        async with self._pool.acquire() as conn:
            found = await archived_transfer(conn, transfer_id)
        if found is None or tenant not in (found[1], PROCESSOR_TENANT):
            return None
        return found[0]

    async def account_transfers(self, query: AccountTransfersFilter,
                                tenant: int) -> TransfersPage | None:
        """A page of ``query.account_id``'s transfers; None if ``tenant`` may not see the
        account (or there is none). Raises ``HistoryError`` (``invalid_cursor``)."""
        after = decode_cursor(query)
        descending = query.order == "desc"
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            if not await self._visible(conn, query.account_id, tenant):
                return None
            from_ns = await _archive_start(conn, query.from_ns, query.to_ns, after)
            await conn.execute(_TAIL_BY_TIMESTAMP)
            to_ns = min(query.to_ns, await self.horizon(conn) + 1)
            if after is None:
                after = Position(to_ns if descending else from_ns, 0)
            rows = await conn.fetch(_ACCOUNT_SQL[query.side, descending], query.account_id,
                                    after.timestamp, after.id, from_ns, to_ns,
                                    query.limit + 1, await self.position(conn))
        return self._page(query, [_transfer(r) for r in rows])

    async def query_transfers(self, query: TransfersQuery, tenant: int) -> TransfersPage:
        """A page of the transfers ``tenant`` created that match ``query``. Raises
        ``HistoryError`` (``invalid_cursor``)."""
        cursor = decode_cursor(query)
        filtered = query.code is not None or query.user_data is not None
        scan_max = QUERY_SCAN_ROWS_MAX if filtered else query.limit + 1
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            from_ns = await _archive_start(conn, query.from_ns, query.to_ns, cursor)
            after = cursor or Position(from_ns, 0)
            to_ns = min(query.to_ns, await self.horizon(conn) + 1)
            args = (tenant, after.timestamp, after.id, to_ns)
            rows = await conn.fetch(_QUERY_SQL, *args, scan_max, query.code,
                                    query.user_data, query.limit + 1)
            page = self._page(query, [_transfer(r) for r in rows])
            if page.next_cursor is not None or not filtered:
                return page
            # Fewer matches than a page: either the range ended, or the scan's bound did
            # and the page says where it stopped.
            last = await conn.fetchrow(_QUERY_SCANNED_SQL, *args, scan_max)
        if last is None:
            return page
        return TransfersPage(data=page.data, next_cursor=encode_cursor(
            query, Position(last["timestamp"], last["id"])))

    @staticmethod
    def _page(query: AccountTransfersFilter | TransfersQuery,
              rows: list[Transfer]) -> TransfersPage:
        if len(rows) <= query.limit:
            return TransfersPage(data=rows, next_cursor=None)
        last = rows[query.limit - 1]
        return TransfersPage(data=rows[: query.limit], next_cursor=encode_cursor(
            query, Position(last.timestamp, last.id)))

    async def balances_at(self, account_id: int, at_ns: int,
                          tenant: int) -> AccountBalancesAt | None:
        """The account's four balances counting every movement at or before ``at_ns``;
        None if ``tenant`` may not see the account (or there is none).

        Up to the indexer's position from account_history (for an account with the
        ``history`` flag, the balances stored with its last movement there; for another,
        the sum of its rows), plus the movements after the position read from
        ``transfers``."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            flags = await self._visible_flags(conn, account_id, tenant)
            if flags is None:
                return None
            bound = await active_archive(conn)
            if bound is not None:
                bound.check_instant(at_ns)
            await conn.execute(_TAIL_BY_TIMESTAMP)
            position = await self.position(conn)
            cut = min(at_ns, position)
            debits, credits = [0, 0], [0, 0]
            stored = None
            if flags & HISTORY_FLAG:
                stored = await conn.fetchrow(_STORED_BALANCES_SQL, account_id, cut)
            if stored is not None and stored["debits_pending"] is not None:
                debits = [stored["debits_pending"], stored["debits_posted"]]
                credits = [stored["credits_pending"], stored["credits_posted"]]
            elif cut > 0:
                _add_sums(debits, credits, await conn.fetch(_INDEXED_SUMS_SQL, account_id, cut))
            if at_ns > position:
                _add_sums(debits, credits,
                          await conn.fetch(_BALANCES_SQL, account_id, at_ns, position))
        require(min(*debits, *credits) >= 0, "balances at an instant are not negative")
        return AccountBalancesAt(account_id=account_id, at_ns=at_ns,
                                 debits_pending=debits[0], debits_posted=debits[1],
                                 credits_pending=credits[0], credits_posted=credits[1])


async def _archive_start(conn: Any, from_ns: int, to_ns: int, cursor: Position | None) -> int:
    """Where a time range read starts, with an archive in force: no ``from`` (0) starts at
    its boundary; a range or a cursor that reaches before it is refused ``archived``
    (``HistoryError``). Without an archive, ``from_ns``."""
    bound = await active_archive(conn)
    if bound is None:
        return from_ns
    start = bound.range_start(from_ns, to_ns)
    if cursor is not None:
        bound.check_position(cursor.timestamp)
    return start


def _add_sums(debits: list[int], credits: list[int], rows: list[asyncpg.Record]) -> None:
    """Adds per-side (pending, posted) sums (``side`` 1: debits, 2: credits) in place."""
    for r in rows:
        side = debits if r["side"] == 1 else credits
        side[0] += int(r["pend"])
        side[1] += int(r["post"])


async def query_across(histories: list[HistoryStore], query: TransfersQuery,
                       tenant: int) -> TransfersPage:
    """``HistoryStore.query_transfers`` over several databases (docs/design.md §12): each
    database's page for the same query, merged in ``(timestamp, id)`` order, and cut where
    the first of them stopped, so that no row is passed that one of them may still serve.

    Each database serves rows only up to its own horizon; the least horizon, read before
    the pages, bounds the merged page too, since a database's later commits all come
    after its horizon. Raises ``HistoryError`` (``invalid_cursor``)."""
    horizon = min([await h.horizon_now() for h in histories])
    bound = Position(horizon, ID_MAX)
    rows: list[Transfer] = []
    for history in histories:
        page = await history.query_transfers(query, tenant)
        rows += page.data
        if page.next_cursor is not None:
            stop = decode_cursor(msgspec.structs.replace(query, cursor=page.next_cursor))
            if stop is not None:
                bound = min(bound, stop, key=lambda p: (p.timestamp, p.id))
    rows = sorted((r for r in rows if (r.timestamp, r.id) <= (bound.timestamp, bound.id)),
                  key=lambda r: (r.timestamp, r.id))
    if len(rows) > query.limit:
        last = rows[query.limit - 1]
        return TransfersPage(data=rows[:query.limit], next_cursor=encode_cursor(
            query, Position(last.timestamp, last.id)))
    if bound == Position(horizon, ID_MAX):  # no database was cut: the list ends here
        return TransfersPage(data=rows, next_cursor=None)
    return TransfersPage(data=rows, next_cursor=encode_cursor(query, bound))
