"""Erasure of a data subject (docs/design.md §17) against a real PostgreSQL: what is sealed,
what ``txproc erase`` removes from every table, what it leaves (amounts, ids, times, the
other subject's data), and that the audit chain and ``verify`` still hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import msgspec
import pytest

from actors.app.verification import verify_all
from actors.ops import operator_actor
from actors.payments import outbox
from actors.payments.store import PaymentStore
from actors.payments.subjects import erase_subject
from processor.identity import tenant_slot
from processor.payments import (
    Kind,
    ListFilter,
    Payment,
    PaymentStatus,
    Payout,
    PayoutStatus,
    new_step,
)
from processor.privacy import MasterKey

TENANT = "erasure-db"
SLOT = tenant_slot(TENANT)
PRINCIPAL = f"{SLOT}/clerk"
SECRET = bytes(range(32))
# What the two subjects' payments carry; none of it may survive the erasure of A.
A_TEXTS = ("cus_alice", "ref-alice-1", "ref-alice-2", "alice@example.org", "refund-for-alice",
           "payout-alice")
B_TEXTS = ("cus_bob", "ref-bob-1", "bob@example.org")


def txproc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "actors.app.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture
async def sealing_store(app_db_url: str) -> AsyncIterator[PaymentStore]:
    """A PaymentStore as the service connects, holding the master key."""
    s = await PaymentStore.connect(app_db_url, pool_size_max=4, connect_timeout_s=10,
                                   command_timeout_s=30, master=MasterKey(SECRET))
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "erasure.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(SECRET)
    return path


def _payment(pid: str, *, customer_ref: str = "", reference: str = "",
             metadata: dict[str, str] | None = None) -> Payment:
    return Payment(id=pid, merchant_account_id=7, amount=1_234, currency="USD",
                   payment_method="pm_4242_abcdefgh", status=PaymentStatus.DECLINED,
                   provider="acme", error="risk_declined", reference=reference,
                   metadata=metadata or {}, customer_ref=customer_ref)


async def _everything_as_text(conn: asyncpg.Connection) -> str:
    """Every row of every table of the schema as text (bytea as hex): what a search of
    the database for a person's data would read."""
    tables = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1")
    texts = []
    for t in tables:
        rows = await conn.fetch(f'SELECT t::text AS row FROM "{t["tablename"]}" t')
        texts += [r["row"] for r in rows]
    return "\n".join(texts)


async def _seed(store: PaymentStore) -> dict[str, str]:
    """Two payments and a payout of subject A, one payment of B, one of nobody; a refund
    with metadata and a stored answer for A's first payment."""
    ids = {"a1": "pay_" + "a" * 24, "a2": "pay_" + "b" * 23 + "a", "b1": "pay_" + "b" * 24,
           "n1": "pay_" + "c" * 24, "ao": "po_" + "a" * 24}
    assert await store.create_payment(
        _payment(ids["a1"], customer_ref="cus_alice", reference="ref-alice-1",
                 metadata={"email": "alice@example.org", "plan": "gold"}),
        None, principal=PRINCIPAL, due_at_s=time.time())
    assert await store.create_payment(
        _payment(ids["a2"], customer_ref="cus_alice", reference="ref-alice-2"),
        None, principal=PRINCIPAL, due_at_s=time.time())
    assert await store.create_payment(
        _payment(ids["b1"], customer_ref="cus_bob", reference="ref-bob-1",
                 metadata={"email": "bob@example.org"}),
        None, principal=PRINCIPAL, due_at_s=time.time())
    assert await store.create_payment(_payment(ids["n1"], reference="ref-nobody"), None,
                                      principal=PRINCIPAL, due_at_s=time.time())
    step_id, base = await store.new_step_ids()
    payout = Payout(id=ids["ao"], merchant_account_id=7, amount=500, currency="USD",
                    destination="ba_12345678abcd", status=PayoutStatus.PROCESSING,
                    provider="acme", reference="payout-alice", customer_ref="cus_alice")
    assert await store.create_payout(
        payout, new_step(step_id=step_id, transfer_base=base, kind=Kind.PAYOUT,
                         subject_id=ids["ao"], amount=500, currency="USD", provider="acme",
                         merchant_account_id=7), principal=PRINCIPAL, due_at_s=time.time())
    step_id, base = await store.new_step_ids()
    await store.create_step(
        new_step(step_id=step_id, transfer_base=base, kind=Kind.REFUND, subject_id=ids["a1"],
                 amount=100, currency="USD", provider="acme", merchant_account_id=7),
        due_at_s=time.time(), metadata={"note": "refund-for-alice"})
    claim = await store.claim_key(PRINCIPAL, "key-a1", b"f" * 32, now_s=time.time(),
                                  retention_s=3_600)
    answer = {"id": ids["a1"], "amount": 1_234, "reference": "ref-alice-1",
              "customer_ref": "cus_alice", "metadata": {"email": "alice@example.org"}}
    assert await store.complete_key(PRINCIPAL, "key-a1", claim=claim, status=201,
                                    body=json.dumps(answer).encode())
    return ids


