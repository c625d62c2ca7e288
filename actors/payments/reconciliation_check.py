"""``txproc verify``'s check of the reconciliation records (migration 0023): each one names
objects that exist, as they were when it was written.

A run's records link to the ledger and to the payments: a fee posting names the ledger
transfer that posted it (with its accounts, amount and currency), a match names the
payment step whose report line it matched (and a succeeded step's posting is a ledger
transfer of the step's amount and currency), an exception names the step, the payment or
payout and the transfer it is about. A record that names something missing or different
was written against a ledger or a payments table that has since been edited behind the
service's back (or the record was forged): each one is reported as a problem.

Every check is one anti-join in the database, so only the dangling references travel;
run it inside ``verify``'s snapshot so the records and what they name are one moment.
The transfer a step posted follows processor/payments/saga.py (``ledger_transfers``): a
capture posts its own first id, a refund or a payout the second (the post of its hold).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import asyncpg

__all__ = ["Elsewhere", "ProblemSink", "check_reconciliation_records"]

STATEMENT_TIMEOUT_S = 3_600.0
# Dangling references fetched per round trip (they are rare: a clean deployment has none).
CURSOR_ROWS = 1_000


class ProblemSink(Protocol):
    """Where the problems and the counts go (``processor.ledger.Report`` is one)."""

    def add(self, table: str, id: object, kind: str, expected: object,
            found: object) -> None: ...

    def count(self, name: str, n: float) -> None: ...


_COUNT_SQL = """
SELECT (SELECT count(*) FROM reconciliation_fees) AS fees,
       (SELECT count(*) FROM reconciliation_matches) AS matches,
       (SELECT count(*) FROM reconciliation_exceptions) AS exceptions
"""
# A fee whose transfer is missing, or holds other accounts, amount or currency.
_FEES_SQL = """
SELECT f.transfer_id, f.debit_account_id, f.credit_account_id, f.amount, f.currency::text,
       format('transfer %s: %s -> %s, %s %s', f.transfer_id, f.debit_account_id,
              f.credit_account_id, f.amount, f.currency) AS expected,
       CASE WHEN t.id IS NULL THEN 'no such transfer'
            ELSE format('transfer %s: %s -> %s, %s %s', t.id, t.debit_account_id,
                        t.credit_account_id, t.amount, t.currency) END AS found,
       CASE WHEN t.id IS NULL THEN 'fee_transfer_missing'
            ELSE 'fee_transfer_differs' END AS kind
FROM reconciliation_fees f
LEFT JOIN transfers t ON t.id = f.transfer_id
WHERE t.id IS NULL
   OR (t.debit_account_id, t.credit_account_id, t.amount, t.currency::text)
      IS DISTINCT FROM (f.debit_account_id, f.credit_account_id, f.amount, f.currency)
ORDER BY f.transfer_id
"""
# A match whose step is missing, or whose succeeded step's posting is missing or differs.
_MATCHES_SQL = """
SELECT m.provider || '/' || m.record_key AS id, p.id AS transfer_id, s.amount AS step_amount,
       s.currency::text AS step_currency,
       CASE WHEN s.id IS NULL THEN format('payment step %s', m.step_id)
            ELSE format('transfer %s: %s %s', p.id, s.amount, s.currency) END AS expected,
       CASE WHEN s.id IS NULL THEN 'no such payment step'
            WHEN t.id IS NULL THEN 'no such transfer'
            ELSE format('transfer %s: %s %s', t.id, t.amount, t.currency) END AS found,
       CASE WHEN s.id IS NULL THEN 'match_step_missing'
            WHEN t.id IS NULL THEN 'match_transfer_missing'
            ELSE 'match_transfer_differs' END AS kind
FROM reconciliation_matches m
LEFT JOIN payment_steps s ON s.id = m.step_id
LEFT JOIN LATERAL (SELECT s.transfer_id
                   + CASE WHEN s.kind = 'capture' THEN 0 ELSE 1 END AS id) p ON true
LEFT JOIN transfers t ON t.id = p.id
WHERE s.id IS NULL
   OR (s.phase = 'succeeded' AND s.kind IN ('capture', 'refund', 'payout')
       AND m.record_key NOT LIKE '%-undo'
       AND (t.id IS NULL OR (t.amount, t.currency::text) IS DISTINCT FROM (s.amount, s.currency)))
