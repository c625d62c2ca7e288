"""Payments between tenants over real HTTP: a token pays out, reads and replays only its
own tenant's money and requests.

The attack cases of the security review: a payout from a merchant account without limit
flags for more than it holds; a payout or payment naming another tenant's merchant account;
another tenant reading a payment; a second principal sending the first one's
Idempotency-Key.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from actors.app.runtime import Processor
from processor.client import Client
from processor.codes import AccountResult, TransferResult
from processor.types import Account, Transfer
from tests.payments_support import bank_token, card_token, settled
from tests.running import IdSource, token_for


def _key() -> str:
    return str(uuid.uuid4())


@pytest.fixture
async def tenants(processor: Processor) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """HTTP clients for principals a1 and a2 of tenant "north", b1 of tenant "south", and
    "b_a1", a principal of "south" whose subject is also "a1"."""
    clients: dict[str, httpx.AsyncClient] = {}
    try:
        for name, tenant, subject in (("a1", "north", "a1"), ("a2", "north", "a2"),
                                      ("b1", "south", "b1"), ("b_a1", "south", "a1")):
            token = token_for(processor, tenant=tenant, subject=subject)
            clients[name] = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{processor.http_port}", timeout=60,
                headers={"authorization": f"Bearer {token}"})
        yield clients
    finally:
        for c in clients.values():
            await c.aclose()


async def _unlimited_merchant(processor: Processor, ids: IdSource, tenant: str,
                              funded: int) -> int:
    """A merchant account of ``tenant`` with no limit flags, funded from the tenant's bank
    account."""
    account, bank = ids.take(2)
    async with Client("127.0.0.1", processor.rpc_port,
                      token_for(processor, tenant=tenant)) as client:
        assert await client.create_accounts([Account(id=account, currency="USD"),
                                             Account(id=bank, currency="USD")]) == \
            [AccountResult.ok] * 2
        assert await client.create_transfers([Transfer(
            id=ids.one(), debit_account_id=bank, credit_account_id=account, amount=funded,
            currency="USD")]) == [TransferResult.ok]
    return account


async def test_payouts_spend_only_available_funds_of_the_callers_tenant(
        processor: Processor, tenants: dict[str, httpx.AsyncClient], ids: IdSource) -> None:
    a1, b1 = tenants["a1"], tenants["b1"]
    account = await _unlimited_merchant(processor, ids, "north", funded=1_000)

    def payout(amount: int) -> dict[str, object]:
        return {"amount": amount, "currency": "USD", "merchant_account_id": account,
                "destination": bank_token()}

    # No limit flags, yet a payout beyond the available balance is refused before anything
    # moves.
    r = await a1.post("/v1/payouts", json=payout(1_001), headers={"idempotency-key": _key()})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "insufficient_funds"), r.text
    # Another tenant cannot pay this account out at all: it does not exist for them.
    r = await b1.post("/v1/payouts", json=payout(10), headers={"idempotency-key": _key()})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "merchant_account_not_found")
    r = await b1.post("/v1/payments", headers={"idempotency-key": _key()}, json={
        "amount": 10, "currency": "USD", "payment_method": card_token(),
        "merchant_account_id": account})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "merchant_account_not_found")
    # Within the funds it pays; after it, the rest is what is available.
    r = await a1.post("/v1/payouts", json=payout(600), headers={"idempotency-key": _key()})
    assert r.status_code in (201, 202), r.text
    done = await settled(a1, processor, f"/v1/payouts/{r.json()['id']}")
    assert done["status"] == "paid"
    r = await a1.post("/v1/payouts", json=payout(401), headers={"idempotency-key": _key()})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "insufficient_funds"), r.text
    # The payout is the tenant's: its other principal reads it, the other tenant cannot.
    assert (await tenants["a2"].get(f"/v1/payouts/{done['id']}")).status_code == 200
    r = await b1.get(f"/v1/payouts/{done['id']}")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "payout_not_found")


async def test_payments_and_keys_belong_to_their_tenant_and_principal(
        processor: Processor, tenants: dict[str, httpx.AsyncClient], ids: IdSource) -> None:
    a1, a2, b1 = tenants["a1"], tenants["a2"], tenants["b1"]
    account = await _unlimited_merchant(processor, ids, "north", funded=1)
    body = {"amount": 700, "currency": "USD", "payment_method": card_token(),
            "merchant_account_id": account, "capture": True}
    key = _key()
    # 201, or 202 when the capture is still processing on a loaded machine: either way the
    # payment exists and is a1's.
    first = await a1.post("/v1/payments", json=body, headers={"idempotency-key": key})
    assert first.status_code in (201, 202), first.text
    # The same key from another principal is another request: a new payment, not a replay
    # of a1's answer.
    second = await a2.post("/v1/payments", json=body, headers={"idempotency-key": key})
    assert second.status_code in (201, 202), second.text
    assert second.json()["id"] != first.json()["id"]
    # Nor is it a replay for another tenant's principal that happens to share the subject.
    third = await tenants["b_a1"].post("/v1/payments", json=body,
                                       headers={"idempotency-key": key})
    assert (third.status_code, third.json()["error"]["code"]) == \
        (422, "merchant_account_not_found"), third.text
    # Both principals of the tenant read both payments; the other tenant reads neither and
    # cannot capture, void or refund them.
    payment_id = first.json()["id"]
    assert (await a2.get(f"/v1/payments/{payment_id}")).status_code == 200
    for other in (b1, tenants["b_a1"]):
        r = await other.get(f"/v1/payments/{payment_id}")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "payment_not_found")
    r = await b1.post(f"/v1/payments/{payment_id}/refunds", json={},
                      headers={"idempotency-key": _key()})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "payment_not_found")
