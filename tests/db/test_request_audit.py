"""An authorization's audit record written by the payments store (processor/
request_audit.py), over a real PostgreSQL as the application role: by the statement that
creates the payment, whatever else that statement does, by the statement that keeps a
refusal, or alone; once each, and never before nor without the statement that needs it."""

from __future__ import annotations

import time
import uuid

import asyncpg
import msgspec
import pytest

from actors.payments.endpoints import Idempotent
from actors.payments.engine import REQUEST_AUDIT
from actors.payments.store import KeyHold, KeyTaken, PaymentStore
from processor.payments import Kind, PaymentError, new_step
from processor.request_audit import AuditSlot, RequestRecord
from tests.db.test_deferred_claim import FP, PRINCIPAL, gate_of, new_payment
from tests.db.test_idempotent import NOW_S, RETENTION_S, TTL_S, Clock


def slot() -> AuditSlot:
    return AuditSlot(RequestRecord(
        id=int(uuid.uuid4().int >> 66), tenant=7, tenant_name="shopco", subject="till-3",
        token_id="tok-" + uuid.uuid4().hex[:8], request_id="req-" + uuid.uuid4().hex[:8],
        operation="payments.authorize", items=1, at_s=time.time()))


async def record_of(store: PaymentStore, record_id: int) -> asyncpg.Record | None:
    async with store.pool.acquire() as conn:
        return await conn.fetchrow(
            "SELECT tenant, tenant_name, subject, token_id, request_id, operation, items, "
            "extract(epoch FROM at)::float8 AS at_s FROM audit_requests WHERE id = $1",
            record_id)


def deferred_hold(key: str) -> KeyHold:
    return KeyHold(principal=PRINCIPAL, key=key, fingerprint=FP, deferred=True,
                   now_s=NOW_S, retention_s=RETENTION_S)


async def create(store: PaymentStore, audit: AuditSlot | None, *,
                 hold: KeyHold | None = None, payment_id: str | None = None) -> bool:
    p = new_payment()
    if payment_id is not None:
        p = msgspec.structs.replace(p, id=payment_id)
    step_id, base = await store.new_step_ids()
    step = new_step(step_id=step_id, transfer_base=base, kind=Kind.AUTHORIZE,
                    subject_id=p.id, amount=p.amount, currency=p.currency, provider="acme",
                    merchant_account_id=p.merchant_account_id)
    return await store.create_payment(p, step, principal=PRINCIPAL, hold=hold, audit=audit,
                                      due_at_s=NOW_S + TTL_S)


async def test_the_create_writes_the_record_with_the_payment(store: PaymentStore) -> None:
    audit = slot()
    assert await create(store, audit)
    assert audit.written
    row = await record_of(store, audit.record.id)
    assert row is not None
    r = audit.record
    assert tuple(row)[:7] == (r.tenant, r.tenant_name, r.subject, r.token_id, r.request_id,
                              r.operation, r.items)
    assert row["at_s"] == pytest.approx(r.at_s, abs=1e-5)
    # Written once: the same slot adds nothing to a later statement.
    assert await create(store, audit)
    async with store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_requests WHERE id = $1",
                                   r.id) == 1


async def test_a_create_that_writes_nothing_else_still_writes_the_record(
        store: PaymentStore) -> None:
    # The payment exists already (a repeat of its request).
    first = slot()
    payment_id = "pay_" + uuid.uuid4().hex[:24]
    assert await create(store, first, payment_id=payment_id)
    repeat = slot()
    assert not await create(store, repeat, payment_id=payment_id)
    assert repeat.written and await record_of(store, repeat.record.id) is not None
    # The key is taken (KeyTaken: no payment, no step, no event).
    key = uuid.uuid4().hex
    assert await create(store, slot(), hold=deferred_hold(key))
    taken = slot()
    with pytest.raises(KeyTaken):
        await create(store, taken, hold=deferred_hold(key))
    assert taken.written and await record_of(store, taken.record.id) is not None


