"""The globex adapter's translation, without a network: signed requests, decimal money,
answers, webhooks and JSON-lines reports."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import (
    DeclineCode,
    Operation,
    Outcome,
    ProviderRequest,
    WebhookRejected,
)
from adapters.globex import GlobexAdapter

KEY_ID = "gxk_0123456789"
SIGNING_SECRET = "signing-secret-abcdefgh"
WEBHOOK_SECRET = "whsec_globex_abcdefgh"
TOKEN = "pm_4242_0123456789abcdef"
NOW = 1_790_000_000.0
ADAPTER = GlobexAdapter(key_id=KEY_ID, signing_secret=SIGNING_SECRET,
                        webhook_secret=WEBHOOK_SECRET)


def request(operation: Operation = Operation.AUTHORIZE, **fields: Any) -> ProviderRequest:
    defaults: dict[str, Any] = {"idempotency_key": "key-1", "amount": 1_050,
                                "currency": "EUR", "reference": "pay-1"}
    if operation is Operation.AUTHORIZE:
        defaults["payment_method"] = TOKEN
    elif operation is Operation.PAYOUT:
        defaults["destination"] = "ba_1234_abcdef01"
    else:
        defaults["provider_ref"] = "gx_pay_1"
    return ProviderRequest(operation=operation, **{**defaults, **fields})


def js(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def ok(kind: str, state: str, value: str = "10.50", currency: str = "EUR",
       **extra: Any) -> bytes:
    return js({kind: {"id": f"gx_{kind[:3]}_1", "state": state, "paymentId": "gx_pay_1",
                      "money": {"value": value, "currency": currency}, **extra},
               "result": {"outcome": {"success": True}}})


def refused(reason: str, kind: str | None = None, state: str = "REFUSED") -> bytes:
    payload: dict[str, Any] = {"result": {"outcome": {"success": False,
                                                      "reason": {"code": reason}}}}
    if kind is not None:
        payload[kind] = {"id": "gx_pay_1", "state": state, "paymentId": "gx_pay_1",
                         "money": {"value": "10.50", "currency": "EUR"}}
    return js(payload)


def problem(code: str, status: int, **extra: Any) -> bytes:
    return js({"problem": {"code": code, "status": status, "title": "t", **extra}})


# --- building requests ----------------------------------------------------------------------


def expected_signature(method: str, path: str, stamp: str, key: str, body: bytes) -> str:
    canonical = "\n".join([method, path, stamp, key, hashlib.sha256(body).hexdigest()])
    mac = hmac.new(SIGNING_SECRET.encode(), canonical.encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def test_authorize_call_is_signed_over_method_path_time_key_and_body() -> None:
    """The signature covers what globex documents, so the body cannot be altered."""
    call = ADAPTER.build(request(), NOW)
    assert (call.method, call.path) == ("POST", "/api/v2/payments")
    assert call.headers["x-globex-key-id"] == KEY_ID
    assert call.headers["x-globex-timestamp"] == str(int(NOW))
    assert call.headers["x-globex-idempotency-key"] == "key-1"
    assert call.headers["x-globex-signature"] == expected_signature(
        "POST", call.path, str(int(NOW)), "key-1", call.body)
    assert json.loads(call.body) == {
        "intent": "AUTHORIZE", "money": {"value": "10.50", "currency": "EUR"},
        "instrument": {"token": TOKEN}, "merchantReference": "pay-1"}
    assert SIGNING_SECRET not in json.dumps(call.headers) and SIGNING_SECRET not in repr(ADAPTER)


@pytest.mark.parametrize(("amount", "currency", "value"), [
    (1_050, "EUR", "10.50"), (5, "EUR", "0.05"), (1_000, "JPY", "1000"), (1, "KWD", "0.001"),
    (2**63 - 1, "USD", "92233720368547758.07"),
])
def test_money_is_written_exactly(amount: int, currency: str, value: str) -> None:
    """Minor units become globex's decimal text with the currency's exponent, exactly."""
    call = ADAPTER.build(request(amount=amount, currency=currency), NOW)
    assert json.loads(call.body)["money"] == {"value": value, "currency": currency}


@pytest.mark.parametrize(("operation", "path"), [
    (Operation.CAPTURE, "/api/v2/payments/gx_pay_1/captures"),
    (Operation.VOID, "/api/v2/payments/gx_pay_1/cancellations"),
    (Operation.REFUND, "/api/v2/payments/gx_pay_1/refunds"),
    (Operation.PAYOUT, "/api/v2/payouts"),
])
def test_each_operation_has_its_call(operation: Operation, path: str) -> None:
    """Each operation goes to its own endpoint, signed."""
    call = ADAPTER.build(request(operation), NOW)
    assert (call.method, call.path) == ("POST", path)
    assert call.headers["x-globex-signature"] == expected_signature(
        "POST", path, str(int(NOW)), "key-1", call.body)


@pytest.mark.parametrize("final", [True, False])
def test_a_capture_says_whether_it_is_final(final: bool) -> None:
    """A capture names the payment and carries finalCapture: false leaves the rest
    capturable by later captures."""
    call = ADAPTER.build(msgspec.structs.replace(request(Operation.CAPTURE), final=final), NOW)
    assert json.loads(call.body)["finalCapture"] is final


def test_status_and_report_calls_are_signed_gets() -> None:
    """The status query carries the key escaped in its query string, and is signed."""
    call = ADAPTER.build_status(request(idempotency_key="k/1&x=y"), NOW)
    assert call.path == "/api/v2/operations?idempotencyKey=k%2F1%26x%3Dy"
    assert call.method == "GET" and call.body == b""
    assert call.headers["x-globex-signature"] == expected_signature(
        "GET", call.path, str(int(NOW)), "", b"")
    report = ADAPTER.build_settlement("2026-11-25", NOW)
    assert report.path == "/reports/settlement?date=2026-11-25"


def test_a_request_missing_what_it_needs_is_a_caller_bug() -> None:
    """Building without the needed field, or in a currency without an exponent, raises."""
    with pytest.raises(ValueError, match="provider_ref"):
        ADAPTER.build(request(Operation.REFUND, provider_ref=""), NOW)
    with pytest.raises(ValueError, match="currency"):
        ADAPTER.build(request(currency="XYZ"), NOW)


# --- parsing answers -------------------------------------------------------------------------

R = Outcome.RETRYABLE
PARSE_CASES: list[tuple[str, Operation, int, dict[str, str], bytes, Outcome,
                        DeclineCode | None, float]] = [
    ("authorized", Operation.AUTHORIZE, 200, {}, ok("payment", "AUTHORIZED"), Outcome.APPROVED,
     None, 0),
    ("sale-pending", Operation.AUTHORIZE, 200, {}, ok("payment", "PENDING"), Outcome.PENDING,
     None, 0),
    ("refused-funds", Operation.AUTHORIZE, 200, {}, refused("INSUFFICIENT_FUNDS", "payment"),
     Outcome.DECLINED, DeclineCode.INSUFFICIENT_FUNDS, 0),
    ("refused-expired", Operation.AUTHORIZE, 200, {}, refused("EXPIRED_CARD", "payment"),
     Outcome.DECLINED, DeclineCode.CARD_EXPIRED, 0),
    ("refused-issuer", Operation.AUTHORIZE, 200, {}, refused("ISSUER_UNAVAILABLE", "payment"),
     Outcome.DECLINED, DeclineCode.OTHER, 0),
    ("refused-new-reason", Operation.AUTHORIZE, 200, {}, refused("SOMETHING_NEW"),
     Outcome.DECLINED, DeclineCode.OTHER, 0),
    ("success-no-object", Operation.AUTHORIZE, 200, {},
     js({"result": {"outcome": {"success": True}}}), Outcome.UNKNOWN, None, 0),
    ("inexact-money", Operation.AUTHORIZE, 200, {}, ok("payment", "AUTHORIZED", "10.505"),
     Outcome.UNKNOWN, None, 0),
    ("other-currency", Operation.AUTHORIZE, 200, {},
     ok("payment", "AUTHORIZED", "10.50", "USD"), Outcome.UNKNOWN, None, 0),
    ("odd-state", Operation.AUTHORIZE, 200, {}, ok("payment", "LIMBO"), Outcome.UNKNOWN, None, 0),
    ("no-result", Operation.AUTHORIZE, 200, {}, js({"payment": {"id": "x"}}), Outcome.UNKNOWN,
     None, 0),
    ("capture-pending", Operation.CAPTURE, 200, {}, ok("capture", "PENDING"), Outcome.PENDING,
     None, 0),
    ("capture-complete", Operation.CAPTURE, 200, {}, ok("capture", "COMPLETE"),
     Outcome.APPROVED, None, 0),
    ("capture-too-much", Operation.CAPTURE, 200, {}, refused("AMOUNT_EXCEEDS_CAPTURABLE"),
     Outcome.FAILED, DeclineCode.AMOUNT_EXCEEDS_AUTHORIZED, 0),
    ("cancelled", Operation.VOID, 200, {}, ok("cancellation", "COMPLETE"), Outcome.APPROVED,
     None, 0),
    ("already-cancelled", Operation.VOID, 200, {}, refused("PAYMENT_CANCELLED"), Outcome.FAILED,
     DeclineCode.ALREADY_VOIDED, 0),
    ("refund-complete", Operation.REFUND, 200, {}, ok("refund", "COMPLETE"), Outcome.APPROVED,
     None, 0),
    ("refund-too-much", Operation.REFUND, 200, {}, refused("AMOUNT_EXCEEDS_REFUNDABLE"),
     Outcome.FAILED, DeclineCode.AMOUNT_EXCEEDS_AUTHORIZED, 0),
    ("payout-pending", Operation.PAYOUT, 200, {}, ok("payout", "PENDING"), Outcome.PENDING,
     None, 0),
    ("payout-closed", Operation.PAYOUT, 200, {},
     refused("BENEFICIARY_ACCOUNT_CLOSED", "payout"), Outcome.DECLINED,
     DeclineCode.INVALID_DESTINATION, 0),
    ("currency", Operation.AUTHORIZE, 200, {}, refused("CURRENCY_UNSUPPORTED"), Outcome.FAILED,
     DeclineCode.CURRENCY_NOT_SUPPORTED, 0),
    ("400-money", Operation.AUTHORIZE, 400, {}, problem("invalid_money", 400), Outcome.FAILED,
     DeclineCode.INVALID_REQUEST, 0),
    ("401", Operation.AUTHORIZE, 401, {}, problem("signature_invalid", 401), Outcome.FAILED,
     DeclineCode.AUTHENTICATION_FAILED, 0),
    ("404-payment", Operation.CAPTURE, 404, {}, problem("payment_not_found", 404),
     Outcome.FAILED, DeclineCode.NOT_FOUND, 0),
    ("409-in-progress", Operation.AUTHORIZE, 409, {"globex-retry-after-ms": "1000"},
     problem("request_in_progress", 409), R, None, 1.0),
    ("409-mismatch", Operation.AUTHORIZE, 409, {}, problem("idempotency_key_mismatch", 409),
     Outcome.FAILED, DeclineCode.INVALID_REQUEST, 0),
    ("503-ms", Operation.AUTHORIZE, 503, {"Globex-Retry-After-Ms": "250"},
     problem("throttled", 503), R, None, 0.25),
    ("503-retry-after", Operation.AUTHORIZE, 503, {"retry-after": "3"}, b"", R, None, 3.0),
    ("503-bare", Operation.AUTHORIZE, 503, {}, b"", R, None, 1.0),
    ("429", Operation.AUTHORIZE, 429, {}, b"", R, None, 1.0),
    ("500-not-committed", Operation.CAPTURE, 500, {},
     problem("internal_error", 500, committed=False), R, None, 0),
    ("500-committed", Operation.CAPTURE, 500, {}, problem("internal_error", 500, committed=True),
     Outcome.UNKNOWN, None, 0),
    ("500-silent", Operation.CAPTURE, 500, {}, problem("internal_error", 500), Outcome.UNKNOWN,
     None, 0),
    ("502-html", Operation.CAPTURE, 502, {}, b"<html>", Outcome.UNKNOWN, None, 0),
    ("200-garbage", Operation.CAPTURE, 200, {}, b"{", Outcome.UNKNOWN, None, 0),
    ("400-not-problem", Operation.CAPTURE, 400, {}, b"bad", Outcome.UNKNOWN, None, 0),
    ("301", Operation.CAPTURE, 301, {}, b"", Outcome.UNKNOWN, None, 0),
]


@pytest.mark.parametrize(("operation", "status", "headers", "body", "outcome", "code",
                          "retry_after_s"),
                         [case[1:] for case in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_parse_maps_every_answer(operation: Operation, status: int, headers: dict[str, str],
                                 body: bytes, outcome: Outcome, code: DeclineCode | None,
                                 retry_after_s: float) -> None:
    """Each kind of globex answer maps to its outcome, decline code and wait."""
    reply = ADAPTER.parse(request(operation), status, headers, body)
    assert (reply.outcome, reply.decline_code, reply.retry_after_s) == (
        outcome, code, retry_after_s)
    assert reply.http_status == status
    assert TOKEN not in reply.message and SIGNING_SECRET not in reply.message


def test_replies_carry_refs_and_exact_amounts() -> None:
    """Payment-level operations name the payment; money converts exactly (JPY has no
    decimals)."""
    capture = ADAPTER.parse(request(Operation.CAPTURE), 200, {}, ok("capture", "PENDING"))
    assert (capture.provider_ref, capture.amount) == ("gx_pay_1", 1_050)
    refund = ADAPTER.parse(request(Operation.REFUND), 200, {}, ok("refund", "COMPLETE"))
    assert refund.provider_ref == "gx_ref_1"
    yen = ADAPTER.parse(request(currency="JPY", amount=1_000), 200, {},
                        ok("payment", "AUTHORIZED", "1000", "JPY"))
    assert (yen.outcome, yen.amount) == (Outcome.APPROVED, 1_000)
    fraction_of_yen = ADAPTER.parse(request(currency="JPY"), 200, {},
                                    ok("payment", "AUTHORIZED", "10.5", "JPY"))
    assert fraction_of_yen.outcome is Outcome.UNKNOWN


def status_body(type_: str, state: str, success: bool = True, reason: str = "",
                with_id: bool = True) -> bytes:
    outcome: dict[str, Any] = {"success": success}
    if reason:
        outcome["reason"] = {"code": reason}
    operation: dict[str, Any] = {"type": type_, "state": state, "paymentId": "gx_pay_1",
                                 "money": {"value": "10.50", "currency": "EUR"}}
    if with_id:
        operation["id"] = "gx_x_1"
    return js({"operation": operation, "result": {"outcome": outcome}})


STATUS_CASES: list[tuple[str, Operation, int, dict[str, str], bytes, Outcome,
                         DeclineCode | None]] = [
    ("authorized", Operation.AUTHORIZE, 200, {}, status_body("PAYMENT", "AUTHORIZED"),
     Outcome.APPROVED, None),
    ("captured-later", Operation.AUTHORIZE, 200, {}, status_body("PAYMENT", "CAPTURED"),
     Outcome.APPROVED, None),
    ("capture-complete", Operation.CAPTURE, 200, {}, status_body("CAPTURE", "COMPLETE"),
     Outcome.APPROVED, None),
    ("capture-pending", Operation.CAPTURE, 200, {}, status_body("CAPTURE", "PENDING"),
     Outcome.PENDING, None),
    ("payout-returned", Operation.PAYOUT, 200, {},
     status_body("PAYOUT", "FAILED", False, "PAYOUT_RETURNED"), Outcome.DECLINED,
     DeclineCode.INVALID_DESTINATION),
    ("rejected-by-rule", Operation.CAPTURE, 200, {},
     status_body("CAPTURE", "REJECTED", False, "AMOUNT_EXCEEDS_CAPTURABLE", with_id=False),
     Outcome.FAILED, DeclineCode.AMOUNT_EXCEEDS_AUTHORIZED),
    ("other-type", Operation.AUTHORIZE, 200, {}, status_body("REFUND", "COMPLETE"),
     Outcome.UNKNOWN, None),
    ("never-received", Operation.AUTHORIZE, 404, {}, problem("operation_not_found", 404),
     Outcome.DECLINED, DeclineCode.NOT_FOUND),
    ("404-other", Operation.AUTHORIZE, 404, {}, b"<html>", Outcome.UNKNOWN, None),
    ("in-progress", Operation.AUTHORIZE, 409, {}, problem("request_in_progress", 409),
     Outcome.UNKNOWN, None),
    ("unavailable", Operation.AUTHORIZE, 503, {}, problem("service_unavailable", 503),
     Outcome.UNKNOWN, None),
    ("credentials", Operation.AUTHORIZE, 401, {}, problem("stale_timestamp", 401),
     Outcome.UNKNOWN, DeclineCode.AUTHENTICATION_FAILED),
]


@pytest.mark.parametrize(("operation", "status", "headers", "body", "outcome", "code"),
                         [case[1:] for case in STATUS_CASES],
                         ids=[c[0] for c in STATUS_CASES])
def test_parse_status_maps_every_answer(operation: Operation, status: int,
                                        headers: dict[str, str], body: bytes,
                                        outcome: Outcome, code: DeclineCode | None) -> None:
    """A status query reports the operation's current state; a failed query stays UNKNOWN."""
    reply = ADAPTER.parse_status(request(operation), status, headers, body)
    assert (reply.outcome, reply.decline_code) == (outcome, code)


