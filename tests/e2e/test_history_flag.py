"""The ``history`` account flag and the account-history indexer in a running processor.

The flag is accepted over RPC (the flags bitmask) and HTTP (the name ``history``) and shown
on lookups; the front's indexer catches up with what was committed, and a flagged
account's balances at an instant then come from its stored balances, equal to the replay.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx

from actors.app.runtime import Processor
from processor.client import Client
from processor.codes import AccountResult, TransferResult
from processor.history import balances_at, format_rfc3339_ns
from processor.types import Account, AccountFlags, Transfer
from tests.running import IdSource, token_for

HISTORY = int(AccountFlags.HISTORY)
CAUGHT_UP_WITHIN_S = 30.0


async def indexed_up_to(processor: Processor, at_ns: int) -> int:
    """Waits until the front's indexer has passed ``at_ns``; its position."""
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        deadline = time.monotonic() + CAUGHT_UP_WITHIN_S
        while True:
            position = int(await conn.fetchval(
                'SELECT "timestamp" FROM account_history_position'))
            if position >= at_ns or time.monotonic() > deadline:
                return position
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def test_history_flag_over_rpc_and_http_and_stored_balances(
        processor: Processor, client: Client, ids: IdSource) -> None:
    """Created with the flag over RPC and HTTP, both lookups show it; once indexed, the
    flagged account's balances at each of its movements equal the replay, over RPC and
    HTTP, and account_history holds its balances after every movement."""
    by_rpc, by_http, other = ids.take(3)
    assert await client.create_accounts([
        Account(id=by_rpc, currency="EUR", flags=HISTORY),
        Account(id=other, currency="EUR")]) == [AccountResult.ok] * 2
    async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{processor.http_port}", timeout=30,
            headers={"Authorization": f"Bearer {token_for(processor)}"}) as http:
        r = await http.post("/v1/accounts", json={
            "id": by_http, "currency": "EUR", "flags": ["history"]})
        assert r.status_code == 201, r.text
        looked = await http.get(f"/v1/accounts/{by_rpc}")
        assert looked.status_code == 200 and looked.json()["flags"] == ["history"]
        [rpc_view] = await client.lookup_accounts([by_http])
        assert rpc_view is not None and rpc_view.flags == HISTORY
        transfers = [Transfer(id=ids.one(), debit_account_id=d, credit_account_id=c,
                              amount=k + 1, currency="EUR")
                     for k, (d, c) in enumerate([(by_rpc, other), (other, by_rpc),
                                                 (by_http, by_rpc), (by_rpc, by_http)] * 3)]
        assert await client.create_transfers(transfers) == [TransferResult.ok] * 12
        committed = [t for t in await client.lookup_transfers([t.id for t in transfers])
                     if t is not None]
        assert len(committed) == 12
        last = max(t.timestamp for t in committed)
        assert await indexed_up_to(processor, last) >= last
        for t in committed:
            for account in (by_rpc, by_http):
                expected = balances_at(committed, [], account, t.timestamp)
                assert await client.get_account_balances(account, t.timestamp) == expected
            r = await http.get(f"/v1/accounts/{by_rpc}/balances",
                               params={"at": format_rfc3339_ns(t.timestamp)})
            want = balances_at(committed, [], by_rpc, t.timestamp)
            assert r.status_code == 200 and r.json()["credits_posted"] == want.credits_posted
            assert r.json()["debits_posted"] == want.debits_posted
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        rows = await conn.fetch(
            'SELECT account_id, "timestamp", debits_posted, credits_posted FROM '
            "account_history WHERE account_id = ANY($1::bigint[]) "
            'ORDER BY account_id, "timestamp", transfer_id', [by_rpc, by_http, other])
    finally:
        await conn.close()
    stored = [r for r in rows if r["account_id"] == by_rpc]
    assert len(stored) == 12 and len(rows) == 24
    for r in stored:
        want = balances_at(committed, [], by_rpc, r["timestamp"])
        assert (r["debits_posted"], r["credits_posted"]) == (want.debits_posted,
                                                             want.credits_posted)
    assert all(r["debits_posted"] is None for r in rows if r["account_id"] == other)
