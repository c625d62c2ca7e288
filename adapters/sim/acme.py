"""The simulated ``acme`` provider: API-key auth, integer amounts, synchronous settlement.

Run it with ``python -m adapters.sim.acme --port 0 --secrets-file PATH``. Its wire format
(see docs/providers.md for the whole of it):

- Auth: ``X-Api-Key: <api_key>``; ``Idempotency-Key`` on every operation (required).
- Amounts are integers in minor units; statuses are ``AUTHORIZED``, ``CAPTURED``,
  ``SETTLED``, ``VOIDED``, ``DECLINED`` (authorizations), ``SETTLED`` (captures, refunds),
  ``PAID`` / ``FAILED`` (payouts). Captures, refunds and payouts settle at once.
- Errors are ``{"error": {"type": ..., "code": ...}}``: 402 ``card_error`` / ``payout_error``
  for declines, 400/404 ``invalid_request_error``, 401 ``authentication_error``, 409/422
  ``idempotency_error``, 429 ``rate_limit_error`` with ``Retry-After``, 503 ``api_error``
  with ``Retry-After`` (answered before anything happens), 500 ``api_error`` (acme does not
  say whether anything happened).
- Webhooks carry ``Acme-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of "<t>." + body>``.
- The settlement report (``GET /v1/settlements/{date}``, with the API key) is CSV with
  decimal major units: transactions, fees on their own, and a payout batch per currency.
"""

from __future__ import annotations

import csv
import hmac
import io
import math
import secrets
import sys
from collections.abc import Callable, Sequence
from datetime import date as Date
from typing import Annotated, Any

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
)
from adapters.sim.server import OPS_MAX, Answer, SimProvider, run_main
from processor.types import AMOUNT_MAX

__all__ = ["CURRENCIES", "AcmeSim", "main"]

CURRENCIES = frozenset({"USD", "EUR", "GBP"})
FEES = FeeSchedule(capture_bps=290, capture_fixed=30, refund_fixed=0, payout_fixed=25)
ID_PREFIXES = {Operation.AUTHORIZE: "auth_", Operation.CAPTURE: "cap_",
               Operation.VOID: "vd_", Operation.REFUND: "re_", Operation.PAYOUT: "po_",
               Operation.INCREMENT: "inc_"}
REPORT_COLUMNS = ("settlement_date", "type", "id", "authorization_id", "idempotency_key",
                  "reference", "currency", "gross", "fee", "net")

Amount = Annotated[int, Meta(ge=1, le=AMOUNT_MAX)]
Currency = Annotated[str, Meta(pattern="^[A-Z]{3}$")]
Text = Annotated[str, Meta(max_length=255)]


class _Card(msgspec.Struct, forbid_unknown_fields=True):
    number: Annotated[str, Meta(max_length=32)]
    exp_month: Annotated[int, Meta(ge=1, le=12)]
    exp_year: Annotated[int, Meta(ge=2000, le=2199)]
    cvc: Annotated[str, Meta(pattern=r"^\d{3,4}$")]


class _BankAccount(msgspec.Struct, forbid_unknown_fields=True):
    account_number: Annotated[str, Meta(pattern=r"^\d{6,34}$")]
    routing_number: Annotated[str, Meta(pattern=r"^\d{9}$")]


class _TokenParams(msgspec.Struct, forbid_unknown_fields=True):
    card: _Card | None = None
    bank_account: _BankAccount | None = None


