"""What the payments endpoints do, apart from HTTP plumbing (which is in http_api.py).

Every state-changing payments endpoint runs through ``Idempotent.run``: the
Idempotency-Key is checked before the body, the request is refused if it carries a card
number, the key is claimed atomically in PostgreSQL with the request's fingerprint, and the
answer is stored with the key so a repeat replays it (``Idempotent-Replayed: true``). A
request that did nothing (refused as malformed, or turned away because the ledger or every
provider was unavailable) releases its key, so the client may send it again unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from actors.ops import metrics
from actors.payments.engine import (
    REQUEST_AUDIT,
    REQUEST_ORIGIN,
    PaymentsEngine,
    dispute_view,
    payment_view,
    payout_view,
    refund_view,
    step_key_of,
)
from actors.payments.reconciliation import (
    RECONCILIATION_ERROR_STATUS,
    RECONCILIATION_OPERATIONS,
    Reconciler,
    ReconciliationRefused,
    serve_operation,
)
from actors.payments.store import DATABASE_UNREACHABLE, KeyHold, KeyTaken
from actors.payments.webhook_endpoints import (
    ENDPOINT_OPERATIONS,
    EndpointRefused,
    decode_endpoint_request,
    serve_endpoint_operation,
)
from adapters.base import Adapter, WebhookEvent, WebhookRejected
from processor.cardscan import contains_card_number, find_card_number
from processor.errors import TxprocError, Unavailable, register, statuses
from processor.identity import tenant_of_principal
from processor.payments import (
    AuthorizeRequest,
    CaptureRequest,
    Decision,
    DisputeError,
    DisputesPage,
    DisputeView,
    EvidenceRequest,
    IdempotencyError,
    IncrementRequest,
    ListCode,
    ListError,
    ListQuery,
    PartialCaptureRequest,
    PaymentError,
    PaymentsPage,
    PaymentView,
    PayoutRequest,
    PayoutsPage,
    PayoutView,
    RefundRequest,
    RefundsPage,
    check_evidence,
    check_key,
    check_list_query,
    check_metadata,
    decide,
    encode_cursor,
    fingerprint,
)
from processor.request_audit import AUDIT_HEADER, AuditSlot, decode_header

__all__ = [
    "AUDITED_OPERATIONS",
    "EVENTS_PAGE_MAX",
    "EVENT_TYPE_PATTERN",
    "OPERATION_SCOPES",
    "ORIGIN_HEADER",
    "PAYMENT_ERROR_STATUS",
    "EventsPage",
    "EventsQuery",
    "Idempotent",
    "PaymentFailure",
    "Payments",
    "PaymentsApiError",
    "PaymentsEndpoint",
    "WebhookAnswer",
    "dispatch",
    "error_body",
    "payment_status",
    "payout_status",
    "scan_for_card_data",
]

# The header the edge forwards a request's audit record id in (actors/edge/audit.py).
ORIGIN_HEADER = "txproc-origin"

log = logging.getLogger("txproc.payments.http")
ENCODER = msgspec.json.Encoder()

register(400, {"card_data_not_allowed": "the body holds what looks like a card number"})
register(404, {"webhook_provider_unknown": "no provider has the webhook URL's name"})
# Every error code of the payments endpoints, with its HTTP status (the registry's).
PAYMENT_ERROR_STATUS: dict[str, int] = statuses((
    "idempotency_key_missing", "idempotency_key_invalid", "card_data_not_allowed",
    "webhook_malformed", "webhook_signature_invalid", "webhook_timestamp_out_of_tolerance",
    "payment_declined", "risk_declined", "payment_not_found", "payout_not_found",
    "webhook_provider_unknown", "idempotency_key_in_use", "operation_in_progress",
    "idempotency_key_reused", "payment_not_capturable", "capture_exceeds_authorized",
    "capture_not_found", "authorization_expired", "increment_not_supported",
    "payment_not_incrementable", "increment_exceeds_maximum", "payment_not_voidable",
    "payment_not_refundable", "refund_exceeds_captured", "merchant_account_not_found",
    "insufficient_funds", "currency_mismatch", "currency_not_supported", "provider_unknown",
    "amount_must_be_positive", "payment_failed", "payout_failed", "invalid_body", "malformed_json",
    "provider_unavailable", "invalid_query", "invalid_cursor", "invalid_metadata",
    "webhook_url_invalid", "webhook_event_type_unknown", "webhook_endpoint_not_found",
    "webhook_endpoint_limit_reached", "invalid_evidence", "dispute_not_found", "dispute_not_open",
    "evidence_deadline_passed", "evidence_not_accepted",
    *RECONCILIATION_ERROR_STATUS,
))


class PaymentsApiError(TxprocError):
    """A payments request refused with an HTTP status and a stable error code."""

    def __init__(self, code: str, message: str, *, body: bytes = b"",
                 retry_after_s: int = 0) -> None:
        super().__init__(message, code=code)
        self.status = PAYMENT_ERROR_STATUS[code]
        self.body = body  # a full JSON answer, when the error carries the payment
        self.retry_after_s = retry_after_s


def _database_away(exc: BaseException) -> Unavailable:
    """What a request meets when PostgreSQL cannot be reached, or did not answer within the
    pool's acquire or statement timeout: 503 with Retry-After (the edge's answer to
    ``Unavailable``). Nothing the request decided is lost: what committed stands, and its
    Idempotency-Key claim lapses or is released, so the same request may be sent again."""
    log.warning("payments database unavailable: %s", type(exc).__name__)
    return Unavailable("the payments database is unavailable; send the request again",
                       retry_after_s=1.0)


def error_body(code: str, message: str) -> bytes:
    return ENCODER.encode({"error": {"code": code, "message": message}})


def api_error_of(exc: PaymentError) -> PaymentsApiError:
    code = exc.code if exc.code in PAYMENT_ERROR_STATUS else "payment_failed"
    return PaymentsApiError(code, str(exc))


class ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str


class PaymentFailure(msgspec.Struct, frozen=True, kw_only=True):
    """A refused payment or payout operation, with the object as it now stands."""

    error: ErrorBody
    payment: PaymentView | None = None
    payout: PayoutView | None = None


def payment_status(view: PaymentView, *, created: bool) -> tuple[int, bytes]:
    """The HTTP answer for a payment after an operation on it.

    The newest operation decides: succeeded -> 201 (a new payment) or 200; still
    processing -> 202 (the recovery worker finishes it; GET shows the outcome); declined ->
    402; providers unavailable -> 503; undone or refused otherwise -> 422.
    """
    last = view.operations[-1] if view.operations else None
    if view.status == "declined" and view.error == "risk_declined":
        return _failure("risk_declined", f"the risk check declined it: {view.risk_reason}",
                        payment=view)
    if last is None or last.status == "succeeded":
        return (201 if created else 200), ENCODER.encode(view)
    if last.status == "processing":
        return 202, ENCODER.encode(view)
    if last.error == "provider_declined":
        return _failure("payment_declined", f"the provider declined it: {last.decline_code}",
                        payment=view)
    if last.error == "provider_unavailable":
        raise PaymentsApiError("provider_unavailable",
                               "no provider could take the operation; nothing was done",
                               retry_after_s=1)
    return _failure("payment_failed", f"the {last.kind} failed: {last.error}", payment=view)


def _kept_creation(view: PaymentView) -> tuple[int, bytes] | None:
    """A new payment's answer as its Idempotency-Key keeps it, or None when it is not kept
    (``payment_status`` raises: no provider took it, so the request may be sent again)."""
    try:
        return payment_status(view, created=True)
    except PaymentsApiError:
        return None


def payout_status(view: PayoutView) -> tuple[int, bytes]:
    if view.status == "paid":
        return 201, ENCODER.encode(view)
    if view.status == "processing":
        return 202, ENCODER.encode(view)
    if view.error == "provider_unavailable":
        raise PaymentsApiError("provider_unavailable",
                               "no provider could take the payout; nothing was done",
                               retry_after_s=1)
    if view.error == "provider_declined":
        return _failure("payment_declined", f"the provider declined it: {view.decline_code}",
                        payout=view)
    return _failure("payout_failed", f"the payout failed: {view.error}", payout=view)


def evidence_status(view: DisputeView, submission: str) -> tuple[int, bytes]:
    """The answer to an evidence submission: 200 with the dispute (now under review) when
    the provider took it, 202 while its answer is unknown (the recovery worker asks it),
    422 ``evidence_not_accepted`` when it refused or could not be reached (the dispute's
    ``error`` says which; send again with a new Idempotency-Key)."""
    if submission == "succeeded":
        return 200, ENCODER.encode(view)
    if submission == "processing":
        return 202, ENCODER.encode(view)
    return (PAYMENT_ERROR_STATUS["evidence_not_accepted"],
            error_body("evidence_not_accepted",
                       f"the provider did not take the evidence: {view.error}"))


def _failure(code: str, message: str, *, payment: PaymentView | None = None,
             payout: PayoutView | None = None) -> tuple[int, bytes]:
    body = PaymentFailure(error=ErrorBody(code, message), payment=payment, payout=payout)
    return PAYMENT_ERROR_STATUS[code], ENCODER.encode(body)


def scan_for_card_data(headers: dict[str, str], body: bytes) -> None:
    """Refuse a request that carries a card number anywhere, without quoting it."""
    for name, value in headers.items():
        lowered = name.lower()
        if lowered == "authorization":
            continue
        if lowered == "idempotency-key":
            # Random keys (UUIDs, hex) hold digit runs by chance: about one 32-digit hex key
            # in 450 holds a Luhn-valid run of 13 or more. Only a key that IS a card number
            # is refused, so no key is ever stored that is one (and no random key is).
            if _WHOLE_NUMBER.fullmatch(value.strip()) and contains_card_number(value):
                raise PaymentsApiError("card_data_not_allowed",
                                       "the Idempotency-Key is a card number")
            continue
        if contains_card_number(value):
            raise PaymentsApiError("card_data_not_allowed",
                                   f"the header {name} holds a card number; send a "
                                   "payment-method token from the provider instead")
    try:
        decoded: Any = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        if contains_card_number(body.decode("utf-8", "replace")):
            raise PaymentsApiError("card_data_not_allowed", "the body holds a card number"
                                   ) from None
        return
    path = find_card_number(decoded)
    if path is not None:
        raise PaymentsApiError("card_data_not_allowed",
                               f"{path} holds a card number; send a payment-method token "
                               "from the provider instead")


class Idempotent:
    """The Idempotency-Key discipline around one state-changing request."""

    def __init__(self, engine: PaymentsEngine, *, clock_s: Callable[[], float],
                 retention_s: float, claim_ttl_s: float) -> None:
        self._engine = engine
        self._clock_s = clock_s
        self._retention_s = retention_s
        self._claim_ttl_s = claim_ttl_s

    async def run(self, *, principal: str, key_header: str | None, fingerprint_: bytes,
                  execute: Callable[[], Awaitable[tuple[int, bytes]]],
                  hold: KeyHold | None = None,
                  defer_claim: bool = False) -> tuple[int, bytes, dict[str, str]]:
        """Returns (status, body, extra headers). ``execute`` runs at most once per key.

        ``fingerprint_`` identifies the request (method, canonical path and body); the same
        key with another fingerprint is refused. ``hold``, when given, is filled in with the
        claim before ``execute`` runs; if ``execute`` stored its answer under the claim
        itself (``hold.answered``), it is not stored again.

        ``defer_claim`` (with ``hold``): the key is not claimed first; ``execute``'s first
        write claims it in the same statement (``PaymentStore.create_payment``), which saves
        a statement and a commit per request. If that write finds the key taken
        (``KeyTaken``: nothing was written), or ``execute`` is refused before writing and
        the key turns out taken when its answer is stored, the request is decided as if its
        claim had failed up front: replayed, refused, or claimed and executed again.
        """
        key = key_header or ""
        if defer_claim and hold is not None:
            now_s = self._clock_s()
            hold.principal, hold.key, hold.claim, hold.answered = principal, key, 0, False
            hold.deferred, hold.fingerprint = True, fingerprint_
            hold.now_s, hold.retention_s = now_s, self._retention_s
            try:
                return await self._execute(hold, execute)
            except KeyTaken:
                hold.deferred, hold.claim = False, 0
        return await self._claimed_run(principal, key, fingerprint_, execute,
                                       hold or KeyHold())

    async def _claimed_run(self, principal: str, key: str, print_: bytes,
                           execute: Callable[[], Awaitable[tuple[int, bytes]]],
                           hold: KeyHold) -> tuple[int, bytes, dict[str, str]]:
        """Claim the key (or replay, or refuse), then execute."""
        store = self._engine.store
        now_s = self._clock_s()
        claim = await store.claim_key(principal, key, print_, now_s=now_s,
                                      retention_s=self._retention_s, audit=REQUEST_AUDIT.get())
        if not claim:
            stored = await store.load_key(principal, key, now_s=now_s)
            decision = decide(stored, print_, now_s, self._claim_ttl_s)
            if decision == Decision.replay and stored is not None:
                return stored.status, stored.body, {"Idempotent-Replayed": "true"}
            if decision == Decision.mismatch:
                raise PaymentsApiError("idempotency_key_reused",
                                       "this Idempotency-Key was used with another request")
            if decision == Decision.take_over:
                claim = await store.claim_key(
                    principal, key, print_, now_s=now_s, retention_s=self._retention_s,
                    stale_before_s=now_s - self._claim_ttl_s)
            elif decision == Decision.execute:  # expired between the two reads
                claim = await store.claim_key(principal, key, print_, now_s=now_s,
                                              retention_s=self._retention_s)
            if not claim:
                raise PaymentsApiError("idempotency_key_in_use",
                                       "a request with this Idempotency-Key is in progress")
        hold.principal, hold.key, hold.claim, hold.answered = principal, key, claim, False
        return await self._execute(hold, execute)

    async def _execute(self, hold: KeyHold,
                       execute: Callable[[], Awaitable[tuple[int, bytes]]]
                       ) -> tuple[int, bytes, dict[str, str]]:
        """Run ``execute`` under ``hold`` and keep or release the key by its outcome. A
        deferred hold still unclaimed when ``execute`` ends has nothing to release; its
        answer is stored by claiming the key completed (``KeyTaken`` if it was taken)."""
        try:
            status, answer = await execute()
        except PaymentsApiError as exc:
            if exc.status >= 500 or exc.code in TRANSIENT_CODES:
                await self._release(hold)
                raise
            answer = exc.body or error_body(exc.code, str(exc))
            await self._complete(hold, exc.status, answer)
            return exc.status, answer, {}
        except PaymentError as exc:
            if exc.code in TRANSIENT_CODES:
                # Another request on the payment (or this one, resumed elsewhere) is still
                # running: not an answer to keep. The key is freed for the retry.
                await self._release(hold)
                raise PaymentsApiError(
                    "operation_in_progress",
                    "another operation on this payment is still running; retry") from exc
            error = api_error_of(exc)
            answer = error_body(error.code, str(exc))
            await self._complete(hold, error.status, answer)
            return error.status, answer, {}
        except KeyTaken:
            raise
        except BaseException:
            # Nothing durable was decided (the ledger or the database was away): let the
            # client repeat the same request with the same key.
            if not hold.answered:
                await self._release(hold)
            raise
        if not hold.answered:
            await self._complete(hold, status, answer)
        return status, answer, {}

    async def _complete(self, hold: KeyHold, status: int, answer: bytes) -> None:
        """Store the final answer, if this request still holds the key (or, deferred and
        never claimed, if the key is free: ``KeyTaken`` otherwise)."""
        store = self._engine.store
        if hold.deferred:
            if not await store.answer_key(hold, status=status, body=answer,
                                          audit=REQUEST_AUDIT.get()):
                raise KeyTaken
            hold.deferred = False
            return
        if not await store.complete_key(hold.principal, hold.key, claim=hold.claim,
                                        status=status, body=answer):
            # The claim lapsed and another request took the key over: its answer stands
            # (both describe the same durable objects; this one is still sent back).
            metrics.IDEMPOTENCY_FENCED.labels("complete").inc()
            log.warning("an Idempotency-Key claim lapsed before its answer was stored")

    async def _release(self, hold: KeyHold) -> None:
        if hold.deferred:
            return  # never claimed: nothing to release
        if not await self._engine.store.release_key(hold.principal, hold.key,
                                                    claim=hold.claim):
            metrics.IDEMPOTENCY_FENCED.labels("release").inc()


# Event types as the outbox writes them (migration 0004), and the largest page of events.
EVENT_TYPE_PATTERN = "^[a-z][a-z0-9_]*(\\.[a-z][a-z0-9_]*)*$"
EVENTS_PAGE_MAX = 1000


class EventsQuery(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``GET /v1/events``: events after the id ``after``, oldest first; of one ``type``
    when given; at most ``limit``."""

    after: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    type: Annotated[str, msgspec.Meta(pattern=EVENT_TYPE_PATTERN, max_length=100)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=EVENTS_PAGE_MAX)] = 100


