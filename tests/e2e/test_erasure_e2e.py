"""Erasure over the real stack (docs/design.md §17): payments with a customer_ref for two
subjects, captured and refunded through the API; `txproc erase` of one; its payments,
lists, events and replayed answers then show null personal fields and ``"erased": true``,
the other subject's stay whole, the money and the ledger are untouched, and verify passes.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import asyncpg
import httpx

from actors.app.runtime import Processor
from actors.app.verification import verify_all
from processor.client import Client
from tests.payments_support import bank_token, card_token, key, merchant
from tests.running import IdSource, token_for

SCOPES = ("payments:write", "payments:read", "events:read")
PERSONAL = ("customer_ref", "reference", "metadata")


def _http(processor: Processor, tenant: str) -> httpx.AsyncClient:
    token = token_for(processor, SCOPES, tenant=tenant, subject="shop")
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                             headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _erase(processor: Processor, tenant: str, ref: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "actors.app.cli", "erase", "--tenant", tenant, "--subject-ref",
         ref, "--data-dir", processor.config.data_dir,
         "--database-url", processor.admin_database_url],
        capture_output=True, text=True, timeout=120, check=False)


def _body(account: int, customer_ref: str, reference: str,
          metadata: dict[str, str]) -> dict[str, Any]:
    return {"amount": 2_500, "currency": "USD", "payment_method": card_token(),
            "merchant_account_id": account, "capture": True, "reference": reference,
            "metadata": metadata, "customer_ref": customer_ref}


async def _pay(http: httpx.AsyncClient, body: dict[str, Any],
               idempotency_key: str) -> dict[str, Any]:
    r = await http.post("/v1/payments", json=body, headers={"idempotency-key": idempotency_key})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _money(view: dict[str, Any]) -> tuple[Any, ...]:
    return (view["id"], view["status"], view["amount"], view["captured_amount"],
            view["refunded_amount"], view["currency"], view["created_at"],
            [(o["id"], o["kind"], o["status"], o["amount"]) for o in view["operations"]])


async def test_erasing_one_subject_leaves_the_money_and_the_other_subject(
        processor: Processor, ids: IdSource) -> None:
    """Subject A's personal fields are gone from every answer after `txproc erase`; B's
    are whole; amounts, ids, times and operations are as before; verify passes."""
    tenant = f"erasure-{uuid.uuid4().hex[:8]}"
    async with Client("127.0.0.1", processor.rpc_port,
                      token_for(processor, tenant=tenant, subject="m")) as client:
        account = await merchant(client, ids, funded=10_000)
        payout = await client.create_payout(
            idempotency_key=key(), amount=700, currency="USD", merchant_account_id=account,
            destination=bank_token(), customer_ref="cus-a")
        assert payout.status == 201 and payout.body["customer_ref"] == "cus-a", payout.body
    async with _http(processor, tenant) as http:
        bad = await http.post("/v1/payments", json={
            "amount": 1, "currency": "USD", "payment_method": card_token(),
            "merchant_account_id": account, "customer_ref": "has spaces"},
            headers={"idempotency-key": key()})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_body"
        a_key, a_body = key(), _body(account, "cus-a", "order-a1", {"email": "a@example.org"})
        a1 = await _pay(http, a_body, a_key)
        a2 = await _pay(http, _body(account, "cus-a", "order-a2", {"phone": "+15550001"}),
                        key())
        b1 = await _pay(http, _body(account, "cus-b", "order-b1", {"email": "b@example.org"}),
                        key())
        assert (a1["customer_ref"], a1["reference"], a1["metadata"], a1["erased"]) == (
            "cus-a", "order-a1", {"email": "a@example.org"}, False)
        refund = await http.post(f"/v1/payments/{a1['id']}/refunds",
                                 json={"amount": 500, "metadata": {"note": "a-refund"}},
                                 headers={"idempotency-key": key()})
        assert refund.status_code in (200, 201), refund.text
        before = {p["id"]: (await http.get(f"/v1/payments/{p['id']}")).json()
                  for p in (a1, a2, b1)}

        erased = _erase(processor, tenant, "cus-a")
        assert erased.returncode == 0, erased.stderr
        assert "2 payment(s) and 1 payout(s)" in erased.stdout

        for payment in (a1, a2):
            view = (await http.get(f"/v1/payments/{payment['id']}")).json()
            assert [view[f] for f in PERSONAL] == [None, None, None] and view["erased"]
            assert _money(view) == _money(before[payment["id"]])
        kept = (await http.get(f"/v1/payments/{b1['id']}")).json()
        assert kept == before[b1["id"]] and kept["customer_ref"] == "cus-b"
        listed = {p["id"]: p for p in (await http.get("/v1/payments")).json()["data"]}
        assert listed[a1["id"]]["erased"] and listed[a1["id"]]["reference"] is None
        assert listed[b1["id"]]["reference"] == "order-b1"
        refunds = (await http.get("/v1/refunds", params={"payment_id": a1["id"]})).json()
        assert [r["metadata"] for r in refunds["data"]] == [{}]
        # A retry of A's first request replays its stored answer: erased too.
        replay = await http.post("/v1/payments", json=a_body,
                                 headers={"idempotency-key": a_key})
        assert replay.status_code == 201, replay.text
        assert replay.json()["id"] == a1["id"] and replay.json()["erased"]
        assert [replay.json()[f] for f in PERSONAL] == [None, None, None]
        events = (await http.get("/v1/events", params={"limit": 1000})).json()["data"]
        for event in events:
            if event["object_id"] in (a1["id"], a2["id"]) and "reference" in event["data"]:
                assert event["data"]["erased"] and event["data"]["reference"] is None
        assert any(e["data"].get("reference") == "order-b1" for e in events)

        async with Client("127.0.0.1", processor.rpc_port,
                          token_for(processor, tenant=tenant, subject="m")) as client:
            over_rpc = (await client.get_payout(payout.body["id"])).body
            assert over_rpc["erased"] and over_rpc["customer_ref"] is None
            assert (over_rpc["id"], over_rpc["amount"]) == (payout.body["id"], 700)
            rpc_payment = (await client.get_payment(a1["id"])).body
            assert rpc_payment["erased"] and rpc_payment["metadata"] is None

        again = _erase(processor, tenant, "cus-a")
        assert again.returncode == 0 and "nothing left to erase" in again.stdout
        unknown = _erase(processor, tenant, "cus-zzz")
        assert unknown.returncode == 1 and "no data subject" in unknown.stderr

    conn = await asyncpg.connect(processor.admin_database_url)
    try:
        for table in ("payments", "payment_steps", "events", "idempotency_keys"):
            texts = "\n".join(r["t"] for r in await conn.fetch(
                f"SELECT t::text AS t FROM {table} t"))  # table: a constant of this test
            for secret in ("cus-a", "order-a1", "order-a2", "a@example.org", "+15550001",
                           "a-refund"):
                assert secret not in texts, (table, secret)
            # B's fields: sealed in its payment, in clear in its events (for consumers).
            assert ("order-b1" in texts) == (table == "events"), table
    finally:
        await conn.close()
    result = await verify_all(processor.admin_database_url)
    assert result.report.ok, result.report.problems
