"""``GET /v1/events``: the durable pull stream of payment and payout events, per tenant,
over real HTTP and RPC."""

from __future__ import annotations

import httpx

from actors.app.runtime import Processor
from processor.client import Client
from tests.payments_support import authorize, card_token, merchant
from tests.running import IdSource, token_for


def _http(processor: Processor, tenant: str, scopes: tuple[str, ...]) -> httpx.AsyncClient:
    token = token_for(processor, scopes, tenant=tenant, subject="reader")
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                             headers={"Authorization": f"Bearer {token}"}, timeout=60)


async def test_a_tenant_reads_its_own_events_in_order_and_pages_on(
        processor: Processor, client: Client, ids: IdSource) -> None:
    scopes = ("payments:write", "payments:read", "events:read")
    async with _http(processor, "events-a", scopes) as alpha, \
            _http(processor, "events-b", scopes) as beta:
        # The merchants belong to the tenants that pay into them.
        a_client = Client("127.0.0.1", processor.rpc_port,
                          token_for(processor, tenant="events-a", subject="m"))
        b_client = Client("127.0.0.1", processor.rpc_port,
                          token_for(processor, tenant="events-b", subject="m"))
        async with a_client, b_client:
            a_account, b_account = await merchant(a_client, ids), await merchant(b_client, ids)
        start = (await alpha.get("/v1/events", params={"limit": 1000})).json()["next_cursor"]
        paid = []
        for _ in range(3):
            r = await authorize(alpha, a_account, token=card_token())
            assert r.status_code == 201, r.text
            paid.append(r.json()["id"])
        other = (await authorize(beta, b_account, token=card_token())).json()["id"]

        page = (await alpha.get("/v1/events", params={"after": start})).json()
        mine = [e for e in page["data"] if e["object_id"] in paid]
        assert [e["object_id"] for e in mine if e["type"] == "payment.authorized"] == paid
        assert all(e["object_id"] != other for e in page["data"])  # another tenant's: never
        ids_seen = [e["id"] for e in page["data"]]
        assert ids_seen == sorted(ids_seen) and page["next_cursor"] == str(ids_seen[-1])
        assert all(e["data"]["id"] == e["object_id"] and "payment_method" not in e["data"]
                   for e in page["data"])
        # Paging: one at a time from the same cursor gives the same events, and the end of
        # the stream gives none and keeps the cursor.
        cursor, walked = start, []
        while True:
            step = (await alpha.get("/v1/events", params={"after": cursor, "limit": 1})).json()
            if not step["data"]:
                assert step["next_cursor"] == cursor
                break
            walked += step["data"]
            cursor = step["next_cursor"]
        assert [e["id"] for e in walked] == ids_seen
        authorized = (await alpha.get("/v1/events", params={
            "after": start, "type": "payment.authorized"})).json()["data"]
        assert {e["object_id"] for e in authorized} == set(paid)


async def test_the_query_is_checked_and_the_scope_needed(processor: Processor) -> None:
    async with _http(processor, "events-c", ("events:read",)) as reader, \
            _http(processor, "events-c", ("payments:read",)) as no_scope:
        for params in ({"after": "-1"}, {"limit": "0"}, {"limit": "1001"},
                       {"type": "Payment Captured"}, {"cursor": "1"}, {"after": "1.5"}):
            r = await reader.get("/v1/events", params=params)
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_query"), params
        r = await reader.get("/v1/events?after=1&after=2")
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_query")
        r = await no_scope.get("/v1/events")
        assert (r.status_code, r.json()["error"]["code"]) == (403, "scope_missing")


async def test_rpc_reads_the_same_stream(processor: Processor) -> None:
    async with _http(processor, "events-d", ("events:read",)) as reader:
        over_http = (await reader.get("/v1/events", params={"limit": 5})).json()
    async with Client("127.0.0.1", processor.rpc_port,
                      token_for(processor, ("events:read",), tenant="events-d",
                                subject="reader")) as rpc:
        answer = await rpc.payment_call("list_events", body={"limit": 5})
    assert answer.status == 200
    assert answer.body == over_http