async def test_sealed_fields_read_back_and_no_table_holds_them_in_clear_but_events(
        sealing_store: PaymentStore, db_url: str) -> None:
    """A subject's personal fields read back whole, while the payments and payouts tables
    hold only ciphertext of them (events carry them in clear, for consumers)."""
    ids = await _seed(sealing_store)
    a1 = await sealing_store.payment(ids["a1"])
    assert a1 is not None
    assert (a1.customer_ref, a1.reference, a1.metadata, a1.erased) == (
        "cus_alice", "ref-alice-1", {"email": "alice@example.org", "plan": "gold"}, False)
    payout = await sealing_store.payout(ids["ao"])
    assert payout is not None and payout.reference == "payout-alice"
    nobody = await sealing_store.payment(ids["n1"])
    assert nobody is not None and (nobody.reference, nobody.customer_ref) == ("ref-nobody", "")
    [listed_payout], _ = await sealing_store.list_payouts(str(SLOT), ListFilter(kind="payouts"))
    assert (listed_payout.customer_ref, listed_payout.reference) == ("cus_alice", "payout-alice")
    listed, _ = await sealing_store.list_payments(str(SLOT), ListFilter(kind="payments"))
    assert {p.id: p.reference for p, _ in listed}[ids["b1"]] == "ref-bob-1"
    # A payment whose authorization did nothing is reopened: its event is of the opened
    # fields (the reopening reads the row back through the same columns).
    unavailable = msgspec.structs.replace(
        _payment("pay_" + "9" * 24, customer_ref="cus_bob", reference="ref-bob-2"),
        status=PaymentStatus.FAILED, error="provider_unavailable")
    assert await sealing_store.create_payment(unavailable, None, principal=PRINCIPAL,
                                              due_at_s=time.time())
    step_id, base = await sealing_store.new_step_ids()
    assert await sealing_store.reopen_payment(unavailable.id, new_step(
        step_id=step_id, transfer_base=base, kind=Kind.AUTHORIZE, subject_id=unavailable.id,
        amount=1_234, currency="USD", provider="acme", merchant_account_id=7),
        due_at_s=time.time())
    conn = await asyncpg.connect(db_url)
    try:
        rows = "\n".join(r["row"] for r in await conn.fetch(
            "SELECT t::text AS row FROM payments t UNION ALL SELECT t::text FROM payouts t"))
        assert "ref-nobody" in rows
        for text in ("cus_alice", "ref-alice-1", "alice@example.org", "payout-alice"):
            assert text not in rows
        payload = await conn.fetchval(
            "SELECT payload::text FROM events WHERE aggregate_id = $1", ids["a1"])
        assert "ref-alice-1" in payload and "cus_alice" in payload
        reopened = json.loads(await conn.fetchval(
            "SELECT payload::text FROM events WHERE aggregate_id = $1 "
            "AND event_type = 'payment.processing'", unavailable.id))
        assert (reopened["customer_ref"], reopened["reference"], reopened["erased"]) == (
            "cus_bob", "ref-bob-2", False)
    finally:
        await conn.close()


