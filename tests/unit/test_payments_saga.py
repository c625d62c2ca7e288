"""The saga state machine of payment steps (processor/payments/saga.py), as pure code."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.codes import TransferResult
from processor.payments import (
    EVENT_INERT_PHASES,
    FEE_ACCOUNT_OFFSET,
    DeclineCode,
    Kind,
    Operation,
    Outcome,
    Payment,
    PaymentError,
    PaymentsConfig,
    PaymentStatus,
    Phase,
    ProviderReply,
    Step,
    check_capture,
    check_refund,
    check_void,
    clearing_account_for,
    clearing_account_id,
    clearing_accounts_of,
    compensation_request,
    ledger_transfers,
    new_step,
    on_ledger,
    on_provider,
    on_status,
    payment_after,
    provider_request,
)
from processor.service import PLACEMENTS, placement_of
from processor.types import TransferFlags

CONFIG = PaymentsConfig()
MERCHANT = 77


def step(kind: Kind = Kind.AUTHORIZE, **changes: object) -> Step:
    s = new_step(step_id=9, transfer_base=CONFIG.system_id_base + 400, kind=kind,
                 subject_id="pay_" + "a" * 24, amount=1000, currency="USD", provider="acme",
                 merchant_account_id=MERCHANT, payment_method="pm_4242_abcdefgh",
                 hold_transfer_id=CONFIG.system_id_base + 100, auth_ref="auth_1",
                 hold_amount=2_000)
    return msgspec.structs.replace(s, **changes) if changes else s


def reply(outcome: Outcome, **kw: object) -> ProviderReply:
    return ProviderReply(outcome=outcome, **kw)  # type: ignore[arg-type]


def test_authorize_starts_at_the_provider_and_refund_payout_start_by_holding_funds() -> None:
    assert step(Kind.AUTHORIZE).phase == Phase.PROVIDER
    assert step(Kind.CAPTURE).phase == Phase.PROVIDER
    assert step(Kind.VOID).phase == Phase.PROVIDER
    assert step(Kind.REFUND).phase == Phase.RESERVE
    assert step(Kind.PAYOUT).phase == Phase.RESERVE


def test_new_step_refuses_a_non_positive_amount() -> None:
    with pytest.raises(PaymentError) as err:
        new_step(step_id=1, transfer_base=1, kind=Kind.AUTHORIZE, subject_id="p", amount=0,
                 currency="USD", provider="acme", merchant_account_id=1)
    assert err.value.code == "amount_must_be_positive"


def test_provider_request_carries_the_step_key_and_the_authorization_ref() -> None:
    r = provider_request(step(Kind.CAPTURE))
    assert r.operation == Operation.CAPTURE
    assert r.idempotency_key == "txp-9-acme"
    assert r.provider_ref == "auth_1"
    assert r.amount == 1000


@pytest.mark.parametrize(("outcome", "phase"), [
    (Outcome.APPROVED, Phase.APPLY),
    (Outcome.PENDING, Phase.AWAIT_PROVIDER),
    (Outcome.UNKNOWN, Phase.RESOLVE),
    (Outcome.DECLINED, Phase.RELEASE),
    (Outcome.FAILED, Phase.RELEASE),
    (Outcome.RETRYABLE, Phase.RELEASE),
])
def test_authorize_after_each_provider_outcome(outcome: Outcome, phase: Phase) -> None:
    """Whatever ends an authorization without an approval releases the hold that may have
    been posted while the provider was asked."""
    after = on_provider(step(), reply(outcome, provider_ref="auth_9"))
    assert after.phase == phase


def test_a_declined_authorization_records_the_decline_code() -> None:
    after = on_provider(step(), reply(Outcome.DECLINED,
                                      decline_code=DeclineCode.INSUFFICIENT_FUNDS))
    assert (after.phase, after.error, after.decline_code) == (
        Phase.RELEASE, "provider_declined", "insufficient_funds")
    # The release ends it, keeping the provider's reason whatever the ledger answered.
    for code in (TransferResult.ok, TransferResult.pending_transfer_not_found,
                 TransferResult.credit_account_not_found):
        done = on_ledger(after, code)
        assert (done.phase, done.error, done.decline_code) == (
            Phase.FAILED, "provider_declined", "insufficient_funds")


def test_failover_only_when_nothing_happened_and_with_a_new_key() -> None:
    s = step()
    moved = on_provider(s, reply(Outcome.RETRYABLE), failover=["acme", "globex"])
    assert (moved.phase, moved.provider, moved.provider_key) == (
        Phase.PROVIDER, "globex", "txp-9-globex")
    assert moved.tried == ("acme", "globex")
    # Both tried: the payment fails fast with a retryable error instead of looping.
    assert on_provider(moved, reply(Outcome.RETRYABLE), failover=["acme", "globex"]).error == (
        "provider_unavailable")
    # An unknown outcome never fails over: the first provider may have charged.
    assert on_provider(s, reply(Outcome.UNKNOWN), failover=["acme", "globex"]).phase == (
        Phase.RESOLVE)


def test_captures_never_fail_over() -> None:
    after = on_provider(step(Kind.CAPTURE), reply(Outcome.RETRYABLE), failover=["globex"])
    assert (after.phase, after.provider) == (Phase.FAILED, "acme")


@pytest.mark.parametrize("kind", [Kind.REFUND, Kind.PAYOUT])
def test_refused_refunds_and_payouts_release_their_hold(kind: Kind) -> None:
    s = step(kind, phase=Phase.PROVIDER)
    assert on_provider(s, reply(Outcome.DECLINED)).phase == Phase.RELEASE
    assert on_provider(s, reply(Outcome.RETRYABLE)).phase == Phase.RELEASE
    released = on_ledger(msgspec.structs.replace(s, phase=Phase.RELEASE), TransferResult.ok)
    assert released.phase == Phase.FAILED


def test_resolve_sends_again_only_when_the_provider_never_saw_the_call() -> None:
    s = step(phase=Phase.RESOLVE)
    not_found = reply(Outcome.DECLINED, decline_code=DeclineCode.NOT_FOUND)
    assert on_status(s, not_found).phase == Phase.PROVIDER
    assert on_status(s, reply(Outcome.UNKNOWN)) == s
    assert on_status(s, reply(Outcome.RETRYABLE)) == s
    assert on_status(s, reply(Outcome.APPROVED, provider_ref="a")).phase == Phase.APPLY
    assert on_status(s, reply(Outcome.DECLINED)).phase == Phase.RELEASE
    assert on_status(step(Kind.CAPTURE, phase=Phase.RESOLVE),
                     reply(Outcome.DECLINED)).phase == Phase.FAILED


def test_await_provider_waits_through_pending_and_not_found() -> None:
    s = step(Kind.CAPTURE, phase=Phase.AWAIT_PROVIDER)
    assert on_status(s, reply(Outcome.PENDING)) == s
    assert on_status(s, reply(Outcome.DECLINED, decline_code=DeclineCode.NOT_FOUND)) == s
    assert on_status(s, reply(Outcome.APPROVED)).phase == Phase.APPLY


def test_late_answers_about_a_finished_step_change_nothing() -> None:
    for phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.COMPENSATED, Phase.APPLY):
        s = step(phase=phase)
        assert on_status(s, reply(Outcome.DECLINED)) == s
        assert on_status(s, reply(Outcome.APPROVED)) == s


@given(st.sampled_from(sorted(EVENT_INERT_PHASES)), st.sampled_from(list(Kind)),
       st.sampled_from(list(Outcome)), st.sampled_from(["", *DeclineCode]))
def test_no_provider_event_moves_a_step_in_an_inert_phase(
        phase: Phase, kind: Kind, outcome: Outcome, decline_code: str) -> None:
    """The store remembers an event about a step in EVENT_INERT_PHASES without asking the
    engine (one statement): that is right only if no answer could have moved it."""
    s = step(kind, phase=phase)
    assert on_status(s, reply(outcome, decline_code=decline_code)) == s
    # The phases an event may move, or that ask the provider to send it again, are not.
    assert not EVENT_INERT_PHASES & {Phase.PROVIDER, Phase.AWAIT_PROVIDER, Phase.RESOLVE,
                                     Phase.COMPENSATE, Phase.RESERVE}


def test_ledger_postings_of_each_step() -> None:
    base = CONFIG.system_id_base + 400
    clearing = clearing_account_for(CONFIG, "acme", "USD", MERCHANT)
    [auth] = ledger_transfers(step(phase=Phase.APPLY), CONFIG)
    assert (auth.id, auth.debit_account_id, auth.credit_account_id, auth.flags) == (
        base, clearing, MERCHANT, TransferFlags.PENDING)
    assert auth.timeout_s == CONFIG.authorization_hold_s
    [cap] = ledger_transfers(step(Kind.CAPTURE, phase=Phase.APPLY, amount=600), CONFIG)
    assert (cap.flags, cap.pending_id, cap.amount) == (
        TransferFlags.POST_PENDING, CONFIG.system_id_base + 100, 600)
    [void] = ledger_transfers(step(Kind.VOID, phase=Phase.APPLY), CONFIG)
    # A void names the whole hold: the ledger refuses any other amount.
    assert (void.flags, void.pending_id, void.amount) == (
        TransferFlags.VOID_PENDING, CONFIG.system_id_base + 100, 1000)
    [hold] = ledger_transfers(step(Kind.REFUND), CONFIG)
    assert (hold.id, hold.debit_account_id, hold.credit_account_id, hold.flags) == (
        base, MERCHANT, clearing, TransferFlags.PENDING)
    [post] = ledger_transfers(step(Kind.REFUND, phase=Phase.APPLY), CONFIG)
    assert (post.id, post.flags, post.pending_id) == (base + 1, TransferFlags.POST_PENDING, base)
    [release] = ledger_transfers(step(Kind.PAYOUT, phase=Phase.RELEASE), CONFIG)
    assert (release.id, release.flags, release.pending_id, release.amount) == (
        base + 2, TransferFlags.VOID_PENDING, base, 1000)
    for phase in (Phase.PROVIDER, Phase.RESOLVE, Phase.AWAIT_PROVIDER, Phase.SUCCEEDED):
        assert ledger_transfers(step(phase=phase), CONFIG) == []


def test_every_posting_names_the_request_that_started_its_step() -> None:
    """A step's transfers carry its ``origin`` (the front then stamps no record of its own
    when it wrote that one); a step without one (the recovery worker's, a webhook's) sends
    none, and the front records the posting itself."""
    cases = [step(phase=Phase.APPLY), step(Kind.CAPTURE, phase=Phase.APPLY, final_capture=False),
             step(Kind.INCREMENT, phase=Phase.APPLY), step(Kind.REFUND),
             step(Kind.PAYOUT, phase=Phase.RELEASE)]
    for s in cases:
        with_origin = ledger_transfers(msgspec.structs.replace(s, origin=77), CONFIG)
        assert with_origin and all(t.origin == 77 for t in with_origin)
        assert [msgspec.structs.replace(t, origin=0) for t in with_origin] == \
            ledger_transfers(s, CONFIG)
        assert all(t.origin == 0 for t in ledger_transfers(s, CONFIG))


def test_clearing_accounts_are_distinct_per_provider_and_currency_and_system_range() -> None:
    ids = {clearing_account_id(CONFIG, p, c) for p in CONFIG.provider_order
           for c in ("USD", "EUR", "GBP", "JPY", "ZZZ", "AAA")}
    assert len(ids) == 2 * 6
    assert all(CONFIG.system_id_base <= i < 2**63 for i in ids)


def test_every_posting_of_a_step_stays_in_its_merchant_accounts_placement() -> None:
    """With clearing accounts per placement (the default), each posting's two accounts are
    in one ledger placement, so no payment posting crosses shards or databases; with the
    layout off (a ledger that already had payments), the provider's one account, as before."""
    for merchant in (77, 78, 2**40 + 5, 2**61):
        for kind, phase in ((Kind.AUTHORIZE, Phase.APPLY), (Kind.REFUND, Phase.RESERVE),
                            (Kind.PAYOUT, Phase.RESERVE), (Kind.VOID, Phase.APPLY)):
            s = msgspec.structs.replace(step(kind, phase=phase), merchant_account_id=merchant)
            for t in ledger_transfers(s, CONFIG):
                assert placement_of(t.debit_account_id) == placement_of(t.credit_account_id)
                assert t.debit_account_id in clearing_accounts_of(
                    CONFIG.system_id_base, "acme", "USD") or t.credit_account_id in (
                    clearing_accounts_of(CONFIG.system_id_base, "acme", "USD"))
    one = msgspec.structs.replace(CONFIG, clearing_per_partition=False)
    [auth] = ledger_transfers(step(phase=Phase.APPLY), one)
    assert auth.debit_account_id == clearing_account_id(one, "acme", "USD")