class EventView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    type: str
    object_id: str  # the payment or payout the event is about
    created_at: str  # RFC 3339, UTC
    data: dict[str, Any]  # the object as it stood after the change


class EventsPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[EventView]
    # Send as ``after`` to read on: the last event's id, or the ``after`` given when none
    # came yet (a stream has no end).
    next_cursor: str


_EVENTS_QUERY = msgspec.json.Decoder(EventsQuery)


async def _events_page(engine: PaymentsEngine, principal: str, body: bytes) -> bytes:
    """The tenant's events after a cursor (the edge has checked the query)."""
    try:
        query = _EVENTS_QUERY.decode(body or b"{}")
    except msgspec.ValidationError as exc:
        raise PaymentsApiError("invalid_body", str(exc)[:300]) from exc
    rows = await engine.store.events_after(principal, after=query.after,
                                           event_type=query.type, limit=query.limit)
    page = [EventView(id=r["id"], type=r["event_type"], object_id=r["aggregate_id"],
                      created_at=r["created_at"].isoformat(),
                      data=msgspec.json.decode(r["payload"])) for r in rows]
    cursor = page[-1].id if page else query.after
    return ENCODER.encode(EventsPage(data=page, next_cursor=str(cursor)))


_LIST_QUERY = msgspec.json.Decoder(ListQuery)