ORDER BY m.provider, m.record_key
"""
# An exception naming a step, a payment or payout, or a transfer that is not there.
_EXCEPTIONS_SQL = """
SELECT e.id, e.transfer_id, x.kind, x.expected
FROM reconciliation_exceptions e
CROSS JOIN LATERAL (VALUES
    ('exception_step_missing', format('payment step %s', e.step_id),
     e.step_id = 0 OR EXISTS (SELECT 1 FROM payment_steps s WHERE s.id = e.step_id)),
    ('exception_subject_missing', format('payment or payout %s', e.subject_id),
     e.subject_id = '' OR EXISTS (SELECT 1 FROM payments p WHERE p.id = e.subject_id)
     OR EXISTS (SELECT 1 FROM payouts o WHERE o.id = e.subject_id)),
    ('exception_transfer_missing', format('transfer %s', e.transfer_id),
     e.transfer_id = 0 OR EXISTS (SELECT 1 FROM transfers t WHERE t.id = e.transfer_id))
) AS x(kind, expected, present)
WHERE NOT x.present
ORDER BY e.id, x.kind
"""


# A transfer found in another database: (debit account, credit account, amount, currency).
Found = tuple[int, int, int, str]
Elsewhere = Callable[[list[int]], Awaitable[dict[int, Found]]]


async def check_reconciliation_records(conn: asyncpg.Connection, report: ProblemSink,
                                       elsewhere: Elsewhere | None = None) -> int:
    """Check every fee posting, match and exception (see the module) through ``conn``,
    which must be in a transaction (``verify``'s snapshot): problems and counts go to
    ``report``; answers how many records were checked. Raises asyncpg's errors (a missing
    table: the database is not migrated).

    With several databases a payment's postings are in its merchant account's database and
    a fee's in its fee account's (docs/payments.md, "Ledger model"), not always in this
    one: ``elsewhere`` looks up, in the other databases, the transfers this one lacks, and
    a record is a problem only if none has it as named. Transfers are append-only, so
    reading them outside this snapshot can only find what the records were written after.
    """
    counts = await conn.fetchrow(_COUNT_SQL, timeout=STATEMENT_TIMEOUT_S)
    report.count("reconciliation_fees", counts["fees"])
    report.count("reconciliation_matches", counts["matches"])
    report.count("reconciliation_exceptions", counts["exceptions"])
    total = int(counts["fees"] + counts["matches"] + counts["exceptions"])
    report.count("reconciliation_records", total)
    async for chunk in _chunks(conn, _FEES_SQL):
        found = await _look(elsewhere, chunk, "fee_transfer_missing")
        for row in chunk:
            there = found.get(row["transfer_id"])
            if there is None:
                report.add("reconciliation_fees", row["transfer_id"], row["kind"],
                           row["expected"], row["found"])
            elif there != (row["debit_account_id"], row["credit_account_id"], row["amount"],
                           row["currency"]):
                report.add("reconciliation_fees", row["transfer_id"], "fee_transfer_differs",
                           row["expected"], "transfer {}: {} -> {}, {} {}".format(
                               row["transfer_id"], *there))
    async for chunk in _chunks(conn, _MATCHES_SQL):
        found = await _look(elsewhere, chunk, "match_transfer_missing")
        for row in chunk:
            there = found.get(row["transfer_id"])
            if there is None:
                report.add("reconciliation_matches", row["id"], row["kind"], row["expected"],
                           row["found"])
            elif (there[2], there[3]) != (row["step_amount"], row["step_currency"]):
                report.add("reconciliation_matches", row["id"], "match_transfer_differs",
                           row["expected"],
                           f"transfer {row['transfer_id']}: {there[2]} {there[3]}")
    async for chunk in _chunks(conn, _EXCEPTIONS_SQL):
        found = await _look(elsewhere, chunk, "exception_transfer_missing")
        for row in chunk:
            if row["transfer_id"] not in found or row["kind"] != "exception_transfer_missing":
                report.add("reconciliation_exceptions", row["id"], row["kind"],
                           row["expected"], "nothing")
    return total


async def _chunks(conn: asyncpg.Connection, sql: str) -> AsyncIterator[list[asyncpg.Record]]:
    """The query's rows, CURSOR_ROWS at a time."""
    chunk: list[asyncpg.Record] = []
    async for row in conn.cursor(sql, prefetch=CURSOR_ROWS):
        chunk.append(row)
        if len(chunk) == CURSOR_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _look(elsewhere: Elsewhere | None, rows: list[asyncpg.Record],
                missing_kind: str) -> dict[int, Found]:
    """The transfers of ``rows`` this database lacks, as the other databases have them."""
    ids = sorted({row["transfer_id"] for row in rows if row["kind"] == missing_kind})
    return await elsewhere(ids) if elsewhere is not None and ids else {}
