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

# The key of the first database: the one every deployment has, and the only one that holds
# the control plane (keys, revocations, audit log, payments, leases).
from processor.ledger.config import MAIN_DATABASE
from processor.service import PLACEMENTS

__all__ = ["MAIN_DATABASE", "PARTITIONS", "PartitionMap", "crossing_mask", "partition_of",
           "partitions_of", "refused_across_databases"]


# TransferFlags.PENDING | POST_PENDING | VOID_PENDING, spelled out to keep this module
# free of the types module.
TWO_PHASE_FLAGS = (1 << 1) | (1 << 2) | (1 << 3)

# The service interface's placements (processor.service.PLACEMENTS) are these partitions.
PARTITIONS = PLACEMENTS

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


# Up to this many ids, the scalar hash (cached) is cheaper than numpy's per-call overhead:
# a commit of a single transfer hashed its accounts five times at about 25 µs each.
_SCALAR_IDS_MAX = 8


def partitions_of(account_ids: np.ndarray) -> np.ndarray:
    """``partition_of`` over an array of ids (int64 or uint64), as int64."""
    if len(account_ids) <= _SCALAR_IDS_MAX:
        return np.array([partition_of(i) for i in account_ids.tolist()], dtype=np.int64)
    return partitions_of_array(account_ids)


def partitions_of_array(account_ids: np.ndarray) -> np.ndarray:
    """``partitions_of`` in numpy whatever the size: the same SplitMix64 finaliser in
    uint64 arithmetic, which wraps modulo 2**64 as the masks in ``partition_of`` do."""
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
    def uniform(cls, shards: int, database_key: str = MAIN_DATABASE) -> PartitionMap:
        """Partitions dealt round-robin over ``shards`` shards, all on one database."""
        return cls.dealt(shards, (database_key,))

    @classmethod
    def dealt(cls, shards: int, database_keys: tuple[str, ...]) -> PartitionMap:
        """Partitions dealt round-robin over ``shards`` shards, and the shards round-robin
        over the databases: shard ``s`` writes to ``database_keys[s % len(database_keys)]``.
        Raises ValueError unless 1 <= shards <= PARTITIONS and every database gets a shard
        (keys distinct)."""
        if not 1 <= shards <= PARTITIONS:
            raise ValueError(f"shards must be in 1..{PARTITIONS}, got {shards}")
        if not 1 <= len(database_keys) <= shards:
            raise ValueError(f"{len(database_keys)} databases need 1 to {shards} of them "
                             f"for {shards} shards (each database has a shard)")
        if len(set(database_keys)) != len(database_keys):
            raise ValueError(f"database keys must be distinct: {database_keys}")
        return cls(
            shard_of_partition=tuple(p % shards for p in range(PARTITIONS)),
            database_of_shard=tuple(database_keys[s % len(database_keys)]
                                    for s in range(shards)),
        )

    @classmethod
    def recorded(cls, rows: dict[str, list[tuple[int, int, str]]]) -> PartitionMap:
        """The layout the databases recorded: ``rows`` by database key (in the order the
        URLs were given, main first), each database's ``partition_map`` rows (partition,
        shard, key). Each database holds the rows of its own shards only, so the layout is
        their union; shard ``s`` owns partitions ``p % shards`` as ``dealt`` gives them, and
        lives in whichever database holds its rows (``move-shard`` changes that). Raises
        ValueError naming what is wrong: rows under another database's key (URLs in
        another order), a shard in two databases (an interrupted move), a shard in none
        (a database left out), partitions not dealt, or a database without a shard."""
        shard_of: dict[int, int] = {}
        database_of: dict[int, str] = {}
        for key, part in rows.items():
            for partition, shard, recorded_key in part:
                if recorded_key != key:
                    raise ValueError(
                        f"the database given as {key!r} holds the partitions of database "
                        f"{recorded_key!r}: give the databases in the order of the first "
                        "start")
                if database_of.setdefault(shard, key) != key:
                    raise ValueError(
                        f"shard {shard} is recorded in databases {database_of[shard]!r} and "
                        f"{key!r}: a move was interrupted; run `txproc move-shard` again "
                        "with the same arguments to finish it")
                shard_of[partition] = shard
        if not shard_of:
            raise ValueError("no database holds a partition map")
        missing = PARTITIONS - len(shard_of)
        if missing:
            raise ValueError(
                f"{missing} partitions are recorded in none of the databases given: give "
                "every database of the ledger, in the order of its first start")
        shards = max(database_of) + 1
        if [shard_of.get(p) for p in range(PARTITIONS)] != [p % shards
                                                             for p in range(PARTITIONS)]:
            raise ValueError(f"the recorded partitions are not dealt over {shards} shards")
        empty = [key for key in rows if key not in database_of.values()]
        if empty:
            raise ValueError(
                f"database {empty[0]!r} holds no shard: move one there first (`txproc "
                "move-shard`, docs/operations.md \"Adding a database\") or leave it out")
        return cls(shard_of_partition=tuple(p % shards for p in range(PARTITIONS)),
                   database_of_shard=tuple(database_of[s] for s in range(shards)))

    def with_shard_in(self, shard: int, key: str) -> PartitionMap:
        """This layout with ``shard`` living in database ``key`` (the others unchanged)."""
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard must be in 0..{self.shards - 1}, got {shard}")
        return PartitionMap(
            shard_of_partition=self.shard_of_partition,
            database_of_shard=tuple(key if s == shard else k
                                    for s, k in enumerate(self.database_of_shard)))

    @property
    def shards(self) -> int:
        return len(self.database_of_shard)

    @property
    def databases(self) -> tuple[str, ...]:
        """The database keys, in the order of their first shard."""
        return tuple(dict.fromkeys(self.database_of_shard))

    @property
    def single_database(self) -> bool:
        """Whether every shard writes to one database (the default, and the hot path)."""
        return len(self.databases) == 1

    def database_of(self, account_id: int) -> str:
        """The key of the database that holds the account's rows."""
        return self.database_of_shard[self.shard_of(account_id)]

    def shards_of_database(self, key: str) -> list[int]:
        return [s for s, k in enumerate(self.database_of_shard) if k == key]

    def crosses_databases(self, debit_account_id: int, credit_account_id: int) -> bool:
        """Whether a transfer's two accounts live in different databases: such a transfer
        cannot commit as one transaction, and is refused (docs/design.md §12)."""
        if self.single_database:
            return False
        return self.database_of(debit_account_id) != self.database_of(credit_account_id)

    def database_table(self) -> np.ndarray:
        """Per shard, the index of its database in ``databases`` (int64): a lookup table
        for the columnar path."""
        order = {k: i for i, k in enumerate(self.databases)}
        return np.asarray([order[k] for k in self.database_of_shard], dtype=np.int64)

    def rows_of_database(self, key: str) -> list[tuple[int, int, str]]:
        """The partition map's rows that database ``key`` stores: (partition, shard, key)
        for the partitions of its own shards. Each database holds only its own, so that
        what reads the map there (horizon, stream, verify) sees only the shards whose rows
        it has."""
        return [(p, s, key) for p, s in enumerate(self.shard_of_partition)
                if self.database_of_shard[s] == key]

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