async def _list_page(engine: PaymentsEngine, principal: str, kind: str, body: bytes) -> bytes:
    """A page of the tenant's payments, payouts or refunds (processor/payments/listing.py).
    Raises ``ListError`` for a query or cursor that does not hold."""
    try:
        query = _LIST_QUERY.decode(body or b"{}")
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # A value of the wrong type or out of range (validation errors are decode errors).
        raise ListError(ListCode.invalid_query, str(exc)[:300]) from exc
    flt = check_list_query(kind, query)
    tenant = str(tenant_of_principal(principal))
    store = engine.store
    if kind == "payments":
        payments, last = await store.list_payments(tenant, flt)
        page: PaymentsPage | PayoutsPage | RefundsPage = PaymentsPage(
            data=[payment_view(p, steps) for p, steps in payments],
            next_cursor=None if last is None else encode_cursor(kind, last))
    elif kind == "payouts":
        payouts, last = await store.list_payouts(tenant, flt)
        page = PayoutsPage(data=[payout_view(p) for p in payouts],
                           next_cursor=None if last is None else encode_cursor(kind, last))
    elif kind == "refunds":
        refunds, last = await store.list_refunds(tenant, flt)
        page = RefundsPage(data=[refund_view(r) for r in refunds],
                           next_cursor=None if last is None else encode_cursor(kind, last))
    else:
        disputes, last = await store.list_disputes(tenant, flt)
        return ENCODER.encode(DisputesPage(
            data=[dispute_view(d) for d in disputes],
            next_cursor=None if last is None else encode_cursor(kind, last)))
    return ENCODER.encode(page)


