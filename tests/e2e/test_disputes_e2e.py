"""Disputes (chargebacks) end to end: the real processor, both simulated providers as real
HTTP servers opening and deciding disputes through their admin API and sending their own
signed webhooks, the merchant's ledger balances at every stage (docs/payments.md,
"Disputes")."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from actors.app.runtime import Processor
from processor.client import Client
from tests.payments_support import (
    Sims,
    authorize,
    balances,
    key,
    luhn_number,
    merchant,
    settled,
    signed,
    webhook_secret,
)
from tests.running import IdSource, token_for

FEE = 1_500


async def captured_payment(http: httpx.AsyncClient, processor: Processor, sims: Sims,
                           account: int, provider: str, amount: int = 10_000
                           ) -> tuple[str, str]:
    """A payment authorized and captured at ``provider``: (our id, the provider's id of its
    authorization)."""
    r = await authorize(http, account, amount=amount, provider=provider, capture=True)
    assert r.status_code in (201, 202), r.text
    pid = r.json()["id"]
    view = await settled(http, processor, f"/v1/payments/{pid}")
    assert view["status"] == "captured", view
    [auth] = [op for op in await sims.charges(provider, pid) if op["operation"] == "authorize"]
    return pid, str(auth["id"])


async def dispute_of(http: httpx.AsyncClient, processor: Processor, payment_id: str, *,
                     status: str | None = None, timeout_s: float = 20.0) -> dict[str, Any]:
    """The payment's one dispute once it exists (and has ``status``), its steps finished."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = await http.get("/v1/disputes", params={"payment_id": payment_id})
        assert r.status_code == 200, r.text
        page = r.json()
        if page["data"] and (status is None or page["data"][0]["status"] == status):
            [dispute] = page["data"]
            return dict(dispute)
        assert time.monotonic() < deadline, page
        await processor.payments.recover_once.remote()
        await asyncio.sleep(0.1)


async def ledger_settles(client: Client, account: int, expected: tuple[int, int, int, int],
                         processor: Processor, timeout_s: float = 20.0) -> None:
    """The merchant's balances reach ``expected`` (a dispute's steps run after its webhook
    is answered); fails with the last seen otherwise."""
    deadline = time.monotonic() + timeout_s
    while (seen := await balances(client, account)) != expected:
        assert time.monotonic() < deadline, (seen, expected)
        await processor.payments.recover_once.remote()
        await asyncio.sleep(0.1)


async def dispute_events(http: httpx.AsyncClient, dispute_id: str) -> list[str]:
    r = await http.get("/v1/events", params={"limit": 1000})
    assert r.status_code == 200, r.text
    page = r.json()
    events = page["data"]
    while len(page["data"]) == 1000:
        page = (await http.get("/v1/events", params={"limit": 1000,
                                                     "after": page["next_cursor"]})).json()
        events += page["data"]
    return [e["type"] for e in events if e["object_id"] == dispute_id]


