"""The history indexer's window policy (processor/history_index.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from processor.history_index import (
    WINDOW_NS_MAX,
    WINDOW_NS_MIN,
    next_width_ns,
    window_end,
)


def test_window_stops_at_the_horizon_and_the_width() -> None:
    assert window_end(100, 1_000, 50, 101) == 150
    assert window_end(100, 120, 50, 101) == 120
    assert window_end(100, 100, 50, 101) == 100  # nothing above the position is final
    assert window_end(100, 90, 50, 101) == 100


def test_first_window_starts_at_the_first_movement() -> None:
    """Nothing indexed yet: the window starts just below the first movement, not at 0;
    with no movement at all it runs to the horizon."""
    assert window_end(0, 10**18, 1_000, 5 * 10**17) == 5 * 10**17 - 1 + 1_000
    assert window_end(0, 10**18, 1_000, None) == 10**18
    assert window_end(0, 10**18, 1_000, 2 * 10**18) == 10**18


@given(position=st.integers(0, 2**62), ahead=st.integers(-10**9, 10**12),
       width=st.integers(1, 10**12), first_gap=st.integers(1, 10**12) | st.none())
def test_window_is_never_empty_when_behind_nor_past_the_horizon(
        position: int, ahead: int, width: int, first_gap: int | None) -> None:
    horizon = max(0, position + ahead)
    first = None if first_gap is None else position + first_gap
    end = window_end(position, horizon, width, first)
    assert position <= end <= max(position, horizon)
    assert (end > position) == (horizon > position)


def test_width_follows_the_rows() -> None:
    assert next_width_ns(1_000_000_000, 300, target=100) == 500_000_000
    assert next_width_ns(1_000_000_000, 10, target=100) == 2_000_000_000
    assert next_width_ns(1_000_000_000, 100, target=100) == 1_000_000_000
    assert next_width_ns(WINDOW_NS_MIN, 10**9) == WINDOW_NS_MIN
    assert next_width_ns(WINDOW_NS_MAX, 0) == WINDOW_NS_MAX
