"""The ledger service interface that the HTTP API and the RPC server are written against.

The front actor implements it by routing items to shard actors; tests of the protocol layers
may implement it in memory. Every method takes and returns items in order, one result per
item, and raises a ``processor.errors.LedgerError`` when the request as a whole could not be
evaluated (in which case nothing was written).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from processor.codes import AccountResult, TransferResult
from processor.types import Account, Transfer

if TYPE_CHECKING:
    import numpy as np

    from processor.batch import TransferBatch

__all__ = ["BATCH_ITEMS_MAX", "PLACEMENTS", "LedgerService", "create_transfer_batch",
           "placement_of"]

# The largest batch of one request, the batch size TigerBeetle uses; a request with more
# items is rejected whole (HTTP 413, RPC error ``batch_too_large``).
BATCH_ITEMS_MAX = 8189


# How many placements (the ledger's logical partitions) accounts are spread over: enough
# to spread over many more shards than one box runs, few enough that the map stays a small
# table. Fixed for the life of a ledger (processor.ledger.partition).
PLACEMENTS = 256


def placement_of(account_id: int) -> int:
    """Where the ledger keeps an account: its logical partition, 0 .. PLACEMENTS - 1, a hash
    of the id, fixed for the life of the ledger.

    Accounts of one placement are always owned by one shard in one database, wherever
    partitions are moved, so a transfer between two of them never crosses shards or
    databases. A client with one busy counterparty account for many others (payments'
    clearing accounts) can keep one per placement and pair each account with its own.
    """
    from processor.ledger import partition_of  # the ledger imports this module

    return partition_of(account_id)


class LedgerService(Protocol):
    async def create_accounts(self, accounts: list[Account]) -> list[AccountResult]: ...

    async def create_transfers(self, transfers: list[Transfer]) -> list[TransferResult]: ...

    async def lookup_accounts(self, ids: list[int]) -> list[Account | None]: ...

    async def lookup_transfers(self, ids: list[int]) -> list[Transfer | None]: ...


async def create_transfer_batch(service: LedgerService, batch: TransferBatch) -> np.ndarray:
    """One result code per transfer of ``batch`` (uint8, in order).

    A service may take batches as columns (``create_transfer_batch``, as the front does);
    any other gets them as objects through ``create_transfers``.
    """
    columnar = getattr(service, "create_transfer_batch", None)
    if columnar is not None:
        codes: np.ndarray = await columnar(batch)
        return codes
    import numpy as np  # here: the configuration reads this module's limits without NumPy

    results = await service.create_transfers(batch.transfers())
    return np.array([int(c) for c in results], dtype=np.uint8)
