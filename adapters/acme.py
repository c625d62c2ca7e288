"""The acme adapter: translation between the processor's words and acme's API.

acme authenticates with an API key (``X-Api-Key``), takes the idempotency key in
``Idempotency-Key``, counts amounts in integer minor units and settles captures, refunds and
payouts at once. How its answers map to ``Outcome``:

==========================================  ==========================================
acme answers                                outcome
==========================================  ==========================================
2xx, status AUTHORIZED/CAPTURED/SETTLED/    APPROVED (PENDING for PENDING/IN_TRANSIT)
VOIDED/PAID as fits the operation
2xx, payout FAILED / authorization DECLINED DECLINED
402 ``card_error`` / ``payout_error``       DECLINED, code from ``decline_code``
400 / 404 ``invalid_request_error``         FAILED (``amount_too_large`` ->
                                            AMOUNT_EXCEEDS_AUTHORIZED, ``resource_missing``
                                            -> NOT_FOUND, ...)
401 / 403                                   FAILED, AUTHENTICATION_FAILED
409 ``request_in_progress``                 RETRYABLE (our other request with this key is
                                            in flight; resend the same key later)
422 ``idempotency_key_reused``              FAILED, INVALID_REQUEST (a bug on our side)
429 (``Retry-After`` seconds)               RETRYABLE, ``retry_after_s``
503                                         RETRYABLE: acme documents that its front door
                                            answers 503 before anything happens
500, 502, 504 and any other 5xx             UNKNOWN: acme does not say whether the
                                            operation happened; a status query settles it
anything acme would not send (bad JSON,     UNKNOWN
an object of the wrong kind, 3xx, a 4xx
without acme's error body)
==========================================  ==========================================

A status query (``GET /v1/requests/{key}``) answers the request's stored result or the
current state of what it created; ``resource_missing`` means acme never received it
(DECLINED, NOT_FOUND: safe to resend with the same key). While the first request is still in
flight, or when the query itself fails, the outcome stays UNKNOWN (ask again after
``retry_after_s``).

Webhooks carry ``Acme-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of "<t>." + body>`` (several
``v1`` while acme rotates the secret). Settlement reports (``GET /v1/settlements/{date}``) are
CSV with signed decimal amounts: transactions, fees on their own and payout batches.
"""

from __future__ import annotations

import csv
import hmac
import io
import json
import re
from datetime import date as Date
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import msgspec
from msgspec import Meta

from adapters.base import (
    DeclineCode,
    DisputeNotice,
    HttpCall,
    Operation,
    Outcome,
    ProviderReply,
    ProviderRequest,
    SettlementFee,
    SettlementLine,
    SettlementPayoutBatch,
    SettlementReport,
    WebhookEvent,
    WebhookRejected,
    header,
    path_segment,
)
from adapters.decoding import (
    Replies,
    decimal_to_minor,
    header_seconds,
    read_events,
    require_fresh,
)
from processor.currency import CURRENCY_EXPONENTS
from processor.types import AMOUNT_MAX

__all__ = ["AcmeAdapter"]

WEBHOOK_TOLERANCE_S = 300.0
RETRY_AFTER_DEFAULT_S = 1.0
RETRY_AFTER_MAX_S = 3_600.0
REPORT_COLUMNS = frozenset({"settlement_date", "type", "id", "authorization_id",
                            "idempotency_key", "currency", "gross", "fee", "net"})

Amount = Annotated[int, Meta(ge=0, le=AMOUNT_MAX)]


# --- acme's messages, outbound ---------------------------------------------------------------


class _AuthorizeBody(msgspec.Struct, frozen=True):
    amount: int
    currency: str
    payment_method: str
    reference: str
    capture: bool = False


class _CaptureBody(msgspec.Struct, frozen=True):
    amount: int
    currency: str
    reference: str
    final: bool = True  # false: the rest of the authorization stays capturable


class _IncrementBody(msgspec.Struct, frozen=True):
    amount: int  # what to add to the authorization
    currency: str
    reference: str


class _VoidBody(msgspec.Struct, frozen=True):
    reference: str


class _RefundBody(msgspec.Struct, frozen=True):
    authorization: str
    amount: int
    currency: str
    reference: str


class _PayoutBody(msgspec.Struct, frozen=True):
    amount: int
    currency: str
    destination: str
    reference: str


