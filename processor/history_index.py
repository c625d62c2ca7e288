"""The account-history indexer's pure part: how wide its next timestamp window is.

The indexer (actors/ledger/indexer.py) copies the movements committed below the history
horizon into ``account_history`` one timestamp window ``(position, end]`` at a time, each
window one INSERT in one transaction. A window is as wide as the horizon allows, but no
wider than ``width_ns``, which adapts to the rows the last window held: halved when it
held over twice the target (so one statement stays well inside the statement timeout
while catching up on a large backlog), doubled when it held under a quarter (so a long
idle stretch of time is crossed in a few steps). No I/O here.
"""

from __future__ import annotations

from processor.types import require

__all__ = [
    "WINDOW_NS_INITIAL",
    "WINDOW_NS_MAX",
    "WINDOW_NS_MIN",
    "WINDOW_ROWS_TARGET",
    "next_width_ns",
    "window_end",
]

# Transfers per window the indexer aims at: one INSERT of about twice as many rows.
WINDOW_ROWS_TARGET = 50_000
WINDOW_NS_MIN = 1_000_000  # a millisecond
WINDOW_NS_INITIAL = 1_000_000_000  # a second
WINDOW_NS_MAX = 3_600 * 1_000_000_000  # an hour


def window_end(position: int, horizon: int, width_ns: int, first: int | None) -> int:
    """The end (inclusive) of the next window after ``position``: at most ``horizon``, at
    most ``width_ns`` past ``position`` (or past ``first - 1``, the earliest movement above
    the position when the caller knows it; None: there is none at or below the horizon).
    Returns ``position`` when there is nothing to do."""
    require(width_ns >= 1, "a window has a width")
    if horizon <= position:
        return position
    if first is None:
        return horizon
    start = max(position, first - 1)
    return min(horizon, start + width_ns)


def next_width_ns(width_ns: int, transfers: int, *, target: int = WINDOW_ROWS_TARGET) -> int:
    """The width of the window after one that held ``transfers`` movements."""
    if transfers > 2 * target:
        return max(WINDOW_NS_MIN, width_ns // 2)
    if transfers < target // 4:
        return min(WINDOW_NS_MAX, width_ns * 2)
    return width_ns
