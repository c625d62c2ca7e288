"""The partition map: account id -> logical partition -> shard -> database.

Accounts are spread over a fixed number of logical partitions by a hash of their id; the
map from partitions to shards (and each shard's database) is data, stored in the database
at first start, so that groups of partitions can later move to other shards or servers
without rehashing every account.
"""

from __future__ import annotations

import functools

import msgspec
import numpy as np

__all__ = ["PARTITIONS", "PartitionMap", "partition_of", "partitions_of"]

# TransferFlags.PENDING | POST_PENDING | VOID_PENDING, spelled out to keep this module
# free of the types module.
TWO_PHASE_FLAGS = (1 << 1) | (1 << 2) | (1 << 3)

# Enough partitions to spread over many more shards than a single box runs, few enough
# that the map stays a small table. Fixed for the life of a ledger.
PARTITIONS = 256

_MASK_64 = (1 << 64) - 1


@functools.lru_cache(maxsize=1 << 20)
def partition_of(account_id: int) -> int:
    """The logical partition of an account: a SplitMix64 finaliser of its id, mod PARTITIONS.

    Hashing rather than ``id % PARTITIONS`` keeps sequential ids (the common client choice)
    from landing in runs on one shard.
    """
    z = (account_id + 0x9E3779B97F4A7C15) & _MASK_64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK_64
    z = z ^ (z >> 31)
    return z % PARTITIONS


_U64 = np.uint64


def partitions_of(account_ids: np.ndarray) -> np.ndarray:
    """``partition_of`` over an array of ids (int64 or uint64), as int64.

    The same SplitMix64 finaliser in uint64 arithmetic, which wraps modulo 2**64 as the
    masks in ``partition_of`` do.
    """
    z = account_ids.astype(_U64) + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    z = z ^ (z >> _U64(31))
    return (z % _U64(PARTITIONS)).astype(np.int64)


class PartitionMap(msgspec.Struct, frozen=True):
    """Which shard owns each partition, and which database each shard writes to."""

    shard_of_partition: tuple[int, ...]
    database_of_shard: tuple[str, ...]

    @classmethod
    def uniform(cls, shards: int, database_key: str = "main") -> PartitionMap:
        """Partitions dealt round-robin over ``shards`` shards, all on one database."""
        if not 1 <= shards <= PARTITIONS:
            raise ValueError(f"shards must be in 1..{PARTITIONS}, got {shards}")
        return cls(
            shard_of_partition=tuple(p % shards for p in range(PARTITIONS)),
            database_of_shard=tuple(database_key for _ in range(shards)),
        )

    @property
    def shards(self) -> int:
        return len(self.database_of_shard)

    def shard_of(self, account_id: int) -> int:
        return self.shard_of_partition[partition_of(account_id)]

    def shards_of(self, account_ids: np.ndarray) -> np.ndarray:
        """``shard_of`` over an array of ids, as int64."""
        table = np.asarray(self.shard_of_partition, dtype=np.int64)
        shards: np.ndarray = table[partitions_of(account_ids)]
        return shards

    def coordinator_of(self, debit_account_ids: list[int], flags: list[int]) -> int:
        """The shard that coordinates a linked chain (or a single transfer).

        A pending transfer is owned by the shard of its debit account, which expires it and
        answers its post or void; so a chain with a two-phase transfer is coordinated by the
        shard of the first such transfer's debit account, any other chain by the shard of
        its first debit account.
        """
        for debit, f in zip(debit_account_ids, flags, strict=True):
            if f & TWO_PHASE_FLAGS:
                return self.shard_of(debit)
        return self.shard_of(debit_account_ids[0])

    def partitions_of_shard(self, shard: int) -> list[int]:
        return [p for p, s in enumerate(self.shard_of_partition) if s == shard]