class _AuthorizeParams(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount
    currency: Currency
    payment_method: Text
    reference: Text = ""
    capture: bool = False


class _CaptureParams(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount
    currency: Currency
    reference: Text = ""
    final: bool = True  # false: the rest of the authorization stays capturable


class _IncrementParams(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount  # what to add to the authorization
    currency: Currency
    reference: Text = ""


class _VoidParams(msgspec.Struct, forbid_unknown_fields=True):
    reference: Text = ""


class _RefundParams(msgspec.Struct, forbid_unknown_fields=True):
    authorization: Text
    amount: Amount
    currency: Currency
    reference: Text = ""


class _PayoutParams(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount
    currency: Currency
    destination: Text
    reference: Text = ""


class _EvidenceParams(msgspec.Struct, forbid_unknown_fields=True):
    text: Annotated[str, Meta(min_length=1, max_length=20_000)]
    files: Annotated[list[Annotated[str, Meta(max_length=500)]], Meta(max_length=10)] = []


_DECLINES: dict[Refusal, tuple[str, str, str]] = {  # refusal -> (type, code, decline_code)
    Refusal.INSUFFICIENT_FUNDS: ("card_error", "card_declined", "insufficient_funds"),
    Refusal.CARD_EXPIRED: ("card_error", "expired_card", "expired_card"),
    Refusal.PROCESSING_ERROR: ("card_error", "processing_error", "processing_error"),
    Refusal.DO_NOT_HONOR: ("card_error", "card_declined", "do_not_honor"),
    Refusal.SUSPECTED_FRAUD: ("card_error", "card_declined", "fraudulent"),
    Refusal.ACCOUNT_CLOSED: ("payout_error", "account_closed", "account_closed"),
    Refusal.PAYOUT_RETURNED: ("payout_error", "account_closed", "account_closed"),
}
_RULES: dict[Refusal, tuple[int, str]] = {  # refusal -> (HTTP status, code)
    Refusal.INVALID_PAYMENT_METHOD: (400, "payment_method_invalid"),
    Refusal.INVALID_DESTINATION: (400, "destination_invalid"),
    Refusal.CURRENCY_NOT_SUPPORTED: (400, "currency_not_supported"),
    Refusal.CURRENCY_MISMATCH: (400, "currency_mismatch"),
    Refusal.AMOUNT_EXCEEDS_AUTHORIZED: (400, "amount_too_large"),
    Refusal.AMOUNT_EXCEEDS_CAPTURED: (400, "amount_too_large"),
    Refusal.ALREADY_VOIDED: (400, "authorization_voided"),
    Refusal.ALREADY_CAPTURED: (400, "authorization_captured"),
    Refusal.AUTHORIZATION_DECLINED: (400, "authorization_declined"),
    Refusal.NOT_FOUND: (404, "resource_missing"),
    Refusal.DISPUTE_NOT_OPEN: (400, "dispute_closed"),
}
_DISPUTE_STATES = {"needs_response": "NEEDS_RESPONSE", "under_review": "UNDER_REVIEW",
                   "won": "WON", "lost": "LOST"}
_DISPUTE_EVENTS = {"needs_response": "dispute.created", "under_review": "dispute.updated",
                   "won": "dispute.won", "lost": "dispute.lost"}


def _error(status: int, type_: str, code: str, headers: dict[str, str] | None = None,
           **extra: Any) -> Response:
    return Response(_error_body(type_, code, **extra), status, headers=headers,
                    media_type="application/json")


def _error_body(type_: str, code: str, **extra: Any) -> bytes:
    return msgspec.json.encode({"error": {"type": type_, "code": code, **extra}})


def _ok(payload: Any) -> Response:
    return Response(msgspec.json.encode(payload), 200, media_type="application/json")


class AcmeSim(SimProvider):
    name = "acme"
    dispute_prefix = "dp_"
    batch_prefix = "batch_"

    def make_book(self) -> Book:
        return Book(currencies=CURRENCIES, fees=FEES, id_prefixes=ID_PREFIXES,
                    clock_s=self.clock_s, ops_max=OPS_MAX)

    def routes(self) -> Sequence[BaseRoute]:
        return [
            Route("/v1/tokens", self.tokens, methods=["POST"]),
            Route("/v1/authorizations", self.api(self.authorize, mutating=True),
                  methods=["POST"]),
            Route("/v1/authorizations/{authorization_id}/capture",
                  self.api(self.capture, mutating=True), methods=["POST"]),
            Route("/v1/authorizations/{authorization_id}/void",
                  self.api(self.void, mutating=True), methods=["POST"]),
            Route("/v1/authorizations/{authorization_id}/increment",
                  self.api(self.increment, mutating=True), methods=["POST"]),
            Route("/v1/refunds", self.api(self.refund, mutating=True), methods=["POST"]),
            Route("/v1/payouts", self.api(self.payout, mutating=True), methods=["POST"]),
            Route("/v1/requests/{key:path}", self.api(self.request_status, mutating=False),
                  methods=["GET"]),
            Route("/v1/disputes/{dispute_id}/evidence",
                  self.api(self.dispute_evidence, mutating=True), methods=["POST"]),
            Route("/v1/settlements/{date}", self.settlement_report, methods=["GET"]),
        ]

    # --- the provider's answers to faults and misuse ----------------------------------------

    def authenticate(self, request: Request, body: bytes) -> Response | None:
        given = request.headers.get("x-api-key", "").encode()
        if hmac.compare_digest(given, self.secrets["api_key"].encode()):
            return None
        return _error(401, "authentication_error", "api_key_invalid")

    def unavailable(self, retry_after_s: float) -> Response:
        return _error(503, "api_error", "service_unavailable",
                      headers={"retry-after": str(math.ceil(retry_after_s))})

    def throttled(self, retry_after_s: float) -> Response:
        return _error(429, "rate_limit_error", "rate_limited",
                      headers={"retry-after": str(max(1, math.ceil(retry_after_s)))})

    def injected_error(self) -> Response:
        return _error(500, "api_error", "internal_error")

    def in_progress(self) -> Response:
        return _error(409, "idempotency_error", "request_in_progress",
                      headers={"retry-after": "1"})

    def key_reused(self) -> Response:
        return _error(422, "idempotency_error", "idempotency_key_reused")

    # --- tokens ("hosted fields") -------------------------------------------------------------

    async def tokens(self, request: Request) -> Response:
        """Exchange a card or bank account for a token; public, as hosted fields are."""
        try:
            params = msgspec.json.decode(await request.body(), type=_TokenParams)
        except msgspec.ValidationError as exc:
            return _error(400, "invalid_request_error", "parameter_invalid", param=_path(exc))
        except msgspec.DecodeError:
            return _error(400, "invalid_request_error", "body_invalid")
        self.counts.tokens += 1
        if params.card is not None and params.bank_account is None:
            number = params.card.number
            if not luhn_valid(number):
                return _error(402, "card_error", "incorrect_number")
            return _ok({"id": mint_card_token(number), "object": "token", "type": "card",
                        "card": {"last4": number[-4:], "brand": card_brand(number),
                                 "exp_month": params.card.exp_month,
                                 "exp_year": params.card.exp_year}})
        if params.bank_account is not None and params.card is None:
            account = params.bank_account.account_number
            return _ok({"id": mint_bank_token(account), "object": "token",
                        "type": "bank_account", "bank_account": {"last4": account[-4:]}})
        return _error(400, "invalid_request_error", "parameter_missing", param="card")

    # --- operations ---------------------------------------------------------------------------

    async def authorize(self, request: Request, body: bytes) -> Response:
        return await self._operate(request, body, Operation.AUTHORIZE, _AuthorizeParams,
                                   self._authorize)

    async def capture(self, request: Request, body: bytes) -> Response:
        return await self._operate(request, body, Operation.CAPTURE, _CaptureParams,
                                   self._capture)

    async def void(self, request: Request, body: bytes) -> Response:
        return await self._operate(request, body or b"{}", Operation.VOID, _VoidParams,
                                   self._void)

    async def increment(self, request: Request, body: bytes) -> Response:
        return await self._operate(request, body, Operation.INCREMENT, _IncrementParams,
                                   self._increment)

    async def refund(self, request: Request, body: bytes) -> Response:
        return await self._operate(request, body, Operation.REFUND, _RefundParams,
                                   self._refund)

    async def payout(self, request: Request, body: bytes) -> Response:
        return await self._operate(request, body, Operation.PAYOUT, _PayoutParams,
                                   self._payout)

    async def _operate(self, request: Request, body: bytes, operation: Operation,
                       params_type: type[Any],
                       run: Callable[[str, Any, str], Op]) -> Response:
        key = self.request_key(request, "idempotency-key")
        if key is None:
            return _error(400, "invalid_request_error", "idempotency_key_missing")
        try:
            params = msgspec.json.decode(body, type=params_type)
        except msgspec.ValidationError as exc:
            return _error(400, "invalid_request_error", "parameter_invalid", param=_path(exc))
        except msgspec.DecodeError:
            return _error(400, "invalid_request_error", "body_invalid")
        path_id = request.path_params.get("authorization_id", "")

        def work() -> Answer:
            try:
                op = run(key, params, path_id)
            except Refused as refused:
                status, code = _RULES[refused.refusal]
                return Answer(status, _error_body("invalid_request_error", code))
            self.recorded(op)
            if op.state == "declined":
                return Answer(402, self._decline_body(op), op.id)
            return Answer(200, msgspec.json.encode(self._render(op)), op.id)

        return await self.idempotent(request, key, operation, body, work)

    def _authorize(self, key: str, p: _AuthorizeParams, _: str) -> Op:
        return self.book.authorize(key=key, reference=p.reference, amount=p.amount,
                                   currency=p.currency, payment_method=p.payment_method,
                                   capture=p.capture, settle_now=True)

    def _capture(self, key: str, p: _CaptureParams, authorization_id: str) -> Op:
        return self.book.capture(key=key, reference=p.reference,
                                 authorization_id=authorization_id, amount=p.amount,
                                 currency=p.currency, settle_now=True, final=p.final)

    def _void(self, key: str, p: _VoidParams, authorization_id: str) -> Op:
        return self.book.void(key=key, reference=p.reference, authorization_id=authorization_id)

    def _increment(self, key: str, p: _IncrementParams, authorization_id: str) -> Op:
        return self.book.increment(key=key, reference=p.reference,
                                   authorization_id=authorization_id, amount=p.amount,
                                   currency=p.currency)

    def _refund(self, key: str, p: _RefundParams, _: str) -> Op:
        return self.book.refund(key=key, reference=p.reference,
                                authorization_id=p.authorization, amount=p.amount,
                                currency=p.currency, settle_now=True)

    def _payout(self, key: str, p: _PayoutParams, _: str) -> Op:
        return self.book.payout(key=key, reference=p.reference, amount=p.amount,
                                currency=p.currency, destination=p.destination,
                                settle_now=True)

    async def dispute_evidence(self, request: Request, body: bytes) -> Response:
        """Evidence against a dispute: it moves to UNDER_REVIEW (once; then
        ``dispute_closed``). Answered with the dispute, replayed for its key."""
        key = self.request_key(request, "idempotency-key")
        if key is None:
            return _error(400, "invalid_request_error", "idempotency_key_missing")
        try:
            params = msgspec.json.decode(body, type=_EvidenceParams)
        except msgspec.ValidationError as exc:
            return _error(400, "invalid_request_error", "parameter_invalid", param=_path(exc))
        except msgspec.DecodeError:
            return _error(400, "invalid_request_error", "body_invalid")
        dispute_id = request.path_params["dispute_id"]

        def work() -> Answer:
            try:
                dispute = self.book.submit_evidence(dispute_id, text=params.text,
                                                    files=tuple(params.files))
            except Refused as refused:
                status, code = _RULES[refused.refusal]
                return Answer(status, _error_body("invalid_request_error", code))
            return Answer(200, msgspec.json.encode(self._dispute(dispute)))

        return await self.idempotent(request, key, Operation.DISPUTE_EVIDENCE, body, work)

    async def request_status(self, request: Request, body: bytes) -> Response:
        """What became of the request made with this idempotency key."""
        self.counts.status_queries += 1
        key = request.path_params["key"]
        found = self.store.lookup(key)
        if found is None:
            return _error(404, "invalid_request_error", "resource_missing")
        if found == "in_progress":
            return self.in_progress()
        op = self.book.get(found.op_id) if found.op_id else None
        if op is None or op.state == "declined":
            status, response = found.status, msgspec.json.decode(found.body)
        else:
            status, response = 200, self._render(op)
        return _ok({"object": "request", "idempotency_key": key,
                    "operation": found.operation.value, "response_status": status,
                    "response": response})

    # --- rendering ----------------------------------------------------------------------------

    def _render(self, op: Op) -> dict[str, Any]:
        if op.operation in (Operation.AUTHORIZE, Operation.VOID, Operation.INCREMENT):
            auth = self.book.get(op.authorization_id) or op
            return self._authorization(auth)
        rendered: dict[str, Any] = {
            "id": op.id, "object": op.operation.value, "amount": op.amount,
            "currency": op.currency, "reference": op.reference, "created": int(op.created_at_s),
        }
        if op.operation is Operation.PAYOUT:
            rendered["status"] = {"settled": "PAID", "pending": "IN_TRANSIT"}.get(op.state,
                                                                                "FAILED")
            rendered["destination"] = {"last4": op.destination_last4}
            if op.refusal is not None:
                rendered["failure_code"] = _DECLINES[op.refusal][2]
        else:
            rendered["status"] = "SETTLED" if op.state == "settled" else "PENDING"
            rendered["authorization"] = op.authorization_id
        return rendered

    def _authorization(self, auth: Op) -> dict[str, Any]:
        if auth.state == "declined":
            status = "DECLINED"
        elif auth.voided:
            status = "VOIDED"
        elif auth.captured_at_authorization:
            status = "SETTLED"
        elif auth.captured > 0:
            status = "CAPTURED"
        else:
            status = "AUTHORIZED"
        rendered: dict[str, Any] = {
            "id": auth.id, "object": "authorization", "status": status, "amount": auth.amount,
            "amount_captured": auth.captured, "amount_refunded": auth.refunded,
            "amount_capturable": auth.capturable,
            "currency": auth.currency, "reference": auth.reference,
            "payment_method": {"last4": auth.card_last4}, "created": int(auth.created_at_s),
        }
        if auth.refusal is not None:
            rendered["decline_code"] = _DECLINES[auth.refusal][2]
        return rendered

    def _decline_body(self, op: Op) -> bytes:
        assert op.refusal is not None
        type_, code, decline_code = _DECLINES[op.refusal]
        subject = "payout" if op.operation is Operation.PAYOUT else "authorization"
        return _error_body(type_, code, decline_code=decline_code, **{subject: op.id})

    # --- webhooks -----------------------------------------------------------------------------

    def event(self, op: Op) -> tuple[str, bytes] | None:
        kind = _event_type(op)
        if kind is None:
            return None
        event_id = f"evt_{secrets.token_hex(12)}"
        body = msgspec.json.encode({
            "id": event_id, "object": "event", "type": kind, "created": int(self.clock_s()),
            "request": {"idempotency_key": op.idempotency_key},
            "data": {"object": self._render(op)},
        })
        return event_id, body

    def _dispute(self, dispute: Dispute) -> dict[str, Any]:
        return {"id": dispute.id, "object": "dispute", "status": _DISPUTE_STATES[dispute.state],
                "amount": dispute.amount, "fee": dispute.fee, "currency": dispute.currency,
                "authorization": dispute.authorization_id, "reason": dispute.reason,
                "evidence_due_by": int(dispute.evidence_due_by_s),
                "created": int(dispute.created_at_s)}

    def dispute_event(self, dispute: Dispute) -> tuple[str, bytes]:
        event_id = f"evt_{secrets.token_hex(12)}"
        body = msgspec.json.encode({
            "id": event_id, "object": "event", "type": _DISPUTE_EVENTS[dispute.state],
            "created": int(self.clock_s()), "data": {"object": self._dispute(dispute)},
        })
        return event_id, body

    def batch_webhook_body(self, bodies: list[bytes]) -> bytes:
        # A list object, as acme's API lists anything: {"object": "list", "data": [...]}.
        return b'{"object":"list","data":[' + b",".join(bodies) + b"]}"

    def sign_webhook(self, body: bytes, now_s: float) -> dict[str, str]:
        stamp = int(now_s)
        digest = hmac.new(self.secrets["webhook_secret"].encode(), f"{stamp}.".encode() + body,
                          "sha256").hexdigest()
        return {"acme-signature": f"t={stamp},v1={digest}"}

    # --- settlement reports -------------------------------------------------------------------

    async def settlement_report(self, request: Request) -> Response:
        denied = self.authenticate(request, b"")
        if denied is not None:
            return denied
        try:
            on = Date.fromisoformat(request.path_params["date"]).isoformat()
        except ValueError:
            return _error(400, "invalid_request_error", "date_invalid")
        return Response(self.report(on), 200, media_type="text/csv")

    def report(self, date: str) -> bytes:
        """CSV: a row per transaction (``capture``, ``refund``, ``payout``) and per fee on
        its own (``fee``), then a ``payout_batch`` row per currency: the day's net."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(REPORT_COLUMNS)
        entries = self.report_entries(date)
        for entry in entries:
            gross = entry.signed_gross
            writer.writerow([entry.settlement_date, entry.kind, entry.op_id,
                             entry.authorization_id, entry.idempotency_key, entry.reference,
                             entry.currency, minor_to_text(gross, entry.currency),
                             minor_to_text(entry.fee, entry.currency),
                             minor_to_text(gross - entry.fee, entry.currency)])
        for batch in self.report_batches(entries, date):
            writer.writerow([date, "payout_batch", batch.batch_id, "", "", str(batch.entries),
                             batch.currency, minor_to_text(batch.net, batch.currency),
                             minor_to_text(0, batch.currency),
                             minor_to_text(batch.net, batch.currency)])
        return out.getvalue().encode()

    def report_file_name(self, date: str) -> str:
        return f"acme-settlement-{date}.csv"


def _event_type(op: Op) -> str | None:
    if op.operation is Operation.AUTHORIZE:
        if op.state == "declined":
            return "authorization.declined"
        if op.captured_at_authorization:
            return "authorization.settled" if op.settled_at_s is not None else None
        return "authorization.approved"
    if op.operation is Operation.VOID:
        return "authorization.voided"
    if op.operation is Operation.INCREMENT:
        return "authorization.incremented"
    if op.operation is Operation.PAYOUT:
        return {"settled": "payout.paid", "declined": "payout.failed",
                "failed": "payout.failed"}.get(op.state)
    if op.state != "settled":
        return None
    return "capture.settled" if op.operation is Operation.CAPTURE else "refund.settled"


def _path(exc: msgspec.ValidationError) -> str:
    """Where a validation error is (``$.card.number``), never the value that was sent."""
    text = str(exc)
    return text.rsplit("at `", 1)[1].rstrip("`") if "at `" in text else ""


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("acme", AcmeSim, argv)


if __name__ == "__main__":
    sys.exit(main())
