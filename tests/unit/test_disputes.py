"""Disputes as pure rules (processor/payments/disputes.py, saga.py), and their ledger
postings applied to the ledger's own rules (an in-memory cluster of Books): whatever the
outcome, the merchant's pending debit is what open disputes hold, its posted debit what
lost disputes took plus every decided dispute's fee, and money is never created."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.codes import AccountResult, TransferResult
from processor.payments import (
    Dispute,
    DisputeError,
    DisputeStatus,
    EvidenceRequest,
    Kind,
    Operation,
    Outcome,
    Payment,
    PaymentsConfig,
    PaymentStatus,
    Phase,
    ProviderReply,
    Step,
    chain_result,
    check_dispute_opening,
    check_evidence,
    check_evidence_allowed,
    check_refund,
    clearing_account_for,
    dispute_status_after,
    ledger_transfers,
    new_step,
    on_ledger,
    on_provider,
    provider_request,
    refundable_amount,
)
from processor.types import Account, AccountFlags, Transfer, TransferFlags
from tests.unit.ledger_sim import Cluster

CONFIG = PaymentsConfig()
MERCHANT = 77
PAYER_SIDE = 78  # pays the merchant its captured money in the model (a capture's stand-in)
BASE = CONFIG.system_id_base + 8_000
R = TransferResult


def hold_step(step_id: int, amount: int, fee: int) -> Step:
    return new_step(step_id=step_id, transfer_base=BASE + 4 * step_id, kind=Kind.DISPUTE_HOLD,
                    subject_id="dp_" + "a" * 24, amount=amount, currency="USD",
                    provider="acme", merchant_account_id=MERCHANT, hold_amount=fee)


def outcome_step(step_id: int, hold: Step, won: bool) -> Step:
    return new_step(step_id=step_id, transfer_base=BASE + 4 * step_id,
                    kind=Kind.DISPUTE_WON if won else Kind.DISPUTE_LOST,
                    subject_id=hold.subject_id, amount=hold.amount, currency="USD",
                    provider="acme", merchant_account_id=MERCHANT,
                    hold_amount=hold.hold_amount, hold_transfer_id=hold.transfer_id)


def test_dispute_steps_start_at_the_ledger_and_evidence_at_the_provider() -> None:
    hold = hold_step(1, 500, 15)
    assert hold.phase == Phase.APPLY
    evidence = new_step(step_id=2, transfer_base=BASE + 8, kind=Kind.DISPUTE_EVIDENCE,
                        subject_id=hold.subject_id, amount=500, currency="USD",
                        provider="acme", merchant_account_id=MERCHANT, auth_ref="dp_x")
    assert evidence.phase == Phase.PROVIDER
    request = provider_request(evidence)
    assert (request.operation, request.provider_ref) == (Operation.DISPUTE_EVIDENCE, "dp_x")
    assert ledger_transfers(evidence, CONFIG) == []
    # Evidence moves no money: the provider's acceptance ends the step.
    assert on_provider(evidence, ProviderReply(outcome=Outcome.APPROVED)).phase == (
        Phase.SUCCEEDED)
    assert on_provider(evidence, ProviderReply(outcome=Outcome.DECLINED)).phase == Phase.FAILED
    with pytest.raises(AssertionError):  # an outcome resolves the holds it names
        new_step(step_id=3, transfer_base=BASE + 12, kind=Kind.DISPUTE_LOST,
                 subject_id=hold.subject_id, amount=500, currency="USD", provider="acme",
                 merchant_account_id=MERCHANT, hold_amount=15)


def test_holds_are_pending_linked_merchant_to_clearing_without_timeout() -> None:
    hold = hold_step(1, 500, 15)
    clearing = clearing_account_for(CONFIG, "acme", "USD", MERCHANT)
    amount, fee = ledger_transfers(hold, CONFIG)
    assert (amount.id, amount.flags, amount.amount, amount.timeout_s) == (
        BASE + 4, TransferFlags.PENDING | TransferFlags.LINKED, 500, 0)
    assert (fee.id, fee.flags, fee.amount) == (BASE + 5, TransferFlags.PENDING, 15)
    for t in (amount, fee):
        assert (t.debit_account_id, t.credit_account_id) == (MERCHANT, clearing)
    lost_amount, lost_fee = ledger_transfers(outcome_step(2, hold, won=False), CONFIG)
    assert (lost_amount.flags, lost_amount.pending_id, lost_fee.flags, lost_fee.pending_id) == (
        TransferFlags.POST_PENDING | TransferFlags.LINKED, BASE + 4,
        TransferFlags.POST_PENDING, BASE + 5)
    won_amount, won_fee = ledger_transfers(outcome_step(2, hold, won=True), CONFIG)
    assert (won_amount.flags, won_fee.flags) == (
        TransferFlags.VOID_PENDING | TransferFlags.LINKED, TransferFlags.POST_PENDING)
    assert {won_amount.id, won_fee.id} == {BASE + 8, BASE + 9}  # the outcome step's own ids
    # No fee: one transfer, unlinked.
    [only] = ledger_transfers(hold_step(1, 500, 0), CONFIG)
    assert only.flags == TransferFlags.PENDING


def payment(captured: int, refunded: int = 0) -> Payment:
    return Payment(id="pay_" + "c" * 24, merchant_account_id=MERCHANT, amount=1_000,
                   currency="USD", payment_method="pm_4242_abcdefgh",
                   status=PaymentStatus.CAPTURED if captured else PaymentStatus.AUTHORIZED,
                   captured_amount=captured, refunded_amount=refunded,
                   capturable_amount=0 if captured else 1_000)


@pytest.mark.parametrize(("captured", "refunded", "disputed", "amount", "code"), [
    (0, 0, 0, 100, "dispute_payment_not_captured"),
    (1_000, 0, 0, 1_001, "dispute_exceeds_captured"),
    (1_000, 400, 0, 601, "dispute_exceeds_captured"),
    (1_000, 400, 500, 101, "dispute_exceeds_captured"),
    (1_000, 0, 0, 0, "dispute_exceeds_captured"),
])
def test_a_dispute_never_takes_more_than_captured_minus_refunded(
        captured: int, refunded: int, disputed: int, amount: int, code: str) -> None:
    with pytest.raises(DisputeError) as caught:
        check_dispute_opening(captured=captured, refunded=refunded, disputed=disputed,
                              amount=amount, fee=15)
    assert caught.value.code == code
    check_dispute_opening(captured=1_000, refunded=400, disputed=500, amount=100, fee=0)


def test_what_disputes_hold_is_not_refundable() -> None:
    p = payment(1_000, 200)
    assert refundable_amount(p, disputed=500) == 300
    check_refund(p, 300, disputed=500)
    with pytest.raises(Exception) as caught:
        check_refund(p, 301, disputed=500)
    assert getattr(caught.value, "code", "") == "refund_exceeds_captured"


def test_statuses_move_forward_and_a_decision_stays() -> None:
    N, U, W, L = (DisputeStatus.NEEDS_RESPONSE, DisputeStatus.UNDER_REVIEW, DisputeStatus.WON,
                  DisputeStatus.LOST)
    assert dispute_status_after(N, "under_review") == U
    assert dispute_status_after(N, "lost") == L
    assert dispute_status_after(U, "won") == W
    assert dispute_status_after(U, "under_review") is None
    assert dispute_status_after(U, "needs_response") is None
    assert dispute_status_after(W, "lost") is None
    assert dispute_status_after(L, "won") is None
    assert dispute_status_after(N, "escalated") is None


def test_evidence_is_bounded_and_taken_once() -> None:
    assert check_evidence(EvidenceRequest(text="receipt", files=["doc_1"])).files == ["doc_1"]
    for bad in (EvidenceRequest(text="  "), EvidenceRequest(text="x" * 20_001),
                EvidenceRequest(text="a\x00b"), EvidenceRequest(text="t", files=["f"] * 11),
                EvidenceRequest(text="t", files=[""]), EvidenceRequest(text="t", files=["a\nb"])):
        with pytest.raises(DisputeError) as caught:
            check_evidence(bad)
        assert caught.value.code == "invalid_evidence"
    dispute = Dispute(id="dp_" + "a" * 24, payment_id="pay_x", provider="acme",
                      provider_dispute_id="dp_1", merchant_account_id=MERCHANT, amount=1,
                      fee=0, currency="USD", status=DisputeStatus.NEEDS_RESPONSE)
    check_evidence_allowed(dispute)
    for status in (DisputeStatus.UNDER_REVIEW, DisputeStatus.WON, DisputeStatus.LOST):
        with pytest.raises(DisputeError):
            check_evidence_allowed(msgspec.structs.replace(dispute, status=status))


# -- the postings against the ledger's own rules ---------------------------------------------


def funded_ledger(captured: int) -> Cluster:
    """A merchant that may not go below zero, credited ``captured`` (posted) as a capture
    would have done it, and the provider's clearing account."""
    cluster = Cluster(shards=2)
    clearing = clearing_account_for(CONFIG, "acme", "USD", MERCHANT)
    assert cluster.create_accounts([
        Account(id=clearing, currency="USD"), Account(id=PAYER_SIDE, currency="USD"),
        Account(id=MERCHANT, currency="USD",
                flags=int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS))]) == [AccountResult.ok] * 3
    assert cluster.create_transfers([Transfer(
        id=BASE, debit_account_id=PAYER_SIDE, credit_account_id=MERCHANT, amount=captured,
        currency="USD")]) == [R.ok]
    return cluster