@settings(max_examples=300, deadline=None)
@given(status=st.integers(min_value=0, max_value=999), body=st.binary(max_size=300),
       headers=st.dictionaries(st.sampled_from(["globex-retry-after-ms", "retry-after", "x"]),
                               st.text(max_size=30), max_size=2),
       operation=st.sampled_from(list(Operation)))
def test_parse_never_raises(status: int, body: bytes, headers: dict[str, str],
                            operation: Operation) -> None:
    """Whatever comes back, parse and parse_status answer with an outcome."""
    for parse in (ADAPTER.parse, ADAPTER.parse_status):
        assert parse(request(operation), status, headers, body).outcome in Outcome


@settings(max_examples=200, deadline=None)
@given(payload=st.dictionaries(
    st.sampled_from(["payment", "capture", "refund", "payout", "operation", "result",
                     "problem"]),
    st.one_of(st.none(), st.integers(), st.text(max_size=8), st.dictionaries(
        st.sampled_from(["id", "state", "money", "outcome", "success", "code", "committed",
                         "type", "paymentId"]),
        st.one_of(st.none(), st.booleans(), st.text(max_size=8),
                  st.fixed_dictionaries({"value": st.text(max_size=8),
                                         "currency": st.sampled_from(["EUR", "JPY", "??"])})),
        max_size=4)), max_size=4),
    status=st.sampled_from([200, 400, 401, 404, 409, 500, 503]))
