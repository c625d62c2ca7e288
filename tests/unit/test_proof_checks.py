"""The verify checks of processor/ledger/proof.py on hand-made arrays: a database whose
only resolutions are expiries, and the balance check's legs held by another database
(docs/design.md §12, "Moving a shard")."""

from __future__ import annotations

import numpy as np

from processor.ledger import PARTITIONS, BalanceCheck, PendingCheck, Report, partition_of

_PENDING = 2


def _ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_expiries_without_any_post_or_void_are_checked() -> None:
    """Holds resolved only by expiry (no post or void anywhere in the database) pass; the
    check used to index an empty array of posts and crash."""
    report = Report()
    pending = PendingCheck(report, resolution_pending=_ints(7), resolution_kind=_ints(3),
                           resolution_transfer=_ints(0))
    pending.feed(id=_ints(7), pending_id=_ints(0), amount=_ints(5), flags=_ints(_PENDING))
    pending.finish()
    assert report.problems == []


def _check(mapped: np.ndarray | None, stored: list[list[int]]) -> Report:
    """Account 1 here, account 2 absent; one plain transfer 1 -> 2 of 10."""
    report = Report()
    balances = BalanceCheck(report, ids=_ints(1), currency=np.array([b"EUR"], dtype="S3"),
                            flags=_ints(0), stored=np.array(stored, dtype=np.int64),
                            resolved=_ints(), mapped=mapped)
    balances.feed(id=_ints(9), debit=_ints(1), credit=_ints(2), amount=_ints(10),
                  currency=np.array([b"EUR"], dtype="S3"), flags=_ints(0))
    balances.finish()
    return report


def test_a_leg_on_an_account_of_another_database_counts_there() -> None:
    """Rows: a credit leg whose account's partition this database does not hold counts
    elsewhere (the currency balances with it); held here, the absent account is missing;
    with no map, everything is here as before."""
    elsewhere = np.ones(PARTITIONS, dtype=bool)
    elsewhere[partition_of(2)] = False
    kinds = [
        (elsewhere, [[0, 10, 0, 0]], set()),
        (elsewhere, [[0, 11, 0, 0]], {"debits_posted_mismatch",
                                      "currency_posted_not_balanced"}),
        (np.ones(PARTITIONS, dtype=bool), [[0, 10, 0, 0]], {"credit_account_missing",
                                                           "currency_posted_not_balanced"}),
        (None, [[0, 10, 0, 0]], {"credit_account_missing", "currency_posted_not_balanced"}),
    ]
    for mapped, stored, expected in kinds:
        assert {p.kind for p in _check(mapped, stored).problems} == expected