async def test_erase_removes_one_subject_everywhere_and_leaves_the_record(
        sealing_store: PaymentStore, db_url: str, key_file: Path) -> None:
    """`txproc erase` leaves no trace of subject A in any table; A's payments keep their
    amounts, ids and times and read as erased; B's and nobody's are as they were; the
    erasure is an audit event naming A by digest only, and verify passes."""
    ids = await _seed(sealing_store)
    conn = await asyncpg.connect(db_url)
    try:
        await outbox.set_subscribers(conn, {"downstream": "http://127.0.0.1:9/events"})
        # A delivery queued before the erasure must send the scrubbed payload.
        async with conn.transaction():
            queued = await outbox.enqueue(conn, event_type="payment.declined",
                                          aggregate_id=ids["a2"], payload={
                                              "id": ids["a2"], "reference": "ref-alice-2",
                                              "customer_ref": "cus_alice"})
        record = ("SELECT id, amount, currency, status, merchant_account_id, created_at, "
                  "principal FROM {} ORDER BY id")
        before = [await conn.fetch(record.format(t)) for t in ("payments", "payouts")]
        everything = await _everything_as_text(conn)
        assert all(text in everything for text in ("cus_alice", "refund-for-alice"))

        erased = txproc("erase", "--tenant", TENANT, "--subject-ref", "cus_alice",
                        "--master-key-file", str(key_file), "--database-url", db_url)
        assert erased.returncode == 0, erased.stderr
        assert "erased data subject" in erased.stdout and "cus_alice" not in erased.stdout

        everything = await _everything_as_text(conn)
        for text in A_TEXTS:
            assert text not in everything, text
        for text in B_TEXTS:
            assert text in everything, text
        assert [await conn.fetch(record.format(t)) for t in ("payments", "payouts")] == before
        payload = json.loads(await conn.fetchval(
            "SELECT payload::text FROM events WHERE id = $1", queued))
        assert (payload["reference"], payload["customer_ref"], payload["erased"]) == (
            None, None, True)
        assert await conn.fetchval(
            "SELECT count(*) FROM outbox_deliveries WHERE event_id = $1 "
            "AND delivered_at IS NULL", queued) == 1
        event = await conn.fetchrow(
            "SELECT actor_kind, target_kind, target_id, tenant_slot, details::text AS details "
            "FROM audit_events WHERE action = 'subject.erased'")
        digest = MasterKey(SECRET).subject_digest(SLOT, "cus_alice").hex()
        assert (event["actor_kind"], event["target_kind"], event["target_id"],
                event["tenant_slot"]) == ("operator", "data_subject", digest, SLOT)
        assert json.loads(event["details"])["payments"] == 2
    finally:
        await conn.close()

    a1 = await sealing_store.payment(ids["a1"])
    assert a1 is not None and a1.erased
    assert (a1.amount, a1.currency, a1.reference, a1.metadata, a1.customer_ref) == (
        1_234, "USD", "", {}, "")
    payout = await sealing_store.payout(ids["ao"])
    assert payout is not None and payout.erased and payout.amount == 500
    b1 = await sealing_store.payment(ids["b1"])
    assert b1 is not None and not b1.erased
    assert (b1.customer_ref, b1.reference, b1.metadata) == (
        "cus_bob", "ref-bob-1", {"email": "bob@example.org"})
    answer = await sealing_store.load_key(PRINCIPAL, "key-a1", now_s=time.time())
    assert answer is not None
    assert json.loads(answer.body) == {"id": ids["a1"], "amount": 1_234, "reference": None,
                                       "customer_ref": None, "metadata": None, "erased": True}
    result = await verify_all(db_url)
    assert result.report.ok, result.report.problems

    again = txproc("erase", "--tenant", TENANT, "--subject-ref", "cus_alice",
                   "--master-key-file", str(key_file), "--database-url", db_url)
    assert again.returncode == 0, again.stderr
    assert "erased before; nothing left to erase" in again.stdout
    unknown = txproc("erase", "--tenant", TENANT, "--subject-ref", "cus_nobody",
                     "--master-key-file", str(key_file), "--database-url", db_url)
    assert unknown.returncode == 1
    assert "has no data subject with that reference" in unknown.stderr
    other_tenant = txproc("erase", "--tenant", "someone-else", "--subject-ref", "cus_bob",
                          "--master-key-file", str(key_file), "--database-url", db_url)
    assert other_tenant.returncode == 1
    bad = txproc("erase", "--tenant", TENANT, "--subject-ref", "x" * 129,
                 "--master-key-file", str(key_file), "--database-url", db_url)
    assert bad.returncode == 2 and "--subject-ref" in bad.stderr
    conn = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval(
            "SELECT count(*) FROM audit_events WHERE action = 'subject.erased'") == 1
    finally:
        await conn.close()


async def test_a_subject_that_returns_gets_a_new_key_and_a_stale_cache_is_cleared_by_erasing_again(
        sealing_store: PaymentStore, app_db_url: str, db_url: str) -> None:
    """After an erasure a new store seals the subject's new payment under a new key (it
    reads back); a store that still caches the destroyed key writes a payment that reads
    as erased, and erasing again scrubs its event (docs/design.md §17, the cache's TTL)."""
    master = MasterKey(SECRET)
    assert await sealing_store.create_payment(
        _payment("pay_" + "d" * 24, customer_ref="cus_carol", reference="ref-carol-1"), None,
        principal=PRINCIPAL, due_at_s=time.time())
    conn = await asyncpg.connect(db_url)
    try:
        first = await erase_subject(conn, master, tenant_slot=SLOT, customer_ref="cus_carol",
                                    actor=operator_actor())
        assert (first.known, first.keys_destroyed, first.payments) == (True, 1, 1)
        # The old store still trusts its cached key: this payment is sealed with a dead key.
        assert await sealing_store.create_payment(
            _payment("pay_" + "e" * 24, customer_ref="cus_carol", reference="ref-carol-2"),
            None, principal=PRINCIPAL, due_at_s=time.time())
        stale = await sealing_store.payment("pay_" + "e" * 24)
        assert stale is not None and stale.erased
        fresh_store = await PaymentStore.connect(app_db_url, pool_size_max=2,
                                                 connect_timeout_s=10, command_timeout_s=30,
                                                 master=master)
        try:
            assert await fresh_store.create_payment(
                _payment("pay_" + "f" * 24, customer_ref="cus_carol", reference="ref-carol-3"),
                None, principal=PRINCIPAL, due_at_s=time.time())
            back = await fresh_store.payment("pay_" + "f" * 24)
            assert back is not None and (back.reference, back.erased) == ("ref-carol-3", False)
        finally:
            await fresh_store.close()
        second = await erase_subject(conn, master, tenant_slot=SLOT, customer_ref="cus_carol",
                                     actor=operator_actor())
        assert (second.keys_destroyed, second.payments) == (1, 3)
        assert second.events_scrubbed == 2  # the stale payment's and the returning one's
        everything = await _everything_as_text(conn)
        assert not any(t in everything for t in ("ref-carol-1", "ref-carol-2", "ref-carol-3"))
    finally:
        await conn.close()
