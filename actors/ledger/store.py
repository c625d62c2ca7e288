"""The ledger's PostgreSQL store: batched commits, checkpoints, recovery reads and lookups.

Every write of a batch is one transaction: COPY for the append-only rows (transfers, and
postings for other shards' accounts) and the epoch fence that keeps a dead shard's
successor and a zombie from both committing (docs/design.md, "Fencing"). Balance rows are
not written by commits: a shard's checkpoint folds its effects into them now and then, and
``account_balances`` adds what is not folded yet (docs/design.md §7). Posting blocks are
never deleted: a checkpoint folds those below a transaction-id horizon and appends the
horizon; readers add the blocks at or above it.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import numpy as np

from actors.database import keep_session, keeping_pool
from processor.codes import TransferResult
from processor.ledger import (
    ACCOUNT_ROW,
    EMPTY_SECTIONS,
    FAILED_ROW,
    GENESIS_DIGEST,
    MAIN_DATABASE,
    PARTITIONS,
    RESOLUTION_ROW,
    SECTIONS,
    TRANSFER_ROW,
    CommitBatch,
    Failed,
    Known,
    Link,
    PartitionMap,
    Resolution,
    ResolutionRow,
    Rows,
    TransferColumns,
    account_rows,
    currency_code,
    currency_letters,
    currency_number,
    failed_rows,
    link_digest,
    partition_of,
    partitions_of,
    resolution_rows,
    section_digest,
    transfer_rows,
)
from processor.types import Account, Transfer, require

__all__ = ["Audit", "FenceError", "FoldHorizonError", "IdConflict", "LedgerStore", "OwnEffects"]

ACCOUNT_COLUMNS = (
    "id", "currency", "flags", "code", "user_data", "debits_pending", "debits_posted",
    "credits_pending", "credits_posted", "timestamp", "tenant", "origin",
)
TRANSFER_COLUMNS = (
    "id", "debit_account_id", "credit_account_id", "amount", "currency", "flags",
    "pending_id", "timeout_s", "code", "user_data", "timestamp", "tenant", "origin",
)
# The archived ids' part is gated by a one-time probe, so while nothing is archived it reads
# no more than one index page (PostgreSQL evaluates the uncorrelated EXISTS once).
_FAILED_OR_ARCHIVED_SQL = (
    "SELECT id, result FROM failed_transfers WHERE id = ANY($1::bigint[]) "
    "UNION ALL SELECT id, $2::smallint FROM archived_transfer_ids "
    "WHERE (SELECT EXISTS (SELECT 1 FROM archived_transfer_ids)) AND id = ANY($1::bigint[])")
# One block of postings: the legs a commit leaves for one other shard's accounts.
_POSTING_BLOCK_SQL = (
    "INSERT INTO remote_posting_blocks (shard, account_ids, debits_pending, debits_posted, "
    "credits_pending, credits_posted) VALUES ($1, $2::bigint[], $3::bigint[], $4::bigint[], "
    "$5::bigint[], $6::bigint[])"
)
_ACCOUNT_SELECT = ", ".join(f'"{c}"' if c == "timestamp" else c for c in ACCOUNT_COLUMNS)
_TRANSFER_SELECT = ", ".join(f'"{c}"' if c == "timestamp" else c for c in TRANSFER_COLUMNS)
# What the database holds about ids a shard no longer remembers, in one round trip: the
# stored transfers (``result`` NULL), then the burned and archived ids (``result`` set, the
# other transfer columns NULL: a UNION takes its first part's column types).
_KNOWN_SQL = (
    f"SELECT {_TRANSFER_SELECT}, NULL::smallint AS result FROM transfers "
    "WHERE id = ANY($1::bigint[]) UNION ALL "
    f"SELECT f.id, {', '.join(['NULL'] * (len(TRANSFER_COLUMNS) - 1))}, f.result "
    f"FROM ({_FAILED_OR_ARCHIVED_SQL}) AS f")


class Audit(msgspec.Struct, frozen=True):
    """What the invariant check found; every count is zero on a healthy ledger."""

    accounts: int
    transfers: int
    debits_minus_credits_posted: int
    debits_minus_credits_pending: int
    accounts_not_equal_to_postings: int
    accounts_beyond_limit: int

    @property
    def passed(self) -> bool:
        return (self.debits_minus_credits_posted == 0 and self.debits_minus_credits_pending == 0
                and self.accounts_not_equal_to_postings == 0 and self.accounts_beyond_limit == 0)


class IdConflict(RuntimeError):
    """An id this commit stores is burned in failed_transfers, or one it burns is stored:
    another shard took it since this one last read. Nothing of the commit was written; the
    shard restarts and reads the id back (docs/design.md §8)."""


class FenceError(RuntimeError):
    """A shard this batch depends on has a newer incarnation; the batch must not commit."""


class FoldHorizonError(RuntimeError):
    """A shard's posting fold horizon is ahead of the database's transaction ids, so blocks
    written from now on would count as folded without being folded: the checkpoint refuses
    (docs/design.md §7, "Posting blocks and the fold horizon")."""


# The SQLSTATEs a one-statement commit refuses itself with (_COMMIT_ONE_SQL).
_REFUSALS: dict[str, type[RuntimeError]] = {"TXF01": FenceError, "TXI01": IdConflict}


# An account's balances recomputed from scratch: posted amounts of plain transfers and
# posts, and the amounts of pending transfers that are not resolved yet.
_AUDIT_POSTINGS_SQL = """
WITH e AS (
    SELECT t.debit_account_id AS d, t.credit_account_id AS c,
           CASE WHEN (t.flags & 2) <> 0 AND r.pending_id IS NULL
                THEN t.amount::numeric ELSE 0 END AS pend,
           CASE WHEN (t.flags & 14) = 0 OR (t.flags & 4) <> 0
                THEN t.amount::numeric ELSE 0 END AS post
    FROM transfers t LEFT JOIN pending_resolutions r ON r.pending_id = t.id
), s AS (
    SELECT d AS id, pend AS dp, post AS dpo, 0::numeric AS cp, 0::numeric AS cpo FROM e
    UNION ALL
    SELECT c, 0, 0, pend, post FROM e
), g AS (
    SELECT id, sum(dp) AS dp, sum(dpo) AS dpo, sum(cp) AS cp, sum(cpo) AS cpo
    FROM s GROUP BY id
)
SELECT count(*) FROM account_balances a LEFT JOIN g ON g.id = a.id
WHERE a.debits_pending <> coalesce(g.dp, 0) OR a.debits_posted <> coalesce(g.dpo, 0)
   OR a.credits_pending <> coalesce(g.cp, 0) OR a.credits_posted <> coalesce(g.cpo, 0)
