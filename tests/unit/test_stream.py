"""The change stream's pure part (processor/stream.py): cursors, windows and the merge."""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor import stream
from processor.history import HistoryError
from processor.ledger import PARTITIONS
from processor.stream import (
    STREAM_SHARDS_MAX,
    STREAM_WINDOW_NS_FIRST,
    STREAM_WINDOW_ROUNDS_MAX,
    ShardRead,
    StreamCursor,
    decode_stream_cursor,
    encode_stream_cursor,
    item_cursors,
    merge_reads,
    next_span_ns,
)
from processor.types import ID_MAX, InvariantError, Transfer


def _t(tid: int, timestamp: int) -> Transfer:
    return Transfer(id=tid, debit_account_id=1, credit_account_id=2, amount=1,
                    currency="EUR", timestamp=timestamp)


def test_the_cursor_holds_a_shard_per_partition_at_most() -> None:
    """The cursor's shard limit is the ledger's partition count, which it cannot import."""
    assert STREAM_SHARDS_MAX == PARTITIONS
    widest = encode_stream_cursor(StreamCursor((ID_MAX,) * STREAM_SHARDS_MAX))
    assert len(widest) <= stream.STREAM_CURSOR_CHARS_MAX


@given(st.lists(st.integers(0, ID_MAX), min_size=1, max_size=300).filter(
    lambda p: len(p) <= STREAM_SHARDS_MAX))
def test_a_cursor_decodes_to_what_was_encoded(positions: list[int]) -> None:
    """Any vector of positions round-trips through its text, which is URL-safe."""
    cursor = StreamCursor(tuple(positions))
    text = encode_stream_cursor(cursor)
    assert text.replace("-", "").replace("_", "").isalnum()
    assert decode_stream_cursor(text, len(positions)) == cursor
    assert decode_stream_cursor(text, None) == cursor


def test_no_cursor_is_the_beginning() -> None:
    """An empty cursor starts every shard at 0; it needs the shard count."""
    assert decode_stream_cursor("", 3) == StreamCursor((0, 0, 0))
    with pytest.raises(HistoryError):
        decode_stream_cursor("", None)


_GOOD = encode_stream_cursor(StreamCursor((5, 7)))
_RAW = base64.urlsafe_b64decode(_GOOD + "=" * (-len(_GOOD) % 4))


def _text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(("text", "why"), [
    ("nonsense", "not base64 of a cursor"),
    ("a", "one character"),
    (_GOOD + "A", "one character more"),
    (_GOOD[:-1], "one character less"),
    (_GOOD[:5] + ("B" if _GOOD[5] != "B" else "C") + _GOOD[6:], "a character changed"),
    (_GOOD + "=", "padding"),
    (_GOOD.replace(_GOOD[0], "+", 1), "not URL-safe"),
    ("x" * (stream.STREAM_CURSOR_CHARS_MAX + 1), "too long"),
    (_text(bytes([2]) + _RAW[1:]), "another version (check not recomputed)"),
    (encode_stream_cursor(StreamCursor((5, 7, 9))), "another shard count"),
])
def test_a_bad_cursor_is_refused(text: str, why: str) -> None:
    """Anything but a cursor this stream gave, for this shard count, is invalid_cursor."""
    with pytest.raises(HistoryError) as refused:
        decode_stream_cursor(text, 2)
    assert refused.value.code == "invalid_cursor", why


def test_a_history_cursor_is_not_a_stream_cursor() -> None:
    """A list's cursor (35 characters, another kind) is refused by the stream."""
    from processor.history import Position, TransfersQuery, encode_cursor
    text = encode_cursor(TransfersQuery(), Position(1, 1))
    with pytest.raises(HistoryError):
        decode_stream_cursor(text, 2)


def test_a_cursor_moves_forward_only() -> None:
    """advance() refuses to move a shard back: that would deliver a row twice."""
    cursor = StreamCursor((5, 7)).advance(1, 9)
    assert cursor == StreamCursor((5, 9))
    with pytest.raises(InvariantError):
        cursor.advance(0, 4)


@pytest.mark.parametrize(("span", "matched", "wanted", "expected"), [
    (100, 0, 50, 1_600),  # nothing matched: 16 times wider
    (100, 10, 10, 200),  # as many again wanted: at least twice as wide
    (100, 10, 40, 500),  # four times as many wanted, a quarter to spare
    (100, 1, 8_000, 1_600),  # never more than 16 times wider
    (100, 50, 1, 200),  # never less than twice as wide
])
def test_the_next_window_is_sized_for_the_rows_still_wanted(
        span: int, matched: int, wanted: int, expected: int) -> None:
    """A window's width follows the density of the last one, between 2 and 16 times it."""
    assert next_span_ns(span, matched, wanted) == expected


