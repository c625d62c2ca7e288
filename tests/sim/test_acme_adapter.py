"""The acme adapter's translation, without a network: requests, answers, webhooks, reports."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.acme import AcmeAdapter
from adapters.base import (
    DeclineCode,
    Operation,
    Outcome,
    ProviderRequest,
    WebhookRejected,
)

API_KEY = "acme_sk_test_0123456789"
WEBHOOK_SECRET = "whsec_test_abcdefghij"
TOKEN = "pm_4242_0123456789abcdef"
NOW = 1_790_000_000.0
ADAPTER = AcmeAdapter(api_key=API_KEY, webhook_secret=WEBHOOK_SECRET)


def request(operation: Operation = Operation.AUTHORIZE, **fields: Any) -> ProviderRequest:
    defaults: dict[str, Any] = {"idempotency_key": "key-1", "amount": 1_000,
                                "currency": "USD", "reference": "pay-1"}
    if operation is Operation.AUTHORIZE:
        defaults["payment_method"] = TOKEN
    elif operation is Operation.PAYOUT:
        defaults["destination"] = "ba_1234_abcdef01"
    else:
        defaults["provider_ref"] = "auth_1"
    return ProviderRequest(operation=operation, **{**defaults, **fields})


def js(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def auth(status: str, **extra: Any) -> bytes:
    return js({"id": "auth_1", "object": "authorization", "status": status, "amount": 1_000,
               "currency": "USD", **extra})


def obj(kind: str, status: str, **extra: Any) -> bytes:
    return js({"id": f"{kind[:3]}_1", "object": kind, "status": status, "amount": 400,
               "currency": "USD", "authorization": "auth_1", **extra})


def err(type_: str, code: str, **extra: Any) -> bytes:
    return js({"error": {"type": type_, "code": code, **extra}})


# --- building requests ----------------------------------------------------------------------


def test_authorize_call_carries_key_idempotency_and_integer_amount() -> None:
    """An authorization is a keyed POST with the amount in minor units, never capturing."""
    call = ADAPTER.build(request(), NOW)
    assert (call.method, call.path) == ("POST", "/v1/authorizations")
    assert call.headers["x-api-key"] == API_KEY
    assert call.headers["idempotency-key"] == "key-1"
    assert json.loads(call.body) == {"amount": 1_000, "currency": "USD",
                                     "payment_method": TOKEN, "reference": "pay-1",
                                     "capture": False}


@pytest.mark.parametrize(("operation", "path", "body_keys"), [
    (Operation.CAPTURE, "/v1/authorizations/auth_1/capture",
     {"amount", "currency", "reference", "final"}),
    (Operation.VOID, "/v1/authorizations/auth_1/void", {"reference"}),
    (Operation.REFUND, "/v1/refunds", {"authorization", "amount", "currency", "reference"}),
    (Operation.PAYOUT, "/v1/payouts", {"destination", "amount", "currency", "reference"}),
])
def test_each_operation_has_its_call(operation: Operation, path: str,
                                     body_keys: set[str]) -> None:
    """Each operation goes to its own endpoint with the fields acme wants."""
    call = ADAPTER.build(request(operation), NOW)
    assert (call.method, call.path) == ("POST", path)
    assert set(json.loads(call.body)) == body_keys


@pytest.mark.parametrize("final", [True, False])
def test_a_capture_says_whether_it_is_final(final: bool) -> None:
    """A capture carries acme's final flag: false leaves the rest capturable."""
    call = ADAPTER.build(msgspec.structs.replace(request(Operation.CAPTURE), final=final), NOW)
    assert json.loads(call.body)["final"] is final


def test_references_and_keys_are_escaped_in_paths() -> None:
    """A reference or key with path characters cannot change the path."""
    call = ADAPTER.build(request(Operation.CAPTURE, provider_ref="a/../b"), NOW)
    assert call.path == "/v1/authorizations/a%2F..%2Fb/capture"
    status = ADAPTER.build_status(request(idempotency_key="k/1?x"), NOW)
    assert status.path == "/v1/requests/k%2F1%3Fx" and status.method == "GET"


