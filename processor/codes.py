"""Result codes: one closed enum per operation, named after the rule that was broken.

The numeric order is the precedence: when several rules are broken by one item, the code
with the smallest value is reported. Values are stable and part of the wire protocol; new
codes are only ever appended with a new value, never renumbered.

``ok`` and ``exists`` are successes (``exists`` means an identical item was already
stored; the stored item is unchanged). Every other code is a failure that wrote nothing.
"""

from __future__ import annotations

import enum

__all__ = ["AccountResult", "TransferResult", "burns_id", "is_success"]


class AccountResult(enum.IntEnum):
    ok = 0
    id_must_not_be_zero = 1
    flags_unknown = 2
    flags_are_mutually_exclusive = 3
    currency_unknown = 4
    debits_pending_must_be_zero = 5
    debits_posted_must_be_zero = 6
    credits_pending_must_be_zero = 7
    credits_posted_must_be_zero = 8
    timestamp_must_be_zero = 9
    exists_with_different_flags = 10
    exists_with_different_currency = 11
    exists_with_different_code = 12
    exists_with_different_user_data = 13
    exists = 14
    # The id is taken by another tenant's account. Reported instead of any other
    # ``exists_with_different_*`` code (nothing of that account is compared or revealed).
    exists_with_different_tenant = 15


class TransferResult(enum.IntEnum):
    ok = 0
    linked_event_failed = 1
    linked_event_chain_open = 2
    id_must_not_be_zero = 3
    flags_unknown = 4
    flags_are_mutually_exclusive = 5
    debit_account_id_must_not_be_zero = 6
    credit_account_id_must_not_be_zero = 7
    accounts_must_be_different = 8
    pending_id_must_be_zero = 9
    pending_id_must_not_be_zero = 10
    pending_id_must_be_different = 11
    two_phase_transfers_in_chain_must_share_shard = 12
    timeout_reserved_for_pending_transfer = 13
    amount_must_not_be_zero = 14
    currency_unknown = 15
    timestamp_must_be_zero = 16
    exists_with_different_flags = 17
    exists_with_different_pending_id = 18
    exists_with_different_timeout = 19
    exists_with_different_debit_account_id = 20
    exists_with_different_credit_account_id = 21
    exists_with_different_amount = 22
    exists_with_different_currency = 23
    exists_with_different_code = 24
    exists_with_different_user_data = 25
    exists = 26
    id_already_failed = 27
    pending_transfer_not_found = 28
    pending_transfer_not_pending = 29
    pending_transfer_has_different_debit_account_id = 30
    pending_transfer_has_different_credit_account_id = 31
    pending_transfer_has_different_currency = 32
    pending_transfer_has_different_amount = 33
    exceeds_pending_transfer_amount = 34
    pending_transfer_already_posted = 35
    pending_transfer_already_voided = 36
    pending_transfer_expired = 37
    debit_account_not_found = 38
    credit_account_not_found = 39
    currency_mismatch = 40
    overflows_debits_pending = 41
    overflows_credits_pending = 42
    overflows_debits_posted = 43
    overflows_credits_posted = 44
    overflows_debits = 45
    overflows_credits = 46
    overflows_timeout = 47
    exceeds_credits = 48
    exceeds_debits = 49
    # Not a rule: the shard coordinating this transfer could not be reached while other
    # parts of the request were answered, and the database shows it was not stored (its id
    # is not burned). Send it again. Never reported when no part of a request was stored:
    # then the whole request fails as ``unavailable`` (docs/api.md, "Partial answers").
    not_applied = 50
    # The id is taken by another tenant's transfer. Reported before the fields are
    # compared, so nothing of that transfer is revealed; it burns nothing.
    exists_with_different_tenant = 51
    # The debit and credit accounts live in different databases (several databases,
    # docs/design.md §12), which one transaction cannot span; refused by the front before
    # any shard sees it, so it burns nothing and depends only on the two account ids.
    accounts_in_different_databases = 52
    # The id is that of a transfer stored in a month an archive took out of the database
    # (`txproc archive`, docs/operations.md): it is not applied again and nothing is
    # compared (the fields are in the archive's files); it burns nothing. After the archive
    # is restored the same transfer answers ``exists`` (or a conflict) as before.
    id_archived = 53


def is_success(code: AccountResult | TransferResult) -> bool:
    """True for ``ok`` and ``exists``: the item is stored exactly as submitted."""
    return code.name in ("ok", "exists")


# Codes from pending_transfer_not_found on depend on the state of the ledger when the
# transfer was evaluated; a transfer failing with one of them is recorded, so that the same
# id can never succeed later (docs/design.md, "Failed ids are burned"). Codes before it are
# deterministic in the transfer's own fields and burn nothing: the client may fix the fields
# and reuse the id.
FIRST_BURNING_CODE = TransferResult.pending_transfer_not_found


def burns_id(code: TransferResult) -> bool:
    """True if a transfer failing with ``code`` is recorded as failed under its id."""
    return FIRST_BURNING_CODE <= code < TransferResult.not_applied
