"""The front's path for one transfer (an HTTP create), without Ray: which lane it takes,
what it remembers, and that concurrent single transfers share one shard call."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from actors.ledger.front import Front
from processor.codes import TransferResult
from processor.config import Config, FrontConfig, ShardConfig
from processor.ledger import PartitionMap
from processor.types import Transfer, TransferFlags

STORED_AT_NS = 1_700_000_000_000_000_123


def _front() -> Front:
    return Front(Config(shard=ShardConfig(database_url="", shards=2),
                        front=FrontConfig(calls_in_flight_max=1), data_dir="/nonexistent"),
                 channel_key=b"unused")


class ShardStandIn:
    """Answers every item of a call with one code and a stored timestamp, once released;
    records (shard, method, items per request) of each call."""

    def __init__(self, code: TransferResult) -> None:
        self.code = int(code)
        self.calls: list[tuple[int, str, list[int]]] = []
        self.release = asyncio.Event()

    async def __call__(self, shard: int, method: str, raw: bytes,
                       links: object = None) -> bytes:
        groups = msgspec.msgpack.decode(raw)
        self.calls.append((shard, method, [len(g) for g in groups]))
        await self.release.wait()
        return msgspec.msgpack.encode([(self.code, STORED_AT_NS)] * sum(len(g) for g in groups))


def _transfer(tid: int, debit: int, credit: int, flags: int = 0) -> Transfer:
    return Transfer(id=tid, debit_account_id=debit, credit_account_id=credit, amount=1,
                    currency="EUR", flags=flags)


@pytest.mark.parametrize(("code", "remembered"), [
    (TransferResult.ok, True),
    (TransferResult.exists, True),
    (TransferResult.exceeds_credits, False),
    (TransferResult.exists_with_different_amount, False),
])
async def test_one_transfer_goes_to_its_debit_shard_and_a_stored_one_is_remembered(
        code: TransferResult, remembered: bool) -> None:
    """The transfer is sent alone to the lane of its debit account's shard; an ok or exists
    answer is remembered with the stored timestamp (the HTTP answer reads it), a refusal is
    not."""
    front = _front()
    stand_in = ShardStandIn(code)
    stand_in.release.set()
    front.call_shard = stand_in  # type: ignore[method-assign]
    partitions = PartitionMap.uniform(2)
    for debit in (1, 2, 3, 4):
        transfer = _transfer(100 + debit, debit, 99)
        assert await front.create_transfers([transfer]) == [code]
        assert stand_in.calls[-1] == (partitions.shard_of(debit), "create_transfers", [1])
        stored = front._stored.get(transfer.id)
        if remembered:
            assert stored == msgspec.structs.replace(transfer, timestamp=STORED_AT_NS)
        else:
            assert stored is None


async def test_a_lone_pending_transfer_takes_the_same_path_as_a_request_of_one() -> None:
    """A single two-phase or linked transfer lands where the general segmentation sends it."""
    front = _front()
    stand_in = ShardStandIn(TransferResult.ok)
    stand_in.release.set()
    front.call_shard = stand_in  # type: ignore[method-assign]
    for flags in (TransferFlags.PENDING, TransferFlags.LINKED):
        transfer = _transfer(7, 5, 6, int(flags))
        [segment] = front._segments([transfer])
        await front.create_transfers([transfer])
        assert stand_in.calls[-1][0] == next(iter(segment))


async def test_single_transfers_arriving_during_a_call_share_the_next_one() -> None:
    """While a shard's call runs, single transfers queue and then leave in one call."""
    front = _front()
    stand_in = ShardStandIn(TransferResult.ok)
    front.call_shard = stand_in  # type: ignore[method-assign]
    debit = 1
    shard = PartitionMap.uniform(2).shard_of(debit)
    requests = [asyncio.ensure_future(front.create_transfers([_transfer(i, debit, 99)]))
                for i in range(1, 12)]
    for _ in range(3):  # the requests reach the lane, then its first call starts
        await asyncio.sleep(0)
    assert stand_in.calls == [(shard, "create_transfers", [1])]
    stand_in.release.set()
    assert await asyncio.gather(*requests) == [[TransferResult.ok]] * 11
    assert stand_in.calls == [(shard, "create_transfers", [1]),
                              (shard, "create_transfers", [1] * 10)]
