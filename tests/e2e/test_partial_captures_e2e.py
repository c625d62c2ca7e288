"""Multiple partial captures end to end: the real processor, both simulated providers as
real HTTP servers, the ledger's balances after every step (docs/payments.md, "Captures")."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from actors.app.runtime import Processor
from processor.client import Client
from tests.payments_support import Sims, authorize, balances, key, merchant, settled
from tests.running import IdSource


async def capture(http: httpx.AsyncClient, processor: Processor, payment_id: str, amount: int,
                  *, final: bool, idem: str | None = None) -> httpx.Response:
    """POST a capture and wait until it is settled (globex settles later)."""
    r = await http.post(f"/v1/payments/{payment_id}/captures",
                        json={"amount": amount, "final": final},
                        headers={"idempotency-key": idem or key()})
    if r.status_code == 202:
        await settled(http, processor, f"/v1/payments/{payment_id}")
    return r


@pytest.mark.parametrize("provider", ["acme", "globex"])
async def test_partial_captures_sum_to_the_authorization_and_the_ledger_follows_each(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims, provider: str) -> None:
    """1000 authorized, captured as 300, 200 and 500 (the last final): after each the
    merchant's pending credit is what is still capturable and its posted credit what was
    captured; the provider saw three captures of one authorization."""
    account = await merchant(client, ids)
    payment = (await authorize(http, account, amount=1_000, provider=provider)).json()
    assert (payment["status"], payment["capturable_amount"]) == ("authorized", 1_000)
    pid = payment["id"]
    expected = [(300, False, "partially_captured", (0, 0, 700, 300)),
                (200, False, "partially_captured", (0, 0, 500, 500)),
                (500, True, "captured", (0, 0, 0, 1_000))]
    for amount, final, status, ledger in expected:
        r = await capture(http, processor, pid, amount, final=final)
        assert r.status_code in (200, 202), r.text
        view = (await http.get(f"/v1/payments/{pid}")).json()
        assert view["status"] == status, view
        assert await balances(client, account) == ledger
    assert [(c["amount"], c["final"], c["status"]) for c in view["captures"]] == [
        (300, False, "succeeded"), (200, False, "succeeded"), (500, True, "succeeded")]
    assert (view["captured_amount"], view["capturable_amount"]) == (1_000, 0)
    ops = await sims.charges(provider, pid)
    assert sorted(op["amount"] for op in ops if op["operation"] == "capture") == [200, 300, 500]
    [auth] = [op for op in ops if op["operation"] == "authorize"]
    assert (auth["captured"], auth["closed"]) == (1_000, True)


async def test_over_capture_is_refused_and_moves_nothing(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    """Captures never exceed what is authorized: 422 capture_exceeds_authorized, nothing
    at the provider, nothing in the ledger; an unknown field or a missing final is 400."""
    account = await merchant(client, ids)
    pid = (await authorize(http, account, amount=1_000, provider="acme")).json()["id"]
    assert (await capture(http, processor, pid, 600, final=False)).status_code == 200
    r = await capture(http, processor, pid, 401, final=False)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "capture_exceeds_authorized")
    r = await http.post(f"/v1/payments/{pid}/capture", json={"amount": 401},
                        headers={"idempotency-key": key()})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "capture_exceeds_authorized")
    for body in ({"amount": 1}, {"amount": 1, "final": True, "x": 1}, {"amount": 0,
                                                                          "final": True}):
        r = await http.post(f"/v1/payments/{pid}/captures", json=body,
                            headers={"idempotency-key": key()})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_body"), body
    assert await balances(client, account) == (0, 0, 400, 600)
    assert [op["amount"] for op in await sims.charges("acme", pid)
            if op["operation"] == "capture"] == [600]


@pytest.mark.parametrize("provider", ["acme", "globex"])
async def test_a_final_capture_releases_the_rest_and_closes_the_authorization(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        provider: str) -> None:
    """A final capture below what is held releases the rest in the ledger; nothing more
    can be captured or voided."""
    account = await merchant(client, ids)
    pid = (await authorize(http, account, amount=1_000, provider=provider)).json()["id"]
    await capture(http, processor, pid, 250, final=False)
    await capture(http, processor, pid, 250, final=True)
    view = (await http.get(f"/v1/payments/{pid}")).json()
    assert (view["status"], view["captured_amount"], view["capturable_amount"]) == (
        "captured", 500, 0)
    assert await balances(client, account) == (0, 0, 0, 500)
    r = await capture(http, processor, pid, 1, final=False)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "payment_not_capturable")
    r = await http.post(f"/v1/payments/{pid}/void", headers={"idempotency-key": key()})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "payment_not_voidable")


@pytest.mark.parametrize("provider", ["acme", "globex"])
async def test_a_void_after_a_partial_capture_releases_the_rest(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims, provider: str) -> None:
    """The void releases what is still held, at the provider and in the ledger; what was
    captured stays captured and refundable."""
    account = await merchant(client, ids)
    pid = (await authorize(http, account, amount=1_000, provider=provider)).json()["id"]
    await capture(http, processor, pid, 400, final=False)
    r = await http.post(f"/v1/payments/{pid}/void", headers={"idempotency-key": key()})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["captured_amount"], r.json()["capturable_amount"]) == (
        "captured", 400, 0)
    assert await balances(client, account) == (0, 0, 0, 400)
    [void] = [op for op in await sims.charges(provider, pid) if op["operation"] == "void"]
    assert void["amount"] == 600
    r = await http.post(f"/v1/payments/{pid}/refunds", json={"amount": 400},
                        headers={"idempotency-key": key()})
    assert r.status_code in (200, 202), r.text
    done = await settled(http, processor, f"/v1/payments/{pid}")
    assert (done["status"], done["refunded_amount"]) == ("refunded", 400)
    assert await balances(client, account) == (0, 400, 0, 400)


async def test_refunds_per_capture_stop_at_that_capture(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource) -> None:
    """A refund naming a capture never exceeds what is left of it; one of the payment never
    exceeds what is left of all captures; an unknown capture is 422 capture_not_found."""
    account = await merchant(client, ids)
    pid = (await authorize(http, account, amount=1_000, provider="acme")).json()["id"]
    await capture(http, processor, pid, 600, final=False)
    await capture(http, processor, pid, 300, final=True)
    first, second = (c["id"] for c in (await http.get(f"/v1/payments/{pid}")).json()["captures"])

    async def refund(body: dict[str, object]) -> httpx.Response:
        return await http.post(f"/v1/payments/{pid}/refunds", json=body,
                               headers={"idempotency-key": key()})

    r = await refund({"amount": 301, "capture_id": second})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "refund_exceeds_captured")
    r = await refund({"amount": 250, "capture_id": second})
    assert r.status_code == 200, r.text
    r = await refund({"capture_id": second})  # the rest of that capture: 50
    assert r.status_code == 200, r.text
    view = r.json()
    assert [c["refunded_amount"] for c in view["captures"]] == [0, 300]
    assert view["operations"][-1]["capture_id"] == second
    r = await refund({"amount": 1, "capture_id": second})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "refund_exceeds_captured")
    r = await refund({"amount": 1, "capture_id": "cap_999999999"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "capture_not_found")
    r = await refund({"amount": 601})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "refund_exceeds_captured")
    r = await refund({"amount": 600, "capture_id": first})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["refunded_amount"]) == ("refunded", 900)
    assert await balances(client, account) == (0, 900, 0, 900)


async def test_a_repeated_capture_request_never_captures_twice(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    """The same Idempotency-Key replays the capture's answer, sequentially and concurrently:
    one capture at the provider, one posting in the ledger."""
    account = await merchant(client, ids)
    pid = (await authorize(http, account, amount=1_000, provider="acme")).json()["id"]
    idem = key()
    await sims.faults("acme", latency={"median_ms": 150, "p99_ms": 200})
    answers = await asyncio.gather(*[capture(http, processor, pid, 300, final=False,
                                             idem=idem) for _ in range(10)])
    assert {a.status_code for a in answers} <= {200, 409}, [a.text for a in answers]
    again = await capture(http, processor, pid, 300, final=False, idem=idem)
    assert (again.status_code, again.headers.get("idempotent-replayed")) == (200, "true")
    assert [op["amount"] for op in await sims.charges("acme", pid)
            if op["operation"] == "capture"] == [300]
    assert await balances(client, account) == (0, 0, 700, 300)
    assert len((await http.get(f"/v1/payments/{pid}")).json()["captures"]) == 1


async def test_the_single_capture_endpoint_still_captures_once_and_finally(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource) -> None:
    """POST /capture is one final capture: of what is left after partial captures."""
    account = await merchant(client, ids)
    pid = (await authorize(http, account, amount=1_000, provider="acme")).json()["id"]
    await capture(http, processor, pid, 100, final=False)
    r = await http.post(f"/v1/payments/{pid}/capture", headers={"idempotency-key": key()})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["captured_amount"]) == ("captured", 1_000)
    assert [(c["amount"], c["final"]) for c in r.json()["captures"]] == [(100, False),
                                                                          (900, True)]
    assert await balances(client, account) == (0, 0, 0, 1_000)


async def test_partial_captures_over_rpc(processor: Processor, client: Client,
                                         http: httpx.AsyncClient, ids: IdSource) -> None:
    """The RPC client's create_capture and refund of one capture are the HTTP routes'."""
    account = await merchant(client, ids)
    pid = (await authorize(http, account, amount=800, provider="acme")).json()["id"]
    answer = await client.create_capture(pid, idempotency_key=key(), amount=500, final=False)
    assert (answer.status, answer.body["status"]) == (200, "partially_captured")
    cap = answer.body["captures"][0]["id"]
    refund = await client.refund_payment(pid, idempotency_key=key(), amount=100,
                                         capture_id=cap)
    assert (refund.status, refund.body["captures"][0]["refunded_amount"]) == (200, 100)
    assert await balances(client, account) == (0, 100, 300, 500)
