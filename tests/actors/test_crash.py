"""Fault tests: SIGKILL a LedgerShard process, restart PostgreSQL, under concurrent load."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
from pathlib import Path

import pytest
import ray

from actors.app.runtime import Processor
from actors.database import EmbeddedPostgres
from actors.ledger.store import LedgerStore
from processor.client import Client, ClientError
from processor.codes import TransferResult
from processor.errors import LedgerError
from processor.types import Account, AccountFlags, Transfer, TransferFlags
from tests.running import IdSource, token_for

OK = {TransferResult.ok, TransferResult.exists}


def _retryable(exc: BaseException) -> bool:
    """Whether a gateway may send the same batch again after ``exc``: the server's retryable
    codes (the client raises ``Overloaded`` for overloaded and rate_limited, ``Unavailable``
    for unavailable, idle_timeout and a dropped or refused connection; their class says
    ``retryable``) and a call that got no answer in time. Every other code, ``internal``
    first of all, is a server that broke, not one that restarted."""
    if isinstance(exc, LedgerError):
        return exc.retryable
    return isinstance(exc, (ConnectionError, TimeoutError))


async def _setup_accounts(client: Client, ids: IdSource, n: int) -> tuple[int, list[int]]:
    operator = ids.one()
    customers = ids.take(n)
    accounts = [Account(id=operator, currency="EUR")] + [
        Account(id=c, currency="EUR", flags=int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS))
        for c in customers
    ]
    assert set(await client.create_accounts(accounts)) == {0}
    funding = [Transfer(id=i, debit_account_id=operator, credit_account_id=c, amount=50_000,
                        currency="EUR") for i, c in zip(ids.take(n), customers, strict=True)]
    assert set(await client.create_transfers(funding)) == {TransferResult.ok}
    return operator, customers


class Load:
    """Gateways that keep sending batches and retry each batch until it is answered."""

    def __init__(self, processor: Processor, ids: IdSource, customers: list[int]) -> None:
        self.processor = processor
        self.ids = ids
        self.customers = customers
        self.acknowledged: dict[int, Transfer] = {}
        self.refused: dict[int, TransferResult] = {}
        self.retries = 0
        # The retryable errors met, by class and code: what the gateways saw of the fault.
        self.errors: collections.Counter[str] = collections.Counter()
        self.stop = asyncio.Event()

    def batch(self, rng: random.Random, size: int) -> list[Transfer]:
        out = []
        for tid in self.ids.take(size):
            a, b = rng.sample(self.customers, 2)
            pending = rng.random() < 0.1
            out.append(Transfer(id=tid, debit_account_id=a, credit_account_id=b,
                                amount=rng.randint(1, 900), currency="EUR",
                                flags=int(TransferFlags.PENDING) if pending else 0))
        return out

    async def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        async with Client("127.0.0.1", self.processor.rpc_port, token_for(self.processor),
                          timeout_s=60) as client:
            while not self.stop.is_set():
                batch = self.batch(rng, 200)
                codes = await self._until_answered(client, batch)
                for t, code in zip(batch, codes, strict=True):
                    if code in OK:
                        self.acknowledged[t.id] = t
                    else:
                        self.refused[t.id] = code

    async def _until_answered(self, client: Client, batch: list[Transfer]) -> list[TransferResult]:
        # Generous: three shard restarts on a loaded 2-core machine can take many seconds.
        deadline = asyncio.get_running_loop().time() + 120
        errors: list[str] = []
        while asyncio.get_running_loop().time() < deadline:
            try:
                return await client.create_transfers(batch)
            except (LedgerError, ClientError, ConnectionError, TimeoutError) as exc:
                if not _retryable(exc):
                    raise AssertionError(f"a batch was refused with a code that is not "
                                         f"retryable: {exc!r}") from exc
                # The same batch again: ids make the retry safe.
                self.retries += 1
                self.errors[f"{type(exc).__name__}:{getattr(exc, 'code', '')}"] += 1
                errors.append(repr(exc))
                await asyncio.sleep(0.25)
        raise AssertionError(f"a batch was never answered; last errors: {errors[-3:]}")


async def _check_everything_acknowledged_is_stored(load: Load, processor: Processor) -> None:
    store = await LedgerStore.connect(processor.config.shard.database_url, pool_size_max=2,
                                      connect_timeout_s=10, command_timeout_s=120)
    try:
        stored = await store.lookup_transfers(sorted(load.acknowledged))
        missing = set(load.acknowledged) - set(stored)
        assert not missing, f"{len(missing)} acknowledged transfers were lost"
        for tid, t in load.acknowledged.items():
            s = stored[tid]
            assert (s.debit_account_id, s.credit_account_id, s.amount, s.flags) == (
                t.debit_account_id, t.credit_account_id, t.amount, t.flags)
        refused_but_stored = set(load.refused) & set(
            await store.lookup_transfers(sorted(load.refused)))
        assert not refused_but_stored, "a transfer answered as refused was stored"
        audit = await store.audit()
        assert audit.passed, audit
    finally:
        await store.close()


async def _wait_settled(processor: Processor) -> None:
    """Wait until no shard holds a reservation any more (orphans resolved). A shard may
    still be restarting from the fault (crash-only recovery after its database went away,
    or its peer's restart): its stats are read once it is back."""
    for _ in range(300):
        stats = await asyncio.gather(*[_stats_when_back(s) for s in processor.shards])
        if all(s["holds_granted"] == 0 for s in stats):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"holds never settled: {stats}")


