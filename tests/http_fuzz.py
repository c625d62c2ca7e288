"""What the HTTP fuzz tests share: requests drawn for any route of
``actors.edge.http_api.OPERATIONS``, and the check every answer must pass.

The unit fuzz (tests/unit/test_http_api.py) sends them to the app over a fake ledger; the
end-to-end fuzz (tests/e2e/test_http_fuzz.py) to the session's processor over real HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
from hypothesis import strategies as st

from actors.edge.http_api import ERROR_CODES, OPERATIONS, ErrorResponse, Operation

__all__ = [
    "HEADER_TEXT",
    "JSON_VALUES",
    "PAYMENT_OPERATIONS",
    "VALID_BODIES",
    "FuzzRequest",
    "assert_well_answered",
    "requests_for",
]

# The routes that go to the payments actor (payments, payouts, providers' webhooks).
PAYMENT_OPERATIONS = tuple(op for op in OPERATIONS
                           if op.path.startswith(("/v1/payments", "/v1/payouts", "/v1/providers")))
# Codes of the router itself, for a path no route matches (a path value holding "/").
ROUTER_CODES = frozenset({"not_found", "method_not_allowed"})
_PATH_PARAM = re.compile(r"\{([a-z_]+)\}")

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
# Header values travel as ASCII text; anything printable may come, but for whitespace at
# either end, which HTTP/1.1 strips (and h11 refuses to send).
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                      max_size=80).map(str.strip)

# A valid body of each operation that takes one; fuzzed by replacing or adding one field.
VALID_BODIES: dict[str, dict[str, Any]] = {
    "create_account": {"id": 1, "currency": "EUR"},
    "create_transfer": {"id": 10, "debit_account_id": 1, "credit_account_id": 2, "amount": 500,
                        "currency": "EUR"},
    "create_payment": {"amount": 100, "currency": "USD", "payment_method": "pm_4242_fuzz",
                       "merchant_account_id": 1, "capture": False},
    "capture_payment": {"amount": 100},
    "refund_payment": {"amount": 100},
    "create_payout": {"amount": 100, "currency": "USD", "merchant_account_id": 1,
                      "destination": "ba_6789_fuzz"},
    "provider_webhook": {"id": "evt_fuzz", "type": "capture.settled", "created": 0,
                         "request": {"idempotency_key": "txp-1-acme"},
                         "data": {"object": {"id": "cap_1", "amount": 100}}},
}
VALID_BODIES["create_accounts"] = {"accounts": [VALID_BODIES["create_account"]]}
VALID_BODIES["create_transfers"] = {"transfers": [VALID_BODIES["create_transfer"]]}
EXTRA_FIELDS = ("flags", "pending_id", "timeout_s", "code", "user_data", "provider",
                "reference", "eventType", "subject")


class FuzzRequest(msgspec.Struct, frozen=True):
    """One request to one operation: the path with its parameters filled in (and quoted)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None


def _near_valid(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    fields = sorted({*base, *EXTRA_FIELDS})
    return st.just(base) | st.builds(lambda field, value: base | {field: value},
                                     st.sampled_from(fields), JSON_VALUES)


def bodies(op: Operation, *, valid: dict[str, Any] | None = None) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, arbitrary JSON, and the operation's own body with one field off."""
    base = valid if valid is not None else VALID_BODIES.get(op.name, {})
    return st.one_of(
        st.binary(max_size=64),
        JSON_VALUES.map(lambda value: json.dumps(value).encode()),
        _near_valid(base).map(lambda value: json.dumps(value).encode()),
    )


def path_values(known: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """Values for a path parameter: ids of every shape, well-formed payment and payout ids,
    provider names, the ``known`` ones (real objects), and any text at all."""
    return st.one_of(
        st.integers(min_value=-(2**64), max_value=2**64).map(str),
        st.from_regex(r"pay_[0-9a-f]{24}", fullmatch=True),
        st.from_regex(r"po_[0-9a-f]{24}", fullmatch=True),
        st.sampled_from(("acme", "globex", "nobody", "ACME", "..", "%", "a" * 40, *known)),
        st.text(max_size=40).filter(bool),
    )


def requests_for(
    op: Operation,
    *,
    authorization: st.SearchStrategy[str | None],
    known_ids: tuple[str, ...] = (),
    valid_body: dict[str, Any] | None = None,
    signer: Callable[[str, bytes], st.SearchStrategy[dict[str, str]]] | None = None,
) -> st.SearchStrategy[FuzzRequest]:
    """Requests to ``op``: every path parameter drawn from ``path_values``, the Authorization
    header from ``authorization`` (None: no header), an Idempotency-Key that may be missing,
    well-formed or anything, the providers' signature headers that may be missing or
    anything (or, with ``signer``, extra headers it draws for the provider and body), and a
    body for a POST from ``bodies``."""

    @st.composite
    def draw(data: st.DrawFn) -> FuzzRequest:
        path = op.path
        params: dict[str, str] = {}
        for name in _PATH_PARAM.findall(op.path):
            params[name] = data(path_values(known_ids))
            path = path.replace("{" + name + "}", quote(params[name], safe=""))
        headers: dict[str, str] = {}
        token = data(authorization)
        if token is not None:
            headers["authorization"] = token
        key = data(st.one_of(st.none(), st.uuids().map(lambda u: u.hex), HEADER_TEXT))
        if key is not None:
            headers["idempotency-key"] = key
        for name in ("acme-signature", "x-globex-webhook-timestamp",
                     "x-globex-webhook-signature", "content-type"):
            value = data(st.none() | HEADER_TEXT)
            if value is not None:
                headers[name] = value
        body = data(bodies(op, valid=valid_body)) if op.method == "POST" else None
        if signer is not None and body is not None:
            headers |= data(signer(params.get("provider", ""), body))
        return FuzzRequest(op.method, path, headers, body)

    return draw()


def assert_well_answered(op: Operation, response: httpx.Response) -> None:
    """No 5xx but a 503 with Retry-After; every answer of 400 or more is a JSON error body
    whose code is documented with that status, and among the operation's own replies
    (unless no route matched the path at all)."""
    status = response.status_code
    where = f"{op.name}: {response.request.method} {response.request.url.raw_path!r}"
    what = f"{where} -> {status} {response.text[:300]}"
    assert status < 500 or status == 503, what
    if status == 503:
        assert response.headers.get("retry-after"), what
    if status < 400:
        return
    assert response.headers.get("content-type") == "application/json", what
    code = msgspec.json.decode(response.content, type=ErrorResponse).error.code
    assert ERROR_CODES.get(code) == status, what
    if code not in ROUTER_CODES:
        documented = {c for reply in op.replies if reply.status == status for c in reply.codes}
        assert code in documented, f"{code} is not among {op.name}'s {status} codes: {what}"
