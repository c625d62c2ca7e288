"""What ``txproc verify`` checks, in one list: ``ALL_CHECKS``.

``verify`` (actors/ledger/verify.py) runs a list of checks over one snapshot of the
database; each domain brings its own, and this module, in the composition root, puts them
together so that the command and the demo run the same list (docs/design.md §15):

* the ledger's (``LEDGER_CHECKS``): balances re-derived, holds, every chain link and anchor;
* the audit log's (``check_audit_log``): every event's digest and id in sequence
  (processor.audit.check_audit_chain), and the head every anchor recorded of it still
  there with its digest (``check_audit_anchors``: a truncated tail, a rewritten end);
* the reconciliation records' (``check_reconciliation``): every fee posting, match and
  exception names a transfer, payment step, payment or payout that is there, as it was
  (actors/payments/reconciliation_check.py).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from actors.ledger import LEDGER_CHECKS, Check, VerifyContext, VerifyResult, verify
from actors.payments import check_reconciliation_records
from processor.audit import (
    AUDIT_EVENTS_TABLE,
    GENESIS_DIGEST,
    AuditHead,
    ChainProblem,
    check_audit_anchors,
    check_audit_chain,
    record_of_row,
)
from processor.ledger import Report

__all__ = ["ALL_CHECKS", "check_audit_log", "check_mirrors", "check_reconciliation",
           "verify_all", "verify_databases"]

# Every column of an audit event, in id order: the chain is checked in the order written.
_AUDIT_EVENTS_SQL = f"""
SELECT id, at, actor_kind, actor_tenant, actor_subject, actor_token_id, tenant_slot, action,
       target_kind, target_id, details::text AS details, request_id, digest
