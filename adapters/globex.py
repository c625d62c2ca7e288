"""The globex adapter: translation between the processor's words and globex's API.

globex signs every request with HMAC-SHA256 (``X-Globex-Key-Id``, ``X-Globex-Timestamp`` in
Unix seconds, ``X-Globex-Signature``: base64 of the MAC over ``METHOD\\nPATH?QUERY\\n
TIMESTAMP\\nIDEMPOTENCY_KEY\\nhex SHA-256 of the body``) and refuses timestamps more than
300 s off its clock. Money is ``{"value": "10.50", "currency": "EUR"}`` in decimal major
units, converted here exactly or refused. Captures, refunds and payouts answer ``PENDING``
and complete later (webhook, status query). How its answers map to ``Outcome``:

==========================================  ==========================================
globex answers                              outcome
==========================================  ==========================================
200, ``success: true``, state AUTHORIZED/   APPROVED
CAPTURED/CANCELLED/COMPLETE
200, ``success: true``, state PENDING       PENDING (the result comes by webhook or a
                                            status query)
200, ``success: false`` + reason code       DECLINED for card and beneficiary reasons,
                                            FAILED for rule refusals (amount above what
                                            may be captured, cancelled payment, ...)
400 ``problem``                             FAILED, INVALID_REQUEST
401 / 403                                   FAILED, AUTHENTICATION_FAILED
404 ``payment_not_found``                   FAILED, NOT_FOUND
409 ``request_in_progress``                 RETRYABLE (resend the same key later)
409 ``idempotency_key_mismatch``            FAILED, INVALID_REQUEST (a bug on our side)
503 (``Globex-Retry-After-Ms`` or           RETRYABLE, ``retry_after_s``: globex answers
``Retry-After``), also 429                  503 at its gateway, before anything happens
5xx whose ``problem`` says                  RETRYABLE: globex states nothing was committed
``committed: false``
any other 5xx                               UNKNOWN: a status query settles it
anything globex would not send              UNKNOWN
==========================================  ==========================================

A status query (``GET /api/v2/operations?idempotencyKey=``) answers the current state of the
operation; 404 ``operation_not_found`` means globex never received it (DECLINED, NOT_FOUND).
While the first request is in flight, or when the query itself fails, the outcome stays
UNKNOWN.

Webhooks carry ``X-Globex-Webhook-Timestamp`` (Unix milliseconds) and
``X-Globex-Webhook-Signature: hmac-sha256=<base64 MAC of "<ms>\\n" + body>``. Settlement
reports (``GET /reports/settlement?date=``, signed) are JSON lines: ``ENTRY`` records
(transactions; ``FEE`` entries for fees on their own), ``PAYOUT_BATCH`` records (the day's
net per currency) and a ``TRAILER`` record that counts the entries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from datetime import date as Date
from datetime import datetime
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import msgspec

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
    minor_to_decimal,
    read_events,
    require_fresh,
)
from processor.currency import CURRENCY_EXPONENTS
from processor.types import AMOUNT_MAX

__all__ = ["GlobexAdapter"]

WEBHOOK_TOLERANCE_S = 300.0
RETRY_AFTER_DEFAULT_S = 1.0
RETRY_AFTER_MAX_S = 3_600.0


# --- globex's messages, outbound -----------------------------------------------------------


class _Money(msgspec.Struct, frozen=True):
    value: str
    currency: str


class _Token(msgspec.Struct, frozen=True):
    token: str


class _PaymentBody(msgspec.Struct, frozen=True, rename="camel"):
    intent: str
    money: _Money
    instrument: _Token
    merchant_reference: str


class _MoneyBody(msgspec.Struct, frozen=True, rename="camel"):
    money: _Money
    merchant_reference: str


class _CaptureBody(msgspec.Struct, frozen=True, rename="camel"):
    money: _Money
    merchant_reference: str
    final_capture: bool = True  # false: the rest of the payment stays capturable


class _CancelBody(msgspec.Struct, frozen=True, rename="camel"):
    merchant_reference: str


class _PayoutBody(msgspec.Struct, frozen=True, rename="camel"):
    money: _Money
    beneficiary: _Token
    merchant_reference: str


class _DefenceBody(msgspec.Struct, frozen=True, rename="camel"):
    statement: str
    documents: list[str]


# --- globex's messages, inbound (unknown fields are ignored: globex adds fields) -------------


class _Reason(msgspec.Struct, frozen=True):
    code: str = ""


class _Outcome(msgspec.Struct, frozen=True):
    success: bool
    reason: _Reason | None = None


class _Result(msgspec.Struct, frozen=True):
    outcome: _Outcome


class _Object(msgspec.Struct, frozen=True, rename="camel"):
    id: str = ""
    type: str = ""
    state: str = ""
    money: _Money | None = None
    payment_id: str = ""
    idempotency_key: str = ""
    reason: _Reason | None = None
    # chargebacks
    fee_money: _Money | None = None
    reason_code: str = ""
    respond_by: str = ""


class _Answer(msgspec.Struct, frozen=True):
    result: _Result
    chargeback: _Object | None = None
    payment: _Object | None = None
    capture: _Object | None = None
    cancellation: _Object | None = None
    refund: _Object | None = None
    payout: _Object | None = None
    operation: _Object | None = None


class _Problem(msgspec.Struct, frozen=True):
    code: str = ""
    committed: bool | None = None


class _ProblemBody(msgspec.Struct, frozen=True):
    problem: _Problem


class _Event(msgspec.Struct, frozen=True, rename="camel"):
    event_id: str
    event_type: str
    occurred_at: str
    subject: _Object


class _Entry(msgspec.Struct, frozen=True, rename="camel"):
    record_type: Literal["ENTRY", "PAYOUT_BATCH", "TRAILER"]
    settlement_date: str
    entry_type: str = ""
    operation_id: str = ""
    payment_id: str = ""
    idempotency_key: str = ""
    direction: str = ""
    gross: _Money | None = None
    fee: _Money | None = None
    entry_count: int = -1
    batch_id: str = ""
    net: _Money | None = None


_ENCODER = msgspec.json.Encoder()
_ANSWER = msgspec.json.Decoder(_Answer)
_PROBLEM = msgspec.json.Decoder(_ProblemBody)
_EVENT = msgspec.json.Decoder(_Event)
_ENTRY = msgspec.json.Decoder(_Entry)

_OBJECT_KEYS = {Operation.AUTHORIZE: "payment", Operation.CAPTURE: "capture",
                Operation.VOID: "cancellation", Operation.REFUND: "refund",
                Operation.PAYOUT: "payout", Operation.DISPUTE_EVIDENCE: "chargeback"}
_TYPE_WORDS = {Operation.AUTHORIZE: "PAYMENT", Operation.CAPTURE: "CAPTURE",
               Operation.VOID: "CANCELLATION", Operation.REFUND: "REFUND",
               Operation.PAYOUT: "PAYOUT", Operation.DISPUTE_EVIDENCE: "CHARGEBACK_DEFENCE"}
_STATES: dict[Operation, dict[str, Outcome]] = {
    Operation.AUTHORIZE: {"AUTHORIZED": Outcome.APPROVED, "CAPTURED": Outcome.APPROVED,
                          "CANCELLED": Outcome.APPROVED, "COMPLETE": Outcome.APPROVED,
                          "PENDING": Outcome.PENDING},
    Operation.CAPTURE: {"COMPLETE": Outcome.APPROVED, "PENDING": Outcome.PENDING},
    Operation.VOID: {"COMPLETE": Outcome.APPROVED},
    Operation.REFUND: {"COMPLETE": Outcome.APPROVED, "PENDING": Outcome.PENDING},
    Operation.PAYOUT: {"COMPLETE": Outcome.APPROVED, "PENDING": Outcome.PENDING},
    # The defence was taken: the chargeback is defended (or decided since, on a replay).
    Operation.DISPUTE_EVIDENCE: {"DEFENDED": Outcome.APPROVED, "REVERSED": Outcome.APPROVED,
                                 "CONFIRMED": Outcome.APPROVED},
}
# globex's chargeback states in the processor's words (DisputeNotice.status), and events.
_CHARGEBACK_STATES = {"OPEN": "needs_response", "DEFENDED": "under_review",
                      "REVERSED": "won", "CONFIRMED": "lost"}
_CHARGEBACK_EVENTS = frozenset({"CHARGEBACK.OPENED", "CHARGEBACK.DEFENDED",
                                "CHARGEBACK.REVERSED", "CHARGEBACK.CONFIRMED"})
_REASONS: dict[str, tuple[Outcome, DeclineCode]] = {
    "INSUFFICIENT_FUNDS": (Outcome.DECLINED, DeclineCode.INSUFFICIENT_FUNDS),
    "EXPIRED_CARD": (Outcome.DECLINED, DeclineCode.CARD_EXPIRED),
    "ISSUER_UNAVAILABLE": (Outcome.DECLINED, DeclineCode.OTHER),
    "DO_NOT_HONOUR": (Outcome.DECLINED, DeclineCode.DO_NOT_HONOR),
    "FRAUD_SUSPECTED": (Outcome.DECLINED, DeclineCode.SUSPECTED_FRAUD),
    "BENEFICIARY_ACCOUNT_CLOSED": (Outcome.DECLINED, DeclineCode.INVALID_DESTINATION),
    "PAYOUT_RETURNED": (Outcome.DECLINED, DeclineCode.INVALID_DESTINATION),
    "INVALID_INSTRUMENT": (Outcome.FAILED, DeclineCode.INVALID_PAYMENT_METHOD),
    "INVALID_BENEFICIARY": (Outcome.FAILED, DeclineCode.INVALID_DESTINATION),
    "CURRENCY_UNSUPPORTED": (Outcome.FAILED, DeclineCode.CURRENCY_NOT_SUPPORTED),
    "CURRENCY_MISMATCH": (Outcome.FAILED, DeclineCode.INVALID_REQUEST),
    "AMOUNT_EXCEEDS_CAPTURABLE": (Outcome.FAILED, DeclineCode.AMOUNT_EXCEEDS_AUTHORIZED),
    "AMOUNT_EXCEEDS_REFUNDABLE": (Outcome.FAILED, DeclineCode.AMOUNT_EXCEEDS_AUTHORIZED),
    "PAYMENT_CANCELLED": (Outcome.FAILED, DeclineCode.ALREADY_VOIDED),
    "PAYMENT_NOT_CANCELLABLE": (Outcome.FAILED, DeclineCode.INVALID_REQUEST),
    "PAYMENT_REFUSED": (Outcome.FAILED, DeclineCode.INVALID_REQUEST),
    "PAYMENT_NOT_FOUND": (Outcome.FAILED, DeclineCode.NOT_FOUND),
    "CHARGEBACK_CLOSED": (Outcome.FAILED, DeclineCode.INVALID_REQUEST),
    "CHARGEBACK_NOT_FOUND": (Outcome.FAILED, DeclineCode.NOT_FOUND),
}
# A refusal globex has not told us about is still a refusal: final, nothing happened.
_REASON_UNKNOWN = (Outcome.DECLINED, DeclineCode.OTHER)
_EVENTS: dict[str, tuple[Operation, Outcome]] = {
    "PAYMENT.AUTHORIZED": (Operation.AUTHORIZE, Outcome.APPROVED),
    "PAYMENT.COMPLETED": (Operation.AUTHORIZE, Outcome.APPROVED),
    "PAYMENT.REFUSED": (Operation.AUTHORIZE, Outcome.DECLINED),
    "CAPTURE.COMPLETED": (Operation.CAPTURE, Outcome.APPROVED),
    "CANCELLATION.COMPLETED": (Operation.VOID, Outcome.APPROVED),
    "REFUND.COMPLETED": (Operation.REFUND, Outcome.APPROVED),
    "PAYOUT.COMPLETED": (Operation.PAYOUT, Outcome.APPROVED),
    "PAYOUT.FAILED": (Operation.PAYOUT, Outcome.DECLINED),
}
_ENTRY_TYPES = {"CAPTURE": (Operation.CAPTURE, "CREDIT"), "REFUND": (Operation.REFUND, "DEBIT"),
                "PAYOUT": (Operation.PAYOUT, "DEBIT")}
_KNOWN_WORDS = frozenset({
    *_REASONS, *_EVENTS, *(state for table in _STATES.values() for state in table),
    *_CHARGEBACK_EVENTS, *_CHARGEBACK_STATES, "chargeback_not_found",
    "authentication", "refused", "request_in_progress", "idempotency_key_mismatch",
    "idempotency_key_missing", "payment_not_found", "invalid_request", "invalid_money",
    "internal_error", "service_unavailable", "throttled",
})
_SIGNATURE_PREFIX = "hmac-sha256="


class GlobexAdapter:
    """The ``Adapter`` for globex (see the module docstring for the outcome mapping)."""

    name = "globex"
    currencies = frozenset({"USD", "EUR", "JPY"})
    # globex has no incremental authorization: a payment's amount is fixed once authorized.
    capabilities: frozenset[Operation] = frozenset()

    def __init__(self, *, key_id: str, signing_secret: str, webhook_secret: str,
                 timeout_s: float = 3.0) -> None:
        if not key_id or not signing_secret or not webhook_secret:
            raise ValueError("globex needs a key_id, a signing_secret and a webhook_secret")
        if not 0.0 < timeout_s <= 60.0:
            raise ValueError("timeout_s must be in (0, 60]")
        self._key_id = key_id
        self._signing_secret = signing_secret.encode()
        self._webhook_secret = webhook_secret.encode()
        self.timeout_s = timeout_s

    @classmethod
    def from_secrets_file(cls, path: Path | str, *, timeout_s: float = 3.0) -> GlobexAdapter:
        """The adapter with the secrets of ``path`` (the simulator's JSON secrets file).

        Raises ``ValueError`` if the file is not globex's or lacks a field.
        """
        raw = json.loads(Path(path).read_bytes())
        if not isinstance(raw, dict) or raw.get("provider") != "globex":
            raise ValueError(f"{path} is not a globex secrets file")
        fields = [raw.get(name) for name in ("key_id", "signing_secret", "webhook_secret")]
        if not all(isinstance(value, str) for value in fields):
            raise ValueError(f"{path} lacks key_id, signing_secret or webhook_secret")
        key_id, signing_secret, webhook_secret = (str(value) for value in fields)
        return cls(key_id=key_id, signing_secret=signing_secret, webhook_secret=webhook_secret,
                   timeout_s=timeout_s)

    def __repr__(self) -> str:  # never the secrets
        return f"GlobexAdapter(timeout_s={self.timeout_s})"

    # --- requests ---------------------------------------------------------------------------

    def build(self, request: ProviderRequest, now_s: float) -> HttpCall:
        """The signed globex call for ``request``; raises ``ValueError`` if a field the
        operation needs is empty or the currency has no known exponent (caller bugs)."""
        op = request.operation
        body: msgspec.Struct
        if op not in _OBJECT_KEYS:
            raise ValueError(f"globex does not offer {op.value}")
        if op is Operation.AUTHORIZE:
            _need(request.payment_method, "payment_method")
            path = "/api/v2/payments"
            body = _PaymentBody("AUTHORIZE", _money(request.amount, request.currency),
                                _Token(request.payment_method), request.reference)
        elif op is Operation.CAPTURE:
            path = f"/api/v2/payments/{_segment(request.provider_ref)}/captures"
            body = _CaptureBody(_money(request.amount, request.currency), request.reference,
                                request.final)
        elif op is Operation.VOID:
            path = f"/api/v2/payments/{_segment(request.provider_ref)}/cancellations"
            body = _CancelBody(request.reference)
        elif op is Operation.DISPUTE_EVIDENCE:
            path = f"/api/v2/chargebacks/{_segment(request.provider_ref)}/defence"
            body = _DefenceBody(request.evidence_text, list(request.evidence_files))
        elif op is Operation.REFUND:
            path = f"/api/v2/payments/{_segment(request.provider_ref)}/refunds"
            body = _MoneyBody(_money(request.amount, request.currency), request.reference)
        else:
            _need(request.destination, "destination")
            path = "/api/v2/payouts"
            body = _PayoutBody(_money(request.amount, request.currency),
                               _Token(request.destination), request.reference)
        return self._signed("POST", path, _ENCODER.encode(body), request.idempotency_key,
                            now_s)

    def build_status(self, request: ProviderRequest, now_s: float) -> HttpCall:
        _need(request.idempotency_key, "idempotency_key")
        path = f"/api/v2/operations?idempotencyKey={quote(request.idempotency_key, '')}"
        return self._signed("GET", path, b"", "", now_s)

    def build_settlement(self, settled_on: str, now_s: float) -> HttpCall:
        """The call that fetches the settlement report of ``settled_on`` (an ISO date).

        Not part of the ``Adapter`` protocol (yet); the report is read by ``parse_settlement``.
        """
        on = Date.fromisoformat(settled_on).isoformat()
        return self._signed("GET", f"/reports/settlement?date={on}", b"", "", now_s)

    def _signed(self, method: str, path: str, body: bytes, idempotency_key: str,
                now_s: float) -> HttpCall:
        stamp = str(int(now_s))
        canonical = "\n".join([method, path, stamp, idempotency_key,
                               hashlib.sha256(body).hexdigest()])
        signature = hmac.new(self._signing_secret, canonical.encode(), "sha256").digest()
        headers = {"x-globex-key-id": self._key_id, "x-globex-timestamp": stamp,
                   "x-globex-signature": base64.b64encode(signature).decode(),
                   "accept": "application/json"}
        if idempotency_key:
            headers["x-globex-idempotency-key"] = idempotency_key
        if body:
            headers["content-type"] = "application/json"
        return HttpCall(method=method, path=path, headers=headers, body=body)

    # --- answers ----------------------------------------------------------------------------

    def parse(self, request: ProviderRequest, status: int, headers: dict[str, str],
              body: bytes) -> ProviderReply:
        if request.operation not in _OBJECT_KEYS:
            return _not_offered(request, status)
        return _REPLIES.read(self._parse, request, status, headers, body)

    def _parse(self, request: ProviderRequest, status: int, headers: dict[str, str],
               body: bytes) -> ProviderReply:
        if 200 <= status < 300:
            answer = _ANSWER.decode(body)
            return self._answer(request, status, answer,
                                getattr(answer, _OBJECT_KEYS[request.operation]))
        wait_s = _wait_s(headers)
        if status in (429, 503):
            return ProviderReply(outcome=Outcome.RETRYABLE, http_status=status,
                                 retry_after_s=wait_s or RETRY_AFTER_DEFAULT_S,
                                 message=f"globex {status}: nothing done, try later")
        if status in (401, 403):
            return _reply(Outcome.FAILED, status, DeclineCode.AUTHENTICATION_FAILED,
                          "authentication")
        if not 400 <= status < 600:
            return _unknown(status, "not a globex answer")
        problem = _PROBLEM.decode(body).problem
        if status >= 500:
            if problem.committed is False:
                return ProviderReply(outcome=Outcome.RETRYABLE, http_status=status,
                                     retry_after_s=wait_s,
                                     message=f"globex {status} {_safe(problem.code)}: "
                                             "nothing committed")
            return _unknown(status, "no word on whether it happened")
        if status == 409 and problem.code == "request_in_progress":
            return ProviderReply(outcome=Outcome.RETRYABLE, http_status=status,
                                 retry_after_s=wait_s or RETRY_AFTER_DEFAULT_S,
                                 message="globex 409 request_in_progress")
        if status == 404 and problem.code in ("payment_not_found", "chargeback_not_found"):
            return _reply(Outcome.FAILED, status, DeclineCode.NOT_FOUND, problem.code)
        if not problem.code:
            return _unknown(status, "not a globex problem body")
        return _reply(Outcome.FAILED, status, DeclineCode.INVALID_REQUEST, problem.code)

    def _answer(self, request: ProviderRequest, status: int, answer: _Answer,
                obj: _Object | None) -> ProviderReply:
        op = request.operation
        ref = ""
        if obj is not None:
            ref = obj.payment_id if op in (Operation.CAPTURE, Operation.VOID) else obj.id
        outcome = answer.result.outcome
        if not outcome.success:
            word = outcome.reason.code if outcome.reason is not None else ""
            result, code = _REASONS.get(word, _REASON_UNKNOWN)
            return _reply(result, status, code, word or "refused", provider_ref=ref)
        if obj is None or not ref:
            return _unknown(status, "success without the object")
        result_or_none = _STATES[op].get(obj.state)
        if result_or_none is None:
            return _unknown(status, f"state {_safe(obj.state)}")
        amount = 0
        if obj.money is not None:
            if obj.money.currency != request.currency:
                return _unknown(status, "answer in another currency")
            amount = _to_minor(obj.money.value, obj.money.currency)
        return ProviderReply(outcome=result_or_none, provider_ref=ref, amount=amount,
                             http_status=status, message=f"globex {status} {_safe(obj.state)}")

    def parse_status(self, request: ProviderRequest, status: int, headers: dict[str, str],
                     body: bytes) -> ProviderReply:
        if request.operation not in _OBJECT_KEYS:
            return _not_offered(request, status)
        return _REPLIES.read(self._parse_status, request, status, headers, body,
                             what="status answer")

    def _parse_status(self, request: ProviderRequest, status: int, headers: dict[str, str],
                      body: bytes) -> ProviderReply:
        if status == 200:
            answer = _ANSWER.decode(body)
            obj = answer.operation
            if obj is None or obj.type != _TYPE_WORDS[request.operation]:
                return _unknown(status, "the key belongs to another operation")
            # A refusal by rule is stored without an object (state REJECTED, no id).
            return self._answer(request, status, answer, obj if obj.id else None)
        if status == 404 and _PROBLEM.decode(body).problem.code == "operation_not_found":
            return ProviderReply(outcome=Outcome.DECLINED, decline_code=DeclineCode.NOT_FOUND,
                                 http_status=status,
                                 message="globex 404: never received; resend with the same key")
        if status in (401, 403):
            return ProviderReply(outcome=Outcome.UNKNOWN,
                                 decline_code=DeclineCode.AUTHENTICATION_FAILED,
                                 http_status=status,
                                 message=f"globex {status}: status query refused (credentials)")
        return ProviderReply(outcome=Outcome.UNKNOWN, http_status=status,
                             retry_after_s=_wait_s(headers) or RETRY_AFTER_DEFAULT_S,
                             message=f"globex {status}: still unknown, ask again")

    # --- webhooks ---------------------------------------------------------------------------

    def verify_webhook(self, headers: dict[str, str], body: bytes,
                       now_s: float) -> WebhookEvent:
        self._verify_signature(headers, body, now_s)
        return self._event_of(body)

    def verify_webhooks(self, headers: dict[str, str], body: bytes,
                        now_s: float) -> list[WebhookEvent]:
        self._verify_signature(headers, body, now_s)
        return read_events("globex", body, self._event_of)

    def _event_of(self, body: bytes) -> WebhookEvent:
        try:
            return self._event(_EVENT.decode(body))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError):
            raise WebhookRejected("webhook_malformed", "globex event unreadable") from None

    def _verify_signature(self, headers: dict[str, str], body: bytes, now_s: float) -> None:
        stamp = header(headers, "x-globex-webhook-timestamp")
        signature = header(headers, "x-globex-webhook-signature")
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 16
                and signature.startswith(_SIGNATURE_PREFIX)):
            raise WebhookRejected("webhook_malformed", "globex signature headers missing")
        try:
            given = base64.b64decode(signature.removeprefix(_SIGNATURE_PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise WebhookRejected("webhook_malformed", "globex signature not base64") from None
        expected = hmac.new(self._webhook_secret, f"{stamp}\n".encode() + body,
                            "sha256").digest()
        if not hmac.compare_digest(expected, given):
            raise WebhookRejected("webhook_signature_invalid", "globex signature does not match")
        require_fresh("globex", int(stamp) / 1000.0, now_s, WEBHOOK_TOLERANCE_S)

    def _event(self, event: _Event) -> WebhookEvent:
        if event.event_type in _CHARGEBACK_EVENTS:
            return _chargeback_event(event)
        kind = _EVENTS.get(event.event_type)
        subject = event.subject
        if kind is None or subject.type != _TYPE_WORDS[kind[0]] or not event.event_id:
            raise ValueError("event type not understood")
        operation, outcome = kind
        if not subject.idempotency_key or subject.money is None:
            raise ValueError("event without key or money")
        occurred = datetime.fromisoformat(event.occurred_at)
        if occurred.tzinfo is None:
            raise ValueError("event time without zone")
        ref = subject.payment_id if operation in (Operation.CAPTURE, Operation.VOID) \
            else subject.id
        amount = _to_minor(subject.money.value, subject.money.currency)
        decline = None
        if outcome is Outcome.DECLINED:
            word = subject.reason.code if subject.reason is not None else ""
            decline = _REASONS.get(word, _REASON_UNKNOWN)[1]
            amount = 0
        return WebhookEvent(event_id=event.event_id, operation=operation,
                            idempotency_key=subject.idempotency_key, provider_ref=ref,
                            outcome=outcome, amount=amount,
                            occurred_at_s=occurred.timestamp(), decline_code=decline)

    # --- settlement -------------------------------------------------------------------------

    def parse_settlement(self, report: bytes) -> list[SettlementLine]:
        """The transactions of globex's report; raises ``ValueError`` as ``parse_report``."""
        return self.parse_report(report).lines

    def parse_report(self, report: bytes) -> SettlementReport:
        """globex's JSON-lines report: ``ENTRY`` records (transactions, and ``FEE`` entries:
        fees on their own), ``PAYOUT_BATCH`` records and a ``TRAILER`` counting the entries.
        Raises ``ValueError`` if a record is unreadable, an amount inexact, or the trailer
        missing or not matching the count (a truncated report)."""
        lines: list[SettlementLine] = []
        fees: list[SettlementFee] = []
        batches: list[SettlementPayoutBatch] = []
        trailer: _Entry | None = None
        for number, raw in enumerate(report.splitlines(), start=1):
            if not raw.strip():
                continue
            if trailer is not None:
                raise ValueError(f"globex report line {number}: record after the trailer")
            try:
                entry = _ENTRY.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise ValueError(f"globex report line {number}: unreadable") from None
            if entry.record_type == "TRAILER":
                trailer = entry
            elif entry.record_type == "PAYOUT_BATCH":
                batches.append(_payout_batch(entry, number))
            elif entry.entry_type == "FEE":
                fees.append(_settlement_fee(entry, number))
            else:
                lines.append(_settlement_line(entry, number))
        if trailer is None or trailer.entry_count != len(lines) + len(fees):
            raise ValueError("globex report: trailer missing or count does not match")
        return SettlementReport(lines=lines, fees=fees, batches=batches)


# --- helpers ------------------------------------------------------------------------------------


def _chargeback_event(event: _Event) -> WebhookEvent:
    """A globex chargeback event as a ``WebhookEvent`` carrying its ``DisputeNotice``."""
    subject = event.subject
    status = _CHARGEBACK_STATES.get(subject.state)
    if subject.type != "CHARGEBACK" or status is None or subject.money is None or not (
            event.event_id and subject.id and subject.payment_id):
        raise ValueError("chargeback event not understood")
    occurred = datetime.fromisoformat(event.occurred_at)
    if occurred.tzinfo is None:
        raise ValueError("event time without zone")
    amount = _to_minor(subject.money.value, subject.money.currency)
    fee = 0
    if subject.fee_money is not None:
        if subject.fee_money.currency != subject.money.currency:
            raise ValueError("chargeback fee in another currency")
        fee = _to_minor(subject.fee_money.value, subject.fee_money.currency)
    due_by_s = 0.0
    if subject.respond_by:
        respond_by = datetime.fromisoformat(subject.respond_by)
        if respond_by.tzinfo is None:
            raise ValueError("respondBy without zone")
        due_by_s = respond_by.timestamp()
    reason = subject.reason_code.lower() if re.fullmatch(r"[A-Z_]{0,64}",
                                                         subject.reason_code) else ""
    notice = DisputeNotice(dispute_ref=subject.id, authorization_ref=subject.payment_id,
                           status=status, amount=amount, fee=fee,
                           currency=subject.money.currency, reason=reason,
                           evidence_due_by_s=due_by_s)
    return WebhookEvent(event_id=event.event_id, operation=Operation.DISPUTE_EVIDENCE,
                        idempotency_key="", provider_ref=subject.payment_id,
                        outcome=Outcome.APPROVED, amount=amount,
                        occurred_at_s=occurred.timestamp(), dispute=notice)


def _settlement_line(entry: _Entry, number: int) -> SettlementLine:
    kind = _ENTRY_TYPES.get(entry.entry_type)
    if kind is None or entry.direction != kind[1] or entry.gross is None or entry.fee is None:
        raise ValueError(f"globex report line {number}: unknown entry type or direction")
    operation = kind[0]
    if entry.gross.currency != entry.fee.currency:
        raise ValueError(f"globex report line {number}: fee in another currency")
    amount = _to_minor(entry.gross.value, entry.gross.currency)
    fee = _to_minor(entry.fee.value, entry.fee.currency)
    if amount == 0:
        raise ValueError(f"globex report line {number}: zero amount")
    ref = entry.payment_id if operation is Operation.CAPTURE else entry.operation_id
    return SettlementLine(provider_ref=ref, idempotency_key=entry.idempotency_key,
                          operation=operation, amount=amount, currency=entry.gross.currency,
                          fee=fee, settled_on=Date.fromisoformat(entry.settlement_date).isoformat(),
                          line_ref=entry.operation_id)


def _settlement_fee(entry: _Entry, number: int) -> SettlementFee:
    if entry.direction != "DEBIT" or entry.fee is None or not entry.operation_id or (
            entry.gross is not None and entry.gross.currency != entry.fee.currency):
        raise ValueError(f"globex report line {number}: a FEE entry is a debit with a fee")
    if entry.gross is not None and _to_minor(entry.gross.value, entry.gross.currency) != 0:
        raise ValueError(f"globex report line {number}: a FEE entry has no gross")
    fee = _to_minor(entry.fee.value, entry.fee.currency)
    if fee == 0:
        raise ValueError(f"globex report line {number}: a FEE entry of zero")
    return SettlementFee(fee_ref=entry.operation_id, amount=fee, currency=entry.fee.currency,
                         settled_on=Date.fromisoformat(entry.settlement_date).isoformat())


def _payout_batch(entry: _Entry, number: int) -> SettlementPayoutBatch:
    if entry.net is None or entry.direction not in ("CREDIT", "DEBIT") or not entry.batch_id \
            or not 0 <= entry.entry_count <= 10**9:
        raise ValueError(f"globex report line {number}: a batch has an id, a net and a count")
    net = _to_minor(entry.net.value, entry.net.currency)
    return SettlementPayoutBatch(
        batch_ref=entry.batch_id, currency=entry.net.currency,
        net=net if entry.direction == "CREDIT" else -net, entries=entry.entry_count,
        settled_on=Date.fromisoformat(entry.settlement_date).isoformat())


def _money(amount: int, currency: str) -> _Money:
    exponent = CURRENCY_EXPONENTS.get(currency)
    if exponent is None:
        raise ValueError("globex: unknown currency")
    if not 0 <= amount <= AMOUNT_MAX:
        raise ValueError("globex: amount out of range")
    return _Money(minor_to_decimal(amount, exponent), currency)


def _to_minor(text: str, currency: str) -> int:
    """Decimal major units as minor units, exactly; raises ``ValueError`` otherwise."""
    exponent = CURRENCY_EXPONENTS.get(currency)
    if exponent is None:
        raise ValueError("globex: not a money value")
    try:
        amount = decimal_to_minor(text, exponent, signed=False)
    except ValueError as exc:
        raise ValueError(f"globex: money value {exc}") from None
    if amount > AMOUNT_MAX:
        raise ValueError("globex: amount out of range")
    return amount


def _need(value: str, what: str) -> None:
    path_segment("globex", value, what)


def _segment(value: str) -> str:
    return path_segment("globex", value)


def _wait_s(headers: dict[str, str]) -> float:
    """How long globex asked us to wait: its ``Globex-Retry-After-Ms``, else a standard
    ``Retry-After`` in seconds; 0 when neither is there or readable."""
    for name, scale in (("globex-retry-after-ms", 0.001), ("retry-after", 1.0)):
        seconds = header_seconds(header(headers, name), cap_s=RETRY_AFTER_MAX_S, scale=scale)
        if seconds is not None:
            return seconds
    return 0.0


# Only words globex documents are repeated in a reply's message (Replies.safe).
_REPLIES = Replies("globex", _KNOWN_WORDS)
_safe = _REPLIES.safe
_reply = _REPLIES.reply
_unknown = _REPLIES.unknown


def _not_offered(request: ProviderRequest, status: int) -> ProviderReply:
    """An operation globex does not offer (``build`` refuses it, so none is ever sent)."""
    return _reply(Outcome.FAILED, status, DeclineCode.INVALID_REQUEST,
                  f"{request.operation.value} not offered")
