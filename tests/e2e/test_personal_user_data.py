"""Personal user_data over the real stack (docs/design.md §17, actors/edge/personal.py): a
tenant marked with `txproc tenants personal-user-data` writes accounts and transfers with
user_data over RPC (objects and columns) and HTTP; the ledger's rows hold only pseudonyms
while every read (lookups, history, query, stream, HTTP) shows the values; `txproc erase`
of one subject empties its values everywhere and leaves the other's, the amounts and
`txproc verify` whole; an unmarked tenant's user_data is stored as sent."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid

import asyncpg
import httpx

from actors.app.runtime import Processor
from actors.app.verification import verify_all
from processor import Account, Transfer
from processor.batch import TransferBatch
from processor.client import Client
from processor.codes import AccountResult, TransferResult
from processor.identity import tenant_slot
from processor.privacy import key_id_of
from tests.running import IdSource, token_for

ALICE = "alice@example.org"
BOB = "Bob Smith, 12 Rue de la Paix"


def _txproc(processor: Processor, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "actors.app.cli", *args, "--data-dir",
         processor.config.data_dir, "--database-url", processor.admin_database_url],
        capture_output=True, text=True, timeout=120, check=False)


async def _stored(processor: Processor, table: str, ids: list[int]) -> dict[int, str]:
    conn = await asyncpg.connect(processor.admin_database_url)
    try:
        rows = await conn.fetch(f"SELECT id, user_data FROM {table} "
                                "WHERE id = ANY($1::bigint[])", ids)
    finally:
        await conn.close()
    return {r["id"]: r["user_data"] for r in rows}


async def _until_marked(processor: Processor, client: Client, ids: IdSource) -> None:
    """Until this front stores pseudonyms for the tenant (it reads the list every few
    seconds): probe accounts, each a new id, until one is stored as a pseudonym."""
    deadline = time.monotonic() + 60
    while True:
        probe = ids.one()
        assert await client.create_accounts([Account(id=probe, currency="EUR",
                                                     user_data="probe")]) == [AccountResult.ok]
        if key_id_of((await _stored(processor, "accounts", [probe]))[probe]) is not None:
            return
        assert time.monotonic() < deadline, "the front never saw the tenant marked"
        await asyncio.sleep(0.5)


async def test_personal_user_data_is_pseudonymized_read_back_and_erased(
        processor: Processor, ids: IdSource) -> None:
    tenant = f"personal-{uuid.uuid4().hex[:8]}"
    other = f"plain-{uuid.uuid4().hex[:8]}"
    marked = _txproc(processor, "tenants", "personal-user-data", "--tenant", tenant)
    assert marked.returncode == 0 and "personal from now on" in marked.stdout, marked.stderr
    again = _txproc(processor, "tenants", "personal-user-data", "--tenant", tenant)
    assert again.returncode == 0 and "marked personal before" in again.stdout
    token = token_for(processor, tenant=tenant, subject="gw")
    async with Client("127.0.0.1", processor.rpc_port, token) as client:
        await _until_marked(processor, client, ids)
        a, b, c = ids.take(3)
        assert await client.create_accounts([
            Account(id=a, currency="EUR", user_data=ALICE),
            Account(id=b, currency="EUR", user_data=BOB),
            Account(id=c, currency="EUR")]) == [AccountResult.ok] * 3
        t1, t2, t3, t4, t5 = ids.take(5)
        assert await client.create_transfers([
            Transfer(id=t1, debit_account_id=a, credit_account_id=b, amount=10,
                     currency="EUR", user_data=ALICE),
            Transfer(id=t2, debit_account_id=b, credit_account_id=c, amount=7,
                     currency="EUR", user_data=BOB)]) == [TransferResult.ok] * 2
        codes = await client.create_transfers(TransferBatch.from_transfers([
            Transfer(id=t3, debit_account_id=c, credit_account_id=a, amount=3,
                     currency="EUR", user_data=ALICE),
            Transfer(id=t4, debit_account_id=c, credit_account_id=b, amount=1,
                     currency="EUR")]))
        assert codes.tolist() == [TransferResult.ok] * 2
        # A retry of the same transfer is the same transfer (its pseudonym is the same).
        assert await client.create_transfers([
            Transfer(id=t1, debit_account_id=a, credit_account_id=b, amount=10,
                     currency="EUR", user_data=ALICE)]) == [TransferResult.exists]
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                             headers={"Authorization": f"Bearer {token}"}, timeout=60)
    async with http:
        r = await http.post("/v1/transfers", json={
            "id": t5, "debit_account_id": b, "credit_account_id": a, "amount": 2,
            "currency": "EUR", "user_data": ALICE})
        assert r.status_code == 201 and r.json()["user_data"] == ALICE, r.text

        # The ledger's rows hold pseudonyms only; the same subject, the same pseudonym.
        transfers = await _stored(processor, "transfers", [t1, t2, t3, t4, t5])
        accounts = await _stored(processor, "accounts", [a, b, c])
        assert all(key_id_of(transfers[t]) is not None for t in (t1, t2, t3, t5))
        assert transfers[t4] == "" and accounts[c] == ""
        assert transfers[t1] == transfers[t3] == transfers[t5] == accounts[a] != transfers[t2]
        assert accounts[b] == transfers[t2]

        async with Client("127.0.0.1", processor.rpc_port, token) as client:
            async def views() -> dict[int, str]:
                seen = {t.id: t.user_data for t in await client.lookup_transfers(
                    [t1, t2, t3, t4, t5]) if t is not None}
                seen.update({x.id: x.user_data for x in await client.lookup_accounts(
                    [a, b, c]) if x is not None})
                return seen

            assert await views() == {t1: ALICE, t2: BOB, t3: ALICE, t4: "", t5: ALICE,
                                     a: ALICE, b: BOB, c: ""}
            deadline = time.monotonic() + 30
            while True:  # history shows a commit once the shard's checkpoint passed it
                history = {t.id: t.user_data for t in (
                    await client.get_account_transfers(a)).data}
                if len(history) == 3 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert history == {t1: ALICE, t3: ALICE, t5: ALICE}
            by_alice = await client.query_transfers(user_data=ALICE)
            assert sorted(t.id for t in by_alice.data) == sorted([t1, t3, t5])
            streamed: dict[int, str] = {}
            after = ""
            for _ in range(200):
                page = await client.stream_transfers(after, limit=1000)
                streamed.update((t.id, t.user_data) for t in page.data)
                after = page.next_cursor
                if not page.data:
                    break
            assert {t: streamed.get(t) for t in (t1, t2, t3, t4, t5)} == {
                t1: ALICE, t2: BOB, t3: ALICE, t4: "", t5: ALICE}
            got = (await http.get(f"/v1/transfers/{t2}")).json()
            assert got["user_data"] == BOB
            listed = (await http.get(f"/v1/accounts/{a}/transfers")).json()
            assert {x["id"]: x["user_data"] for x in listed["data"]} == {
                t1: ALICE, t3: ALICE, t5: ALICE}

            erased = _txproc(processor, "erase", "--tenant", tenant, "--subject-ref", ALICE)
            assert erased.returncode == 0, erased.stderr
            assert "1 personal user_data value(s) deleted" in erased.stdout
            # Alice's values are gone from every read at once; Bob's stay; so does money.
            assert await views() == {t1: "", t2: BOB, t3: "", t4: "", t5: "", a: "",
                                     b: BOB, c: ""}
            assert (await http.get(f"/v1/transfers/{t1}")).json()["user_data"] == ""
            assert (await client.query_transfers(user_data=ALICE)).data == []
            [account_a] = await client.lookup_accounts([a])
            assert account_a is not None
            assert (account_a.debits_posted, account_a.credits_posted) == (10, 5)
            # The same value sent after the erasure never brings the erased rows back: a
            # front that still trusts its cached key (up to 30 s, actors/subjects.py) writes
            # it under the destroyed key, where it reads as erased; after that, it is a new
            # subject with a new pseudonym.
            t6 = ids.one()
            assert await client.create_transfers([
                Transfer(id=t6, debit_account_id=a, credit_account_id=c, amount=1,
                         currency="EUR", user_data=ALICE)]) == [TransferResult.ok]
            stored_t6 = (await _stored(processor, "transfers", [t6]))[t6]
            [t6_view, t1_view] = await client.lookup_transfers([t6, t1])
            assert t6_view is not None and t1_view is not None and t1_view.user_data == ""
            if stored_t6 == transfers[t1]:
                assert t6_view.user_data == ""
                assert (await client.query_transfers(user_data=ALICE)).data == []
            else:
                assert t6_view.user_data == ALICE
                assert [t.id for t in (await client.query_transfers(
                    user_data=ALICE)).data] == [t6]

    # Another tenant's user_data is stored as sent.
    async with Client("127.0.0.1", processor.rpc_port,
                      token_for(processor, tenant=other, subject="gw")) as plain:
        d = ids.one()
        assert await plain.create_accounts([Account(id=d, currency="EUR",
                                                     user_data=ALICE)]) == [AccountResult.ok]
        assert (await _stored(processor, "accounts", [d]))[d] == ALICE
        assert (await plain.lookup_accounts([d]))[0].user_data == ALICE  # type: ignore[union-attr]

    # Nothing the ledger's chain covers changed.
    result = await verify_all(processor.admin_database_url)
    assert result.report.ok, result.report.problems
    assert tenant_slot(tenant) != tenant_slot(other)