def test_empty_windows_reach_from_the_epoch_to_today_in_one_request() -> None:
    """A consumer starting from nothing reaches today's transfers within the rounds a
    request allows, over windows with nothing in them."""
    low, span, now_ns = 0, STREAM_WINDOW_NS_FIRST, 1_765_000_000 * 10**9
    for _ in range(STREAM_WINDOW_ROUNDS_MAX):
        low, span = min(now_ns, low + span), next_span_ns(span, 0, 100)
    assert low == now_ns


def test_merge_orders_by_timestamp_and_moves_each_shard() -> None:
    """A page merges the shards by timestamp; a shard read whole moves to what it scanned,
    one cut by the limit to its last row given."""
    after = StreamCursor((10, 20, 30))
    reads = [ShardRead(0, [_t(1, 11), _t(2, 15), _t(3, 40)], 50),
             ShardRead(1, [_t(4, 21)], 60),
             ShardRead(2, [], 70)]
    page = merge_reads(after, reads, 3)
    assert [t.id for t in page.data] == [1, 2, 4] and page.shards == [0, 0, 1]
    assert decode_stream_cursor(page.next_cursor, 3) == StreamCursor((15, 60, 70))
    whole = merge_reads(after, reads, 10)
    assert [t.id for t in whole.data] == [1, 2, 4, 3]
    assert decode_stream_cursor(whole.next_cursor, 3) == StreamCursor((50, 60, 70))


def test_merge_refuses_a_read_that_would_repeat_or_reorder() -> None:
    """Rows at or behind the cursor, out of order or past the scanned position are a bug."""
    after = StreamCursor((10,))
    for rows, scanned in (([_t(1, 10)], 20), ([_t(1, 15), _t(2, 12)], 20), ([_t(1, 25)], 20)):
        with pytest.raises(InvariantError):
            merge_reads(after, [ShardRead(0, rows, scanned)], 5)


@settings(max_examples=200)
@given(seed=st.integers(0, 2**32), shards=st.integers(1, 4), limit=st.integers(1, 9))
def test_paging_through_everything_gives_each_row_once_in_shard_order(
        seed: int, shards: int, limit: int) -> None:
    """A model of the store: every shard commits rows over time; a consumer pages with
    reads that stop at random limits and positions, saving random item cursors and
    resuming from them. Every row arrives, none twice after the last resume point, and
    each shard's rows come in timestamp order."""
    rng = random.Random(seed)
    stored: list[list[Transfer]] = [[] for _ in range(shards)]
    clocks = [0] * shards
    next_id = iter(range(1, 10**6))
    delivered: list[tuple[str, Transfer, int]] = []
    after = ""
    for _ in range(40):
        for shard in range(shards):
            for _ in range(rng.randrange(4)):
                clocks[shard] += rng.randrange(1, 5)
                stored[shard].append(_t(next(next_id), clocks[shard]))
        cursor = decode_stream_cursor(after, shards)
        reads = []
        for shard in range(shards):
            rows = [t for t in stored[shard] if t.timestamp > cursor.positions[shard]]
            # A read stops at its own limit or at a scan budget: a prefix, scanned to its
            # end or to the shard's position.
            cut = rng.randrange(len(rows) + 1)
            scanned = rows[cut - 1].timestamp if cut < len(rows) and cut else (
                cursor.positions[shard] if cut < len(rows) else
                max(cursor.positions[shard], clocks[shard]))
            reads.append(ShardRead(shard, rows[:cut], scanned))
        page = merge_reads(cursor, reads, limit)
        cursors = item_cursors(after, page)
        delivered.extend(zip(cursors, page.data, page.shards, strict=True))
        after = page.next_cursor
        if delivered and rng.random() < 0.2:  # a restart from a saved item cursor
            keep = rng.randrange(len(delivered))
            after = delivered[keep][0]
            del delivered[keep + 1:]
    # Drain.
    while True:
        cursor = decode_stream_cursor(after, shards)
        reads = [ShardRead(s, [t for t in stored[s] if t.timestamp > cursor.positions[s]],
                           max(cursor.positions[s], clocks[s])) for s in range(shards)]
        page = merge_reads(cursor, reads, limit)
        delivered.extend(zip(item_cursors(after, page), page.data, page.shards, strict=True))
        after = page.next_cursor
        if not page.data:
            break
    ids = [t.id for _, t, _ in delivered]
    assert sorted(ids) == sorted(t.id for rows in stored for t in rows)
    for shard in range(shards):
        mine = [t.timestamp for _, t, s in delivered if s == shard]
        assert mine == sorted(mine) and len(set(mine)) == len(mine)
