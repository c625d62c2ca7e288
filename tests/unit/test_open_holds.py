"""``OpenHolds`` against the scan it replaced: every open hold looked at, in dict order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.ledger import PartitionMap
from processor.ledger.holds import OpenHolds
from processor.ledger.rules import Book, PendingState
from processor.types import Transfer, TransferFlags


@dataclass(frozen=True)
class _State:
    expires_at_ns: int
    tag: int


def _scan_due(reference: dict[int, _State], now_ns: int) -> list[tuple[int, _State]]:
    """The shard's old way: every open hold, in insertion order, removed when due."""
    due = [(i, s) for i, s in reference.items() if s.expires_at_ns and now_ns >= s.expires_at_ns]
    for i, _ in due:
        del reference[i]
    return due


_IDS = st.integers(1, 12)
_OPS = st.lists(st.one_of(
    st.tuples(st.just("set"), _IDS, st.sampled_from([0, 0, 5, 10, 15, 20, 30])),
    st.tuples(st.just("reset_same"), _IDS, st.just(0)),
    st.tuples(st.just("restore"), _IDS, st.just(0)),
    st.tuples(st.just("del"), _IDS, st.just(0)),
    st.tuples(st.just("pop"), _IDS, st.just(0)),
    st.tuples(st.just("due"), st.just(0), st.integers(0, 35)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(_OPS)
def test_due_holds_are_those_the_scan_found_in_the_same_order(ops) -> None:  # type: ignore[no-untyped-def]
    holds: OpenHolds[_State] = OpenHolds()
    reference: dict[int, _State] = {}
    removed: dict[int, _State] = {}  # the state each id last had when it was removed
    for n, (op, hold_id, value) in enumerate(ops):
        if op == "set":
            state = _State(value, n)
            holds[hold_id] = state
            reference[hold_id] = state
        elif op == "reset_same" and hold_id in reference:
            # The same state set again while open (the undo path sets a hold it popped).
            holds[hold_id] = reference[hold_id]
            reference[hold_id] = reference[hold_id]
        elif op == "restore" and hold_id in removed and hold_id not in reference:
            # The very state removed before, set again (the undo of a post or void).
            holds[hold_id] = reference[hold_id] = removed[hold_id]
        elif op == "del" and hold_id in reference:
            del holds[hold_id]
            removed[hold_id] = reference.pop(hold_id)
        elif op == "pop":
            assert holds.pop(hold_id, None) == reference.get(hold_id)
            if hold_id in reference:
                removed[hold_id] = reference.pop(hold_id)
        elif op == "due":
            assert holds.any_due(value) == any(
                s.expires_at_ns and value >= s.expires_at_ns for s in reference.values())
            assert holds.pop_due(value) == _scan_due(reference, value)
        assert dict(holds) == reference
        assert list(holds) == list(reference)
    # The heap keeps at most twice the open holds, and a constant, once compacted.
    holds.pop_due(0)
    assert len(holds._deadlines) <= 2 * len(holds) + 64


def test_posted_holds_leave_no_unbounded_heap() -> None:
    """Holds posted before their deadline (the common case for payments) do not pile up."""
    holds: OpenHolds[_State] = OpenHolds()
    for i in range(10_000):
        holds[i] = _State(10**12 + i, i)
        del holds[i]
    assert len(holds) == 0
    assert len(holds._deadlines) <= 64 + 1
    assert not holds.any_due(10**13)


def test_only_assignment_and_removal_change_it() -> None:
    holds: OpenHolds[_State] = OpenHolds()
    with pytest.raises(TypeError):
        holds.update({1: _State(0, 0)})
    with pytest.raises(TypeError):
        holds.setdefault(1, _State(0, 0))
    with pytest.raises(KeyError):
        holds.pop(7)


def test_a_book_expires_its_due_hold_and_keeps_the_others() -> None:
    book = Book(0, PartitionMap.uniform(1), recent_ids_max=100)
    assert isinstance(book.pending, OpenHolds)
    pending = int(TransferFlags.PENDING)
    for i, timeout_s in ((1, 0), (2, 5), (3, 1), (4, 0)):
        t = Transfer(id=i, debit_account_id=10, credit_account_id=11, amount=1,
                     currency="EUR", flags=pending, timeout_s=timeout_s, timestamp=1)
        book.load_pending(t)
    assert book.pending.pop_due(1 + 2 * 10**9) == [(3, book_state(3, 1))]
    assert sorted(book.pending) == [1, 2, 4]


def book_state(hold_id: int, timeout_s: int) -> PendingState:
    t = Transfer(id=hold_id, debit_account_id=10, credit_account_id=11, amount=1,
                 currency="EUR", flags=int(TransferFlags.PENDING), timeout_s=timeout_s,
                 timestamp=1)
    return PendingState(t, 1 + timeout_s * 10**9)


def test_a_hold_set_again_expires_in_its_new_place() -> None:
    """The undo of a post sets the very state it removed: the hold is then last in order,
    as in the dict, and its earlier heap entry no longer counts."""
    holds: OpenHolds[_State] = OpenHolds()
    a, b = _State(5, 0), _State(5, 1)
    holds[1] = a
    holds[2] = b
    holds.pop(1)
    holds[1] = a
    assert list(holds) == [2, 1]
    assert holds.pop_due(5) == [(2, b), (1, a)]
    assert not holds and not holds.any_due(10)
