"""The processor's vocabulary for payment providers, and the contract every adapter keeps.

An adapter is pure translation: it builds the HTTP request a provider expects
(``HttpCall``) and turns the provider's answer into a ``ProviderReply`` whose ``outcome`` is
one of the closed ``Outcome`` values. It does no I/O and keeps no state beyond its
credentials, so it is tested without a network; the ``ProviderActor`` (``actors/provider.py``)
sends the calls and owns timeouts, retries and the circuit breaker.

No provider quirk passes this boundary: status words, error bodies, signature schemes,
report formats and rate-limit headers stay inside ``adapters/<provider>.py``.
"""

from __future__ import annotations

import enum
from typing import ClassVar, Protocol

import httpx
import msgspec

__all__ = [
    "Adapter",
    "DeclineCode",
    "HttpCall",
    "Operation",
    "Outcome",
    "ProviderError",
    "ProviderOutcomeUnknown",
    "ProviderReply",
    "ProviderRequest",
    "ProviderUnavailable",
    "SettlementLine",
    "WebhookEvent",
    "WebhookRejected",
    "error_from_transport",
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


class ProviderReply(msgspec.Struct, frozen=True, kw_only=True):
    outcome: Outcome
    provider_ref: str = ""  # the provider's id of the authorization / refund / payout
    amount: int = 0  # the amount the provider says took effect (0 when nothing did)
    decline_code: DeclineCode | None = None
    http_status: int = 0  # 0 when no HTTP answer arrived
    retry_after_s: float = 0.0  # the provider asked us to wait this long (429 / 503)
    message: str = ""  # short, safe for logs: never a token, key or card data


class HttpCall(msgspec.Struct, frozen=True, kw_only=True):
    """An HTTP request an adapter wants sent, relative to the provider's base URL."""

    method: str
    path: str
    headers: dict[str, str] = {}
    body: bytes = b""


class WebhookEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A verified provider event in the processor's words."""

    event_id: str  # the provider's event id: webhooks are deduplicated on it
    operation: Operation
    idempotency_key: str  # the key of the call the event is about
    provider_ref: str
    outcome: Outcome  # APPROVED, DECLINED or FAILED (a webhook reports a settled state)
    amount: int
    occurred_at_s: float  # the provider's timestamp, used to ignore stale events
    decline_code: DeclineCode | None = None


class WebhookRejected(Exception):
    """A webhook that must not be believed; ``code`` is the stable error code answered."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # webhook_signature_invalid, webhook_timestamp_out_of_tolerance,
        # webhook_malformed


class SettlementLine(msgspec.Struct, frozen=True, kw_only=True):
    """One row of a provider's daily settlement report, normalised."""

    provider_ref: str
    idempotency_key: str
    operation: Operation
    amount: int  # minor units, always positive; ``operation`` says the direction
    currency: str
    fee: int  # minor units the provider kept
    settled_on: str  # ISO date


class Adapter(Protocol):
    """What every ``adapters/<provider>.py`` module's adapter class provides."""

    name: str
    currencies: frozenset[str]  # what it can authorize and pay out in
    timeout_s: float  # per-call timeout from the provider's SLA

    def build(self, request: ProviderRequest, now_s: float) -> HttpCall:
        """The call that performs ``request`` (signed or keyed as the provider wants)."""

    def parse(self, request: ProviderRequest, status: int, headers: dict[str, str],
              body: bytes) -> ProviderReply:
        """The provider's answer to ``build(request)``; never raises on odd input."""

    def build_status(self, request: ProviderRequest, now_s: float) -> HttpCall:
        """The call that asks what became of ``request``, by its idempotency key."""

    def parse_status(self, request: ProviderRequest, status: int, headers: dict[str, str],
                     body: bytes) -> ProviderReply:
        """The answer to ``build_status``; ``NOT_FOUND`` declines mean it never arrived."""

    def verify_webhook(self, headers: dict[str, str], body: bytes,
                       now_s: float) -> WebhookEvent:
        """The event, if its signature and timestamp hold; raises ``WebhookRejected``."""

    def parse_settlement(self, report: bytes) -> list[SettlementLine]:
        """The provider's daily settlement report in its own format, normalised."""


class ProviderError(Exception):
    """A provider call that did not produce an answer the saga can act on.

    Retry policies read ``retryable`` and never parse messages; ``outcome`` is what the saga
    records for the step.
    """

    retryable: ClassVar[bool] = False
    outcome: ClassVar[Outcome] = Outcome.FAILED

    def __init__(self, message: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderUnavailable(ProviderError):
    """Certainly not performed: not sent, refused with 429/503, or our breaker is open."""

    retryable = True
    outcome = Outcome.RETRYABLE


class ProviderOutcomeUnknown(ProviderError):
    """Perhaps performed: the request may have left and no answer came back."""

    retryable = False  # never resent blindly; a status query with the same key settles it
    outcome = Outcome.UNKNOWN


def error_from_transport(exc: httpx.HTTPError) -> ProviderError:
    """The one translation of the HTTP client's exceptions into the adapters' error tree.

    A connection that was never established sent nothing, so the call certainly did not
    take effect and may be retried. Once the request may have left (a read timeout, a
    connection reset after sending), only the provider knows: the outcome is unknown and
    is settled by a status query with the same idempotency key, never by a guess.
    """
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return ProviderUnavailable(f"not sent: {type(exc).__name__}")
    return ProviderOutcomeUnknown(f"no answer: {type(exc).__name__}")
