"""An authorization's Idempotency-Key claimed by the statement that creates its payment
(``Idempotent.run(defer_claim=True)`` and ``PaymentStore.create_payment`` with a deferred
``KeyHold``), over a real PostgreSQL: exactly one of any number of concurrent repeats
writes, a lapsed claimant still cannot overwrite its successor, a refusal before any write
is kept, and a repeat leaves no count in the risk check's velocity window."""

from __future__ import annotations

import asyncio
import types
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from actors.payments.endpoints import Idempotent, PaymentsApiError, request_key_of
from actors.payments.engine import PaymentsEngine
from actors.payments.store import KeyHold, PaymentStore
from actors.risk import RiskActor
from processor.payments import (
    AuthorizeRequest,
    KeyState,
    Kind,
    Payment,
    PaymentError,
    PaymentsConfig,
    PaymentStatus,
    new_step,
)
from processor.risk import RiskConfig, RiskReason
from processor.types import Account
from tests.db.test_idempotent import NOW_S, RETENTION_S, TTL_S, Clock

FP = b"d" * 32
PRINCIPAL = "7/gateway"


def gate_of(store: PaymentStore, clock: Clock) -> Idempotent:
    engine: Any = types.SimpleNamespace(store=store)
    return Idempotent(engine, clock_s=clock, retention_s=RETENTION_S, claim_ttl_s=TTL_S)


def new_payment() -> Payment:
    return Payment(id="pay_" + uuid.uuid4().hex[:24], merchant_account_id=7, amount=1_000,
                   currency="USD", payment_method="pm_4242_abcdefgh",
                   status=PaymentStatus.PROCESSING, provider="acme")


async def rows_of(store: PaymentStore, payment_id: str) -> tuple[int, int, int]:
    """(payments, steps, events) stored for ``payment_id``."""
    async with store.pool.acquire() as conn:
        return (await conn.fetchval("SELECT count(*) FROM payments WHERE id = $1", payment_id),
                await conn.fetchval("SELECT count(*) FROM payment_steps WHERE subject_id = $1",
                                    payment_id),
                await conn.fetchval("SELECT count(*) FROM events WHERE aggregate_id = $1",
                                    payment_id))


def creating(store: PaymentStore, p: Payment, hold: KeyHold, *,
             runs: list[str] | None = None, wait: asyncio.Event | None = None
             ) -> Callable[[], Awaitable[tuple[int, bytes]]]:
    """An ``execute`` whose first write is the payment's creation, as an authorization's
    is; it answers 201 if it created the payment, 200 if the payment was there."""

    async def execute() -> tuple[int, bytes]:
        if runs is not None:
            runs.append("started")
        step_id, base = await store.new_step_ids()
        step = new_step(step_id=step_id, transfer_base=base, kind=Kind.AUTHORIZE,
                        subject_id=p.id, amount=p.amount, currency=p.currency,
                        provider="acme", merchant_account_id=p.merchant_account_id)
        created = await store.create_payment(p, step, principal=PRINCIPAL, hold=hold,
                                             due_at_s=NOW_S + TTL_S)
        if runs is not None:
            runs.append("created" if created else "found")
        if wait is not None:
            await wait.wait()
        return (201 if created else 200), b'{"id":"' + p.id.encode() + b'"}'

    return execute


async def test_the_create_claims_the_key_and_a_repeat_writes_nothing(
        store: PaymentStore) -> None:
    gate = gate_of(store, Clock())
    key, p = uuid.uuid4().hex, new_payment()
    hold = KeyHold()
    seen: list[Any] = []

    async def first() -> tuple[int, bytes]:
        # Nothing is claimed before the request's first write...
        seen.append(await store.load_key(PRINCIPAL, key, now_s=NOW_S))
        status, body = await creating(store, p, hold)()
        # ...which claimed it.
        seen.append(await store.load_key(PRINCIPAL, key, now_s=NOW_S))
        return status, body

    status, body, headers = await gate.run(principal=PRINCIPAL, key_header=key,
                                           fingerprint_=FP, execute=first, hold=hold,
                                           defer_claim=True)
    assert (status, headers) == (201, {})
    assert seen[0] is None and seen[1] is not None and seen[1].state == KeyState.in_flight
    assert hold.claim and not hold.deferred
    kept = await store.load_key(PRINCIPAL, key, now_s=NOW_S + 1)
    assert kept is not None and (kept.state, kept.status, kept.body) == (
        KeyState.completed, 201, body)
    # A repeat runs up to its create, which finds the key answered: it is replayed and
    # nothing more is written.
    runs: list[str] = []
    again = KeyHold()
    assert await gate.run(principal=PRINCIPAL, key_header=key, fingerprint_=FP,
                          execute=creating(store, p, again, runs=runs), hold=again,
                          defer_claim=True) == (201, body, {"Idempotent-Replayed": "true"})
    assert runs == ["started"]
    assert await rows_of(store, p.id) == (1, 1, 1)


