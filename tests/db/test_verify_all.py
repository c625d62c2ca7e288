"""``txproc verify`` with every check (actors/app/verification.py: ALL_CHECKS) against a real
PostgreSQL: beside the ledger (tests/db/test_verify.py), the audit log's chain and the head
each anchor recorded of it, and the reconciliation records' links to the ledger and the
payments. An untouched deployment passes; each tampering a superuser can do behind the
service's back (an audit row edited, the audit log's tail removed after an anchor, a
reconciliation record naming a transfer that is not there) is named by table, row, kind.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import asyncpg
import pytest

from actors.app.verification import ALL_CHECKS, verify_all
from actors.ledger import LedgerStore
from actors.ops.audit_events import operator_actor, record_audit_event
from processor.audit import chain_digest, record_of_row
from tests.db.test_verify import Ledger, build_ledger

pytestmark = pytest.mark.asyncio

REPLICA = "SET LOCAL session_replication_role = replica"


async def _events(url: str, n: int, *, first: int = 0) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for k in range(first, first + n):
            await record_audit_event(conn, actor=operator_actor(), action="keys.rotated",
                                     target_kind="signing_key", target_id=f"k{k}",
                                     details={"n": k})
    finally:
        await conn.close()


async def _anchor(url: str) -> int:
    store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=30)
    try:
        return await store.anchor("operator")
    finally:
        await store.close()


async def _superuser(url: str, *statements: str) -> None:
    """Run ``statements`` in one transaction as the superuser with every trigger off (the
    append-only triggers and the foreign keys alike)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        async with conn.transaction():
            await conn.execute(REPLICA)
            for statement in statements:
                await conn.execute(statement)
    finally:
        await conn.close()


PAYMENT = "pay_" + "0" * 23 + "1"


async def _reconciliation(url: str, ledger: Ledger) -> None:
    """Reconciliation records as a run writes them, over the ledger of ``build_ledger``: a
    capture step that posted transfer 10 (500 EUR) and a refund step that posted 12 (40
    EUR), both matched; a fee posted as transfer 41 (b -> a, 41 EUR); an exception about
    the capture, its payment and its transfer."""
    a, b = ledger.accounts[:2]
    conn = await asyncpg.connect(url, timeout=10)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO payments (id, merchant_account_id, amount, currency, "
                "payment_method, status, provider, captured_amount, principal) "
                "VALUES ($1, $2, 500, 'EUR', 'pm_test', 'captured', 'acme', 500, '1/t')",
                PAYMENT, a)
            await conn.executemany(
                "INSERT INTO payment_steps (id, subject_id, kind, phase, amount, currency,"
                " provider, provider_key, transfer_id, merchant_account_id, due_at)"
                " VALUES ($1, $2, $3, 'succeeded', $4, 'EUR', 'acme', $5, $6, $7, now())",
                [(1, PAYMENT, "capture", 500, "k1", 10, a),
                 (2, PAYMENT, "refund", 40, "k2", 11, a)])
            run = await conn.fetchval(
                "INSERT INTO reconciliation_runs (provider, settled_on, attempt, status,"
                " requested_by, started_at, finished_at) VALUES ('acme', current_date, 1,"
                " 'succeeded', 'test', now(), now()) RETURNING id")
            await conn.executemany(
                "INSERT INTO reconciliation_matches (provider, record_key, step_id, settled_on,"
                " run_id) VALUES ('acme', $1, $2, current_date, $3)",
                [("1", 1, run), ("2", 2, run)])
            await conn.execute(
                "INSERT INTO reconciliation_fees (transfer_id, provider, settled_on, record_key,"
                " debit_account_id, credit_account_id, amount, currency, run_id)"
                " VALUES (41, 'acme', current_date, '1', $1, $2, 41, 'EUR', $3)", b, a, run)
            await conn.execute(
                "INSERT INTO reconciliation_exceptions (provider, settled_on, kind, key, amount,"
                " currency, step_id, subject_id, transfer_id, run_id) VALUES ('acme',"
                " current_date, 'missing', 'missing:1', 500, 'EUR', 1, $1, 10, $2)",
                PAYMENT, run)
    finally:
        await conn.close()


def _named(problems: list[object]) -> list[tuple[str, str, str]]:
    return [(p.table, p.id, p.kind) for p in problems]  # type: ignore[attr-defined]