def _with_metadata(item: Any) -> Any:
    """The decoded request with its metadata checked (``invalid_metadata`` otherwise)."""
    if item is None or not hasattr(item, "metadata"):
        return item
    try:
        return msgspec.structs.replace(item, metadata=check_metadata(item.metadata))
    except ListError as exc:
        raise PaymentsApiError(exc.code, str(exc)) from exc


def require_key(header: str | None) -> str:
    try:
        return check_key(header)
    except IdempotencyError as exc:
        raise PaymentsApiError(exc.code, str(exc)) from exc


class EmptyRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A body that may be absent or ``{}`` and carries nothing."""


class WebhookAnswer(msgspec.Struct, frozen=True, omit_defaults=True):
    status: str  # applied, duplicate or ignored; "batch" for a batch, with each event's
    statuses: list[str] | None = None


_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "authorize": msgspec.json.Decoder(AuthorizeRequest),
    "capture": msgspec.json.Decoder(CaptureRequest),
    "create_capture": msgspec.json.Decoder(PartialCaptureRequest),
    "increment": msgspec.json.Decoder(IncrementRequest),
    "void": msgspec.json.Decoder(EmptyRequest),
    "refund": msgspec.json.Decoder(RefundRequest),
    "payout": msgspec.json.Decoder(PayoutRequest),
    "submit_evidence": msgspec.json.Decoder(EvidenceRequest),
}
# The operations whose audit record the edge hands over for this actor to write
# (processor/request_audit.py): each claims its Idempotency-Key with its first write
# (``PaymentStore.claim_key``, or ``create_payment`` for an authorization), which writes
# the record in the same statement.
AUDITED_OPERATIONS = frozenset(_DECODERS)
_BODY_REQUIRED = frozenset({"authorize", "payout", "create_capture", "increment",
                            "submit_evidence"})
# Operations on an existing payment, named by its id.
_ON_PAYMENT = frozenset({"capture", "create_capture", "void", "refund", "increment"})
# Refusals that describe a moment, not the request: they are answered but never stored as
# the key's answer, so a retry with the same key runs again.
TRANSIENT_CODES = frozenset({"operation_in_progress", "step_exists"})
# The authorization latency histogram's outcome label, by the answer's status.
_AUTHORIZATION_OUTCOMES = {201: "authorized", 202: "processing", 402: "declined",
                           503: "failed"}
# The scope each payments operation needs (HTTP routes and RPC calls alike).
OPERATION_SCOPES: dict[str, str] = {
    "authorize": "payments:write", "capture": "payments:write",
    "create_capture": "payments:write", "increment": "payments:write",
    "void": "payments:write",
    "refund": "payments:write", "payout": "payouts:write", "get_payment": "payments:read",
    "get_payout": "payments:read", "list_events": "events:read",
    "list_payments": "payments:read", "list_payouts": "payments:read",
    "list_refunds": "payments:read",
    "create_webhook_endpoint": "webhooks:write", "list_webhook_endpoints": "webhooks:read",
    "get_webhook_endpoint": "webhooks:read", "delete_webhook_endpoint": "webhooks:write",
    "get_dispute": "payments:read", "list_disputes": "payments:read",
    "submit_evidence": "disputes:write",
    **RECONCILIATION_OPERATIONS,
}
# The list operations, by the kind of object they list (processor.payments.LIST_KINDS).
LIST_OPERATIONS = {"list_payments": "payments", "list_payouts": "payouts",
                   "list_refunds": "refunds", "list_disputes": "disputes"}
_PAYMENT_ID = re.compile(r"pay_[0-9a-f]{24}")
_WHOLE_NUMBER = re.compile(r"[0-9][0-9 _-]{11,30}[0-9]")
_PAYOUT_ID = re.compile(r"po_[0-9a-f]{24}")
_DISPUTE_ID = re.compile(r"dp_[0-9a-f]{24}")
_CANONICAL_PATHS = {
    "authorize": "/v1/payments", "capture": "/v1/payments/{}/capture",
    "create_capture": "/v1/payments/{}/captures",
    "increment": "/v1/payments/{}/increments",
    "void": "/v1/payments/{}/void", "refund": "/v1/payments/{}/refunds",
    "payout": "/v1/payouts", "create_webhook_endpoint": "/v1/webhook_endpoints",
    "submit_evidence": "/v1/disputes/{}/evidence",
}


def request_key_of(principal: str, key: str, fingerprint_: bytes) -> str:
    """A request's identity: its principal, Idempotency-Key and fingerprint, hashed.

    Payment and payout ids derive from it, so executing the same request twice (after a
    lapsed claim) finds what the first execution created.
    """
    digest = hashlib.sha256()
    for part in (principal.encode(), key.encode(), fingerprint_):
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class Payments:
    """What the payments endpoints need: the engine, the key discipline, and the adapters
    that verify each provider's webhooks."""

    engine: PaymentsEngine
    idempotent: Idempotent
    adapters: dict[str, Adapter]
    # Settlement reconciliation (None where it does not run: its routes answer so).
    reconciler: Reconciler | None = None