# TransferFlags.LINKED, spelled out as TWO_PHASE_FLAGS is.
LINKED_FLAG = 1 << 0


def refused_across_databases(partitions: PartitionMap, debit_account_ids: list[int],
                             credit_account_ids: list[int], flags: list[int],
                             *, crossing: int, linked_failed: int) -> dict[int, int]:
    """The items of a request that cannot commit because they span databases: index ->
    result code (``crossing`` for a transfer with an account outside its chain's
    coordinator's database, ``linked_failed`` for the others of such a chain). Empty with
    one database, and for every request whose chains each stay in one database.

    Chains are cut as the front and the shards cut them (an item with the linked flag
    continues to the next; an open chain at the end is the shards' to refuse). An account
    id of 0 (a post or void that leaves them to the hold) names no database."""
    if partitions.single_database:
        return {}
    refused: dict[int, int] = {}
    n = len(flags)
    i = 0
    while i < n:
        j = i
        while j < n - 1 and flags[j] & LINKED_FLAG:
            j += 1
        chain = range(i, j + 1)
        home = partitions.database_of_shard[partitions.coordinator_of(
            [debit_account_ids[k] for k in chain], [flags[k] for k in chain])]
        away = [k for k in chain
                if any(a and partitions.database_of(a) != home
                       for a in (debit_account_ids[k], credit_account_ids[k]))]
        if away:
            for k in chain:
                refused[k] = crossing if k in away else linked_failed
        i = j + 1
    return refused


def crossing_mask(partitions: PartitionMap, debit_account_ids: np.ndarray,
                  credit_account_ids: np.ndarray) -> np.ndarray:
    """Per flagless transfer (columns), whether its two accounts live in different
    databases (bool array); all False with one database."""
    if partitions.single_database:
        return np.zeros(debit_account_ids.shape[0], dtype=np.bool_)
    table = partitions.database_table()
    mask: np.ndarray = (table[partitions.shards_of(debit_account_ids)]
                        != table[partitions.shards_of(credit_account_ids)])
    return mask