class _EvidenceBody(msgspec.Struct, frozen=True):
    text: str
    files: list[str]


# --- acme's messages, inbound (unknown fields are ignored: acme adds fields) -----------------


class _Object(msgspec.Struct, frozen=True):
    id: str = ""
    object: str = ""
    status: str = ""
    amount: Amount = 0
    currency: str = ""
    authorization: str = ""
    decline_code: str = ""
    failure_code: str = ""


class _Error(msgspec.Struct, frozen=True):
    type: str = ""
    code: str = ""
    decline_code: str = ""
    authorization: str = ""
    payout: str = ""


class _ErrorBody(msgspec.Struct, frozen=True):
    error: _Error


class _RequestStatus(msgspec.Struct, frozen=True):
    idempotency_key: str
    operation: str
    response_status: int
    response: msgspec.Raw


class _Dispute(msgspec.Struct, frozen=True):
    id: str
    object: str
    status: str
    amount: Amount
    currency: str
    authorization: str
    fee: Amount = 0
    reason: str = ""
    evidence_due_by: Annotated[int, Meta(ge=0, le=2**40)] = 0


class _DisputeEventData(msgspec.Struct, frozen=True):
    object: _Dispute


class _DisputeEvent(msgspec.Struct, frozen=True):
    id: str
    type: str
    created: int
    data: _DisputeEventData


class _EventType(msgspec.Struct, frozen=True):
    type: str = ""


class _EventRequest(msgspec.Struct, frozen=True):
    idempotency_key: str


class _EventData(msgspec.Struct, frozen=True):
    object: _Object


class _Event(msgspec.Struct, frozen=True):
    id: str
    type: str
    created: int
    request: _EventRequest
    data: _EventData


_ENCODER = msgspec.json.Encoder()
_OBJECT = msgspec.json.Decoder(_Object)
_ERROR = msgspec.json.Decoder(_ErrorBody)
_REQUEST_STATUS = msgspec.json.Decoder(_RequestStatus)
_EVENT = msgspec.json.Decoder(_Event)
_EVENT_TYPE = msgspec.json.Decoder(_EventType)
_DISPUTE_EVENT = msgspec.json.Decoder(_DisputeEvent)

# What kind of object answers each operation, and which of its statuses mean what.
_OBJECT_KINDS = {Operation.AUTHORIZE: "authorization", Operation.CAPTURE: "capture",
                 Operation.VOID: "authorization", Operation.REFUND: "refund",
                 Operation.PAYOUT: "payout", Operation.INCREMENT: "authorization",
                 Operation.DISPUTE_EVIDENCE: "dispute"}
_STATUSES: dict[Operation, dict[str, Outcome]] = {
    Operation.AUTHORIZE: {"AUTHORIZED": Outcome.APPROVED, "CAPTURED": Outcome.APPROVED,
                          "SETTLED": Outcome.APPROVED, "VOIDED": Outcome.APPROVED,
                          "DECLINED": Outcome.DECLINED},
    Operation.CAPTURE: {"SETTLED": Outcome.APPROVED, "PENDING": Outcome.PENDING},
    Operation.VOID: {"VOIDED": Outcome.APPROVED},
    Operation.INCREMENT: {"AUTHORIZED": Outcome.APPROVED, "CAPTURED": Outcome.APPROVED},
    Operation.REFUND: {"SETTLED": Outcome.APPROVED, "PENDING": Outcome.PENDING},
    Operation.PAYOUT: {"PAID": Outcome.APPROVED, "IN_TRANSIT": Outcome.PENDING,
                       "PENDING": Outcome.PENDING, "FAILED": Outcome.DECLINED},
    # Evidence taken: the dispute is under review (a replay may find it decided since).
    Operation.DISPUTE_EVIDENCE: {"UNDER_REVIEW": Outcome.APPROVED, "WON": Outcome.APPROVED,
                                 "LOST": Outcome.APPROVED},
}
# acme's dispute statuses and events, in the processor's words (DisputeNotice.status).
_DISPUTE_STATUSES = {"NEEDS_RESPONSE": "needs_response", "UNDER_REVIEW": "under_review",
                     "WON": "won", "LOST": "lost"}
_DISPUTE_EVENTS = frozenset({"dispute.created", "dispute.updated", "dispute.won",
                             "dispute.lost"})