@pytest.mark.parametrize(("operation", "missing"), [
    (Operation.AUTHORIZE, "payment_method"), (Operation.CAPTURE, "provider_ref"),
    (Operation.VOID, "provider_ref"), (Operation.REFUND, "provider_ref"),
    (Operation.PAYOUT, "destination"),
])
def test_a_request_missing_what_it_needs_is_a_caller_bug(operation: Operation,
                                                         missing: str) -> None:
    """Building a call without the field its operation needs raises, naming the field."""
    with pytest.raises(ValueError, match=missing):
        ADAPTER.build(request(operation, **{missing: ""}), NOW)


def test_repr_and_settlement_call_hide_the_key() -> None:
    """The key never shows in the adapter's repr; the report call is keyed."""
    assert API_KEY not in repr(ADAPTER)
    call = ADAPTER.build_settlement("2026-11-25", NOW)
    assert call.path == "/v1/settlements/2026-11-25" and call.headers["x-api-key"] == API_KEY


def test_from_secrets_file(tmp_path: Any) -> None:
    """The adapter reads its key from the simulator's secrets file and refuses another's."""
    path = tmp_path / "acme.json"
    path.write_text(json.dumps({"provider": "acme", "api_key": API_KEY,
                                "webhook_secret": WEBHOOK_SECRET, "admin_token": "x" * 16}))
    assert AcmeAdapter.from_secrets_file(path, timeout_s=1.5).timeout_s == 1.5
    assert AcmeAdapter.from_secrets_file(path).timeout_s == 2.0
    path.write_text(json.dumps({"provider": "globex"}))
    with pytest.raises(ValueError, match="not an acme"):
        AcmeAdapter.from_secrets_file(path)


# --- parsing answers -------------------------------------------------------------------------