@given(st.sampled_from(("acme", "globex", "a", "provider-with-a-long-name")),
       st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=3),
       st.integers(1, 2**62 - 1))
def test_clearing_accounts_per_placement_cover_every_placement_in_their_own_range(
        provider: str, currency: str, merchant: int) -> None:
    """One account per placement, each in that placement; all above the clearing and fee
    accounts and below the transit accounts (processor/ledger/transit.py); the merchant's
    is the one of its placement."""
    ids = clearing_accounts_of(CONFIG.system_id_base, provider, currency)
    assert len(ids) == PLACEMENTS == len(set(ids))
    assert [placement_of(i) for i in ids] == list(range(PLACEMENTS))
    main = clearing_account_id(CONFIG, provider, currency)
    assert all(main + FEE_ACCOUNT_OFFSET < CONFIG.system_id_base + 2**58 <= i
               < CONFIG.system_id_base + 2**60 for i in ids)
    mine = clearing_account_for(CONFIG, provider, currency, merchant)
    assert mine == ids[placement_of(merchant)]


def test_clearing_accounts_per_placement_differ_between_providers_and_currencies() -> None:
    sets = [set(clearing_accounts_of(CONFIG.system_id_base, p, c))
            for p in ("acme", "globex") for c in ("USD", "EUR", "GBP")]
    assert len(set().union(*sets)) == PLACEMENTS * len(sets)