def test_parse_never_raises_on_odd_json(payload: dict[str, Any], status: int) -> None:
    """JSON of globex's shape with the wrong types is UNKNOWN or mapped, never a crash."""
    body = msgspec.json.encode(payload)
    for operation in Operation:
        assert ADAPTER.parse(request(operation), status, {}, body).outcome in Outcome
        assert ADAPTER.parse_status(request(operation), status, {}, body).outcome in Outcome


# --- webhooks --------------------------------------------------------------------------------


def event_body(event_type: str = "CAPTURE.COMPLETED", **subject: Any) -> bytes:
    fields = {"type": "CAPTURE", "id": "gx_cap_1", "paymentId": "gx_pay_1",
              "idempotencyKey": "key-1", "state": "COMPLETE",
              "money": {"value": "4.00", "currency": "EUR"}, **subject}
    return js({"eventId": "gx_evt_1", "eventType": event_type,
               "occurredAt": "2026-09-21T12:00:00.250Z", "subject": fields})


def sign(body: bytes, now_s: float, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    stamp = str(int(now_s * 1000))
    mac = hmac.new(secret.encode(), f"{stamp}\n".encode() + body, hashlib.sha256).digest()
    return {"x-globex-webhook-timestamp": stamp,
            "x-globex-webhook-signature": f"hmac-sha256={base64.b64encode(mac).decode()}"}


def test_webhook_verified_and_translated() -> None:
    """A correctly signed, fresh event becomes a WebhookEvent in the processor's words."""
    body = event_body()
    event = ADAPTER.verify_webhook(sign(body, NOW), body, NOW + 1)
    assert (event.event_id, event.operation, event.outcome, event.idempotency_key,
            event.provider_ref, event.amount) == (
        "gx_evt_1", Operation.CAPTURE, Outcome.APPROVED, "key-1", "gx_pay_1", 400)
    assert event.occurred_at_s == pytest.approx(1_789_992_000.25)


def test_failed_payout_webhook_carries_the_reason() -> None:
    """A payout returned by the bank is a declined payout with the normalised code."""
    body = event_body("PAYOUT.FAILED", type="PAYOUT", id="gx_po_1", state="FAILED",
                      reason={"code": "PAYOUT_RETURNED"})
    headers = {k.upper(): v for k, v in sign(body, NOW).items()}
    event = ADAPTER.verify_webhook(headers, body, NOW)
    assert (event.operation, event.outcome, event.provider_ref, event.decline_code,
            event.amount) == (Operation.PAYOUT, Outcome.DECLINED, "gx_po_1",
                              DeclineCode.INVALID_DESTINATION, 0)


@pytest.mark.parametrize(("case", "code"), [
    ("tampered-body", "webhook_signature_invalid"),
    ("wrong-secret", "webhook_signature_invalid"),
    ("old-timestamp", "webhook_timestamp_out_of_tolerance"),
    ("no-headers", "webhook_malformed"),
    ("not-base64", "webhook_malformed"),
    ("not-json", "webhook_malformed"),
    ("unknown-type", "webhook_malformed"),
    ("type-mismatch", "webhook_malformed"),
    ("inexact-money", "webhook_malformed"),
    ("naive-time", "webhook_malformed"),
])
def test_webhook_rejections(case: str, code: str) -> None:
    """Tampering, a wrong secret, a replayed old event and nonsense are all refused."""
    body = event_body()
    headers = sign(body, NOW)
    now = NOW
    if case == "tampered-body":
        body = body.replace(b"4.00", b"9.00")
    elif case == "wrong-secret":
        headers = sign(body, NOW, secret="someone-else")
    elif case == "old-timestamp":
        now = NOW + 300.5
    elif case == "no-headers":
        headers = {}
    elif case == "not-base64":
        headers["x-globex-webhook-signature"] = "hmac-sha256=***"
    else:
        body = {"not-json": b"{{",
                "unknown-type": event_body("CHARGEBACK.OPENED"),
                "type-mismatch": event_body("REFUND.COMPLETED"),
                "inexact-money": event_body(money={"value": "4.001", "currency": "EUR"}),
                "naive-time": event_body().replace(b".250Z", b".250")}[case]
        headers = sign(body, NOW)
    with pytest.raises(WebhookRejected) as caught:
        ADAPTER.verify_webhook(headers, body, now)
    assert caught.value.code == code


# --- settlement reports ----------------------------------------------------------------------


def entry(entry_type: str = "CAPTURE", direction: str = "CREDIT", gross: str = "10.00",
          fee: str = "0.39", currency: str = "EUR", **extra: Any) -> str:
    return json.dumps({"recordType": "ENTRY", "settlementDate": "2026-11-25",
                       "entryType": entry_type, "operationId": f"gx_{entry_type.lower()}_1",
                       "paymentId": "gx_pay_1", "idempotencyKey": f"k-{entry_type}",
                       "merchantReference": "p", "direction": direction,
                       "gross": {"value": gross, "currency": currency},
                       "fee": {"value": fee, "currency": currency}, **extra})


def trailer(count: int) -> str:
    return json.dumps({"recordType": "TRAILER", "settlementDate": "2026-11-25",
                       "entryCount": count})


def test_settlement_report_parses_exactly() -> None:
    """ENTRY records become lines in minor units; the trailer's count checks the whole."""
    report = "\n".join([entry(), entry("REFUND", "DEBIT", "2.50", "0.15"),
                        entry("PAYOUT", "DEBIT", "500", "50", "JPY"), "", trailer(3)]) + "\n"
    lines = ADAPTER.parse_settlement(report.encode())
    assert [(x.operation, x.provider_ref, x.idempotency_key, x.amount, x.fee, x.currency)
            for x in lines] == [
        (Operation.CAPTURE, "gx_pay_1", "k-CAPTURE", 1_000, 39, "EUR"),
        (Operation.REFUND, "gx_refund_1", "k-REFUND", 250, 15, "EUR"),
        (Operation.PAYOUT, "gx_payout_1", "k-PAYOUT", 500, 50, "JPY")]
    assert ADAPTER.parse_settlement(trailer(0).encode()) == []


@pytest.mark.parametrize(("records", "match"), [
    ([entry(gross="10.001"), trailer(1)], "decimals"),
    ([entry(gross="10.5", currency="JPY", fee="0"), trailer(1)], "decimals"),
    ([entry()], "trailer"),
    ([entry(), trailer(2)], "trailer"),
    ([entry(), trailer(1), entry()], "after the trailer"),
    ([entry(direction="DEBIT"), trailer(1)], "direction"),
    ([entry("CHARGEBACK"), trailer(1)], "entry type"),
    (["{not json", trailer(1)], "unreadable"),
    ([entry(gross="0.00"), trailer(1)], "zero"),
])
def test_settlement_report_rejects_what_does_not_add_up(records: list[str], match: str) -> None:
    """Inexact amounts, a truncated or padded report and unknown entries are refused."""
    with pytest.raises(ValueError, match=match):
        ADAPTER.parse_settlement("\n".join(records).encode())