_DECLINE_CODES = {
    "insufficient_funds": DeclineCode.INSUFFICIENT_FUNDS,
    "expired_card": DeclineCode.CARD_EXPIRED,
    "do_not_honor": DeclineCode.DO_NOT_HONOR,
    "generic_decline": DeclineCode.DO_NOT_HONOR,
    "card_declined": DeclineCode.DO_NOT_HONOR,
    "fraudulent": DeclineCode.SUSPECTED_FRAUD,
    "stolen_card": DeclineCode.SUSPECTED_FRAUD,
    "lost_card": DeclineCode.SUSPECTED_FRAUD,
    "processing_error": DeclineCode.OTHER,
    "incorrect_number": DeclineCode.INVALID_PAYMENT_METHOD,
    "account_closed": DeclineCode.INVALID_DESTINATION,
    "invalid_account": DeclineCode.INVALID_DESTINATION,
}
_REQUEST_ERROR_CODES = {
    "amount_too_large": DeclineCode.AMOUNT_EXCEEDS_AUTHORIZED,
    "authorization_voided": DeclineCode.ALREADY_VOIDED,
    "currency_not_supported": DeclineCode.CURRENCY_NOT_SUPPORTED,
    "payment_method_invalid": DeclineCode.INVALID_PAYMENT_METHOD,
    "destination_invalid": DeclineCode.INVALID_DESTINATION,
    "resource_missing": DeclineCode.NOT_FOUND,
    "dispute_closed": DeclineCode.INVALID_REQUEST,
}
_EVENTS: dict[str, tuple[Operation, Outcome]] = {
    "authorization.approved": (Operation.AUTHORIZE, Outcome.APPROVED),
    "authorization.settled": (Operation.AUTHORIZE, Outcome.APPROVED),
    "authorization.declined": (Operation.AUTHORIZE, Outcome.DECLINED),
    "authorization.voided": (Operation.VOID, Outcome.APPROVED),
    "authorization.incremented": (Operation.INCREMENT, Outcome.APPROVED),
    "capture.settled": (Operation.CAPTURE, Outcome.APPROVED),
    "refund.settled": (Operation.REFUND, Outcome.APPROVED),
    "payout.paid": (Operation.PAYOUT, Outcome.APPROVED),
    "payout.failed": (Operation.PAYOUT, Outcome.DECLINED),
}
_REPORT_TYPES = {"capture": Operation.CAPTURE, "refund": Operation.REFUND,
                 "payout": Operation.PAYOUT}
_KNOWN_WORDS = frozenset({
    *_DECLINE_CODES, *_REQUEST_ERROR_CODES, *_EVENTS, *_DISPUTE_EVENTS, *_DISPUTE_STATUSES,
    *(status for table in _STATUSES.values() for status in table),
    "authentication_error", "request_in_progress", "idempotency_key_reused",
    "idempotency_key_missing", "parameter_invalid", "parameter_missing", "body_invalid",
    "currency_mismatch", "authorization_captured", "authorization_declined",
})