"""


# PostgreSQL's binary COPY format (the COPY documentation, "Binary Format"): a signature,
# flags and header-extension length, then per row a field count and each field as a
# length-prefixed big-endian value; -1 as the field count ends the data. The rows are
# processor.ledger.TRANSFER_ROW records, which the chain hashes as they are.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
_WRITER_COLUMNS = ("partition", "local_legs")

# transfers.local_legs: which legs are on the writing shard's own accounts.
_DEBIT_LOCAL, _CREDIT_LOCAL = 1, 2


def writer_columns(
    debit: np.ndarray, credit: np.ndarray, own: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per transfer, the partition recorded with it and its local legs (0-3), for a shard
    owning the sorted partitions ``own``: the debit account's partition when the shard owns
    it, else the credit account's, else the shard's first (a chain member coordinated for
    accounts that are all elsewhere). Recovery and checkpoints find a shard's rows by it."""
    debit_p, credit_p = partitions_of(debit), partitions_of(credit)
    # A table lookup, not np.isin: isin sorts both sides on every call, which a commit of
    # a few transfers (single HTTP requests) pays for per commit.
    owned = _owned_mask(own.tobytes())
    debit_own, credit_own = owned[debit_p], owned[credit_p]
    partition = np.where(debit_own, debit_p, np.where(credit_own, credit_p, own[0]))
    legs = debit_own * _DEBIT_LOCAL + credit_own * _CREDIT_LOCAL
    return partition.astype(np.int64), legs.astype(np.int64)


@functools.lru_cache(maxsize=64)
def _owned_mask(own: bytes) -> np.ndarray:
    """Per partition, whether it is among ``own`` (int64 partitions as bytes); read-only,
    built once per shard and partition map rather than at every commit."""
    owned = np.zeros(PARTITIONS, dtype=bool)
    owned[np.frombuffer(own, dtype=np.int64)] = True
    owned.flags.writeable = False
    return owned


@functools.lru_cache(maxsize=64)
def _own_partitions(partition_map: PartitionMap, shard: int) -> np.ndarray:
    """The sorted partitions ``shard`` owns, read-only (see ``_owned_mask``)."""
    own = np.asarray(partition_map.partitions_of_shard(shard), dtype=np.int64)
    own.flags.writeable = False
    return own


def column_rows(cols: TransferColumns, own: np.ndarray) -> Rows:
    """``cols`` as the records they are stored as (TRANSFER_ROW), for a shard owning the
    partitions ``own``: the COPY of a batch without user_data, and its chain section."""
    partition, legs = writer_columns(cols.debit_account_id, cols.credit_account_id, own)
    return transfer_rows(
        id=cols.id, debit_account_id=cols.debit_account_id,
        credit_account_id=cols.credit_account_id, amount=cols.amount,
        currency=currency_letters(cols.currency), flags=cols.flags,
        pending_id=cols.pending_id, timeout_s=cols.timeout_s, code=cols.code,
        user_data=cols.user_data, timestamp=cols.timestamp, tenant=cols.tenant,
        origin=cols.origin, partition=partition, local_legs=legs)


def transfer_copy_buffer(cols: TransferColumns, own: np.ndarray,
                         rows: Rows | None = None) -> bytes:
    """``cols`` (every user_data empty) as a binary COPY of TRANSFER_COLUMNS + partition +
    local_legs, for a shard owning the partitions ``own`` (``rows``: their records, if
    built already)."""
    require(cols.user_data is None, "fixed-width rows have no user_data")
    if rows is None:
        rows = column_rows(cols, own)
    return _COPY_HEADER + rows.fixed.tobytes() + _COPY_TRAILER


async def _once(data: bytes) -> AsyncIterator[bytes]:
    """``data`` as the async source ``copy_to_table`` reads on its own loop (a file-like
    source is read in a thread pool: a thread hand-off per commit)."""
    yield data


async def _copy_transfer_columns(
    conn: asyncpg.Connection, cols: TransferColumns, own: np.ndarray, rows: Rows
) -> None:
    columns = (*TRANSFER_COLUMNS, *_WRITER_COLUMNS)
    if cols.user_data is None:
        await conn.copy_to_table(
            "transfers", source=_once(transfer_copy_buffer(cols, own, rows)),
            columns=columns, format="binary")
        return
    currencies = [currency_code(c) for c in cols.currency.tolist()]
    partition, legs = writer_columns(cols.debit_account_id, cols.credit_account_id, own)
    await conn.copy_records_to_table("transfers", columns=columns, records=list(zip(
        cols.id.tolist(), cols.debit_account_id.tolist(), cols.credit_account_id.tolist(),
        cols.amount.tolist(), currencies, cols.flags.tolist(), cols.pending_id.tolist(),
        cols.timeout_s.tolist(), cols.code.tolist(), cols.user_data,
        cols.timestamp.tolist(), cols.tenant.tolist(), cols.origin.tolist(), partition.tolist(),
        legs.tolist(), strict=True)))


async def _copy_transfers(
    conn: asyncpg.Connection, transfers: list[Transfer], own: np.ndarray
) -> None:
    debit = np.fromiter((t.debit_account_id for t in transfers), np.int64, len(transfers))
    credit = np.fromiter((t.credit_account_id for t in transfers), np.int64, len(transfers))
    partition, legs = writer_columns(debit, credit, own)
    await conn.copy_records_to_table(
        "transfers",
        records=[
            (t.id, t.debit_account_id, t.credit_account_id, t.amount, t.currency, t.flags,
             t.pending_id, t.timeout_s, t.code, t.user_data, t.timestamp, t.tenant, t.origin,
             p, legs_of)
            for t, p, legs_of in zip(transfers, partition.tolist(), legs.tolist(),
                                     strict=True)
        ],
        columns=(*TRANSFER_COLUMNS, *_WRITER_COLUMNS),
    )


# The end of every commit, in one round trip: lock and read the epochs it is fenced on,
# look for an id this transaction both stores and burns (IdConflict, below), and leave the
# first posting block. A fenced commit has then written its rows for nothing, but rolls
# back, which is what a fence is for; the common case saves two round trips.
_COMMIT_END_SQL = """
WITH fence AS (
    SELECT shard, epoch FROM shard_epochs WHERE shard = ANY($1::int[]) FOR SHARE
), block AS (
    INSERT INTO remote_posting_blocks (shard, account_ids, debits_pending, debits_posted,
                                       credits_pending, credits_posted)
    SELECT $5::int, $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[]
    WHERE $5::int IS NOT NULL
), link AS (
    INSERT INTO ledger_chain (shard, seq, epoch, timestamp_max, transfers, accounts, failed,
                              resolutions, prev_digest, digest, sections)
    SELECT $11::int, $12::bigint, $13::bigint, $14::bigint, $15::int, $16::int, $17::int,
           $18::int, $19::bytea, $20::bytea, $21::bytea
    WHERE $11::int IS NOT NULL
)
SELECT (SELECT array_agg(shard ORDER BY shard) FROM fence) AS shards,
       (SELECT array_agg(epoch ORDER BY shard) FROM fence) AS epochs,
       -- Only rows this transaction wrote (xmin): an older clash, if a race before this
       -- check existed ever left one, must not stop every later commit.
       (SELECT f.id FROM failed_transfers f WHERE f.id BETWEEN $2 AND $3
          AND EXISTS (SELECT 1 FROM transfers t WHERE t.id = f.id
                      AND t.xmin = pg_current_xact_id()::xid) LIMIT 1) AS stored_burned,
       (SELECT t.id FROM transfers t WHERE t.id = ANY($4::bigint[]) LIMIT 1)
           AS burned_stored
"""


