"""Payments end to end: the real processor, the simulated providers as real HTTP servers,
fault injection through their admin API, over real HTTP and RPC."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import ray

from actors.app.runtime import Processor
from adapters.acme import WEBHOOK_TOLERANCE_S as ACME_TOLERANCE_S
from adapters.globex import WEBHOOK_TOLERANCE_S as GLOBEX_TOLERANCE_S
from processor.client import Client
from processor.identity import SCOPES, SYSTEM_SCOPES
from processor.payments import clearing_account_for, clearing_account_id
from processor.service import placement_of
from tests.payments_support import (
    Sims,
    authorize,
    balances,
    bank_token,
    card_token,
    key,
    luhn_number,
    merchant,
    settled,
    signed,
    webhook_secret,
)
from tests.running import IdSource, token_for


async def test_authorize_capture_refund_agree_with_the_ledger_and_the_provider(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    account = await merchant(client, ids)
    r = await authorize(http, account, amount=1_000, provider="acme")
    assert r.status_code == 201, r.text
    payment = r.json()
    assert (payment["status"], payment["provider"]) == ("authorized", "acme")
    assert await balances(client, account) == (0, 0, 1_000, 0)

    r = await http.post(f"/v1/payments/{payment['id']}/capture", json={"amount": 600},
                        headers={"idempotency-key": key()})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["captured_amount"]) == ("captured", 600)
    # A partial capture releases the rest of the hold.
    assert await balances(client, account) == (0, 0, 0, 600)

    r = await http.post(f"/v1/payments/{payment['id']}/refunds", json={"amount": 200},
                        headers={"idempotency-key": key()})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["refunded_amount"]) == ("partially_refunded", 200)
    assert await balances(client, account) == (0, 200, 0, 600)

    ops = {op["operation"]: op for op in await sims.charges("acme", payment["id"])}
    assert ops["authorize"]["captured"] == 600
    assert ops["capture"]["amount"] == 600
    assert ops["refund"]["amount"] == 200
    assert len(await sims.charges("acme", payment["id"])) == 3

    # More than what is left to refund is refused by the rules; nothing moves.
    r = await http.post(f"/v1/payments/{payment['id']}/refunds", json={"amount": 401},
                        headers={"idempotency-key": key()})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "refund_exceeds_captured")
    assert await balances(client, account) == (0, 200, 0, 600)


async def test_a_payments_postings_stay_in_its_merchant_accounts_placement(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource) -> None:
    """Each posting of an authorization, capture and refund names the provider's clearing
    account in the merchant account's placement (so it never crosses shards); the
    provider's one clearing account is not touched."""
    config = processor.config.payments.rules
    account = await merchant(client, ids)
    placed = clearing_account_for(config, "acme", "USD", account)
    one = clearing_account_id(config, "acme", "USD")
    assert placed != one and placement_of(placed) == placement_of(account)
    system = token_for(processor, (*SCOPES, *SYSTEM_SCOPES))
    async with Client("127.0.0.1", processor.rpc_port, system) as admin:
        placed_before, one_before = await admin.lookup_accounts([placed, one])
        assert placed_before is not None and one_before is not None
        payment = (await authorize(http, account, amount=900, provider="acme")).json()
        assert payment["status"] == "authorized"
        r = await http.post(f"/v1/payments/{payment['id']}/capture", json={"amount": 500},
                            headers={"idempotency-key": key()})
        assert r.status_code == 200, r.text
        r = await http.post(f"/v1/payments/{payment['id']}/refunds", json={"amount": 100},
                            headers={"idempotency-key": key()})
        assert r.status_code == 200, r.text
        placed_after, one_after = await admin.lookup_accounts([placed, one])
    assert placed_after is not None
    # Clearing -> merchant: 500 captured (the rest of the hold released); merchant ->
    # clearing: 100 refunded. Other tests' merchants may share the placement, so deltas.
    assert (placed_after.debits_posted - placed_before.debits_posted,
            placed_after.credits_posted - placed_before.credits_posted) == (500, 100)
    # Fees are posted to the one account (credits posted); holds and captures never.
    assert one_after is not None
    assert (one_after.debits_pending, one_after.credits_pending, one_after.debits_posted) == (
        one_before.debits_pending, one_before.credits_pending, one_before.debits_posted)


async def test_void_releases_the_hold(http: httpx.AsyncClient, client: Client,
                                      ids: IdSource) -> None:
    account = await merchant(client, ids)
    payment = (await authorize(http, account, amount=700)).json()
    r = await http.post(f"/v1/payments/{payment['id']}/void", headers={"idempotency-key": key()})
    assert (r.status_code, r.json()["status"]) == (200, "voided")
    assert await balances(client, account) == (0, 0, 0, 0)
    r = await http.post(f"/v1/payments/{payment['id']}/capture",
                        headers={"idempotency-key": key()})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "payment_not_capturable")