def _decode(operation: str, body: bytes) -> Any:
    if not body.strip() and operation not in _BODY_REQUIRED:
        return None
    try:
        return _DECODERS[operation].decode(body)
    except msgspec.ValidationError as exc:
        raise PaymentsApiError("invalid_body", str(exc)[:300]) from exc
    except msgspec.DecodeError as exc:
        raise PaymentsApiError("malformed_json", str(exc)[:300]) from exc
    except UnicodeDecodeError as exc:  # a string that is not UTF-8
        raise PaymentsApiError("malformed_json", "the body is not valid UTF-8") from exc
    except RecursionError as exc:
        raise PaymentsApiError("malformed_json", "the body nests too deeply") from exc


async def dispatch(payments: Payments, *, principal: str, operation: str, key: str | None,
                   subject_id: str, body: bytes, headers: dict[str, str],
                   path: str = "") -> tuple[int, bytes, dict[str, str]]:
    """Serve one payments operation for HTTP and RPC alike: (status, JSON body, headers).

    Raises ``PaymentsApiError`` / ``PaymentError`` for refusals (the caller answers them).
    The canonical path (not the one the client spelled) enters the fingerprint, so HTTP
    and RPC requests with the same key and body are the same request.
    """
    started = time.perf_counter()
    engine = payments.engine
    if operation == "get_payment":
        if _PAYMENT_ID.fullmatch(subject_id) is None:
            raise PaymentsApiError("payment_not_found", "no payment has this id")
        view = await engine.payment(subject_id, principal=principal)
        return 200, ENCODER.encode(view), {}
    if operation == "get_payout":
        if _PAYOUT_ID.fullmatch(subject_id) is None:
            raise PaymentsApiError("payout_not_found", "no payout has this id")
        payout = await engine.get_payout(subject_id, principal=principal)
        return 200, ENCODER.encode(payout), {}
    if operation == "get_dispute":
        if _DISPUTE_ID.fullmatch(subject_id) is None:
            raise PaymentsApiError("dispute_not_found", "no dispute has this id")
        return 200, ENCODER.encode(await engine.get_dispute(subject_id,
                                                            principal=principal)), {}
    if operation == "list_events":
        return 200, await _events_page(engine, principal, body), {}
    if operation in LIST_OPERATIONS:
        return 200, await _list_page(engine, principal, LIST_OPERATIONS[operation], body), {}
    if operation in RECONCILIATION_OPERATIONS:
        status, reconciled = await serve_operation(
            payments.reconciler, principal=principal, operation=operation,
            subject_id=subject_id, body=body, origin=REQUEST_ORIGIN.get())
        return status, reconciled, {}
    if operation in ENDPOINT_OPERATIONS:
        return await _endpoint_operation(payments, principal=principal, operation=operation,
                                         key=key, subject_id=subject_id, body=body,
                                         headers=headers)
    if operation not in _DECODERS:
        raise PaymentsApiError("invalid_body", f"no payments operation is named {operation}")
    checked_key = require_key(key)
    scan_for_card_data(headers, body)
    item = _with_metadata(_decode(operation, body))
    if operation in _ON_PAYMENT and _PAYMENT_ID.fullmatch(subject_id) is None:
        raise PaymentsApiError("payment_not_found", "no payment has this id")
    if operation == "submit_evidence":
        # Bounded before the key is claimed, as metadata is: a bad body is answered and
        # the key stays free.
        try:
            item = check_evidence(item)
        except DisputeError as exc:
            raise PaymentsApiError(exc.code, str(exc)) from exc
        if _DISPUTE_ID.fullmatch(subject_id) is None:
            raise PaymentsApiError("dispute_not_found", "no dispute has this id")
    canonical = _CANONICAL_PATHS[operation].format(subject_id)
    print_ = fingerprint("POST", canonical, body)
    request_key = request_key_of(principal, checked_key, print_)

    hold = KeyHold()

    async def execute() -> tuple[int, bytes]:
        if operation == "authorize":
            view = await engine.authorize(item, principal=principal, request_key=request_key,
                                          hold=hold, answer=_kept_creation)
            return payment_status(view, created=True)
        if operation == "payout":
            return payout_status(await engine.payout(item, principal=principal,
                                                     request_key=request_key))
        if operation == "void":
            view = await engine.void(subject_id, principal=principal, request_key=request_key)
            return payment_status(view, created=False)
        if operation == "submit_evidence":
            return evidence_status(*await engine.submit_evidence(
                subject_id, item, principal=principal, request_key=request_key))
        amount = item.amount if item is not None else None
        if operation == "capture":
            view = await engine.capture(subject_id, amount, principal=principal,
                                        request_key=request_key)
        elif operation == "increment":
            view = await engine.increment(subject_id, item.amount, principal=principal,
                                          request_key=request_key)
        elif operation == "create_capture":
            view = await engine.capture(subject_id, amount, principal=principal,
                                        request_key=request_key, final=item.final)
        else:
            view = await engine.refund(subject_id, amount, principal=principal,
                                       request_key=request_key,
                                       capture_id=item.capture_id if item is not None else None,
                                       metadata=item.metadata if item is not None else None)
        return payment_status(view, created=False)

    if operation != "authorize":
        return await payments.idempotent.run(
            principal=principal, key_header=checked_key, fingerprint_=print_,
            execute=execute)
    outcome = "refused"
    try:
        answer = await payments.idempotent.run(
            principal=principal, key_header=checked_key, fingerprint_=print_,
            execute=execute, hold=hold, defer_claim=True)
        outcome = _AUTHORIZATION_OUTCOMES.get(answer[0], "refused")
        return answer
    except PaymentsApiError as exc:
        outcome = "failed" if exc.status >= 500 else "refused"
        raise
    finally:
        metrics.AUTHORIZATION_SECONDS.labels(outcome).observe(time.perf_counter() - started)