async def test_concurrent_repeats_create_one_payment_and_are_told_to_retry(
        store: PaymentStore) -> None:
    gate = gate_of(store, Clock())
    key, p = uuid.uuid4().hex, new_payment()
    release = asyncio.Event()
    runs: list[str] = []

    async def one() -> Any:
        hold = KeyHold()
        try:
            return await gate.run(principal=PRINCIPAL, key_header=key, fingerprint_=FP,
                                  execute=creating(store, p, hold, runs=runs, wait=release),
                                  hold=hold, defer_claim=True)
        except PaymentsApiError as exc:
            return exc.code

    tasks = [asyncio.create_task(one()) for _ in range(12)]
    while runs.count("created") + len([t for t in tasks if t.done()]) < 12:
        await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.gather(*tasks)
    assert runs.count("created") == 1 and "found" not in runs
    assert sorted(str(r if isinstance(r, str) else r[0]) for r in results) == (
        ["201"] + ["idempotency_key_in_use"] * 11)
    assert await rows_of(store, p.id) == (1, 1, 1)


async def test_a_lapsed_deferred_claimant_does_not_overwrite_its_successor(
        store: PaymentStore) -> None:
    clock = Clock()
    gate = gate_of(store, clock)
    key, p = uuid.uuid4().hex, new_payment()
    first_may_finish = asyncio.Event()
    first_runs: list[str] = []
    first_hold = KeyHold()
    first = asyncio.create_task(gate.run(
        principal=PRINCIPAL, key_header=key, fingerprint_=FP, hold=first_hold,
        defer_claim=True,
        execute=creating(store, p, first_hold, runs=first_runs, wait=first_may_finish)))
    while "created" not in first_runs:
        await asyncio.sleep(0.01)
    clock.now_s += TTL_S + 1  # the first claim lapses: a repeat takes the key over
    second_runs: list[str] = []
    second_hold = KeyHold()
    # Its create finds the key held (KeyTaken); it then takes the key over and runs
    # again, claimed first, and finds the payment the first created.
    assert await gate.run(principal=PRINCIPAL, key_header=key, fingerprint_=FP,
                          hold=second_hold, defer_claim=True,
                          execute=creating(store, p, second_hold, runs=second_runs)) == (
        200, b'{"id":"' + p.id.encode() + b'"}', {})
    assert second_runs == ["started", "started", "found"]
    first_may_finish.set()
    assert (await first)[0] == 201  # the first still answers its own client...
    kept = await store.load_key(PRINCIPAL, key, now_s=clock.now_s)
    assert kept is not None and kept.status == 200  # ...but the key keeps its successor's
    assert await rows_of(store, p.id) == (1, 1, 1)


async def test_a_refusal_before_any_write_is_kept_and_replayed(store: PaymentStore) -> None:
    gate = gate_of(store, Clock())
    key = uuid.uuid4().hex

    async def refused() -> tuple[int, bytes]:
        raise PaymentError("merchant_account_not_found", "no merchant account has this id")

    status, body, _ = await gate.run(principal=PRINCIPAL, key_header=key, fingerprint_=FP,
                                      execute=refused, hold=KeyHold(), defer_claim=True)
    assert status == 422 and b"merchant_account_not_found" in body
    kept = await store.load_key(PRINCIPAL, key, now_s=NOW_S + 1)
    assert kept is not None and (kept.state, kept.status, kept.body) == (
        KeyState.completed, 422, body)

    async def would_succeed() -> tuple[int, bytes]:
        return 201, b'{"id":"pay_late"}'

    # A repeat is answered as the first was, even though it would now succeed.
    again = KeyHold()
    assert await gate.run(principal=PRINCIPAL, key_header=key, fingerprint_=FP,
                          execute=would_succeed, hold=again, defer_claim=True) == (
        422, body, {"Idempotent-Replayed": "true"})
    # Another request under the key is refused as ever.
    with pytest.raises(PaymentsApiError) as reused:
        await gate.run(principal=PRINCIPAL, key_header=key, fingerprint_=b"e" * 32,
                       execute=refused, hold=KeyHold(), defer_claim=True)
    assert reused.value.code == "idempotency_key_reused"


async def test_a_refusal_while_another_request_holds_the_key_is_not_kept(
        store: PaymentStore) -> None:
    gate = gate_of(store, Clock())
    key = uuid.uuid4().hex
    holder_may_finish = asyncio.Event()
    holder_started = asyncio.Event()

    async def holder() -> tuple[int, bytes]:
        holder_started.set()
        await holder_may_finish.wait()
        return 201, b'{"id":"pay_held"}'

    held = asyncio.create_task(gate.run(principal=PRINCIPAL, key_header=key,
                                        fingerprint_=FP, execute=holder))
    await holder_started.wait()

    async def refused() -> tuple[int, bytes]:
        raise PaymentError("merchant_account_not_found", "no merchant account has this id")

    with pytest.raises(PaymentsApiError) as busy:
        await gate.run(principal=PRINCIPAL, key_header=key, fingerprint_=FP,
                       execute=refused, hold=KeyHold(), defer_claim=True)
    assert busy.value.code == "idempotency_key_in_use"
    holder_may_finish.set()
    assert (await held)[0] == 201
    kept = await store.load_key(PRINCIPAL, key, now_s=NOW_S + 1)
    assert kept is not None and kept.body == b'{"id":"pay_held"}'


