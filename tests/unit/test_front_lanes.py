"""The front's routing logic without Ray: micro-batching, overload, request segments."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from actors.ledger.front import Front
from processor.config import Config, FrontConfig, ShardConfig
from processor.errors import Overloaded
from processor.ledger import PartitionMap
from processor.types import Transfer, TransferFlags


def _front(**front: int) -> Front:
    return Front(Config(shard=ShardConfig(database_url="", shards=2),
                        front=FrontConfig(**front), data_dir="/nonexistent"), channel_key=b"unused")


class ShardStandIn:
    """Records each call's batch and answers ok for every item once released."""

    def __init__(self) -> None:
        self.calls: list[list[list[object]]] = []
        self.release = asyncio.Event()

    async def __call__(self, shard: int, method: str, raw: bytes) -> bytes:
        groups = msgspec.msgpack.decode(raw)
        self.calls.append(groups)
        await self.release.wait()
        items = sum(len(g) for g in groups)
        if method == "create_transfers":
            return msgspec.msgpack.encode([(0, 1)] * items)  # (code, timestamp) per item
        return msgspec.msgpack.encode([0] * items)


def _transfer(tid: int, debit: int, credit: int, flags: int = 0) -> Transfer:
    return Transfer(id=tid, debit_account_id=debit, credit_account_id=credit, amount=1,
                    currency="EUR", flags=flags)


async def test_requests_waiting_for_a_busy_lane_leave_in_one_call() -> None:
    """While a lane's only call runs, later requests queue and then leave together."""
    front = _front(calls_in_flight_max=1)
    stand_in = ShardStandIn()
    front.call_shard = stand_in  # type: ignore[method-assign]
    lane = front._lane(0, "create_transfers")
    futures = [lane.submit([_transfer(i, 1, 2)]) for i in range(1, 11)]
    await asyncio.sleep(0)
    assert [len(c) for c in stand_in.calls] == [1]
    stand_in.release.set()
    assert [len(r) for r in await asyncio.gather(*futures)] == [1] * 10
    assert [len(c) for c in stand_in.calls] == [1, 9]


async def test_a_full_lane_refuses_with_overloaded() -> None:
    """Beyond queue_items_max waiting items the lane answers a retryable overloaded."""
    front = _front(calls_in_flight_max=1, queue_items_max=5, call_items_max=5)
    stand_in = ShardStandIn()
    front.call_shard = stand_in  # type: ignore[method-assign]
    lane = front._lane(0, "create_transfers")
    first = lane.submit([_transfer(1, 1, 2)])  # leaves at once
    waiting = [lane.submit([_transfer(i, 1, 2)]) for i in range(2, 7)]  # fills the queue
    with pytest.raises(Overloaded) as refused:
        lane.submit([_transfer(99, 1, 2)])
    assert refused.value.retry_after_s > 0
    stand_in.release.set()
    await asyncio.gather(first, *waiting)


def _pair_on_two_shards() -> tuple[int, int]:
    pm = PartitionMap.uniform(2)
    a = 1
    b = 2
    while pm.shard_of(b) == pm.shard_of(a):
        b += 1
    return a, b


def test_a_request_is_split_only_where_a_transfer_id_links_two_coordinators() -> None:
    """A post of a hold created earlier in the request on another shard waits for it;
    transfers that merely share accounts across shards run concurrently."""
    front = _front()
    a, b = _pair_on_two_shards()
    c = next(x for x in range(3, 100) if x not in (a, b))
    assert len(front._segments([_transfer(10, a, c), _transfer(11, b, c + 1000)])) == 1
    assert len(front._segments([_transfer(20, a, b), _transfer(21, b, a)])) == 1
    hold = Transfer(id=40, debit_account_id=b, credit_account_id=a, amount=1, currency="EUR",
                    flags=int(TransferFlags.PENDING))
    post = Transfer(id=41, debit_account_id=b, credit_account_id=a, amount=1, currency="EUR",
                    flags=int(TransferFlags.POST_PENDING), pending_id=40)
    # Same coordinator: order is kept inside the shard, no split needed.
    assert len(front._segments([hold, post])) == 1
    # The same id again, first debiting a then b: two coordinators, so the second waits.
    again = _transfer(20, b, a)
    segments = front._segments([_transfer(20, a, b), again])
    assert len(segments) == 2
    assert [i for s in segments for idx in s.values() for i in idx] == [0, 1]


def test_a_linked_chain_stays_with_one_coordinator() -> None:
    """Every transfer of a linked chain goes to the shard of the chain's first debit account."""
    front = _front()
    a, b = _pair_on_two_shards()
    linked = int(TransferFlags.LINKED)
    chain = [_transfer(30, a, b, linked), _transfer(31, b, a, linked), _transfer(32, b, a)]
    segments = front._segments(chain)
    assert segments == [{PartitionMap.uniform(2).shard_of(a): [0, 1, 2]}]