# A checkpoint folds a shard's own effects this many accounts per statement, pausing
# between statements (in one transaction), so commits beside it are not held behind one
# burst of work: 2,500 accounts in one statement took 30-50 ms on 2 cores.
CHECKPOINT_ACCOUNTS_PER_STATEMENT = 500
CHECKPOINT_PAUSE_S = 0.002

# A commit of at most this many rows (transfers, burned ids, resolutions) and no accounts is
# one statement: BEGIN, COPY (two round trips), the end and COMMIT cost more than building
# arrays of a few rows. Above it, COPY's per-row cost wins.
ONE_STATEMENT_ROWS_MAX = 256

# The whole of a small commit. Its data-modifying parts run whatever the outcome; when the
# fence moved or an id would be both stored and burned, ledger_refuse_commit (migration
# 0007) raises and the statement's transaction, all of it, rolls back. Rows this statement
# inserts are invisible to its own reads, so an id it both stores and burns is found by
# comparing its arrays.
_COMMIT_ONE_SQL = """
WITH fence AS (
    SELECT shard, epoch FROM shard_epochs WHERE shard = ANY($1::int[]) FOR SHARE
), stored AS (
    INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, flags,
                           pending_id, timeout_s, code, user_data, "timestamp", partition,
                           local_legs, tenant, origin)
    SELECT * FROM unnest($3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::text[],
                         $8::int[], $9::bigint[], $10::int[], $11::int[], $12::text[],
                         $13::bigint[], $14::int[], $15::smallint[], $29::bigint[],
                         $30::bigint[])
), burned AS (
    INSERT INTO failed_transfers (id, result, "timestamp", shard)
    SELECT f.*, $31::int FROM unnest($16::bigint[], $17::smallint[], $18::bigint[]) AS f
), resolved AS (
    INSERT INTO pending_resolutions (pending_id, kind, transfer_id, "timestamp")
    SELECT * FROM unnest($19::bigint[], $20::smallint[], $21::bigint[], $22::bigint[])
), block AS (
    INSERT INTO remote_posting_blocks (shard, account_ids, debits_pending, debits_posted,
                                       credits_pending, credits_posted)
    SELECT $23::int, $24::bigint[], $25::bigint[], $26::bigint[], $27::bigint[], $28::bigint[]
    WHERE $23::int IS NOT NULL
), link AS (
    INSERT INTO ledger_chain (shard, seq, epoch, timestamp_max, transfers, accounts, failed,
                              resolutions, prev_digest, digest, sections)
    SELECT $31::int, $32::bigint, $33::bigint, $34::bigint, $35::int, $36::int, $37::int,
           $38::int, $39::bytea, $40::bytea, $41::bytea
    WHERE $32::bigint IS NOT NULL
), seen AS (
    SELECT coalesce((SELECT array_agg(shard ORDER BY shard) FROM fence), '{}') AS shards,
           coalesce((SELECT array_agg(epoch ORDER BY shard) FROM fence), '{}') AS epochs,
           coalesce((SELECT f.id FROM failed_transfers f WHERE f.id = ANY($3::bigint[])
                     LIMIT 1),
                    (SELECT i FROM unnest($3::bigint[]) i WHERE i = ANY($16::bigint[])
                     LIMIT 1)) AS stored_burned,
           (SELECT t.id FROM transfers t WHERE t.id = ANY($16::bigint[]) LIMIT 1)
               AS burned_stored
)
SELECT CASE
    WHEN seen.shards <> $1::int[] OR seen.epochs <> $2::bigint[] THEN ledger_refuse_commit(
        'TXF01', format('shards %s are at epochs %s, not %s', $1::int[], seen.epochs,
                        $2::bigint[]))
    WHEN seen.stored_burned IS NOT NULL THEN ledger_refuse_commit(
        'TXI01', format('transfer id %s is both stored and burned', seen.stored_burned))
    WHEN seen.burned_stored IS NOT NULL THEN ledger_refuse_commit(
        'TXI01', format('transfer id %s is both burned and stored', seen.burned_stored))
    ELSE true
END
FROM seen
"""


def _transfer_lists(transfers: list[Transfer], columns: list[TransferColumns],
                    own: np.ndarray) -> list[list[Any]]:
    """The transfers of both forms as one list per column of the transfers table, in the
    order of ``TRANSFER_COLUMNS`` + ``_WRITER_COLUMNS``, except ``tenant`` and ``origin``,
    which come last (``_COMMIT_ONE_SQL`` takes them as its last parameters)."""
    lists: list[list[Any]] = [[] for _ in range(len(TRANSFER_COLUMNS))]
    for t in transfers:
        for column, value in zip(lists, (
                t.id, t.debit_account_id, t.credit_account_id, t.amount, t.currency,
                t.flags, t.pending_id, t.timeout_s, t.code, t.user_data, t.timestamp,
                t.tenant, t.origin), strict=True):
            column.append(value)
    for c in columns:
        for column, values in zip(lists, (
                c.id.tolist(), c.debit_account_id.tolist(), c.credit_account_id.tolist(),
                c.amount.tolist(), [currency_code(n) for n in c.currency.tolist()],
                c.flags.tolist(), c.pending_id.tolist(), c.timeout_s.tolist(),
                c.code.tolist(), c.user_data or [""] * len(c), c.timestamp.tolist(),
                c.tenant.tolist(), c.origin.tolist()), strict=True):
            column.extend(values)
    partition, legs = writer_columns(np.asarray(lists[1], dtype=np.int64),
                                     np.asarray(lists[2], dtype=np.int64), own)
    origin = lists.pop(TRANSFER_COLUMNS.index("origin"))
    tenant = lists.pop(TRANSFER_COLUMNS.index("tenant"))
    return [*lists, partition.tolist(), legs.tolist(), tenant, origin]


def _id_ranges(transfers: list[Transfer], columns: list[TransferColumns]) -> tuple[int, int]:
    """The smallest and greatest id this commit stores ((1, 0), an empty range, if none).

    The primary keys keep an id from being stored twice or burned twice; the commit's end
    keeps it from being both. A shard reads from the database only ids at or below the
    greatest it knows of, so an id another shard took since then is caught there, not
    before planning. Cheap: the stored ids are checked as one range of failed_transfers'
    primary key (for ids spread over a wide range, that is the part of failed_transfers in
    it), and burned ids are few.
    """
    lows = [t.id for t in transfers] + [int(c.id.min()) for c in columns]
    if not lows:
        return 1, 0
    highs = [t.id for t in transfers] + [int(c.id.max()) for c in columns]
    return min(lows), max(highs)


