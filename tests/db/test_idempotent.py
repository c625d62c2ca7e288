"""The Idempotency-Key discipline (``Idempotent.run``) over a real PaymentStore: only final
answers are kept, and a lapsed claimant races its successor without overwriting it."""

from __future__ import annotations

import asyncio
import types
import uuid
from typing import Any

import pytest

from actors.ops import metrics
from actors.payments.endpoints import Idempotent, PaymentsApiError
from actors.payments.store import KeyHold, PaymentStore
from processor.payments import PaymentError

NOW_S = 1_800_000_000.0
TTL_S = 30.0
RETENTION_S = 86_400.0
FP = b"f" * 32


class Clock:
    def __init__(self) -> None:
        self.now_s = NOW_S

    def __call__(self) -> float:
        return self.now_s


def idempotent(store: PaymentStore, clock: Clock) -> Idempotent:
    engine: Any = types.SimpleNamespace(store=store)
    return Idempotent(engine, clock_s=clock, retention_s=RETENTION_S, claim_ttl_s=TTL_S)


async def test_a_transient_refusal_is_answered_but_not_kept(store: PaymentStore) -> None:
    clock = Clock()
    gate = idempotent(store, clock)
    key = uuid.uuid4().hex
    runs = 0

    async def busy() -> tuple[int, bytes]:
        nonlocal runs
        runs += 1
        raise PaymentError("step_exists", "this request already started its step")

    for _ in range(2):
        with pytest.raises(PaymentsApiError) as refused:
            await gate.run(principal="p", key_header=key, fingerprint_=FP, execute=busy)
        assert (refused.value.status, refused.value.code) == (409, "operation_in_progress")

    async def done() -> tuple[int, bytes]:
        return 201, b'{"id":"pay_1"}'

    # Neither refusal was stored: the same key runs again, and its answer is then kept.
    assert runs == 2
    assert await gate.run(principal="p", key_header=key, fingerprint_=FP, execute=done) == (
        201, b'{"id":"pay_1"}', {})
    status, body, headers = await gate.run(principal="p", key_header=key, fingerprint_=FP,
                                           execute=busy)
    assert (status, body, headers) == (201, b'{"id":"pay_1"}', {"Idempotent-Replayed": "true"})
    assert runs == 2


async def test_a_lapsed_claimant_does_not_overwrite_its_successors_answer(
        store: PaymentStore) -> None:
    clock = Clock()
    gate = idempotent(store, clock)
    key = uuid.uuid4().hex
    first_may_finish = asyncio.Event()
    first_started = asyncio.Event()

    async def slow_first() -> tuple[int, bytes]:
        first_started.set()
        await first_may_finish.wait()
        return 422, b'{"error":{"code":"payment_failed"}}'

    async def successor() -> tuple[int, bytes]:
        return 201, b'{"id":"pay_2"}'

    first = asyncio.create_task(
        gate.run(principal="p", key_header=key, fingerprint_=FP, execute=slow_first))
    await first_started.wait()
    clock.now_s += TTL_S + 1  # the first claim lapses; a retry takes the key over
    assert await gate.run(principal="p", key_header=key, fingerprint_=FP,
                          execute=successor) == (201, b'{"id":"pay_2"}', {})
    first_may_finish.set()
    # The first request still answers its own client...
    assert (await first)[0] == 422
    # ...but the key keeps the successor's answer.
    replay = await gate.run(principal="p", key_header=key, fingerprint_=FP, execute=slow_first)
    assert replay == (201, b'{"id":"pay_2"}', {"Idempotent-Replayed": "true"})