R = Outcome.RETRYABLE
PARSE_CASES: list[tuple[str, Operation, int, dict[str, str], bytes, Outcome,
                        DeclineCode | None, float]] = [
    # id, operation, status, headers, body, outcome, decline code, retry_after_s
    ("authorized", Operation.AUTHORIZE, 200, {}, auth("AUTHORIZED"), Outcome.APPROVED, None, 0),
    ("declined-200", Operation.AUTHORIZE, 200, {},
     auth("DECLINED", decline_code="insufficient_funds"), Outcome.DECLINED,
     DeclineCode.INSUFFICIENT_FUNDS, 0),
    ("wrong-kind", Operation.AUTHORIZE, 200, {}, obj("capture", "SETTLED"), Outcome.UNKNOWN,
     None, 0),
    ("odd-status", Operation.AUTHORIZE, 200, {}, auth("WEIRD"), Outcome.UNKNOWN, None, 0),
    ("not-json", Operation.AUTHORIZE, 200, {}, b"<html>", Outcome.UNKNOWN, None, 0),
    ("amount-text", Operation.AUTHORIZE, 200, {}, auth("AUTHORIZED", amount="10"),
     Outcome.UNKNOWN, None, 0),
    ("amount-negative", Operation.AUTHORIZE, 200, {}, auth("AUTHORIZED", amount=-1),
     Outcome.UNKNOWN, None, 0),
    ("no-id", Operation.AUTHORIZE, 200, {}, auth("AUTHORIZED", id=""), Outcome.UNKNOWN,
     None, 0),
    ("capture-settled", Operation.CAPTURE, 200, {}, obj("capture", "SETTLED"),
     Outcome.APPROVED, None, 0),
    ("capture-pending", Operation.CAPTURE, 200, {}, obj("capture", "PENDING"),
     Outcome.PENDING, None, 0),
    ("voided", Operation.VOID, 200, {}, auth("VOIDED"), Outcome.APPROVED, None, 0),
    ("void-not-voided", Operation.VOID, 200, {}, auth("AUTHORIZED"), Outcome.UNKNOWN, None, 0),
    ("refund-settled", Operation.REFUND, 200, {}, obj("refund", "SETTLED"), Outcome.APPROVED,
     None, 0),
    ("payout-paid", Operation.PAYOUT, 200, {}, obj("payout", "PAID"), Outcome.APPROVED, None, 0),
    ("payout-transit", Operation.PAYOUT, 200, {}, obj("payout", "IN_TRANSIT"), Outcome.PENDING,
     None, 0),
    ("payout-failed", Operation.PAYOUT, 200, {},
     obj("payout", "FAILED", failure_code="account_closed"), Outcome.DECLINED,
     DeclineCode.INVALID_DESTINATION, 0),
    ("402-funds", Operation.AUTHORIZE, 402, {},
     err("card_error", "card_declined", decline_code="insufficient_funds"), Outcome.DECLINED,
     DeclineCode.INSUFFICIENT_FUNDS, 0),
    ("402-expired", Operation.AUTHORIZE, 402, {},
     err("card_error", "expired_card", decline_code="expired_card"), Outcome.DECLINED,
     DeclineCode.CARD_EXPIRED, 0),
    ("402-processing", Operation.AUTHORIZE, 402, {},
     err("card_error", "processing_error", decline_code="processing_error"),
     Outcome.DECLINED, DeclineCode.OTHER, 0),
    ("402-fraud", Operation.AUTHORIZE, 402, {},
     err("card_error", "card_declined", decline_code="fraudulent"), Outcome.DECLINED,
     DeclineCode.SUSPECTED_FRAUD, 0),
    ("402-new-code", Operation.AUTHORIZE, 402, {}, err("card_error", "brand_new_reason"),
     Outcome.DECLINED, DeclineCode.OTHER, 0),
    ("402-payout", Operation.PAYOUT, 402, {}, err("payout_error", "account_closed"),
     Outcome.DECLINED, DeclineCode.INVALID_DESTINATION, 0),
    ("400-too-large", Operation.CAPTURE, 400, {},
     err("invalid_request_error", "amount_too_large"), Outcome.FAILED,
     DeclineCode.AMOUNT_EXCEEDS_AUTHORIZED, 0),
    ("400-voided", Operation.CAPTURE, 400, {},
     err("invalid_request_error", "authorization_voided"), Outcome.FAILED,
     DeclineCode.ALREADY_VOIDED, 0),
    ("400-currency", Operation.AUTHORIZE, 400, {},
     err("invalid_request_error", "currency_not_supported"), Outcome.FAILED,
     DeclineCode.CURRENCY_NOT_SUPPORTED, 0),
    ("400-parameter", Operation.AUTHORIZE, 400, {},
     err("invalid_request_error", "parameter_invalid"), Outcome.FAILED,
     DeclineCode.INVALID_REQUEST, 0),
    ("404-missing", Operation.CAPTURE, 404, {},
     err("invalid_request_error", "resource_missing"), Outcome.FAILED, DeclineCode.NOT_FOUND,
     0),
    ("401", Operation.AUTHORIZE, 401, {}, err("authentication_error", "api_key_invalid"),
     Outcome.FAILED, DeclineCode.AUTHENTICATION_FAILED, 0),
    ("403-garbage", Operation.AUTHORIZE, 403, {}, b"nope", Outcome.FAILED,
     DeclineCode.AUTHENTICATION_FAILED, 0),
    ("409-in-progress", Operation.AUTHORIZE, 409, {"retry-after": "1"},
     err("idempotency_error", "request_in_progress"), R, None, 1.0),
    ("422-reused", Operation.AUTHORIZE, 422, {},
     err("idempotency_error", "idempotency_key_reused"), Outcome.FAILED,
     DeclineCode.INVALID_REQUEST, 0),
    ("429-wait", Operation.AUTHORIZE, 429, {"Retry-After": "7"},
     err("rate_limit_error", "rate_limited"), R, None, 7.0),
    ("429-no-header", Operation.AUTHORIZE, 429, {}, b"", R, None, 1.0),
    ("429-http-date", Operation.AUTHORIZE, 429,
     {"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"}, b"", R, None, 1.0),
    ("503", Operation.CAPTURE, 503, {"retry-after": "2"},
     err("api_error", "service_unavailable"), R, None, 2.0),
    ("500", Operation.CAPTURE, 500, {}, err("api_error", "internal_error"), Outcome.UNKNOWN,
     None, 0),
    ("502-html", Operation.AUTHORIZE, 502, {}, b"<html>bad gateway</html>", Outcome.UNKNOWN,
     None, 0),
    ("504", Operation.REFUND, 504, {}, b"", Outcome.UNKNOWN, None, 0),
    ("400-not-acme", Operation.AUTHORIZE, 400, {}, b"<html>", Outcome.UNKNOWN, None, 0),
    ("400-no-type", Operation.AUTHORIZE, 400, {}, js({"error": {"code": "x"}}),
     Outcome.UNKNOWN, None, 0),
    ("302", Operation.AUTHORIZE, 302, {"location": "/elsewhere"}, b"", Outcome.UNKNOWN, None, 0),
]