def _delta_arrays(deltas: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter(deltas.keys(), dtype=np.int64, count=len(deltas))
    return ids, np.array(list(deltas.values()), dtype=np.int64).reshape(-1, 4)


def _sum_deltas(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Balance deltas summed per account: sorted account ids and their (n, 4) sums, the
    accounts whose sum is zero left out.

    int64 cannot wrap here: an account's deltas in one commit are bounded by its
    uncommitted increases, which the rules keep within AMOUNT_MAX.
    """
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.int64)
    ids = np.concatenate([i for i, _ in parts])
    values = np.concatenate([v for _, v in parts])
    unique, inverse = np.unique(ids, return_inverse=True)
    sums = np.zeros((unique.shape[0], 4), dtype=np.int64)
    np.add.at(sums, inverse, values)
    changed = sums.any(axis=1)
    return unique[changed], sums[changed]


@dataclass(frozen=True, slots=True)
class OwnEffects:
    """What commits did to the committing shard's own accounts: account ids (each once),
    their (n, 4) balance deltas, and the greatest timestamp of the rows written."""

    ids: np.ndarray
    values: np.ndarray
    timestamp_max: int

    @classmethod
    def combine(cls, parts: list[OwnEffects]) -> OwnEffects:
        ids, values = _sum_deltas([(p.ids, p.values) for p in parts])
        return cls(ids, values, max((p.timestamp_max for p in parts), default=0))


def _timestamp_max(batches: list[CommitBatch]) -> int:
    """The greatest timestamp of a transfer or resolution row in ``batches`` (0 if none)."""
    high = 0
    for b in batches:
        for t in b.transfers:
            high = max(high, t.timestamp)
        for r in b.resolutions:
            high = max(high, r.timestamp)
        cols = b.transfer_columns
        if cols is not None and len(cols):
            high = max(high, int(cols.timestamp.max()))
    return high


# Every shard's head, as committed when the statement runs (one index read per shard), and
# the audit log's head (its last event: one index read; 0 and 32 zero bytes when there is
# none), in one statement, so one snapshot gives both.
_ANCHOR_SQL = """
INSERT INTO ledger_anchors (at, reason, shards, seqs, digests, audit_id, audit_digest)
SELECT coalesce($2::timestamptz, clock_timestamp()), $1::text,
       coalesce(array_agg(h.shard ORDER BY h.shard), '{}'),
       coalesce(array_agg(h.seq ORDER BY h.shard), '{}'),
       coalesce(array_agg(h.digest ORDER BY h.shard), '{}'),
       coalesce((SELECT max(id) FROM audit_events), 0),
       coalesce((SELECT digest FROM audit_events ORDER BY id DESC LIMIT 1),
                decode(repeat('00', 32), 'hex'))
FROM (SELECT DISTINCT shard FROM ledger_chain) s
CROSS JOIN LATERAL (
    SELECT c.shard, c.seq, c.digest FROM ledger_chain c WHERE c.shard = s.shard
    ORDER BY c.seq DESC LIMIT 1) h
RETURNING id
"""


def _link_parameters(shard: int, link: Link | None) -> tuple[Any, ...]:
    """The commit statements' parameters of a link: the shard, then the link's columns
    (NULL when the commit writes no row)."""
    if link is None:
        return (shard, *(None,) * 10)
    return (shard, link.seq, link.epoch, link.timestamp_max, link.transfers, link.accounts,
            link.failed, link.resolutions, link.prev_digest, link.digest, link.sections)


@dataclass(frozen=True, slots=True)
class _ChainRows:
    """A commit's rows in the chain's canonical encoding, one ``Rows`` per section."""

    transfers: Rows
    accounts: Rows
    failed: Rows
    resolutions: Rows

    @classmethod
    def of(cls, transfers: list[Transfer], chunk_rows: list[Rows], accounts: list[Account],
           failed: list[Failed], resolutions: list[ResolutionRow], own: np.ndarray
           ) -> _ChainRows:
        parts = list(chunk_rows)
        if transfers:
            parts.append(column_rows(TransferColumns.from_transfers(transfers), own))
        return cls(
            Rows.concat(parts, TRANSFER_ROW).in_order("id"),
            _account_rows(accounts).in_order("id"),
            failed_rows(
                id=np.array([f.id for f in failed], dtype=np.int64),
                result=np.array([f.result for f in failed], dtype=np.int64),
                timestamp=np.array([f.timestamp for f in failed], dtype=np.int64),
            ).in_order("id") if failed else Rows(np.zeros(0, dtype=FAILED_ROW)),
            resolution_rows(
                pending_id=np.array([r.pending_id for r in resolutions], dtype=np.int64),
                kind=np.array([r.kind for r in resolutions], dtype=np.int64),
                transfer_id=np.array([r.transfer_id for r in resolutions], dtype=np.int64),
                timestamp=np.array([r.timestamp for r in resolutions], dtype=np.int64),
            ).in_order("pending_id") if resolutions
            else Rows(np.zeros(0, dtype=RESOLUTION_ROW)),
        )

    def sections(self) -> tuple[Rows, Rows, Rows, Rows]:
        return self.transfers, self.accounts, self.failed, self.resolutions

    @property
    def empty(self) -> bool:
        return not any(len(r) for r in self.sections())

    def counts(self) -> tuple[int, int, int, int]:
        t, a, f, r = (len(rows) for rows in self.sections())
        return t, a, f, r

    def timestamp_max(self) -> int:
        return max((int(r.fixed["timestamp"].max()) for r in self.sections() if len(r)),
                   default=0)

    def section_digests(self) -> list[bytes]:
        return [section_digest(name, rows) if len(rows) else empty
                for name, rows, empty in zip(SECTIONS, self.sections(), EMPTY_SECTIONS,
                                             strict=True)]


def _account_rows(accounts: list[Account]) -> Rows:
    if not accounts:
        return Rows(np.zeros(0, dtype=ACCOUNT_ROW))

    def column(name: str) -> np.ndarray:
        return np.array([getattr(a, name) for a in accounts], dtype=np.int64)

    return account_rows(
        id=column("id"), currency=currency_letters(
            np.array([currency_number(a.currency) for a in accounts], dtype=np.int64)),
        flags=column("flags"), code=column("code"), user_data=[a.user_data for a in accounts],
        timestamp=column("timestamp"), tenant=column("tenant"), origin=column("origin"),
        partition=np.array([partition_of(a.id) for a in accounts], dtype=np.int64))


def _account(row: asyncpg.Record) -> Account:
    return Account(**{c: row[c] for c in ACCOUNT_COLUMNS})


def _transfer(row: asyncpg.Record) -> Transfer:
    return Transfer(**{c: row[c] for c in TRANSFER_COLUMNS})


class LedgerStore:
    """One connection pool to one ledger database, shared by a shard's tasks."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # Commits up to this many rows are one statement; tests set 0 to hold the longer
        # form to the same results.
        self.one_statement_rows_max = ONE_STATEMENT_ROWS_MAX
        self.checkpoint_accounts_per_statement = CHECKPOINT_ACCOUNTS_PER_STATEMENT
        # Per shard committing through this store: its last link's sequence number and
        # digest, read from the database at its first commit and after a failed one.
        self._heads: dict[int, tuple[int, bytes]] = {}


    @property
    def pool(self) -> asyncpg.Pool:
        """The service's connections (leases of work that runs in one place use it too)."""
        return self._pool
    @classmethod
    async def connect(
        cls, url: str, *, pool_size_max: int, connect_timeout_s: float, command_timeout_s: float
    ) -> LedgerStore:
        require(pool_size_max >= 2, "a commit and a read may run at once")
        pool = await keeping_pool(
            url,
            min_size=1,
            max_size=pool_size_max,
            timeout=connect_timeout_s,
            command_timeout=command_timeout_s,
            # Durability is the point of a ledger: never let a session relax it.
            server_settings={"synchronous_commit": "on", "application_name": "txproc"},
            reset=keep_session,
        )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    def terminate(self) -> None:
        self._pool.terminate()

    # -- recovery ---------------------------------------------------------------------------

    async def take_epoch(self, shard: int) -> int:
        """Start a new incarnation of ``shard``; returns its epoch.

        The UPDATE waits for every in-flight commit that locked this shard's epoch row FOR
        SHARE, so when it returns no batch of an earlier incarnation can still commit.
        """
        async with self._pool.acquire() as conn:
            epoch = await conn.fetchval(
                "INSERT INTO shard_epochs (shard, epoch) VALUES ($1, 1) "
                "ON CONFLICT (shard) DO UPDATE SET epoch = shard_epochs.epoch + 1 "
                "RETURNING epoch",
                shard,
            )
        return int(epoch)

    async def epochs(self) -> dict[int, int]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT shard, epoch FROM shard_epochs")
        return {r["shard"]: r["epoch"] for r in rows}

    async def load_shard(
        self, shard: int, partitions: list[int]
    ) -> tuple[list[Account], list[Transfer]]:
        """The accounts of these partitions, with their committed balances, and their open
        pending transfers, in one snapshot. Replays only these partitions' unfolded rows,
        so a shard recovering right after its checkpoint reads little beyond its rows."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            accounts = await conn.fetch(_LOAD_ACCOUNTS_SQL, partitions, shard)
            pending = await conn.fetch(
                f"SELECT {_TRANSFER_SELECT} FROM transfers t "
                "WHERE (t.flags & 2) <> 0 AND t.partition = ANY($1::int[]) "
                "AND NOT EXISTS (SELECT 1 FROM pending_resolutions r WHERE r.pending_id = t.id)",
                partitions,
            )
        return [_account(r) for r in accounts], [_transfer(r) for r in pending]

    async def ensure_partition_map(self, partitions: PartitionMap,
                                   database_key: str = MAIN_DATABASE) -> None:
        """Record at first start the rows of the partition map that this database
        ``database_key`` holds (those of its own shards: ``PartitionMap.rows_of_database``);
        refuse a different map later, with ValueError: another shard count, or another
        database layout (a shard moved to another database, or the URLs given in another
        order, would start a shard on a database without its rows)."""
        expected = partitions.rows_of_database(database_key)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE partition_map IN EXCLUSIVE MODE")
            rows = await conn.fetch(
                "SELECT partition, shard, database_key FROM partition_map ORDER BY 1")
            if not rows:
                await conn.copy_records_to_table(
                    "partition_map", records=expected,
                    columns=("partition", "shard", "database_key"),
                )
                return
            stored = [(r["partition"], r["shard"], r["database_key"]) for r in rows]
            if stored == expected:
                return
            keys = sorted({r[2] for r in stored})
            if keys != [database_key]:
                raise ValueError(
                    f"the database given as {database_key!r} holds the partitions of "
                    f"database {', '.join(keys)}: give the databases in the order of the "
                    "first start (a shard changes database only by `txproc move-shard`)")
            shards = max(r[1] for r in stored) + 1
            raise ValueError(
                f"this ledger was created with {shards} shards; start it with "
                f"--shards {shards} and every database that holds its shards (re-sharding "
                "a live ledger is not supported)"
            )

    # -- reads ------------------------------------------------------------------------------

    async def ids_max(self) -> int:
        """The greatest transfer id stored or burned so far (0 if none); two index reads."""
        async with self._pool.acquire() as conn:
            high = await conn.fetchval(
                "SELECT greatest((SELECT max(id) FROM transfers), "
                "(SELECT max(id) FROM failed_transfers), "
                "(SELECT max(id) FROM archived_transfer_ids))")
        return int(high or 0)

    async def fetch_known(self, ids: list[int], pending_ids: list[int]) -> Known:
        """What the database holds about transfer ids the shard no longer remembers."""
        known = Known()
        if not ids and not pending_ids:
            return known
        async with self._pool.acquire() as conn:
            if ids:
                # Stored transfers, then burned ids and the ids of archived transfers
                # (migration 0033) answered ``id_archived``: never applied again. One more
                # probe of a small table's key per id read, in the same statement; new ids
                # above the high-water mark are not read at all (docs/design.md §8).
                for row in await conn.fetch(_KNOWN_SQL, ids, int(TransferResult.id_archived)):
                    if row["result"] is None:
                        known.transfers[row["id"]] = _transfer(row)
                    else:
                        known.failed[row["id"]] = row["result"]
            if pending_ids:
                for row in await conn.fetch(
                    "SELECT pending_id, kind FROM pending_resolutions "
                    "WHERE pending_id = ANY($1::bigint[])",
                    pending_ids,
                ):
                    known.resolutions[row["pending_id"]] = row["kind"]
        return known

    async def lookup_accounts(self, ids: list[int]) -> dict[int, Account]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_ACCOUNT_SELECT} FROM account_balances WHERE id = ANY($1::bigint[])",
                ids,
            )
        return {r["id"]: _account(r) for r in rows}

    async def lookup_transfers(self, ids: list[int]) -> dict[int, Transfer]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_TRANSFER_SELECT} FROM transfers WHERE id = ANY($1::bigint[])", ids
            )
        return {r["id"]: _transfer(r) for r in rows}

    async def fence_and_find(
        self, shard: int, ids: list[int]
    ) -> tuple[dict[int, Transfer], dict[int, int]]:
        """Fence out every incarnation of ``shard`` that exists now, then read which of
        ``ids`` are stored and which are burned (with their result).

        Taking the next epoch waits for any commit of those incarnations still in flight
        and makes any later one fail its fence, so the answer is final for everything they
        were sent: what the front uses when a shard stayed unreachable through its retries
        while other parts of a request were answered. The shard's current incarnation, if
        it is alive, restarts at its next commit (crash-only) and recovers.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE shard_epochs SET epoch = epoch + 1 WHERE shard = $1", shard)
            stored = {r["id"]: _transfer(r) for r in await conn.fetch(
                f"SELECT {_TRANSFER_SELECT} FROM transfers WHERE id = ANY($1::bigint[])",
                ids)}
            burned = {r["id"]: r["result"] for r in await conn.fetch(
                "SELECT id, result FROM failed_transfers WHERE id = ANY($1::bigint[])",
                ids)}
        return stored, burned

    async def committed_events(
        self, transfer_ids: list[int], expired_pending_ids: list[int]
    ) -> tuple[set[int], set[int]]:
        """Which of these transfers and expiries are committed (for orphaned holds)."""
        async with self._pool.acquire() as conn:
            transfers = await conn.fetch(
                "SELECT id FROM transfers WHERE id = ANY($1::bigint[])", transfer_ids
            )
            expiries = await conn.fetch(
                "SELECT pending_id FROM pending_resolutions "
                "WHERE pending_id = ANY($1::bigint[]) AND kind = $2",
                expired_pending_ids,
                int(Resolution.expired),
            )
        return {r["id"] for r in transfers}, {r["pending_id"] for r in expiries}

    async def audit(self) -> Audit:
        """Recompute every balance from the append-only rows and check double entry."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            totals = await conn.fetchrow(
                "SELECT count(*) AS n, coalesce(sum(debits_posted) - sum(credits_posted), 0) "
                "AS posted, coalesce(sum(debits_pending) - sum(credits_pending), 0) AS pending "
                "FROM account_balances"
            )
            transfers = await conn.fetchval("SELECT count(*) FROM transfers")
            mismatched = await conn.fetchval(_AUDIT_POSTINGS_SQL)
            beyond = await conn.fetchval(
                "SELECT count(*) FROM account_balances WHERE "
                "((flags & 1) <> 0 AND debits_pending + debits_posted > credits_posted) OR "
                "((flags & 2) <> 0 AND credits_pending + credits_posted > debits_posted)"
            )
        return Audit(
            accounts=totals["n"], transfers=transfers,
            debits_minus_credits_posted=int(totals["posted"]),
            debits_minus_credits_pending=int(totals["pending"]),
            accounts_not_equal_to_postings=mismatched, accounts_beyond_limit=beyond,
        )

    async def accounts_beyond_limit(self, limit: int = 10) -> list[dict[str, int]]:
        """Up to ``limit`` accounts whose balances break their own limit flag (what
        ``audit`` counts as ``accounts_beyond_limit``), with those balances."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, flags, debits_pending, debits_posted, credits_pending, "
                "credits_posted FROM account_balances WHERE "
                "((flags & 1) <> 0 AND debits_pending + debits_posted > credits_posted) OR "
                "((flags & 2) <> 0 AND credits_pending + credits_posted > debits_posted) "
                "ORDER BY id LIMIT $1", limit)
        return [{k: int(v) for k, v in r.items()} for r in rows]

    # -- the write path ---------------------------------------------------------------------

    async def commit(
        self, batches: list[CommitBatch], *, fences: dict[int, int], shard: int,
        partition_map: PartitionMap,
    ) -> OwnEffects:
        """Write ``batches`` of shard ``shard`` in one transaction, fenced on the epochs in
        ``fences``.

        Its transfers are recorded as its rows (``writer_columns``), and one block of
        postings is left for each other shard whose accounts it touched. No balance row is
        written: the effects on the shard's own accounts are
        returned, for its next ``checkpoint``. The rows are one link of the shard's hash
        chain (``ledger_chain``), written by the same transaction, after the shard's last
        stored link. Raises FenceError if a fenced shard has moved on; the caller must
        then discard its in-memory state (crash), because nothing of these batches was
        written.
        """
        try:
            return await self._commit(batches, fences=fences, shard=shard,
                                      partition_map=partition_map)
        except BaseException:
            # Whatever happened, the next commit links to what the database holds.
            self._heads.pop(shard, None)
            raise

    async def _commit(
        self, batches: list[CommitBatch], *, fences: dict[int, int], shard: int,
        partition_map: PartitionMap,
    ) -> OwnEffects:
        accounts = [a for b in batches for a in b.accounts]
        transfers = [t for b in batches for t in b.transfers]
        columns = [b.transfer_columns for b in batches
                   if b.transfer_columns is not None and len(b.transfer_columns)]
        failed = [f for b in batches for f in b.failed]
        resolutions = [r for b in batches for r in b.resolutions]
        own_partitions = _own_partitions(partition_map, shard)
        ids, values = _sum_deltas(
            [_delta_arrays(b.balance_deltas) for b in batches if b.balance_deltas]
            + [(b.delta_ids, b.delta_values) for b in batches if b.delta_ids is not None])
        remote = ~_owned_mask(own_partitions.tobytes())[partitions_of(ids)]
        blocks: list[tuple[Any, ...]] = []
        if remote.any():
            remote_ids, remote_values = ids[remote], values[remote]
            owners = partition_map.shards_of(remote_ids)
            blocks = [(int(owner), remote_ids[owners == owner].tolist(),
                       *remote_values[owners == owner].T.tolist())
                      for owner in np.unique(owners).tolist()]
        chunk_rows = [column_rows(c, own_partitions) for c in columns]
        link = await self._next_link(
            shard, fences[shard] if shard in fences else 0,
            _ChainRows.of(transfers, chunk_rows, accounts, failed, resolutions, own_partitions))
        rows = (len(transfers) + sum(len(c) for c in columns) + len(failed)
                + len(resolutions))
        if not accounts and len(blocks) <= 1 and rows <= self.one_statement_rows_max:
            await self._commit_one_statement(transfers, columns, failed, resolutions,
                                             blocks, fences, own_partitions, shard, link)
            self._advance(shard, link)
            return OwnEffects(ids[~remote], values[~remote], _timestamp_max(batches))
        async with self._pool.acquire() as conn, conn.transaction():
            if accounts:
                await conn.copy_records_to_table(
                    "accounts",
                    records=[
                        (a.id, a.currency, a.flags, a.code, a.user_data, 0, 0, 0, 0,
                         a.timestamp, a.tenant, a.origin, partition_of(a.id))
                        for a in accounts
                    ],
                    columns=(*ACCOUNT_COLUMNS, "partition"),
                )
            if transfers:
                await _copy_transfers(conn, transfers, own_partitions)
            for cols, chunk in zip(columns, chunk_rows, strict=True):
                await _copy_transfer_columns(conn, cols, own_partitions, chunk)
            if failed:
                await conn.copy_records_to_table(
                    "failed_transfers",
                    records=[(f.id, f.result, f.timestamp, shard) for f in failed],
                    columns=("id", "result", "timestamp", "shard"),
                )
            if resolutions:
                await conn.copy_records_to_table(
                    "pending_resolutions",
                    records=[(r.pending_id, r.kind, r.transfer_id, r.timestamp)
                             for r in resolutions],
                    columns=("pending_id", "kind", "transfer_id", "timestamp"),
                )
            if len(blocks) > 1:
                await conn.executemany(_POSTING_BLOCK_SQL, blocks[1:])
            low, high = _id_ranges(transfers, columns)
            shards = sorted(fences)
            end = await conn.fetchrow(
                _COMMIT_END_SQL, shards, low, high, [f.id for f in failed],
                *(blocks[0] if blocks else (None,) * 6), *_link_parameters(shard, link))
            current = dict(zip(end["shards"] or [], end["epochs"] or [], strict=True))
            for fenced in shards:
                if current.get(fenced) != fences[fenced]:
                    raise FenceError(f"shard {fenced} is at epoch {current.get(fenced)}, "
                                     f"not {fences[fenced]}")
            if end["stored_burned"] is not None:
                raise IdConflict(f"transfer id {end['stored_burned']} is both stored and burned")
            if end["burned_stored"] is not None:
                raise IdConflict(f"transfer id {end['burned_stored']} is both burned and stored")
        self._advance(shard, link)
        return OwnEffects(ids[~remote], values[~remote], _timestamp_max(batches))

    async def _next_link(self, shard: int, epoch: int, rows: _ChainRows) -> Link | None:
        """The link these rows make after the shard's head (None if there are none)."""
        if rows.empty:
            return None
        head = self._heads.get(shard)
        if head is None:
            head = self._heads[shard] = await self.chain_head(shard)
        seq, prev = head
        counts = rows.counts()
        timestamp_max = rows.timestamp_max()
        sections = rows.section_digests()
        digest = link_digest(shard=shard, seq=seq + 1, epoch=epoch,
                             timestamp_max=timestamp_max, counts=counts, prev_digest=prev,
                             sections=sections)
        return Link(shard=shard, seq=seq + 1, epoch=epoch, timestamp_max=timestamp_max,
                    transfers=counts[0], accounts=counts[1], failed=counts[2],
                    resolutions=counts[3], prev_digest=prev, digest=digest,
                    sections=b"".join(sections))

    def _advance(self, shard: int, link: Link | None) -> None:
        if link is not None:
            self._heads[shard] = (link.seq, link.digest)

    async def chain_head(self, shard: int) -> tuple[int, bytes]:
        """The sequence number and digest of ``shard``'s last stored link ((0, 32 zero
        bytes) before its first). Read after the shard took its epoch, it is final: no
        commit of an earlier incarnation can land afterwards (the fence)."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT seq, digest FROM ledger_chain WHERE shard = $1 "
                "ORDER BY seq DESC LIMIT 1", shard)
        if row is None:
            return 0, GENESIS_DIGEST
        return int(row["seq"]), bytes(row["digest"])

    async def anchor(self, reason: str, *, at: datetime.datetime | None = None) -> int:
        """Record every shard's chain head and the audit log's head, as committed now, in
        ``ledger_anchors`` (one index read per shard, one for the audit log); returns the
        anchor's id. ``at`` defaults to the database's
        clock."""
        async with self._pool.acquire() as conn:
            return int(await conn.fetchval(_ANCHOR_SQL, reason, at))

    async def _commit_one_statement(
        self, transfers: list[Transfer], columns: list[TransferColumns], failed: list[Failed],
        resolutions: list[ResolutionRow], blocks: list[tuple[Any, ...]],
        fences: dict[int, int], own: np.ndarray, shard: int, link: Link | None,
    ) -> None:
        """A small commit as one statement (``_COMMIT_ONE_SQL``): its own transaction, one
        round trip, the same rows, fence and id checks as the longer form."""
        shards = sorted(fences)
        block = blocks[0] if blocks else (None,) * 6
        async with self._pool.acquire() as conn:
            try:
                *transfer_lists, tenants, origins = _transfer_lists(transfers, columns, own)
                await conn.fetchval(
                    _COMMIT_ONE_SQL, shards, [fences[s] for s in shards],
                    *transfer_lists,
                    [f.id for f in failed], [f.result for f in failed],
                    [f.timestamp for f in failed],
                    [r.pending_id for r in resolutions], [r.kind for r in resolutions],
                    [r.transfer_id for r in resolutions], [r.timestamp for r in resolutions],
                    *block, tenants, origins, *_link_parameters(shard, link))
            except asyncpg.PostgresError as exc:
                refused = _REFUSALS.get(getattr(exc, "sqlstate", ""))
                if refused is not None:
                    raise refused(str(exc)) from exc
                raise

    async def checkpoint(
        self, shard: int, epoch: int, partitions: list[int], *,
        own: OwnEffects | None = None, floor_ns: int = 0,
    ) -> int:
        """Fold into the balance rows of ``partitions`` (shard ``shard``'s) the effects of
        every row the shard wrote since its last checkpoint, and the posting blocks other
        shards left for its accounts whose transactions had all ended when it read them
        (below its fold horizon, ``_checkpoint_fold_sql``); returns the new checkpoint
        timestamp.

        ``own`` are those effects as the shard committed them since its last checkpoint
        (``commit``'s answers, summed): the cheap way. Without it they are computed from
        the rows (``unfolded_legs``): what a shard does first after recovery, when its
        memory holds none of its predecessor's. The shard calls this between its commits,
        so no row of its own is written while it runs; ``floor_ns`` is a timestamp every
        later row of the shard will exceed (0 if the shard cannot promise one), which
        moves an idle shard's checkpoint forward. One transaction, fenced on the shard's
        epoch: readers see the effects unfolded before it and folded after it, never both
        or neither.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await _check_fences(conn, {shard: epoch})
            if await conn.fetchval(_HORIZON_AHEAD_SQL, shard):
                raise FoldHorizonError(
                    f"shard {shard}'s posting fold horizon is ahead of the database's "
                    "transaction ids: restored into another cluster? (docs/design.md §7)")
            await conn.execute(_RECENT_ROWS_ONLY)
            old = int(await conn.fetchval(
                'SELECT min("timestamp") FROM partition_checkpoints '
                "WHERE partition = ANY($1::int[])", partitions))
            if own is None:
                high = await conn.fetchval(_CHECKPOINT_HIGH_SQL, partitions, old)
                new = max(int(high or 0), old, floor_ns)
                await conn.execute(_CHECKPOINT_FOLD_ROWS_SQL, partitions, new, shard, epoch)
            else:
                new = max(own.timestamp_max, old, floor_ns)
                # In pieces, with a pause between them: one transaction still (readers see
                # all of it or none), but its work, and the WAL the commits beside it
                # flush, come in slices instead of one burst (docs/design.md §13).
                step = self.checkpoint_accounts_per_statement
                for at in range(0, max(len(own.ids), 1), step):
                    if at:
                        await asyncio.sleep(CHECKPOINT_PAUSE_S)
                    part = slice(at, at + step)
                    await conn.execute(
                        _CHECKPOINT_FOLD_OWN_SQL if at == 0 else _FOLD_ACCOUNTS_SQL,
                        own.ids[part].tolist(), *own.values[part].T.tolist(),
                        *((shard, epoch) if at == 0 else ()))
            await conn.execute(
                'UPDATE partition_checkpoints SET "timestamp" = $2 '
                "WHERE partition = ANY($1::int[])", partitions, new)
        # Summarize the block ranges filled since, so that reads of the rows after a
        # checkpoint skip everything before it (outside the transaction: it takes a lock
        # that shards checkpointing at once queue on, and it changes no row).
        async with self._pool.acquire() as conn:
            await conn.execute(
                "SELECT ledger_summarize_new_ranges()")
        return new

    async def checkpoint_timestamp(self, partitions: list[int]) -> int:
        """The greatest timestamp of a row the shard of ``partitions`` wrote, or of its
        checkpoint: every timestamp it assigns from now on must exceed it."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(_RECENT_ROWS_ONLY)
            old = await conn.fetchval(
                'SELECT max("timestamp") FROM partition_checkpoints '
                "WHERE partition = ANY($1::int[])", partitions)
            high = await conn.fetchval(_CHECKPOINT_HIGH_SQL, partitions, int(old or 0))
        return max(int(old or 0), int(high or 0))


async def _check_fences(conn: asyncpg.Connection, fences: dict[int, int]) -> None:
    shards = sorted(fences)
    rows = await conn.fetch(
        "SELECT shard, epoch FROM shard_epochs WHERE shard = ANY($1::int[]) "
        "ORDER BY shard FOR SHARE",
        shards,
    )
    current = {r["shard"]: r["epoch"] for r in rows}
    for shard in shards:
        if current.get(shard) != fences[shard]:
            raise FenceError(
                f"shard {shard} is at epoch {current.get(shard)}, not {fences[shard]}"
            )


# The rows after a checkpoint are a thin recent slice of tables that only grow, which the
# planner cannot know ("timestamp > a parameter" is a third of a table to it): without
# sequential scans it reads them through the timestamp indexes (migration 0005).
_RECENT_ROWS_ONLY = "SET LOCAL enable_seqscan = off"

# The accounts of the partitions $1 with their committed balances: what account_balances
# answers, with the replay limited to these partitions' rows and the postings summed in
# one pass rather than per account.
_LOAD_ACCOUNTS_SQL = """
WITH r AS (
    SELECT l.account_id, sum(l.debits_pending) AS dp, sum(l.debits_posted) AS dpo,
           sum(l.credits_pending) AS cp, sum(l.credits_posted) AS cpo
    FROM remote_posting_blocks b,
         unnest(b.account_ids, b.debits_pending, b.debits_posted, b.credits_pending,
                b.credits_posted)
             AS l(account_id, debits_pending, debits_posted, credits_pending, credits_posted)
    WHERE b.shard = $2 AND b.xid >= posting_horizon($2)
    GROUP BY l.account_id
), u AS (
    SELECT account_id, sum(debits_pending) AS dp, sum(debits_posted) AS dpo,
           sum(credits_pending) AS cp, sum(credits_posted) AS cpo
    FROM unfolded_legs($1::int[], 9223372036854775807) GROUP BY account_id
)
SELECT a.id, a.currency, a.flags, a.code, a.user_data,
       (a.debits_pending + coalesce(r.dp, 0) + coalesce(u.dp, 0))::bigint AS debits_pending,
       (a.debits_posted + coalesce(r.dpo, 0) + coalesce(u.dpo, 0))::bigint AS debits_posted,
       (a.credits_pending + coalesce(r.cp, 0) + coalesce(u.cp, 0))::bigint AS credits_pending,
       (a.credits_posted + coalesce(r.cpo, 0) + coalesce(u.cpo, 0))::bigint AS credits_posted,
       a."timestamp", a.tenant, a.origin
FROM accounts a
LEFT JOIN r ON r.account_id = a.id
LEFT JOIN u ON u.account_id = a.id
WHERE a.partition = ANY($1::int[])
"""

# The greatest timestamp of a transfer or expiry the shard of $1 wrote after $2.
_CHECKPOINT_HIGH_SQL = """
SELECT greatest(
    (SELECT max(t."timestamp") FROM transfers t
     WHERE t."timestamp" > $2 AND t.partition = ANY($1::int[])),
    (SELECT max(r."timestamp") FROM pending_resolutions r
     JOIN transfers p ON p.id = r.pending_id
     WHERE r."timestamp" > $2 AND r.kind = 3 AND p.partition = ANY($1::int[])))
"""

def _checkpoint_fold_sql(own_legs: str, shard_param: str, epoch_param: str) -> str:
    """One statement moving into a shard's balance rows its own effects (the rows of
    ``own_legs``: account and four balance deltas) and the posting blocks other shards left
    it below the fold horizon, and appending that horizon (docs/design.md §7, "Posting
    blocks and the fold horizon").

    The horizon is the statement's own snapshot's xmin: every transaction with an id below
    it has ended, so the blocks below it that this snapshot sees are exactly the committed
    ones, and none can be added. Those at or above the previous horizon are folded (each
    exactly once: the previous fold took those below it); the new horizon is appended to
    ``posting_folds`` in the same statement, so a reader sees the blocks in the balance rows
    and the horizon above them together, or neither. A fold that moves no block appends
    nothing: no committed block lies between the two horizons, so the old one counts the
    same blocks."""
    return f"""
WITH h AS MATERIALIZED (
    SELECT coalesce(f.seq, 0) AS seq, coalesce(f.horizon, '0'::xid8) AS prev,
           greatest(coalesce(f.horizon, '0'::xid8),
                    pg_snapshot_xmin(pg_current_snapshot())) AS next
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT p.seq, p.horizon FROM posting_folds p WHERE p.shard = {shard_param}
        ORDER BY p.seq DESC LIMIT 1) f ON true
), folded AS MATERIALIZED (
    SELECT b.* FROM h, remote_posting_blocks b
    WHERE b.shard = {shard_param} AND b.xid >= h.prev AND b.xid < h.next
), horizon AS (
    INSERT INTO posting_folds (shard, seq, horizon, epoch, blocks, legs)
    SELECT {shard_param}, h.seq + 1, h.next, {epoch_param}, c.blocks, c.legs
    FROM h, (SELECT count(*)::int AS blocks,
                    coalesce(sum(cardinality(folded.account_ids)), 0)::bigint AS legs
             FROM folded) c
    WHERE c.blocks > 0
), legs AS (
    SELECT * FROM {own_legs}
    UNION ALL
    SELECT l.* FROM folded b, unnest(b.account_ids, b.debits_pending, b.debits_posted,
                                     b.credits_pending, b.credits_posted) AS l
), sums AS (
    SELECT account_id, sum(debits_pending)::bigint AS dp, sum(debits_posted)::bigint AS dpo,
           sum(credits_pending)::bigint AS cp, sum(credits_posted)::bigint AS cpo
    FROM legs AS l(account_id, debits_pending, debits_posted, credits_pending, credits_posted)
    GROUP BY account_id
)
UPDATE accounts a SET
    debits_pending = a.debits_pending + s.dp,
    debits_posted = a.debits_posted + s.dpo,
    credits_pending = a.credits_pending + s.cp,
    credits_posted = a.credits_posted + s.cpo
FROM sums s WHERE a.id = s.account_id
"""


# Further slices of a shard's own effects (each account once): $1 ids, $2-$5 deltas.
_FOLD_ACCOUNTS_SQL = """
UPDATE accounts a SET
    debits_pending = a.debits_pending + s.dp,
    debits_posted = a.debits_posted + s.dpo,
    credits_pending = a.credits_pending + s.cp,
    credits_posted = a.credits_posted + s.cpo
FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
    AS s(account_id, dp, dpo, cp, cpo)
WHERE a.id = s.account_id
"""
# The shard of the partitions $1 (shard $3, epoch $4): its effects up to $2, computed from
# its rows.
_CHECKPOINT_FOLD_ROWS_SQL = _checkpoint_fold_sql(
    "unfolded_legs($1::int[], $2)", "$3::int", "$4::bigint")
# The same, with its effects given as arrays ($1-$5; the shard is $6, its epoch $7).
_CHECKPOINT_FOLD_OWN_SQL = _checkpoint_fold_sql(
    "unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])",
    "$6::int", "$7::bigint")

# Whether shard $1's newest fold horizon is above what any snapshot can now have as its
# xmin. Horizons are snapshot xmins, which never move back in one cluster; this one is
# ahead only if the transaction ids started again below it (the database was restored
# from a logical dump into another cluster), when new blocks would get ids below it and
# never be counted. The checkpoint refuses instead (docs/design.md §7).
_HORIZON_AHEAD_SQL = (
    "SELECT posting_horizon($1) > pg_snapshot_xmin(pg_current_snapshot())")
