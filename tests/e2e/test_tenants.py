"""Tenants over real HTTP and RPC: a token sees and moves only its own tenant's money.

Two tenants with two principals each. Whatever another tenant owns is answered exactly as
an unknown id (404 on reads, ``*_account_not_found`` on transfers), and an id another
tenant already took is a conflict that reveals nothing of its object.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from actors.app.runtime import Processor
from processor.batch import TransferBatch
from processor.client import Client
from processor.codes import AccountResult, TransferResult
from processor.types import Account, Transfer
from tests.running import IdSource, token_for

R = TransferResult


@dataclass
class Principal:
    http: httpx.AsyncClient
    rpc: Client


@pytest.fixture
async def principals(processor: Processor) -> AsyncIterator[dict[str, Principal]]:
    """a1, a2: two principals of tenant "alpha"; b1: one of tenant "beta"."""
    out: dict[str, Principal] = {}
    opened: list[Client] = []
    clients: list[httpx.AsyncClient] = []
    try:
        for name, tenant in (("a1", "alpha"), ("a2", "alpha"), ("b1", "beta")):
            token = token_for(processor, tenant=tenant, subject=name)
            http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                     headers={"Authorization": f"Bearer {token}"}, timeout=30)
            clients.append(http)
            rpc = Client("127.0.0.1", processor.rpc_port, token)
            await rpc.connect()
            opened.append(rpc)
            out[name] = Principal(http, rpc)
        yield out
    finally:
        for c in opened:
            await c.close()
        for h in clients:
            await h.aclose()


async def _account(p: Principal, account_id: int) -> None:
    r = await p.http.post("/v1/accounts", json={"id": account_id, "currency": "EUR"})
    assert r.status_code == 201, r.text


def _transfer(tid: int, debit: int, credit: int, amount: int = 5) -> dict[str, object]:
    return {"id": tid, "debit_account_id": debit, "credit_account_id": credit,
            "amount": amount, "currency": "EUR"}


async def test_another_tenants_accounts_and_transfers_are_unknown_over_http(
    principals: dict[str, Principal], ids: IdSource
) -> None:
    a1, a2, b1 = principals["a1"], principals["a2"], principals["b1"]
    alpha_x, alpha_y, beta_x = ids.take(3)
    unknown = ids.one()
    await _account(a1, alpha_x)
    await _account(a2, alpha_y)  # another principal of the same tenant
    await _account(b1, beta_x)
    # Reads: the same tenant's principals see each other's accounts; the other tenant gets
    # exactly what an unknown id gets.
    assert (await a2.http.get(f"/v1/accounts/{alpha_x}")).status_code == 200
    hidden = await b1.http.get(f"/v1/accounts/{alpha_x}")
    missing = await b1.http.get(f"/v1/accounts/{unknown}")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["code"] == missing.json()["error"]["code"] \
        == "account_not_found"
    # Writes: another tenant's account on either side is a missing account.
    tid = ids.one()
    r = await a1.http.post("/v1/transfers", json=_transfer(tid, alpha_x, alpha_y))
    assert r.status_code == 201, r.text
    for debit, credit, code in ((alpha_x, beta_x, "credit_account_not_found"),
                                (beta_x, alpha_x, "debit_account_not_found")):
        r = await a1.http.post("/v1/transfers", json=_transfer(ids.one(), debit, credit))
        assert (r.status_code, r.json()["error"]["code"]) == (422, code), r.text
        r = await b1.http.post("/v1/transfers", json=_transfer(ids.one(), credit, debit))
        assert r.status_code == 422, r.text
    # The transfer alpha made is alpha's alone to read.
    assert (await a2.http.get(f"/v1/transfers/{tid}")).status_code == 200
    r = await b1.http.get(f"/v1/transfers/{tid}")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "transfer_not_found")
    # Ids another tenant took are conflicts that compare nothing.
    r = await b1.http.post("/v1/accounts", json={"id": alpha_x, "currency": "EUR"})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "exists_with_different_tenant")
    r = await b1.http.post("/v1/transfers", json=_transfer(tid, alpha_x, alpha_y))
    assert (r.status_code, r.json()["error"]["code"]) == (409, "exists_with_different_tenant")
    # Batches are stamped the same way.
    r = await b1.http.post("/v1/transfers/batch", json={"transfers": [
        _transfer(ids.one(), alpha_x, alpha_y)]})
    assert r.json()["results"][0]["status"] == "debit_account_not_found", r.text
    balances = (await a1.http.get(f"/v1/accounts/{alpha_x}")).json()
    assert balances["debits_posted"] == 5 and balances["credits_posted"] == 0


async def test_another_tenants_accounts_and_transfers_are_unknown_over_rpc(
    principals: dict[str, Principal], ids: IdSource
) -> None:
    a1, b1 = principals["a1"].rpc, principals["b1"].rpc
    alpha_x, alpha_y, beta_x, beta_y = ids.take(4)
    assert await a1.create_accounts([Account(id=alpha_x, currency="EUR"),
                                     Account(id=alpha_y, currency="EUR")]) == \
        [AccountResult.ok] * 2
    # A tenant written by the client is ignored: the token's tenant is the one stored.
    assert await b1.create_accounts([Account(id=beta_x, currency="EUR", tenant=0),
                                     Account(id=beta_y, currency="EUR")]) == \
        [AccountResult.ok] * 2
    hidden, own = await b1.lookup_accounts([alpha_x, beta_x])
    assert hidden is None and own is not None and own.id == beta_x
    assert (await a1.lookup_accounts([beta_x])) == [None]
    tid = ids.one()
    assert await a1.create_transfers([Transfer(id=tid, debit_account_id=alpha_x,
                                               credit_account_id=alpha_y, amount=3,
                                               currency="EUR", tenant=0)]) == [R.ok]
    assert await b1.lookup_transfers([tid]) == [None]
    [mine] = await a1.lookup_transfers([tid])
    assert mine is not None and mine.amount == 3
    assert await b1.create_transfers([Transfer(id=ids.one(), debit_account_id=alpha_x,
                                               credit_account_id=beta_x, amount=1,
                                               currency="EUR")]) == [R.debit_account_not_found]
    # The columnar batch (the gateways' fast path) is checked in the kernel: a mixed batch
    # of the tenant's own and another's accounts.
    batch_ids = ids.take(3)
    codes = await b1.create_transfers(TransferBatch.from_arrays(
        id=batch_ids, debit_account_id=[beta_x, beta_x, alpha_x],
        credit_account_id=[beta_y, alpha_y, beta_y], amount=[1, 1, 1], currency="EUR"))
    assert codes.tolist() == [R.ok, R.credit_account_not_found, R.debit_account_not_found]
    [x] = await a1.lookup_accounts([alpha_x])
    assert x is not None and x.debits_posted == 3