def test_ledger_refusal_of_an_approved_authorization_is_compensated_at_the_provider() -> None:
    s = step(phase=Phase.APPLY, provider_ref="auth_7")
    after = on_ledger(s, TransferResult.credit_account_not_found)
    assert (after.phase, after.error) == (Phase.COMPENSATE, "ledger_credit_account_not_found")
    undo = compensation_request(after)
    assert (undo.operation, undo.provider_ref, undo.idempotency_key) == (
        Operation.VOID, "auth_7", "txp-9-acme-undo")
    assert on_status(after, reply(Outcome.APPROVED)).phase == Phase.COMPENSATED
    assert on_status(after, reply(Outcome.UNKNOWN)) == after
    refused = on_status(after, reply(Outcome.DECLINED))
    assert (refused.phase, refused.error) == (Phase.FAILED, "compensation_refused")


def test_a_capture_the_ledger_refuses_is_refunded_at_the_provider() -> None:
    after = on_ledger(step(Kind.CAPTURE, phase=Phase.APPLY),
                      TransferResult.pending_transfer_expired)
    assert after.phase == Phase.COMPENSATE
    assert compensation_request(after).operation == Operation.REFUND


def test_a_void_of_an_expired_hold_is_done() -> None:
    s = step(Kind.VOID, phase=Phase.APPLY)
    assert on_ledger(s, TransferResult.pending_transfer_expired).phase == Phase.SUCCEEDED
    assert on_ledger(s, TransferResult.exists).phase == Phase.SUCCEEDED


