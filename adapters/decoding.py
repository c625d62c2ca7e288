"""What the adapters (and the simulators behind them) share when reading providers' answers.

Money as decimal text of major units, converted exactly or refused; wait hints in headers;
the ``ProviderReply`` shapes an adapter answers with, which repeat only the words its
provider documents; and the freshness check of a webhook's timestamp. Each provider's own
formats stay in its module; what is here has no provider quirk in it, only the provider's
name where a message needs one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

import msgspec

from adapters.base import (
    DeclineCode,
    Outcome,
    ProviderReply,
    ProviderRequest,
    WebhookEvent,
    WebhookRejected,
)

__all__ = [
    "WEBHOOK_BATCH_MAX",
    "Parse",
    "Replies",
    "batched_events",
    "decimal_to_minor",
    "header_seconds",
    "minor_to_decimal",
    "read_events",
    "require_fresh",
]

# An adapter's reading of an answer: (request, HTTP status, headers, body) -> reply.
Parse = Callable[[ProviderRequest, int, dict[str, str], bytes], ProviderReply]
# What decoding a body the provider would not send raises (ValueError: our own checks).
_UNREADABLE = (msgspec.DecodeError, msgspec.ValidationError, ValueError)

# The most events one webhook request may carry (a provider's batch); more is refused whole.
WEBHOOK_BATCH_MAX = 100


class _Envelope(msgspec.Struct, frozen=True):
    # Raw: left unread here (a union of Raw and None would not take an object).
    object: str = ""  # acme's list object says "list"
    data: msgspec.Raw = msgspec.Raw()  # acme's events (in a single event: its object)
    events: msgspec.Raw = msgspec.Raw()  # globex's


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])


def batched_events(provider: str, body: bytes) -> list[bytes] | None:
    """The events of a batched webhook body, each as the JSON it would be sent alone, in
    order; None when the body is a single event. A batch is acme's list object
    (``{"object": "list", "data": [...]}``) or globex's ``{"events": [...]}``, of 1 to
    ``WEBHOOK_BATCH_MAX`` events. Raises ``WebhookRejected`` (``webhook_malformed``) for a
    body that is not a JSON object, or a batch that is not a list within those bounds; the
    events themselves are the adapter's to read."""
    try:
        envelope = _ENVELOPE.decode(body)
        raw = envelope.data if envelope.object == "list" else envelope.events
        if not len(raw):
            return None
        items = _ITEMS.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise WebhookRejected("webhook_malformed", f"{provider} webhook body unreadable") from None
    if not 1 <= len(items) <= WEBHOOK_BATCH_MAX:
        raise WebhookRejected("webhook_malformed",
                              f"{provider} webhook batch of {len(items)} events: 1 to "
                              f"{WEBHOOK_BATCH_MAX} are taken")
    return [bytes(raw) for raw in items]


def read_events(provider: str, body: bytes,
                read: Callable[[bytes], WebhookEvent]) -> list[WebhookEvent]:
    """The events of a verified webhook body, in order: ``read(body)`` for a single event,
    ``read`` of each for a batch (``batched_events``)."""
    events = batched_events(provider, body)
    return [read(body)] if events is None else [read(e) for e in events]


# Up to 20 digits, then up to 8 decimals: beyond what any currency's amounts need, and small
# enough that Decimal never meets an exponent or a length it refuses.
_DECIMAL = re.compile(r"-?\d{1,20}(\.\d{1,8})?")


def decimal_to_minor(text: str, exponent: int, *, signed: bool = True) -> int:
    """Decimal text of major units (``"10.50"``) as minor units of a currency with
    ``exponent`` decimals (1050), exactly.

    Raises ``ValueError`` with "is not a decimal" for anything but digits with at most one
    point (and a leading minus when ``signed``), and "has more decimals than the currency"
    when the value is not a whole number of minor units.
    """
    if not _DECIMAL.fullmatch(text) or (not signed and text.startswith("-")):
        raise ValueError("is not a decimal")
    try:
        scaled = Decimal(text).scaleb(exponent)
    except InvalidOperation:
        raise ValueError("is not a decimal") from None
    if scaled != scaled.to_integral_value():
        raise ValueError("has more decimals than the currency")
    return int(scaled)


def minor_to_decimal(amount: int, exponent: int) -> str:
    """``amount`` minor units as decimal text of major units with ``exponent`` decimals
    (``1050, 2 -> "10.50"``; a minus sign when negative)."""
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), 10**exponent)
    if exponent == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:0{exponent}d}"


def header_seconds(text: str, *, cap_s: float, scale: float = 1.0) -> float | None:
    """A header's number times ``scale`` as seconds, at most ``cap_s``; None when it is not
    a finite number of at least 0 (an HTTP date included: an adapter has no clock)."""
    try:
        seconds = float(text.strip()) * scale
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, cap_s)


def require_fresh(provider: str, stamp_s: float, now_s: float, tolerance_s: float) -> None:
    """Raises ``WebhookRejected`` (``webhook_timestamp_out_of_tolerance``) when a webhook's
    timestamp is more than ``tolerance_s`` seconds from ``now_s``, either way."""
    if abs(now_s - stamp_s) > tolerance_s:
        raise WebhookRejected("webhook_timestamp_out_of_tolerance",
                              f"{provider} webhook timestamp too far from now")


class Replies:
    """The replies one provider's adapter answers with, named after the provider.

    ``safe`` keeps a provider word for ``ProviderReply.message`` only if the provider
    documents it (``known_words``), so nothing it echoes back (a token, a card number)
    reaches a log line.
    """

    def __init__(self, provider: str, known_words: frozenset[str]) -> None:
        self.provider = provider
        self.known_words = known_words

    def safe(self, text: str) -> str:
        return text if text in self.known_words else "unrecognised"

    def reply(self, outcome: Outcome, status: int, code: DeclineCode, word: str, *,
              provider_ref: str = "") -> ProviderReply:
        return ProviderReply(outcome=outcome, provider_ref=provider_ref, decline_code=code,
                             http_status=status,
                             message=f"{self.provider} {status} {self.safe(word)}")

    def unknown(self, status: int, why: str) -> ProviderReply:
        return ProviderReply(outcome=Outcome.UNKNOWN, http_status=status,
                             message=f"{self.provider} {status}: {why}")

    def read(self, parse: Parse, request: ProviderRequest, status: int,
             headers: dict[str, str], body: bytes, *, what: str = "answer") -> ProviderReply:
        """``parse``'s reply, or UNKNOWN ("unreadable <what>") when the answer cannot be
        decoded: an adapter's ``parse`` never raises on odd input."""
        try:
            return parse(request, status, headers, body)
        except _UNREADABLE:
            return self.unknown(status, f"unreadable {what}")
