"""A client with two fronts' addresses rides through the SIGKILL of one front: the load goes
on through the other, and every acknowledged transfer is stored exactly once."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
from pathlib import Path

from actors.app.runtime import Processor
from actors.ledger.store import LedgerStore
from processor.client import Client
from processor.codes import AccountResult, TransferResult
from processor.errors import LedgerError
from processor.failover import first_index
from processor.types import Account, Transfer
from tests.running import IdSource, extra_front, token_for

OK = {TransferResult.ok, TransferResult.exists}
CLIENTS = 4
BATCH = 40
# Work, not time: the load runs until this many more transfers are acknowledged.
ACKED_BEFORE_KILL = 400
ACKED_AFTER_KILL = 400
WAIT_ROUNDS_MAX = 1200  # 0.1 s each: a bound on waiting for work that must happen


def _rng_starting_at(index: int, count: int) -> random.Random:
    """A seeded generator whose client starts on front ``index``."""
    seed = next(s for s in range(1000) if first_index(count, random.Random(s)) == index)
    return random.Random(seed)


class Gateways:
    """Clients sending batches of transfers, each batch sent again until answered."""

    def __init__(self, addresses: list[str], token: str, customers: list[int],
                 ids: IdSource) -> None:
        self.addresses = addresses
        self.token = token
        self.customers = customers
        self.ids = ids
        self.acknowledged: dict[int, Transfer] = {}
        self.after_kill: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.failovers = 0
        self.killed = asyncio.Event()
        self.stop = asyncio.Event()

    async def run(self, worker: int) -> None:
        rng = random.Random(worker)
        async with Client(addresses=self.addresses, token=self.token, timeout_s=60,
                          rng=_rng_starting_at(worker % 2, 2)) as client:
            while not self.stop.is_set():
                batch = [Transfer(id=tid, debit_account_id=a, credit_account_id=b,
                                  amount=rng.randint(1, 100), currency="EUR")
                         for tid in self.ids.take(BATCH)
                         for a, b in [rng.sample(self.customers, 2)]]
                codes = await self._until_answered(client, batch)
                assert set(codes) <= OK, codes
                self.acknowledged.update((t.id, t) for t in batch)
                if self.killed.is_set():
                    self.after_kill[worker] += len(batch)
            self.failovers += client.failovers

    async def _until_answered(self, client: Client,
                              batch: list[Transfer]) -> list[TransferResult]:
        for _ in range(200):
            try:
                return await client.create_transfers(batch)
            except (LedgerError, TimeoutError) as exc:
                # What the client did not hide: the gateway sends the same ids again.
                assert isinstance(exc, TimeoutError) or exc.retryable, exc
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.2)
        raise AssertionError(f"a batch was never answered: {dict(self.errors)}")

    async def until(self, count: int, workers: list[asyncio.Task[None]]) -> None:
        for _ in range(WAIT_ROUNDS_MAX):
            failed = [w for w in workers if w.done()]
            if failed:
                await failed[0]  # raises what ended it
                raise AssertionError("a gateway ended early")
            if len(self.acknowledged) >= count:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"only {len(self.acknowledged)} acknowledged")


async def test_sigkill_of_one_front_under_load_loses_nothing_and_doubles_nothing(
        processor: Processor, ids: IdSource) -> None:
    """Four clients with both fronts' addresses, two starting on each; SIGKILL of one
    front's process mid-load: every client goes on through the other front, every
    acknowledged transfer is stored once with its fields, and every balance is exactly the
    sum of the acknowledged transfers."""
    customers = ids.take(20)
    async with Client("127.0.0.1", processor.rpc_port, token_for(processor)) as setup:
        assert await setup.create_accounts(
            [Account(id=c, currency="EUR") for c in customers]) == [AccountResult.ok] * 20
    async with extra_front(processor) as second:
        gateways = Gateways([f"127.0.0.1:{processor.rpc_port}",
                             f"127.0.0.1:{second.rpc_port}"],
                            token_for(processor), customers, ids)
        workers = [asyncio.create_task(gateways.run(w)) for w in range(CLIENTS)]
        try:
            await gateways.until(ACKED_BEFORE_KILL, workers)
            pid = await second.actor.pid.remote()
            assert b"Front" in Path(f"/proc/{pid}/cmdline").read_bytes()
            os.kill(pid, signal.SIGKILL)
            gateways.killed.set()
            await gateways.until(len(gateways.acknowledged) + ACKED_AFTER_KILL, workers)
            # Each client, those on the killed front included, went on.
            for _ in range(WAIT_ROUNDS_MAX):
                if len(gateways.after_kill) == CLIENTS:
                    break
                await asyncio.sleep(0.1)
            assert sorted(gateways.after_kill) == list(range(CLIENTS)), gateways.after_kill
        finally:
            gateways.stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), timeout=120)
    print(f"acknowledged={len(gateways.acknowledged)} failovers={gateways.failovers} "
          f"errors seen by gateways={dict(gateways.errors)}")
    # The calls in flight on the killed front were sent again by the clients themselves.
    assert gateways.failovers >= 1
    await _check_stored_exactly_once(processor, gateways, customers)


async def _check_stored_exactly_once(processor: Processor, gateways: Gateways,
                                     customers: list[int]) -> None:
    store = await LedgerStore.connect(processor.config.shard.database_url, pool_size_max=2,
                                      connect_timeout_s=10, command_timeout_s=120)
    try:
        stored = await store.lookup_transfers(sorted(gateways.acknowledged))
        assert set(stored) == set(gateways.acknowledged)
        for tid, sent in gateways.acknowledged.items():
            got = stored[tid]
            assert (got.debit_account_id, got.credit_account_id, got.amount) == (
                sent.debit_account_id, sent.credit_account_id, sent.amount)
        # Every transfer sent was acknowledged (each batch was sent until answered), so the
        # balances are exactly their sums: a transfer applied twice would show here.
        debits: collections.Counter[int] = collections.Counter()
        credits: collections.Counter[int] = collections.Counter()
        for t in gateways.acknowledged.values():
            debits[t.debit_account_id] += t.amount
            credits[t.credit_account_id] += t.amount
        accounts = await store.lookup_accounts(customers)
        for c in customers:
            assert (accounts[c].debits_posted, accounts[c].credits_posted) == (
                debits[c], credits[c]), c
    finally:
        await store.close()
