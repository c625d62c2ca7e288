"""Per-tenant account quotas (``--max-accounts-per-tenant``) over real HTTP and RPC.

A front with a quota of 3 beside the session's own. Each test uses a tenant of its own, so
the counts in ``tenant_accounts`` start from zero.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from actors.app.runtime import Processor
from processor.client import Client, ClientError
from processor.codes import AccountResult
from processor.identity import tenant_slot
from processor.types import Account
from tests.running import ExtraFront, IdSource, extra_front, token_for

QUOTA = 3


@pytest.fixture(scope="module")
async def front(processor: Processor) -> AsyncIterator[ExtraFront]:
    async with extra_front(processor, accounts_per_tenant_max=QUOTA) as started:
        yield started


def _tenant() -> str:
    return f"quota-{uuid.uuid4().hex[:10]}"


def _http(front: ExtraFront, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.http_port}",
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)


async def test_http_creates_up_to_the_quota_then_refuses_with_nothing_written(
    processor: Processor, front: ExtraFront, ids: IdSource
) -> None:
    tenant = _tenant()
    token = token_for(processor, tenant=tenant, subject="q1")
    a, b, c, d, e = ids.take(5)
    async with _http(front, token) as http:
        r = await http.post("/v1/accounts/batch",
                            json={"accounts": [{"id": a, "currency": "EUR"},
                                               {"id": b, "currency": "EUR"}]})
        assert r.status_code == 200, r.text
        # Two more would make four: the whole batch is refused, and neither is created.
        r = await http.post("/v1/accounts/batch",
                            json={"accounts": [{"id": c, "currency": "EUR"},
                                               {"id": d, "currency": "EUR"}]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "account_quota_exceeded"
        for missing in (c, d):
            assert (await http.get(f"/v1/accounts/{missing}")).status_code == 404
        # The third fits; a fourth does not.
        assert (await http.post("/v1/accounts", json={"id": c, "currency": "EUR"})
                ).status_code == 201
        r = await http.post("/v1/accounts", json={"id": e, "currency": "EUR"})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "account_quota_exceeded")
        assert (await http.get(f"/v1/accounts/{e}")).status_code == 404
        # At the quota, retrying a stored create is still answered as stored.
        r = await http.post("/v1/accounts", json={"id": a, "currency": "EUR"})
        assert r.status_code == 200, r.text


async def test_refusals_give_their_reservations_back(
    processor: Processor, front: ExtraFront, ids: IdSource
) -> None:
    """Accounts that were not created (stored already, or refused) do not use the quota."""
    tenant = _tenant()
    token = token_for(processor, tenant=tenant, subject="q2")
    a, b, c = ids.take(3)
    async with _http(front, token) as http:
        assert (await http.post("/v1/accounts", json={"id": a, "currency": "EUR"})
                ).status_code == 201
        for _ in range(3):  # replays answered "exists" must not count
            assert (await http.post("/v1/accounts", json={"id": a, "currency": "EUR"})
                    ).status_code == 200
        # A refused one (another currency under a stored id) must not count either.
        assert (await http.post("/v1/accounts", json={"id": a, "currency": "USD"})
                ).status_code == 409
        r = await http.post("/v1/accounts/batch",
                            json={"accounts": [{"id": b, "currency": "EUR"},
                                               {"id": c, "currency": "EUR"}]})
        assert r.status_code == 200, r.text
        assert [x["status"] for x in r.json()["results"]] == ["created", "created"]


async def test_rpc_counts_per_tenant_and_answers_the_same_code(
    processor: Processor, front: ExtraFront, ids: IdSource
) -> None:
    alpha, beta = _tenant(), _tenant()
    alpha_ids, beta_ids = ids.take(QUOTA + 1), ids.take(QUOTA)

    def accounts(tenant: str, batch: list[int]) -> list[Account]:
        slot = tenant_slot(tenant)  # the edge stamps the token's tenant whatever is sent
        return [Account(id=i, currency="EUR", tenant=slot) for i in batch]

    async with Client("127.0.0.1", front.rpc_port,
                      token_for(processor, tenant=alpha, subject="r")) as a_client, \
            Client("127.0.0.1", front.rpc_port,
                   token_for(processor, tenant=beta, subject="r")) as b_client:
        assert await a_client.create_accounts(accounts(alpha, alpha_ids[:QUOTA])) == [
            AccountResult.ok] * QUOTA
        with pytest.raises(ClientError) as refused:
            await a_client.create_accounts(accounts(alpha, alpha_ids[QUOTA:]))
        assert refused.value.code == "account_quota_exceeded"
        assert await a_client.lookup_accounts(alpha_ids[QUOTA:]) == [None]
        # Another tenant's quota is its own.
        assert await b_client.create_accounts(accounts(beta, beta_ids)) == [
            AccountResult.ok] * QUOTA


async def test_the_session_front_without_a_quota_is_unlimited(
    processor: Processor, ids: IdSource
) -> None:
    """The default (0) sets no quota: the session's own front takes more than three."""
    token = token_for(processor, tenant=_tenant(), subject="free")
    batch = ids.take(QUOTA + 2)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 headers={"Authorization": f"Bearer {token}"},
                                 timeout=30) as http:
        r = await http.post("/v1/accounts/batch",
                            json={"accounts": [{"id": i, "currency": "EUR"} for i in batch]})
    assert r.status_code == 200, r.text
    assert {x["status"] for x in r.json()["results"]} == {"created"}
