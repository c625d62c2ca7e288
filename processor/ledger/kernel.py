"""The compiled part of the ledger's hot path: sequential rules over balance arrays.

A shard keeps every account's balances in one int64 matrix, a row per account (its *slot*)
and a column per balance (``processor.ledger.columnar``). The rules that must run in order (a
limit depends on every transfer before it) are loops over that matrix compiled by Numba
(``@njit(cache=True)``: compiled once per machine, then loaded from ``__pycache__``). They
implement exactly what ``processor.ledger.rules.AccountState.check`` decides for a single-phase
transfer leg; ``tests/unit/test_kernel_reference.py`` holds them to that reference model.

Every sum is compared with ``AMOUNT_MAX`` without overflowing int64: terms are
non-negative, and ``_add`` answers ``OVER`` (-1) once a sum would pass ``AMOUNT_MAX``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from processor.codes import TransferResult
from processor.ledger.rules import CREDITS_LIMITED, DEBITS_LIMITED
from processor.types import AMOUNT_MAX

__all__ = [
    "COLUMNS",
    "COMMITTED",
    "CP",
    "CPO",
    "CURRENCY",
    "DP",
    "DPO",
    "FLAGS",
    "RES_C",
    "RES_D",
    "TENANT",
    "UP_C",
    "UP_D",
    "U_CP",
    "U_CPO",
    "U_DP",
    "U_DPO",
    "plan_plain",
    "reserve_plain",
    "warm_up",
]

# Columns of the balance matrix. The first four are committed balances (equal to the
# database row plus unfolded postings); U_* are signed uncommitted effects; UP_* the
# uncommitted increases; RES_* holds granted to distributed items (processor.ledger.rules
# AccountState names each of them).
DP, DPO, CP, CPO = 0, 1, 2, 3
U_DP, U_DPO, U_CP, U_CPO = 4, 5, 6, 7
UP_D, UP_C = 8, 9
RES_D, RES_C = 10, 11
FLAGS, CURRENCY, COMMITTED = 12, 13, 14
# The account's tenant slot (processor.identity.tenant_slot; 0 for the processor's own).
TENANT = 15
COLUMNS = 16

_MAX = np.int64(AMOUNT_MAX)
OVER = np.int64(-1)
_R = TransferResult
_OK = int(_R.ok)
_DEBIT_NOT_FOUND = int(_R.debit_account_not_found)
_CREDIT_NOT_FOUND = int(_R.credit_account_not_found)
_CURRENCY_MISMATCH = int(_R.currency_mismatch)
# Indexed by side (0 debit, 1 credit).
_OVERFLOWS_PENDING = (int(_R.overflows_debits_pending), int(_R.overflows_credits_pending))
_OVERFLOWS_POSTED = (int(_R.overflows_debits_posted), int(_R.overflows_credits_posted))
_OVERFLOWS = (int(_R.overflows_debits), int(_R.overflows_credits))
_EXCEEDS = (int(_R.exceeds_credits), int(_R.exceeds_debits))


@njit(cache=True, inline="always")
def _add(a: np.int64, b: np.int64) -> np.int64:
    """a + b for non-negative terms, or OVER once the sum passes AMOUNT_MAX."""
    if a < 0 or b < 0 or a > _MAX - b:
        return OVER
    return a + b


@njit(cache=True)
def _check(bal: np.ndarray, slot: int, side: int, amount: np.int64, currency: np.int64,
           remote: bool) -> int:
    """``AccountState.check`` for a limited leg posting ``amount`` (no pending part)."""
    if bal[slot, CURRENCY] != currency:
        return _CURRENCY_MISMATCH
    if side == 0:
        pending, posted, up, reserved = bal[slot, DP], bal[slot, DPO], bal[slot, UP_D], \
            bal[slot, RES_D]
    else:
        pending, posted, up, reserved = bal[slot, CP], bal[slot, CPO], bal[slot, UP_C], \
            bal[slot, RES_C]
    if _add(_add(pending, up), reserved) < 0:
        return _OVERFLOWS_PENDING[side]
    if _add(_add(_add(posted, up), reserved), amount) < 0:
        return _OVERFLOWS_POSTED[side]
    if _add(_add(_add(_add(pending, posted), up), reserved), amount) < 0:
        return _OVERFLOWS[side]
    limit = DEBITS_LIMITED if side == 0 else CREDITS_LIMITED
    if not bal[slot, FLAGS] & limit:
        return _OK
    # A debit is limited by posted credits and a credit by posted debits.
    if side == 0:
        against_posted, u_pending, u_posted, u_against = \
            bal[slot, CPO], bal[slot, U_DP], bal[slot, U_DPO], bal[slot, U_CPO]
    else:
        against_posted, u_pending, u_posted, u_against = \
            bal[slot, DPO], bal[slot, U_CP], bal[slot, U_CPO], bal[slot, U_DPO]
    if remote:
        total = _add(_add(pending, posted), up)
        against = against_posted
    else:
        # pending + u_pending and posted + u_posted are the balances with every validated
        # local effect: never negative.
        total = _add(pending + u_pending, posted + u_posted)
        against = _add(against_posted, u_against)
    if against < 0:
        raise AssertionError("posted balances stay within AMOUNT_MAX")
    needed = _add(_add(total, reserved), amount)
    if needed < 0 or needed > against:
        return _EXCEEDS[side]
    return _OK


@njit(cache=True, inline="always")
def _foreign(bal: np.ndarray, slot: int, tenant: np.int64) -> bool:
    """Whether a transfer of ``tenant`` may not name the account at ``slot``: it belongs to
    another tenant and the transfer is not the processor's (tenant 0). Such an account is
    answered exactly as one that does not exist."""
    return bool(tenant != 0 and bal[slot, TENANT] != tenant)


@njit(cache=True)
def plan_plain(bal: np.ndarray, debit_slot: np.ndarray, credit_slot: np.ndarray,
               credit_local: np.ndarray, amount: np.ndarray, currency: np.ndarray,
               tenant: np.ndarray, codes: np.ndarray) -> None:
    """Evaluate single-phase transfers in order on their coordinator (the debit's shard).

    ``codes`` comes in with the static checks' codes (0 where they passed) and leaves with
    each item's code. A slot of -1 is an account this shard does not have, and an account
    of another tenant than the item's is treated as one (``_foreign``). An item whose
    credit account is on another shard (``credit_local`` false) only holds its debit here
    (RES_D) when it passes; the caller reserves its credit on that shard.
    """
    for i in range(codes.shape[0]):
        if codes[i] != _OK:
            continue
        d = debit_slot[i]
        code = _DEBIT_NOT_FOUND if d < 0 or _foreign(bal, d, tenant[i]) else \
            _check(bal, d, 0, amount[i], currency[i], False)
        if credit_local[i]:
            c = credit_slot[i]
            credit_code = _CREDIT_NOT_FOUND if c < 0 or _foreign(bal, c, tenant[i]) else \
                _check(bal, c, 1, amount[i], currency[i], False)
            # The lowest code has precedence (processor.codes).
            if credit_code != _OK and (code == _OK or credit_code < code):
                code = credit_code
        codes[i] = code
        if code != _OK:
            continue
        if credit_local[i]:
            c = credit_slot[i]
            bal[d, U_DPO] += amount[i]
            bal[d, UP_D] += amount[i]
            bal[c, U_CPO] += amount[i]
            bal[c, UP_C] += amount[i]
        else:
            bal[d, RES_D] += amount[i]


@njit(cache=True)
def reserve_plain(bal: np.ndarray, credit_slot: np.ndarray, amount: np.ndarray,
                  currency: np.ndarray, tenant: np.ndarray, codes: np.ndarray) -> None:
    """Check and hold, in order, credit legs of transfers coordinated by another shard.

    The remote view: only committed accounts, committed balances plus every uncommitted
    increase plus all holds (``AccountState.check(remote=True)``). A granted leg raises
    RES_C, so it counts against the legs after it.
    """
    for i in range(codes.shape[0]):
        c = credit_slot[i]
        if c < 0 or bal[c, COMMITTED] == 0 or _foreign(bal, c, tenant[i]):
            codes[i] = _CREDIT_NOT_FOUND
            continue
        code = _check(bal, c, 1, amount[i], currency[i], True)
        codes[i] = code
        if code == _OK:
            bal[c, RES_C] += amount[i]


@njit(cache=True)
def scatter_add(bal: np.ndarray, slots: np.ndarray, column: int, values: np.ndarray,
                sign: int) -> None:
    """bal[slots[i], column] += sign * values[i], for slots that may repeat."""
    for i in range(slots.shape[0]):
        bal[slots[i], column] += sign * values[i]


def warm_up() -> None:
    """Compile (or load from the cache) every kernel now, not on the first batch."""
    bal = np.zeros((2, COLUMNS), dtype=np.int64)
    bal[:, COMMITTED] = 1
    one = np.ones(1, dtype=np.int64)
    slot = np.zeros(1, dtype=np.int64)
    codes = np.zeros(1, dtype=np.int64)
    plan_plain(bal, slot, slot + 1, np.ones(1, dtype=np.bool_), one, np.zeros(1, np.int64),
               np.zeros(1, np.int64), codes)
    reserve_plain(bal, slot, one, np.zeros(1, np.int64), np.zeros(1, np.int64), codes)
    scatter_add(bal, slot, RES_C, one, -1)
