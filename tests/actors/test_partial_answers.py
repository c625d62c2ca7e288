"""A batch whose parts run on two shards, one of them SIGKILLed mid-batch and kept down.

The shard's epoch row is locked, so its commit in flight blocks in PostgreSQL, and once it
is killed its successor's recovery blocks too: the shard stays unreachable through the
front's retries while the other shard answers its part. The answer must then say per
transfer what was stored (docs/api.md, "Partial answers"), and match the database, both
when the commit in flight completes once the lock is gone (a small commit is one
statement, which needs nothing more from the dead shard) and when the epoch moved first
(as when a successor took over), which refuses it.
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
from processor.ledger import PartitionMap
from processor.types import Account, Transfer
from tests.running import IdSource, extra_front

pytestmark = pytest.mark.asyncio

# The batch goes through a front of its own beside the session's, sharing its shards, whose
# retry deadline is short: the test holds the shard down through that whole deadline, and
# the session front's (30 s) would only make it wait longer for the same answers.
RETRY_DEADLINE_S = 6.0


def _on_shard(processor: Processor, ids: IdSource, shard: int, n: int) -> list[int]:
    partitions = PartitionMap.uniform(processor.config.shard.shards)
    out: list[int] = []
    while len(out) < n:
        candidate = ids.one()
        if partitions.shard_of(candidate) == shard:
            out.append(candidate)
    return out


async def _healthy(processor: Processor) -> None:
    for _ in range(600):
        try:
            await asyncio.gather(*[asyncio.wait_for(s.ready.remote(), 2)
                                   for s in processor.shards])
            return
        except Exception:
            await asyncio.sleep(0.1)
    raise AssertionError("the shards did not come back")


@pytest.mark.parametrize("epoch_moves", [False, True], ids=["commit_completes", "fenced"])
async def test_a_shard_killed_mid_batch_and_kept_down_gets_per_transfer_answers(
    processor: Processor, ids: IdSource, epoch_moves: bool
) -> None:
    a0, b0 = _on_shard(processor, ids, 0, 2)
    a1, b1 = _on_shard(processor, ids, 1, 2)
    stored_here = Transfer(id=ids.one(), debit_account_id=a0, credit_account_id=b0,
                           amount=5, currency="EUR")
    on_the_dead_shard = [Transfer(id=ids.one(), debit_account_id=a1, credit_account_id=b1,
                                  amount=7, currency="EUR") for _ in range(3)]
    url = processor.config.shard.database_url
    async with extra_front(processor, retry_deadline_s=RETRY_DEADLINE_S) as front, \
            Client("127.0.0.1", front.rpc_port, front.token, timeout_s=120) as client:
        assert await client.create_accounts(
            [Account(id=i, currency="EUR") for i in (a0, b0, a1, b1)]) == [AccountResult.ok] * 4
        blocker = await asyncpg.connect(url)
        try:
            held = blocker.transaction()
            await held.start()
            await blocker.execute(
                "UPDATE shard_epochs SET epoch = epoch + 1 WHERE shard = 1" if epoch_moves
                else "SELECT 1 FROM shard_epochs WHERE shard = 1 FOR UPDATE")
            pid = int((await processor.shards[1].stats.remote())["pid"])
            request = asyncio.create_task(
                client.create_transfers([stored_here, *on_the_dead_shard]))
            await asyncio.sleep(1.0)  # shard 1's commit is now waiting on the lock
            assert not request.done()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # Hold the shard down through the front's whole retry deadline.
            await asyncio.sleep(RETRY_DEADLINE_S + 2.0)
            await (held.commit() if epoch_moves else held.rollback())
            codes = await asyncio.wait_for(request, timeout=60)
        finally:
            await blocker.close()
        # The front fenced the shard out, which waited for the commit in flight: stored,
        # it answers ``exists``; refused, ``not_applied``.
        late = TransferResult.not_applied if epoch_moves else TransferResult.exists
        assert codes == [TransferResult.ok] + [late] * 3
        store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                          command_timeout_s=60)
        try:
            found = await store.lookup_transfers([t.id for t in on_the_dead_shard]
                                                 + [stored_here.id])
            dead_part = {t.id for t in on_the_dead_shard}
            assert set(found) == {stored_here.id} | (set() if epoch_moves else dead_part)
            await _healthy(processor)
            if epoch_moves:
                # Not burned: the same transfers go through now.
                assert await client.create_transfers(on_the_dead_shard) == [
                    TransferResult.ok] * 3
            # The retry of the whole request answers each one's outcome.
            assert await client.create_transfers([stored_here, *on_the_dead_shard]) == [
                TransferResult.exists] * 4
            assert (await store.audit()).passed
        finally:
            await store.close()