@pytest.mark.parametrize("provider", ["acme", "globex"])
async def test_open_evidence_won_holds_then_releases_the_amount_and_keeps_the_fee(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims, provider: str) -> None:
    """Captured 10000; a 6000 dispute (fee 1500) holds 7500 of the merchant's funds; the
    evidence reaches the provider and puts it under review; won releases the 6000 and
    posts the fee; one event per status change."""
    account = await merchant(client, ids)
    pid, auth = await captured_payment(http, processor, sims, account, provider)
    assert await balances(client, account) == (0, 0, 0, 10_000)
    opened = await sims.open_dispute(provider, auth, 6_000, fee=FEE)
    dispute = await dispute_of(http, processor, pid)
    assert (dispute["status"], dispute["amount"], dispute["fee"], dispute["currency"],
            dispute["merchant_account_id"], dispute["provider"]) == (
        "needs_response", 6_000, FEE, "USD", account, provider)
    assert dispute["evidence_due_by"] and dispute["reason"] == "fraudulent"
    await ledger_settles(client, account, (7_500, 0, 0, 10_000), processor)
    [funds] = await client.lookup_accounts([account])
    assert funds is not None
    assert funds.credits_posted - funds.debits_posted - funds.debits_pending == 2_500

    evidence = {"text": "Delivered to the cardholder, signed receipt attached.",
                "files": ["https://merchant.example/receipts/4711.pdf"]}
    idem = key()
    r = await http.post(f"/v1/disputes/{dispute['id']}/evidence", json=evidence,
                        headers={"idempotency-key": idem})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["evidence"]) == ("under_review", evidence)
    again = await http.post(f"/v1/disputes/{dispute['id']}/evidence", json=evidence,
                            headers={"idempotency-key": idem})
    assert (again.status_code, again.headers.get("idempotent-replayed")) == (200, "true")
    [at_sim] = [d for d in await sims.disputes(provider) if d["id"] == opened["id"]]
    assert (at_sim["state"], at_sim["evidence_text"]) == ("under_review", evidence["text"])
    assert await balances(client, account) == (7_500, 0, 0, 10_000)

    await sims.decide_dispute(provider, opened["id"], "won")
    assert (await dispute_of(http, processor, pid, status="won"))["status"] == "won"
    await ledger_settles(client, account, (0, FEE, 0, 10_000), processor)
    assert await dispute_events(http, dispute["id"]) == [
        "dispute.needs_response", "dispute.under_review", "dispute.won"]


@pytest.mark.parametrize("provider", ["acme", "globex"])
async def test_open_then_lost_posts_amount_and_fee(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims, provider: str) -> None:
    """Decided without evidence: lost posts the held amount and fee (money leaves the
    merchant); the dispute takes no evidence any more; refunds count what it took."""
    account = await merchant(client, ids)
    pid, auth = await captured_payment(http, processor, sims, account, provider)
    opened = await sims.open_dispute(provider, auth, 4_000, fee=FEE)
    dispute = await dispute_of(http, processor, pid)
    await ledger_settles(client, account, (5_500, 0, 0, 10_000), processor)
    await sims.decide_dispute(provider, opened["id"], "lost")
    await dispute_of(http, processor, pid, status="lost")
    await ledger_settles(client, account, (0, 5_500, 0, 10_000), processor)
    assert await dispute_events(http, dispute["id"]) == ["dispute.needs_response",
                                                         "dispute.lost"]
    r = await http.post(f"/v1/disputes/{dispute['id']}/evidence", json={"text": "late"},
                        headers={"idempotency-key": key()})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "dispute_not_open")
    # Over RPC, the same objects and the same refusal.
    by_rpc = await client.get_dispute(dispute["id"])
    assert (by_rpc.status, by_rpc.body) == (200, (await http.get(
        f"/v1/disputes/{dispute['id']}")).json())
    listed = await client.list_disputes(payment_id=pid)
    assert [d["id"] for d in listed.body["data"]] == [dispute["id"]]
    late = await client.submit_evidence(dispute["id"], idempotency_key=key(), text="late")
    assert (late.status, late.body["error"]["code"]) == (422, "dispute_not_open")
    # 10000 captured, 4000 taken back by the bank: at most 6000 may still be refunded.
    r = await http.post(f"/v1/payments/{pid}/refunds", json={"amount": 6_001},
                        headers={"idempotency-key": key()})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "refund_exceeds_captured")


