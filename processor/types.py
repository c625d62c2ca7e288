"""The public message types of the ledger: accounts, transfers and their flags.

These are the structs that cross every boundary (RPC frames, Ray actor calls, the Python
client). Limits live in the types, so a value outside them is rejected when it is decoded.
Amounts are integer minor units of the ISO 4217 currency beside them; no float is accepted.

Zero is allowed by the types for ids and amounts so that the ledger can answer with a
result code named after the rule (``id_must_not_be_zero``, ``amount_must_not_be_zero``)
instead of rejecting the whole batch; negative numbers, floats and values of 2**63 or more
are rejected at decode time.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = [
    "AMOUNT_MAX",
    "CODE_MAX",
    "ID_MAX",
    "TIMEOUT_S_MAX",
    "USER_DATA_CHARS_MAX",
    "USER_DATA_PATTERN",
    "Account",
    "AccountFlags",
    "InvariantError",
    "Transfer",
    "TransferFlags",
    "require",
]

# PostgreSQL bigint is the storage type of every id, amount and balance.
AMOUNT_MAX = 2**63 - 1
ID_MAX = 2**63 - 1
CODE_MAX = 2**31 - 1
# A pending transfer may be held for at most about 68 years; far beyond any real hold.
TIMEOUT_S_MAX = 2**31 - 1
# Characters, as msgspec counts string length; up to 512 bytes of UTF-8 (the RPC frame
# limit is sized for the worst case).
USER_DATA_CHARS_MAX = 128

U63 = Annotated[int, Meta(ge=0, le=ID_MAX)]
Code = Annotated[int, Meta(ge=0, le=CODE_MAX)]
Flags = Annotated[int, Meta(ge=0, le=0xFFFF)]
TimeoutS = Annotated[int, Meta(ge=0, le=TIMEOUT_S_MAX)]
# The currency's shape is checked here; membership in ISO 4217 is a ledger rule with its
# own result code, so that an unknown code is named rather than reported as a type error.
Currency = Annotated[str, Meta(pattern="^[A-Z]{3}$")]
# PostgreSQL text cannot hold U+0000: one in a commit would fail the shard's whole group
# commit (and restart the shard), so it is refused where items are decoded, as a bad field.
USER_DATA_PATTERN = r"^[^\x00]*$"
UserData = Annotated[str, Meta(max_length=USER_DATA_CHARS_MAX, pattern=USER_DATA_PATTERN)]


class AccountFlags(enum.IntFlag):
    """Bit flags of an account; the two limit flags are mutually exclusive."""

    NONE = 0
    # The account's debits (pending and posted) may never exceed its posted credits:
    # a customer's balance that must not go negative.
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1 << 0
    # The account's credits (pending and posted) may never exceed its posted debits.
    CREDITS_MUST_NOT_EXCEED_DEBITS = 1 << 1
    # Keep the account's four balances after each of its movements in account_history
    # (docs/design.md §16), so that its balances at an instant are one index lookup.
    # Changes nothing on the commit path.
    HISTORY = 1 << 2


ACCOUNT_FLAGS_KNOWN = int(
    AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS
    | AccountFlags.HISTORY
)


class TransferFlags(enum.IntFlag):
    """Bit flags of a transfer."""

    NONE = 0
    # This transfer and the next one in the batch succeed or fail together.
    LINKED = 1 << 0
    # A hold: counts against limits now, moved to posted by a later post_pending.
    PENDING = 1 << 1
    # Posts (all or part of) the pending transfer named by pending_id.
    POST_PENDING = 1 << 2
    # Releases the pending transfer named by pending_id.
    VOID_PENDING = 1 << 3


TRANSFER_FLAGS_KNOWN = int(
    TransferFlags.LINKED
    | TransferFlags.PENDING
    | TransferFlags.POST_PENDING
    | TransferFlags.VOID_PENDING
)


class Account(msgspec.Struct, frozen=True, array_like=True, kw_only=True):
    """A ledger account. Balances, timestamp and tenant are assigned by the server.

    On create, the balance fields and ``timestamp`` must be zero; ``tenant`` is set from the
    caller's token (``processor.identity.tenant_slot``) whatever the caller sent.
    """

    id: U63
    currency: Currency
    flags: Flags = 0
    code: Code = 0
    user_data: UserData = ""
    debits_pending: U63 = 0
    debits_posted: U63 = 0
    credits_pending: U63 = 0
    credits_posted: U63 = 0
    timestamp: U63 = 0
    tenant: U63 = 0
    # The audit record of the request that created it (docs/security.md, "Audit"), set by
    # the server; 0 for rows made before audit records existed or without a front.
    origin: U63 = 0


class Transfer(msgspec.Struct, frozen=True, array_like=True, kw_only=True):
    """A movement of ``amount`` minor units from the debit account to the credit account.

    ``id`` is the idempotency key of the ledger. ``timestamp`` is assigned by the server
    (nanoseconds since the Unix epoch) and must be zero on create. ``tenant`` is the slot of
    the tenant whose token created it, set by the server; both accounts must belong to that
    tenant unless it is the processor's own (0).
    """

    id: U63
    debit_account_id: U63
    credit_account_id: U63
    amount: U63
    currency: Currency
    flags: Flags = 0
    pending_id: U63 = 0
    timeout_s: TimeoutS = 0
    code: Code = 0
    user_data: UserData = ""
    timestamp: U63 = 0
    tenant: U63 = 0
    # The audit record of the request that created it (docs/security.md, "Audit"), set by
    # the server; 0 for rows made before audit records existed or without a front.
    origin: U63 = 0


class InvariantError(AssertionError):
    """A broken invariant: a bug. The shard crashes and recovers from the database."""


def require(condition: bool, what: str) -> None:
    """Assert ``condition``; unlike ``assert`` it still runs under ``python -O``."""
    if not condition:
        raise InvariantError(what)
