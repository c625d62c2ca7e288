"""Multiple partial captures as pure rules (processor/payments/saga.py), and their ledger
postings applied to the ledger's own rules (an in-memory cluster of Books): whatever the
sequence of captures, voids and refunds, the merchant's pending credit is what is still
capturable and its posted credit what was captured."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.codes import AccountResult, TransferResult
from processor.payments import (
    Capture,
    Kind,
    Payment,
    PaymentError,
    PaymentsConfig,
    PaymentStatus,
    Phase,
    Step,
    capture_named,
    captures_of,
    chain_result,
    check_capture,
    check_increment,
    check_refund,
    check_void,
    clearing_account_for,
    hold_left_s,
    ledger_transfers,
    new_step,
    on_ledger,
    payment_after,
    provider_request,
    refundable_amount,
)
from processor.types import Account, AccountFlags, Transfer, TransferFlags
from tests.unit.ledger_sim import Cluster

CONFIG = PaymentsConfig()
MERCHANT = 77
BASE = CONFIG.system_id_base + 4_000
AMOUNT = 1_000
R = TransferResult


def authorized(amount: int = AMOUNT) -> Payment:
    p = Payment(id="pay_" + "b" * 24, merchant_account_id=MERCHANT, amount=amount,
                currency="USD", payment_method="pm_4242_abcdefgh",
                status=PaymentStatus.PROCESSING)
    auth = new_step(step_id=1, transfer_base=BASE, kind=Kind.AUTHORIZE, subject_id=p.id,
                    amount=amount, currency="USD", provider="acme", merchant_account_id=MERCHANT)
    return payment_after(p, msgspec.structs.replace(auth, phase=Phase.SUCCEEDED))


def started(payment: Payment, step_id: int, kind: Kind, amount: int, *, final: bool = True,
            capture_id: int = 0, timeout_s: int = 0) -> Step:
    """The step the engine would create for ``payment``, in phase APPLY."""
    s = new_step(step_id=step_id, transfer_base=BASE + 4 * step_id, kind=kind,
                 subject_id=payment.id, amount=amount, currency="USD", provider="acme",
                 merchant_account_id=MERCHANT, hold_transfer_id=payment.hold_transfer_id,
                 auth_ref="auth_1", final=final, capture_id=capture_id,
                 hold_amount=payment.capturable_amount, hold_timeout_s=timeout_s)
    return msgspec.structs.replace(s, phase=Phase.APPLY)


def done(s: Step, phase: Phase = Phase.SUCCEEDED) -> Step:
    return msgspec.structs.replace(s, phase=phase)


def test_a_partial_capture_posts_its_part_and_holds_the_rest_again_linked() -> None:
    """Not final: post the part (which releases the rest) linked to a new hold of the rest
    with the old hold's remaining time; final: the post alone."""
    p = authorized()
    clearing = clearing_account_for(CONFIG, "acme", "USD", MERCHANT)
    post, rehold = ledger_transfers(started(p, 2, Kind.CAPTURE, 300, final=False,
                                            timeout_s=5_000), CONFIG)
    assert (post.id, post.flags, post.pending_id, post.amount) == (
        BASE + 8, TransferFlags.POST_PENDING | TransferFlags.LINKED, BASE, 300)
    assert (rehold.id, rehold.flags, rehold.amount, rehold.timeout_s) == (
        BASE + 9, TransferFlags.PENDING, 700, 5_000)
    assert (rehold.debit_account_id, rehold.credit_account_id) == (clearing, MERCHANT)
    [final] = ledger_transfers(started(p, 2, Kind.CAPTURE, 300), CONFIG)
    assert (final.flags, final.amount) == (TransferFlags.POST_PENDING, 300)
    assert provider_request(started(p, 2, Kind.CAPTURE, 300, final=False)).final is False


def test_a_partial_capture_must_leave_something_held() -> None:
    """Taking all that is held is a final capture; the engine makes it one, and a step
    that says otherwise is a bug."""
    p = authorized()
    with pytest.raises(AssertionError):
        started(p, 2, Kind.CAPTURE, AMOUNT, final=False)


