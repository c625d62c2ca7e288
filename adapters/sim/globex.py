"""The simulated ``globex`` provider: signed requests, decimal money, asynchronous settlement.

Run it with ``python -m adapters.sim.globex --port 0 --secrets-file PATH``. Its wire format
(see docs/providers.md for the whole of it):

- Auth: every API call is signed. Headers ``X-Globex-Key-Id``, ``X-Globex-Timestamp`` (Unix
  seconds; more than 300 s away from globex's clock is refused) and ``X-Globex-Signature``:
  base64 of HMAC-SHA256 over ``METHOD\\nPATH?QUERY\\nTIMESTAMP\\nIDEMPOTENCY_KEY\\nSHA256(body)``
  (hex). The idempotency key travels in ``X-Globex-Idempotency-Key``.
- Money is ``{"value": "10.50", "currency": "EUR"}`` (decimal major units). Answers are
  ``{"<object>": {..., "state": ...}, "result": {"outcome": {"success": bool, "reason":
  {"code": ...}}}}``; business refusals are 200 with ``success: false``. States:
  ``AUTHORIZED``, ``CAPTURED``, ``CANCELLED``, ``REFUSED``, ``PENDING``, ``COMPLETE``,
  ``FAILED``.
- Captures, refunds and payouts answer ``PENDING`` and complete later (webhook, status query).
- Errors are ``{"problem": {"code": ..., "status": ..., "title": ...}}``: 400 validation,
  401 auth, 404 unknown payment or key, 409 idempotency; 503 ``service_unavailable`` /
  ``throttled`` with ``Globex-Retry-After-Ms``; 500 ``internal_error`` with ``committed``.
- Webhooks carry ``X-Globex-Webhook-Timestamp`` (Unix milliseconds) and
  ``X-Globex-Webhook-Signature: hmac-sha256=<base64 HMAC-SHA256 of "<ms>\\n" + body>``.
- The settlement report (``GET /reports/settlement?date=``, signed) is JSON lines: ``ENTRY``
  records (transactions and fees), ``PAYOUT_BATCH`` records and a ``TRAILER`` with the count.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from datetime import date as Date
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from adapters.base import Operation
from adapters.sim.core import (
    Book,
    Dispute,
    FeeSchedule,
    Op,
    Refusal,
    Refused,
    card_brand,
    luhn_valid,
    minor_to_text,
    mint_bank_token,
    mint_card_token,
    text_to_minor,
)
from adapters.sim.server import OPS_MAX, Answer, SimProvider, run_main
from processor.types import AMOUNT_MAX

__all__ = ["CURRENCIES", "SIGNATURE_TOLERANCE_S", "GlobexSim", "main"]

CURRENCIES = frozenset({"USD", "EUR", "JPY"})
FEES = FeeSchedule(capture_bps=140, capture_fixed=25, refund_fixed=15, payout_fixed=50)
ID_PREFIXES = {Operation.AUTHORIZE: "gx_pay_", Operation.CAPTURE: "gx_cap_",
               Operation.VOID: "gx_can_", Operation.REFUND: "gx_ref_",
               Operation.PAYOUT: "gx_po_"}
SIGNATURE_TOLERANCE_S = 300
PROBLEM = "application/problem+json"
TYPE_WORDS = {Operation.AUTHORIZE: "PAYMENT", Operation.CAPTURE: "CAPTURE",
              Operation.VOID: "CANCELLATION", Operation.REFUND: "REFUND",
              Operation.PAYOUT: "PAYOUT"}
OBJECT_KEYS = {Operation.AUTHORIZE: "payment", Operation.CAPTURE: "capture",
               Operation.VOID: "cancellation", Operation.REFUND: "refund",
               Operation.PAYOUT: "payout"}

Currency = Annotated[str, Meta(pattern="^[A-Z]{3}$")]
Text = Annotated[str, Meta(max_length=255)]


class _Money(msgspec.Struct, forbid_unknown_fields=True):
    value: Annotated[str, Meta(max_length=32)]
    currency: Currency


class _Ref(msgspec.Struct, forbid_unknown_fields=True):
    token: Text


class _Card(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    pan: Annotated[str, Meta(max_length=32)]
    expiry_month: Annotated[int, Meta(ge=1, le=12)]
    expiry_year: Annotated[int, Meta(ge=2000, le=2199)]
    cvv: Annotated[str, Meta(pattern=r"^\d{3,4}$")]


class _BankAccount(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    account_number: Annotated[str, Meta(pattern=r"^\d{6,34}$")]
    sort_code: Annotated[str, Meta(pattern=r"^\d{6}$")]


class _TokenParams(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    card: _Card | None = None
    bank_account: _BankAccount | None = None


class _PaymentParams(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    intent: Literal["AUTHORIZE", "SALE"]
    money: _Money
    instrument: _Ref
    merchant_reference: Text = ""


class _MoneyParams(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    money: _Money
    merchant_reference: Text = ""


class _CaptureParams(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    money: _Money
    merchant_reference: Text = ""
    final_capture: bool = True  # false: the rest of the payment stays capturable


class _CancelParams(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    merchant_reference: Text = ""


class _PayoutParams(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    money: _Money
    beneficiary: _Ref
    merchant_reference: Text = ""


class _DefenceParams(msgspec.Struct, forbid_unknown_fields=True):
    statement: Annotated[str, Meta(min_length=1, max_length=20_000)]
    documents: Annotated[list[Annotated[str, Meta(max_length=500)]], Meta(max_length=10)] = []


class _BadMoney(Exception):
    pass


REASONS: dict[Refusal, str] = {
    Refusal.INSUFFICIENT_FUNDS: "INSUFFICIENT_FUNDS",
    Refusal.CARD_EXPIRED: "EXPIRED_CARD",
    Refusal.PROCESSING_ERROR: "ISSUER_UNAVAILABLE",
    Refusal.DO_NOT_HONOR: "DO_NOT_HONOUR",
    Refusal.SUSPECTED_FRAUD: "FRAUD_SUSPECTED",
    Refusal.ACCOUNT_CLOSED: "BENEFICIARY_ACCOUNT_CLOSED",
    Refusal.PAYOUT_RETURNED: "PAYOUT_RETURNED",
    Refusal.INVALID_PAYMENT_METHOD: "INVALID_INSTRUMENT",
    Refusal.INVALID_DESTINATION: "INVALID_BENEFICIARY",
    Refusal.CURRENCY_NOT_SUPPORTED: "CURRENCY_UNSUPPORTED",
    Refusal.CURRENCY_MISMATCH: "CURRENCY_MISMATCH",
    Refusal.AMOUNT_EXCEEDS_AUTHORIZED: "AMOUNT_EXCEEDS_CAPTURABLE",
    Refusal.AMOUNT_EXCEEDS_CAPTURED: "AMOUNT_EXCEEDS_REFUNDABLE",
    Refusal.ALREADY_VOIDED: "PAYMENT_CANCELLED",
    Refusal.ALREADY_CAPTURED: "PAYMENT_NOT_CANCELLABLE",
    Refusal.AUTHORIZATION_DECLINED: "PAYMENT_REFUSED",
    Refusal.NOT_FOUND: "PAYMENT_NOT_FOUND",
    Refusal.DISPUTE_NOT_OPEN: "CHARGEBACK_CLOSED",
}
CHARGEBACK_STATES = {"needs_response": "OPEN", "under_review": "DEFENDED", "won": "REVERSED",
                     "lost": "CONFIRMED"}
CHARGEBACK_EVENTS = {"needs_response": "CHARGEBACK.OPENED",
                     "under_review": "CHARGEBACK.DEFENDED", "won": "CHARGEBACK.REVERSED",
                     "lost": "CHARGEBACK.CONFIRMED"}
DEFENCE_TYPE = "CHARGEBACK_DEFENCE"


def problem(status: int, code: str, title: str, headers: dict[str, str] | None = None,
            **extra: Any) -> Response:
    return Response(_problem_body(status, code, title, **extra), status, headers=headers,
                    media_type=PROBLEM)


def _problem_body(status: int, code: str, title: str, **extra: Any) -> bytes:
    return msgspec.json.encode({"problem": {
        "type": f"https://developer.globex.example/problems/{code}", "code": code,
        "title": title, "status": status, **extra}})


def _outcome(refusal: Refusal | None) -> dict[str, Any]:
    """The ``result`` member every globex answer carries."""
    if refusal is None:
        return {"result": {"outcome": {"success": True}}}
    return {"result": {"outcome": {"success": False, "reason": {"code": REASONS[refusal]}}}}


def _json(payload: Any) -> bytes:
    return msgspec.json.encode(payload)


def _money(amount: int, currency: str) -> dict[str, str]:
    return {"value": minor_to_text(amount, currency), "currency": currency}


def _instant(at_s: float) -> str:
    stamp = datetime.fromtimestamp(at_s, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _minor(money: _Money) -> int:
    amount = text_to_minor(money.value, money.currency)
    if amount is None or not 1 <= amount <= AMOUNT_MAX:
        raise _BadMoney
    return amount


class GlobexSim(SimProvider):
    name = "globex"
    dispute_prefix = "gx_cb_"
    batch_prefix = "gx_batch_"

    def make_book(self) -> Book:
        return Book(currencies=CURRENCIES, fees=FEES, id_prefixes=ID_PREFIXES,
                    clock_s=self.clock_s, ops_max=OPS_MAX)

    def routes(self) -> Sequence[BaseRoute]:
        return [
            Route("/api/v2/tokens", self.tokens, methods=["POST"]),
            Route("/api/v2/payments", self.api(self.payment, mutating=True), methods=["POST"]),
            Route("/api/v2/payments/{payment_id}/captures",
                  self.api(self.capture, mutating=True), methods=["POST"]),
            Route("/api/v2/payments/{payment_id}/cancellations",
                  self.api(self.cancel, mutating=True), methods=["POST"]),
            Route("/api/v2/payments/{payment_id}/refunds",
                  self.api(self.refund, mutating=True), methods=["POST"]),
            Route("/api/v2/payouts", self.api(self.payout, mutating=True), methods=["POST"]),
            Route("/api/v2/operations", self.api(self.operation_status, mutating=False),
                  methods=["GET"]),
            Route("/api/v2/chargebacks/{chargeback_id}/defence",
                  self.api(self.defence, mutating=True), methods=["POST"]),
            Route("/reports/settlement", self.settlement_report, methods=["GET"]),
        ]

    # --- the provider's answers to faults and misuse ----------------------------------------

    def authenticate(self, request: Request, body: bytes) -> Response | None:
        headers = request.headers
        key_id = headers.get("x-globex-key-id", "")
        stamp = headers.get("x-globex-timestamp", "")
        given = headers.get("x-globex-signature", "")
        if not hmac.compare_digest(key_id.encode(), self.secrets["key_id"].encode()):
            return problem(401, "unknown_key", "The key id is not known.")
        if not stamp.isdigit() or len(stamp) > 12 or not given:
            return problem(401, "signature_missing", "The request is not signed.")
        if abs(self.clock_s() - int(stamp)) > SIGNATURE_TOLERANCE_S:
            return problem(401, "stale_timestamp", "The request timestamp is too old or new.")
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string", b"")
        target = raw_path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
        canonical = "\n".join([request.method, target, stamp,
                               headers.get("x-globex-idempotency-key", ""),
                               hashlib.sha256(body).hexdigest()])
        expected = base64.b64encode(hmac.new(self.secrets["signing_secret"].encode(),
                                             canonical.encode(), "sha256").digest())
        if not hmac.compare_digest(expected, given.encode()):
            return problem(401, "signature_invalid", "The signature does not match.")
        return None

    def _wait_headers(self, retry_after_s: float) -> dict[str, str]:
        return {"globex-retry-after-ms": str(max(0, math.ceil(retry_after_s * 1000)))}

    def unavailable(self, retry_after_s: float) -> Response:
        return problem(503, "service_unavailable", "Globex is unavailable; nothing was done.",
                       headers=self._wait_headers(retry_after_s))

    def throttled(self, retry_after_s: float) -> Response:
        return problem(503, "throttled", "Too many requests; nothing was done.",
                       headers=self._wait_headers(retry_after_s))

    def injected_error(self) -> Response:
        return problem(500, "internal_error", "Internal error.", committed=False)

    def in_progress(self) -> Response:
        return problem(409, "request_in_progress", "A request with this key is in progress.",
                       headers=self._wait_headers(1.0))

    def key_reused(self) -> Response:
        return problem(409, "idempotency_key_mismatch",
                       "The idempotency key was used with another request.")

    # --- tokens ("hosted fields") -------------------------------------------------------------

    async def tokens(self, request: Request) -> Response:
        """Exchange a card or bank account for a token; public, as hosted fields are."""
        try:
            params = msgspec.json.decode(await request.body(), type=_TokenParams)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return problem(400, "invalid_request", "The request body is not valid.")
        self.counts.tokens += 1
        if params.card is not None and params.bank_account is None:
            pan = params.card.pan
            if not luhn_valid(pan):
                return problem(422, "invalid_card_number", "The card number is not valid.")
            return Response(_json({"token": {"id": mint_card_token(pan), "type": "CARD",
                                             "last4": pan[-4:], "scheme": card_brand(pan)},
                                   **_outcome(None)}), 200, media_type="application/json")
        if params.bank_account is not None and params.card is None:
            account = params.bank_account.account_number
            return Response(_json({"token": {"id": mint_bank_token(account),
                                             "type": "BANK_ACCOUNT", "last4": account[-4:]},
                                   **_outcome(None)}), 200, media_type="application/json")
        return problem(400, "invalid_request", "Give one of card or bankAccount.")

    # --- operations ---------------------------------------------------------------------------

    async def payment(self, request: Request, body: bytes) -> Response:
        return await self._operate(request, body, Operation.AUTHORIZE, _PaymentParams,
                                   self._authorize)

    async def capture(self, request: Request, body: bytes) -> Response:
        return await self._operate(request, body, Operation.CAPTURE, _CaptureParams,
                                   self._capture)

    async def cancel(self, request: Request, body: bytes) -> Response:
        return await self._operate(request, body or b"{}", Operation.VOID, _CancelParams,
                                   self._cancel)

    async def refund(self, request: Request, body: bytes) -> Response:
        return await self._operate(request, body, Operation.REFUND, _MoneyParams,
                                   self._refund)

    async def payout(self, request: Request, body: bytes) -> Response:
        return await self._operate(request, body, Operation.PAYOUT, _PayoutParams,
                                   self._payout)

    async def _operate(self, request: Request, body: bytes, operation: Operation,
                       params_type: type[Any],
                       run: Callable[[str, Any, str], Op]) -> Response:
        key = self.request_key(request, "x-globex-idempotency-key")
        if key is None:
            return problem(400, "idempotency_key_missing",
                           "X-Globex-Idempotency-Key is required.")
        try:
            params = msgspec.json.decode(body, type=params_type)
            if isinstance(params, _PaymentParams | _MoneyParams | _CaptureParams
                          | _PayoutParams):
                _minor(params.money)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return problem(400, "invalid_request", "The request body is not valid.")
        except _BadMoney:
            return problem(400, "invalid_money", "The money value is not exact or not valid.")
        payment_id = request.path_params.get("payment_id", "")

        def work() -> Answer:
            try:
                op = run(key, params, payment_id)
            except Refused as refused:
                if refused.refusal is Refusal.NOT_FOUND:
                    return Answer(404, _problem_body(404, "payment_not_found",
                                                     "No such payment."),
                                  media_type=PROBLEM)
                return Answer(200, _json(_outcome(refused.refusal)))
            self.recorded(op)
            return Answer(200, _json({OBJECT_KEYS[op.operation]: self._render(op),
                                      **_outcome(op.refusal)}), op.id)

        return await self.idempotent(request, key, operation, body, work)

    def _authorize(self, key: str, p: _PaymentParams, _: str) -> Op:
        return self.book.authorize(key=key, reference=p.merchant_reference,
                                   amount=_minor(p.money), currency=p.money.currency,
                                   payment_method=p.instrument.token,
                                   capture=p.intent == "SALE", settle_now=False)

    def _capture(self, key: str, p: _CaptureParams, payment_id: str) -> Op:
        return self.book.capture(key=key, reference=p.merchant_reference,
                                 authorization_id=payment_id, amount=_minor(p.money),
                                 currency=p.money.currency, settle_now=False,
                                 final=p.final_capture)

    def _cancel(self, key: str, p: _CancelParams, payment_id: str) -> Op:
        return self.book.void(key=key, reference=p.merchant_reference,
                              authorization_id=payment_id)

    def _refund(self, key: str, p: _MoneyParams, payment_id: str) -> Op:
        return self.book.refund(key=key, reference=p.merchant_reference,
                                authorization_id=payment_id, amount=_minor(p.money),
                                currency=p.money.currency, settle_now=False)

    def _payout(self, key: str, p: _PayoutParams, _: str) -> Op:
        return self.book.payout(key=key, reference=p.merchant_reference,
                                amount=_minor(p.money), currency=p.money.currency,
                                destination=p.beneficiary.token, settle_now=False)

    async def defence(self, request: Request, body: bytes) -> Response:
        """Defend a chargeback (globex's word for evidence): OPEN -> DEFENDED, once; a
        second defence is refused (``CHARGEBACK_CLOSED``, 200 with success false)."""
        key = self.request_key(request, "x-globex-idempotency-key")
        if key is None:
            return problem(400, "idempotency_key_missing",
                           "X-Globex-Idempotency-Key is required.")
        try:
            params = msgspec.json.decode(body, type=_DefenceParams)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return problem(400, "invalid_request", "The request body is not valid.")
        chargeback_id = request.path_params["chargeback_id"]

        def work() -> Answer:
            try:
                dispute = self.book.submit_evidence(chargeback_id, text=params.statement,
                                                    files=tuple(params.documents))
            except Refused as refused:
                if refused.refusal is Refusal.NOT_FOUND:
                    return Answer(404, _problem_body(404, "chargeback_not_found",
                                                     "No such chargeback."),
                                  media_type=PROBLEM)
                return Answer(200, _json(_outcome(refused.refusal)))
            return Answer(200, _json({"chargeback": self._chargeback(dispute),
                                      **_outcome(None)}))

        return await self.idempotent(request, key, Operation.DISPUTE_EVIDENCE, body, work)

    async def operation_status(self, request: Request, body: bytes) -> Response:
        """What became of the operation requested with this idempotency key."""
        self.counts.status_queries += 1
        key = request.query_params.get("idempotencyKey", "")
        found = self.store.lookup(key) if key else None
        if found is None:
            return problem(404, "operation_not_found", "No operation with this key.")
        if found == "in_progress":
            return self.in_progress()
        op = self.book.get(found.op_id) if found.op_id else None
        if found.operation is Operation.DISPUTE_EVIDENCE:
            stored = msgspec.json.decode(found.body)
            chargeback = stored.get("chargeback") if isinstance(stored, dict) else None
            result = stored.get("result") if isinstance(stored, dict) else None
            payload = {"operation": {**(chargeback or {"state": "REJECTED",
                                                        "idempotencyKey": key}),
                                     "type": DEFENCE_TYPE},
                       "result": result or {"outcome": {
                           "success": False, "reason": {"code": "CHARGEBACK_NOT_FOUND"}}}}
        elif op is not None:
            payload = {"operation": {"type": TYPE_WORDS[op.operation], **self._render(op)},
                       **_outcome(op.refusal)}
        else:
            stored = msgspec.json.decode(found.body)
            result = stored.get("result") if isinstance(stored, dict) else None
            outcome = (result.get("outcome") if isinstance(result, dict) else None) or {
                "success": False, "reason": {"code": "PAYMENT_NOT_FOUND"}}
            payload = {"operation": {"type": TYPE_WORDS[found.operation], "state": "REJECTED",
                                     "idempotencyKey": key},
                       "result": {"outcome": outcome}}
        return Response(_json(payload), 200, media_type="application/json")

    # --- rendering ----------------------------------------------------------------------------

    def _render(self, op: Op) -> dict[str, Any]:
        rendered: dict[str, Any] = {"id": op.id, "state": self._state(op),
                                    "money": _money(op.amount, op.currency),
                                    "merchantReference": op.reference,
                                    "idempotencyKey": op.idempotency_key,
                                    "createdAt": _instant(op.created_at_s)}
        if op.operation is Operation.AUTHORIZE:
            rendered["capturedMoney"] = _money(op.captured, op.currency)
            rendered["capturableMoney"] = _money(op.capturable, op.currency)
            rendered["refundedMoney"] = _money(op.refunded, op.currency)
            rendered["instrument"] = {"last4": op.card_last4}
        elif op.operation is Operation.PAYOUT:
            rendered["beneficiary"] = {"last4": op.destination_last4}
        else:
            rendered["paymentId"] = op.authorization_id
        if op.settled_at_s is not None and op.state in ("settled", "failed"):
            rendered["completedAt"] = _instant(op.settled_at_s)
        return rendered

    @staticmethod
    def _state(op: Op) -> str:
        if op.state == "declined":
            return "REFUSED"
        if op.operation is Operation.AUTHORIZE:
            if op.voided:
                return "CANCELLED"
            if op.captured_at_authorization:
                return "PENDING" if op.state == "pending" else "COMPLETE"
            return "CAPTURED" if op.captured > 0 else "AUTHORIZED"
        return {"pending": "PENDING", "failed": "FAILED"}.get(op.state, "COMPLETE")

    # --- webhooks -----------------------------------------------------------------------------

    def event(self, op: Op) -> tuple[str, bytes] | None:
        kind = _event_type(op)
        if kind is None:
            return None
        event_id = f"gx_evt_{uuid.uuid4()}"
        subject: dict[str, Any] = {"type": TYPE_WORDS[op.operation], **self._render(op)}
        if op.refusal is not None:
            subject["reason"] = {"code": REASONS[op.refusal]}
        body = _json({"eventId": event_id, "eventType": kind,
                      "occurredAt": _instant(self.clock_s()), "subject": subject})
        return event_id, body

    def _chargeback(self, dispute: Dispute) -> dict[str, Any]:
        return {"id": dispute.id, "type": "CHARGEBACK",
                "state": CHARGEBACK_STATES[dispute.state],
                "money": _money(dispute.amount, dispute.currency),
                "feeMoney": _money(dispute.fee, dispute.currency),
                "paymentId": dispute.authorization_id,
                "reasonCode": dispute.reason.upper(),
                "respondBy": _instant(dispute.evidence_due_by_s),
                "createdAt": _instant(dispute.created_at_s)}

    def dispute_event(self, dispute: Dispute) -> tuple[str, bytes]:
        event_id = f"gx_evt_{uuid.uuid4()}"
        body = _json({"eventId": event_id, "eventType": CHARGEBACK_EVENTS[dispute.state],
                      "occurredAt": _instant(self.clock_s()),
                      "subject": self._chargeback(dispute)})
        return event_id, body

    def batch_webhook_body(self, bodies: list[bytes]) -> bytes:
        # globex's notification batch: {"events": [...]}, each as it would go alone.
        return b'{"events":[' + b",".join(bodies) + b"]}"

    def sign_webhook(self, body: bytes, now_s: float) -> dict[str, str]:
        stamp = str(int(now_s * 1000))
        digest = hmac.new(self.secrets["webhook_secret"].encode(), f"{stamp}\n".encode() + body,
                          "sha256").digest()
        return {"x-globex-webhook-timestamp": stamp,
                "x-globex-webhook-signature": f"hmac-sha256={base64.b64encode(digest).decode()}"}

    # --- settlement reports -------------------------------------------------------------------

    async def settlement_report(self, request: Request) -> Response:
        denied = self.authenticate(request, await request.body())
        if denied is not None:
            return denied
        try:
            on = Date.fromisoformat(request.query_params.get("date", "")).isoformat()
        except ValueError:
            return problem(400, "invalid_date", "date must be YYYY-MM-DD.")
        return Response(self.report(on), 200, media_type="application/x-ndjson")

    def report(self, date: str) -> bytes:
        """JSON lines: an ``ENTRY`` per transaction and per fee on its own (``FEE``), a
        ``PAYOUT_BATCH`` per currency (the day's net), and a ``TRAILER`` counting entries."""
        lines = []
        entries = self.report_entries(date)
        for entry in entries:
            kind = "FEE" if entry.kind == "fee" else entry.kind.upper()
            lines.append(_json({
                "recordType": "ENTRY", "settlementDate": entry.settlement_date,
                "entryType": kind, "operationId": entry.op_id,
                "paymentId": entry.authorization_id, "idempotencyKey": entry.idempotency_key,
                "merchantReference": entry.reference,
                "direction": "CREDIT" if kind == "CAPTURE" else "DEBIT",
                "gross": _money(entry.amount, entry.currency),
                "fee": _money(entry.fee, entry.currency),
            }))
        for batch in self.report_batches(entries, date):
            lines.append(_json({
                "recordType": "PAYOUT_BATCH", "settlementDate": date, "batchId": batch.batch_id,
                "direction": "CREDIT" if batch.net >= 0 else "DEBIT",
                "net": _money(abs(batch.net), batch.currency), "entryCount": batch.entries}))
        lines.append(_json({"recordType": "TRAILER", "settlementDate": date,
                            "entryCount": len(entries)}))
        return b"\n".join(lines) + b"\n"

    def report_file_name(self, date: str) -> str:
        return f"globex-settlement-{date}.jsonl"


def _event_type(op: Op) -> str | None:
    if op.state == "pending":
        return None  # announced when it completes
    if op.operation is Operation.AUTHORIZE:
        if op.state == "declined":
            return "PAYMENT.REFUSED"
        return "PAYMENT.COMPLETED" if op.captured_at_authorization else "PAYMENT.AUTHORIZED"
    if op.operation is Operation.PAYOUT:
        return "PAYOUT.COMPLETED" if op.state == "settled" else "PAYOUT.FAILED"
    return f"{TYPE_WORDS[op.operation]}.COMPLETED"


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("globex", GlobexSim, argv)


if __name__ == "__main__":
    sys.exit(main())
