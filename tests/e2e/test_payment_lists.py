"""``GET /v1/payments``, ``/v1/payouts`` and ``/v1/refunds`` over real HTTP (and RPC)
against the session's processor: cursor pages that stay stable while payments arrive,
every filter, tenant isolation, bad queries refused with a code, and metadata from the
request to the views, the events and the filters, within its limits."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from actors.app.runtime import Processor
from processor.client import Client
from tests.payments_support import bank_token, card_token, key, merchant
from tests.running import IdSource, token_for

SCOPES = ("payments:write", "payments:read", "payouts:write")


def _http(processor: Processor, tenant: str, scopes: tuple[str, ...] = SCOPES
          ) -> httpx.AsyncClient:
    token = token_for(processor, scopes, tenant=tenant, subject="lister")
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                             headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _tenant(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def _merchant(processor: Processor, ids: IdSource, tenant: str, funded: int = 0) -> int:
    async with Client("127.0.0.1", processor.rpc_port,
                      token_for(processor, tenant=tenant, subject="m")) as client:
        return await merchant(client, ids, funded=funded)


async def _pay(http: httpx.AsyncClient, account: int, *, capture: bool = False,
               reference: str = "", metadata: dict[str, Any] | None = None,
               amount: int = 1_000) -> httpx.Response:
    body: dict[str, Any] = {"amount": amount, "currency": "USD", "payment_method": card_token(),
                            "merchant_account_id": account, "capture": capture,
                            "reference": reference}
    if metadata is not None:
        body["metadata"] = metadata
    return await http.post("/v1/payments", json=body, headers={"idempotency-key": key()})


async def _ids(http: httpx.AsyncClient, path: str, **params: Any) -> list[str]:
    r = await http.get(path, params=params)
    assert r.status_code == 200, r.text
    return [item["id"] for item in r.json()["data"]]


async def _walk(http: httpx.AsyncClient, path: str, limit: int,
                between: Any = None) -> list[str]:
    """Every id of a list, page by page; ``between`` runs after the first page."""
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        page = (await http.get(path, params=params)).json()
        assert len(page["data"]) <= limit
        seen += [item["id"] for item in page["data"]]
        cursor = page["next_cursor"]
        if between is not None:
            await between()
            between = None
        if cursor is None:
            return seen


async def test_pages_walk_every_payment_once_while_new_ones_arrive(
        processor: Processor, ids: IdSource) -> None:
    """Five payments listed two at a time, with two more made after the first page: the
    walk shows the five, newest first, each once; the new ones lead the next walk."""
    tenant = _tenant("lists-pages")
    async with _http(processor, tenant) as http:
        account = await _merchant(processor, ids, tenant)
        made = []
        for _ in range(5):
            r = await _pay(http, account)
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
        later: list[str] = []

        async def more() -> None:
            for _ in range(2):
                later.append((await _pay(http, account)).json()["id"])

        assert await _walk(http, "/v1/payments", 2, between=more) == made[::-1]
        assert await _walk(http, "/v1/payments", 3) == (made + later)[::-1]
        assert await _ids(http, "/v1/payments") == (made + later)[::-1]  # limit 10
        first = (await http.get("/v1/payments", params={"limit": 7})).json()
        assert first["next_cursor"] is None and len(first["data"]) == 7
        view = first["data"][0]
        assert view["created_at"] and view["operations"][0]["kind"] == "authorize"
        assert view == (await http.get(f"/v1/payments/{view['id']}")).json()


async def test_every_filter_of_payments_payouts_and_refunds(
        processor: Processor, ids: IdSource) -> None:
    """status, merchant_account_id, created[gte]/[lt], reference, metadata[k]=v (every
    pair), and for refunds payment_id: each keeps exactly the matching objects."""
    tenant = _tenant("lists-filters")
    async with _http(processor, tenant) as http:
        one = await _merchant(processor, ids, tenant, funded=100_000)
        two = await _merchant(processor, ids, tenant)
        a = (await _pay(http, one, reference="order-a", metadata={"order": "a", "shop": "x"},
                        capture=True)).json()
        b = (await _pay(http, one, reference="order-b", metadata={"order": "b", "shop": "x"}
                        )).json()
        c = (await _pay(http, two, reference="order-c", metadata={"order": "c", "shop": "y"},
                        capture=True)).json()
        assert [p["status"] for p in (a, b, c)] == ["captured", "authorized", "captured"]
        payments = "/v1/payments"
        assert await _ids(http, payments, status="captured") == [c["id"], a["id"]]
        assert await _ids(http, payments, merchant_account_id=two) == [c["id"]]
        assert await _ids(http, payments, reference="order-b") == [b["id"]]
        assert await _ids(http, payments, **{"metadata[shop]": "x"}) == [b["id"], a["id"]]
        assert await _ids(http, payments, **{"metadata[shop]": "x", "metadata[order]": "a"}
                          ) == [a["id"]]
        assert await _ids(http, payments, **{"metadata[shop]": "z"}) == []
        assert await _ids(http, payments, **{"created[gte]": b["created_at"]}) == [
            c["id"], b["id"]]
        assert await _ids(http, payments, **{"created[lt]": b["created_at"]}) == [a["id"]]
        assert await _ids(http, payments, **{"created[gte]": a["created_at"],
                                             "created[lt]": c["created_at"]}) == [
            b["id"], a["id"]]
        assert await _ids(http, payments, **{"created[gte]": "0"}) == [
            c["id"], b["id"], a["id"]]
        assert await _ids(http, payments, **{"created[gte]": "4102444800"}) == []  # 2100

        # Refunds: two of a, one of c, each with its metadata.
        for payment, amount, note in ((a, 100, "first"), (a, 200, "second"), (c, 300, "only")):
            r = await http.post(f"/v1/payments/{payment['id']}/refunds",
                                json={"amount": amount, "metadata": {"note": note}},
                                headers={"idempotency-key": key()})
            assert r.status_code == 200, r.text
        refunds = (await http.get("/v1/refunds")).json()["data"]
        assert [(r["payment_id"], r["amount"], r["metadata"]) for r in refunds] == [
            (c["id"], 300, {"note": "only"}), (a["id"], 200, {"note": "second"}),
            (a["id"], 100, {"note": "first"})]
        assert all(r["status"] == "succeeded" and r["currency"] == "USD" and r["created_at"]
                   for r in refunds)
        ops = (await http.get(f"/v1/payments/{a['id']}")).json()["operations"]
        assert {r["id"] for r in refunds if r["payment_id"] == a["id"]} == {
            o["id"] for o in ops if o["kind"] == "refund"}
        assert await _ids(http, "/v1/refunds", payment_id=a["id"]) == [
            refunds[1]["id"], refunds[2]["id"]]
        assert await _ids(http, "/v1/refunds", **{"metadata[note]": "first"}) == [
            refunds[2]["id"]]
        assert await _ids(http, "/v1/refunds", merchant_account_id=two) == [refunds[0]["id"]]
        assert await _ids(http, "/v1/refunds", status="succeeded", limit=1) == [
            refunds[0]["id"]]
        assert await _ids(http, "/v1/refunds", status="failed") == []
        assert await _walk(http, "/v1/refunds", 1) == [r["id"] for r in refunds]
        assert await _ids(http, "/v1/payments", status="partially_refunded") == [
            c["id"], a["id"]]

        # Payouts of the funded merchant.
        made = []
        for i, ref in enumerate(("po-1", "po-2")):
            r = await http.post("/v1/payouts", json={
                "amount": 1_000 + i, "currency": "USD", "merchant_account_id": one,
                "destination": bank_token(), "reference": ref, "metadata": {"run": ref}},
                headers={"idempotency-key": key()})
            assert r.status_code == 201, r.text
            assert r.json()["metadata"] == {"run": ref}
            made.append(r.json())
        payouts = "/v1/payouts"
        assert await _ids(http, payouts) == [made[1]["id"], made[0]["id"]]
        assert await _ids(http, payouts, status="paid", merchant_account_id=one) == [
            made[1]["id"], made[0]["id"]]
        assert await _ids(http, payouts, merchant_account_id=two) == []
        assert await _ids(http, payouts, reference="po-1") == [made[0]["id"]]
        assert await _ids(http, payouts, **{"metadata[run]": "po-2"}) == [made[1]["id"]]
        assert await _ids(http, payouts, **{"created[gte]": made[1]["created_at"]}) == [
            made[1]["id"]]
        assert await _walk(http, payouts, 1) == [made[1]["id"], made[0]["id"]]


async def test_a_tenant_lists_only_its_own(processor: Processor, ids: IdSource) -> None:
    """Another tenant's lists show none of this tenant's payments, payouts or refunds, even
    filtered by this tenant's merchant account or metadata."""
    mine, theirs = _tenant("lists-mine"), _tenant("lists-theirs")
    async with _http(processor, mine) as owner, _http(processor, theirs) as stranger:
        account = await _merchant(processor, ids, mine, funded=10_000)
        paid = await _pay(owner, account, capture=True, metadata={"secret": "mine"})
        refund = await owner.post(f"/v1/payments/{paid.json()['id']}/refunds", json={},
                                  headers={"idempotency-key": key()})
        payout = await owner.post("/v1/payouts", json={
            "amount": 100, "currency": "USD", "merchant_account_id": account,
            "destination": bank_token()}, headers={"idempotency-key": key()})
        assert (paid.status_code, refund.status_code, payout.status_code) == (201, 200, 201)
        for path in ("/v1/payments", "/v1/payouts", "/v1/refunds"):
            assert len(await _ids(owner, path)) == 1, path
            for params in ({}, {"merchant_account_id": account},
                           {"metadata[secret]": "mine"}):
                assert await _ids(stranger, path, **params) == [], (path, params)
        assert await _ids(stranger, "/v1/refunds", payment_id=paid.json()["id"]) == []


