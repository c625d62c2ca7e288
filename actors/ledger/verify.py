"""``txproc verify``'s reader: every ledger table out of one consistent snapshot, streamed
in chunks into the pure checks of processor.ledger.proof (docs/design.md §15).

The snapshot is one REPEATABLE READ, READ ONLY transaction, so a live deployment goes on
committing beside it and what is read is one moment of the ledger: the chain's links, the
rows they cover and the balance rows all agree as of that moment. Rows come through
server-side cursors, ``chunk_rows`` at a time, so a ledger of millions of transfers is
never all in memory at once (what stays is a few arrays per account, per pending transfer
and per link).

Verification is a list of *checks*, each an async function of a ``VerifyContext`` that
reads through its connection (inside the snapshot) and reports into its ``Report``:
``LEDGER_CHECKS`` are the ledger's; other domains (reconciliation records, the audit log)
add theirs to the list the CLI passes to ``verify``.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import numpy as np

from actors.ledger.indexer import HISTORY_COLUMNS, MOVEMENTS_SQL
from processor.archive import decode_manifest
from processor.ledger import (
    PARTITIONS,
    BalanceCheck,
    ChainCheck,
    PartitionMap,
    PendingCheck,
    Report,
    Rows,
    account_rows,
    failed_rows,
    resolution_rows,
    transfer_rows,
)

__all__ = ["LEDGER_CHECKS", "Check", "VerifyContext", "VerifyResult", "check_account_history",
           "verify"]

CHUNK_ROWS = 20_000
_HISTORY_COLUMNS = ", ".join(f'"{c}"' for c in HISTORY_COLUMNS)
CONNECT_TIMEOUT_S = 10.0
# A verification of a large ledger reads for minutes; each statement may take this long.
STATEMENT_TIMEOUT_S = 3_600.0
# Sorting millions of rows by shard and timestamp in memory rather than on disk.
SORT_MEMORY = "256MB"


@dataclass(slots=True)
class VerifyContext:
    """What a check works with: a connection inside the snapshot, the report to add to,
    the snapshot's moment (the database's clock) and the rows read so far."""

    conn: asyncpg.Connection
    report: Report
    now: datetime.datetime
    chunk_rows: int = CHUNK_ROWS
    rows_read: int = 0

    async def chunks(self, query: str, *args: Any) -> AsyncIterator[list[tuple[Any, ...]]]:
        """The rows of ``query`` through a server-side cursor, ``chunk_rows`` at a time,
        each chunk as a list of columns."""
        cursor = await self.conn.cursor(query, *args)
        while True:
            records = await cursor.fetch(self.chunk_rows)
            if not records:
                return
            self.rows_read += len(records)
            yield list(zip(*records, strict=True))


Check = Callable[[VerifyContext], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    report: Report
    seconds: float
    rows: int

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.report.ok,
            "rows_per_s": round(self.rows_per_s, 1),
            "seconds": round(self.seconds, 3),
            "rows": self.rows,
            "checked": self.report.checked,
            "problems_total": self.report.problems_total,
            "problems": [{"table": p.table, "id": p.id, "kind": p.kind,
                          "expected": p.expected, "found": p.found}
                         for p in self.report.problems],
        }


async def verify(url: str, checks: Sequence[Check] | None = None, *,
                 chunk_rows: int = CHUNK_ROWS) -> VerifyResult:
    """Run ``checks`` (default ``LEDGER_CHECKS``) over one snapshot of the database at
    ``url``; raises asyncpg's errors if it cannot be read (a missing table: not migrated)."""
    started = time.perf_counter()
    conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S,
                                 command_timeout=STATEMENT_TIMEOUT_S,
                                 server_settings={"application_name": "txproc verify"})
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute(f"SET LOCAL work_mem = '{SORT_MEMORY}'")
            now = await conn.fetchval("SELECT now()")
            context = VerifyContext(conn, Report(), now, chunk_rows)
            for check in LEDGER_CHECKS if checks is None else checks:
                await check(context)
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT_S)
    return VerifyResult(context.report, time.perf_counter() - started, context.rows_read)