async def test_a_duplicated_dispute_webhook_is_applied_once(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    """The simulator sends every webhook twice: one dispute, one hold, one event each; a
    hand-made repeat of the opening with another event id is ignored too."""
    account = await merchant(client, ids)
    pid, auth = await captured_payment(http, processor, sims, account, "acme")
    await sims.faults("acme", webhook_duplicate_rate=1.0)
    opened = await sims.open_dispute("acme", auth, 3_000, fee=FEE)
    dispute = await dispute_of(http, processor, pid)
    body = json.dumps({
        "id": "evt_repeat_" + key()[:12], "object": "event", "type": "dispute.created",
        "created": int(time.time()), "data": {"object": {
            "id": opened["id"], "object": "dispute", "status": "NEEDS_RESPONSE",
            "amount": 3_000, "fee": FEE, "currency": "USD", "authorization": auth}},
    }).encode()
    headers = signed("acme", webhook_secret(processor, "acme"), body, time.time())
    for expected in ("ignored", "duplicate"):
        r = await http.post("/v1/providers/acme/webhooks", content=body, headers=headers)
        assert (r.status_code, r.json()["status"]) == (200, expected), r.text
    await sims.decide_dispute("acme", opened["id"], "lost")
    await dispute_of(http, processor, pid, status="lost")
    await ledger_settles(client, account, (0, 4_500, 0, 10_000), processor)
    deadline = time.monotonic() + 10
    while (await sims.disputes("acme")) and time.monotonic() < deadline:
        stats = (await httpx.AsyncClient().get(
            f"{sims.urls['acme']}/_sim/stats",
            headers={"authorization": f"Bearer {sims.admin['acme']}"})).json()
        if stats["webhooks"]["duplicated"] >= 2 and stats["webhooks_pending"] == 0:
            break
        await asyncio.sleep(0.1)
    assert await dispute_events(http, dispute["id"]) == ["dispute.needs_response",
                                                         "dispute.lost"]
    page = (await http.get("/v1/disputes", params={"payment_id": pid})).json()
    assert len(page["data"]) == 1
    assert await balances(client, account) == (0, 4_500, 0, 10_000)


@pytest.mark.parametrize("provider", ["acme", "globex"])
async def test_a_dispute_on_an_uncaptured_payment_is_ignored(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims, provider: str) -> None:
    """Nothing captured, nothing to take back: the notice is acknowledged as ignored (a
    provider need not resend it), no dispute is stored, nothing is held. Too much of a
    captured payment is ignored the same way."""
    account = await merchant(client, ids)
    r = await authorize(http, account, amount=2_000, provider=provider)
    pid = r.json()["id"]
    await settled(http, processor, f"/v1/payments/{pid}")
    [auth] = [op for op in await sims.charges(provider, pid) if op["operation"] == "authorize"]
    await sims.open_dispute(provider, auth["id"], 2_000, fee=FEE)
    captured, captured_auth = await captured_payment(http, processor, sims, account, provider,
                                                     amount=1_000)
    await sims.open_dispute(provider, captured_auth, 1_001, fee=FEE)
    # Both webhooks are delivered (the sim retries until answered 2xx) and change nothing.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = (await httpx.AsyncClient().get(
            f"{sims.urls[provider]}/_sim/stats",
            headers={"authorization": f"Bearer {sims.admin[provider]}"})).json()
        if stats["webhooks_pending"] == 0:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    for payment_id in (pid, captured):
        page = (await http.get("/v1/disputes", params={"payment_id": payment_id})).json()
        assert page == {"data": [], "next_cursor": None}
    assert await balances(client, account) == (0, 0, 2_000, 1_000)


