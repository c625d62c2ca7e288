"""The pure rules of webhook endpoints: where a tenant wants its payment events sent.

A tenant registers an endpoint (``POST /v1/webhook_endpoints``) with a URL and, optionally,
the event types it wants (none named: every type). The outbox relay then delivers that
tenant's events of those types to it, signed with the endpoint's own secret, with the
relay's retries and dead letters (actors/payments/outbox.py). This module decides what an
acceptable endpoint is; storage and sending live in ``actors``.

Why these URL rules: the URL is stored and later requested by the processor, so it must
be an absolute ``http``/``https`` URL with a host, printable ASCII (an IRI or a stray
space would be requested as something else than what the tenant saw), and carry no
credentials (``user:password@`` would be stored, listed and logged as part of the URL;
a consumer authenticates deliveries by their signature instead). A fragment is never
sent, so one is refused rather than silently dropped. The length cap is the outbox's
(``event_subscribers.url``, migration 0004).
"""

from __future__ import annotations

import base64
import enum
import urllib.parse
from typing import Annotated

import msgspec
from msgspec import Meta

from processor.errors import TxprocError, register
from processor.payments.disputes import DISPUTE_EVENT_TYPES
from processor.payments.saga import PaymentStatus, PayoutStatus

__all__ = [
    "ENDPOINTS_PER_TENANT_MAX",
    "ENDPOINT_ID_PATTERN",
    "EVENT_TYPES",
    "SECRET_BYTES",
    "SECRET_PREFIX",
    "URL_CHARS_MAX",
    "WebhookEndpointCode",
    "WebhookEndpointError",
    "WebhookEndpointRequest",
    "WebhookEndpointView",
    "check_endpoint",
    "endpoint_id_of",
    "secret_text",
]

URL_CHARS_MAX = 2048
# Enough for a tenant's environments and consumers; every endpoint costs a delivery row
# per matching event, so the count is bounded (Stripe allows 16 too).
ENDPOINTS_PER_TENANT_MAX = 16
EVENT_TYPES_MAX = 32
SECRET_BYTES = 32
# The Standard Webhooks form of a secret: "whsec_" and the key's base64. Libraries of that
# specification take it as it is; a hand-written verifier base64-decodes what follows.
SECRET_PREFIX = "whsec_"  # noqa: S105 - a format's prefix, not a secret
ENDPOINT_ID_PATTERN = "^we_[0-9a-f]{24}$"

# Every event type the outbox writes (actors/payments/store.py): a payment's or payout's
# new status, a dispute's, and a step set aside for an operator.
EVENT_TYPES: tuple[str, ...] = (
    *(f"payment.{status.value}" for status in PaymentStatus),
    "payment.requires_review",
    *(f"payout.{status.value}" for status in PayoutStatus),
    "payout.requires_review",
    *DISPUTE_EVENT_TYPES,
    "dispute.requires_review",
)
_EVENT_TYPES = frozenset(EVENT_TYPES)


class WebhookEndpointCode(enum.StrEnum):
    """Why an endpoint is refused; stable, each a 400 (docs/payments.md)."""

    url_invalid = "webhook_url_invalid"
    event_type_unknown = "webhook_event_type_unknown"


register(400, {
    "webhook_url_invalid": "the endpoint's URL is not an absolute http(s) URL within the rules",
    "webhook_event_type_unknown": "an event type the service does not send",
})
register(404, {"webhook_endpoint_not_found": "no webhook endpoint of the tenant has this id"})
register(422, {
    "webhook_endpoint_limit_reached": "the tenant already has as many endpoints as allowed",
})


class WebhookEndpointError(TxprocError, ValueError):
    """An endpoint request breaks a rule; ``code`` names the rule."""

    def __init__(self, code: WebhookEndpointCode, message: str) -> None:
        super().__init__(message, code=code.value)


EventType = Annotated[str, Meta(min_length=1, max_length=100)]


class WebhookEndpointRequest(msgspec.Struct, frozen=True, kw_only=True,
                             forbid_unknown_fields=True):
    """``POST /v1/webhook_endpoints``. ``events`` omitted or null: every event type."""

    # The length cap is checked by check_endpoint, so that it is webhook_url_invalid too.
    url: Annotated[str, Meta(min_length=1)]
    events: Annotated[list[EventType], Meta(min_length=1, max_length=EVENT_TYPES_MAX)] | None = (
        None)


class WebhookEndpointView(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An endpoint as the API shows it. ``secret`` only in the answer to its creation."""

    id: str
    url: str
    events: list[str]  # empty: every event type
    created_at: str  # RFC 3339, UTC
    secret: str = ""


def check_endpoint(request: WebhookEndpointRequest) -> tuple[str, tuple[str, ...]]:
    """The endpoint's URL and its event types (sorted, without repeats; empty for every
    type). Raises ``WebhookEndpointError`` naming the first rule broken: the URL's, then
    the event types'."""
    _check_url(request.url)
    events = tuple(sorted(set(request.events or ())))
    unknown = [e for e in events if e not in _EVENT_TYPES]
    if unknown:
        raise WebhookEndpointError(
            WebhookEndpointCode.event_type_unknown,
            f"unknown event type {unknown[0][:100]!r}; known: {', '.join(EVENT_TYPES)}")
    return request.url, events


def _check_url(url: str) -> None:
    def refuse(why: str) -> WebhookEndpointError:
        # The URL itself stays out of the message: it may carry a token.
        return WebhookEndpointError(WebhookEndpointCode.url_invalid, f"the url {why}")

    if len(url) > URL_CHARS_MAX:
        raise refuse(f"is longer than {URL_CHARS_MAX} characters")
    if not url.isascii() or not url.isprintable() or " " in url:
        raise refuse("must be printable ASCII without spaces (percent-encode the rest)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number 0-65535
    except ValueError:
        raise refuse("cannot be parsed") from None
    # As written (urlsplit lower-cases the scheme): the outbox's URL check is the same.
    if not url.startswith(("http://", "https://")) or parts.scheme not in ("http", "https"):
        raise refuse("must start with http:// or https:// (in lower case)")
    if not parts.hostname:
        raise refuse("must name a host")
    if parts.username is not None or parts.password is not None:
        raise refuse("must not carry credentials (user:password@); deliveries are signed")
    if parts.fragment or url.endswith("#"):
        raise refuse("must not have a fragment (it is never sent)")
    if port == 0:
        raise refuse("must not name port 0")


def endpoint_id_of(request_key: str) -> str:
    """The endpoint's id, from the creating request's identity (a hex digest): creating
    again after a lapsed Idempotency-Key claim finds the endpoint instead of a second one."""
    if len(request_key) < 24 or any(c not in "0123456789abcdef" for c in request_key[:24]):
        raise ValueError("a request key is a lower-case hex digest")
    return f"we_{request_key[:24]}"


def secret_text(secret: bytes) -> str:
    """The secret as the API shows it once: ``whsec_`` and its base64."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"an endpoint secret is {SECRET_BYTES} bytes")
    return SECRET_PREFIX + base64.b64encode(secret).decode("ascii")