def test_a_refund_the_merchant_cannot_cover_fails_before_the_provider_is_asked() -> None:
    after = on_ledger(step(Kind.REFUND), TransferResult.exceeds_credits)
    assert (after.phase, after.error) == (Phase.FAILED, "ledger_exceeds_credits")


def test_payment_status_follows_its_steps() -> None:
    p = Payment(id="pay_x", merchant_account_id=MERCHANT, amount=1000, currency="USD",
                payment_method="pm_x", status=PaymentStatus.PROCESSING)
    auth = step(phase=Phase.SUCCEEDED, provider_ref="auth_1")
    p = payment_after(p, auth)
    assert (p.status, p.provider_ref, p.hold_transfer_id) == (
        PaymentStatus.AUTHORIZED, "auth_1", auth.transfer_id)
    check_capture(p, 1000)
    check_void(p)
    with pytest.raises(PaymentError):
        check_refund(p, 1)
    p = payment_after(p, step(Kind.CAPTURE, phase=Phase.SUCCEEDED, amount=700))
    assert (p.status, p.captured_amount) == (PaymentStatus.CAPTURED, 700)
    with pytest.raises(PaymentError) as err:
        check_refund(p, 701)
    assert err.value.code == "refund_exceeds_captured"
    p = payment_after(p, step(Kind.REFUND, phase=Phase.SUCCEEDED, amount=200))
    assert (p.status, p.refunded_amount) == (PaymentStatus.PARTIALLY_REFUNDED, 200)
    p = payment_after(p, step(Kind.REFUND, phase=Phase.FAILED, amount=500))
    assert p.refunded_amount == 200
    p = payment_after(p, step(Kind.REFUND, phase=Phase.SUCCEEDED, amount=500))
    assert (p.status, p.refunded_amount) == (PaymentStatus.REFUNDED, 700)
    with pytest.raises(PaymentError) as err:
        check_capture(p, 1)
    assert err.value.code == "payment_not_capturable"