async def _until_acknowledged(load: Load, count: int,
                              workers: list[asyncio.Task[None]]) -> None:
    """Wait until the gateways have had ``count`` transfers acknowledged in all; a gateway
    that failed (a code that is not retryable) fails the test at once."""
    for _ in range(1200):
        failed = [w.exception() for w in workers if w.done() and w.exception() is not None]
        if failed:
            load.stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
            raise AssertionError(f"a gateway failed ({dict(load.errors)} retried)") from failed[0]
        if len(load.acknowledged) >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {len(load.acknowledged)} acknowledged, {load.retries} retries")


async def _stats_when_back(shard: object) -> dict[str, float]:
    """The stats of a shard once Ray has restarted it and it has recovered."""
    for _ in range(120):
        try:
            return await shard.stats.remote()  # type: ignore[attr-defined, no-any-return]
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            await asyncio.sleep(0.25)
    raise AssertionError("the shard did not come back")


async def test_sigkill_shard_during_concurrent_transfers(
    processor: Processor, ids: IdSource
) -> None:
    """SIGKILL of a ray::LedgerShard mid-load loses no acknowledged transfer and doubles none."""
    async with Client("127.0.0.1", processor.rpc_port, token_for(processor)) as client:
        _, customers = await _setup_accounts(client, ids, 60)
    load = Load(processor, ids, customers)
    workers = [asyncio.create_task(load.worker(seed)) for seed in range(4)]
    await asyncio.sleep(1.0)
    for victim in (0, 1, 0):
        # A shard may be restarting on its own: killing its peer fails the commits that
        # relied on the peer's holds, and crash-only recovery restarts it too.
        before = await _stats_when_back(processor.shards[victim])
        cmdline = Path(f"/proc/{before['pid']}/cmdline").read_bytes()
        assert b"LedgerShard" in cmdline
        with contextlib.suppress(ProcessLookupError):  # it may have just restarted itself
            os.kill(int(before["pid"]), signal.SIGKILL)
        await asyncio.sleep(1.0)
        after = await _stats_when_back(processor.shards[victim])
        assert after["pid"] != before["pid"]
        assert after["epoch"] > before["epoch"]
    # Keep the load on until it has done real work: how fast depends on the machine, so
    # the test waits for an amount of work rather than for a time.
    await _until_acknowledged(load, 1000, workers)
    load.stop.set()
    await asyncio.wait_for(asyncio.gather(*workers), timeout=240)
    await _wait_settled(processor)
    await _check_everything_acknowledged_is_stored(load, processor)


async def test_postgres_restart_during_load(
    processor: Processor, ids: IdSource, embedded_pg: EmbeddedPostgres | None
) -> None:
    """Restarting PostgreSQL mid-load answers only retryable errors (overloaded, unavailable,
    a dropped connection, a call timing out; never ``internal`` nor any other code), then
    recovers with no loss."""
    if embedded_pg is None:
        pytest.skip("restarts only the embedded server")
    async with Client("127.0.0.1", processor.rpc_port, token_for(processor)) as client:
        _, customers = await _setup_accounts(client, ids, 40)
    load = Load(processor, ids, customers)
    workers = [asyncio.create_task(load.worker(seed)) for seed in range(10, 13)]
    await asyncio.sleep(1.0)
    before_restart = len(load.acknowledged)
    await asyncio.to_thread(embedded_pg.restart)
    await _until_acknowledged(load, before_restart + 200, workers)
    load.stop.set()
    await asyncio.wait_for(asyncio.gather(*workers), timeout=180)
    await _wait_settled(processor)
    await _check_everything_acknowledged_is_stored(load, processor)