async def test_idempotency_key_replays_refuses_reuse_and_is_required(
        http: httpx.AsyncClient, client: Client, ids: IdSource, sims: Sims) -> None:
    account = await merchant(client, ids)
    idem = key()
    body = {"amount": 300, "currency": "USD", "payment_method": card_token(),
            "merchant_account_id": account}
    first = await http.post("/v1/payments", json=body, headers={"idempotency-key": idem})
    assert first.status_code == 201
    again = await http.post("/v1/payments", content=json.dumps(body, indent=2, sort_keys=True),
                            headers={"idempotency-key": idem,
                                     "content-type": "application/json"})
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    other = await http.post("/v1/payments", json={**body, "amount": 301},
                            headers={"idempotency-key": idem})
    assert (other.status_code, other.json()["error"]["code"]) == (422, "idempotency_key_reused")
    # The key is checked before the body: even a broken body gets the key's error.
    missing = await http.post("/v1/payments", content=b"{not json")
    assert (missing.status_code, missing.json()["error"]["code"]) == (
        400, "idempotency_key_missing")
    assert len(await sims.charges("acme", first.json()["id"])) == 1
    assert await balances(client, account) == (0, 0, 300, 0)


async def test_fifty_concurrent_requests_with_one_key_charge_once(
        http: httpx.AsyncClient, client: Client, ids: IdSource, sims: Sims) -> None:
    account = await merchant(client, ids)
    idem = key()
    token = card_token()
    # Slow the provider so the requests overlap the first one's provider call.
    await sims.faults("acme", latency={"median_ms": 150, "p99_ms": 200})
    answers = await asyncio.gather(*[
        authorize(http, account, amount=250, token=token, provider="acme", idem=idem)
        for _ in range(50)])
    statuses = sorted({a.status_code for a in answers})
    assert set(statuses) <= {201, 409}, statuses
    created = [a for a in answers if a.status_code == 201]
    assert created, statuses
    assert all(a.json()["error"]["code"] == "idempotency_key_in_use"
               for a in answers if a.status_code == 409)
    payment_ids = {a.json()["id"] for a in created}
    assert len(payment_ids) == 1
    charges = await sims.charges("acme", payment_ids.pop())
    assert [c["operation"] for c in charges] == ["authorize"]
    assert await balances(client, account) == (0, 0, 250, 0)


async def test_card_numbers_are_refused_and_never_echoed(
        http: httpx.AsyncClient, client: Client, ids: IdSource) -> None:
    account = await merchant(client, ids)
    number = luhn_number("4")
    r = await http.post("/v1/payments", json={
        "amount": 100, "currency": "USD", "payment_method": number,
        "merchant_account_id": account}, headers={"idempotency-key": key()})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "card_data_not_allowed")
    assert number not in r.text
    spaced = " ".join(number[i:i + 4] for i in range(0, 16, 4))
    r = await http.post("/v1/payments", json={
        "amount": 100, "currency": "USD", "payment_method": card_token(),
        "merchant_account_id": account, "reference": "x", "note": spaced},
        headers={"idempotency-key": key()})
    assert r.json()["error"]["code"] == "card_data_not_allowed"
    assert await balances(client, account) == (0, 0, 0, 0)


async def test_a_declined_card_is_402_and_moves_nothing(
        http: httpx.AsyncClient, client: Client, ids: IdSource) -> None:
    account = await merchant(client, ids)
    r = await authorize(http, account, token=card_token("0002"))
    assert r.status_code == 402, r.text
    body = r.json()
    assert body["error"]["code"] == "payment_declined"
    assert (body["payment"]["status"], body["payment"]["decline_code"]) == (
        "declined", "insufficient_funds")
    assert await balances(client, account) == (0, 0, 0, 0)


async def test_an_authorization_answers_exactly_what_a_read_then_shows(
        http: httpx.AsyncClient, client: Client, ids: IdSource) -> None:
    """The answer to a new authorization is built in memory (no read back); it must be the
    stored payment: approved by either provider, declined, or with a reference."""
    usd, eur = await merchant(client, ids), await merchant(client, ids, currency="EUR")
    cases = [(usd, "acme", card_token()), (eur, "globex", card_token()),
             (usd, "acme", card_token("0002"))]
    for account, provider, token in cases:
        r = await authorize(http, account, token=token, provider=provider,
                            currency="EUR" if account == eur else "USD")
        assert r.status_code in (201, 402), r.text
        answered = r.json().get("payment", r.json())
        stored = (await http.get(f"/v1/payments/{answered['id']}")).json()
        assert answered == stored