async def test_a_failure_before_any_write_leaves_the_key_free(store: PaymentStore) -> None:
    gate = gate_of(store, Clock())
    key = uuid.uuid4().hex

    async def away() -> tuple[int, bytes]:
        raise ConnectionError("the ledger went away")

    with pytest.raises(ConnectionError):
        await gate.run(principal=PRINCIPAL, key_header=key, fingerprint_=FP, execute=away,
                       hold=KeyHold(), defer_claim=True)
    assert await store.load_key(PRINCIPAL, key, now_s=NOW_S) is None


class MerchantLedger:
    """The ledger as ``_require_merchant`` reads it: merchant 7 in USD, tenant 7. Nothing
    in these tests reaches a posting."""

    async def lookup_accounts(self, ids: list[int]) -> list[Account | None]:
        return [Account(id=i, currency="USD", tenant=7) if i == 7 else None for i in ids]


async def _authorize_through_the_gate(store: PaymentStore, risk: RiskActor, clock: Clock,
                                      key: str) -> tuple[int, bytes, dict[str, str]]:
    engine = PaymentsEngine(
        store=store, ledger=MerchantLedger(),  # type: ignore[arg-type]
        providers={"acme": None},  # type: ignore[dict-item]
        currencies={"acme": frozenset({"USD"})}, provider_deadline_s={"acme": 1.0},
        risk=risk,  # type: ignore[arg-type]
        risk_config=RiskConfig(velocity_max=1), config=PaymentsConfig(), clock_s=clock)
    gate = Idempotent(engine, clock_s=clock, retention_s=RETENTION_S, claim_ttl_s=TTL_S)
    request = AuthorizeRequest(amount=1_000, currency="USD", payment_method="pm_velocity",
                               merchant_account_id=7)
    hold = KeyHold()

    async def execute() -> tuple[int, bytes]:
        view = await engine.authorize(request, principal=PRINCIPAL,
                                      request_key=request_key_of(PRINCIPAL, key, FP),
                                      hold=hold)
        return 201, view.id.encode()

    return await gate.run(principal=PRINCIPAL, key_header=key, fingerprint_=FP,
                          execute=execute, hold=hold, defer_claim=True)


async def test_a_repeat_answered_long_ago_leaves_no_count_in_the_velocity_window(
        store: PaymentStore) -> None:
    """The key was answered long ago (its check has left the velocity window). The repeat
    is checked again before its create finds the key answered; that check's count is taken
    back, so the card's next payment is judged as if the repeat never came."""
    clock = Clock()
    risk = RiskActor(RiskConfig(velocity_max=1), clock_s=clock)
    key = uuid.uuid4().hex
    claim = await store.claim_key(PRINCIPAL, key, FP, now_s=NOW_S, retention_s=RETENTION_S)
    assert await store.complete_key(PRINCIPAL, key, claim=claim, status=201,
                                    body=b'{"id":"pay_long_ago"}')
    assert await _authorize_through_the_gate(store, risk, clock, key) == (
        201, b'{"id":"pay_long_ago"}', {"Idempotent-Replayed": "true"})
    assert (await risk.check(1_000, "USD", "pm_velocity", "pay_next")).allowed


async def test_a_repeat_while_the_first_runs_keeps_the_first_ones_count(
        store: PaymentStore) -> None:
    """The first request's check counted it; a repeat arriving while it runs is checked as
    the same request (not counted again), finds the key held and takes nothing back."""
    clock = Clock()
    risk = RiskActor(RiskConfig(velocity_max=1), clock_s=clock)
    key = uuid.uuid4().hex
    payment_id = "pay_" + request_key_of(PRINCIPAL, key, FP)[:24]
    assert (await risk.check(1_000, "USD", "pm_velocity", payment_id)).counted
    assert await store.claim_key(PRINCIPAL, key, FP, now_s=NOW_S, retention_s=RETENTION_S)
    with pytest.raises(PaymentsApiError) as busy:
        await _authorize_through_the_gate(store, risk, clock, key)
    assert busy.value.code == "idempotency_key_in_use"
    assert await rows_of(store, payment_id) == (0, 0, 0)
    second = await risk.check(1_000, "USD", "pm_velocity", "pay_next")
    assert (second.allowed, second.reason) == (False, RiskReason.velocity_exceeded)
