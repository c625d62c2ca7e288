"""txproc's domain core: ledger types, result codes and rules, config, client and CLI."""

from processor.batch import TransferBatch
from processor.codes import AccountResult, TransferResult
from processor.errors import LedgerError, Overloaded, Unavailable
from processor.types import Account, AccountFlags, Transfer, TransferFlags

__all__ = [
    "Account",
    "AccountFlags",
    "AccountResult",
    "LedgerError",
    "Overloaded",
    "Transfer",
    "TransferBatch",
    "TransferFlags",
    "TransferResult",
    "Unavailable",
]