# -- the ledger's check ---------------------------------------------------------------------

_LINKS_SQL = """
SELECT shard, seq, epoch, timestamp_max, transfers, accounts, failed, resolutions,
       prev_digest, digest, sections
FROM ledger_chain ORDER BY shard, seq
"""
# The partition map: the one recorded at first start, or (shards started without one, as
# tests and tools do) the uniform layout over every shard that took an epoch ($1, $2).
_LAYOUT = """(SELECT partition, shard FROM partition_map
    UNION ALL SELECT * FROM unnest($1::int[], $2::int[]) AS u(partition, shard))"""
# Each table's rows with the shard that wrote them (-1: none known), in section order.
_RESOLUTIONS_SQL = f"""
SELECT coalesce(m.shard, -1), r.pending_id, r.kind, r.transfer_id, r."timestamp"
FROM pending_resolutions r
LEFT JOIN transfers p ON p.id = r.pending_id
LEFT JOIN {_LAYOUT} m ON m.partition = p.partition
ORDER BY 1, r."timestamp", r.pending_id
"""  # noqa: S608 - built from this module's constants only
_ACCOUNTS_SQL = f"""
SELECT coalesce(m.shard, -1), a.id, a.currency, a.flags, a.code, a.user_data, a."timestamp",
       a.tenant, a.origin, a.partition, b.debits_pending, b.debits_posted,
       b.credits_pending, b.credits_posted
FROM accounts a
JOIN account_balances b ON b.id = a.id
LEFT JOIN {_LAYOUT} m ON m.partition = a.partition
ORDER BY 1, a."timestamp", a.id
"""  # noqa: S608 - built from this module's constants only
_FAILED_SQL = """
SELECT coalesce(shard, -1), id, result, "timestamp" FROM failed_transfers
ORDER BY 1, "timestamp", id
"""
_TRANSFERS_SQL = f"""
SELECT coalesce(m.shard, -1), t.id, t.debit_account_id, t.credit_account_id, t.amount,
       t.currency, t.flags, t.pending_id, t.timeout_s, t.code, t.user_data, t."timestamp",
       t.tenant, t.origin, t.partition, t.local_legs
FROM transfers t
LEFT JOIN {_LAYOUT} m ON m.partition = t.partition
ORDER BY 1, t."timestamp", t.id
"""  # noqa: S608 - built from this module's constants only
_ANCHORS_SQL = "SELECT id, at, shards, seqs, digests FROM ledger_anchors ORDER BY id"


def _ints(column: tuple[Any, ...]) -> np.ndarray:
    return np.array(column, dtype=np.int64)


def _letters(column: tuple[Any, ...]) -> np.ndarray:
    return np.array(column, dtype="S3")


def _by_shard(shards: np.ndarray) -> list[tuple[int, int, int]]:
    """(shard, start, stop) of each run of one shard in a sorted column."""
    cuts = [0, *(np.flatnonzero(shards[1:] != shards[:-1]) + 1).tolist(), len(shards)]
    return [(int(shards[a]), a, b) for a, b in itertools.pairwise(cuts) if b > a]