class AcmeAdapter:
    """The ``Adapter`` for acme (see the module docstring for the outcome mapping)."""

    name = "acme"
    currencies = frozenset({"USD", "EUR", "GBP"})
    capabilities = frozenset({Operation.INCREMENT})

    def __init__(self, *, api_key: str, webhook_secret: str, timeout_s: float = 2.0) -> None:
        if not api_key or not webhook_secret:
            raise ValueError("acme needs an api_key and a webhook_secret")
        if not 0.0 < timeout_s <= 60.0:
            raise ValueError("timeout_s must be in (0, 60]")
        self._api_key = api_key
        self._webhook_secret = webhook_secret.encode()
        self.timeout_s = timeout_s

    @classmethod
    def from_secrets_file(cls, path: Path | str, *, timeout_s: float = 2.0) -> AcmeAdapter:
        """The adapter with the secrets of ``path`` (the simulator's JSON secrets file).

        Raises ``ValueError`` if the file is not acme's or lacks a field (values are never
        quoted in the message).
        """
        raw = json.loads(Path(path).read_bytes())
        if not isinstance(raw, dict) or raw.get("provider") != "acme":
            raise ValueError(f"{path} is not an acme secrets file")
        api_key, webhook_secret = raw.get("api_key"), raw.get("webhook_secret")
        if not isinstance(api_key, str) or not isinstance(webhook_secret, str):
            raise ValueError(f"{path} lacks api_key or webhook_secret")
        return cls(api_key=api_key, webhook_secret=webhook_secret, timeout_s=timeout_s)

    def __repr__(self) -> str:  # never the key
        return f"AcmeAdapter(timeout_s={self.timeout_s})"

    # --- requests ---------------------------------------------------------------------------

    def build(self, request: ProviderRequest, now_s: float) -> HttpCall:
        """The acme call for ``request``; raises ``ValueError`` if a field the operation
        needs is empty (a bug in the caller, not a provider answer)."""
        op = request.operation
        body: msgspec.Struct
        if op is Operation.AUTHORIZE:
            _need(request.payment_method, "payment_method")
            path = "/v1/authorizations"
            body = _AuthorizeBody(request.amount, request.currency, request.payment_method,
                                  request.reference)
        elif op is Operation.CAPTURE:
            path = f"/v1/authorizations/{_segment(request.provider_ref)}/capture"
            body = _CaptureBody(request.amount, request.currency, request.reference,
                                request.final)
        elif op is Operation.VOID:
            path = f"/v1/authorizations/{_segment(request.provider_ref)}/void"
            body = _VoidBody(request.reference)
        elif op is Operation.INCREMENT:
            path = f"/v1/authorizations/{_segment(request.provider_ref)}/increment"
            body = _IncrementBody(request.amount, request.currency, request.reference)
        elif op is Operation.DISPUTE_EVIDENCE:
            path = f"/v1/disputes/{_segment(request.provider_ref)}/evidence"
            body = _EvidenceBody(request.evidence_text, list(request.evidence_files))
        elif op is Operation.REFUND:
            _need(request.provider_ref, "provider_ref")
            path = "/v1/refunds"
            body = _RefundBody(request.provider_ref, request.amount, request.currency,
                               request.reference)
        else:
            _need(request.destination, "destination")
            path = "/v1/payouts"
            body = _PayoutBody(request.amount, request.currency, request.destination,
                               request.reference)
        headers = {"x-api-key": self._api_key, "idempotency-key": request.idempotency_key,
                   "content-type": "application/json", "accept": "application/json"}
        return HttpCall(method="POST", path=path, headers=headers, body=_ENCODER.encode(body))

    def build_status(self, request: ProviderRequest, now_s: float) -> HttpCall:
        _need(request.idempotency_key, "idempotency_key")
        return HttpCall(method="GET", path=f"/v1/requests/{quote(request.idempotency_key, '')}",
                        headers={"x-api-key": self._api_key, "accept": "application/json"})

    def build_settlement(self, settled_on: str, now_s: float) -> HttpCall:
        """The call that fetches the settlement report of ``settled_on`` (an ISO date).

        Not part of the ``Adapter`` protocol (yet); the report is read by ``parse_settlement``.
        """
        on = Date.fromisoformat(settled_on).isoformat()
        return HttpCall(method="GET", path=f"/v1/settlements/{on}",
                        headers={"x-api-key": self._api_key, "accept": "text/csv"})

    # --- answers ----------------------------------------------------------------------------

    def parse(self, request: ProviderRequest, status: int, headers: dict[str, str],
              body: bytes) -> ProviderReply:
        return _REPLIES.read(self._parse, request, status, headers, body)

    def _parse(self, request: ProviderRequest, status: int, headers: dict[str, str],
               body: bytes) -> ProviderReply:
        if 200 <= status < 300:
            return self._object(request, status, _OBJECT.decode(body))
        wait_s = _retry_after(header(headers, "retry-after"))
        if status in (429, 503):
            return ProviderReply(outcome=Outcome.RETRYABLE, http_status=status,
                                 retry_after_s=wait_s or RETRY_AFTER_DEFAULT_S,
                                 message=f"acme {status}: nothing done, try later")
        if status >= 500 or not 400 <= status < 500:
            return _unknown(status, "no word on whether it happened")
        if status in (401, 403):
            return _reply(Outcome.FAILED, status, DeclineCode.AUTHENTICATION_FAILED,
                          "authentication_error")
        error = _ERROR.decode(body).error
        if status == 402:
            code = _DECLINE_CODES.get(error.decline_code) or _DECLINE_CODES.get(
                error.code, DeclineCode.OTHER)
            return _reply(Outcome.DECLINED, status, code, error.decline_code or error.code,
                          provider_ref=error.authorization or error.payout)
        if status == 409 and error.code == "request_in_progress":
            return ProviderReply(outcome=Outcome.RETRYABLE, http_status=status,
                                 retry_after_s=wait_s or RETRY_AFTER_DEFAULT_S,
                                 message="acme 409: request_in_progress")
        if error.type == "":
            return _unknown(status, "not an acme error body")
        code = _REQUEST_ERROR_CODES.get(error.code, DeclineCode.INVALID_REQUEST)
        return _reply(Outcome.FAILED, status, code, error.code)

    def _object(self, request: ProviderRequest, status: int, obj: _Object) -> ProviderReply:
        op = request.operation
        if obj.object != _OBJECT_KINDS[op] or not obj.id:
            return _unknown(status, "answer of another kind")
        outcome = _STATUSES[op].get(obj.status)
        if outcome is None:
            return _unknown(status, f"status {_safe(obj.status)}")
        ref = obj.authorization if op is Operation.CAPTURE else obj.id
        if outcome is Outcome.DECLINED:
            code = _DECLINE_CODES.get(obj.decline_code or obj.failure_code, DeclineCode.OTHER)
            return _reply(outcome, status, code, obj.decline_code or obj.failure_code,
                          provider_ref=ref)
        return ProviderReply(outcome=outcome, provider_ref=ref, amount=obj.amount,
                             http_status=status, message=f"acme {status} {_safe(obj.status)}")

    def parse_status(self, request: ProviderRequest, status: int, headers: dict[str, str],
                     body: bytes) -> ProviderReply:
        return _REPLIES.read(self._parse_status, request, status, headers, body,
                             what="status answer")

    def _parse_status(self, request: ProviderRequest, status: int, headers: dict[str, str],
                      body: bytes) -> ProviderReply:
        wait_s = _retry_after(header(headers, "retry-after"))
        if status == 200:
            found = _REQUEST_STATUS.decode(body)
            if found.operation != request.operation.value:
                return _unknown(status, "the key belongs to another operation")
            return self._parse(request, found.response_status, {}, bytes(found.response))
        if status == 404 and _ERROR.decode(body).error.code == "resource_missing":
            return ProviderReply(outcome=Outcome.DECLINED, decline_code=DeclineCode.NOT_FOUND,
                                 http_status=status,
                                 message="acme 404: never received; resend with the same key")
        if status in (401, 403):
            return ProviderReply(outcome=Outcome.UNKNOWN,
                                 decline_code=DeclineCode.AUTHENTICATION_FAILED,
                                 http_status=status,
                                 message=f"acme {status}: status query refused (credentials)")
        return ProviderReply(outcome=Outcome.UNKNOWN, http_status=status,
                             retry_after_s=wait_s or RETRY_AFTER_DEFAULT_S,
                             message=f"acme {status}: still unknown, ask again")

    # --- webhooks ---------------------------------------------------------------------------

    def verify_webhook(self, headers: dict[str, str], body: bytes,
                       now_s: float) -> WebhookEvent:
        self._verify_signature(headers, body, now_s)
        return _acme_event(body)

    def verify_webhooks(self, headers: dict[str, str], body: bytes,
                        now_s: float) -> list[WebhookEvent]:
        self._verify_signature(headers, body, now_s)
        return read_events("acme", body, _acme_event)

    def _verify_signature(self, headers: dict[str, str], body: bytes, now_s: float) -> None:
        stamp, signatures = _signatureheader(header(headers, "acme-signature"))
        expected = hmac.new(self._webhook_secret, f"{stamp}.".encode() + body,
                            "sha256").hexdigest()
        if not any(hmac.compare_digest(expected, given) for given in signatures):
            raise WebhookRejected("webhook_signature_invalid", "acme signature does not match")
        require_fresh("acme", stamp, now_s, WEBHOOK_TOLERANCE_S)

    # --- settlement -------------------------------------------------------------------------

    def parse_settlement(self, report: bytes) -> list[SettlementLine]:
        """The transactions of acme's CSV report; raises ``ValueError`` as ``parse_report``."""
        return self.parse_report(report).lines

    def parse_report(self, report: bytes) -> SettlementReport:
        """acme's CSV report: a row per capture, refund and payout, per fee on its own
        (``fee``: gross 0) and per payout batch (``payout_batch``: the day's net of a
        currency; its ``reference`` counts the rows it sums). Raises ``ValueError`` for a
        report that does not add up (a column missing, an unknown row type, an inexact
        amount, net != gross - fee)."""
        reader = csv.DictReader(io.StringIO(report.decode("utf-8"), newline=""))
        try:
            missing = REPORT_COLUMNS - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"acme report lacks columns {sorted(missing)}")
            rows = list(reader)
        except csv.Error as exc:
            raise ValueError(f"acme report is not CSV: {exc}") from None
        lines, fees, batches = [], [], []
        for number, row in enumerate(rows, start=2):
            kind = row.get("type")
            if kind == "fee":
                fees.append(_settlement_fee(row, number))
            elif kind == "payout_batch":
                batches.append(_payout_batch(row, number))
            else:
                lines.append(_settlement_line(row, number))
        return SettlementReport(lines=lines, fees=fees, batches=batches)