def apply(cluster: Cluster, s: Step) -> Step:
    """Run the step's ledger phase (as the engine does), twice: a replay is harmless."""
    transfers = ledger_transfers(s, CONFIG)
    codes = cluster.create_transfers(transfers)
    again = cluster.create_transfers(transfers)
    if all(c in (R.ok, R.exists) for c in codes):
        assert set(again) == {R.exists}
    else:  # a refused chain stays refused: nothing of it applies on a replay
        assert R.ok not in again
    return on_ledger(s, chain_result(codes))


def available(cluster: Cluster) -> int:
    debits_pending, debits_posted, _, credits_posted = cluster.balances(MERCHANT)
    return int(credits_posted - debits_posted - debits_pending)


@settings(max_examples=60, deadline=None)
@given(captured=st.integers(1, 5_000), data=st.data())
def test_every_dispute_sequence_keeps_the_books(captured: int, data: st.DataObject) -> None:
    """Open up to three disputes within what was captured, decide each won, lost or not at
    all: the merchant's pending debit is what the open ones hold (amount and fee), its
    posted debit the lost amounts plus the decided fees, the clearing account's credits
    mirror them, and the sum of all balances stays zero."""
    cluster = funded_ledger(captured)
    clearing = clearing_account_for(CONFIG, "acme", "USD", MERCHANT)
    left = captured
    open_holds: list[Step] = []
    step_id = 1
    for _ in range(data.draw(st.integers(1, 3))):
        if left == 0:
            break
        amount = data.draw(st.integers(1, left))
        fee = data.draw(st.integers(0, 40))
        hold = apply(cluster, hold_step(step_id, amount, fee))
        step_id += 1
        if hold.phase == Phase.FAILED:  # the merchant cannot cover amount and fee
            assert amount + fee > available(cluster) or hold.error.startswith("ledger_")
            continue
        assert hold.phase == Phase.SUCCEEDED
        left -= amount
        open_holds.append(hold)
    pending = sum(h.amount + h.hold_amount for h in open_holds)
    assert cluster.balances(MERCHANT)[0] == pending
    assert available(cluster) == captured - pending
    posted = 0
    for hold in open_holds:
        verdict = data.draw(st.sampled_from(["won", "lost", "open"]))
        if verdict == "open":
            continue
        done = apply(cluster, outcome_step(step_id, hold, won=verdict == "won"))
        step_id += 1
        assert done.phase == Phase.SUCCEEDED
        pending -= hold.amount + hold.hold_amount
        posted += hold.hold_amount + (hold.amount if verdict == "lost" else 0)
    debits_pending, debits_posted, credits_pending, credits_posted = cluster.balances(MERCHANT)
    assert (debits_pending, debits_posted, credits_pending, credits_posted) == (
        pending, posted, 0, captured)
    assert cluster.balances(clearing) == (0, 0, pending, posted)
    total = sum(cp - dp for _, dp, _, cp in (cluster.balances(a)
                                              for a in (MERCHANT, clearing, PAYER_SIDE)))
    assert total == 0


def test_a_decided_hold_cannot_be_resolved_twice() -> None:
    """A second outcome of the same holds (another step's ids) is refused by the ledger:
    a dispute's money leaves the merchant at most once."""
    cluster = funded_ledger(1_000)
    hold = apply(cluster, hold_step(1, 600, 15))
    assert apply(cluster, outcome_step(2, hold, won=False)).phase == Phase.SUCCEEDED
    again = apply(cluster, outcome_step(3, hold, won=True))
    assert (again.phase, again.error.startswith("ledger_")) == (Phase.FAILED, True)
    assert cluster.balances(MERCHANT)[:2] == (0, 615)


def test_a_merchant_that_cannot_cover_the_hold_fails_it() -> None:
    cluster = funded_ledger(100)
    failed = apply(cluster, hold_step(1, 100, 15))
    assert (failed.phase, failed.error) == (Phase.FAILED, "ledger_exceeds_credits")
    assert cluster.balances(MERCHANT)[:2] == (0, 0)