async def check_ledger(ctx: VerifyContext) -> None:
    """The ledger: chains, balances, pending transfers and anchors (processor.ledger.proof)."""
    report = ctx.report
    chain = ChainCheck(report)
    migrated = await _read_links(ctx, chain)
    archives = await _read_archives(ctx, chain)
    layout = await _layout(ctx)
    pending = PendingCheck(report)
    await _read_resolutions(ctx, chain, pending, layout)
    balances = await _read_accounts(ctx, chain, pending, layout)
    if archives:
        await _read_checkpoints(ctx, balances, archives)
    async for c in ctx.chunks(_FAILED_SQL):
        shards = _ints(c[0])
        rows = failed_rows(id=_ints(c[1]), result=_ints(c[2]), timestamp=_ints(c[3]))
        report.count("failed_transfers", len(rows))
        for shard, a, b in _by_shard(shards):
            if shard < 0 and migrated:  # burned before the chain began (migration 0024)
                report.count("rows_before_chain", b - a)
                continue
            chain.feed(2, None if shard < 0 else shard, rows.slice(a, b), rows.fixed["id"][a:b])
    async for c in ctx.chunks(_TRANSFERS_SQL, *layout):
        _feed_transfers(c, chain, balances, pending, report)
    await _read_mirrors(ctx, balances)
    chain.finish()
    balances.finish()
    pending.finish()
    await _check_anchors(ctx, chain)


async def _read_links(ctx: VerifyContext, chain: ChainCheck) -> bool:
    """Every link, into ``chain``; True if the chain has a genesis (a migrated ledger)."""
    migrated = False
    async for c in ctx.chunks(_LINKS_SQL):
        shards = _ints(c[0])
        for shard, a, b in _by_shard(shards):
            seq = _ints(c[1][a:b])
            migrated = migrated or bool((seq == 0).any())
            chain.add_links(
                shard, seq, _ints(c[2][a:b]), _ints(c[3][a:b]),
                np.stack([_ints(c[k][a:b]) for k in (4, 5, 6, 7)], axis=1),
                [bytes(d) for d in c[8][a:b]], [bytes(d) for d in c[9][a:b]],
                [bytes(d) for d in c[10][a:b]])
    return migrated


# -- archives (migration 0033, docs/design.md §16 "Archive and restore") -------------------

_ARCHIVES_SQL = """
SELECT id, name, boundary, shards, seqs, cuts, digests, transfers, resolutions, manifest,
       manifest_sha256 FROM ledger_archives WHERE restored_at IS NULL ORDER BY id
"""
_CHECKPOINTS_SQL = """
SELECT k.account_id, sum(k.debits_pending)::bigint, sum(k.debits_posted)::bigint,
       sum(k.credits_pending)::bigint, sum(k.credits_posted)::bigint
FROM archive_checkpoints k JOIN ledger_archives a ON a.id = k.archive_id
WHERE a.restored_at IS NULL GROUP BY k.account_id ORDER BY k.account_id
"""
_CHECKPOINT_SUMS_SQL = """
SELECT a.currency, sum(k.debits_pending)::numeric, sum(k.debits_posted)::numeric,
       sum(k.credits_pending)::numeric, sum(k.credits_posted)::numeric
FROM archive_checkpoints k LEFT JOIN accounts a ON a.id = k.account_id
WHERE k.archive_id = $1 GROUP BY a.currency
"""


async def _read_archives(ctx: VerifyContext, chain: ChainCheck) -> list[int]:
    """The archives in force: each one's record against its own manifest (the manifest's
    sha256, its cuts and counts, its checkpoint's sums per currency), its cut links in the
    chain with their digests; the chain is told which links' transfers and resolutions it
    holds. Returns the archives' ids."""
    if not await ctx.conn.fetchval("SELECT to_regclass('ledger_archives') IS NOT NULL"):
        return []
    ids = []
    for r in await ctx.conn.fetch(_ARCHIVES_SQL):
        ids.append(int(r["id"]))
        name = r["name"]
        ctx.report.count("archives", 1)
        ctx.report.count("archived_rows", int(r["transfers"]) + int(r["resolutions"]))
        for shard, seq, digest in zip(r["shards"], r["seqs"], r["digests"], strict=True):
            chain.archived_through(int(shard), int(seq))
            chain.check_archive_cut(name, int(shard), int(seq), bytes(digest))
        await _check_archive_record(ctx, r)
    return ids