# --- helpers ------------------------------------------------------------------------------------


def _dispute_event(event: _DisputeEvent) -> WebhookEvent:
    """An acme dispute event as a ``WebhookEvent`` carrying its ``DisputeNotice``; raises
    ``ValueError`` for one that is not a dispute of a known status."""
    obj = event.data.object
    status = _DISPUTE_STATUSES.get(obj.status)
    if obj.object != "dispute" or status is None or not (event.id and obj.id
                                                        and obj.authorization):
        raise ValueError("acme dispute event not understood")
    notice = DisputeNotice(dispute_ref=obj.id, authorization_ref=obj.authorization,
                           status=status, amount=obj.amount, fee=obj.fee,
                           currency=obj.currency, reason=_safe_reason(obj.reason),
                           evidence_due_by_s=float(obj.evidence_due_by))
    return WebhookEvent(event_id=event.id, operation=Operation.DISPUTE_EVIDENCE,
                        idempotency_key="", provider_ref=obj.authorization,
                        outcome=Outcome.APPROVED, amount=obj.amount,
                        occurred_at_s=float(event.created), dispute=notice)


def _safe_reason(word: str) -> str:
    """A dispute reason as acme words it (lower case and underscores), or ''."""
    return word if len(word) <= 64 and re.fullmatch(r"[a-z_]*", word) else ""