@pytest.mark.parametrize(("codes", "answer"), [
    ([R.ok], R.ok),
    ([R.exists, R.exists], R.exists),
    ([R.ok, R.exists], R.ok),
    ([R.pending_transfer_expired, R.linked_event_failed], R.pending_transfer_expired),
    ([R.linked_event_failed, R.exceeds_credits], R.exceeds_credits),
    ([R.linked_event_failed, R.linked_event_failed], R.linked_event_failed),
])
def test_chain_result_is_the_refusal_that_decided(codes: list[R], answer: R) -> None:
    """A linked chain's answer is its deciding refusal, never linked_event_failed when the
    real cause is there."""
    assert chain_result(codes) == answer


def test_captures_add_up_and_the_final_one_releases_the_rest() -> None:
    """Authorized 1000: 300 and 200 not final, then 100 final; statuses, what is capturable
    and which hold is current follow each capture."""
    p = authorized()
    first = started(p, 2, Kind.CAPTURE, 300, final=False)
    p = payment_after(p, done(first))
    assert (p.status, p.captured_amount, p.capturable_amount, p.hold_transfer_id) == (
        PaymentStatus.PARTIALLY_CAPTURED, 300, 700, first.transfer_id + 1)
    second = started(p, 3, Kind.CAPTURE, 200, final=False)
    assert second.hold_transfer_id == first.transfer_id + 1
    p = payment_after(p, done(second))
    assert (p.captured_amount, p.capturable_amount) == (500, 500)
    with pytest.raises(PaymentError) as err:
        check_capture(p, 501)
    assert err.value.code == "capture_exceeds_authorized"
    p = payment_after(p, done(started(p, 4, Kind.CAPTURE, 100)))
    assert (p.status, p.captured_amount, p.capturable_amount) == (
        PaymentStatus.CAPTURED, 600, 0)
    for check in (lambda: check_capture(p, 1), lambda: check_void(p)):
        with pytest.raises(PaymentError):
            check()


def test_a_void_after_a_partial_capture_releases_the_rest_and_keeps_what_was_captured() -> None:
    """The void releases what is held (its amount); the payment stays captured."""
    p = authorized()
    p = payment_after(p, done(started(p, 2, Kind.CAPTURE, 400, final=False)))
    check_void(p)
    void = started(p, 3, Kind.VOID, p.capturable_amount)
    [release] = ledger_transfers(void, CONFIG)
    assert (release.flags, release.pending_id, release.amount) == (
        TransferFlags.VOID_PENDING, BASE + 9, 600)
    p = payment_after(p, done(void))
    assert (p.status, p.captured_amount, p.capturable_amount) == (
        PaymentStatus.CAPTURED, 400, 0)
    voided = payment_after(authorized(), done(started(authorized(), 2, Kind.VOID, AMOUNT)))
    assert voided.status == PaymentStatus.VOIDED


def test_a_capture_refused_by_the_ledger_keeps_earlier_captures() -> None:
    """A later capture whose hold lapsed is compensated at the provider; the captures before
    it stand and nothing is capturable any more. With nothing captured, the payment fails
    as before."""
    p = authorized()
    p = payment_after(p, done(started(p, 2, Kind.CAPTURE, 400, final=False)))
    late = on_ledger(started(p, 3, Kind.CAPTURE, 100, final=False),
                     R.pending_transfer_expired)
    assert late.phase == Phase.COMPENSATE
    after = payment_after(p, done(late, Phase.COMPENSATED))
    assert (after.status, after.captured_amount, after.capturable_amount) == (
        PaymentStatus.CAPTURED, 400, 0)
    fresh = authorized()
    failed = payment_after(fresh, done(started(fresh, 2, Kind.CAPTURE, 100), Phase.COMPENSATED))
    assert failed.status == PaymentStatus.FAILED