def test_declined_and_failed_authorizations() -> None:
    p = Payment(id="pay_x", merchant_account_id=MERCHANT, amount=1000, currency="USD",
                payment_method="pm_x", status=PaymentStatus.PROCESSING)
    declined = on_provider(step(), reply(Outcome.DECLINED))
    assert payment_after(p, declined) == p  # not final until its hold is released
    declined = on_ledger(declined, TransferResult.ok)
    assert payment_after(p, declined).status == PaymentStatus.DECLINED
    unavailable = on_ledger(on_provider(step(), reply(Outcome.RETRYABLE)), TransferResult.ok)
    assert payment_after(p, unavailable).status == PaymentStatus.FAILED
    assert payment_after(p, step(phase=Phase.RESOLVE)) == p


OUTCOMES = st.sampled_from(list(Outcome))
CODES = st.sampled_from([TransferResult.ok, TransferResult.exists,
                         TransferResult.exceeds_credits,
                         TransferResult.pending_transfer_expired,
                         TransferResult.credit_account_not_found])


@given(kind=st.sampled_from(list(Kind)),
       events=st.lists(st.tuples(OUTCOMES, CODES, st.booleans()), max_size=30))
def test_any_sequence_of_answers_only_moves_forward_and_keeps_keys(
        kind: Kind, events: list[tuple[Outcome, TransferResult, bool]]) -> None:
    """Whatever providers and the ledger answer, a step keeps its ledger ids, never leaves a
    final phase, and sends a new provider key only on failover of an authorization."""
    s = step(kind)
    for outcome, code, as_status in events:
        before = s
        if s.final:
            assert on_status(s, reply(outcome)) == s
            continue
        if s.phase in (Phase.RESERVE, Phase.APPLY, Phase.RELEASE):
            s = on_ledger(s, code)
        elif as_status or s.phase in (Phase.RESOLVE, Phase.AWAIT_PROVIDER, Phase.COMPENSATE):
            s = on_status(s, reply(outcome))
        else:
            s = on_provider(s, reply(outcome), failover=["acme", "globex"])
        assert s.transfer_id == before.transfer_id
        if s.provider_key != before.provider_key:
            assert kind == Kind.AUTHORIZE and outcome == Outcome.RETRYABLE
            assert s.provider not in before.tried
        if before.phase == Phase.APPLY and s.phase == Phase.COMPENSATE:
            assert kind in (Kind.AUTHORIZE, Kind.CAPTURE)