_Row = dict[str | None, str | None]


def _cell(row: _Row, name: str, number: int) -> str:
    value = row.get(name)
    if value is None:  # a short row
        raise ValueError(f"acme report line {number}: {name} missing")
    return value


def _amounts(row: _Row, number: int) -> tuple[str, int, int, int]:
    """Currency, gross, fee and net of a row; net must be gross - fee."""
    currency = _cell(row, "currency", number)
    exponent = CURRENCY_EXPONENTS.get(currency)
    if exponent is None:
        raise ValueError(f"acme report line {number}: unknown currency")
    gross, fee, net = (_to_minor(_cell(row, name, number), exponent, number)
                       for name in ("gross", "fee", "net"))
    if gross - fee != net:
        raise ValueError(f"acme report line {number}: net is not gross - fee")
    if not 0 <= fee <= AMOUNT_MAX or abs(gross) > AMOUNT_MAX or abs(net) > AMOUNT_MAX:
        raise ValueError(f"acme report line {number}: amount out of range")
    return currency, gross, fee, net


def _settlement_fee(row: _Row, number: int) -> SettlementFee:
    currency, gross, fee, _ = _amounts(row, number)
    if gross != 0 or fee == 0 or not _cell(row, "id", number):
        raise ValueError(f"acme report line {number}: a fee row has gross 0, a fee and an id")
    return SettlementFee(fee_ref=_cell(row, "id", number), amount=fee, currency=currency,
                         settled_on=Date.fromisoformat(
                             _cell(row, "settlement_date", number)).isoformat())


def _payout_batch(row: _Row, number: int) -> SettlementPayoutBatch:
    currency, _, _, net = _amounts(row, number)
    entries = _cell(row, "reference", number)
    if not (entries.isascii() and entries.isdigit() and len(entries) <= 9):
        raise ValueError(f"acme report line {number}: a batch counts its rows")
    return SettlementPayoutBatch(batch_ref=_cell(row, "id", number), currency=currency,
                                 net=net, entries=int(entries),
                                 settled_on=Date.fromisoformat(
                                     _cell(row, "settlement_date", number)).isoformat())