async def test_an_untouched_deployment_passes_every_check(db_url: str) -> None:
    """A ledger, audit events before and after an anchor: every check passes, and the
    audit events are counted as checked."""
    ledger = await build_ledger(db_url)
    await _reconciliation(db_url, ledger)
    await _events(db_url, 5)
    await _anchor(db_url)
    await _events(db_url, 2, first=5)
    result = await verify_all(db_url, chunk_rows=2)
    assert result.report.problems == []
    checked = result.report.checked
    assert checked["audit_events"] == 7
    assert (checked["reconciliation_fees"], checked["reconciliation_matches"],
            checked["reconciliation_exceptions"]) == (1, 2, 1)
    assert len(ALL_CHECKS) >= 2


async def test_an_edited_audit_event_is_named(db_url: str) -> None:
    """An audit event's details edited in place (triggers off) no longer hash to its
    digest: verify names that row, and only it."""
    await build_ledger(db_url)
    await _events(db_url, 4)
    await _superuser(db_url, "UPDATE audit_events SET details = '{\"n\": 9}' WHERE id = 2")
    report = (await verify_all(db_url)).report
    assert not report.ok
    assert _named(report.problems) == [("audit_events", "2", "digest_mismatch")]


async def test_the_command_runs_every_check(db_url: str) -> None:
    """``txproc verify --json`` runs ALL_CHECKS: it counts the audit events and the
    reconciliation records, and exits 1 naming an edited audit event."""
    ledger = await build_ledger(db_url)
    await _reconciliation(db_url, ledger)
    await _events(db_url, 3)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "actors.app.cli", "verify", "--database-url", db_url,
             "--json"], capture_output=True, text=True, timeout=120, check=False)

    ok = await asyncio.to_thread(run)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    checked = json.loads(ok.stdout)["checked"]
    assert (checked["audit_events"], checked["reconciliation_records"]) == (3, 4)
    await _superuser(db_url, "UPDATE audit_events SET target_id = 'k9' WHERE id = 1")
    broken = await asyncio.to_thread(run)
    assert broken.returncode == 1
    first = json.loads(broken.stdout)["problems"][0]
    assert (first["table"], first["id"], first["kind"]) == (
        "audit_events", "1", "digest_mismatch")


async def test_the_audit_logs_tail_removed_after_an_anchor_is_named(db_url: str) -> None:
    """Deleting the audit log's last events leaves a chain that holds in itself, but
    shorter than the newest anchor recorded: verify names the anchored event as missing."""
    await build_ledger(db_url)
    await _events(db_url, 5)
    await _anchor(db_url)
    assert (await verify_all(db_url)).report.ok
    await _superuser(db_url, "DELETE FROM audit_events WHERE id > 3")
    report = (await verify_all(db_url)).report
    assert [(p.table, p.id, p.kind, p.found) for p in report.problems] == [
        ("audit_events", "5", "anchored_event_missing", "last event 3")]


async def test_an_audit_log_rewritten_to_its_end_is_found_by_the_anchor(db_url: str) -> None:
    """An event edited with its digest recomputed, the last one so no later digest
    breaks, passes the chain check; the anchor that recorded its digest names it."""
    await build_ledger(db_url)
    await _events(db_url, 3)
    await _anchor(db_url)
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT *, details::text AS details FROM audit_events "
                                "ORDER BY id")
        edited = {**dict(rows[2]), "details": '{"n": 99}'}
        digest = chain_digest(bytes(rows[1]["digest"]), record_of_row(edited).event)
    finally:
        await conn.close()
    await _superuser(db_url, "UPDATE audit_events SET details = '{\"n\": 99}', "
                             f"digest = '\\x{digest.hex()}' WHERE id = 3")
    report = (await verify_all(db_url)).report
    assert _named(report.problems) == [("audit_events", "3", "anchored_digest_mismatch")]
    assert report.checked["audit_events"] == 3


async def test_an_anchor_records_the_audit_logs_head(db_url: str) -> None:
    """The anchor statement records the last event's id and digest with the shards'
    heads (0 and zero bytes before any event)."""
    await build_ledger(db_url)
    empty = await _anchor(db_url)
    await _events(db_url, 2)
    second = await _anchor(db_url)
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        heads = {r["id"]: (r["audit_id"], bytes(r["audit_digest"])) for r in await conn.fetch(
            "SELECT id, audit_id, audit_digest FROM ledger_anchors")}
        last = await conn.fetchrow("SELECT id, digest FROM audit_events WHERE id = 2")
    finally:
        await conn.close()
    assert heads[empty] == (0, bytes(32))
    assert heads[second] == (2, bytes(last["digest"]))