@pytest.mark.parametrize(("path", "params", "code"), [
    ("/v1/payments", {"limit": "0"}, "invalid_query"),
    ("/v1/payments", {"limit": "101"}, "invalid_query"),
    ("/v1/payments", {"limit": "ten"}, "invalid_query"),
    ("/v1/payments", {"status": "paid"}, "invalid_query"),
    ("/v1/payouts", {"status": "captured"}, "invalid_query"),
    ("/v1/refunds", {"status": "refunded"}, "invalid_query"),
    ("/v1/payments", {"merchant_account_id": "0"}, "invalid_query"),
    ("/v1/payments", {"merchant_account_id": "-5"}, "invalid_query"),
    ("/v1/payments", {"created[gte]": "yesterday"}, "invalid_query"),
    ("/v1/payments", {"created[gte]": "2026-12-01"}, "invalid_query"),
    ("/v1/payments", {"created[lt]": "2026-12-01T00:00:00"}, "invalid_query"),
    ("/v1/payments", {"created[lt]": "2026-12-01T00:00:00+01:00"}, None),
    ("/v1/payments", {"created[lt]": "2026-12-01T00:00:00 01:00"}, "invalid_query"),
    ("/v1/payments", {"created[gt]": "0"}, "invalid_query"),
    ("/v1/payments", {"reference": "has space"}, "invalid_query"),
    ("/v1/refunds", {"reference": "order-1"}, "invalid_query"),
    ("/v1/payments", {"payment_id": "pay_" + "0" * 24}, "invalid_query"),
    ("/v1/refunds", {"payment_id": "pay_x"}, "invalid_query"),
    ("/v1/payments", {"metadata[]": "x"}, "invalid_query"),
    ("/v1/payments", {"metadata[" + "k" * 41 + "]": "x"}, "invalid_query"),
    ("/v1/payments", {"sort": "asc"}, "invalid_query"),
    ("/v1/payments", {"cursor": "garbage!"}, "invalid_cursor"),
    ("/v1/payments", {"cursor": "WzEsInBheW91dHMiLDEsInBvX3giXQ"}, "invalid_cursor"),
    ("/v1/refunds", {"cursor": "W10"}, "invalid_cursor"),
])
async def test_a_bad_query_is_refused_with_its_code(
        processor: Processor, path: str, params: dict[str, str], code: str | None) -> None:
    """Each malformed parameter is a 400 with its code (None: accepted); a cursor of
    another list (here a payouts cursor sent to payments) is ``invalid_cursor``."""
    async with _http(processor, _tenant("lists-bad")) as http:
        r = await http.get(path, params=params)
        if code is None:
            assert r.status_code == 200, r.text
        else:
            assert (r.status_code, r.json()["error"]["code"]) == (400, code), r.text