async def _check_archive_record(ctx: VerifyContext, r: Any) -> None:
    report, name, data = ctx.report, r["name"], bytes(r["manifest"])
    digest = hashlib.sha256(data).digest()
    if digest != bytes(r["manifest_sha256"]):
        report.add("ledger_archives", name, "manifest_digest_mismatch",
                   bytes(r["manifest_sha256"]).hex(), digest.hex())
        return
    try:
        manifest = decode_manifest(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        report.add("ledger_archives", name, "manifest_unreadable", "a manifest", str(exc))
        return
    recorded = (name, int(r["boundary"]), int(r["transfers"]), int(r["resolutions"]),
                [(int(s), int(q), int(c), bytes(d).hex()) for s, q, c, d in
                 zip(r["shards"], r["seqs"], r["cuts"], r["digests"], strict=True)])
    listed = (manifest.name, manifest.boundary_ns, manifest.transfers, manifest.resolutions,
              [(c.shard, c.seq, c.timestamp_max, c.digest) for c in manifest.shards])
    if recorded != listed:
        report.add("ledger_archives", name, "record_differs_from_manifest", listed, recorded)
    expected = {c: (0, s.posted, 0, s.posted) for c, s in manifest.currencies.items()
                if s.posted}
    found = {(row[0] or "none").strip(): tuple(int(v) for v in row[1:])
             for row in await ctx.conn.fetch(_CHECKPOINT_SUMS_SQL, r["id"])}
    if found != expected:
        report.add("archive_checkpoints", name, "checkpoint_sums_mismatch", expected, found)


async def _read_checkpoints(ctx: VerifyContext, balances: BalanceCheck,
                            archives: list[int]) -> None:
    """The balance re-derivation starts from the archives' checkpoints."""
    async for c in ctx.chunks(_CHECKPOINTS_SQL):
        balances.add_checkpoint(_ints(c[0]), np.stack([_ints(c[k]) for k in (1, 2, 3, 4)],
                                                      axis=1))


async def archived_through(conn: Any) -> int:
    """The greatest cut of the archives in force (0: none): every row at or below it of a
    shard whose cut it is, is archived."""
    if not await conn.fetchval("SELECT to_regclass('ledger_archives') IS NOT NULL"):
        return 0
    value = await conn.fetchval("SELECT max(c) FROM ledger_archives, unnest(cuts) c "
                                "WHERE restored_at IS NULL")
    return int(value or 0)


async def _layout(ctx: VerifyContext) -> tuple[list[int], list[int]]:
    """The partitions and shards to add to an empty partition map (see _LAYOUT)."""
    if await ctx.conn.fetchval("SELECT EXISTS (SELECT 1 FROM partition_map)"):
        return [], []
    shards = await ctx.conn.fetchval("SELECT max(shard) + 1 FROM shard_epochs")
    if not shards:
        return [], []
    of_partition = PartitionMap.uniform(int(shards)).shard_of_partition
    return list(range(len(of_partition))), list(of_partition)


async def _read_resolutions(ctx: VerifyContext, chain: ChainCheck, pending: PendingCheck,
                            layout: tuple[list[int], list[int]]) -> None:
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    async for c in ctx.chunks(_RESOLUTIONS_SQL, *layout):
        shards = _ints(c[0])
        rows = resolution_rows(pending_id=_ints(c[1]), kind=_ints(c[2]),
                               transfer_id=_ints(c[3]), timestamp=_ints(c[4]))
        ctx.report.count("pending_resolutions", len(rows))
        parts.append((_ints(c[1]), _ints(c[2]), _ints(c[3])))
        for shard, a, b in _by_shard(shards):
            if shard >= 0:  # else its pending transfer is missing: PendingCheck names it
                chain.feed(3, shard, rows.slice(a, b), rows.fixed["pending_id"][a:b])
    if parts:
        pending.resolution_pending = np.concatenate([p[0] for p in parts])
        pending.resolution_kind = np.concatenate([p[1] for p in parts])
        pending.resolution_transfer = np.concatenate([p[2] for p in parts])


async def _read_accounts(ctx: VerifyContext, chain: ChainCheck, pending: PendingCheck,
                         layout: tuple[list[int], list[int]]) -> BalanceCheck:
    ids, currency, flags, stored = [], [], [], []
    async for c in ctx.chunks(_ACCOUNTS_SQL, *layout):
        shards = _ints(c[0])
        rows = account_rows(id=_ints(c[1]), currency=_letters(c[2]), flags=_ints(c[3]),
                            code=_ints(c[4]), user_data=c[5], timestamp=_ints(c[6]),
                            tenant=_ints(c[7]), origin=_ints(c[8]), partition=_ints(c[9]))
        for shard, a, b in _by_shard(shards):
            chain.feed(1, None if shard < 0 else shard, rows.slice(a, b),
                       rows.fixed["id"][a:b])
        ids.append(_ints(c[1]))
        currency.append(_letters(c[2]))
        flags.append(_ints(c[3]))
        stored.append(np.stack([_ints(c[k]) for k in (10, 11, 12, 13)], axis=1))

    def joined(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
        return np.concatenate(parts) if parts else empty

    none = np.zeros(0, dtype=np.int64)
    return BalanceCheck(
        ctx.report, ids=joined(ids, none), currency=joined(currency, np.zeros(0, "S3")),
        flags=joined(flags, none), stored=joined(stored, np.zeros((0, 4), np.int64)),
        resolved=np.unique(pending.resolution_pending), mapped=await _mapped(ctx))


async def _mapped(ctx: VerifyContext) -> np.ndarray | None:
    """Which partitions this database holds (its part of the partition map), or None when
    it records none (shards started without a map: everything is here)."""
    held = await ctx.conn.fetchval("SELECT array_agg(partition) FROM partition_map")
    if held is None:
        return None
    mapped = np.zeros(PARTITIONS, dtype=bool)
    mapped[np.array(held, dtype=np.int64)] = True
    return mapped


# Transfers stored in another database with a leg here (migration 0037), and how those
# that were pending were resolved.
_MIRRORS_SQL = """
SELECT id, debit_account_id, credit_account_id, amount, currency, flags
FROM mirrored_transfers ORDER BY "timestamp", id
"""
_MIRRORED_RESOLVED_SQL = "SELECT pending_id FROM mirrored_resolutions ORDER BY pending_id"


async def _read_mirrors(ctx: VerifyContext, balances: BalanceCheck) -> None:
    """The mirrors' legs on this database's accounts, into the balance re-derivation only:
    they are in no chain here (their coordinator's chain, in their own database, covers
    them; ``verify_databases`` compares each with it)."""
    if not await ctx.conn.fetchval("SELECT to_regclass('mirrored_transfers') IS NOT NULL"):
        return
    resolved = np.array([r[0] for r in await ctx.conn.fetch(_MIRRORED_RESOLVED_SQL)],
                        dtype=np.int64)
    ctx.report.count("mirrored_transfers", 0)
    async for c in ctx.chunks(_MIRRORS_SQL):
        ctx.report.count("mirrored_transfers", len(c[0]))
        balances.feed(id=_ints(c[0]), debit=_ints(c[1]), credit=_ints(c[2]),
                      amount=_ints(c[3]), currency=_letters(c[4]), flags=_ints(c[5]),
                      resolved=resolved)


def _feed_transfers(c: list[tuple[Any, ...]], chain: ChainCheck, balances: BalanceCheck,
                    pending: PendingCheck, report: Report) -> None:
    shards = _ints(c[0])
    id, debit, credit, amount = _ints(c[1]), _ints(c[2]), _ints(c[3]), _ints(c[4])
    currency, flags, pending_id = _letters(c[5]), _ints(c[6]), _ints(c[7])
    rows: Rows = transfer_rows(
        id=id, debit_account_id=debit, credit_account_id=credit, amount=amount,
        currency=currency, flags=flags, pending_id=pending_id, timeout_s=_ints(c[8]),
        code=_ints(c[9]), user_data=c[10], timestamp=_ints(c[11]), tenant=_ints(c[12]),
        origin=_ints(c[13]), partition=_ints(c[14]), local_legs=_ints(c[15]))
    report.count("transfers", len(rows))
    for shard, a, b in _by_shard(shards):
        chain.feed(0, None if shard < 0 else shard, rows.slice(a, b), id[a:b])
    balances.feed(id=id, debit=debit, credit=credit, amount=amount, currency=currency,
                  flags=flags)
    pending.feed(id=id, pending_id=pending_id, amount=amount, flags=flags)


async def _check_anchors(ctx: VerifyContext, chain: ChainCheck) -> None:
    newest: tuple[datetime.datetime, dict[int, int]] | None = None
    # The shards whose rows this database holds (its part of the partition map): an older
    # anchor may name a shard moved to another database since.
    mapped = await ctx.conn.fetchval("SELECT array_agg(DISTINCT shard) FROM partition_map")
    held = None if mapped is None else frozenset(int(s) for s in mapped)
    async for c in ctx.chunks(_ANCHORS_SQL):
        for anchor_id, at, shards, seqs, digests in zip(*c, strict=True):
            chain.check_anchor(anchor_id, shards, seqs, [bytes(d) for d in digests], held)
            newest = (at, dict(zip(shards, seqs, strict=True)))
    report = ctx.report
    if newest is None:
        report.count("links_after_newest_anchor", chain.links_after({}))
        return
    report.count("newest_anchor_age_s", round((ctx.now - newest[0]).total_seconds(), 3))
    report.count("links_after_newest_anchor", chain.links_after(newest[1]))


# -- account_history: derived rows, compared with their recomputation ---------------------

_HISTORY_DIFF_SQL = f"""
WITH expected AS MATERIALIZED ({MOVEMENTS_SQL}),
stored AS MATERIALIZED (SELECT {_HISTORY_COLUMNS} FROM account_history
                        WHERE "timestamp" > $1 AND "timestamp" <= $2)
SELECT 'missing' AS kind, * FROM (SELECT * FROM expected EXCEPT ALL SELECT * FROM stored) m
UNION ALL
SELECT 'unexpected', * FROM (SELECT * FROM stored EXCEPT ALL SELECT * FROM expected) u
"""  # noqa: S608 - built from constants only


async def check_account_history(ctx: VerifyContext) -> None:
    """``account_history`` (migration 0028) equals its recomputation from the transfers
    and expiries at or below the indexer's position (the indexer's own SELECT, run from
    zero): every row missing, extra or different is a problem. One pass over transfers,
    pending_resolutions and account_history, in the snapshot."""
    position = await ctx.conn.fetchval(
        'SELECT "timestamp" FROM account_history_position WHERE id = 1')
    if position is None:  # not migrated to 0028
        return
    ctx.report.count("account_history", await ctx.conn.fetchval(
        "SELECT count(*) FROM account_history"))
    # Movements of archived months are compared no more: their transfers are in the files
    # (the rows stay, so balances at later instants stay one range read).
    start = await archived_through(ctx.conn)
    ctx.report.count("account_history_from", start)
    async for c in ctx.chunks(_HISTORY_DIFF_SQL, start, position):
        for row in zip(*c, strict=True):
            kind, values = row[0], dict(zip(HISTORY_COLUMNS, row[1:], strict=True))
            key = f"{values['account_id']}/{values['timestamp']}/{values['transfer_id']}"
            if kind == "missing":
                ctx.report.add("account_history", key, "missing", values, None)
            else:
                ctx.report.add("account_history", key, "unexpected", None, values)


LEDGER_CHECKS: tuple[Check, ...] = (check_ledger, check_account_history)