FROM {AUDIT_EVENTS_TABLE} ORDER BY id
"""  # noqa: S608 - built from a constant
_AUDIT_COLUMNS = ("id", "at", "actor_kind", "actor_tenant", "actor_subject", "actor_token_id",
                  "tenant_slot", "action", "target_kind", "target_id", "details",
                  "request_id", "digest")
# Each distinct audit head the anchors recorded, with the first anchor that recorded it
# (anchors are written every few seconds; the audit log changes rarely), and the newest
# anchor's head. Anchors from before migration 0026 recorded none.
_AUDIT_HEADS_SQL = """
SELECT min(id) AS anchor_id, audit_id, audit_digest FROM ledger_anchors
WHERE audit_id IS NOT NULL GROUP BY audit_id, audit_digest ORDER BY 1
"""
_NEWEST_AUDIT_HEAD_SQL = "SELECT audit_id FROM ledger_anchors ORDER BY id DESC LIMIT 1"


async def check_audit_log(ctx: VerifyContext) -> None:
    """The audit events' chain: streamed in id order, a chunk at a time, each chunk
    checked from the last digest of the one before; then every anchored head against the
    events (a head beyond the last event: the log's tail was removed)."""
    heads = [AuditHead(r["anchor_id"], r["audit_id"], bytes(r["audit_digest"]))
             for r in await ctx.conn.fetch(_AUDIT_HEADS_SQL)]
    anchored = {head.id for head in heads}
    stored: dict[int, bytes] = {}
    previous, next_id, last_id = GENESIS_DIGEST, 1, 0
    ctx.report.count("audit_events", 0)  # counted when the log is empty too
    async for c in ctx.chunks(_AUDIT_EVENTS_SQL):
        records = [record_of_row(dict(zip(_AUDIT_COLUMNS, row, strict=True)))
                   for row in zip(*c, strict=True)]
        for problem in check_audit_chain(records, previous_digest=previous, first_id=next_id):
            _add(ctx, problem)
        stored.update((r.event.id, r.digest) for r in records if r.event.id in anchored)
        ctx.report.count("audit_events", len(records))
        last = records[-1]
        previous, next_id, last_id = last.digest, last.event.id + 1, last.event.id
    for problem in check_audit_anchors(heads, stored, last_id=last_id):
        _add(ctx, problem)
    ctx.report.count("audit_anchors", len(heads))
    newest = await ctx.conn.fetchval(_NEWEST_AUDIT_HEAD_SQL)
    # What no anchor vouches for: events written after the newest anchor (all of them
    # when it recorded no head).
    ctx.report.count("audit_events_after_newest_anchor",
                     max(0, last_id - (newest if newest is not None else 0)))


def _add(ctx: VerifyContext, problem: ChainProblem) -> None:
    ctx.report.add(problem["table"], problem["id"], problem["kind"], problem["expected"],
                   problem["found"])


async def check_reconciliation(ctx: VerifyContext) -> None:
    """The reconciliation records' links, checked in the database (anti-joins)."""
    ctx.rows_read += await check_reconciliation_records(ctx.conn, ctx.report)


def _reconciliation_across(further: list[str]) -> Check:
    """``check_reconciliation`` for the main database of several: a record's transfer may
    be in the database of its merchant's (or fee) account, so what main lacks is looked up
    in ``further`` too."""
    async def elsewhere(ids: list[int]) -> dict[int, tuple[int, int, int, str]]:
        found: dict[int, tuple[int, int, int, str]] = {}
        for url in further:
            conn = await asyncpg.connect(url)
            try:
                rows = await conn.fetch(
                    "SELECT id, debit_account_id, credit_account_id, amount::bigint, "
                    "currency::text FROM transfers WHERE id = ANY($1::bigint[])", ids)
            finally:
                await conn.close()
            found.update((r["id"], (r["debit_account_id"], r["credit_account_id"],
                                    r["amount"], r["currency"])) for r in rows)
        return found

    async def check(ctx: VerifyContext) -> None:
        ctx.rows_read += await check_reconciliation_records(ctx.conn, ctx.report, elsewhere)

    return check


ALL_CHECKS: tuple[Check, ...] = (*LEDGER_CHECKS, check_audit_log, check_reconciliation)


async def verify_all(url: str, **options: Any) -> VerifyResult:
    """``verify`` with every check (``ALL_CHECKS``); ``options`` as ``verify`` takes them."""
    return await verify(url, ALL_CHECKS, **options)


async def verify_databases(urls: dict[str, str], **options: Any) -> VerifyResult:
    """Every check over a ledger of several databases (docs/design.md §12): ``verify_all``
    over the main one (the first of ``urls``, which alone holds the audit log and the
    payments), the ledger's checks over each further one, each in one snapshot of its own;
    one result, counts summed, problems named ``key:table``. Each step of a transfer between
    databases is a transfer in one, so each one's balances and chains stand alone; what
    crossed is checked by ``check_transit_mirror``."""
    results: list[tuple[str, VerifyResult]] = []
    further = list(urls.values())[1:]
    for i, (key, url) in enumerate(urls.items()):
        checks = ((*LEDGER_CHECKS, check_audit_log, _reconciliation_across(further))
                  if i == 0 else LEDGER_CHECKS)
        results.append((key, await verify(url, checks, **options)))
    if len(results) == 1:
        return results[0][1]
    report = Report()
    for key, result in results:
        for name, n in result.report.checked.items():
            if name.endswith("_age_s"):  # an age: the oldest database's, not a sum
                report.checked[name] = max(report.checked.get(name, 0), n)
            else:
                report.count(name, n)
        for p in result.report.problems:
            report.add(f"{key}:{p.table}", p.id, p.kind, p.expected, p.found)
        report.problems_total += result.report.problems_total - len(result.report.problems)
    report.count("databases", len(results))
    await check_transit_mirror(urls, report)
    await check_mirrors(urls, report)
    return VerifyResult(report, sum(r.seconds for _, r in results),
                        sum(r.rows for _, r in results))


# -- transfers between databases: the transit accounts mirror each other -----------------

_OPEN_STATES = ("started", "debited", "compensating")
_LOG_SQL = """
SELECT tenant, debit_database, credit_database, currency, state, sum(amount) AS amount,
       count(*) AS n
FROM crossdb_transfers GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
"""
_TRANSIT_SUMS_SQL = """
SELECT account_id, sum(debits) AS debits, sum(credits) AS credits FROM (
    SELECT debit_account_id AS account_id, amount AS debits, 0 AS credits FROM transfers
    WHERE debit_account_id >= $1 AND debit_account_id < $2
    UNION ALL
    SELECT credit_account_id, 0, amount FROM transfers
    WHERE credit_account_id >= $1 AND credit_account_id < $2) m
GROUP BY account_id
"""
_ACCOUNTS_OF_SQL = "SELECT id, tenant, currency FROM accounts WHERE id = ANY($1::bigint[])"


async def _logs(urls: dict[str, str]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for url in urls.values():
        conn = await asyncpg.connect(url, timeout=10)
        try:
            rows += [tuple(r) for r in await conn.fetch(_LOG_SQL)]
        finally:
            await conn.close()
    return rows


async def check_transit_mirror(urls: dict[str, str], report: Report) -> None:
    """Money moved between databases (actors/ledger/crossdb.py) is all accounted for: for
    each tenant, database pair and currency, what its transit account in the debit's
    database holds (credits less debits) equals what its transit account in the credit's
    database gave (debits less credits) and the amounts of the transfers the log says were
    credited. The databases are read one after another, so this holds only for a quiet
    moment: the logs are read before and after the sums, and when a transfer was in flight
    or moved meanwhile the check is counted as skipped (``transit_skipped``), not failed."""
    from actors.ledger.relocation import read_partition_rows
    from processor.ledger import PartitionMap
    from processor.ledger.transit import (
        COMPENSATION_ID_BASE,
        TRANSIT_ID_BASE,
        transit_account_id,
    )

    before = await _logs(urls)
    if not before:
        return
    sums: dict[str, dict[int, tuple[int, int]]] = {}
    for key, url in urls.items():
        conn = await asyncpg.connect(url, timeout=10)
        try:
            rows = await conn.fetch(_TRANSIT_SUMS_SQL, TRANSIT_ID_BASE, COMPENSATION_ID_BASE)
            sums[key] = {r["account_id"]: (int(r["debits"]), int(r["credits"])) for r in rows}
        finally:
            await conn.close()
    after = await _logs(urls)
    if before != after or any(r[4] in _OPEN_STATES for r in after):
        report.count("transit_skipped", 1)
        return
    # The layout the databases recorded: the transit accounts' ids derive from it.
    partitions = PartitionMap.recorded(await read_partition_rows(urls))
    credited: dict[tuple[int, str, str, str], int] = {}
    for tenant, d1, d2, currency, state, amount, _ in after:
        pair = (tenant, d1, d2, currency)
        credited[pair] = credited.get(pair, 0) + (int(amount) if state == "credited" else 0)
    for (tenant, d1, d2, currency), total in credited.items():
        nets = []
        for side, home in (("out", d1), ("in", d2)):
            account = await _transit_of(urls[home], partitions, tenant, d1, d2, currency, side,
                                        transit_account_id)
            debits, credits = sums[home].get(account, (0, 0)) if account else (0, 0)
            nets.append(credits - debits if side == "out" else debits - credits)
        report.count("transit_pairs", 1)
        if not nets[0] == nets[1] == total:
            report.add("transit", f"{tenant}/{d1}->{d2}/{currency}", "transit_mirror",
                       f"{total} in both", f"out {nets[0]}, in {nets[1]}")


async def _transit_of(url: str, partitions: Any, tenant: int, d1: str, d2: str, currency: str,
                      side: str, derive: Any) -> int | None:
    """The transit account the sagas use (the first candidate of the tenant's), or None."""
    candidates = [derive(partitions, tenant=tenant, debit_database=d1, credit_database=d2,
                         currency=currency, side=side, skip=skip) for skip in range(8)]
    conn = await asyncpg.connect(url, timeout=10)
    try:
        found = {r["id"]: (r["tenant"], r["currency"])
                 for r in await conn.fetch(_ACCOUNTS_OF_SQL, candidates)}
    finally:
        await conn.close()
    return next((c for c in candidates if found.get(c) == (tenant, currency)), None)


# -- mirrors: transfers kept where an account of theirs moved (migration 0037) ------------

# (mirror table, the table of the stored rows, their key). Both tables of a pair have the
# same columns in the same order (0037 created the mirrors LIKE the stored tables).
_MIRRORED = (("mirrored_transfers", "transfers", "id"),
             ("mirrored_resolutions", "pending_resolutions", "pending_id"))
_MIRROR_CHUNK_ROWS = 20_000


async def check_mirrors(urls: dict[str, str], report: Report) -> None:
    """Each mirror (docs/design.md §12, "Moving a shard") equals, column for column, a
    row stored in another database, where the coordinator's chain covers it: a mirror
    changed or made up, which would otherwise explain a balance it should not, is a
    problem (``mirror_without_original``). A mirror whose original was archived since is
    counted (``mirrors_archived``), not compared. Mirrors and their originals are
    append-only, so the databases need not be read in one moment."""
    conns = {key: await asyncpg.connect(url, timeout=10) for key, url in urls.items()}
    try:
        for key, conn in conns.items():
            if not await conn.fetchval("SELECT to_regclass('mirrored_transfers') IS NOT NULL"):
                continue
            others = [c for k, c in conns.items() if k != key]
            for mirror, stored, column in _MIRRORED:
                async with conn.transaction(readonly=True):
                    cursor = await conn.cursor(
                        f"SELECT * FROM {mirror} ORDER BY {column}")  # noqa: S608 - constants
                    while rows := await cursor.fetch(_MIRROR_CHUNK_ROWS):
                        await _compare_mirrors(key, mirror, stored, column,
                                               {r[column]: tuple(r) for r in rows},
                                               others, report)
    finally:
        for conn in conns.values():
            await conn.close()


async def _compare_mirrors(key: str, mirror: str, stored: str, column: str,
                           mirrors: dict[int, tuple[Any, ...]], others: list[Any],
                           report: Report) -> None:
    ids = list(mirrors)
    equal: set[int] = set()
    archived: set[int] = set()
    for other in others:
        for r in await other.fetch(f"SELECT * FROM {stored} "  # noqa: S608 - constants
                                   f"WHERE {column} = ANY($1::bigint[])", ids):
            if mirrors[r[column]] == tuple(r):
                equal.add(r[column])
        if await other.fetchval("SELECT to_regclass('archived_transfer_ids') IS NOT NULL"):
            archived.update(r[0] for r in await other.fetch(
                "SELECT id FROM archived_transfer_ids WHERE id = ANY($1::bigint[])", ids))
    report.count("mirrors_checked", len(ids))
    report.count("mirrors_archived", len((set(ids) - equal) & archived))
    for id_ in sorted(set(ids) - equal - archived):
        report.add(f"{key}:{mirror}", id_, "mirror_without_original",
                   f"an equal row of {stored} in another database", list(mirrors[id_]))
