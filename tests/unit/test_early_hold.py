"""An authorization's hold posted while its provider is asked (processor/payments/saga.py,
``holds_early``), as pure rules, and applied to the ledger's own rules (an in-memory cluster
of Books): whatever the providers answer, in whatever order the early posting, its replays
and the step's own postings reach the ledger, an approved authorization leaves exactly one
open hold of its amount from the approving provider's clearing account, and any other end
leaves none."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.codes import AccountResult, TransferResult
from processor.payments import (
    Kind,
    Outcome,
    Payment,
    PaymentsConfig,
    PaymentStatus,
    Phase,
    ProviderReply,
    Step,
    authorization_hold_id,
    clearing_account_for,
    early_transfers,
    holds_early,
    ledger_transfers,
    new_step,
    on_ledger,
    on_provider,
    on_status,
    payment_after,
    step_result,
)
from processor.types import Account, AccountFlags, TransferFlags
from tests.unit.ledger_sim import Cluster

CONFIG = PaymentsConfig()
MERCHANT = 77
BASE = CONFIG.system_id_base + 8_000
AMOUNT = 1_000
PROVIDERS = ["acme", "globex"]
R = TransferResult


def authorization(**changes: object) -> Step:
    s = new_step(step_id=5, transfer_base=BASE, kind=Kind.AUTHORIZE, subject_id="pay_" + "c" * 24,
                 amount=AMOUNT, currency="USD", provider="acme", merchant_account_id=MERCHANT,
                 payment_method="pm_4242_abcdefgh", origin=31)
    return msgspec.structs.replace(s, **changes) if changes else s


def failed_over() -> Step:
    s = on_provider(authorization(), ProviderReply(outcome=Outcome.RETRYABLE), PROVIDERS)
    assert (s.phase, s.provider, s.tried) == (Phase.PROVIDER, "globex", ("acme", "globex"))
    return s


def test_only_an_authorization_at_its_first_provider_holds_early() -> None:
    assert holds_early(authorization())
    assert not holds_early(failed_over())
    for phase in (Phase.RESOLVE, Phase.AWAIT_PROVIDER, Phase.APPLY, Phase.RELEASE):
        assert not holds_early(authorization(phase=phase))
    capture = new_step(step_id=6, transfer_base=BASE + 4, kind=Kind.CAPTURE, subject_id="p",
                       amount=10, currency="USD", provider="acme", merchant_account_id=MERCHANT,
                       hold_transfer_id=BASE, hold_amount=AMOUNT)
    assert not holds_early(capture)
    with pytest.raises(AssertionError):
        early_transfers(failed_over(), CONFIG)


def test_the_early_hold_is_what_the_first_providers_approval_posts() -> None:
    s = authorization()
    [early] = early_transfers(s, CONFIG)
    approved = on_provider(s, ProviderReply(outcome=Outcome.APPROVED, provider_ref="a_1"))
    assert ledger_transfers(approved, CONFIG) == [early]
    assert (early.id, early.debit_account_id, early.credit_account_id, early.amount,
            early.flags, early.timeout_s, early.origin) == (
        BASE, clearing_account_for(CONFIG, "acme", "USD", MERCHANT), MERCHANT, AMOUNT,
        TransferFlags.PENDING, CONFIG.authorization_hold_s, 31)
    assert authorization_hold_id(approved) == BASE
    done = on_ledger(approved, step_result(approved, [R.exists]))
    p = Payment(id=s.subject_id, merchant_account_id=MERCHANT, amount=AMOUNT, currency="USD",
                payment_method="pm_4242_abcdefgh", status=PaymentStatus.PROCESSING)
    assert payment_after(p, done).hold_transfer_id == BASE


def test_a_release_posts_the_first_hold_then_voids_it() -> None:
    declined = on_provider(authorization(), ProviderReply(outcome=Outcome.DECLINED))
    hold, void = ledger_transfers(declined, CONFIG)
    assert hold == early_transfers(authorization(), CONFIG)[0]
    assert (void.id, void.flags, void.pending_id, void.amount, void.debit_account_id,
            void.credit_account_id, void.timeout_s) == (
        BASE + 2, TransferFlags.VOID_PENDING, BASE, AMOUNT, hold.debit_account_id, MERCHANT, 0)


def test_an_approval_after_failover_holds_at_the_second_id_and_releases_the_first() -> None:
    s = failed_over()
    approved = on_provider(s, ProviderReply(outcome=Outcome.APPROVED, provider_ref="g_1"))
    new, first, void = ledger_transfers(approved, CONFIG)
    assert (new.id, new.debit_account_id, new.flags) == (
        BASE + 1, clearing_account_for(CONFIG, "globex", "USD", MERCHANT), TransferFlags.PENDING)
    assert first.debit_account_id == clearing_account_for(CONFIG, "acme", "USD", MERCHANT)
    assert (first.id, void.id, void.pending_id) == (BASE, BASE + 2, BASE)
    assert authorization_hold_id(approved) == BASE + 1
    # The approving hold decides; the release that follows it does not.
    assert step_result(approved, [R.ok, R.exists, R.pending_transfer_already_voided]) == R.ok
    assert step_result(approved, [R.exceeds_credits, R.ok, R.ok]) == R.exceeds_credits


# -- the property: any answers, any delivery order of the postings -------------------------

ANSWERS = st.sampled_from([Outcome.APPROVED, Outcome.DECLINED, Outcome.FAILED,
                           Outcome.RETRYABLE, Outcome.UNKNOWN, Outcome.PENDING])
# What becomes of each early posting: applied before the provider answers, applied only
# after the step ended (it was held up in a lane), applied twice, or lost.
EARLY_FATE = st.sampled_from(["before", "after", "twice", "lost"])


def ledger(per_partition: bool) -> tuple[Cluster, PaymentsConfig]:
    config = msgspec.structs.replace(CONFIG, clearing_per_partition=per_partition)
    cluster = Cluster(shards=2)
    accounts = [Account(id=MERCHANT, currency="USD",
                        flags=int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS))]
    accounts += [Account(id=clearing_account_for(config, name, "USD", MERCHANT), currency="USD")
                 for name in PROVIDERS]
    assert cluster.create_accounts(accounts) == [AccountResult.ok] * len(accounts)
    return cluster, config


@settings(max_examples=150, deadline=None)
@given(answers=st.lists(st.tuples(ANSWERS, st.booleans()), min_size=1, max_size=8),
       fates=st.lists(EARLY_FATE, min_size=8, max_size=8), replays=st.booleans(),
       per_partition=st.booleans())
def test_the_ledger_holds_exactly_what_the_authorization_ended_with(
        answers: list[tuple[Outcome, bool]], fates: list[str], replays: bool,
        per_partition: bool) -> None:
    """Drive an authorization as the engine does: at each provider call (an early hold
    when ``holds_early``), then the ledger phases; a status query may stand in for a call
    (``as_status``: the recovery worker). When the answers run out the provider declines.
    At the end the merchant's pending credit is the amount if it succeeded, else 0, and
    the open hold is the one the payment names."""
    cluster, config = ledger(per_partition)
    s = authorization()
    late: list[list] = []
    for i in range(40):
        if s.final:
            break
        if s.phase in (Phase.APPLY, Phase.RELEASE):
            transfers = ledger_transfers(s, config)
            codes = cluster.create_transfers(transfers)
            if replays:
                cluster.create_transfers(transfers)
            s = on_ledger(s, step_result(s, codes))
            continue
        outcome, as_status = answers[i] if i < len(answers) else (Outcome.DECLINED, False)
        if s.phase == Phase.COMPENSATE:
            s = on_status(s, ProviderReply(outcome=Outcome.APPROVED))
            continue
        if s.phase == Phase.PROVIDER and holds_early(s):
            fate = fates[i % len(fates)]
            early = early_transfers(s, config)
            if fate in ("before", "twice"):
                cluster.create_transfers(early)
            if fate in ("after", "twice"):
                late.append(early)
        reply = ProviderReply(outcome=outcome, provider_ref="ref_1")
        if as_status or s.phase in (Phase.RESOLVE, Phase.AWAIT_PROVIDER):
            s = on_status(s if s.phase != Phase.PROVIDER else
                          msgspec.structs.replace(s, phase=Phase.RESOLVE), reply)
        else:
            s = on_provider(s, reply, PROVIDERS)
    assert s.final
    for early in late:  # held up somewhere, arriving after the step ended: it finds
        # the hold its step posted (and released, unless it was approved) already there
        assert cluster.create_transfers(early) == [R.exists]
    open_holds = [t for t in cluster.store.open_pending()
                  if t.credit_account_id == MERCHANT]
    _, _, pending_credit, posted_credit = cluster.balances(MERCHANT)
    assert posted_credit == 0
    if s.phase == Phase.SUCCEEDED:
        [hold] = open_holds
        assert (hold.id, hold.amount, hold.debit_account_id) == (
            authorization_hold_id(s), AMOUNT,
            clearing_account_for(config, s.provider, "USD", MERCHANT))
        assert pending_credit == AMOUNT
    else:
        assert open_holds == [] and pending_credit == 0, (s, open_holds)
