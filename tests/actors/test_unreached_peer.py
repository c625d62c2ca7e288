"""A shard whose peer stays unreachable through a reservation fails only the legs sent to
that peer, and does not restart (actors/ledger/shard.py ``_reserve_remote``).

The peer (shard 1) is SIGKILLed with its epoch row locked, so its successor's recovery
blocks and it stays unreachable through the coordinator's whole peer-call timeout. A batch
coordinated by shard 0 with one transfer inside shard 0 and one crediting shard 1 must
answer ``ok`` and ``not_applied`` (and a request of that transfer alone fails whole as
``unavailable``, retryable); shard 0 keeps its process and epoch; the transfer left
not applied is neither stored nor burned and goes through once the peer is back, once; and
the ledger's audit passes. Before this, shard 0 restarted itself, and every shard that
traded with the peer did the same (docs/design.md §11, "Restarts stay local").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import asyncpg
import pytest

from actors.app.runtime import Processor
from actors.ledger.store import LedgerStore
from processor.client import Client
from processor.codes import AccountResult, TransferResult
from processor.errors import LedgerError
from processor.types import Account, Transfer
from tests.actors.test_partial_answers import _healthy, _on_shard
from tests.running import IdSource, token_for

pytestmark = pytest.mark.asyncio


async def _identity(processor: Processor, shard: int) -> tuple[int, int]:
    """(pid, epoch) of a shard's current incarnation."""
    handle = processor.shards[shard]
    stats = await handle.stats.remote()
    return int(stats["pid"]), int(await handle.ready.remote())


async def _sent_until_answered(client: Client, transfers: list[Transfer]
                               ) -> list[TransferResult]:
    """The answer to ``transfers``, sent again while the answer is a retryable refusal
    (for at most a minute)."""
    for _ in range(120):
        try:
            return await client.create_transfers(transfers)
        except LedgerError as exc:
            if not exc.retryable:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("the transfers were refused as unavailable for a minute")


async def test_an_unreached_peer_fails_only_its_legs_and_restarts_nothing(
        processor: Processor, ids: IdSource) -> None:
    a0, b0 = _on_shard(processor, ids, 0, 2)
    [b1] = _on_shard(processor, ids, 1, 1)
    local = Transfer(id=ids.one(), debit_account_id=a0, credit_account_id=b0, amount=5,
                     currency="EUR")
    crossing = Transfer(id=ids.one(), debit_account_id=a0, credit_account_id=b1, amount=7,
                        currency="EUR")
    url = processor.config.shard.database_url
    await _healthy(processor)
    async with Client("127.0.0.1", processor.rpc_port, token_for(processor),
                      timeout_s=180) as client:
        assert await client.create_accounts(
            [Account(id=i, currency="EUR") for i in (a0, b0, b1)]) == [AccountResult.ok] * 3
        coordinator_before = await _identity(processor, 0)
        peer_pid, _ = await _identity(processor, 1)
        blocker = await asyncpg.connect(url)
        try:
            held = blocker.transaction()
            await held.start()
            await blocker.execute("SELECT 1 FROM shard_epochs WHERE shard = 1 FOR UPDATE")
            with contextlib.suppress(ProcessLookupError):
                os.kill(peer_pid, signal.SIGKILL)
            # Shard 0 waits its peer-call timeout for shard 1, then answers. A request of
            # which nothing could be applied fails whole, retryable, as docs/api.md says.
            with pytest.raises(LedgerError) as refused:
                await asyncio.wait_for(client.create_transfers([crossing]), 150)
            assert refused.value.code == "unavailable" and refused.value.retryable
            codes = await asyncio.wait_for(client.create_transfers([local, crossing]), 150)
            await held.rollback()
        finally:
            await blocker.close()
        assert codes == [TransferResult.ok, TransferResult.not_applied]
        await _healthy(processor)
        assert await _identity(processor, 0) == coordinator_before, "shard 0 restarted"

        store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                          command_timeout_s=60)
        try:
            assert set(await store.lookup_transfers([local.id, crossing.id])) == {local.id}
            # Not burned: sent again, it goes through, once. The coordinator may not have
            # reached its restarted peer yet (a busy machine): that answer is "unavailable,
            # send the same request again", so it is sent again, as a client would.
            assert await _sent_until_answered(client, [crossing]) == [TransferResult.ok]
            assert await client.create_transfers([local, crossing]) == [
                TransferResult.exists] * 2
            balances = {a.id: a for a in await client.lookup_accounts([a0, b0, b1])}
            assert balances[a0].debits_posted == 12
            assert balances[b0].credits_posted == 5
            assert balances[b1].credits_posted == 7
            assert balances[b1].credits_pending == 0
            assert (await store.audit()).passed
        finally:
            await store.close()