RUN = "(SELECT max(id) FROM reconciliation_runs)"


@pytest.mark.parametrize(("statements", "named"), [
    # A fee naming a transfer the ledger never had.
    ([f"INSERT INTO reconciliation_fees (transfer_id, provider, settled_on, record_key,"
      f" debit_account_id, credit_account_id, amount, currency, run_id) SELECT 777, 'acme',"
      f" current_date, '9', 1, 2, 5, 'EUR', {RUN}"],
     {("reconciliation_fees", "777", "fee_transfer_missing")}),
    # A fee whose transfer holds another amount.
    ([f"INSERT INTO reconciliation_fees (transfer_id, provider, settled_on, record_key,"
      f" debit_account_id, credit_account_id, amount, currency, run_id) SELECT 42, 'acme',"
      f" current_date, '8', debit_account_id, credit_account_id, 43, 'EUR', {RUN}"
      f" FROM transfers WHERE id = 42"],
     {("reconciliation_fees", "42", "fee_transfer_differs")}),
    # The transfer a matched refund posted, deleted (its chain link breaks too).
    (["DELETE FROM transfers WHERE id = 12"],
     {("reconciliation_matches", "acme/2", "match_transfer_missing")}),
    # The matched capture's step removed: its match and its exception name it.
    (["DELETE FROM payment_steps WHERE id = 1"],
     {("reconciliation_matches", "acme/1", "match_step_missing"),
      ("reconciliation_exceptions", "1", "exception_step_missing")}),
    # An exception naming a transfer and a payment that are not there.
    ([f"INSERT INTO reconciliation_exceptions (provider, settled_on, kind, key, amount,"
      f" currency, subject_id, transfer_id, run_id) SELECT 'acme', current_date, 'missing',"
      f" 'missing:x', 1, 'EUR', 'pay_{'f' * 24}', 888, {RUN}"],
     {("reconciliation_exceptions", "2", "exception_subject_missing"),
      ("reconciliation_exceptions", "2", "exception_transfer_missing")}),
])
async def test_a_reconciliation_record_naming_what_is_not_there_is_named(
        db_url: str, statements: list[str], named: set[tuple[str, str, str]]) -> None:
    """A reconciliation record whose transfer, payment step or payment is missing, or
    whose transfer differs from what it recorded, is named by table, record and kind (and
    only those records are)."""
    ledger = await build_ledger(db_url)
    await _reconciliation(db_url, ledger)
    assert (await verify_all(db_url)).report.ok
    await _superuser(db_url, *statements)
    report = (await verify_all(db_url)).report
    assert {p for p in _named(report.problems) if p[0].startswith("reconciliation")} == named


async def test_a_reconciliation_records_transfer_in_another_database_is_found_there(
        db_url: str) -> None:
    """With several databases a payment's postings live in its merchant account's database:
    a transfer this database lacks is looked up in the others (``elsewhere``), and a record
    is a problem only if none has it as recorded."""
    from actors.payments import check_reconciliation_records
    from processor.ledger import Report

    ledger = await build_ledger(db_url)
    await _reconciliation(db_url, ledger)
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        refund = await conn.fetchrow("SELECT debit_account_id, credit_account_id, amount,"
                                     " currency::text FROM transfers WHERE id = 12")
    finally:
        await conn.close()
    as_it_was = (refund["debit_account_id"], refund["credit_account_id"], refund["amount"],
                 refund["currency"])
    await _superuser(db_url, "DELETE FROM transfers WHERE id = 12")
    asked: list[list[int]] = []

    async def run(elsewhere: dict[int, tuple[int, int, int, str]]) -> set[tuple[str, str, str]]:
        async def look(ids: list[int]) -> dict[int, tuple[int, int, int, str]]:
            asked.append(ids)
            return {i: elsewhere[i] for i in ids if i in elsewhere}

        report = Report()
        conn = await asyncpg.connect(db_url, timeout=10)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await check_reconciliation_records(conn, report, look)
        finally:
            await conn.close()
        return set(_named(report.problems))

    assert await run({12: as_it_was}) == set()
    assert asked == [[12]]  # only what this database lacks
    assert await run({12: (*as_it_was[:2], as_it_was[2] + 1, as_it_was[3])}) == {
        ("reconciliation_matches", "acme/2", "match_transfer_differs")}
    assert await run({}) == {("reconciliation_matches", "acme/2", "match_transfer_missing")}