@pytest.mark.parametrize(("operation", "status", "headers", "body", "outcome", "code",
                          "retry_after_s"),
                         [case[1:] for case in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_parse_maps_every_answer(operation: Operation, status: int, headers: dict[str, str],
                                 body: bytes, outcome: Outcome, code: DeclineCode | None,
                                 retry_after_s: float) -> None:
    """Each kind of acme answer maps to its outcome, decline code and wait."""
    reply = ADAPTER.parse(request(operation), status, headers, body)
    assert (reply.outcome, reply.decline_code, reply.retry_after_s) == (
        outcome, code, retry_after_s)
    assert reply.http_status == status
    assert TOKEN not in reply.message and API_KEY not in reply.message


def test_approved_replies_name_the_authorization_and_amount() -> None:
    """Captures answer with the authorization's id; refunds and payouts with their own."""
    capture = ADAPTER.parse(request(Operation.CAPTURE), 200, {}, obj("capture", "SETTLED"))
    assert (capture.provider_ref, capture.amount) == ("auth_1", 400)
    refund = ADAPTER.parse(request(Operation.REFUND), 200, {}, obj("refund", "SETTLED"))
    assert refund.provider_ref == "ref_1"
    declined = ADAPTER.parse(request(), 402, {}, err("card_error", "card_declined",
                                                     decline_code="insufficient_funds",
                                                     authorization="auth_9"))
    assert (declined.provider_ref, declined.amount) == ("auth_9", 0)


def test_message_never_repeats_what_acme_echoes() -> None:
    """A token or card number in an error code stays out of the reply's message."""
    body = err("invalid_request_error", f"bad {TOKEN} 4242424242424242")
    reply = ADAPTER.parse(request(), 400, {}, body)
    assert reply.outcome is Outcome.FAILED
    assert TOKEN not in reply.message and "4242424242424242" not in reply.message


STATUS_CASES: list[tuple[str, Operation, int, dict[str, str], bytes, Outcome,
                         DeclineCode | None]] = [
    ("approved", Operation.AUTHORIZE, 200, {},
     js({"object": "request", "idempotency_key": "key-1", "operation": "authorize",
         "response_status": 200, "response": json.loads(auth("CAPTURED"))}),
     Outcome.APPROVED, None),
    ("declined", Operation.AUTHORIZE, 200, {},
     js({"object": "request", "idempotency_key": "key-1", "operation": "authorize",
         "response_status": 402, "response": json.loads(
             err("card_error", "expired_card", decline_code="expired_card"))}),
     Outcome.DECLINED, DeclineCode.CARD_EXPIRED),
    ("refused-by-rule", Operation.CAPTURE, 200, {},
     js({"object": "request", "idempotency_key": "key-1", "operation": "capture",
         "response_status": 400, "response": json.loads(
             err("invalid_request_error", "amount_too_large"))}),
     Outcome.FAILED, DeclineCode.AMOUNT_EXCEEDS_AUTHORIZED),
    ("other-operation", Operation.AUTHORIZE, 200, {},
     js({"object": "request", "idempotency_key": "key-1", "operation": "capture",
         "response_status": 200, "response": json.loads(obj("capture", "SETTLED"))}),
     Outcome.UNKNOWN, None),
    ("never-received", Operation.AUTHORIZE, 404, {},
     err("invalid_request_error", "resource_missing"), Outcome.DECLINED, DeclineCode.NOT_FOUND),
    ("404-not-acme", Operation.AUTHORIZE, 404, {}, b"not found", Outcome.UNKNOWN, None),
    ("in-progress", Operation.AUTHORIZE, 409, {"retry-after": "1"},
     err("idempotency_error", "request_in_progress"), Outcome.UNKNOWN, None),
    ("unavailable", Operation.AUTHORIZE, 503, {"retry-after": "3"}, b"", Outcome.UNKNOWN, None),
    ("credentials", Operation.AUTHORIZE, 401, {}, b"", Outcome.UNKNOWN,
     DeclineCode.AUTHENTICATION_FAILED),
]


@pytest.mark.parametrize(("operation", "status", "headers", "body", "outcome", "code"),
                         [case[1:] for case in STATUS_CASES],
                         ids=[c[0] for c in STATUS_CASES])
def test_parse_status_maps_every_answer(operation: Operation, status: int,
                                        headers: dict[str, str], body: bytes,
                                        outcome: Outcome, code: DeclineCode | None) -> None:
    """A status query says what became of the request; a failed query leaves it UNKNOWN."""
    reply = ADAPTER.parse_status(request(operation), status, headers, body)
    assert (reply.outcome, reply.decline_code) == (outcome, code)


@settings(max_examples=300, deadline=None)
@given(status=st.integers(min_value=0, max_value=999), body=st.binary(max_size=300),
       headers=st.dictionaries(st.sampled_from(["retry-after", "Retry-After", "x"]),
                               st.text(max_size=30), max_size=2),
       operation=st.sampled_from(list(Operation)))
def test_parse_never_raises(status: int, body: bytes, headers: dict[str, str],
                            operation: Operation) -> None:
    """Whatever comes back, parse and parse_status answer with an outcome."""
    for parse in (ADAPTER.parse, ADAPTER.parse_status):
        reply = parse(request(operation), status, headers, body)
        assert reply.outcome in Outcome


@settings(max_examples=200, deadline=None)
@given(payload=st.dictionaries(
    st.sampled_from(["id", "object", "status", "amount", "error", "response",
                     "response_status", "operation", "authorization"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12),
              st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=5),
                                                                   st.text(max_size=5))),
    max_size=6), status=st.sampled_from([200, 400, 402, 404, 409, 422, 429, 500, 503]))
