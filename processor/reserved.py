"""Ids that belong to the processor itself, and who may use them.

Payments keep their own ledger accounts and transfers (provider clearing accounts, the
holds and postings of every saga step) in a range of ids no gateway may touch: from
``PaymentsConfig.system_id_base`` (2^62 by default) up. A gateway that could create, debit
or credit an account there could move money out of a clearing account, or void a payout's
hold while the provider pays it. The edge therefore refuses, with ``id_reserved``, any
account or transfer from the range (or a transfer naming an account or pending transfer in
it) unless the caller's token holds ``SYSTEM_SCOPE``, which only the payments actor's own
token does (``txproc token issue`` grants it only when asked by name).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from processor.identity import SYSTEM_SCOPES
from processor.types import Account, Transfer

__all__ = [
    "RESERVED_ID_MIN_DEFAULT",
    "SYSTEM_SCOPE",
    "accounts_reserved",
    "columns_reserved",
    "transfers_reserved",
]

RESERVED_ID_MIN_DEFAULT = 2**62
SYSTEM_SCOPE = SYSTEM_SCOPES[0]


def accounts_reserved(accounts: Iterable[Account], reserved_min: int) -> bool:
    """True if any account's id is in the reserved range."""
    return any(a.id >= reserved_min for a in accounts)


def transfers_reserved(transfers: Iterable[Transfer], reserved_min: int) -> bool:
    """True if any transfer's id, accounts or pending id is in the reserved range."""
    return any(t.id >= reserved_min or t.debit_account_id >= reserved_min
               or t.credit_account_id >= reserved_min or t.pending_id >= reserved_min
               for t in transfers)


def columns_reserved(reserved_min: int, *columns: np.ndarray) -> bool:
    """True if any value of the given integer id columns is in the reserved range."""
    return any(bool((column >= reserved_min).any()) for column in columns if column.size)