async def test_repeated_parameters_and_the_scope(processor: Processor) -> None:
    """A parameter given twice is ``invalid_query``; a token without payments:read is 403."""
    tenant = _tenant("lists-scope")
    async with _http(processor, tenant) as http, \
            _http(processor, tenant, ("payments:write",)) as writer:
        r = await http.get("/v1/payments?status=captured&status=authorized")
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_query")
        for path in ("/v1/payments", "/v1/payouts", "/v1/refunds"):
            r = await writer.get(path)
            assert (r.status_code, r.json()["error"]["code"]) == (403, "scope_missing")


async def test_metadata_round_trip_and_limits(processor: Processor, ids: IdSource) -> None:
    """Metadata at its limits (20 keys, 40-character keys, 500-character values) is stored
    and shown by the POST answer, GET and the list; one step beyond any limit, a
    non-string value or U+0000 is 400 ``invalid_metadata`` and nothing is made."""
    tenant = _tenant("lists-meta")
    async with _http(processor, tenant) as http:
        account = await _merchant(processor, ids, tenant)
        full = {f"{i:02d}" + "k" * 38: "v" * 500 for i in range(20)}
        r = await _pay(http, account, metadata=full)
        assert r.status_code == 201, r.text
        assert r.json()["metadata"] == full
        assert (await http.get(f"/v1/payments/{r.json()['id']}")).json()["metadata"] == full
        assert (await http.get("/v1/payments")).json()["data"][0]["metadata"] == full
        for bad in ({f"k{i}": "v" for i in range(21)}, {"k" * 41: "v"}, {"": "v"},
                    {"k": "v" * 501}, {"k": 1}, {"k": None}, {"k": ["v"]}, {"k\x00": "v"},
                    {"k": "v\x00"}):
            r = await _pay(http, account, metadata=bad)
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_metadata"), bad
            r = await http.post("/v1/payouts", json={
                "amount": 1, "currency": "USD", "merchant_account_id": account,
                "destination": bank_token(), "metadata": bad},
                headers={"idempotency-key": key()})
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_metadata"), bad
        r = await _pay(http, account, metadata="not an object")  # type: ignore[arg-type]
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_body")
        assert len(await _ids(http, "/v1/payments")) == 1