def test_parse_never_raises_on_odd_json(payload: dict[str, Any], status: int) -> None:
    """JSON of the right shape with the wrong types is UNKNOWN or a mapped answer, never a
    crash."""
    body = msgspec.json.encode(payload)
    for operation in Operation:
        assert ADAPTER.parse(request(operation), status, {}, body).outcome in Outcome
        assert ADAPTER.parse_status(request(operation), status, {}, body).outcome in Outcome


# --- webhooks --------------------------------------------------------------------------------


def event_body(type_: str = "capture.settled", **object_fields: Any) -> bytes:
    data = {"id": "cap_1", "object": "capture", "status": "SETTLED", "amount": 400,
            "currency": "USD", "authorization": "auth_1", **object_fields}
    return js({"id": "evt_1", "object": "event", "type": type_, "created": int(NOW),
               "request": {"idempotency_key": "key-1"}, "data": {"object": data}})


def sign(body: bytes, stamp: float, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), f"{int(stamp)}.".encode() + body,
                      hashlib.sha256).hexdigest()
    return {"acme-signature": f"t={int(stamp)},v1={digest}"}


def test_webhook_verified_and_translated() -> None:
    """A correctly signed, fresh event becomes a WebhookEvent in the processor's words."""
    body = event_body()
    event = ADAPTER.verify_webhook(sign(body, NOW), body, NOW + 5)
    assert (event.event_id, event.operation, event.outcome, event.idempotency_key,
            event.provider_ref, event.amount, event.occurred_at_s) == (
        "evt_1", Operation.CAPTURE, Outcome.APPROVED, "key-1", "auth_1", 400, NOW)


def test_webhook_with_rotated_secret_and_header_case() -> None:
    """Any of several v1 signatures may match, and header names are case-insensitive."""
    body = event_body("payout.failed", object="payout", id="po_1", status="FAILED",
                      failure_code="account_closed")
    good = sign(body, NOW)["acme-signature"].split("v1=")[1]
    headers = {"Acme-Signature": f"t={int(NOW)},v1={'0' * 64},v1={good}"}
    event = ADAPTER.verify_webhook(headers, body, NOW)
    assert (event.operation, event.outcome, event.decline_code, event.amount) == (
        Operation.PAYOUT, Outcome.DECLINED, DeclineCode.INVALID_DESTINATION, 0)


