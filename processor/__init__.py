"""txproc's domain core: ledger types, result codes and rules, config, client and CLI.

The names below are imported when first read (``processor.lazy``): ``TransferBatch``
brings NumPy, which a command that only reads its configuration does not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from processor.lazy import lazy_exports

if TYPE_CHECKING:
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

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(__name__, {
        "processor.batch": ("TransferBatch",),
        "processor.codes": ("AccountResult", "TransferResult"),
        "processor.errors": ("LedgerError", "Overloaded", "Unavailable"),
        "processor.types": ("Account", "AccountFlags", "Transfer", "TransferFlags"),
    })
