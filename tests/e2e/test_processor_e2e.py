"""End to end: the real processor (Ray shards, PostgreSQL) over real RPC and HTTP sockets."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import numpy as np
import pytest

from actors.app.runtime import Processor
from processor.batch import TransferBatch
from processor.client import Client
from processor.codes import AccountResult, TransferResult
from processor.ledger.columnar import PLAIN_BATCH_MIN
from processor.types import Account, AccountFlags, Transfer, TransferFlags
from tests.running import IdSource, token_for

R = TransferResult
LIMITED = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
PENDING = int(TransferFlags.PENDING)
POST = int(TransferFlags.POST_PENDING)
VOID = int(TransferFlags.VOID_PENDING)
LINKED = int(TransferFlags.LINKED)


def _on_other_shards(processor: Processor, ids: IdSource) -> tuple[int, int]:
    """Two fresh account ids owned by different shards (a cross-shard pair)."""
    from processor.ledger import PartitionMap

    pm = PartitionMap.uniform(processor.config.shard.shards)
    a = ids.one()
    b = ids.one()
    while pm.shard_of(b) == pm.shard_of(a):
        b = ids.one()
    return a, b


async def _accounts(client: Client, *accounts: Account) -> None:
    assert await client.create_accounts(list(accounts)) == [AccountResult.ok] * len(accounts)


async def test_transfer_rules_hold_across_shards_over_rpc(
    processor: Processor, ids: IdSource, client: Client
) -> None:
    """A debit-limited customer on one shard paying one on another is limited and exact."""
    bank, alice = _on_other_shards(processor, ids)
    bob = ids.one()
    await _accounts(client, Account(id=bank, currency="EUR"),
                    Account(id=alice, currency="EUR", flags=LIMITED),
                    Account(id=bob, currency="EUR", flags=LIMITED))
    fund, pay, too_much = ids.take(3)
    # Funds from another shard are spendable once their transfer is acknowledged.
    assert await client.create_transfers([
        Transfer(id=fund, debit_account_id=bank, credit_account_id=alice, amount=1_000,
                 currency="EUR")]) == [R.ok]
    codes = await client.create_transfers([
        Transfer(id=pay, debit_account_id=alice, credit_account_id=bob, amount=600,
                 currency="EUR"),
        Transfer(id=too_much, debit_account_id=alice, credit_account_id=bob, amount=401,
                 currency="EUR"),
    ])
    assert codes == [R.ok, R.exceeds_credits]
    a, b = await client.lookup_accounts([alice, bob])
    assert a is not None and b is not None
    assert (a.credits_posted, a.debits_posted) == (1_000, 600)
    assert b.credits_posted == 600
    # The refused id is burned: even with enough funds now, it never succeeds.
    again = await client.create_transfers([
        Transfer(id=too_much, debit_account_id=alice, credit_account_id=bob, amount=1,
                 currency="EUR")])
    assert again == [R.id_already_failed]
    replay = await client.create_transfers([
        Transfer(id=pay, debit_account_id=alice, credit_account_id=bob, amount=600,
                 currency="EUR"),
        Transfer(id=pay, debit_account_id=alice, credit_account_id=bob, amount=601,
                 currency="EUR"),
    ])
    assert replay == [R.exists, R.exists_with_different_amount]
    assert (await client.lookup_accounts([alice]))[0] == a
    # The legs written for other shards' accounts are folded into their rows by the owners.
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        # Each shard folds at its own checkpoint, so the row may hold one leg before the
        # other: wait for both (on a loaded machine a checkpoint can take seconds).
        for _ in range(300):
            left = await conn.fetchval(
                "SELECT count(*) FROM remote_postings_unfolded "
                "WHERE account_id = ANY($1::bigint[])",
                [bank, alice, bob])
            row = await conn.fetchrow("SELECT credits_posted, debits_posted FROM accounts "
                                      "WHERE id = $1", alice)
            if left == 0 and (row["credits_posted"], row["debits_posted"]) == (1_000, 600):
                break
            await asyncio.sleep(0.1)
        assert left == 0
        assert (row["credits_posted"], row["debits_posted"]) == (1_000, 600)
    finally:
        await conn.close()


async def test_a_linked_chain_can_spend_what_it_moved_across_shards(
    processor: Processor, ids: IdSource, client: Client
) -> None:
    """Within one request, funding from another shard is spendable by a linked transfer."""
    bank, carol = _on_other_shards(processor, ids)
    dave = ids.one()
    await _accounts(client, Account(id=bank, currency="EUR"),
                    Account(id=carol, currency="EUR", flags=LIMITED),
                    Account(id=dave, currency="EUR"))
    fund, spend = ids.take(2)
    codes = await client.create_transfers([
        Transfer(id=fund, debit_account_id=bank, credit_account_id=carol, amount=300,
                 currency="EUR", flags=LINKED),
        Transfer(id=spend, debit_account_id=carol, credit_account_id=dave, amount=300,
                 currency="EUR"),
    ])
    assert codes == [R.ok, R.ok]
    c = (await client.lookup_accounts([carol]))[0]
    assert c is not None and (c.credits_posted, c.debits_posted) == (300, 300)


async def test_two_phase_hold_post_void_and_expiry(
    processor: Processor, ids: IdSource, client: Client
) -> None:
    """A hold counts at once, posts partially, voids once, and expires by its timeout."""
    bank, shop = _on_other_shards(processor, ids)
    await _accounts(client, Account(id=bank, currency="USD"),
                    Account(id=shop, currency="USD"))
    hold, post, hold2, void, hold3, late = ids.take(6)

    def t(tid: int, amount: int, flags: int = 0, pending_id: int = 0, timeout_s: int = 0
          ) -> Transfer:
        return Transfer(id=tid, debit_account_id=bank, credit_account_id=shop, amount=amount,
                        currency="USD", flags=flags, pending_id=pending_id, timeout_s=timeout_s)

    assert await client.create_transfers([t(hold, 500, PENDING)]) == [R.ok]
    s = (await client.lookup_accounts([shop]))[0]
    assert s is not None and (s.credits_pending, s.credits_posted) == (500, 0)
    assert await client.create_transfers([t(post, 300, POST, hold)]) == [R.ok]
    assert await client.create_transfers([t(ids.one(), 300, POST, hold)]) == [
        R.pending_transfer_already_posted]
    s = (await client.lookup_accounts([shop]))[0]
    assert s is not None and (s.credits_pending, s.credits_posted) == (0, 300)
    assert await client.create_transfers([t(hold2, 50, PENDING),
                                          t(void, 50, VOID, hold2)]) == [R.ok, R.ok]
    assert await client.create_transfers([t(ids.one(), 50, VOID, hold2)]) == [
        R.pending_transfer_already_voided]
    assert await client.create_transfers([t(hold3, 70, PENDING, timeout_s=1)]) == [R.ok]
    await asyncio.sleep(1.6)
    assert await client.create_transfers([t(late, 70, POST, hold3)]) == [
        R.pending_transfer_expired]
    b, s = await client.lookup_accounts([bank, shop])
    assert b is not None and s is not None
    assert (b.debits_pending, b.debits_posted) == (0, 300)
    assert (s.credits_pending, s.credits_posted) == (0, 300)


async def test_linked_chain_across_shards_fails_whole(
    processor: Processor, ids: IdSource, client: Client
) -> None:
    """A linked chain with one refused transfer leaves no trace of the others."""
    a, b = _on_other_shards(processor, ids)
    c = ids.one()
    await _accounts(client, Account(id=a, currency="EUR"),
                    Account(id=b, currency="EUR", flags=LIMITED),
                    Account(id=c, currency="EUR"))
    t1, t2 = ids.take(2)
    codes = await client.create_transfers([
        Transfer(id=t1, debit_account_id=a, credit_account_id=b, amount=10, currency="EUR",
                 flags=LINKED),
        Transfer(id=t2, debit_account_id=b, credit_account_id=c, amount=11, currency="EUR"),
    ])
    assert codes == [R.linked_event_failed, R.exceeds_credits]
    assert await client.lookup_transfers([t1, t2]) == [None, None]
    accounts = await client.lookup_accounts([a, b, c])
    assert all(x is not None and x.debits_posted == x.credits_posted == 0 for x in accounts)


@pytest.fixture
async def http(processor: Processor) -> httpx.AsyncClient:
    token = token_for(processor)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


async def test_http_status_codes_over_real_sockets(
    processor: Processor, ids: IdSource, http: httpx.AsyncClient
) -> None:
    """The HTTP API answers 201/200/409/422/404 from the real ledger."""
    a, b = ids.take(2)
    r = await http.post("/v1/accounts", json={"id": a, "currency": "EUR",
                                              "flags": ["debits_must_not_exceed_credits"]})
    assert r.status_code == 201, r.text
    assert (await http.post("/v1/accounts", json={"id": a, "currency": "EUR", "flags": [
        "debits_must_not_exceed_credits"]})).status_code == 200
    assert (await http.post("/v1/accounts", json={"id": a, "currency": "USD", "flags": [
        "debits_must_not_exceed_credits"]})).status_code == 409
    assert (await http.post("/v1/accounts", json={"id": b, "currency": "EUR"})).status_code == 201
    tid = ids.one()
    body = {"id": tid, "debit_account_id": b, "credit_account_id": a, "amount": 250,
            "currency": "EUR"}
    r = await http.post("/v1/transfers", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["amount"] == 250 and r.json()["timestamp"] > 0
    assert (await http.post("/v1/transfers", json=body)).status_code == 200
    assert (await http.post("/v1/transfers", json={**body, "amount": 1})).status_code == 409
    r = await http.post("/v1/transfers", json={**body, "id": ids.one(), "debit_account_id": a,
                                               "credit_account_id": b, "amount": 251})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "exceeds_credits"
    got = await http.get(f"/v1/accounts/{a}")
    assert got.status_code == 200 and got.json()["credits_posted"] == 250
    assert (await http.get(f"/v1/transfers/{tid}")).json()["id"] == tid
    assert (await http.get(f"/v1/transfers/{ids.one()}")).status_code == 404
    assert (await http.get("/healthz")).status_code == 200
    assert (await http.get("/readyz")).status_code == 200
    assert processor.extra["front_event_loop"].startswith("uvloop")


@pytest.mark.parametrize(
    ("mutation", "status", "code"),
    [
        ({"amount": 1.5}, 400, "invalid_body"),
        ({"amount": -1}, 400, "invalid_body"),
        ({"amount": 2**63}, 400, "invalid_body"),
        ({"amount": "10"}, 400, "invalid_body"),
        ({"extra": 1}, 400, "invalid_body"),
        ({"amount": 0}, 422, "amount_must_not_be_zero"),
        ({"currency": "XXZ"}, 422, "currency_unknown"),
    ],
)
async def test_bad_batch_item_writes_nothing(
    processor: Processor, ids: IdSource, http: httpx.AsyncClient, client: Client,
    mutation: dict[str, object], status: int, code: str,
) -> None:
    """A malformed item is a clear 4xx and never a partial write of its batch."""
    a, b = ids.take(2)
    await _accounts(client, Account(id=a, currency="EUR"), Account(id=b, currency="EUR"))
    good, bad = ids.take(2)
    item = {"debit_account_id": a, "credit_account_id": b, "amount": 5, "currency": "EUR"}
    if status == 400:
        r = await http.post("/v1/transfers/batch", json={"transfers": [
            {**item, "id": good}, {**item, "id": bad, **mutation}]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == code
        assert await client.lookup_transfers([good, bad]) == [None, None]
    else:
        r = await http.post("/v1/transfers", json={**item, "id": bad, **mutation})
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code
    assert (await http.get("/healthz")).status_code == 200


async def test_http_auth_is_enforced(processor: Processor) -> None:
    """No token is 401, a forged one is 401, a token without the scope is 403."""
    base = f"http://127.0.0.1:{processor.http_port}"
    read_only = token_for(processor, ("accounts:read",))
    async with httpx.AsyncClient(base_url=base) as c:
        assert (await c.get("/v1/accounts/1")).status_code == 401
        forged = read_only[:-4] + ("AAAA" if not read_only.endswith("AAAA") else "BBBB")
        r = await c.get("/v1/accounts/1", headers={"Authorization": f"Bearer {forged}"})
        assert r.status_code == 401
        r = await c.post("/v1/accounts", json={"id": 1, "currency": "EUR"},
                         headers={"Authorization": f"Bearer {read_only}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "scope_missing"


async def test_many_single_requests_are_micro_batched(
    processor: Processor, ids: IdSource, http: httpx.AsyncClient
) -> None:
    """Hundreds of concurrent single HTTP transfers all commit, in fewer shard commits."""
    a, b = ids.take(2)
    for x in (a, b):
        assert (await http.post("/v1/accounts", json={"id": x, "currency": "EUR"})
                ).status_code == 201
    before = sum(s["commits"] for s in await asyncio.gather(
        *[s.stats.remote() for s in processor.shards]))
    transfer_ids = ids.take(300)
    responses = await asyncio.gather(*[
        http.post("/v1/transfers", json={"id": t, "debit_account_id": a,
                                         "credit_account_id": b, "amount": 1,
                                         "currency": "EUR"})
        for t in transfer_ids])
    assert [r.status_code for r in responses] == [201] * 300
    after = sum(s["commits"] for s in await asyncio.gather(
        *[s.stats.remote() for s in processor.shards]))
    assert after - before < 300
    got = (await http.get(f"/v1/accounts/{b}")).json()
    assert got["credits_posted"] == 300


async def test_transfer_batches_over_columns_answer_like_lists(
    processor: Processor, ids: IdSource, client: Client
) -> None:
    """A TransferBatch crosses shards as columns and gets the codes a list gets: limits in
    order, static rules, missing accounts; sent again it answers exists and moves nothing; a
    batch with two-phase flags takes the general path with the same contract."""
    bank, alice = _on_other_shards(processor, ids)
    bob = ids.one()
    missing = ids.one()
    await _accounts(client, Account(id=bank, currency="EUR"),
                    Account(id=alice, currency="EUR", flags=LIMITED),
                    Account(id=bob, currency="EUR"))
    # Funds moved on another shard are spendable once acknowledged (docs/api.md, "Order
    # within a request"), so alice is funded first.
    fund = TransferBatch.from_arrays(id=ids.take(1), debit_account_id=[bank],
                                     credit_account_id=[alice], amount=[1_000], currency="EUR")
    assert (await client.create_transfers(fund)).tolist() == [R.ok]
    t = ids.take(6)
    batch = TransferBatch.from_arrays(
        id=t, debit_account_id=[bank, alice, alice, alice, bob, missing],
        credit_account_id=[bob, bob, bob, alice, bank, bob],
        amount=[1, 600, 401, 5, 7, 1], currency="EUR", code=[1, 2, 3, 4, 5, 6])
    codes = await client.create_transfers(batch)
    assert codes.dtype == np.uint8
    assert [R(c) for c in codes.tolist()] == [
        R.ok, R.ok, R.exceeds_credits, R.accounts_must_be_different, R.ok,
        R.debit_account_not_found]
    stored = await client.lookup_transfers(t)
    assert [s.code if s else None for s in stored] == [1, 2, None, None, 5, None]
    before = await client.lookup_accounts([bank, alice, bob])
    again = await client.create_transfers(batch)
    assert [R(c) for c in again.tolist()] == [
        R.exists, R.exists, R.id_already_failed, R.accounts_must_be_different, R.exists,
        R.id_already_failed]
    assert await client.lookup_accounts([bank, alice, bob]) == before
    hold, post = ids.take(2)
    two_phase = TransferBatch.from_arrays(
        id=[hold, post], debit_account_id=[bank, bank], credit_account_id=[bob, bob],
        amount=[50, 20], currency="EUR", flags=[PENDING, POST], pending_id=[0, hold])
    assert [R(c) for c in (await client.create_transfers(two_phase)).tolist()] == [R.ok, R.ok]
    b = (await client.lookup_accounts([bob]))[0]
    assert b is not None and (b.credits_pending, b.credits_posted) == (0, 1 + 600 + 20)


@pytest.mark.parametrize("size", [1, PLAIN_BATCH_MIN])
async def test_short_columnar_batches_take_the_rules_and_answer_alike(
    processor: Processor, ids: IdSource, client: Client, size: int
) -> None:
    """A columnar batch shorter than ``plain_batch_min`` (a single transfer, as most HTTP
    requests and payments' postings are) is evaluated by the general rules, a longer one
    over columns; both answer the same codes, limits in order, across shards."""
    from processor.ledger import PartitionMap

    bank, alice = _on_other_shards(processor, ids)
    bob = ids.one()
    await _accounts(client, Account(id=bank, currency="EUR"),
                    Account(id=alice, currency="EUR", flags=LIMITED),
                    Account(id=bob, currency="EUR"))
    fund = TransferBatch.from_arrays(id=ids.take(1), debit_account_id=[bank],
                                     credit_account_id=[alice], amount=[size],
                                     currency="EUR")
    assert (await client.create_transfers(fund)).tolist() == [R.ok]
    shard = processor.shards[PartitionMap.uniform(processor.config.shard.shards)
                             .shard_of(alice)]
    before = (await shard.stats.remote())["plain_batches"]
    batch = TransferBatch.from_arrays(id=ids.take(size), debit_account_id=[alice] * size,
                                      credit_account_id=[bob] * size,
                                      amount=[1] * (size - 1) + [2], currency="EUR")
    codes = [R(c) for c in (await client.create_transfers(batch)).tolist()]
    assert codes == [R.ok] * (size - 1) + [R.exceeds_credits]
    columnar = (await shard.stats.remote())["plain_batches"] - before
    assert columnar == (0 if size < PLAIN_BATCH_MIN else 1)
    a, b = await client.lookup_accounts([alice, bob])
    assert a is not None and b is not None
    assert (a.debits_posted, b.credits_posted) == (size - 1, size - 1)


async def test_an_id_taken_on_one_shard_is_refused_on_another(
    processor: Processor, ids: IdSource, client: Client
) -> None:
    """An id stored or burned by one shard and sent again at once with a debit account on
    another shard (which may not have read it back yet) is answered as taken, never stored
    twice: the commit-time checks stop it, and the shard reads the id after it restarts."""
    a0, a1 = _on_other_shards(processor, ids)
    b0, b1 = ids.take(2)
    await _accounts(client, Account(id=a0, currency="EUR", flags=LIMITED),
                    Account(id=a1, currency="EUR"), Account(id=b0, currency="EUR"),
                    Account(id=b1, currency="EUR"))
    burned, stored = ids.take(2)
    assert await client.create_transfers([
        Transfer(id=burned, debit_account_id=a0, credit_account_id=b0, amount=5,
                 currency="EUR"),
        Transfer(id=stored, debit_account_id=b0, credit_account_id=a0, amount=5,
                 currency="EUR"),
    ]) == [R.exceeds_credits, R.ok]
    again = await client.create_transfers([
        Transfer(id=burned, debit_account_id=a1, credit_account_id=b1, amount=5,
                 currency="EUR"),
        Transfer(id=stored, debit_account_id=a1, credit_account_id=b1, amount=5,
                 currency="EUR"),
    ])
    assert again == [R.id_already_failed, R.exists_with_different_debit_account_id]
    t_burned, t_stored = await client.lookup_transfers([burned, stored])
    assert t_burned is None
    assert t_stored is not None and t_stored.debit_account_id == b0