async def test_an_outage_fails_over_to_the_other_provider(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    account = await merchant(client, ids)
    await sims.faults("acme", outage="unavailable")
    r = await authorize(http, account, amount=900, provider="acme")
    assert r.status_code == 201, r.text
    payment = r.json()
    assert (payment["status"], payment["provider"]) == ("authorized", "globex")
    assert await sims.charges("acme", payment["id"]) == []
    assert len(await sims.charges("globex", payment["id"])) == 1
    # Captures stay with the provider that authorized.
    r = await http.post(f"/v1/payments/{payment['id']}/capture",
                        headers={"idempotency-key": key()})
    assert r.status_code in (200, 202), r.text
    done = await settled(http, processor, f"/v1/payments/{payment['id']}")
    assert (done["status"], done["captured_amount"]) == ("captured", 900)
    assert await balances(client, account) == (0, 0, 0, 900)


async def test_both_providers_down_fails_fast_and_retryable(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    account = await merchant(client, ids)
    await sims.faults("acme", outage="unavailable")
    await sims.faults("globex", outage="unavailable")
    idem = key()
    token = card_token()

    async def send(retry_on: frozenset[str]) -> tuple[httpx.Response, float]:
        """The request and the seconds its last try took, sent again after Retry-After
        while it is answered 503 with one of ``retry_on`` (what a client does; on a loaded
        machine a run may still be going or the database may not answer in time, and the
        next try works)."""
        deadline = time.monotonic() + 60
        while True:
            started = time.monotonic()
            r = await authorize(http, account, idem=idem, token=token)
            took_s = time.monotonic() - started
            if r.status_code != 503 or time.monotonic() > deadline:
                return r, took_s
            if r.json()["error"]["code"] not in retry_on:
                return r, took_s
            await asyncio.sleep(float(r.headers["retry-after"]))

    r, took_s = await send(frozenset({"unavailable"}))
    assert (r.status_code, r.json()["error"]["code"]) == (503, "provider_unavailable")
    assert "retry-after" in r.headers
    assert took_s < 15
    # Nothing happened, so the same request may be sent again, unchanged, with the same key:
    # it tries again on the same payment.
    await sims.faults("acme")
    await sims.faults("globex")
    r, _ = await send(frozenset({"unavailable", "provider_unavailable"}))
    assert r.status_code == 201, r.text
    payment = r.json()
    assert payment["status"] == "authorized"
    statuses = [op["status"] for op in payment["operations"]]
    assert statuses[-1] == "succeeded" and statuses[:-1] == ["failed"] * (len(statuses) - 1)
    assert len(statuses) >= 2
    assert len(await sims.charges(payment["provider"], payment["id"])) == 1
    assert await balances(client, account) == (0, 0, 1_000, 0)
    # Every status change wrote its event, the reopening included.
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        events = await conn.fetch("SELECT event_type FROM events WHERE aggregate_id = $1 "
                                  "ORDER BY id", payment["id"])
    finally:
        await conn.close()
    assert [e["event_type"] for e in events] == [
        "payment.processing", "payment.failed"] * (len(statuses) - 1) + [
        "payment.processing", "payment.authorized"]


async def test_breaker_opens_under_an_outage_and_closes_after_a_probe(
        processor: Processor, sims: Sims) -> None:
    [acme] = [p for p in processor.providers
              if ray.get(p.info.remote())["name"] == "acme"]
    from processor.payments import Operation, ProviderRequest

    await sims.faults("acme", outage="unavailable", retry_after_s=0)
    request = ProviderRequest(operation=Operation.AUTHORIZE, idempotency_key=key(),
                              amount=100, currency="USD", reference="breaker-test",
                              payment_method=card_token())
    states = []
    for _ in range(12):
        reply = await acme.call.remote(request)
        states.append((await acme.info.remote())["breaker"])
    assert states[-1] == "open", states
    assert reply.outcome.value == "retryable_failure"
    opened = await acme.call.remote(request)
    assert opened.message == "circuit_open"
    await sims.faults("acme")
    # open_s later one probe goes; a good one closes the breaker.
    deadline = time.monotonic() + 30
    while (await acme.info.remote())["breaker"] != "closed" and time.monotonic() < deadline:
        await acme.call.remote(request)
        await asyncio.sleep(0.5)
    assert (await acme.info.remote())["breaker"] == "closed"


async def test_a_lost_response_is_resolved_by_asking_never_by_guessing(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    account = await merchant(client, ids)
    await sims.faults("acme", lost_response_rate=1.0)
    r = await authorize(http, account, amount=450, provider="acme")
    assert r.status_code == 202, r.text
    payment = r.json()
    assert payment["status"] == "processing"
    # The provider did authorize; the processor does not know yet and has not failed over.
    assert len(await sims.charges("acme", payment["id"])) == 1
    assert await sims.charges("globex", payment["id"]) == []
    await sims.faults("acme")
    done = await settled(http, processor, f"/v1/payments/{payment['id']}")
    assert done["status"] == "authorized"
    assert len(await sims.charges("acme", payment["id"])) == 1
    assert await balances(client, account) == (0, 0, 450, 0)


async def test_async_settlement_arrives_by_webhook(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    account = await merchant(client, ids, currency="EUR")
    r = await authorize(http, account, amount=800, currency="EUR", provider="globex")
    assert r.status_code == 201, r.text
    payment = r.json()
    await sims.faults("globex", settle_delay_ms=300, webhook_duplicate_rate=1.0)
    r = await http.post(f"/v1/payments/{payment['id']}/capture",
                        headers={"idempotency-key": key()})
    assert r.status_code in (200, 202), r.text
    done = await settled(http, processor, f"/v1/payments/{payment['id']}")
    assert done["status"] == "captured"
    assert await balances(client, account) == (0, 0, 0, 800)


async def test_payout_holds_then_pays_and_cannot_overdraw(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    account = await merchant(client, ids, funded=5_000)
    r = await http.post("/v1/payouts", json={
        "amount": 3_000, "currency": "USD", "merchant_account_id": account,
        "destination": bank_token()}, headers={"idempotency-key": key()})
    assert r.status_code in (201, 202), r.text
    payout = r.json()
    done = await settled(http, processor, f"/v1/payouts/{payout['id']}")
    assert done["status"] == "paid"
    assert await balances(client, account) == (0, 3_000, 0, 5_000)
    r = await http.post("/v1/payouts", json={
        "amount": 2_001, "currency": "USD", "merchant_account_id": account,
        "destination": bank_token()}, headers={"idempotency-key": key()})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "insufficient_funds"
    assert await balances(client, account) == (0, 3_000, 0, 5_000)


async def test_payments_over_rpc_match_http(processor: Processor, client: Client,
                                            ids: IdSource) -> None:
    account = await merchant(client, ids)
    idem = key()
    answer = await client.authorize_payment(
        idempotency_key=idem, amount=1_200, currency="USD", payment_method=card_token(),
        merchant_account_id=account, capture=True)
    assert answer.status == 201, answer.body
    assert (answer.body["status"], answer.body["captured_amount"]) == ("captured", 1_200)
    again = await client.authorize_payment(
        idempotency_key=idem, amount=1_201, currency="USD", payment_method=card_token(),
        merchant_account_id=account, capture=True)
    assert (again.status, again.body["error"]["code"]) == (422, "idempotency_key_reused")
    fetched = await client.get_payment(answer.body["id"])
    assert fetched.status == 200 and fetched.body["id"] == answer.body["id"]
    refund = await client.refund_payment(answer.body["id"], idempotency_key=key())
    assert (refund.status, refund.body["status"]) == (200, "refunded")
    assert await balances(client, account) == (0, 1_200, 0, 1_200)


async def test_scopes_guard_payments(processor: Processor) -> None:
    token = token_for(processor, ("payments:read",))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}") as c:
        r = await c.post("/v1/payments", json={},
                         headers={"authorization": f"Bearer {token}",
                                  "idempotency-key": key()})
        assert (r.status_code, r.json()["error"]["code"]) == (403, "scope_missing")
        r = await c.get(f"/v1/payments/pay_{'0' * 24}",
                        headers={"authorization": f"Bearer {token}"})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "payment_not_found")


async def test_a_killed_provider_actor_mid_call_ends_in_a_final_state(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    account = await merchant(client, ids)
    [acme] = [p for p in processor.providers
              if (await p.info.remote())["name"] == "acme"]
    pid = await acme.pid.remote()
    await sims.faults("acme", latency={"median_ms": 1500, "p99_ms": 1600})
    pending = asyncio.create_task(authorize(http, account, amount=333, provider="acme"))
    await asyncio.sleep(0.7)
    os.kill(pid, signal.SIGKILL)
    r = await pending
    assert r.status_code in (201, 202), r.text
    payment = r.json()
    await sims.faults("acme")
    done = await settled(http, processor, f"/v1/payments/{payment['id']}", timeout_s=60)
    assert done["status"] == "authorized", done
    charges = await sims.charges("acme", payment["id"])
    assert len(charges) == 1
    assert await balances(client, account) == (0, 0, 333, 0)
    # The payment may have settled by webhook before Ray restarted the actor; later tests
    # need the actor back (calls fail with ActorUnavailableError while it restarts).
    deadline = time.monotonic() + 60
    while True:
        try:
            assert await asyncio.wait_for(acme.pid.remote(), timeout=10) != pid
            break
        except ray.exceptions.RayError:
            assert time.monotonic() < deadline, "the provider actor never came back"
            await asyncio.sleep(0.5)


# -- webhooks ----------------------------------------------------------------------------------
#
# Each test parks a real step that only its provider's event can settle (a globex capture whose
# settlement is delayed; an acme authorization whose answer was lost, while acme holds back its
# own webhooks and loses the answers to status queries), then sends that event forged in one
# way or another, checks that nothing moved, and ends by sending it properly signed and seeing
# it settle the step: so every refusal is the signature's or the timestamp's doing.

WEBHOOK_TOLERANCE_S = {"acme": ACME_TOLERANCE_S, "globex": GLOBEX_TOLERANCE_S}
OTHER_PROVIDER = {"acme": "globex", "globex": "acme"}
# How far inside the tolerance a replayed request is first sent: room for the first delivery
# on a loaded machine, and how long the replay test waits for the stamp to go stale.
REPLAY_MARGIN_S = 10.0


@dataclass(frozen=True)
class Parked:
    """A step waiting for its provider's word, and the event that gives it."""

    provider: str
    payment_id: str
    account: int
    step_id: int
    event_id: str
    event: bytes  # the provider's event settling the step, unsigned
    other_event: bytes  # another event of the same step (another event id)
    settled_balances: tuple[int, int, int, int]
    settled_status: str

    @property
    def url(self) -> str:
        return f"/v1/providers/{self.provider}/webhooks"


async def _step_of(processor: Processor, payment_id: str, kind: str) -> asyncpg.Record:
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT id, phase, provider_key, provider_ref, auth_ref FROM payment_steps "
            "WHERE subject_id = $1 AND kind = $2", payment_id, kind)
    finally:
        await conn.close()
    assert row is not None, (payment_id, kind)
    return row


async def _park_globex(processor: Processor, http: httpx.AsyncClient, client: Client,
                       ids: IdSource, sims: Sims) -> Parked:
    """A globex capture of 8.00 EUR waiting for globex's settlement (a minute away)."""
    account = await merchant(client, ids, currency="EUR")
    r = await authorize(http, account, amount=800, currency="EUR", provider="globex")
    assert r.status_code == 201, r.text
    payment_id = r.json()["id"]
    await sims.faults("globex", settle_delay_ms=60_000)
    r = await http.post(f"/v1/payments/{payment_id}/capture",
                        headers={"idempotency-key": key()})
    assert r.status_code == 202, r.text
    step = await _step_of(processor, payment_id, "capture")
    assert step["phase"] == "await_provider", step

    def event(event_id: str) -> bytes:
        return json.dumps({
            "eventId": event_id, "eventType": "CAPTURE.COMPLETED",
            "occurredAt": datetime.now(UTC).isoformat(),
            "subject": {"type": "CAPTURE", "id": step["provider_ref"] or "gx_cap_1",
                        "paymentId": step["auth_ref"] or "gx_pay_1",
                        "idempotencyKey": step["provider_key"], "state": "COMPLETE",
                        "money": {"value": "8.00", "currency": "EUR"}}}).encode()

    event_id = f"gx_evt_{key()}"
    return Parked("globex", payment_id, account, step["id"], event_id, event(event_id),
                  event(f"gx_evt_{key()}"), (0, 0, 0, 800), "captured")


async def _park_acme(processor: Processor, http: httpx.AsyncClient, client: Client,
                     ids: IdSource, sims: Sims) -> Parked:
    """An acme authorization of 4.50 USD that acme made but whose answer was lost: it waits in
    ``resolve`` while acme loses the answers to status queries too and holds its own webhook
    back for 30 s."""
    account = await merchant(client, ids)
    await sims.faults("acme", lost_response_rate=1.0, webhook_reorder_window=1_000,
                      webhook_reorder_hold_ms=30_000)
    r = await authorize(http, account, amount=450, provider="acme")
    assert r.status_code == 202, r.text
    payment_id = r.json()["id"]
    step = await _step_of(processor, payment_id, "authorize")
    assert step["phase"] == "resolve", step
    [made] = await sims.charges("acme", payment_id)

    def event(event_id: str) -> bytes:
        return json.dumps({
            "id": event_id, "object": "event", "type": "authorization.approved",
            "created": int(time.time()), "request": {"idempotency_key": step["provider_key"]},
            "data": {"object": {"id": made["id"], "object": "authorization",
                                "status": "AUTHORIZED", "amount": 450,
                                "currency": "USD"}}}).encode()

    event_id = f"evt_{key()}"
    return Parked("acme", payment_id, account, step["id"], event_id, event(event_id),
                  event(f"evt_{key()}"), (0, 0, 450, 0), "authorized")


async def park(provider: str, processor: Processor, http: httpx.AsyncClient, client: Client,
               ids: IdSource, sims: Sims) -> Parked:
    parker = _park_acme if provider == "acme" else _park_globex
    return await parker(processor, http, client, ids, sims)


async def state_of(http: httpx.AsyncClient, client: Client,
                   parked: Parked) -> tuple[Any, ...]:
    """What a webhook could change: the payment, its operations, the merchant's balances."""
    view = (await http.get(f"/v1/payments/{parked.payment_id}")).json()
    return (view["status"], view["captured_amount"],
            tuple((op["kind"], op["status"]) for op in view["operations"]),
            await balances(client, parked.account))


async def webhook_records(processor: Processor, parked: Parked) -> tuple[int, int]:
    """How often the step's log names the event, and whether the event id is recorded."""
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        logged = await conn.fetchval(
            "SELECT count(*) FROM payment_step_log WHERE step_id = $1 AND detail = $2",
            parked.step_id, f"webhook {parked.event_id}")
        recorded = await conn.fetchval(
            "SELECT count(*) FROM webhook_events WHERE provider = $1 AND event_id = $2",
            parked.provider, parked.event_id)
    finally:
        await conn.close()
    return int(logged), int(recorded)


def answer_of(r: httpx.Response) -> tuple[int, str]:
    """The status and the error code, or the whole body when it carries no error."""
    body = r.json()
    return r.status_code, body["error"]["code"] if "error" in body else r.text


async def deliver(hooks: httpx.AsyncClient, url: str, body: bytes,
                  headers: dict[str, str]) -> httpx.Response:
    """POST a webhook as a provider does: again, unchanged, while it is answered 503 (the
    step was being written by its recovery at that moment)."""
    for _ in range(50):
        r = await hooks.post(url, content=body, headers=headers)
        if r.status_code != 503:
            return r
        assert r.headers.get("retry-after"), r.text
        await asyncio.sleep(0.2)
    raise AssertionError(f"still 503 after 50 deliveries: {r.text}")


async def settle_by_webhook(processor: Processor, http: httpx.AsyncClient,
                            hooks: httpx.AsyncClient, client: Client, parked: Parked,
                            headers: dict[str, str]) -> None:
    """The properly signed event is applied and settles the step, once."""
    r = await deliver(hooks, parked.url, parked.event, headers)
    assert (r.status_code, r.json()) == (200, {"status": "applied"}), r.text
    done = await settled(http, processor, f"/v1/payments/{parked.payment_id}")
    assert done["status"] == parked.settled_status, done
    assert await balances(client, parked.account) == parked.settled_balances
    assert await webhook_records(processor, parked) == (1, 1)


@pytest.fixture
async def hooks(processor: Processor) -> AsyncIterator[httpx.AsyncClient]:
    """A provider's HTTP client: no bearer token, only what it signs."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 timeout=60) as c:
        yield c


@pytest.mark.parametrize("provider", ["acme", "globex"])
async def test_forged_webhooks_are_refused_and_settle_nothing(
        provider: str, processor: Processor, http: httpx.AsyncClient,
        hooks: httpx.AsyncClient, client: Client, ids: IdSource, sims: Sims) -> None:
    """The event that settles a waiting step is refused, and settles nothing, when it is
    unsigned, signed with a wrong secret, carries a valid signature over another body, or is
    stamped beyond the tolerance either way; signed properly, the same event settles it."""
    parked = await park(provider, processor, http, client, ids, sims)
    before = await state_of(http, client, parked)
    secret = webhook_secret(processor, provider)
    tolerance_s = WEBHOOK_TOLERANCE_S[provider]
    now = time.time()
    junk = b'{"id": 1}'
    forgeries = [
        ("unsigned", parked.event, {"content-type": "application/json"},
         400, "webhook_malformed"),
        ("a random secret", parked.event, signed(provider, secrets.token_bytes(32),
                                                 parked.event, now),
         401, "webhook_signature_invalid"),
        ("the other provider's secret", parked.event,
         signed(provider, webhook_secret(processor, OTHER_PROVIDER[provider]), parked.event,
                now),
         401, "webhook_signature_invalid"),
        ("a signature over another event", parked.event,
         signed(provider, secret, parked.other_event, now), 401, "webhook_signature_invalid"),
        ("a signature over the body with a byte more", parked.event,
         signed(provider, secret, parked.event + b" ", now), 401, "webhook_signature_invalid"),
        ("stale", parked.event, signed(provider, secret, parked.event, now - tolerance_s - 60),
         401, "webhook_timestamp_out_of_tolerance"),
        ("from the future", parked.event,
         signed(provider, secret, parked.event, now + tolerance_s + 60),
         401, "webhook_timestamp_out_of_tolerance"),
        ("signed but unreadable", junk, signed(provider, secret, junk, now),
         400, "webhook_malformed"),
    ]
    for what, body, headers, status, code in forgeries:
        r = await hooks.post(parked.url, content=body, headers=headers)
        assert answer_of(r) == (status, code), what
    r = await hooks.post("/v1/providers/nobody/webhooks", content=parked.event,
                         headers=signed(provider, secret, parked.event, time.time()))
    assert answer_of(r) == (404, "webhook_provider_unknown")
    assert await state_of(http, client, parked) == before
    assert await webhook_records(processor, parked) == (0, 0)
    await settle_by_webhook(processor, http, hooks, client, parked,
                            signed(provider, secret, parked.event, time.time()))


@pytest.mark.parametrize("provider", ["acme", "globex"])
async def test_a_replayed_webhook_is_applied_once_and_refused_once_stale(
        provider: str, processor: Processor, http: httpx.AsyncClient,
        hooks: httpx.AsyncClient, client: Client, ids: IdSource, sims: Sims) -> None:
    """A properly signed event, accepted once, sent again unchanged is answered
    ``duplicate`` and changes neither the step nor the ledger; the same request sent once
    its timestamp is older than the tolerance is refused outright."""
    parked = await park(provider, processor, http, client, ids, sims)
    tolerance_s = WEBHOOK_TOLERANCE_S[provider]
    stamp_s = time.time() - tolerance_s + REPLAY_MARGIN_S
    headers = signed(provider, webhook_secret(processor, provider), parked.event, stamp_s)
    await settle_by_webhook(processor, http, hooks, client, parked, headers)
    await sims.faults(provider)  # the provider back to normal while the test waits
    after = await state_of(http, client, parked)
    again = await deliver(hooks, parked.url, parked.event, headers)
    assert (again.status_code, again.json()) == (200, {"status": "duplicate"}), again.text
    assert await state_of(http, client, parked) == after
    assert await webhook_records(processor, parked) == (1, 1)
    await asyncio.sleep(max(0.0, stamp_s + tolerance_s + 1.5 - time.time()))
    late = await hooks.post(parked.url, content=parked.event, headers=headers)
    assert answer_of(late) == (401, "webhook_timestamp_out_of_tolerance")
    assert await state_of(http, client, parked) == after
    assert await webhook_records(processor, parked) == (1, 1)


@pytest.mark.parametrize(("signer", "target"), [("acme", "globex"), ("globex", "acme")])
async def test_a_webhook_signed_by_one_provider_is_refused_on_the_others_route(
        signer: str, target: str, processor: Processor, http: httpx.AsyncClient,
        hooks: httpx.AsyncClient, client: Client, ids: IdSource, sims: Sims) -> None:
    """The target's event, signed with the other provider's secret (in either provider's
    header format), is refused on the target's route and settles nothing; signed with the
    target's own secret, it settles the step."""
    parked = await park(target, processor, http, client, ids, sims)
    before = await state_of(http, client, parked)
    theirs = webhook_secret(processor, signer)
    now = time.time()
    in_target_format = await hooks.post(parked.url, content=parked.event,
                                        headers=signed(target, theirs, parked.event, now))
    assert answer_of(in_target_format) == (401, "webhook_signature_invalid")
    in_signer_format = await hooks.post(parked.url, content=parked.event,
                                        headers=signed(signer, theirs, parked.event, now))
    assert answer_of(in_signer_format) == (400, "webhook_malformed")
    assert await state_of(http, client, parked) == before
    assert await webhook_records(processor, parked) == (0, 0)
    await settle_by_webhook(processor, http, hooks, client, parked,
                            signed(target, webhook_secret(processor, target), parked.event,
                                   time.time()))


async def test_one_providers_secret_cannot_settle_another_providers_step(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    """A capture waiting on globex's settlement is not settled by an event signed with
    acme's webhook secret, even one naming the step's own key."""
    account = await merchant(client, ids, currency="EUR")
    r = await authorize(http, account, amount=800, currency="EUR", provider="globex")
    assert r.status_code == 201, r.text
    payment = r.json()
    await sims.faults("globex", settle_delay_ms=60_000)
    r = await http.post(f"/v1/payments/{payment['id']}/capture",
                        headers={"idempotency-key": key()})
    assert r.status_code == 202, r.text
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        provider_key = await conn.fetchval(
            "SELECT provider_key FROM payment_steps WHERE subject_id = $1 AND kind = 'capture'",
            payment["id"])
    finally:
        await conn.close()
    event = json.dumps({
        "id": f"evt_{key()}", "type": "capture.settled", "created": int(time.time()),
        "request": {"idempotency_key": provider_key},
        "data": {"object": {"id": "cap_1", "authorization": "auth_1", "status": "SETTLED",
                            "amount": 800}}}).encode()
    r = await http.post("/v1/providers/acme/webhooks", content=event,
                        headers=signed("acme", webhook_secret(processor, "acme"), event,
                                       time.time()))
    assert (r.status_code, r.json()) == (200, {"status": "ignored"})
    view = (await http.get(f"/v1/payments/{payment['id']}")).json()
    assert (view["status"], view["captured_amount"]) == ("authorized", 0), view
    assert [op["status"] for op in view["operations"] if op["kind"] == "capture"] == [
        "processing"], view
    assert await balances(client, account) == (0, 0, 800, 0)


async def test_risk_velocity_declines_and_a_slow_risk_check_falls_back(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource) -> None:
    account = await merchant(client, ids)
    token = card_token()
    limit = processor.config.payments.risk.velocity_max
    for _ in range(limit):
        r = await authorize(http, account, amount=100, token=token)
        assert r.status_code == 201, r.text
    r = await authorize(http, account, amount=100, token=token)
    assert (r.status_code, r.json()["error"]["code"]) == (402, "risk_declined")
    assert (r.json()["payment"]["status"], r.json()["payment"]["risk_reason"]) == (
        "declined", "velocity_exceeded")
    assert await processor.risk.set_delay.remote(2.0) == 2.0
    try:
        below = await authorize(http, account, amount=500)
        assert below.status_code == 201, below.text
        assert below.json()["risk_reason"] == "fallback_allowed_below_threshold"
        above = await authorize(http, account, amount=50_000)
        assert above.status_code == 402, above.text
        assert (above.status_code, above.json()["payment"]["risk_reason"]) == (
            402, "fallback_declined_at_or_above_threshold")
    finally:
        await processor.risk.set_delay.remote(0.0)
    assert await balances(client, account) == (0, 0, 100 * limit + 500, 0)


async def test_provider_ledgers_and_ours_agree_under_faults(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    """Errors, 503 bursts and lost responses at both providers: every payment ends final,
    and what each provider captured equals what the ledger posted, payment by payment."""
    accounts = {cur: await merchant(client, ids, currency=cur) for cur in ("USD", "EUR")}
    for name in ("acme", "globex"):
        await sims.faults(name, error_rate=0.2, lost_response_rate=0.15, burst_rate=0.05,
                          burst_length=2, retry_after_s=0, seed=11)

    async def one(i: int) -> str:
        currency = "USD" if i % 2 else "EUR"
        r = await authorize(http, accounts[currency], amount=100 + i, currency=currency,
                            capture=True)
        if r.status_code == 503:
            return ""
        body = r.json()
        assert "id" in (body.get("payment") or body), (r.status_code, r.text)
        return str((body.get("payment") or body)["id"])

    payment_ids = [p for p in await asyncio.gather(*[one(i) for i in range(30)]) if p]
    for name in ("acme", "globex"):
        await sims.faults(name)
    assert payment_ids
    captured_total = {"USD": 0, "EUR": 0}
    for payment_id in payment_ids:
        done = await settled(http, processor, f"/v1/payments/{payment_id}", timeout_s=60)
        assert all(op["status"] != "processing" for op in done["operations"]), done
        assert done["status"] in ("authorized", "captured", "declined", "failed"), done
        provider_captured = 0
        for name in ("acme", "globex"):
            for op in await sims.charges(name, payment_id):
                if op["operation"] == "capture" and op["state"] not in ("failed", "declined"):
                    provider_captured += op["amount"]
        assert provider_captured == done["captured_amount"], (payment_id, done)
        captured_total[done["currency"]] += done["captured_amount"]
    for currency, account in accounts.items():
        _, _, _, credits_posted = await balances(client, account)
        assert credits_posted == captured_total[currency]


async def test_a_shard_killed_mid_saga_loses_nothing(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    accounts = [await merchant(client, ids) for _ in range(4)]
    await sims.faults("acme", latency={"median_ms": 60, "p99_ms": 120})
    pids = [int((await shard.stats.remote())["pid"]) for shard in processor.shards]
    tasks = [asyncio.create_task(authorize(http, accounts[i % 4], amount=200 + i,
                                           capture=True, provider="acme"))
             for i in range(16)]
    await asyncio.sleep(0.3)
    os.kill(pids[0], signal.SIGKILL)
    answers = await asyncio.gather(*tasks)
    assert all(a.status_code in (201, 202, 503) for a in answers), [
        (a.status_code, a.text[:300]) for a in answers if a.status_code not in (201, 202, 503)]
    await sims.faults("acme")
    total = 0
    for answer in answers:
        if answer.status_code == 503:
            continue
        body = answer.json()
        done = await settled(http, processor, f"/v1/payments/{body['id']}", timeout_s=60)
        assert done["status"] == "captured", done
        charges = await sims.charges("acme", body["id"])
        assert sum(op["amount"] for op in charges if op["operation"] == "capture") == (
            done["captured_amount"])
        total += done["captured_amount"]
    posted = 0
    for account in accounts:
        pending_debits, _, pending_credits, credits_posted = await balances(client, account)
        assert (pending_debits, pending_credits) == (0, 0)
        posted += credits_posted
    assert posted == total


async def test_payment_events_reach_a_subscriber_signed_and_at_least_once(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource) -> None:
    """Status changes are written to the outbox with the change, and the relay in the front
    delivers them signed to every subscriber."""
    import asyncpg

    from actors.payments import outbox

    received: list[tuple[dict[str, str], bytes]] = []
    failures_left = [1]  # the first delivery fails: it must come again

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in head.split("\r\n")[1:] if line)}
        body = await reader.readexactly(int(headers["content-length"]))
        status = "500 Internal Server Error" if failures_left[0] else "204 No Content"
        if failures_left[0]:
            failures_left[0] -= 1
        else:
            received.append((headers, body))
        writer.write(f"HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                     .encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        await outbox.set_subscribers(conn, {"test-sink": f"http://127.0.0.1:{port}/events"})
        account = await merchant(client, ids)
        payment = (await authorize(http, account, amount=640)).json()
        deadline = time.monotonic() + 60
        wanted = {"payment.processing", "payment.authorized"}
        while time.monotonic() < deadline and not wanted <= {
                json.loads(b)["type"] for _, b in received
                if json.loads(b)["aggregate_id"] == payment["id"]}:
            await asyncio.sleep(0.2)
    finally:
        await outbox.set_subscribers(conn, {})
        await conn.close()
        server.close()
    secret = (Path(processor.config.data_dir) / "providers" / "outbox.key").read_bytes()
    mine = [(h, json.loads(b)) for h, b in received
            if json.loads(b)["aggregate_id"] == payment["id"]]
    assert {e["type"] for _, e in mine} >= {"payment.processing", "payment.authorized"}
    for headers, body in received:
        assert outbox.verify(secret, headers, body, now_s=time.time())
    authorized = next(e for _, e in mine if e["type"] == "payment.authorized")
    assert (authorized["data"]["status"], authorized["data"]["amount"]) == ("authorized", 640)


async def test_bad_payment_requests_get_a_4xx_code_and_write_nothing(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    usd = await merchant(client, ids)
    missing = ids.one()

    async def post(path: str, body: Any, raw: bytes | None = None) -> tuple[int, str]:
        kwargs: dict[str, Any] = {"content": raw} if raw is not None else {"json": body}
        r = await http.post(path, headers={"idempotency-key": key()}, **kwargs)
        return r.status_code, r.json()["error"]["code"]

    good = {"amount": 100, "currency": "USD", "payment_method": card_token(),
            "merchant_account_id": usd}
    cases = [
        (("/v1/payments", {**good, "merchant_account_id": missing}),
         (422, "merchant_account_not_found")),
        (("/v1/payments", {**good, "currency": "EUR"}), (422, "currency_mismatch")),
        (("/v1/payments", {**good, "currency": "CHF"}), (422, "currency_not_supported")),
        (("/v1/payments", {**good, "provider": "nobody"}), (422, "provider_unknown")),
        (("/v1/payments", {**good, "amount": 0}), (400, "invalid_body")),
        (("/v1/payments", {**good, "amount": 1.5}), (400, "invalid_body")),
        (("/v1/payments", {**good, "amount": 2**63}), (400, "invalid_body")),
        (("/v1/payments", {**good, "payment_method": "tok_x"}), (400, "invalid_body")),
        (("/v1/payments", {**good, "surprise": 1}), (400, "invalid_body")),
        (("/v1/payments", {**good, "merchant_account_id": 2**62 + 5}),
         (422, "merchant_account_not_found")),
        ((f"/v1/payments/pay_{'0' * 24}/capture", {}), (404, "payment_not_found")),
        (("/v1/payments/not-an-id/refunds", {}), (404, "payment_not_found")),
        (("/v1/payouts", {"amount": 1, "currency": "USD", "merchant_account_id": usd,
                          "destination": "DE89370400440532013000"}), (400, "invalid_body")),
    ]
    for (path, body), expected in cases:
        assert await post(path, body) == expected, (path, body)
    assert await post("/v1/payments", None, raw=b"{not json") == (400, "malformed_json")
    # A string that is not UTF-8, and nesting deeper than any decoder's limit: 4xx, not 500.
    assert await post("/v1/payments", None, raw=b'{"amount": 1, "currency": "\xff\xfe"}') == (
        400, "malformed_json")
    assert (await post("/v1/payments", None, raw=b"[" * 200_000))[0] == 400
    assert await post("/v1/payments", None, raw=b"x" * (5 * 1024 * 1024)) == (
        413, "body_too_large")
    assert await balances(client, usd) == (0, 0, 0, 0)
    assert (await http.get("/healthz")).status_code == 200


@pytest.fixture(autouse=True)
async def _step_log_on_failure(processor: Processor, request: pytest.FixtureRequest
                               ) -> AsyncIterator[None]:
    """A failed payments test prints the saga log: what each step did, and why."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed:
        return
    import asyncpg

    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        rows = await conn.fetch(
            "SELECT l.step_id, s.subject_id, s.kind, l.version, l.phase, l.provider, l.detail "
            "FROM payment_step_log l JOIN payment_steps s ON s.id = l.step_id "
            "WHERE l.at > now() - interval '2 minutes' ORDER BY l.step_id, l.version")
    finally:
        await conn.close()
    for row in rows:
        print(dict(row))