async def test_a_lapsed_claimant_failing_does_not_free_its_successors_claim(
        store: PaymentStore) -> None:
    clock = Clock()
    gate = idempotent(store, clock)
    key = uuid.uuid4().hex
    first_may_fail = asyncio.Event()
    first_started = asyncio.Event()
    second_may_finish = asyncio.Event()

    async def failing_first() -> tuple[int, bytes]:
        first_started.set()
        await first_may_fail.wait()
        raise ConnectionError("the database went away")

    async def held_second() -> tuple[int, bytes]:
        await second_may_finish.wait()
        return 201, b'{"id":"pay_3"}'

    first = asyncio.create_task(
        gate.run(principal="p", key_header=key, fingerprint_=FP, execute=failing_first))
    await first_started.wait()
    clock.now_s += TTL_S + 1
    second = asyncio.create_task(
        gate.run(principal="p", key_header=key, fingerprint_=FP, execute=held_second))
    await asyncio.sleep(0.2)  # the successor holds the key now
    first_may_fail.set()
    with pytest.raises(ConnectionError):
        await first
    # Had the failed first request released the key, a third would run now; it must wait.
    async def third() -> tuple[int, bytes]:
        raise AssertionError("ran while the successor held the key")

    with pytest.raises(PaymentsApiError) as busy:
        await gate.run(principal="p", key_header=key, fingerprint_=FP, execute=third)
    assert busy.value.code == "idempotency_key_in_use"
    second_may_finish.set()
    assert (await second)[0] == 201


async def test_a_database_out_of_reach_is_answered_as_unavailable(app_db_url: str) -> None:
    """With its connections gone (terminated, as when the server goes away), a payments
    call is refused as ``Unavailable`` (the edge answers 503 with Retry-After), not raised
    as a bug (500)."""
    from actors.payments.endpoints import Payments, PaymentsEndpoint
    from processor.errors import Unavailable

    store = await PaymentStore.connect(app_db_url, pool_size_max=2, connect_timeout_s=2,
                                       command_timeout_s=2)
    clock = Clock()

    async def authorize(*_: Any, **__: Any) -> Any:
        # As the engine's does before it creates the payment (which claims the key).
        await store.new_step_ids()

    engine: Any = types.SimpleNamespace(store=store, authorize=authorize)
    endpoint = PaymentsEndpoint(
        Payments(engine=engine, idempotent=idempotent(store, clock), adapters={}),
        clock_s=clock)
    store.pool.terminate()
    body = (b'{"amount": 100, "currency": "USD", "merchant_account_id": 7, '
            b'"payment_method": "pm_4242_abcdefgh"}')
    with pytest.raises(Unavailable) as away:
        await endpoint.call("1/p", "authorize", uuid.uuid4().hex, "", body, {})
    assert away.value.retry_after_s > 0
    # An operation on a payment claims its key first, and is answered the same.
    with pytest.raises(Unavailable):
        await endpoint.call("1/p", "void", uuid.uuid4().hex, "pay_" + "0" * 24, b"", {})


async def test_a_request_that_kept_its_own_answer_is_not_completed_again(
        store: PaymentStore) -> None:
    """``run`` hands the claim to the request through its hold, and completes the key only
    when the request did not store its answer itself (an authorization's final save does)."""
    gate = idempotent(store, Clock())
    key = uuid.uuid4().hex
    hold = KeyHold()

    async def keeps_its_answer() -> tuple[int, bytes]:
        assert (hold.principal, hold.key) == ("p", key) and hold.claim
        assert await store.complete_key("p", key, claim=hold.claim, status=201,
                                        body=b'{"id":"pay_kept"}')
        hold.answered = True
        return 201, b'{"id":"pay_kept"}'

    fenced = metrics.IDEMPOTENCY_FENCED.labels("complete")
    before = fenced._value.get()
    assert await gate.run(principal="p", key_header=key, fingerprint_=FP,
                          execute=keeps_its_answer, hold=hold) == (201, b'{"id":"pay_kept"}', {})
    assert fenced._value.get() == before  # no second, refused completion
    kept = await store.load_key("p", key, now_s=NOW_S + 1)
    assert kept is not None and kept.body == b'{"id":"pay_kept"}'
