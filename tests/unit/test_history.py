"""Tests of processor.history: RFC 3339 instants, cursors and the balance reference model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.history import (
    AccountTransfersFilter,
    Expiry,
    HistoryError,
    Position,
    TransfersQuery,
    balances_at,
    decode_cursor,
    encode_cursor,
    format_rfc3339_ns,
    parse_rfc3339_ns,
)
from processor.types import ID_MAX, Transfer, TransferFlags


@pytest.mark.parametrize(("text", "nanos"), [
    ("1970-01-01T00:00:00Z", 0),
    ("1970-01-01T00:00:00.000000001Z", 1),
    ("1970-01-01T00:00:01.5Z", 1_500_000_000),
    ("1970-01-01t01:00:00+01:00", 0),
    ("1969-12-31T23:00:00-01:00", 0),
    ("2026-12-01T00:00:00.123456789Z", 1_796_083_200_123_456_789),
    ("2262-04-11T23:47:16.854775807Z", ID_MAX),
])
def test_instants_parse_to_the_nanosecond(text: str, nanos: int) -> None:
    """Offsets, fractions of one to nine digits and both ends of the range parse exactly."""
    assert parse_rfc3339_ns(text) == nanos


@pytest.mark.parametrize("text", [
    "", "2026-12-01", "2026-12-01T00:00:00", "2026-12-01T00:00:00.Z",
    "2026-12-01T00:00:00.1234567890Z", "2026-02-30T00:00:00Z", "2026-12-01T24:00:00Z",
    "2026-12-01T23:59:60Z", "2026-12-01T00:00:00+24:00", "1969-12-31T23:59:59Z",
    "2262-04-11T23:47:16.854775808Z", "\uff11970-01-01T00:00:00Z", "2026-12-01 00:00:00Z",
])
def test_bad_instants_are_invalid_query(text: str) -> None:
    """No offset, impossible dates, leap seconds and out-of-range instants are refused."""
    with pytest.raises(HistoryError) as refused:
        parse_rfc3339_ns(text, "from")
    assert refused.value.code == "invalid_query" and "from" in refused.value.message


@given(st.integers(0, ID_MAX))
def test_format_and_parse_round_trip(nanos: int) -> None:
    """Every timestamp the ledger can assign formats to text that parses back to it."""
    assert parse_rfc3339_ns(format_rfc3339_ns(nanos)) == nanos


def test_cursors_round_trip_and_are_bound_to_their_filters() -> None:
    """A cursor gives back its position with the same filters and is refused with any
    other account, order, side, range or kind of list, or when altered."""
    base = AccountTransfersFilter(account_id=7, from_ns=5, to_ns=99)
    cursor = encode_cursor(base, Position(42, 9))
    same = AccountTransfersFilter(account_id=7, from_ns=5, to_ns=99, cursor=cursor, limit=3)
    assert decode_cursor(same) == Position(42, 9)
    assert decode_cursor(base) is None
    others = [
        AccountTransfersFilter(account_id=8, from_ns=5, to_ns=99, cursor=cursor),
        AccountTransfersFilter(account_id=7, from_ns=5, to_ns=99, cursor=cursor, order="desc"),
        AccountTransfersFilter(account_id=7, from_ns=5, to_ns=99, cursor=cursor,
                               side="debits"),
        AccountTransfersFilter(account_id=7, from_ns=6, to_ns=99, cursor=cursor),
        TransfersQuery(from_ns=5, to_ns=99, cursor=cursor),
        AccountTransfersFilter(account_id=7, from_ns=5, to_ns=99,
                               cursor=cursor[:-1] + ("A" if cursor[-1] != "A" else "B")),
        AccountTransfersFilter(account_id=7, from_ns=5, to_ns=99, cursor="x" * 35),
        AccountTransfersFilter(account_id=7, from_ns=5, to_ns=99, cursor="!" * 35),
    ]
    for query in others:
        with pytest.raises(HistoryError) as refused:
            decode_cursor(query)
        assert refused.value.code == "invalid_cursor"


def _t(tid: int, d: int, c: int, amount: int, ts: int, flags: int = 0,
       pending_id: int = 0) -> Transfer:
    return Transfer(id=tid, debit_account_id=d, credit_account_id=c, amount=amount,
                    currency="EUR", flags=flags, pending_id=pending_id, timestamp=ts)


def test_balances_at_apply_holds_posts_voids_and_expiries_at_their_own_instants() -> None:
    """A hold counts from its timestamp; its post, void or expiry changes it from theirs."""
    pending, post, void = (int(TransferFlags.PENDING), int(TransferFlags.POST_PENDING),
                           int(TransferFlags.VOID_PENDING))
    rows = [_t(1, 10, 20, 100, ts=1), _t(2, 10, 20, 50, ts=2, flags=pending),
            _t(3, 10, 20, 30, ts=3, flags=post, pending_id=2),
            _t(4, 20, 10, 7, ts=4, flags=pending), _t(5, 20, 10, 7, ts=5, flags=void,
                                                       pending_id=4),
            _t(6, 10, 20, 9, ts=6, flags=pending), _t(7, 30, 20, 1, ts=7)]
    expiries = [Expiry(6, 8)]

    def at(ns: int, account: int = 10) -> tuple[int, int, int, int]:
        b = balances_at(rows, expiries, account, ns)
        return b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted

    assert at(0) == (0, 0, 0, 0)
    assert at(1) == (0, 100, 0, 0)
    assert at(2) == (50, 100, 0, 0)
    assert at(3) == (0, 130, 0, 0)
    assert at(4) == (0, 130, 7, 0)
    assert at(5) == (0, 130, 0, 0)
    assert at(7) == (9, 130, 0, 0)
    assert at(8) == (0, 130, 0, 0)
    assert at(8, account=20) == (0, 0, 0, 131)
