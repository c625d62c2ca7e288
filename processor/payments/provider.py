"""The processor's vocabulary for payment providers: what a call asks and what came of it.

Adapters (``adapters/<provider>.py``) translate each provider's wire format into these
types, so nothing past the adapter boundary knows a provider's status words or error
bodies; the payment sagas (``processor/payments/saga.py``) decide on ``Outcome`` alone.
"""

from __future__ import annotations

import enum

import msgspec

__all__ = [
    "DeclineCode",
    "DisputeNotice",
    "Operation",
    "Outcome",
    "ProviderReply",
    "ProviderRequest",
    "SettlementFee",
    "SettlementLine",
    "SettlementPayoutBatch",
    "SettlementReport",
    "WebhookEvent",
]


class Outcome(enum.StrEnum):
    """What a provider call did, in the processor's words.

    ``retryable`` is a property of the outcome, not of the exception that produced it:
    only ``RETRYABLE`` may be sent again, and only with the same idempotency key.
    """

    APPROVED = "approved"  # it took effect at the provider
    DECLINED = "declined"  # refused for a business reason (funds, fraud, expired); final
    PENDING = "pending"  # accepted; the result comes later (webhook or status query)
    RETRYABLE = "retryable_failure"  # certainly did not take effect; may be sent again
    FAILED = "final_failure"  # did not take effect, and sending it again will not help
    UNKNOWN = "unknown"  # may or may not have taken effect (timeout, lost response)

    @property
    def retryable(self) -> bool:
        return self is Outcome.RETRYABLE

    @property
    def final(self) -> bool:
        """The provider's answer settles the operation one way or the other."""
        return self in (Outcome.APPROVED, Outcome.DECLINED, Outcome.FAILED)


class Operation(enum.StrEnum):
    AUTHORIZE = "authorize"  # place a hold on the payer's payment method
    CAPTURE = "capture"  # take (part of) an authorized amount
    VOID = "void"  # release an authorization that was not captured
    REFUND = "refund"  # return (part of) a captured amount to the payer
    PAYOUT = "payout"  # send money to a bank account
    # Raise an authorization by ``amount`` (incremental authorization); only providers
    # whose adapter lists it in ``capabilities`` offer it.
    INCREMENT = "increment"
    # Submit evidence against a dispute (a chargeback): ``provider_ref`` is the provider's
    # id of the dispute, ``evidence_text`` and ``evidence_files`` what the merchant says.
    DISPUTE_EVIDENCE = "dispute_evidence"


class DeclineCode(enum.StrEnum):
    """Why a provider declined or finally failed an operation (normalised)."""

    INSUFFICIENT_FUNDS = "insufficient_funds"
    CARD_EXPIRED = "card_expired"
    DO_NOT_HONOR = "do_not_honor"
    SUSPECTED_FRAUD = "suspected_fraud"
    INVALID_PAYMENT_METHOD = "invalid_payment_method"
    INVALID_DESTINATION = "invalid_destination"
    AMOUNT_EXCEEDS_AUTHORIZED = "amount_exceeds_authorized"
    ALREADY_VOIDED = "already_voided"
    NOT_FOUND = "not_found"  # the provider does not know the reference or the key
    CURRENCY_NOT_SUPPORTED = "currency_not_supported"
    AUTHENTICATION_FAILED = "authentication_failed"  # our credentials; an operator problem
    INVALID_REQUEST = "invalid_request"
    OTHER = "other"


class ProviderRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One operation towards a provider.

    ``idempotency_key`` is ours, unique per saga step; the provider replays its answer for a
    repeated key, which is what makes a retry or a recovery query safe. ``provider_ref`` is
    the provider's id of the authorization (capture, void, refund) and is empty for
    authorize and payout. ``payment_method`` is a provider-issued token, never a card
    number; ``destination`` is a tokenised bank account for payouts.
    """

    operation: Operation
    idempotency_key: str
    amount: int
    currency: str
    reference: str  # our id of the payment or payout, for the provider's records
    payment_method: str = ""
    provider_ref: str = ""
    destination: str = ""
    # capture: whether it closes the authorization (the provider releases the rest); a
    # capture that is not final leaves the rest capturable by later captures.
    final: bool = True
    # dispute_evidence: the merchant's statement and its documents (references).
    evidence_text: str = ""
    evidence_files: tuple[str, ...] = ()


class ProviderReply(msgspec.Struct, frozen=True, kw_only=True):
    outcome: Outcome
    provider_ref: str = ""  # the provider's id of the authorization / refund / payout
    amount: int = 0  # the amount the provider says took effect (0 when nothing did)
    decline_code: DeclineCode | None = None
    http_status: int = 0  # 0 when no HTTP answer arrived
    retry_after_s: float = 0.0  # the provider asked us to wait this long (429 / 503)
    message: str = ""  # short, safe for logs: never a token, key or card data


class DisputeNotice(msgspec.Struct, frozen=True, kw_only=True):
    """What a provider's dispute webhook says, in the processor's words.

    A dispute is the payer's bank taking back (part of) a captured payment; the provider
    tells us it opened (``needs_response``), that it is being reviewed, and how it ended
    (``won``: the money stays with the merchant, ``lost``: it goes back to the payer).
    """

    dispute_ref: str  # the provider's id of the dispute
    authorization_ref: str  # the provider's id of the disputed payment's authorization
    status: str  # needs_response, under_review, won or lost
    amount: int  # minor units disputed
    fee: int  # minor units the provider charges for the dispute
    currency: str
    reason: str = ""  # the provider's reason word (fraudulent, product_not_received, ...)
    evidence_due_by_s: float = 0.0  # when the provider stops taking evidence (0: not said)


class WebhookEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A verified provider event in the processor's words.

    A dispute event carries ``dispute`` (operation ``DISPUTE_EVIDENCE``, no idempotency
    key: the provider started it, not a call of ours); every other event is about a call of
    ours, named by its key.
    """

    event_id: str  # the provider's event id: webhooks are deduplicated on it
    operation: Operation
    idempotency_key: str  # the key of the call the event is about
    provider_ref: str
    outcome: Outcome  # APPROVED, DECLINED or FAILED (a webhook reports a settled state)
    amount: int
    occurred_at_s: float  # the provider's timestamp, used to ignore stale events
    decline_code: DeclineCode | None = None
    dispute: DisputeNotice | None = None


class SettlementLine(msgspec.Struct, frozen=True, kw_only=True):
    """One row of a provider's daily settlement report, normalised."""

    provider_ref: str
    idempotency_key: str
    operation: Operation
    amount: int  # minor units, always positive; ``operation`` says the direction
    currency: str
    fee: int  # minor units the provider kept
    settled_on: str  # ISO date
    # The provider's own id of the operation (its capture, refund or payout), when the
    # report names it; ``provider_ref`` is what our calls know it by (for a capture, the
    # authorization), shared by several partial captures.
    line_ref: str = ""


class SettlementFee(msgspec.Struct, frozen=True, kw_only=True):
    """A fee the provider charged on its own, tied to no transaction of ours (an account
    fee, a correction): a report that carries one is saying we owe it this."""

    fee_ref: str
    amount: int  # minor units, positive
    currency: str
    settled_on: str  # ISO date


class SettlementPayoutBatch(msgspec.Struct, frozen=True, kw_only=True):
    """What the provider transferred to (or took from) our bank account for one currency of
    the day: the net of its transactions and fees."""

    batch_ref: str
    currency: str
    net: int  # signed minor units: positive, the provider paid us; negative, we owe it
    entries: int  # how many transactions and fees it sums
    settled_on: str  # ISO date


class SettlementReport(msgspec.Struct, frozen=True, kw_only=True):
    """A provider's whole daily report, normalised: transactions, fees and payout batches."""

    lines: list[SettlementLine]
    fees: list[SettlementFee] = []
    batches: list[SettlementPayoutBatch] = []