async def test_rpc_lists_answer_as_http(processor: Processor, ids: IdSource) -> None:
    """The RPC's list_payments, list_payouts and list_refunds answer the same bodies as the
    HTTP routes, filters and cursors included."""
    tenant = _tenant("lists-rpc")
    async with _http(processor, tenant) as http:
        account = await _merchant(processor, ids, tenant)
        for i in range(3):
            assert (await _pay(http, account, metadata={"i": str(i)}, capture=True)
                    ).status_code == 201
        first = (await http.get("/v1/payments", params={"limit": 2})).json()
        second = (await http.get("/v1/payments", params={
            "limit": 2, "cursor": first["next_cursor"]})).json()
        filtered = (await http.get("/v1/payments", params={"metadata[i]": "1"})).json()
        payouts = (await http.get("/v1/payouts")).json()
        refunds = (await http.get("/v1/refunds")).json()
    async with Client("127.0.0.1", processor.rpc_port,
                      token_for(processor, ("payments:read",), tenant=tenant,
                                subject="lister")) as rpc:
        assert (await rpc.list_payments(limit=2)).body == first
        assert (await rpc.list_payments(limit=2, cursor=first["next_cursor"])).body == second
        assert (await rpc.list_payments(metadata={"i": "1"})).body == filtered
        assert (await rpc.list_payouts()).body == payouts
        assert (await rpc.list_refunds()).body == refunds
        bad = await rpc.list_payments(limit=0)
        assert (bad.status, bad.body["error"]["code"]) == (400, "invalid_query")
        bad = await rpc.list_refunds(cursor=first["next_cursor"])
        assert (bad.status, bad.body["error"]["code"]) == (400, "invalid_cursor")