def test_refunds_per_capture_never_exceed_that_capture_nor_the_payment() -> None:
    """Captures 600 and 400; a refund naming the first stops at 600, a refund of the payment
    at what is left of 1000, and both limits hold together."""
    p = authorized()
    a = started(p, 2, Kind.CAPTURE, 600, final=False)
    p = payment_after(p, done(a))
    b = started(p, 3, Kind.CAPTURE, 400)
    p = payment_after(p, done(b))
    steps = [done(a), done(b)]
    first = capture_named(steps, a.id)
    check_refund(p, 600, first)
    with pytest.raises(PaymentError) as err:
        check_refund(p, 601, first)
    assert err.value.code == "refund_exceeds_captured"
    refund = started(p, 4, Kind.REFUND, 500, capture_id=a.id)
    p = payment_after(p, done(refund))
    steps.append(done(refund))
    assert [c.refunded_amount for c in captures_of(steps)] == [500, 0]
    assert refundable_amount(p, capture_named(steps, a.id)) == 100
    # A refund of the payment as a whole, then the capture's own limit is the tighter.
    whole = started(p, 5, Kind.REFUND, 450)
    p = payment_after(p, done(whole))
    steps.append(done(whole))
    assert refundable_amount(p) == 50
    assert refundable_amount(p, capture_named(steps, b.id)) == 50
    with pytest.raises(PaymentError):
        check_refund(p, 51, capture_named(steps, b.id))


def test_only_succeeded_captures_of_the_payment_can_be_named() -> None:
    p = authorized()
    a = started(p, 2, Kind.CAPTURE, 600, final=False)
    for steps, capture_id in (([done(a, Phase.FAILED)], a.id), ([a], a.id), ([done(a)], 99)):
        with pytest.raises(PaymentError) as err:
            capture_named(steps, capture_id)
        assert err.value.code == "capture_not_found"
    assert capture_named([done(a)], a.id) == Capture(step_id=a.id, amount=600, final=False,
                                                    phase=Phase.SUCCEEDED)


def test_hold_left_is_rounded_up_and_a_lapsed_hold_is_expired() -> None:
    ns = 10**9
    hold = Transfer(id=1, debit_account_id=2, credit_account_id=3, amount=5, currency="USD",
                    flags=int(TransferFlags.PENDING), timeout_s=100, timestamp=1_000 * ns)
    assert hold_left_s(hold, 1_000.0) == 100
    assert hold_left_s(hold, 1_099.5) == 1
    assert hold_left_s(msgspec.structs.replace(hold, timeout_s=0), 9e9) == 0
    for gone, now_s in ((hold, 1_100.0), (None, 0.0)):
        with pytest.raises(PaymentError) as err:
            hold_left_s(gone, now_s)
        assert err.value.code == "authorization_expired"


# -- the postings against the ledger's own rules ------------------------------------------------

ACTIONS = st.lists(st.tuples(st.sampled_from(["capture", "final", "void", "refund"]),
                             st.integers(min_value=1, max_value=AMOUNT)), max_size=8)


def ledger_with_merchant() -> Cluster:
    cluster = Cluster(shards=2)
    clearing = clearing_account_for(CONFIG, "acme", "USD", MERCHANT)
    assert cluster.create_accounts([
        Account(id=clearing, currency="USD"),
        Account(id=MERCHANT, currency="USD",
                flags=int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS))]) == [AccountResult.ok] * 2
    return cluster


def apply(cluster: Cluster, s: Step) -> Step:
    """Run the ledger phases of ``s`` (as the engine does), twice: a replay is harmless."""
    while s.phase in (Phase.RESERVE, Phase.APPLY, Phase.RELEASE):
        transfers = ledger_transfers(s, CONFIG)
        code = chain_result(cluster.create_transfers(transfers))
        assert chain_result(cluster.create_transfers(transfers)) in (R.ok, R.exists) or (
            code not in (R.ok, R.exists))
        s = on_ledger(s, code)
        if s.phase == Phase.PROVIDER:  # a refund's hold is placed: the provider approves
            s = msgspec.structs.replace(s, phase=Phase.APPLY)
    return s


