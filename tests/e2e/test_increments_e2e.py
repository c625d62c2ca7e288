"""Incremental authorization end to end: the real processor and both simulated providers
over real HTTP; the ledger's hold after every step (docs/payments.md, "Incremental
authorization")."""

from __future__ import annotations

import httpx

from actors.app.runtime import Processor
from processor.client import Client
from tests.payments_support import Sims, authorize, balances, key, merchant
from tests.running import IdSource


async def increment(http: httpx.AsyncClient, payment_id: str, amount: int,
                    idem: str | None = None) -> httpx.Response:
    return await http.post(f"/v1/payments/{payment_id}/increments", json={"amount": amount},
                           headers={"idempotency-key": idem or key()})


async def test_an_increment_at_acme_raises_the_hold_once_per_key(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    """acme raises the authorization; the ledger hold grows by the same amount; the same
    Idempotency-Key replays the answer and raises nothing twice; the raised amount can be
    captured."""
    account = await merchant(client, ids)
    pid = (await authorize(http, account, amount=1_000, provider="acme")).json()["id"]
    idem = key()
    r = await increment(http, pid, 250, idem)
    assert r.status_code == 200, r.text
    view = r.json()
    assert (view["status"], view["amount"], view["capturable_amount"]) == (
        "authorized", 1_250, 1_250)
    assert view["operations"][-1]["kind"] == "increment"
    assert await balances(client, account) == (0, 0, 1_250, 0)
    again = await increment(http, pid, 250, idem)
    assert (again.status_code, again.headers.get("idempotent-replayed")) == (200, "true")
    assert await balances(client, account) == (0, 0, 1_250, 0)
    ops = await sims.charges("acme", pid)
    assert [op["amount"] for op in ops if op["operation"] == "increment"] == [250]
    # Partly captured, then raised again: still an open authorization.
    r = await http.post(f"/v1/payments/{pid}/captures", json={"amount": 250, "final": False},
                        headers={"idempotency-key": key()})
    assert r.status_code == 200, r.text
    r = await increment(http, pid, 100)
    assert r.status_code == 200, r.text
    assert (r.json()["amount"], r.json()["capturable_amount"]) == (1_350, 1_100)
    assert await balances(client, account) == (0, 0, 1_100, 250)
    r = await http.post(f"/v1/payments/{pid}/capture", headers={"idempotency-key": key()})
    assert (r.status_code, r.json()["captured_amount"]) == (200, 1_350)
    assert await balances(client, account) == (0, 0, 0, 1_350)
    [auth] = [op for op in await sims.charges("acme", pid) if op["operation"] == "authorize"]
    assert (auth["amount"], auth["captured"]) == (1_350, 1_350)


async def test_globex_does_not_offer_increments_and_is_never_asked(
        http: httpx.AsyncClient, client: Client, ids: IdSource, sims: Sims) -> None:
    """A globex payment is 422 increment_not_supported, decided before any call: globex saw
    the authorization only, and the hold is unchanged."""
    account = await merchant(client, ids, currency="EUR")
    pid = (await authorize(http, account, amount=1_000, currency="EUR",
                           provider="globex")).json()["id"]
    r = await increment(http, pid, 100)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "increment_not_supported")
    assert [op["operation"] for op in await sims.charges("globex", pid)] == ["authorize"]
    assert await balances(client, account) == (0, 0, 1_000, 0)
    view = (await http.get(f"/v1/payments/{pid}")).json()
    assert (view["amount"], [op["kind"] for op in view["operations"]]) == (1_000,
                                                                           ["authorize"])


async def test_only_an_open_authorization_is_incremented(
        http: httpx.AsyncClient, client: Client, ids: IdSource, sims: Sims) -> None:
    """Voided or fully captured: 422 payment_not_incrementable, nothing sent; a body without
    an amount is 400."""
    account = await merchant(client, ids)
    voided = (await authorize(http, account, amount=500, provider="acme")).json()["id"]
    await http.post(f"/v1/payments/{voided}/void", headers={"idempotency-key": key()})
    captured = (await authorize(http, account, amount=500, provider="acme",
                                capture=True)).json()["id"]
    for pid in (voided, captured):
        r = await increment(http, pid, 100)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "payment_not_incrementable")
        assert "increment" not in [op["operation"] for op in await sims.charges("acme", pid)]
    r = await http.post(f"/v1/payments/{voided}/increments", json={},
                        headers={"idempotency-key": key()})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_body")
    assert await balances(client, account) == (0, 0, 0, 500)


async def test_increments_over_rpc(processor: Processor, client: Client,
                                   http: httpx.AsyncClient, ids: IdSource) -> None:
    """The RPC client's increment_payment is the HTTP route's."""
    account = await merchant(client, ids)
    pid = (await authorize(http, account, amount=400, provider="acme")).json()["id"]
    answer = await client.increment_payment(pid, idempotency_key=key(), amount=600)
    assert (answer.status, answer.body["amount"]) == (200, 1_000)
    assert await balances(client, account) == (0, 0, 1_000, 0)