async def _endpoint_operation(payments: Payments, *, principal: str, operation: str,
                              key: str | None, subject_id: str, body: bytes,
                              headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    """``/v1/webhook_endpoints``: a creation needs an Idempotency-Key and is refused before
    the key is claimed if its body does not hold (actors/payments/webhook_endpoints.py)."""
    if operation != "create_webhook_endpoint":
        return await serve_endpoint_operation(
            payments.engine.store.pool, principal=principal, operation=operation,
            subject_id=subject_id, body=body, request_key="", idempotent=None,
            origin=REQUEST_ORIGIN.get())
    checked_key = require_key(key)
    scan_for_card_data(headers, body)
    decode_endpoint_request(body)
    print_ = fingerprint("POST", _CANONICAL_PATHS[operation], body)

    def idempotent(execute: Callable[[], Awaitable[tuple[int, bytes]]]
                   ) -> Awaitable[tuple[int, bytes, dict[str, str]]]:
        return payments.idempotent.run(principal=principal, key_header=checked_key,
                                       fingerprint_=print_, execute=execute)

    return await serve_endpoint_operation(
        payments.engine.store.pool, principal=principal, operation=operation,
        subject_id=subject_id, body=body,
        request_key=request_key_of(principal, checked_key, print_), idempotent=idempotent,
        origin=REQUEST_ORIGIN.get())


class PaymentsEndpoint:
    """The payments routes as the payments actor serves them to the HTTP and RPC edge.

    Every outcome, refusals included, is an answer: (status, JSON body, extra headers).
    Only a ``LedgerError`` (the ledger or the database is away: nothing was decided, send
    the request again) and bugs are raised, for the edge to answer 503 and 500.
    """

    def __init__(self, payments: Payments, *, clock_s: Callable[[], float]) -> None:
        self.payments = payments
        self._clock_s = clock_s

    async def call(self, principal: str, operation: str, key: str, subject_id: str,
                   body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        # The edge names the request's audit record in a header of its own (it drops any
        # a client sent); the steps this request starts carry it.
        headers = dict(headers)
        origin = headers.pop(ORIGIN_HEADER, "0")
        # The record itself, when the edge left it to this actor to write (a request that
        # claims an Idempotency-Key: processor/request_audit.py).
        record = headers.pop(AUDIT_HEADER, None)
        audit = None if record is None else AuditSlot(decode_header(record))
        token = REQUEST_ORIGIN.set(int(origin) if origin.isdigit() else 0)
        audit_token = REQUEST_AUDIT.set(audit)
        try:
            answer = await self._answer(principal, operation, key, subject_id, body, headers)
            if audit is not None and not audit.written:
                # No statement of the request wrote it (a replay, a refusal before the
                # claim): written alone, before the answer; unwritten, answered 503.
                await self.payments.engine.store.write_audit(audit)
            return answer
        except DATABASE_UNREACHABLE as exc:
            raise _database_away(exc) from exc
        finally:
            REQUEST_AUDIT.reset(audit_token)
            REQUEST_ORIGIN.reset(token)

    async def _answer(self, principal: str, operation: str, key: str, subject_id: str,
                      body: bytes, headers: dict[str, str]
                      ) -> tuple[int, bytes, dict[str, str]]:
        try:
            return await dispatch(self.payments, principal=principal, operation=operation,
                                  key=key or None, subject_id=subject_id, body=body,
                                  headers=headers)
        except PaymentError as exc:
            return _refusal(api_error_of(exc))
        except PaymentsApiError as exc:
            return _refusal(exc)
        except (ListError, EndpointRefused, ReconciliationRefused) as exc:
            return _refusal(PaymentsApiError(exc.code, str(exc)))

    async def webhook(self, provider: str, headers: dict[str, str],
                      body: bytes) -> tuple[int, bytes, dict[str, str]]:
        """A provider's event: verified with that provider's secret, then applied."""
        adapter = self.payments.adapters.get(provider)
        if adapter is None:
            return _refusal(PaymentsApiError("webhook_provider_unknown",
                                             "no provider has this name"))
        try:
            events = adapter.verify_webhooks(headers, body, self._clock_s())
        except WebhookRejected as exc:
            code = exc.code if exc.code in PAYMENT_ERROR_STATUS else "webhook_malformed"
            return _refusal(PaymentsApiError(code, "the webhook was not accepted"))
        try:
            results = await _apply_events(self.payments.engine, provider, events)
        except DATABASE_UNREACHABLE as exc:
            raise _database_away(exc) from exc
        if "retry" in results:
            # A batch is delivered again whole; its events applied now are then duplicates.
            return (503, error_body("unavailable",
                                    "the event raced another change; send it again"),
                    {"Retry-After": "1"})
        if len(results) == 1:
            return 200, ENCODER.encode(WebhookAnswer(results[0])), {}
        return 200, ENCODER.encode(WebhookAnswer("batch", results)), {}


async def _apply_events(engine: PaymentsEngine, provider: str,
                        events: list[WebhookEvent]) -> list[str]:
    """Each event applied (``PaymentsEngine.apply_webhook``); its result, in order. Those
    that cannot move their step are remembered together (``settle_inert_events``); the
    others of one step (its provider key) are applied in the order they came, as one
    request each would have been, different steps' at once, so that one waiting for its
    step's answer (``EVENT_WAITS_FOR_ANSWER_S``) holds up no other."""
    if len(events) == 1:
        return [await engine.apply_webhook(provider, events[0])]
    # The events that cannot move their step, in one statement; the rest one by one.
    settled = await engine.settle_inert_events(provider, events)
    by_step: dict[str, list[int]] = {}
    for i, event in enumerate(events):
        if settled[i] is None:
            by_step.setdefault(step_key_of(event), []).append(i)
    results = [r or "" for r in settled]

    async def in_order(indexes: list[int]) -> None:
        for i in indexes:
            results[i] = await engine.apply_webhook(provider, events[i])

    outcomes = await asyncio.gather(*(in_order(ix) for ix in by_step.values()),
                                    return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return results


def _refusal(exc: PaymentsApiError) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else {}
    return exc.status, exc.body or error_body(exc.code, exc.message), headers