@settings(max_examples=60, deadline=None)
@given(actions=ACTIONS)
def test_any_sequence_keeps_the_ledger_equal_to_the_payment(
        actions: list[tuple[str, int]]) -> None:
    """Captures (final or not), voids and refunds in any order, each checked by the rules
    first: the merchant's pending credit is always what is capturable, its posted credit
    what was captured, its posted debit what was refunded; never more captured than
    authorized."""
    cluster = ledger_with_merchant()
    p = authorized()
    auth = new_step(step_id=1, transfer_base=BASE, kind=Kind.AUTHORIZE, subject_id=p.id,
                    amount=AMOUNT, currency="USD", provider="acme", merchant_account_id=MERCHANT)
    assert apply(cluster, msgspec.structs.replace(auth, phase=Phase.APPLY)).phase == (
        Phase.SUCCEEDED)
    for n, (action, amount) in enumerate(actions, start=2):
        try:
            if action == "void":
                check_void(p)
                s = started(p, n, Kind.VOID, p.capturable_amount)
            elif action == "refund":
                check_refund(p, amount)
                s = msgspec.structs.replace(started(p, n, Kind.REFUND, amount),
                                            phase=Phase.RESERVE)
            else:
                check_capture(p, amount)
                final = action == "final" or amount == p.capturable_amount
                hold = cluster.lookup_transfer(p.hold_transfer_id)
                timeout_s = hold_left_s(hold, cluster.now_ns / 10**9)
                s = started(p, n, Kind.CAPTURE, amount, final=final, timeout_s=timeout_s)
        except PaymentError:
            continue
        s = apply(cluster, s)
        assert s.phase == Phase.SUCCEEDED, s
        p = payment_after(p, s)
        assert p.captured_amount + p.capturable_amount <= p.amount
        debits_pending, debits_posted, credits_pending, credits_posted = cluster.balances(
            MERCHANT)
        assert (debits_pending, debits_posted, credits_pending, credits_posted) == (
            0, p.refunded_amount, p.capturable_amount, p.captured_amount)


def test_a_rehold_expires_when_the_authorization_would_have() -> None:
    """After a partial capture the rest is held for the time the hold had left (to the
    second): at the authorization's expiry the ledger releases it, and a later capture is
    refused there."""
    cluster = ledger_with_merchant()
    p = authorized()
    auth = new_step(step_id=1, transfer_base=BASE, kind=Kind.AUTHORIZE, subject_id=p.id,
                    amount=AMOUNT, currency="USD", provider="acme", merchant_account_id=MERCHANT)
    apply(cluster, msgspec.structs.replace(auth, phase=Phase.APPLY))
    cluster.advance(seconds=CONFIG.authorization_hold_s - 100)
    hold = cluster.lookup_transfer(p.hold_transfer_id)
    left_s = hold_left_s(hold, cluster.now_ns / 10**9)
    assert 100 <= left_s <= 101  # rounded up to the second: never earlier than the hold
    s = apply(cluster, started(p, 2, Kind.CAPTURE, 300, final=False, timeout_s=left_s))
    p = payment_after(p, s)
    cluster.advance(seconds=102)
    cluster.pulse()
    assert cluster.balances(MERCHANT) == (0, 0, 0, 300)
    late = apply(cluster, started(p, 3, Kind.CAPTURE, 100, final=False, timeout_s=1))
    assert late.phase == Phase.COMPENSATE


# -- incremental authorization --------------------------------------------------------------------


def test_an_increment_voids_the_hold_and_holds_the_raised_amount_linked() -> None:
    """The hold grows by a linked void of the current hold and a new hold of it plus the
    increment, keeping the time left; the payment's amount, capturable amount and hold
    follow."""
    p = authorized()
    s = started(p, 2, Kind.INCREMENT, 300, timeout_s=7_000)
    void, rehold = ledger_transfers(s, CONFIG)
    assert (void.flags, void.pending_id, void.amount) == (
        TransferFlags.VOID_PENDING | TransferFlags.LINKED, BASE, AMOUNT)
    assert (rehold.id, rehold.flags, rehold.amount, rehold.timeout_s) == (
        BASE + 9, TransferFlags.PENDING, 1_300, 7_000)
    assert provider_request(s).operation.value == "increment"
    p = payment_after(p, done(s))
    assert (p.status, p.amount, p.capturable_amount, p.hold_transfer_id) == (
        PaymentStatus.AUTHORIZED, 1_300, 1_300, BASE + 9)
    check_capture(p, 1_300)


