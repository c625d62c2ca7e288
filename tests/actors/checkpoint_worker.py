"""A process holding two ledger shards that commit without checkpointing, until killed.

Run by ``test_checkpoint_recovery.py`` as ``python -m tests.actors.checkpoint_worker URL``:
it recovers both shards (which checkpoints once), then applies a seeded mix of every kind
of transfer (plain and columnar, same- and cross-shard, pending, partial posts, voids,
expiries, a linked chain coordinated away from its first debit account), printing one JSON
line per acknowledged request, then ``{"done": true}``, and waits to be SIGKILLed. The
checkpoint interval is an hour, so everything after recovery is in the database only as
appended rows and postings: what the next incarnation must replay.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any

import msgspec

from actors.ledger.shard import LedgerShard
from processor.batch import TransferBatch, encode_batch
from processor.config import ShardConfig
from processor.ledger import PartitionMap
from processor.types import Account, AccountFlags, Transfer, TransferFlags

SHARDS = 2
ENCODER = msgspec.msgpack.Encoder()
RESULTS = msgspec.msgpack.Decoder(list[tuple[int, int]])
LIMITED = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
PENDING = int(TransferFlags.PENDING)
POST = int(TransferFlags.POST_PENDING)
VOID = int(TransferFlags.VOID_PENDING)
LINKED = int(TransferFlags.LINKED)


class LocalPeer:
    """A shard's peer in the same process: ``await peer.call(method, *args)`` runs it."""

    def __init__(self, shard: LedgerShard) -> None:
        self._shard = shard

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self._shard, method)(*args)


def shard_config(url: str, checkpoint_interval_s: float, *,
                 checkpoint_interval_max_s: float | None = None,
                 checkpoint_rows: int = 0) -> ShardConfig:
    """Checkpoints every ``checkpoint_interval_s`` unless a longer maximum and a number of
    rows are given (processor.config.ShardConfig)."""
    return ShardConfig(database_url=url, shards=SHARDS, orphan_sweep_interval_s=0.2,
                       expiry_interval_s=0.05, recovery_deadline_s=30.0,
                       checkpoint_interval_s=checkpoint_interval_s,
                       checkpoint_interval_max_s=(checkpoint_interval_max_s
                                                  or checkpoint_interval_s),
                       checkpoint_rows=checkpoint_rows)


def start_shards(url: str, checkpoint_interval_s: float, *, in_test: bool = False,
                 **checkpoints: Any) -> list[LedgerShard]:
    """Two shards in this process. ``in_test``: a write-path failure raises where it
    happened instead of ending the process (which would be the test runner)."""
    shards: list[LedgerShard] = []
    peers = {}
    for s in range(SHARDS):
        shards.append(LedgerShard(s, shard_config(url, checkpoint_interval_s, **checkpoints),
                                  peers=lambda n: peers[n],
                                  crash=(lambda: None) if in_test else None))
        peers[s] = LocalPeer(shards[s])
    return shards


def account_ids(count: int) -> list[int]:
    """``count`` account ids per shard, alternating shards."""
    partitions = PartitionMap.uniform(SHARDS)
    by_shard: list[list[int]] = [[] for _ in range(SHARDS)]
    candidate = 1_000
    while min(len(ids) for ids in by_shard) < count:
        candidate += 1
        ids = by_shard[partitions.shard_of(candidate)]
        if len(ids) < count:
            ids.append(candidate)
    return [i for pair in zip(*by_shard, strict=True) for i in pair]


class Gateway:
    def __init__(self, shards: list[LedgerShard]) -> None:
        self.shards = shards
        self.partitions = PartitionMap.uniform(SHARDS)

    async def transfers(self, chain: list[Transfer]) -> list[int]:
        coordinator = self.partitions.coordinator_of(
            [t.debit_account_id for t in chain], [t.flags for t in chain])
        raw = await self.shards[coordinator].create_transfers(ENCODER.encode([chain]))
        codes = [code for code, _ in RESULTS.decode(raw)]
        print(json.dumps({"ids": [t.id for t in chain], "codes": codes}), flush=True)
        return codes


async def run(url: str, seed: int) -> None:
    shards = start_shards(url, checkpoint_interval_s=3600.0)
    for s in shards:
        await s.ready()
    rng = random.Random(seed)
    ops, *customers = account_ids(6)
    accounts = [Account(id=ops, currency="EUR")] + [
        Account(id=c, currency="EUR", flags=LIMITED) for c in customers]
    partitions = PartitionMap.uniform(SHARDS)
    for s in range(SHARDS):
        mine = [a for a in accounts if partitions.shard_of(a.id) == s]
        await shards[s].create_accounts(ENCODER.encode([mine]))
    gateway = Gateway(shards)
    next_id = iter(range(10_000_000, 20_000_000))
    for c in customers:  # funding, same- and cross-shard
        await gateway.transfers([Transfer(id=next(next_id), debit_account_id=ops,
                                          credit_account_id=c, amount=100_000,
                                          currency="EUR")])
    holds: list[Transfer] = []
    for _ in range(120):
        a, b = rng.sample(customers, 2)
        kind = rng.random()
        t = Transfer(id=next(next_id), debit_account_id=a, credit_account_id=b,
                     amount=rng.randint(1, 900), currency="EUR")
        if kind < 0.3:
            t = msgspec.structs.replace(t, flags=PENDING,
                                        timeout_s=1 if rng.random() < 0.3 else 0)
            if (await gateway.transfers([t]))[0] == 0:
                holds.append(t)
        else:
            await gateway.transfers([t])
    for i, hold in enumerate(holds):
        if hold.timeout_s:
            continue  # left to expire
        flags, amount = (POST, rng.randint(1, hold.amount)) if i % 2 else (VOID, hold.amount)
        await gateway.transfers([Transfer(
            id=next(next_id), debit_account_id=hold.debit_account_id,
            credit_account_id=hold.credit_account_id, amount=amount, currency="EUR",
            flags=flags, pending_id=hold.id)])
    # A linked chain coordinated by the shard of its pending transfer's debit account,
    # whose first transfer debits an account of the other shard.
    first, second = customers[0], customers[1]
    await gateway.transfers([
        Transfer(id=next(next_id), debit_account_id=first, credit_account_id=ops,
                 amount=7, currency="EUR", flags=LINKED),
        Transfer(id=next(next_id), debit_account_id=second, credit_account_id=ops,
                 amount=11, currency="EUR", flags=PENDING)])
    # Plain columns, cross-shard legs included.
    n = 2_000
    batch = TransferBatch.from_arrays(
        id=[next(next_id) for _ in range(n)],
        debit_account_id=[customers[i % 5] for i in range(n)],
        credit_account_id=[customers[(i % 5 + 1 + i % 4) % 5] for i in range(n)],
        amount=[1 + i % 13 for i in range(n)], currency="EUR")
    by_shard = partitions.shards_of(batch.columns().debit_account_id)
    for s in range(SHARDS):
        part = batch.take((by_shard == s).nonzero()[0])
        if len(part):
            codes = await shards[s].create_transfer_columns(encode_batch(part))
            print(json.dumps({"columns": len(part), "failed": sum(1 for c in codes if c)}),
                  flush=True)
    await asyncio.sleep(1.5)  # the short holds expire, through the expiry ticker
    print(json.dumps({"done": True}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 7))
