"""PaymentStore against a real PostgreSQL: key claims, the one-open-step rule, fencing,
recovery claims and webhook deduplication."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from typing import Any

import asyncpg
import msgspec
import pytest

from actors.payments.store import KeyHold, PaymentStore
from processor.payments import (
    Decision,
    KeyState,
    Kind,
    Payment,
    PaymentError,
    PaymentStatus,
    Phase,
    Step,
    decide,
    new_step,
)

NOW_S = 1_800_000_000.0
TTL_S = 30.0
RETENTION_S = 86_400.0


def payment(pid: str = "pay_" + "1" * 24) -> Payment:
    return Payment(id=pid, merchant_account_id=7, amount=1_000, currency="USD",
                   payment_method="pm_4242_abcdefgh", status=PaymentStatus.PROCESSING,
                   provider="acme")


async def first_step(store: PaymentStore, subject: str, kind: Kind = Kind.AUTHORIZE) -> Step:
    step_id, base = await store.new_step_ids()
    return new_step(step_id=step_id, transfer_base=base, kind=kind, subject_id=subject,
                    amount=1_000, currency="USD", provider="acme", merchant_account_id=7)


async def test_step_ids_rise_in_the_order_they_are_handed_out_even_when_asked_at_once(
        store: PaymentStore) -> None:
    """Within one store, step ids follow the order steps are created in: a step created
    later never gets a lower id, not when many requests ask at once while the store's block
    of ids runs out (each used to fetch a block and append it whenever its fetch ended, so
    a late block's lower ids came after a higher one's), and not across blocks."""
    handed: list[tuple[int, int]] = []
    rng = random.Random(7)
    pool = store._pool

    class LateAnswers:
        """The store's pool, with each fetch's rows arriving a random while after the
        statement ran (as over a busy socket): answers come back in another order than
        the sequence gave out their ids."""

        def __getattr__(self, name: str) -> Any:
            return getattr(pool, name)

        async def fetch(self, *args: Any, **kwargs: Any) -> Any:
            rows = await pool.fetch(*args, **kwargs)
            await asyncio.sleep(rng.random() * 0.02)
            return rows

    async def one() -> None:
        handed.append(await store.new_step_ids())

    store._pool = LateAnswers()
    try:
        for _ in range(3):
            await asyncio.gather(*[one() for _ in range(100)])
    finally:
        store._pool = pool
    steps = [step for step, _ in handed]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    bases = [base for _, base in handed]
    assert bases == sorted(bases) and len(set(bases)) == len(bases)


async def test_a_payments_operations_are_listed_as_they_were_created_whatever_their_ids(
        store: PaymentStore) -> None:
    """A payment's newest operation decides its answer. Ids from two stores (two payments
    actors alive for a moment during a restart) can interleave, so the order is the steps'
    creation, which is serial per payment (one open step at a time), not their ids."""
    p = payment("pay_" + "5" * 24)
    low_id, low_base = await store.new_step_ids()
    high_id, high_base = await store.new_step_ids()
    first = new_step(step_id=high_id, transfer_base=high_base, kind=Kind.AUTHORIZE,
                     subject_id=p.id, amount=1_000, currency="USD", provider="acme",
                     merchant_account_id=7)
    assert await store.create_payment(p, first, principal="alice", due_at_s=NOW_S + TTL_S)
    failed = await store.save_step(first, msgspec.structs.replace(
        first, phase=Phase.FAILED, error="provider_unavailable"), due_at_s=NOW_S)
    assert failed is not None
    again = new_step(step_id=low_id, transfer_base=low_base, kind=Kind.AUTHORIZE,
                     subject_id=p.id, amount=1_000, currency="USD", provider="acme",
                     merchant_account_id=7)
    assert await store.reopen_payment(p.id, again, due_at_s=NOW_S + TTL_S)
    found = await store.payment_with_steps(p.id)
    assert found is not None
    assert [s.id for s in found[1]] == [high_id, low_id]
    assert [s.id for s in await store.steps_of(p.id)] == [high_id, low_id]


async def test_a_key_is_claimed_once_even_by_concurrent_requests(store: PaymentStore) -> None:
    results = await asyncio.gather(*[
        store.claim_key("alice", "k1", b"f" * 32, now_s=NOW_S, retention_s=RETENTION_S)
        for _ in range(20)])
    assert sum(1 for claim in results if claim) == 1
    stored = await store.load_key("alice", "k1", now_s=NOW_S)
    assert stored is not None and stored.state == KeyState.in_flight
    assert decide(stored, b"f" * 32, NOW_S + 1, TTL_S) == Decision.conflict_in_flight
    assert decide(stored, b"g" * 32, NOW_S + 1, TTL_S) == Decision.mismatch
    # Another principal's key of the same text is another key.
    assert await store.claim_key("bob", "k1", b"f" * 32, now_s=NOW_S, retention_s=RETENTION_S)


async def test_a_stale_claim_is_taken_over_once_and_a_fresh_one_never(
        store: PaymentStore) -> None:
    fp = b"f" * 32
    assert await store.claim_key("alice", "k2", fp, now_s=NOW_S, retention_s=RETENTION_S)
    # Young: a take-over is refused.
    assert not await store.claim_key("alice", "k2", fp, now_s=NOW_S + 5,
                                     retention_s=RETENTION_S, stale_before_s=NOW_S + 5 - TTL_S)
    later = NOW_S + TTL_S + 1
    stored = await store.load_key("alice", "k2", now_s=later)
    assert stored is not None
    assert decide(stored, fp, later, TTL_S) == Decision.take_over
    takeovers = await asyncio.gather(*[
        store.claim_key("alice", "k2", fp, now_s=later, retention_s=RETENTION_S,
                        stale_before_s=later - TTL_S) for _ in range(10)])
    assert sum(1 for claim in takeovers if claim) == 1


async def test_completed_keys_replay_and_expire(store: PaymentStore) -> None:
    fp = b"f" * 32
    claim = await store.claim_key("alice", "k3", fp, now_s=NOW_S, retention_s=100)
    assert await store.complete_key("alice", "k3", claim=claim, status=201,
                                    body=b'{"id":"pay_x"}')
    stored = await store.load_key("alice", "k3", now_s=NOW_S + 1)
    assert stored is not None
    assert (stored.state, stored.status, stored.body) == (
        KeyState.completed, 201, b'{"id":"pay_x"}')
    assert decide(stored, fp, NOW_S + 1, TTL_S) == Decision.replay
    # After the retention the key is free again, and purged.
    assert await store.load_key("alice", "k3", now_s=NOW_S + 101) is None
    assert await store.claim_key("alice", "k3", b"g" * 32, now_s=NOW_S + 101, retention_s=100)
    assert await store.purge_keys(now_s=NOW_S + 1_000) >= 1


async def test_release_frees_only_an_in_flight_claim(store: PaymentStore) -> None:
    fp = b"f" * 32
    claim = await store.claim_key("alice", "k4", fp, now_s=NOW_S, retention_s=RETENTION_S)
    assert await store.release_key("alice", "k4", claim=claim)
    claim = await store.claim_key("alice", "k4", fp, now_s=NOW_S, retention_s=RETENTION_S)
    assert await store.complete_key("alice", "k4", claim=claim, status=200, body=b"{}")
    assert not await store.release_key("alice", "k4", claim=claim)
    assert not await store.claim_key("alice", "k4", fp, now_s=NOW_S, retention_s=RETENTION_S)


async def test_a_lapsed_claimant_can_neither_overwrite_nor_release_its_successor(
        store: PaymentStore) -> None:
    """The first request's claim lapses and a retry takes the key over; whatever the first
    one does afterwards (store its answer, release the key), the successor's claim and
    answer stand."""
    fp = b"f" * 32
    first = await store.claim_key("alice", "k5", fp, now_s=NOW_S, retention_s=RETENTION_S)
    later = NOW_S + TTL_S + 1
    second = await store.claim_key("alice", "k5", fp, now_s=later, retention_s=RETENTION_S,
                                   stale_before_s=later - TTL_S)
    assert first and second and first != second
    # The lapsed claimant cannot release the successor's claim...
    assert not await store.release_key("alice", "k5", claim=first)
    stored = await store.load_key("alice", "k5", now_s=later)
    assert stored is not None and stored.state == KeyState.in_flight
    # ...nor store its answer over it, before or after the successor completes.
    assert not await store.complete_key("alice", "k5", claim=first, status=500, body=b"x")
    assert await store.complete_key("alice", "k5", claim=second, status=201, body=b"ok")
    assert not await store.complete_key("alice", "k5", claim=first, status=402, body=b"no")
    assert not await store.release_key("alice", "k5", claim=first)
    stored = await store.load_key("alice", "k5", now_s=later)
    assert stored is not None
    assert (stored.state, stored.status, stored.body) == (KeyState.completed, 201, b"ok")


async def test_one_open_step_per_payment_and_fenced_writes(store: PaymentStore) -> None:
    p = payment()
    step = await first_step(store, p.id)
    assert await store.create_payment(p, step, principal="alice", due_at_s=NOW_S + TTL_S)
    assert not await store.create_payment(p, None, principal="alice", due_at_s=NOW_S)
    second = await first_step(store, p.id, Kind.VOID)
    with pytest.raises(PaymentError) as err:
        await store.create_step(second, due_at_s=NOW_S)
    assert err.value.code == "operation_in_progress"
    approved = msgspec.structs.replace(step, phase=Phase.APPLY, provider_ref="auth_1")
    saved = await store.save_step(step, approved, due_at_s=NOW_S + TTL_S)
    assert saved is not None and saved.version == step.version + 1
    # A runner still holding the old version has lost the step: its write is refused.
    assert await store.save_step(step, approved, due_at_s=NOW_S) is None
    done = await store.save_step(saved, msgspec.structs.replace(saved, phase=Phase.SUCCEEDED),
                                 due_at_s=NOW_S)
    assert done is not None
    stored = await store.payment(p.id)
    assert stored is not None
    assert (stored.status, stored.provider_ref, stored.hold_transfer_id) == (
        PaymentStatus.AUTHORIZED, "auth_1", step.transfer_id)
    # The step finished, so another may start now.
    await store.create_step(second, due_at_s=NOW_S)
    assert await store.payment(p.id, principal="bob") is None


async def test_due_steps_are_claimed_by_one_worker_each(store: PaymentStore) -> None:
    for i in range(6):
        p = payment("pay_" + f"{i:024x}")
        step = await first_step(store, p.id)
        await store.create_payment(p, step, principal="alice", due_at_s=NOW_S - 1)
    claims = await asyncio.gather(*[
        store.claim_due(now_s=NOW_S, claim_ttl_s=TTL_S, limit=2) for _ in range(5)])
    claimed = [s.id for batch in claims for s in batch]
    assert len(claimed) == len(set(claimed)) == 6
    assert all(s.version == 1 for batch in claims for s in batch)
    # Claimed steps are not due again until their claim lapses.
    assert await store.claim_due(now_s=NOW_S, claim_ttl_s=TTL_S, limit=10) == []
    again = await store.claim_due(now_s=NOW_S + TTL_S + 1, claim_ttl_s=TTL_S, limit=10)
    assert len(again) == 6


async def test_a_webhook_event_applies_once(store: PaymentStore) -> None:
    p = payment("pay_" + "2" * 24)
    step = await first_step(store, p.id)
    await store.create_payment(p, step, principal="alice", due_at_s=NOW_S)
    waiting = await store.save_step(
        step, msgspec.structs.replace(step, phase=Phase.AWAIT_PROVIDER), due_at_s=NOW_S)
    assert waiting is not None
    approved = msgspec.structs.replace(waiting, phase=Phase.APPLY)
    first = await store.save_step(waiting, approved, due_at_s=NOW_S, webhook=("acme", "evt_1"))
    assert first is not None
    assert await store.save_step(first, approved, due_at_s=NOW_S,
                                 webhook=("acme", "evt_1")) is None
    assert await store.webhook_seen("acme", "evt_1")
    assert not await store.record_webhook("acme", "evt_1")
    assert await store.record_webhook("globex", "evt_1")


async def test_its_sessions_yield_the_cpu_on_a_shared_machine(db_url: str) -> None:
    """With ``session_nice``, each pooled connection's backend runs at that nice value
    when the server is on this machine (the embedded one is)."""
    import psutil

    store = await PaymentStore.connect(db_url, pool_size_max=2, connect_timeout_s=10,
                                       command_timeout_s=10, session_nice=7)
    try:
        async with store.pool.acquire() as conn:
            pid = conn.get_server_pid()
            if not psutil.pid_exists(pid):
                pytest.skip("the database server is not on this machine")
            assert psutil.Process(pid).nice() == 7
    finally:
        await store.close()


async def test_overdue_steps_are_set_aside_for_review_and_handed_back_by_an_operator(
        store: PaymentStore, db_url: str) -> None:
    """A step unfinished past ``review_after_s`` and due (no live runner) is set aside: the
    recovery worker no longer takes it, its log and the outbox say so; an operator hands it
    back, due now with its backoff reset; a step a runner holds is left alone."""
    import time

    parked, held = payment("pay_" + "a" * 24), payment("pay_" + "b" * 24)
    now_s = time.time()
    for p, due_at_s in ((parked, now_s), (held, now_s + 10_000)):
        step = await first_step(store, p.id)
        assert await store.create_payment(p, step, principal="alice", due_at_s=due_at_s)
    later_s = now_s + 7_200  # both started two hours before this
    aside = await store.flag_for_review(now_s=later_s, review_after_s=3_600, limit=10)
    assert [s.subject_id for s in aside] == [parked.id]
    assert await store.flag_for_review(now_s=later_s, review_after_s=3_600, limit=10) == []
    # The recovery worker does not take it up any more, however due it is.
    assert await store.claim_due(now_s=later_s, claim_ttl_s=TTL_S, limit=10) == []
    [listed] = await store.steps_in_review()
    assert (listed["id"], listed["subject_id"]) == (aside[0].id, parked.id)
    assert "payment_method" not in listed
    assert await store.review_count() == 1
    conn = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval(
            "SELECT count(*) FROM events WHERE event_type='payment.requires_review' "
            "AND aggregate_id=$1", parked.id) == 1
        # The operator's decision is in the step's log, with who and why.
        assert await store.retry_reviewed(aside[0].id, now_s=later_s, operator="ops-jane",
                                          reason="acme confirmed no charge") is not None
        assert await store.retry_reviewed(aside[0].id, now_s=later_s, operator="x",
                                          reason="y") is None
        detail = await conn.fetchval(
            "SELECT detail FROM payment_step_log WHERE step_id=$1 ORDER BY version DESC "
            "LIMIT 1", aside[0].id)
        assert detail == "review: retried by ops-jane: acme confirmed no charge"
    finally:
        await conn.close()
    [back] = await store.claim_due(now_s=later_s, claim_ttl_s=TTL_S, limit=10)
    assert (back.id, back.checks) == (aside[0].id, 1)
    assert await store.review_count() == 0


async def test_waiting_for_a_connection_is_bounded(app_db_url: str) -> None:
    """With every connection busy (a hung server holds them so), a statement waits at most
    ``acquire_timeout_s`` for one and raises TimeoutError, which the payments routes answer
    503: requests do not pile up behind a database that does not answer."""
    import time

    from actors.payments.store import DATABASE_UNREACHABLE

    store = await PaymentStore.connect(app_db_url, pool_size_max=1, connect_timeout_s=10,
                                       command_timeout_s=10, acquire_timeout_s=0.3)
    try:
        async with store.pool.acquire(timeout=5):
            started = time.monotonic()
            with pytest.raises(TimeoutError) as raised:
                await store.payment("pay_nobody")
            waited = time.monotonic() - started
        assert isinstance(raised.value, DATABASE_UNREACHABLE)
        assert 0.25 <= waited < 2.0, waited
        # Once a connection is free the same call goes through.
        assert await store.payment("pay_nobody") is None
    finally:
        await store.close()


async def test_a_final_save_after_failover_records_the_new_key_and_its_log_line(
        store: PaymentStore) -> None:
    """A step that moved to another provider (failover) and finished in one save: the
    new provider key finds the step (a webhook of the new provider is applied to it), the
    old one still does, the log has the line, and a stale writer changes none of it."""
    p = payment("pay_" + "2" * 24)
    step = await first_step(store, p.id)
    assert await store.create_payment(p, step, principal="alice", due_at_s=NOW_S + TTL_S)
    moved = msgspec.structs.replace(step, provider="globex",
                                    provider_key=f"txp-{step.id}-globex",
                                    phase=Phase.FAILED, error="provider_declined")
    assert await store.save_step(step, moved, due_at_s=NOW_S, detail="failover") is not None
    assert await store.save_step(step, moved, due_at_s=NOW_S, detail="stale") is None
    by_new = await store.step_by_key(f"txp-{step.id}-globex")
    by_old = await store.step_by_key(step.provider_key)
    assert by_new is not None and by_old is not None
    assert (by_new.id, by_new.provider, by_new.phase) == (step.id, "globex", Phase.FAILED)
    async with store.pool.acquire() as conn:
        details = [r["detail"] for r in await conn.fetch(
            "SELECT detail FROM payment_step_log WHERE step_id = $1 ORDER BY version",
            step.id)]
    assert details == ["created", "failover"]


async def _finished(store: PaymentStore, pid: str, end: dict[str, object], *,
                    known: bool) -> tuple[Payment, list[object], list[object]]:
    """An authorization created and then finished as ``end`` says, with the payment known
    to the final save (its one-statement path) or not (the general path); the stored
    payment, its events' payloads and its step's log, without the ids that differ."""
    p = msgspec.structs.replace(payment(pid), created_at=dt.datetime(
        2026, 12, 6, 7, 30, 1, 123456, tzinfo=dt.UTC))
    step = await first_step(store, p.id)
    assert await store.create_payment(p, step, principal="alice/u1", due_at_s=NOW_S + TTL_S)
    applied = await store.save_step(step, msgspec.structs.replace(step, phase=Phase.APPLY),
                                    due_at_s=NOW_S + TTL_S, detail="provider approved")
    assert applied is not None
    done = await store.save_step(applied, msgspec.structs.replace(applied, **end),
                                 due_at_s=NOW_S, detail="final",
                                 payment=p if known else None)
    assert done is not None and done.version == applied.version + 1
    stored = await store.payment(p.id)
    assert stored is not None
    async with store.pool.acquire() as conn:
        events = [(r["event_type"], msgspec.json.decode(r["payload"])) for r in await conn.fetch(
            "SELECT event_type, payload FROM events WHERE aggregate_id = $1 ORDER BY id", p.id)]
        log = [(r["version"], r["phase"], r["detail"]) for r in await conn.fetch(
            "SELECT version, phase, detail FROM payment_step_log WHERE step_id = $1 "
            "ORDER BY version", step.id)]
    for _, body in events:
        body.pop("id")
        body["hold_transfer_id"] = int(body["hold_transfer_id"] == step.transfer_id)
    return (msgspec.structs.replace(stored, id="", hold_transfer_id=0),
            events, log)


@pytest.mark.parametrize("end", [
    {"phase": Phase.SUCCEEDED, "provider_ref": "auth_9"},
    {"phase": Phase.FAILED, "error": "provider_declined", "decline_code": "do_not_honor"},
    {"phase": Phase.FAILED, "error": "provider_unavailable", "provider": "globex",
     "provider_key": "txp-x-globex"},
], ids=["authorized", "declined", "failed-after-failover"])
async def test_an_authorizations_one_statement_finish_writes_what_the_general_path_does(
        store: PaymentStore, end: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    """Finishing an authorization with its payment known (one statement, no read of the
    payment) stores the same payment, event and log as the general transaction does."""
    suffix = str(sorted(end.items())).__hash__() % 10**8
    if "provider_key" in end:
        end = {**end, "provider_key": f"txp-{suffix}-globex"}

    async def general_path(*_: object) -> None:
        raise AssertionError("the known payment's finish took the general path")

    with monkeypatch.context() as patched:
        patched.setattr(store, "_finish", general_path)
        fast = await _finished(store, f"pay_f{suffix:023d}", end, known=True)
    if "provider_key" in end:
        end = {**end, "provider_key": f"txp-{suffix}-globex2"}
    general = await _finished(store, f"pay_g{suffix:023d}", end, known=False)
    for fast_part, general_part in zip(fast, general, strict=True):
        assert fast_part == general_part
    assert fast[0].status != PaymentStatus.PROCESSING
    assert [kind for kind, _ in fast[1]] == ["payment.processing", f"payment.{fast[0].status}"]


async def test_a_stale_one_statement_finish_writes_nothing(store: PaymentStore) -> None:
    """A runner whose claim lapsed cannot finish the authorization through the one-statement
    path either: the payment stays as its new owner left it, with no event."""
    p = payment("pay_" + "3" * 24)
    step = await first_step(store, p.id)
    assert await store.create_payment(p, step, principal="alice", due_at_s=NOW_S + TTL_S)
    taken = await store.save_step(step, step, due_at_s=NOW_S, detail="recovery took it")
    assert taken is not None
    late = msgspec.structs.replace(step, phase=Phase.SUCCEEDED, provider_ref="auth_1")
    assert await store.save_step(step, late, due_at_s=NOW_S, payment=p) is None
    stored = await store.payment(p.id)
    assert stored is not None and stored.status == PaymentStatus.PROCESSING
    async with store.pool.acquire() as conn:
        count = await conn.fetchval("SELECT count(*) FROM events WHERE aggregate_id = $1", p.id)
    assert count == 1  # payment.processing, from its creation


@pytest.mark.parametrize("lapsed", [False, True], ids=["held", "lapsed"])
async def test_the_one_statement_finish_keeps_the_answer_only_under_the_claim_held(
        store: PaymentStore, lapsed: bool) -> None:
    """The final save of an authorization stores the request's answer under its key in the
    same statement, but only while the request's claim holds the key: a lapsed claimant's
    answer is not kept (its successor's stands) though its payment still finishes."""
    p = payment(f"pay_{4 + lapsed}" + "4" * 23)
    key = f"k-finish-{lapsed}"
    claim = await store.claim_key("alice", key, b"f" * 32, now_s=NOW_S, retention_s=100)
    hold = KeyHold("alice", key, claim)
    if lapsed:
        successor = await store.claim_key("alice", key, b"f" * 32, now_s=NOW_S + TTL_S + 1,
                                          retention_s=100, stale_before_s=NOW_S + 1)
        assert successor
    step = await first_step(store, p.id)
    assert await store.create_payment(p, step, principal="alice", due_at_s=NOW_S + TTL_S)
    answers: list[Step] = []

    def answer(done: Step) -> tuple[int, bytes]:
        answers.append(done)
        return 201, b'{"id":"' + done.subject_id.encode() + b'"}'

    done = await store.save_step(step, msgspec.structs.replace(step, phase=Phase.SUCCEEDED),
                                 due_at_s=NOW_S, payment=p, hold=hold, answer=answer)
    assert done is not None and answers == [done]
    stored_payment = await store.payment(p.id)
    assert stored_payment is not None and stored_payment.status == PaymentStatus.AUTHORIZED
    kept = await store.load_key("alice", key, now_s=NOW_S + TTL_S + 2)
    assert kept is not None
    assert hold.answered is not lapsed
    if lapsed:
        assert (kept.state, kept.body) == (KeyState.in_flight, b"")
    else:
        assert (kept.state, kept.status, kept.body) == (
            KeyState.completed, 201, b'{"id":"' + p.id.encode() + b'"}')


async def test_an_answer_not_to_keep_leaves_the_key_to_the_request(
        store: PaymentStore) -> None:
    """An answer the request does not keep (None: not final) is not stored by the final
    save; the key stays claimed for the request to release."""
    p = payment("pay_6" + "6" * 23)
    claim = await store.claim_key("alice", "k-none", b"f" * 32, now_s=NOW_S, retention_s=100)
    hold = KeyHold("alice", "k-none", claim)
    step = await first_step(store, p.id)
    assert await store.create_payment(p, step, principal="alice", due_at_s=NOW_S + TTL_S)
    failed = msgspec.structs.replace(step, phase=Phase.FAILED, error="provider_unavailable")
    assert await store.save_step(step, failed, due_at_s=NOW_S, payment=p, hold=hold,
                                 answer=lambda _: None) is not None
    assert not hold.answered
    kept = await store.load_key("alice", "k-none", now_s=NOW_S + 1)
    assert kept is not None and kept.state == KeyState.in_flight
    assert await store.release_key("alice", "k-none", claim=claim)


async def test_an_event_that_cannot_move_its_step_is_remembered_as_it_is_found(
        store: PaymentStore) -> None:
    """A provider event about no step, a step no event moves (final, or applying the
    provider's answer) or another provider's step is remembered by the statement that finds
    the step (new once, a duplicate after); an event about a step that may still move is
    left to the caller, unrecorded."""
    p = payment("pay_" + "7" * 24)
    step = await first_step(store, p.id)
    assert await store.create_payment(p, step, principal="alice", due_at_s=NOW_S + TTL_S)
    assert await store.step_for_event("txp-none-acme", "acme", "evt_a") == (None, True)
    assert await store.step_for_event("txp-none-acme", "acme", "evt_a") == (None, False)
    found, fresh = await store.step_for_event(step.provider_key, "acme", "evt_b")
    assert found is not None and (found.id, fresh) == (step.id, None)
    assert not await store.webhook_seen("acme", "evt_b")
    found, fresh = await store.step_for_event(step.provider_key, "globex", "evt_c")
    assert found is not None and fresh is True  # another provider's step: inert
    # The provider answered; the ledger's part is left: its own event moves nothing now.
    applying = await store.save_step(step, msgspec.structs.replace(step, phase=Phase.APPLY),
                                     due_at_s=NOW_S)
    assert applying is not None
    assert (await store.step_for_event(step.provider_key, "acme", "evt_d"))[1] is True
    assert (await store.step_for_event(step.provider_key, "acme", "evt_d"))[1] is False
    done = await store.save_step(applying, msgspec.structs.replace(
        applying, phase=Phase.FAILED, error="provider_declined"), due_at_s=NOW_S)
    assert done is not None
    assert (await store.step_for_event(step.provider_key, "acme", "evt_b"))[1] is True
    assert (await store.step_for_event(step.provider_key, "acme", "evt_b"))[1] is False


async def test_a_batch_of_events_is_judged_as_each_would_be_alone(
        store: PaymentStore) -> None:
    """``record_inert_events``: in one statement, each event of a batch answered as
    ``step_for_event`` answers it (no step, another provider's, a step that may move, one
    that cannot), a repeat within the batch a duplicate, nothing recorded for the one left
    to the caller; and the same answers as the single-event statement gives afterwards."""
    p = payment("pay_" + "8" * 24)
    step = await first_step(store, p.id)
    assert await store.create_payment(p, step, principal="alice", due_at_s=NOW_S + TTL_S)
    batch = [("txp-none-acme", "evt_x1"), (step.provider_key, "evt_x2"),
             ("txp-none-acme", "evt_x1"), ("txp-none-acme", "evt_x3")]
    assert await store.record_inert_events("acme", batch) == [True, None, False, True]
    assert not await store.webhook_seen("acme", "evt_x2")
    assert await store.record_inert_events("globex", [(step.provider_key, "evt_x4")]) == [True]
    assert await store.record_inert_events("acme", batch) == [False, None, False, False]
    done = await store.save_step(step, msgspec.structs.replace(
        step, phase=Phase.FAILED, error="provider_declined"), due_at_s=NOW_S)
    assert done is not None
    assert await store.record_inert_events("acme", batch) == [False, True, False, False]
    assert (await store.step_for_event(step.provider_key, "acme", "evt_x2"))[1] is False
