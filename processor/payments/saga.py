"""Payment lifecycles as sagas: the pure state machine of every step and its ledger postings.

A payment is authorized (perhaps raised by increments), then captured (once, or in several
partial captures until a final one) or voided (after partial captures: the rest), then
refunded (fully or partly, several times, of the payment or of one capture); a payout
sends a merchant's posted balance to a bank. Each of these
operations is a *step*: a saga that talks to one provider and to the ledger, persisted
before and after every external call (``actors/payments/engine.py`` does the I/O; this module only
decides). ``docs/payments.md`` draws the machine.

A step moves through phases::

    RESERVE ─► PROVIDER ─► APPLY ─► SUCCEEDED          (refund, payout start at RESERVE;
                 │  ▲        │                           authorize, capture, void at PROVIDER)
                 │  │        └─(ledger refused)─► COMPENSATE ─► COMPENSATED
                 │  └──(status: never arrived)──┐
                 ├─(unknown)──────────────► RESOLVE
                 ├─(pending)──────────────► AWAIT_PROVIDER ─► APPLY | RELEASE | FAILED
                 └─(declined / unavailable)─► RELEASE ─► FAILED  (refund, payout)
                                             FAILED              (authorize, capture, void)

The rules that keep money exact:

* A provider call always carries the step's idempotency key, so sending it again (a retry,
  a recovery after a crash) replays the provider's answer instead of charging twice.
* An unknown outcome is never guessed: the step asks the provider by the same key
  (``RESOLVE``); only a provider that says the call never arrived gets it sent again.
* Failover to another provider happens only when the first one certainly did nothing
  (``Outcome.RETRYABLE``); the other provider gets its own key.
* Every ledger transfer id is allocated when the step is created, so applying a posting
  again answers ``exists``: the ledger never applies a step twice.
* Refunds and payouts hold the merchant's funds in the ledger *before* the provider moves
  money, so a provider can never pay out what the ledger would refuse.
* An authorization has one ledger hold at a time (``Payment.hold_transfer_id``), holding
  ``capturable_amount``. The ledger resolves a hold once, so a partial capture and an
  increment replace it by a linked chain (post or void the old one, hold anew), never
  leaving the rest unheld or held twice.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import random
import zlib
from collections.abc import Sequence

import msgspec

from processor.codes import TransferResult
from processor.errors import TxprocError, register
from processor.payments.breaker import backoff_s
from processor.payments.provider import (
    DeclineCode,
    Operation,
    Outcome,
    ProviderReply,
    ProviderRequest,
)
from processor.service import PLACEMENTS, placement_of
from processor.types import AMOUNT_MAX, Transfer, TransferFlags, require

__all__ = [
    "DISPUTE_KINDS",
    "EVENT_INERT_PHASES",
    "FINAL_PHASES",
    "Capture",
    "Kind",
    "LedgerVerdict",
    "Payment",
    "PaymentError",
    "PaymentStatus",
    "PaymentsConfig",
    "Payout",
    "PayoutStatus",
    "Phase",
    "Step",
    "authorization_hold_id",
    "capture_named",
    "captures_of",
    "chain_result",
    "check_capture",
    "check_increment",
    "check_refund",
    "check_void",
    "clearing_account_for",
    "clearing_account_id",
    "clearing_accounts_of",
    "compensation_request",
    "early_transfers",
    "first_hold",
    "hold_left_s",
    "holds_early",
    "ledger_transfers",
    "ledger_verdict",
    "new_step",
    "on_ledger",
    "on_provider",
    "on_status",
    "payment_after",
    "payout_after",
    "provider_request",
    "recheck_delay_s",
    "refundable_amount",
    "settled_status",
    "status_request",
    "step_result",
]

PAYMENT_ID_PREFIX = "pay_"
PAYOUT_ID_PREFIX = "po_"


class Kind(enum.StrEnum):
    AUTHORIZE = "authorize"
    CAPTURE = "capture"
    VOID = "void"
    REFUND = "refund"
    PAYOUT = "payout"
    INCREMENT = "increment"  # raise the authorized amount (and its hold) by ``amount``
    # Steps of a dispute (``subject_id`` the dispute's id; processor/payments/disputes.py):
    # ``amount`` the disputed amount, ``hold_amount`` the provider's dispute fee.
    DISPUTE_HOLD = "dispute_hold"  # hold amount and fee on the merchant's account
    DISPUTE_EVIDENCE = "dispute_evidence"  # submit evidence to the provider
    DISPUTE_WON = "dispute_won"  # release the amount hold, post the fee hold
    DISPUTE_LOST = "dispute_lost"  # post both holds


DISPUTE_KINDS = frozenset({Kind.DISPUTE_HOLD, Kind.DISPUTE_EVIDENCE, Kind.DISPUTE_WON,
                           Kind.DISPUTE_LOST})
# Dispute steps that only post to the ledger: they start at APPLY.
_LEDGER_ONLY = frozenset({Kind.DISPUTE_HOLD, Kind.DISPUTE_WON, Kind.DISPUTE_LOST})


class Phase(enum.StrEnum):
    RESERVE = "reserve"  # refund, payout: hold the merchant's funds in the ledger
    PROVIDER = "provider"  # send the call to the provider (again, with the same key)
    AWAIT_PROVIDER = "await_provider"  # accepted; the answer comes by webhook or status query
    RESOLVE = "resolve"  # outcome unknown: ask the provider by the step's key
    APPLY = "apply"  # the provider approved: apply the step's effect in the ledger
    RELEASE = "release"  # the provider refused a refund / payout: release the ledger hold
    COMPENSATE = "compensate"  # the ledger refused what the provider did: undo it there
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    COMPENSATED = "compensated"


FINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.COMPENSATED})
# Phases that need the provider's word before anything else can happen.
PROVIDER_PHASES = frozenset({Phase.PROVIDER, Phase.AWAIT_PROVIDER, Phase.RESOLVE})
# Phases in which no provider event can move a step (``on_status`` answers it unchanged):
# the provider has spoken, and what is left is the ledger's, or nothing. The provider's
# own event usually arrives now, just after its answer: it is only remembered.
EVENT_INERT_PHASES = frozenset(Phase) - PROVIDER_PHASES - {Phase.COMPENSATE, Phase.RESERVE}


class PaymentStatus(enum.StrEnum):
    PROCESSING = "processing"  # the authorization has no final answer yet
    AUTHORIZED = "authorized"
    # Some of it captured, the rest still authorized (held) and capturable.
    PARTIALLY_CAPTURED = "partially_captured"
    CAPTURED = "captured"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    VOIDED = "voided"
    DECLINED = "declined"  # the provider or the risk check said no
    FAILED = "failed"  # nothing happened (providers unavailable) or it was undone


class PayoutStatus(enum.StrEnum):
    PROCESSING = "processing"
    PAID = "paid"
    FAILED = "failed"


register(402, {
    "payment_declined": "the provider declined; the body carries the payment or payout",
    "risk_declined": "the risk check declined; the body carries the payment",
})
register(404, {
    "payment_not_found": "no payment of the tenant has this id",
    "payout_not_found": "no payout of the tenant has this id",
})
register(409, {"operation_in_progress": "another operation on this payment is still running"})
register(422, {
    "payment_not_capturable": "the payment is not authorized, or nothing is left to capture",
    "capture_exceeds_authorized": "the capture is more than what is left of the authorization",
    "capture_not_found": "the refund names no succeeded capture of the payment",
    "authorization_expired": "the authorization lapsed before a partial capture or increment",
    "increment_not_supported": "the payment's provider cannot increment an authorization",
    "payment_not_incrementable": "the payment is not an authorization that can grow",
    "increment_exceeds_maximum": "the increment would take the authorization past the maximum",
    "payment_not_voidable": "the payment is not an authorization left to void",
    "payment_not_refundable": "the payment has nothing captured left to refund",
    "refund_exceeds_captured": "the refund is more than what is captured and not refunded",
    "merchant_account_not_found": "no merchant account of the tenant has this id",
    "insufficient_funds": "the payout is more than the merchant account's available balance",
    "currency_not_supported": "no provider takes this currency",
    "provider_unknown": "no provider has this name",
    # currency_mismatch is the ledger's too: registered once, in processor.errors.
    "amount_must_be_positive": "the amount must be at least 1 minor unit",
    "payment_failed": "the payment was compensated or refused by the ledger",
    "payout_failed": "the payout was compensated or refused by the ledger",
})
register(503, {
    "provider_unavailable": "no provider could take the request; nothing happened",
})


class PaymentError(TxprocError):
    """A request the payment rules refuse; ``code`` is stable and names the rule.

    Codes that are not registered (``step_exists``, ``step_not_waiting``, ...) are the
    engine's own reasons, answered as ``payment_failed`` when one ends a request.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class PaymentsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Rules of the payments domain (the I/O limits live with the actors)."""

    # Ids from here up are the processor's own: its clearing accounts and the transfers of
    # payment steps. Clients must keep their ledger ids below it (docs/payments.md).
    system_id_base: int = 2**62
    # The ledger hold of an authorization outlives the provider's (7 days at both sims).
    authorization_hold_s: int = 8 * 24 * 3600
    # Providers in the order authorizations try them; the first that serves the currency
    # and answers wins.
    provider_order: tuple[str, ...] = ("acme", "globex")
    # Seconds a live step owns its claim; after it, the recovery worker may take it over.
    claim_ttl_s: float = 30.0
    # How soon a parked step (pending, unknown, ledger unavailable) is looked at again:
    # after recheck_s, then doubling with jitter up to recheck_max_s (recheck_delay_s).
    recheck_s: float = 1.0
    recheck_max_s: float = 60.0
    # A step still unfinished this long after it started, and not held by a live runner,
    # is set aside for an operator (``requires_review``, docs/runbooks/requires-review.md):
    # rechecking stops until someone resolves it.
    review_after_s: float = 3600.0
    # Whether a step posts against the clearing account of its merchant account's ledger
    # placement (``clearing_account_for``) rather than the provider's one clearing account
    # per currency. The payments actor sets it from the database (migration 0034): a
    # ledger whose holds already name the one account keeps it.
    clearing_per_partition: bool = True

    def check(self) -> None:
        checks = [
            (2**40 <= self.system_id_base < 2**63 - 2**40, "system_id_base in range"),
            (self.authorization_hold_s > 0, "authorization_hold_s > 0"),
            (len(self.provider_order) >= 1, "at least one provider"),
            (self.claim_ttl_s > 0, "claim_ttl_s > 0"),
            (0 < self.recheck_s <= self.recheck_max_s, "0 < recheck_s <= recheck_max_s"),
            (self.review_after_s >= self.recheck_max_s, "review_after_s >= recheck_max_s"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"payments configuration: {what}")


def clearing_account_id(config: PaymentsConfig, provider: str, currency: str) -> int:
    """The ledger account holding what ``provider`` owes us (or we owe it) in ``currency``.

    Deterministic, so every process agrees without a lookup, and independent of the order
    providers are configured in: the base, plus 2^20 times a 20-bit hash of the provider's
    name (CRC-32, never 0), plus the currency's letters as a base-26 number (< 2^15).
    """
    slot = zlib.crc32(provider.encode()) % (2**20 - 1) + 1
    letters = 0
    for ch in currency:
        letters = letters * 26 + (ord(ch) - ord("A"))
    return config.system_id_base + slot * 2**20 + letters


# Clearing accounts per placement: from system_id_base + 2^58 (above the clearing and fee
# accounts, below the transit accounts at + 2^60), 2^16 candidate ids per provider and
# currency.
_PLACED_CLEARING_OFFSET = 2**58
_PLACED_CLEARING_CANDIDATES = 2**16


@functools.lru_cache(maxsize=256)
def clearing_accounts_of(system_id_base: int, provider: str, currency: str) -> tuple[int, ...]:
    """The clearing accounts of ``provider`` in ``currency``, one per ledger placement:
    element ``p`` is the one in placement ``p`` (``processor.service.placement_of``).

    Derived, not stored: the ``2^16`` candidate ids of the pair (its clearing account's
    offset from the base, shifted left 16 bits, above ``system_id_base + 2^58``) are taken
    in order, and each placement gets the first that falls in it (about 1,600 are looked
    at; every placement is found long before the candidates run out).
    """
    main = clearing_account_id(PaymentsConfig(system_id_base=system_id_base), provider,
                               currency)
    start = system_id_base + _PLACED_CLEARING_OFFSET + ((main - system_id_base) << 16)
    found: dict[int, int] = {}
    for candidate in range(start, start + _PLACED_CLEARING_CANDIDATES):
        found.setdefault(placement_of(candidate), candidate)
        if len(found) == PLACEMENTS:
            return tuple(found[p] for p in range(PLACEMENTS))
    raise AssertionError(f"placements without a clearing account for {provider} {currency}")


def clearing_account_for(config: PaymentsConfig, provider: str, currency: str,
                         merchant_account_id: int) -> int:
    """The clearing account a step of ``merchant_account_id`` posts against: the one in the
    merchant account's placement, so that every posting of the step stays on the merchant
    account's shard; or, with ``clearing_per_partition`` off, the provider's one."""
    if not config.clearing_per_partition:
        return clearing_account_id(config, provider, currency)
    accounts = clearing_accounts_of(config.system_id_base, provider, currency)
    return accounts[placement_of(merchant_account_id)]


class Payment(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    merchant_account_id: int
    amount: int
    currency: str
    payment_method: str
    status: PaymentStatus
    provider: str = ""
    provider_ref: str = ""
    hold_transfer_id: int = 0
    captured_amount: int = 0
    refunded_amount: int = 0
    decline_code: str = ""
    error: str = ""
    risk_reason: str = ""
    risk_source: str = ""
    reference: str = ""
    auto_capture: bool = False  # capture once the authorization succeeds
    request_key: str = ""  # the creating request's identity (hash of its Idempotency-Key)
    metadata: dict[str, str] = {}  # the client's own pairs (processor.payments.listing)
    created_at: dt.datetime | None = None  # set when it is created; lists order by it
    # What the authorization's ledger hold (``hold_transfer_id``) still holds: what may
    # still be captured. 0 once a final capture, a void or a refused capture closed it.
    capturable_amount: int = 0
    # The data subject (processor/privacy.py): with one, customer_ref, reference and
    # metadata are stored sealed with its key. ``erased``: that key was destroyed, and
    # those three are empty here and null in the API.
    customer_ref: str = ""
    erased: bool = False


class Payout(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    merchant_account_id: int
    amount: int
    currency: str
    destination: str
    status: PayoutStatus
    provider: str = ""
    provider_ref: str = ""
    decline_code: str = ""
    error: str = ""
    reference: str = ""
    metadata: dict[str, str] = {}
    created_at: dt.datetime | None = None
    customer_ref: str = ""  # as Payment's
    erased: bool = False


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One saga step. ``transfer_id`` .. ``transfer_id + 3`` are its ledger ids."""

    id: int
    subject_id: str  # the payment or payout it belongs to
    kind: Kind
    phase: Phase
    amount: int
    currency: str
    provider: str
    provider_key: str  # the idempotency key of the provider call
    transfer_id: int
    merchant_account_id: int
    payment_method: str = ""
    destination: str = ""
    hold_transfer_id: int = 0  # capture, void: the authorization's ledger hold
    auth_ref: str = ""  # capture, void, refund: the provider's id of the authorization
    provider_ref: str = ""  # the provider's id of what this step did
    tried: tuple[str, ...] = ()  # providers already tried (authorize failover)
    decline_code: str = ""
    error: str = ""  # stable code of why it failed or was compensated
    version: int = 0
    origin: int = 0  # the audit record of the request that started it (0: none)
    # How often the recovery worker has taken the step up (read only; the store counts).
    checks: int = 0
    # capture: whether it closes the authorization (the rest of the hold is released).
    final_capture: bool = True
    # refund: the capture step it refunds (0: the payment as a whole).
    capture_id: int = 0
    # capture, void, increment: what the authorization's hold held when the step was
    # created.
    hold_amount: int = 0
    # A partial capture, an increment: the timeout of the new hold (of the rest, of the
    # raised amount), the time the authorization's hold had left when the step was created
    # (0: it never expires).
    hold_timeout_s: int = 0

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES


_OPERATION = {
    Kind.AUTHORIZE: Operation.AUTHORIZE,
    Kind.CAPTURE: Operation.CAPTURE,
    Kind.VOID: Operation.VOID,
    Kind.REFUND: Operation.REFUND,
    Kind.PAYOUT: Operation.PAYOUT,
    Kind.INCREMENT: Operation.INCREMENT,
    Kind.DISPUTE_EVIDENCE: Operation.DISPUTE_EVIDENCE,
}


def recheck_delay_s(checks: int, rules: PaymentsConfig, rng: random.Random) -> float:
    """Seconds until a parked step is asked again, after ``checks`` earlier looks by the
    recovery worker: ``recheck_s``, then capped exponential backoff with full jitter on top,
    so the wait lies in ``[recheck_s, recheck_max_s]`` and its ceiling doubles per look.
    Spreads the rechecks of many steps parked at once (a provider outage) apart."""
    extra_cap_s = rules.recheck_max_s - rules.recheck_s
    if extra_cap_s <= 0 or checks <= 0:
        return rules.recheck_s
    return rules.recheck_s + backoff_s(checks, base_s=rules.recheck_s, cap_s=extra_cap_s,
                                       rng=rng)


def provider_key(step_id: int, provider: str) -> str:
    """A provider idempotency key: unique per step and provider, never reused otherwise."""
    return f"txp-{step_id}-{provider}"


def new_step(*, step_id: int, transfer_base: int, kind: Kind, subject_id: str, amount: int,
             currency: str, provider: str, merchant_account_id: int, payment_method: str = "",
             destination: str = "", hold_transfer_id: int = 0, auth_ref: str = "",
             origin: int = 0, final: bool = True, capture_id: int = 0, hold_amount: int = 0,
             hold_timeout_s: int = 0) -> Step:
    """A step as it is first persisted: refunds and payouts start by holding funds.

    A capture that is not ``final`` leaves part of the hold (``hold_amount``) in place, so
    it must take less than the hold; the engine makes a capture of all of it final.
    """
    if amount <= 0:
        raise PaymentError("amount_must_be_positive", "amount must be at least 1")
    if kind == Kind.CAPTURE and not final:
        require(amount < hold_amount, "a partial capture leaves some of the hold")
    if kind == Kind.INCREMENT:
        require(hold_amount > 0, "an increment raises a hold that holds something")
        require(hold_amount + amount <= AMOUNT_MAX, "an increment keeps the hold in range")
    require(hold_timeout_s >= 0, "a new hold's timeout is not negative")
    if kind in _LEDGER_ONLY:
        require(0 <= hold_amount <= AMOUNT_MAX, "a dispute fee is in range")
        require(kind == Kind.DISPUTE_HOLD or hold_transfer_id > 0,
                "a dispute's outcome resolves its holds")
    first = (Phase.RESERVE if kind in (Kind.REFUND, Kind.PAYOUT)
             else Phase.APPLY if kind in _LEDGER_ONLY else Phase.PROVIDER)
    return Step(
        id=step_id, subject_id=subject_id, kind=kind, phase=first, amount=amount,
        currency=currency, provider=provider, provider_key=provider_key(step_id, provider),
        transfer_id=transfer_base, merchant_account_id=merchant_account_id,
        payment_method=payment_method, destination=destination,
        hold_transfer_id=hold_transfer_id, auth_ref=auth_ref, tried=(provider,), origin=origin,
        final_capture=final, capture_id=capture_id, hold_amount=hold_amount,
        hold_timeout_s=hold_timeout_s,
    )


# -- provider calls ---------------------------------------------------------------------------


def provider_request(step: Step) -> ProviderRequest:
    """The call a step in ``PROVIDER`` sends (and sends again, unchanged, when told to)."""
    return ProviderRequest(
        operation=_OPERATION[step.kind], idempotency_key=step.provider_key,
        amount=step.amount, currency=step.currency, reference=step.subject_id,
        payment_method=step.payment_method, provider_ref=step.auth_ref,
        destination=step.destination, final=step.final_capture,
    )


def status_request(step: Step) -> ProviderRequest:
    """The status query of ``RESOLVE`` / ``AWAIT_PROVIDER``: the same call, by its key."""
    if step.phase == Phase.COMPENSATE:
        return compensation_request(step)
    return provider_request(step)


def compensation_request(step: Step) -> ProviderRequest:
    """Undo at the provider what the ledger refused: void an authorization, refund a
    capture. Its key is derived from the step's, so repeating it is safe too."""
    if step.kind == Kind.AUTHORIZE:
        op, ref = Operation.VOID, step.provider_ref
    elif step.kind == Kind.CAPTURE:
        op, ref = Operation.REFUND, step.auth_ref
    else:  # refunds and payouts hold funds first; the ledger cannot refuse their apply
        raise PaymentError("no_compensation", f"a {step.kind} step has no compensation")
    return ProviderRequest(
        operation=op, idempotency_key=f"{step.provider_key}-undo", amount=step.amount,
        currency=step.currency, reference=step.subject_id, provider_ref=ref,
    )


def _declined(step: Step, reply: ProviderReply, error: str) -> Step:
    code = reply.decline_code.value if reply.decline_code is not None else ""
    # Refunds and payouts hold funds first; an authorization's hold at its first provider
    # may have been posted while that provider was asked (``holds_early``): both release.
    after = (Phase.RELEASE if step.kind in (Kind.REFUND, Kind.PAYOUT, Kind.AUTHORIZE)
             else Phase.FAILED)
    return msgspec.structs.replace(step, phase=after, decline_code=code, error=error)


def on_provider(step: Step, reply: ProviderReply, failover: Sequence[str] = ()) -> Step:
    """The step after the provider answered its call (``PROVIDER``).

    ``failover`` lists providers that serve the step's currency, in preference order; an
    authorization that certainly did not happen moves to the first one not yet tried.
    """
    if step.phase == Phase.COMPENSATE:
        return _on_compensation(step, reply)
    if step.phase not in PROVIDER_PHASES:
        raise PaymentError("step_not_waiting", f"step {step.id} is in {step.phase}")
    outcome = reply.outcome
    if outcome == Outcome.APPROVED:
        ref = reply.provider_ref or step.provider_ref
        # Evidence moves no money: the provider's acceptance ends the step.
        done = Phase.SUCCEEDED if step.kind == Kind.DISPUTE_EVIDENCE else Phase.APPLY
        return msgspec.structs.replace(step, phase=done, provider_ref=ref)
    if outcome == Outcome.PENDING:
        ref = reply.provider_ref or step.provider_ref
        return msgspec.structs.replace(step, phase=Phase.AWAIT_PROVIDER, provider_ref=ref)
    if outcome == Outcome.UNKNOWN:
        return msgspec.structs.replace(step, phase=Phase.RESOLVE)
    if outcome == Outcome.RETRYABLE:
        if step.kind == Kind.AUTHORIZE:
            for name in failover:
                if name not in step.tried:
                    return msgspec.structs.replace(
                        step, phase=Phase.PROVIDER, provider=name,
                        provider_key=provider_key(step.id, name), tried=(*step.tried, name))
        return _declined(step, reply, "provider_unavailable")
    error = "provider_declined" if outcome == Outcome.DECLINED else "provider_refused"
    return _declined(step, reply, error)


def on_status(step: Step, reply: ProviderReply) -> Step:
    """The step after a status query (``RESOLVE``, ``AWAIT_PROVIDER``) or a webhook.

    ``NOT_FOUND`` means the call never reached the provider: it is sent again with the same
    key. An answer that settles nothing leaves the step where it is, to be asked again.
    """
    if step.phase == Phase.COMPENSATE:
        return _on_compensation(step, reply)
    if step.phase not in PROVIDER_PHASES:
        return step  # a late or repeated answer about a step that has moved on
    if reply.outcome == Outcome.DECLINED and reply.decline_code == DeclineCode.NOT_FOUND:
        if step.phase == Phase.AWAIT_PROVIDER:
            return step  # it did arrive (it was accepted); the index is just behind
        return msgspec.structs.replace(step, phase=Phase.PROVIDER)
    if reply.outcome in (Outcome.UNKNOWN, Outcome.RETRYABLE):
        return step
    if reply.outcome == Outcome.PENDING and step.phase == Phase.AWAIT_PROVIDER:
        return step
    return on_provider(step, reply)


def _on_compensation(step: Step, reply: ProviderReply) -> Step:
    if reply.outcome == Outcome.APPROVED:
        return msgspec.structs.replace(step, phase=Phase.COMPENSATED)
    if reply.outcome in (Outcome.DECLINED, Outcome.FAILED):
        if reply.decline_code == DeclineCode.ALREADY_VOIDED:
            return msgspec.structs.replace(step, phase=Phase.COMPENSATED)
        # The provider keeps money the ledger does not know of: an operator must look
        # (docs/runbooks/double-charge.md). The step ends so it is counted, not retried.
        return msgspec.structs.replace(step, phase=Phase.FAILED, error="compensation_refused")
    return step  # pending, unknown, unavailable: ask again later with the same key


# -- ledger -----------------------------------------------------------------------------------


def holds_early(step: Step) -> bool:
    """Whether the step's ledger hold is posted while its provider is asked: an
    authorization calling the first provider it tried.

    The hold is what its approval posts (``first_hold``), so an approval finds it applied
    and a replay of it answers ``exists``. Whatever ends the authorization without that
    approval releases it (``RELEASE``, or the ``APPLY`` of an approval by a later
    provider), by posting it and voiding it in one batch: idempotent, and right whether
    or not the early posting arrived, or arrives later (it then answers ``exists``).
    """
    return (step.kind == Kind.AUTHORIZE and step.phase == Phase.PROVIDER
            and step.provider == step.tried[0])


def early_transfers(step: Step, config: PaymentsConfig) -> list[Transfer]:
    """What ``holds_early`` posts beside the provider call: the first provider's hold."""
    require(holds_early(step), "only an authorization at its first provider holds early")
    return _with_origin(step, [first_hold(step, config)])


def first_hold(step: Step, config: PaymentsConfig) -> Transfer:
    """An authorization's hold at the first provider it tried: the step's first id."""
    return _authorization_hold(step, config, step.tried[0], step.transfer_id)


def _authorization_hold(step: Step, config: PaymentsConfig, provider: str,
                        transfer_id: int) -> Transfer:
    """The hold of an authorization at ``provider``: from its clearing account to the
    merchant, for ``authorization_hold_s``."""
    merchant = step.merchant_account_id
    return Transfer(id=transfer_id,
                    debit_account_id=clearing_account_for(config, provider, step.currency,
                                                          merchant),
                    credit_account_id=merchant, amount=step.amount, currency=step.currency,
                    flags=int(TransferFlags.PENDING), timeout_s=config.authorization_hold_s)


def authorization_hold_id(step: Step) -> int:
    """The ledger hold an approved authorization leaves: its first id when the first
    provider it tried approved, else its second (the first one's hold is released)."""
    return step.transfer_id if step.provider == step.tried[0] else step.transfer_id + 1


def _authorize_transfers(step: Step, config: PaymentsConfig) -> list[Transfer]:
    """An authorization's postings: at ``APPLY`` the approving provider's hold (first),
    then, after a failover, the release of the first provider's hold; at ``RELEASE`` that
    release alone. A release posts the hold before voiding it (the third id), so it holds
    whether or not the early posting ever arrived."""
    first = first_hold(step, config)
    release = [first, msgspec.structs.replace(
        first, id=step.transfer_id + 2, flags=int(TransferFlags.VOID_PENDING), timeout_s=0,
        pending_id=step.transfer_id)]
    if step.phase == Phase.RELEASE:
        return release
    if step.provider == step.tried[0]:
        return [first]
    return [_authorization_hold(step, config, step.provider, authorization_hold_id(step)),
            *release]


def step_result(step: Step, codes: Sequence[TransferResult]) -> TransferResult:
    """The one answer of the transfers ``ledger_transfers(step)`` applied: the approving
    hold's for an authorization at ``APPLY`` (what follows it only releases the first
    provider's hold), else ``chain_result``."""
    require(len(codes) >= 1, "a step applies at least one transfer")
    if step.kind == Kind.AUTHORIZE and step.phase == Phase.APPLY:
        return codes[0]
    return chain_result(codes)


def _with_origin(step: Step, transfers: list[Transfer]) -> list[Transfer]:
    if step.origin:
        return [msgspec.structs.replace(t, origin=step.origin) for t in transfers]
    return transfers


def ledger_transfers(step: Step, config: PaymentsConfig) -> list[Transfer]:
    """The ledger transfers the step's current phase applies (empty when none).

    Ids are the step's own (``transfer_id`` + 0..3), so applying them twice is harmless.
    Each carries the step's ``origin``, the audit record of the request that started the
    step: the front stamps the transfers with it instead of writing a record of its own,
    if it wrote that record itself (docs/security.md, "Audit").
    """
    return _with_origin(step, _phase_transfers(step, config))


def _phase_transfers(step: Step, config: PaymentsConfig) -> list[Transfer]:
    merchant = step.merchant_account_id
    clearing = clearing_account_for(config, step.provider, step.currency, merchant)
    base = step.transfer_id
    cur = step.currency
    pending, post, void = (int(TransferFlags.PENDING), int(TransferFlags.POST_PENDING),
                           int(TransferFlags.VOID_PENDING))
    phase, kind = step.phase, step.kind
    if kind == Kind.AUTHORIZE:
        return _authorize_transfers(step, config) if phase in (Phase.APPLY, Phase.RELEASE) \
            else []
    if phase == Phase.RESERVE:
        return [Transfer(id=base, debit_account_id=merchant, credit_account_id=clearing,
                         amount=step.amount, currency=cur, flags=pending)]
    if phase == Phase.RELEASE:
        return [Transfer(id=base + 2, debit_account_id=merchant, credit_account_id=clearing,
                         amount=step.amount, currency=cur, flags=void, pending_id=base)]
    if phase != Phase.APPLY:
        return []
    if kind in _LEDGER_ONLY:
        return _dispute_transfers(step, clearing)
    if kind == Kind.CAPTURE:
        if step.final_capture:  # post part or all of the hold; the ledger releases the rest
            return [Transfer(id=base, debit_account_id=clearing, credit_account_id=merchant,
                             amount=step.amount, currency=cur, flags=post,
                             pending_id=step.hold_transfer_id)]
        # A hold is resolved once, so a partial capture posts its part (releasing the rest)
        # and holds the rest again as a new pending transfer, linked: both or neither. The
        # new hold keeps the time the old one had left (``hold_timeout_s``).
        return [Transfer(id=base, debit_account_id=clearing, credit_account_id=merchant,
                         amount=step.amount, currency=cur, flags=post | LINKED,
                         pending_id=step.hold_transfer_id),
                Transfer(id=rehold_id(step), debit_account_id=clearing,
                         credit_account_id=merchant, amount=step.hold_amount - step.amount,
                         currency=cur, flags=pending, timeout_s=step.hold_timeout_s)]
    if kind == Kind.INCREMENT:
        # The hold grows by voiding it and holding the raised amount anew, linked: both or
        # neither. The new hold keeps the time the old one had left.
        return [Transfer(id=base, debit_account_id=clearing, credit_account_id=merchant,
                         amount=step.hold_amount, currency=cur, flags=void | LINKED,
                         pending_id=step.hold_transfer_id),
                Transfer(id=rehold_id(step), debit_account_id=clearing,
                         credit_account_id=merchant, amount=step.hold_amount + step.amount,
                         currency=cur, flags=pending, timeout_s=step.hold_timeout_s)]
    if kind == Kind.VOID:
        # A void names the whole hold (what it holds, which is the step's amount).
        return [Transfer(id=base, debit_account_id=clearing, credit_account_id=merchant,
                         amount=step.amount, currency=cur, flags=void,
                         pending_id=step.hold_transfer_id)]
    # refund, payout: post the hold placed by RESERVE
    return [Transfer(id=base + 1, debit_account_id=merchant, credit_account_id=clearing,
                     amount=step.amount, currency=cur, flags=post, pending_id=base)]


LINKED = int(TransferFlags.LINKED)


def _dispute_transfers(step: Step, clearing: int) -> list[Transfer]:
    """A dispute's postings (processor/payments/disputes.py): the hold of the disputed
    amount (the step's first id) and of the fee (its second; none when the fee is 0),
    merchant -> clearing, pending without timeout, linked; then either both posted (lost)
    or the amount voided and the fee posted (won), from the outcome step's own ids, naming
    the hold step's ids (``hold_transfer_id``, ``hold_transfer_id + 1``)."""
    merchant, base, cur, fee = step.merchant_account_id, step.transfer_id, step.currency, \
        step.hold_amount
    pending, post, void = (int(TransferFlags.PENDING), int(TransferFlags.POST_PENDING),
                           int(TransferFlags.VOID_PENDING))
    linked = LINKED if fee > 0 else 0
    if step.kind == Kind.DISPUTE_HOLD:
        amount_flags, fee_flags, amount_pending, fee_pending = pending, pending, 0, 0
    else:
        amount_flags = post if step.kind == Kind.DISPUTE_LOST else void
        fee_flags, amount_pending, fee_pending = (post, step.hold_transfer_id,
                                                  step.hold_transfer_id + 1)
    transfers = [Transfer(id=base, debit_account_id=merchant, credit_account_id=clearing,
                          amount=step.amount, currency=cur, flags=amount_flags | linked,
                          pending_id=amount_pending)]
    if fee > 0:
        transfers.append(Transfer(id=base + 1, debit_account_id=merchant,
                                  credit_account_id=clearing, amount=fee, currency=cur,
                                  flags=fee_flags, pending_id=fee_pending))
    return transfers


def rehold_id(step: Step) -> int:
    """The id of the new hold of what a partial capture leaves, or of the amount an
    increment raised (the step's second id)."""
    return step.transfer_id + 1


def chain_result(codes: Sequence[TransferResult]) -> TransferResult:
    """The one answer of a step's transfers: ``ok`` / ``exists`` when all applied, else the
    refusal that decided (a linked chain fails whole, its other transfers answering
    ``linked_event_failed``)."""
    require(len(codes) >= 1, "a step applies at least one transfer")
    applied = (TransferResult.ok, TransferResult.exists)
    for code in codes:
        if code not in applied and code != TransferResult.linked_event_failed:
            return code
    for code in codes:
        if code not in applied:
            return code
    return codes[0]


class LedgerVerdict(enum.StrEnum):
    DONE = "done"  # applied now or before
    REFUSED = "refused"  # a rule refused it; it will never apply


# A void of a hold that already lapsed or was voided leaves the books as the void would.
_VOID_EQUIVALENT = frozenset({TransferResult.pending_transfer_expired,
                              TransferResult.pending_transfer_already_voided})


def ledger_verdict(step: Step, code: TransferResult) -> LedgerVerdict:
    if code in (TransferResult.ok, TransferResult.exists):
        return LedgerVerdict.DONE
    voiding = step.phase == Phase.RELEASE or (step.phase == Phase.APPLY
                                              and step.kind == Kind.VOID)
    if voiding and code in _VOID_EQUIVALENT:
        return LedgerVerdict.DONE
    return LedgerVerdict.REFUSED


def on_ledger(step: Step, code: TransferResult) -> Step:
    """The step after the ledger answered the transfers of its phase."""
    verdict = ledger_verdict(step, code)
    refused = f"ledger_{code.name}"
    if step.phase == Phase.RESERVE:
        if verdict == LedgerVerdict.DONE:
            return msgspec.structs.replace(step, phase=Phase.PROVIDER)
        return msgspec.structs.replace(step, phase=Phase.FAILED, error=refused)
    if step.phase == Phase.RELEASE:
        if verdict == LedgerVerdict.DONE or step.kind == Kind.AUTHORIZE:
            # An authorization's release ends it whatever the ledger said: a refused
            # hold (its void then finds nothing) leaves nothing held either. Its error
            # stays the provider's.
            return msgspec.structs.replace(step, phase=Phase.FAILED)
        return msgspec.structs.replace(step, phase=Phase.FAILED, error=refused)
    if step.phase != Phase.APPLY:
        raise PaymentError("step_not_applying", f"step {step.id} is in {step.phase}")
    if verdict == LedgerVerdict.DONE:
        return msgspec.structs.replace(step, phase=Phase.SUCCEEDED)
    if step.kind in (Kind.AUTHORIZE, Kind.CAPTURE):
        return msgspec.structs.replace(step, phase=Phase.COMPENSATE, error=refused)
    # A void the ledger refuses, or a refund / payout whose own hold cannot be posted,
    # breaks an invariant the saga relies on: end it loudly for an operator.
    return msgspec.structs.replace(step, phase=Phase.FAILED, error=refused)


# -- what a finished step means to its payment or payout -------------------------------------


def settled_status(payment: Payment) -> PaymentStatus:
    """The status an authorized payment's amounts give it: authorized while nothing is
    captured and some is held, partially captured while some is captured and some still
    held, voided when nothing was captured and nothing is held, then captured and
    (partially) refunded as refunds follow."""
    if payment.capturable_amount > 0:
        return (PaymentStatus.AUTHORIZED if payment.captured_amount == 0
                else PaymentStatus.PARTIALLY_CAPTURED)
    if payment.captured_amount == 0:
        return PaymentStatus.VOIDED
    if payment.refunded_amount == 0:
        return PaymentStatus.CAPTURED
    return (PaymentStatus.REFUNDED if payment.refunded_amount == payment.captured_amount
            else PaymentStatus.PARTIALLY_REFUNDED)


def payment_after(payment: Payment, step: Step) -> Payment:
    """The payment once ``step`` (one of its steps) has reached a final phase."""
    r = msgspec.structs.replace
    if not step.final:
        return payment
    ok = step.phase == Phase.SUCCEEDED
    if step.kind == Kind.AUTHORIZE:
        if ok:
            return r(payment, status=PaymentStatus.AUTHORIZED, provider=step.provider,
                     provider_ref=step.provider_ref,
                     hold_transfer_id=authorization_hold_id(step),
                     capturable_amount=step.amount)
        status = PaymentStatus.DECLINED if step.error == "provider_declined" else (
            PaymentStatus.FAILED)
        return r(payment, status=status, provider=step.provider,
                 decline_code=step.decline_code, error=step.error)
    if step.kind == Kind.CAPTURE:
        if ok:
            left = 0 if step.final_capture else payment.capturable_amount - step.amount
            require(left >= 0, "a capture takes at most what is held")
            hold = payment.hold_transfer_id if step.final_capture else rehold_id(step)
            captured = r(payment, captured_amount=payment.captured_amount + step.amount,
                         capturable_amount=left, hold_transfer_id=hold)
            return r(captured, status=settled_status(captured))
        if step.phase == Phase.COMPENSATED:
            # The ledger refused the hold's post (it lapsed): nothing is capturable any
            # more; what earlier captures took stays captured.
            closed = r(payment, capturable_amount=0, error=step.error)
            status = (PaymentStatus.FAILED if payment.captured_amount == 0
                      else settled_status(closed))
            return r(closed, status=status)
        return payment  # a refused capture leaves the authorization as it was
    if step.kind == Kind.VOID:
        if not ok:
            return payment
        released = r(payment, capturable_amount=0)
        return r(released, status=settled_status(released))
    if step.kind == Kind.REFUND and ok:
        refunded = r(payment, refunded_amount=payment.refunded_amount + step.amount)
        return r(refunded, status=settled_status(refunded))
    if step.kind == Kind.INCREMENT and ok:
        return r(payment, amount=payment.amount + step.amount,
                 capturable_amount=payment.capturable_amount + step.amount,
                 hold_transfer_id=rehold_id(step))
    return payment


def payout_after(payout: Payout, step: Step) -> Payout:
    if not step.final:
        return payout
    if step.phase == Phase.SUCCEEDED:
        return msgspec.structs.replace(payout, status=PayoutStatus.PAID,
                                       provider_ref=step.provider_ref)
    return msgspec.structs.replace(payout, status=PayoutStatus.FAILED,
                                   decline_code=step.decline_code, error=step.error)


# -- captures as child objects of a payment -------------------------------------------------


class Capture(msgspec.Struct, frozen=True, kw_only=True):
    """A capture of a payment: one of its capture steps, with what was refunded of it."""

    step_id: int
    amount: int
    final: bool
    phase: Phase
    refunded_amount: int = 0  # by refunds that named this capture


def captures_of(steps: Sequence[Step]) -> list[Capture]:
    """A payment's captures, oldest first, from its steps (every capture step is one)."""
    refunded: dict[int, int] = {}
    for s in steps:
        if s.kind == Kind.REFUND and s.capture_id and s.phase == Phase.SUCCEEDED:
            refunded[s.capture_id] = refunded.get(s.capture_id, 0) + s.amount
    return [Capture(step_id=s.id, amount=s.amount, final=s.final_capture, phase=s.phase,
                    refunded_amount=refunded.get(s.id, 0))
            for s in steps if s.kind == Kind.CAPTURE]


def capture_named(steps: Sequence[Step], capture_id: int) -> Capture:
    """The succeeded capture ``capture_id`` of these steps; ``capture_not_found`` if there
    is none (another payment's, failed, or still running)."""
    for capture in captures_of(steps):
        if capture.step_id == capture_id and capture.phase == Phase.SUCCEEDED:
            return capture
    raise PaymentError("capture_not_found", "no succeeded capture of this payment has this id")


def hold_left_s(hold: Transfer | None, now_s: float) -> int:
    """Whole seconds (rounded up) until the authorization's ledger hold expires; 0 for a
    hold without a timeout. ``authorization_expired`` when it has lapsed (or is gone)."""
    if hold is None:
        raise PaymentError("authorization_expired", "the authorization's hold is gone")
    if hold.timeout_s == 0:
        return 0
    left_ns = hold.timestamp + hold.timeout_s * 10**9 - int(now_s * 10**9)
    if left_ns <= 0:
        raise PaymentError("authorization_expired",
                           "the authorization has expired; nothing more can be captured")
    return -(-left_ns // 10**9)


# -- what a new step may ask ------------------------------------------------------------------


_CAPTURABLE = (PaymentStatus.AUTHORIZED, PaymentStatus.PARTIALLY_CAPTURED)
_REFUNDABLE = (PaymentStatus.PARTIALLY_CAPTURED, PaymentStatus.CAPTURED,
               PaymentStatus.PARTIALLY_REFUNDED)


def check_capture(payment: Payment, amount: int) -> None:
    """A capture takes 1 up to what is still held: never more than was authorized."""
    if payment.status not in _CAPTURABLE or payment.capturable_amount == 0:
        raise PaymentError("payment_not_capturable",
                           f"a payment in status {payment.status} cannot be captured")
    if not 1 <= amount <= payment.capturable_amount:
        raise PaymentError("capture_exceeds_authorized",
                           "capture amount must be between 1 and what is still authorized")


def check_increment(payment: Payment, amount: int, *, supported: bool) -> None:
    """An increment raises what an open authorization holds by ``amount``, at a provider
    that offers it (``supported``: decided from its adapter, before it is asked).

    Precedence: ``increment_not_supported``, ``payment_not_incrementable`` (not authorized,
    fully captured or voided), ``increment_exceeds_maximum`` (beyond 2^63 - 1).
    """
    if not supported:
        raise PaymentError("increment_not_supported",
                           f"{payment.provider} does not offer incremental authorization")
    if payment.status not in _CAPTURABLE or payment.capturable_amount == 0:
        raise PaymentError("payment_not_incrementable",
                           f"a payment in status {payment.status} cannot be incremented")
    if not 1 <= amount <= AMOUNT_MAX - payment.amount:
        raise PaymentError("increment_exceeds_maximum",
                           "the authorized amount would exceed 2^63 - 1")


def check_void(payment: Payment) -> None:
    """A void releases what is still held; after a partial capture, the rest."""
    if payment.status not in _CAPTURABLE or payment.capturable_amount == 0:
        raise PaymentError("payment_not_voidable",
                           f"a payment in status {payment.status} cannot be voided")


def refundable_amount(payment: Payment, capture: Capture | None = None, *,
                      disputed: int = 0) -> int:
    """What may still be refunded: of the payment, and of ``capture`` when one is named;
    never what open or lost disputes (``disputed``) took back already."""
    left = max(0, payment.captured_amount - payment.refunded_amount - disputed)
    if capture is not None:
        left = min(left, capture.amount - capture.refunded_amount)
    return left


def check_refund(payment: Payment, amount: int, capture: Capture | None = None, *,
                 disputed: int = 0) -> None:
    """A refund returns 1 up to what was captured and not yet refunded (nor disputed), and
    when it names a capture, up to what is left of that capture."""
    if payment.status not in _REFUNDABLE or payment.captured_amount == 0:
        raise PaymentError("payment_not_refundable",
                           f"a payment in status {payment.status} cannot be refunded")
    if not 1 <= amount <= refundable_amount(payment, capture, disputed=disputed):
        raise PaymentError("refund_exceeds_captured",
                           "refund amount must be between 1 and what is left to refund")
