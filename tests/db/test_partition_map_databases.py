"""Each database records its own part of the partition map at first start, and a later
start with another layout is refused before any shard could start on a database without
its rows (actors/ledger/store.py ``ensure_partition_map``; docs/design.md §12)."""

from __future__ import annotations

import pytest

from actors.ledger.store import LedgerStore
from processor.ledger import PartitionMap

TWO = PartitionMap.dealt(4, ("main", "db1"))


async def _store(url: str) -> LedgerStore:
    return await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                     command_timeout_s=30)


async def test_each_database_keeps_its_own_shards_rows(db_url: str) -> None:
    """A database records the rows of its own shards under its key; the same map again is
    accepted."""
    store = await _store(db_url)
    try:
        await store.ensure_partition_map(TWO, "db1")
        await store.ensure_partition_map(TWO, "db1")
        async with store.pool.acquire() as conn:
            rows = await conn.fetch("SELECT DISTINCT shard, database_key FROM partition_map "
                                    "ORDER BY 1")
        assert [(r["shard"], r["database_key"]) for r in rows] == [(1, "db1"), (3, "db1")]
    finally:
        await store.close()


@pytest.mark.parametrize(("then", "key", "message"), [
    (TWO, "main", "holds the partitions of database db1"),              # URLs swapped
    (PartitionMap.uniform(4), "main", "holds the partitions of database db1"),  # db1 dropped
    (PartitionMap.dealt(6, ("main", "db1")), "db1", "was created with 4 shards"),
])
async def test_another_layout_is_refused(db_url: str, then: PartitionMap, key: str,
                                         message: str) -> None:
    """Given in another order, without its further database, or with other shards, the
    database of a first start is refused with a message naming what differs."""
    store = await _store(db_url)
    try:
        await store.ensure_partition_map(TWO, "db1")
        with pytest.raises(ValueError, match=message):
            await store.ensure_partition_map(then, key)
    finally:
        await store.close()


async def test_one_database_is_what_it_always_was(db_url: str) -> None:
    """One database: all 256 partitions under main, and another shard count refused as
    before."""
    store = await _store(db_url)
    try:
        await store.ensure_partition_map(PartitionMap.uniform(2))
        async with store.pool.acquire() as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM partition_map WHERE database_key = 'main'")
        assert count == 256
        with pytest.raises(ValueError, match="created with 2 shards"):
            await store.ensure_partition_map(PartitionMap.uniform(3))
    finally:
        await store.close()