async def test_a_failed_create_writes_no_record(store: PaymentStore) -> None:
    audit = slot()
    # A step id in use fails the statement: nothing of it is written.
    step_id, base = await store.new_step_ids()
    p = new_payment()
    step = new_step(step_id=step_id, transfer_base=base, kind=Kind.AUTHORIZE,
                    subject_id=p.id, amount=p.amount, currency=p.currency, provider="acme",
                    merchant_account_id=p.merchant_account_id)
    assert await store.create_payment(p, step, principal=PRINCIPAL, due_at_s=NOW_S + TTL_S)
    other = new_payment()
    clash = new_step(step_id=step_id, transfer_base=base + 1000, kind=Kind.AUTHORIZE,
                     subject_id=other.id, amount=other.amount, currency=other.currency,
                     provider="acme", merchant_account_id=other.merchant_account_id)
    with pytest.raises(Exception):  # noqa: B017 - the store's step-conflict error
        await store.create_payment(other, clash, principal=PRINCIPAL, audit=audit,
                                   due_at_s=NOW_S + TTL_S)
    assert not audit.written and await record_of(store, audit.record.id) is None


async def test_a_kept_refusal_and_a_lone_write_each_write_the_record_once(
        store: PaymentStore) -> None:
    refused = slot()
    assert await store.answer_key(deferred_hold(uuid.uuid4().hex), status=422, body=b"{}",
                                  audit=refused)
    assert refused.written and await record_of(store, refused.record.id) is not None
    # A refusal that finds the key taken stores no answer, and still writes the record.
    key = uuid.uuid4().hex
    assert await store.answer_key(deferred_hold(key), status=422, body=b"{}")
    late = slot()
    assert not await store.answer_key(deferred_hold(key), status=422, body=b"{}", audit=late)
    assert late.written and await record_of(store, late.record.id) is not None
    alone = slot()
    await store.write_audit(alone)
    await store.write_audit(alone)
    assert alone.written and await record_of(store, alone.record.id) is not None
    # Written by an earlier statement whose answer was lost: the second write is a no-op.
    again = AuditSlot(alone.record)
    await store.write_audit(again)
    async with store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_requests WHERE id = $1",
                                   alone.record.id) == 1


async def test_the_gate_writes_a_refused_requests_record_with_its_answer(
        store: PaymentStore) -> None:
    """``Idempotent`` keeps a refusal before any write with the request's record, in the
    one statement (the record is never behind the answer it explains)."""
    gate: Idempotent = gate_of(store, Clock())
    audit = slot()

    async def refused() -> tuple[int, bytes]:
        raise PaymentError("merchant_account_not_found", "no merchant account has this id")

    token = REQUEST_AUDIT.set(audit)
    try:
        status, _, _ = await gate.run(principal=PRINCIPAL, key_header=uuid.uuid4().hex,
                                      fingerprint_=FP, execute=refused, hold=KeyHold(),
                                      defer_claim=True)
    finally:
        REQUEST_AUDIT.reset(token)
    assert status == 422
    assert audit.written and await record_of(store, audit.record.id) is not None


async def test_the_key_claim_writes_the_record_claimed_or_not(store: PaymentStore) -> None:
    """Every operation but an authorization claims its key first: that statement writes
    the record, whether it claimed the key, found it held, or took it over."""
    key = uuid.uuid4().hex
    first = slot()
    assert await store.claim_key(PRINCIPAL, key, FP, now_s=NOW_S, retention_s=RETENTION_S,
                                 audit=first)
    held = slot()
    assert not await store.claim_key(PRINCIPAL, key, FP, now_s=NOW_S + 1,
                                     retention_s=RETENTION_S, audit=held)
    taking = slot()
    assert await store.claim_key(PRINCIPAL, key, FP, now_s=NOW_S + TTL_S + 1,
                                 retention_s=RETENTION_S, stale_before_s=NOW_S + 1,
                                 audit=taking)
    for audit in (first, held, taking):
        assert audit.written and await record_of(store, audit.record.id) is not None