async def test_evidence_is_checked_and_scoped_to_the_tenant(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    """Another tenant's dispute is 404 to read and to answer; bad evidence is 400
    invalid_evidence (card numbers card_data_not_allowed), its key left free; a missing key
    is 400; nothing reaches the provider."""
    account = await merchant(client, ids)
    pid, auth = await captured_payment(http, processor, sims, account, "acme")
    opened = await sims.open_dispute("acme", auth, 1_000, fee=0)
    dispute = await dispute_of(http, processor, pid)
    await ledger_settles(client, account, (1_000, 0, 0, 10_000), processor)
    path = f"/v1/disputes/{dispute['id']}/evidence"
    other = {"authorization": f"Bearer {token_for(processor, tenant='south', subject='b1')}"}
    async with httpx.AsyncClient(base_url=str(http.base_url), headers=other) as south:
        r = await south.post(path, json={"text": "mine"}, headers={"idempotency-key": key()})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "dispute_not_found")
        r = await south.get(f"/v1/disputes/{dispute['id']}")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "dispute_not_found")
        assert (await south.get("/v1/disputes", params={"payment_id": pid})).json()[
            "data"] == []
    idem = key()
    for body, code in (({"text": ""}, "invalid_evidence"),
                       ({"text": "x" * 20_001}, "invalid_evidence"),
                       ({"text": "ok", "files": ["f"] * 11}, "invalid_evidence"),
                       ({"text": f"card {luhn_number('4111')}"}, "card_data_not_allowed"),
                       ({"text": "ok", "extra": 1}, "invalid_body"),
                       ({"files": []}, "invalid_body")):
        r = await http.post(path, json=body, headers={"idempotency-key": idem})
        assert (r.status_code, r.json()["error"]["code"]) == (400, code), body
    r = await http.post(path, json={"text": "ok"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "idempotency_key_missing")
    r = await http.get("/v1/disputes/dp_" + "0" * 24)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "dispute_not_found")
    r = await http.get("/v1/disputes", params={"metadata[a]": "b"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_query")
    [at_sim] = [d for d in await sims.disputes("acme") if d["id"] == opened["id"]]
    assert (at_sim["state"], at_sim["evidence_text"]) == ("needs_response", "")
    # The key the refused bodies named is still free.
    r = await http.post(path, json={"text": "receipt"}, headers={"idempotency-key": idem})
    assert (r.status_code, r.json()["status"]) == (200, "under_review"), r.text
    r = await http.get("/v1/disputes", params={"status": "under_review", "payment_id": pid})
    assert [d["id"] for d in r.json()["data"]] == [dispute["id"]]


async def test_a_batch_of_provider_events_is_applied_event_by_event(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    """One signed request carrying three acme events (a list object): two disputes opened on
    two payments and a repeat of the first; each is applied as if sent alone, and the
    answer says what became of each, in order. A batch whose signature does not hold is
    refused whole, with nothing applied."""
    account = await merchant(client, ids)
    first, first_auth = await captured_payment(http, processor, sims, account, "acme")
    second, second_auth = await captured_payment(http, processor, sims, account, "acme")

    def notice(event_id: str, dispute_ref: str, auth: str) -> dict[str, Any]:
        return {"id": event_id, "object": "event", "type": "dispute.created",
                "created": int(time.time()), "data": {"object": {
                    "id": dispute_ref, "object": "dispute", "status": "NEEDS_RESPONSE",
                    "amount": 2_000, "fee": FEE, "currency": "USD", "authorization": auth}}}

    suffix = key()[:12]
    events = [notice(f"evt_b1_{suffix}", f"dp_b1_{suffix}", first_auth),
              notice(f"evt_b2_{suffix}", f"dp_b2_{suffix}", second_auth)]
    body = json.dumps({"object": "list", "data": [*events, events[0]]}).encode()
    secret = webhook_secret(processor, "acme")
    forged = await http.post("/v1/providers/acme/webhooks", content=body,
                             headers=signed("acme", secret + b"x", body, time.time()))
    assert (forged.status_code, forged.json()["error"]["code"]) == (
        401, "webhook_signature_invalid")
    assert (await http.get("/v1/disputes", params={"payment_id": first})).json()["data"] == []
    r = await http.post("/v1/providers/acme/webhooks", content=body,
                        headers=signed("acme", secret, body, time.time()))
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "batch", "statuses": ["applied", "applied", "duplicate"]}
    for pid in (first, second):
        dispute = await dispute_of(http, processor, pid, status="needs_response")
        assert dispute["amount"] == 2_000
    again = await http.post("/v1/providers/acme/webhooks", content=body,
                            headers=signed("acme", secret, body, time.time()))
    assert again.json() == {"status": "batch",
                            "statuses": ["duplicate", "duplicate", "duplicate"]}