@pytest.mark.parametrize(("case", "code"), [
    ("tampered-body", "webhook_signature_invalid"),
    ("wrong-secret", "webhook_signature_invalid"),
    ("old-timestamp", "webhook_timestamp_out_of_tolerance"),
    ("future-timestamp", "webhook_timestamp_out_of_tolerance"),
    ("no-header", "webhook_malformed"),
    ("garbage-header", "webhook_malformed"),
    ("not-json", "webhook_malformed"),
    ("not-utf8", "webhook_malformed"),
    ("unknown-type", "webhook_malformed"),
    ("superscript-timestamp", "webhook_malformed"),
    ("non-ascii-signature", "webhook_malformed"),
])
def test_webhook_rejections(case: str, code: str) -> None:
    """Tampering, a wrong secret, a replayed old event and nonsense are all refused."""
    body = event_body()
    headers = sign(body, NOW)
    now = NOW
    if case == "tampered-body":
        body = body.replace(b"400", b"900")
    elif case == "wrong-secret":
        headers = sign(body, NOW, secret="whsec_someone_else")
    elif case == "old-timestamp":
        now = NOW + 301
    elif case == "future-timestamp":
        now = NOW - 301
    elif case == "no-header":
        headers = {}
    elif case == "garbage-header":
        headers = {"acme-signature": "v1=abc"}
    elif case == "not-json":
        body = b"not json"
        headers = sign(body, NOW)
    elif case == "not-utf8":
        body = event_body().replace(b"capture.settled", b"capture.\xff\xfe")
        headers = sign(body, NOW)
    elif case == "unknown-type":
        body = event_body("charge.disputed")
        headers = sign(body, NOW)
    elif case == "superscript-timestamp":  # "²" passes str.isdigit() but not int()
        headers = {"acme-signature": f"t=1{chr(0xB2)},v1=abc"}
    elif case == "non-ascii-signature":  # compare_digest refuses non-ASCII text
        headers = {"acme-signature": f"t={int(NOW)},v1=ab{chr(0x663)}"}
    with pytest.raises(WebhookRejected) as caught:
        ADAPTER.verify_webhook(headers, body, now)
    assert caught.value.code == code


# --- settlement reports ----------------------------------------------------------------------

HEADER = "settlement_date,type,id,authorization_id,idempotency_key,reference,currency,gross,fee,net"


def report(*rows: str) -> bytes:
    return ("\r\n".join([HEADER, *rows]) + "\r\n").encode()


def test_settlement_report_parses_exactly() -> None:
    """Captures, refunds and payouts become lines in minor units; refunds and payouts are
    negative in the report and positive in the line."""
    lines = ADAPTER.parse_settlement(report(
        "2026-11-25,capture,cap_1,auth_1,k1,p1,USD,10.00,0.59,9.41",
        "2026-11-25,refund,re_1,auth_1,k2,p1,USD,-2.50,0.00,-2.50",
        '2026-11-25,payout,po_1,,k3,"ref, with comma",GBP,-50.00,0.25,-50.25',
    ))
    assert [(x.operation, x.provider_ref, x.idempotency_key, x.amount, x.fee, x.currency)
            for x in lines] == [
        (Operation.CAPTURE, "auth_1", "k1", 1_000, 59, "USD"),
        (Operation.REFUND, "re_1", "k2", 250, 0, "USD"),
        (Operation.PAYOUT, "po_1", "k3", 5_000, 25, "GBP")]
    assert {x.settled_on for x in lines} == {"2026-11-25"}
    assert ADAPTER.parse_settlement(report()) == []


@pytest.mark.parametrize(("row", "match"), [
    ("2026-11-25,capture,cap_1,auth_1,k1,p1,USD,10.001,0.59,9.411", "decimals"),
    ("2026-11-25,capture,cap_1,auth_1,k1,p1,USD,1e3,0.59,9.41", "decimal"),
    ("2026-11-25,capture,cap_1,auth_1,k1,p1,USD,10.00,0.59,9.40", "net"),
    ("2026-11-25,capture,cap_1,auth_1,k1,p1,USD,-10.00,0.00,-10.00", "sign"),
    ("2026-11-25,refund,re_1,auth_1,k1,p1,USD,2.50,0.00,2.50", "sign"),
    ("2026-11-25,dispute,dp_1,auth_1,k1,p1,USD,10.00,0.00,10.00", "unknown"),
    ("2026-11-25,capture,cap_1,auth_1,k1,p1,XXX,10.00,0.00,10.00", "unknown"),
    ("2026-13-45,capture,cap_1,auth_1,k1,p1,USD,10.00,0.59,9.41", "month|date"),
    ("2026-11-25,capture,cap_1", "missing"),
])
def test_settlement_report_rejects_what_does_not_add_up(row: str, match: str) -> None:
    """Inexact amounts, sums that do not add up, wrong signs and unknown rows are refused."""
    with pytest.raises(ValueError, match=match):
        ADAPTER.parse_settlement(report(row))


def test_settlement_report_without_its_columns_is_refused() -> None:
    """A report missing a column is refused as a whole."""
    with pytest.raises(ValueError, match="columns"):
        ADAPTER.parse_settlement(b"date,amount\r\n2026-11-25,1.00\r\n")
