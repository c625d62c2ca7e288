"""The ledger service interface that the HTTP API and the RPC server are written against.

The front actor implements it by routing items to shard actors; tests of the protocol layers
may implement it in memory. Every method takes and returns items in order, one result per
item, and raises a ``processor.errors.LedgerError`` when the request as a whole could not be
evaluated (in which case nothing was written).
"""

from __future__ import annotations

from typing import Protocol

from processor.codes import AccountResult, TransferResult
from processor.types import Account, Transfer

__all__ = ["BATCH_ITEMS_MAX", "LedgerService"]

# The largest batch of one request, the batch size TigerBeetle uses; a request with more
# items is rejected whole (HTTP 413, RPC error ``batch_too_large``).
BATCH_ITEMS_MAX = 8189


class LedgerService(Protocol):
    async def create_accounts(self, accounts: list[Account]) -> list[AccountResult]: ...

    async def create_transfers(self, transfers: list[Transfer]) -> list[TransferResult]: ...

    async def lookup_accounts(self, ids: list[int]) -> list[Account | None]: ...

    async def lookup_transfers(self, ids: list[int]) -> list[Transfer | None]: ...
