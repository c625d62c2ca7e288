"""The payments and webhook routes fuzzed over real HTTP against the session's processor.

The unit fuzz (tests/unit/test_http_api.py) runs against an app without payments, where
these routes can only answer 503; here they reach the payments actor, the real
Idempotency-Key store, the providers' signature checks and the simulated providers.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.app.runtime import Processor
from actors.edge.http_api import Operation
from processor.client import Client
from tests.http_fuzz import (
    HEADER_TEXT,
    PAYMENT_OPERATIONS,
    VALID_BODIES,
    assert_well_answered,
    requests_for,
)
from tests.payments_support import (
    authorize,
    bank_token,
    card_token,
    key,
    merchant,
    signed,
    webhook_secret,
)
from tests.running import IdSource, token_for

# Examples per route: eight routes, about 160 requests in all.
EXAMPLES_PER_ROUTE = 20


@dataclass(frozen=True)
class Targets:
    """Real objects for the fuzzed requests to name: a funded merchant account, an authorized
    and a captured payment, a payout; and an HTTP client of the processor."""

    http: httpx.AsyncClient
    token: str
    account: int
    known_ids: tuple[str, ...]
    secrets: dict[str, bytes]


@pytest.fixture(scope="module")
async def targets(processor: Processor, ids: IdSource) -> AsyncIterator[Targets]:
    token = token_for(processor)
    async with (Client("127.0.0.1", processor.rpc_port, token) as client,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                  headers={"authorization": f"Bearer {token}"},
                                  timeout=60) as http):
        account = await merchant(client, ids, funded=1_000_000)
        authorized = await authorize(http, account, amount=5_000)
        captured = await authorize(http, account, amount=5_000, capture=True)
        payout = await http.post("/v1/payouts", json={
            "amount": 1_000, "currency": "USD", "merchant_account_id": account,
            "destination": bank_token()}, headers={"idempotency-key": key()})
        for r in (authorized, captured, payout):
            assert r.status_code in (201, 202), r.text
        known = tuple(r.json()["id"] for r in (authorized, captured, payout))
        http.headers.pop("authorization")  # each fuzzed request brings its own, or none
        yield Targets(http, token, account, known,
                      {name: webhook_secret(processor, name) for name in ("acme", "globex")})


def _valid_body(op: Operation, account: int) -> dict[str, Any]:
    """The operation's valid body, naming the real merchant account and fresh tokens."""
    body = dict(VALID_BODIES.get(op.name, {}))
    if "merchant_account_id" in body:
        body["merchant_account_id"] = account
    if op.name == "create_payment":
        body["payment_method"] = card_token()
    if op.name == "create_payout":
        body["destination"] = bank_token()
    return body


def _requests(op: Operation, targets: Targets) -> st.SearchStrategy[Any]:
    good = f"Bearer {targets.token}"
    authorization = st.one_of(st.just(good), st.just(good), st.just(good), st.none(),
                              HEADER_TEXT)

    def signer(provider: str, body: bytes) -> st.SearchStrategy[dict[str, str]]:
        # Half the webhooks are signed properly (now, with a real secret), so that their
        # bodies reach the providers' event parsers.
        names = [provider] if provider in targets.secrets else list(targets.secrets)
        return st.one_of(st.just({}), st.sampled_from(names).map(
            lambda name: signed(name, targets.secrets[name], body, time.time())))

    return requests_for(op, authorization=authorization, known_ids=targets.known_ids,
                        valid_body=_valid_body(op, targets.account), signer=signer)


@pytest.mark.parametrize("op", [pytest.param(op, id=op.name) for op in PAYMENT_OPERATIONS])
@settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
async def test_payments_and_webhook_routes_answer_every_request_well(
        op: Operation, targets: Targets, data: st.DataObject) -> None:
    """Any path values, headers and bodies, sent to the real payments and webhook routes:
    never a 5xx except 503 with Retry-After, and every answer of 400 or more a JSON error
    whose code the route documents."""
    request = data.draw(_requests(op, targets))
    response = await targets.http.request(request.method, request.path,
                                          headers=request.headers,
                                          content=request.body)
    assert_well_answered(op, response)
