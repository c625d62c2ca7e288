"""The processor's vocabulary for payment providers, and the contract every adapter keeps.

An adapter is pure translation: it builds the HTTP request a provider expects
(``HttpCall``) and turns the provider's answer into a ``ProviderReply`` whose ``outcome`` is
one of the closed ``Outcome`` values. It does no I/O and keeps no state beyond its
credentials, so it is tested without a network; the ``ProviderClient``
(``actors/payments/provider.py``) sends the calls and owns timeouts, retries and the circuit
breaker.

No provider quirk passes this boundary: status words, error bodies, signature schemes,
report formats and rate-limit headers stay inside ``adapters/<provider>.py``.
"""

from __future__ import annotations

from typing import ClassVar, Protocol
from urllib.parse import quote

import aiohttp
import msgspec

from processor.errors import TxprocError, register
from processor.payments import (
    DeclineCode,
    DisputeNotice,
    Operation,
    Outcome,
    ProviderReply,
    ProviderRequest,
    SettlementFee,
    SettlementLine,
    SettlementPayoutBatch,
    SettlementReport,
    WebhookEvent,
)

__all__ = [
    "Adapter",
    "DeclineCode",
    "DisputeNotice",
    "HttpCall",
    "Operation",
    "Outcome",
    "ProviderError",
    "ProviderOutcomeUnknown",
    "ProviderReply",
    "ProviderRequest",
    "ProviderUnavailable",
    "SettlementFee",
    "SettlementLine",
    "SettlementPayoutBatch",
    "SettlementReport",
    "WebhookEvent",
    "WebhookRejected",
    "error_from_transport",
    "header",
    "path_segment",
]


class HttpCall(msgspec.Struct, frozen=True, kw_only=True):
    """An HTTP request an adapter wants sent, relative to the provider's base URL."""

    method: str
    path: str
    headers: dict[str, str] = {}
    body: bytes = b""


register(400, {"webhook_malformed": "the provider's webhook cannot be read"})
register(401, {
    "webhook_signature_invalid": "the webhook's signature is missing or does not match",
    "webhook_timestamp_out_of_tolerance": "the webhook's timestamp is too far from now",
})


class WebhookRejected(TxprocError):
    """A webhook that must not be believed; ``code`` is the stable error code answered:
    ``webhook_signature_invalid``, ``webhook_timestamp_out_of_tolerance`` or
    ``webhook_malformed``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class Adapter(Protocol):
    """What every ``adapters/<provider>.py`` module's adapter class provides."""

    name: str
    currencies: frozenset[str]  # what it can authorize and pay out in
    timeout_s: float  # per-call timeout from the provider's SLA
    # Operations beyond authorize, capture, void, refund and payout that the provider
    # offers (``Operation.INCREMENT``). The engine refuses the others before any call, so
    # ``build`` never sees them.
    capabilities: frozenset[Operation]

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

    def verify_webhooks(self, headers: dict[str, str], body: bytes,
                        now_s: float) -> list[WebhookEvent]:
        """The events of one webhook request, in order: the one event, or a batch's
        (``adapters.decoding.batched_events``), if the signature over the whole body and
        its timestamp hold; raises ``WebhookRejected``, refusing the whole request, for a
        bad signature or any event it cannot read."""

    def parse_settlement(self, report: bytes) -> list[SettlementLine]:
        """The transactions of the provider's daily settlement report, normalised."""

    def parse_report(self, report: bytes) -> SettlementReport:
        """The whole daily report: transactions, fees on their own, payout batches; raises
        ``ValueError`` for a report that does not add up."""

    def build_settlement(self, settled_on: str, now_s: float) -> HttpCall:
        """The authenticated call that fetches the report of ``settled_on`` (ISO date)."""


class ProviderError(TxprocError):
    """A provider call that did not produce an answer the saga can act on.

    Retry policies read ``retryable`` and never parse messages; ``outcome`` is what the saga
    records for the step, and decides the answer: ``code`` is the one a request ends with
    when the error is its last word (an unknown outcome answers 202, not an error).
    """

    code = "payment_failed"
    retryable: ClassVar[bool] = False
    outcome: ClassVar[Outcome] = Outcome.FAILED

    def __init__(self, message: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderUnavailable(ProviderError):
    """Certainly not performed: not sent, refused with 429/503, or our breaker is open."""

    code = "provider_unavailable"
    retryable = True
    outcome = Outcome.RETRYABLE


class ProviderOutcomeUnknown(ProviderError):
    """Perhaps performed: the request may have left and no answer came back."""

    retryable = False  # never resent blindly; a status query with the same key settles it
    outcome = Outcome.UNKNOWN


def error_from_transport(exc: aiohttp.ClientError | TimeoutError) -> ProviderError:
    """The one translation of the HTTP client's exceptions into the adapters' error tree.

    A connection that was never established sent nothing, so the call certainly did not
    take effect and may be retried: it was refused, could not be made in time, or no pooled
    connection came free in time. Once the request may have left (a read timeout, the
    attempt's deadline, a connection reset or closed after sending), only the provider
    knows: the outcome is unknown and is settled by a status query with the same
    idempotency key, never by a guess.
    """
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return ProviderUnavailable(f"not sent: {type(exc).__name__}")
    return ProviderOutcomeUnknown(f"no answer: {type(exc).__name__}")


def header(headers: dict[str, str], name: str) -> str:
    """The value of header ``name`` (given in lower case), matched without regard to case;
    empty when absent."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return ""


def path_segment(provider: str, value: str, what: str = "provider_ref") -> str:
    """``value`` quoted as one URL path segment; a ValueError naming ``what`` if empty."""
    if not value:
        raise ValueError(f"{provider}: {what} is required for this operation")
    return quote(value, safe="")