def _settlement_line(row: _Row, number: int) -> SettlementLine:
    def cell(name: str) -> str:
        return _cell(row, name, number)

    operation = _REPORT_TYPES.get(cell("type"))
    currency = cell("currency")
    exponent = CURRENCY_EXPONENTS.get(currency)
    if operation is None or exponent is None:
        raise ValueError(f"acme report line {number}: unknown type or currency")
    gross = _to_minor(cell("gross"), exponent, number)
    fee = _to_minor(cell("fee"), exponent, number)
    if gross - fee != _to_minor(cell("net"), exponent, number):
        raise ValueError(f"acme report line {number}: net is not gross - fee")
    if gross == 0 or (gross > 0) != (operation is Operation.CAPTURE):
        raise ValueError(f"acme report line {number}: gross has the wrong sign")
    if not 0 <= fee <= AMOUNT_MAX or abs(gross) > AMOUNT_MAX:
        raise ValueError(f"acme report line {number}: amount out of range")
    ref = cell("authorization_id") if operation is Operation.CAPTURE else cell("id")
    return SettlementLine(provider_ref=ref, idempotency_key=cell("idempotency_key"),
                          operation=operation, amount=abs(gross), currency=currency, fee=fee,
                          settled_on=Date.fromisoformat(cell("settlement_date")).isoformat(),
                          line_ref=cell("id"))


def _need(value: str, what: str) -> None:
    path_segment("acme", value, what)


def _segment(value: str) -> str:
    return path_segment("acme", value)


def _retry_after(value: str) -> float:
    """Seconds from a ``Retry-After`` of delta-seconds; 0 when absent or an HTTP date (the
    adapter has no clock to subtract from; the caller's default wait applies)."""
    return header_seconds(value, cap_s=RETRY_AFTER_MAX_S) or 0.0


def _signatureheader(value: str) -> tuple[int, list[str]]:
    stamp: int | None = None
    signatures = []
    for part in value.split(","):
        name, _, item = part.strip().partition("=")
        # ASCII only: str.isdigit() accepts "²" (which int() refuses) and compare_digest
        # refuses non-ASCII text; either is a malformed header, never an error of ours.
        if name == "t" and item.isascii() and item.isdigit() and len(item) <= 12:
            stamp = int(item)
        elif name == "v1" and item and item.isascii():
            signatures.append(item)
    if stamp is None or not signatures:
        raise WebhookRejected("webhook_malformed", "Acme-Signature missing or malformed")
    return stamp, signatures


def _to_minor(text: str, exponent: int, line: int) -> int:
    try:
        return decimal_to_minor(text, exponent)
    except ValueError as exc:
        raise ValueError(f"acme report line {line}: amount {exc}") from None


# Only words acme documents are repeated in a reply's message (Replies.safe).
_REPLIES = Replies("acme", _KNOWN_WORDS)
_safe = _REPLIES.safe
_reply = _REPLIES.reply
_unknown = _REPLIES.unknown


def _acme_event(body: bytes) -> WebhookEvent:
    """One acme event, from its JSON; raises ``WebhookRejected`` if it is not one."""
    try:
        if _EVENT_TYPE.decode(body).type in _DISPUTE_EVENTS:
            return _dispute_event(_DISPUTE_EVENT.decode(body))
        event = _EVENT.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError):
        raise WebhookRejected("webhook_malformed", "acme event body unreadable") from None
    kind = _EVENTS.get(event.type)
    if kind is None or not event.id or not event.request.idempotency_key:
        raise WebhookRejected("webhook_malformed",
                              f"acme event type {_safe(event.type)} not understood")
    operation, outcome = kind
    obj = event.data.object
    ref = obj.authorization if operation is Operation.CAPTURE else obj.id
    decline = None
    if outcome is Outcome.DECLINED:
        decline = _DECLINE_CODES.get(obj.decline_code or obj.failure_code, DeclineCode.OTHER)
    return WebhookEvent(event_id=event.id, operation=operation,
                        idempotency_key=event.request.idempotency_key, provider_ref=ref,
                        outcome=outcome,
                        amount=obj.amount if outcome is Outcome.APPROVED else 0,
                        occurred_at_s=float(event.created), decline_code=decline)