@pytest.mark.parametrize(("case", "code"), [
    ("globex", "increment_not_supported"),
    ("globex_voided", "increment_not_supported"),
    ("voided", "payment_not_incrementable"),
    ("captured", "payment_not_incrementable"),
    ("processing", "payment_not_incrementable"),
    ("too_large", "increment_exceeds_maximum"),
])
def test_increment_refusals_in_precedence(case: str, code: str) -> None:
    """One row per refusal: an increment only where the provider offers it, only of an open
    authorization, never past 2^63 - 1."""
    p = authorized()
    voided = payment_after(p, done(started(p, 2, Kind.VOID, AMOUNT)))
    captured = payment_after(p, done(started(p, 2, Kind.CAPTURE, 100)))
    payment, amount, supported = {
        "globex": (p, 1, False), "globex_voided": (voided, 1, False),
        "voided": (voided, 1, True), "captured": (captured, 1, True),
        "processing": (msgspec.structs.replace(p, status=PaymentStatus.PROCESSING), 1, True),
        "too_large": (p, 2**63 - 1, True)}[case]
    with pytest.raises(PaymentError) as err:
        check_increment(payment, amount, supported=supported)
    assert err.value.code == code


def test_an_increment_the_ledger_refuses_fails_without_compensation() -> None:
    """No provider lowers an authorization again: a refused chain ends the step failed and
    the payment keeps its amount."""
    p = authorized()
    s = on_ledger(started(p, 2, Kind.INCREMENT, 300), R.pending_transfer_expired)
    assert (s.phase, s.error) == (Phase.FAILED, "ledger_pending_transfer_expired")
    assert payment_after(p, s) == p


@settings(max_examples=60, deadline=None)
@given(actions=st.lists(st.tuples(
    st.sampled_from(["capture", "final", "void", "refund", "increment"]),
    st.integers(min_value=1, max_value=AMOUNT)), max_size=8))
def test_increments_among_captures_keep_the_ledger_equal_to_the_payment(
        actions: list[tuple[str, int]]) -> None:
    """Increments mixed with captures, voids and refunds: the merchant's pending credit is
    still what is capturable, and captured plus capturable never exceed the authorized
    amount, which grew by every increment."""
    cluster = ledger_with_merchant()
    p = authorized()
    auth = new_step(step_id=1, transfer_base=BASE, kind=Kind.AUTHORIZE, subject_id=p.id,
                    amount=AMOUNT, currency="USD", provider="acme", merchant_account_id=MERCHANT)
    apply(cluster, msgspec.structs.replace(auth, phase=Phase.APPLY))
    increments = 0
    for n, (action, amount) in enumerate(actions, start=2):
        left_s = hold_left_s(cluster.lookup_transfer(p.hold_transfer_id), cluster.now_ns / 1e9)
        try:
            if action == "increment":
                check_increment(p, amount, supported=True)
                s = started(p, n, Kind.INCREMENT, amount, timeout_s=left_s)
            elif action == "void":
                check_void(p)
                s = started(p, n, Kind.VOID, p.capturable_amount)
            elif action == "refund":
                check_refund(p, amount)
                s = msgspec.structs.replace(started(p, n, Kind.REFUND, amount),
                                            phase=Phase.RESERVE)
            else:
                check_capture(p, amount)
                final = action == "final" or amount == p.capturable_amount
                s = started(p, n, Kind.CAPTURE, amount, final=final, timeout_s=left_s)
        except PaymentError:
            continue
        s = apply(cluster, s)
        assert s.phase == Phase.SUCCEEDED, s
        p = payment_after(p, s)
        increments += amount if action == "increment" else 0
        assert p.amount == AMOUNT + increments
        assert p.captured_amount + p.capturable_amount <= p.amount
        assert cluster.balances(MERCHANT) == (0, p.refunded_amount, p.capturable_amount,
                                              p.captured_amount)
