"""The change stream of committed transfers: the pure part.

A consumer reads its tenant's committed transfers page by page, each page continuing from a
cursor (docs/design.md, "The change stream"). The cursor is a vector: for each shard, the
greatest timestamp of that shard's transfers the consumer has been given (or that a read
has passed with nothing for it). A shard commits its batches one at a time in timestamp
order and its timestamps strictly increase, so "every row of shard s with a timestamp above
cursor[s], up to the position the shard has committed" is exactly what is new to the
consumer: nothing is given twice and nothing is skipped, whatever commits meanwhile and
whichever side restarts.

What is here: the cursor (encode, decode, advance), the window plan a shard's read follows
so that a page never scans more than it must, and the merge of the shards' reads into one
page with its next cursor. No I/O; the store (actors/ledger/stream.py) runs the queries.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from collections.abc import Sequence
from typing import Protocol

import msgspec

from processor.history import HISTORY_LIMIT_MAX, HistoryError
from processor.types import ID_MAX, Transfer, require

__all__ = [
    "STREAM_CURSOR_CHARS_MAX",
    "STREAM_LIMIT_DEFAULT",
    "STREAM_LIMIT_MAX",
    "STREAM_POLL_INTERVAL_S",
    "STREAM_SCAN_ROWS_MAX",
    "STREAM_SHARDS_MAX",
    "STREAM_WAITERS_MAX",
    "STREAM_WAIT_S_DEFAULT",
    "STREAM_WAIT_S_MAX",
    "STREAM_WINDOW_GROWTH",
    "STREAM_WINDOW_NS_FIRST",
    "STREAM_WINDOW_ROUNDS_MAX",
    "ShardRead",
    "StreamCursor",
    "StreamItem",
    "StreamPage",
    "StreamService",
    "decode_stream_cursor",
    "encode_stream_cursor",
    "item_cursors",
    "merge_reads",
    "next_span_ns",
]

# A page holds at most as many transfers as a create request, as history pages do.
STREAM_LIMIT_MAX = HISTORY_LIMIT_MAX
STREAM_LIMIT_DEFAULT = 100
# A long poll waits at most this long for something new: below the RPC client's default
# call timeout (30 s) and the idle timeouts of common HTTP proxies.
STREAM_WAIT_S_MAX = 20.0
# What the HTTP endpoint waits when the request does not say (the RPC call's default is 0).
STREAM_WAIT_S_DEFAULT = 10.0
# How often a waiting request looks at the shards' positions again (a small query).
STREAM_POLL_INTERVAL_S = 0.25
# Requests waiting at once on one front; one more is refused ``overloaded``, as every
# waiter polls the front's two history connections.
STREAM_WAITERS_MAX = 64
# A shard's read in one request reads at most this many rows of any tenant: a consumer of
# a tenant with few transfers among many gets a short (even empty) page with a cursor that
# moved on, never one unbounded scan.
STREAM_SCAN_ROWS_MAX = 65_536
# A shard's read covers windows of timestamps after the cursor: the first 10 ms wide, each
# next one sized for the rows still wanted at the last one's density (``next_span_ns``),
# 2 to 16 times wider, at most 12 of them per request (16-fold each time they reach about
# 5,900 years: a consumer from the beginning, 1970, reaches today in one request, over
# empty windows the BRIN answers without reading a row). Rows are stored roughly in
# timestamp order and the BRIN on timestamp skips the blocks outside a window, so a
# consumer that fell far behind reads about a page's worth per request instead of
# everything after its cursor.
STREAM_WINDOW_NS_FIRST = 10_000_000
STREAM_WINDOW_GROWTH = 16
STREAM_WINDOW_ROUNDS_MAX = 12

# The cursor: URL-safe base64 without padding of a version, the kind (4: the stream; the
# history lists use 1 to 3), the number of shards, one big-endian timestamp per shard, and
# 4 bytes of a digest of the rest, so a cursor mangled in transit is refused rather than
# silently starting somewhere else.
_HEADER = struct.Struct(">BBH")
# At most one shard per partition (processor.ledger.PARTITIONS, not imported: the client
# imports this module and should not load the ledger's kernels; a unit test pins it).
STREAM_SHARDS_MAX = 256
_CHECK_BYTES = 4
_VERSION = 1
_KIND = 4
STREAM_CURSOR_CHARS_MAX = -(-(_HEADER.size + 8 * STREAM_SHARDS_MAX + _CHECK_BYTES) * 4 // 3)


class StreamCursor(msgspec.Struct, frozen=True):
    """Per shard (by index), the greatest timestamp already given to the consumer or passed
    by a read; 0 before the first."""

    positions: tuple[int, ...]

    @classmethod
    def start(cls, shards: int) -> StreamCursor:
        return cls((0,) * shards)

    def advance(self, shard: int, timestamp: int) -> StreamCursor:
        """This cursor with ``shard``'s position moved up to ``timestamp``."""
        require(timestamp >= self.positions[shard], "a stream cursor only moves forward")
        positions = list(self.positions)
        positions[shard] = timestamp
        return StreamCursor(tuple(positions))


class StreamItem(msgspec.Struct, frozen=True):
    """One transfer of the stream and the cursor that resumes right after it."""

    cursor: str
    transfer: Transfer


class StreamPage(msgspec.Struct, frozen=True, kw_only=True):
    """The transfers of a page in delivery order, the shard of each, and the cursor to
    continue from (also when the page is empty: it may have moved past other tenants'
    rows)."""

    data: list[Transfer]
    shards: list[int]
    next_cursor: str


class StreamService(Protocol):
    """What the edges call; the front implements it over its history pool.

    ``tenant`` is the caller's tenant slot: only the transfers that tenant created are
    given (the processor's own token: the processor's). Raises ``HistoryError``
    (``invalid_cursor``) for a cursor this ledger did not give, ``Overloaded`` when too
    many requests wait already, ``Unavailable`` when the database cannot answer."""

    async def stream_transfers(self, after: str, limit: int, wait_s: float,
                               tenant: int) -> StreamPage: ...


def _check(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_CHECK_BYTES, person=b"txproc-stream").digest()


def encode_stream_cursor(cursor: StreamCursor) -> str:
    """The opaque text of ``cursor``."""
    shards = len(cursor.positions)
    require(1 <= shards <= STREAM_SHARDS_MAX, "a ledger has 1 to 256 shards")
    body = _HEADER.pack(_VERSION, _KIND, shards) + struct.pack(f">{shards}q", *cursor.positions)
    return base64.urlsafe_b64encode(body + _check(body)).rstrip(b"=").decode()


_CURSOR_TEXT = re.compile(r"[A-Za-z0-9_-]+")


def decode_stream_cursor(text: str, shards: int | None) -> StreamCursor:
    """The cursor ``text`` names on a ledger of ``shards`` shards (None: any number); the
    start for "" (which needs ``shards``).

    Raises ``HistoryError`` (``invalid_cursor``) for text that is not a stream cursor, is
    damaged, or was made for another number of shards (a ledger's shard count never
    changes; a cursor of another ledger is refused, not mapped)."""
    bad = HistoryError("invalid_cursor", "the cursor is not one this stream gave")
    if not text and shards is not None:
        return StreamCursor.start(shards)
    if len(text) > STREAM_CURSOR_CHARS_MAX or _CURSOR_TEXT.fullmatch(text) is None:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise bad from exc
    if len(raw) < _HEADER.size + _CHECK_BYTES:
        raise bad
    body, check = raw[:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
    version, kind, count = _HEADER.unpack_from(body)
    if (check != _check(body) or version != _VERSION or kind != _KIND or count < 1
            or len(body) != _HEADER.size + 8 * count):
        raise bad
    if shards is not None and count != shards:
        raise HistoryError("invalid_cursor", f"the cursor was made for a ledger of {count} "
                                             f"shards; this one has {shards}")
    positions = struct.unpack_from(f">{count}q", body, _HEADER.size)
    if not all(0 <= p <= ID_MAX for p in positions):
        raise bad
    return StreamCursor(positions)


def next_span_ns(span_ns: int, matched: int, wanted: int) -> int:
    """The width of a shard read's next window after one ``span_ns`` wide gave ``matched``
    rows of the tenant and ``wanted`` more would fill the page: wide enough for them at
    that window's density, with a quarter to spare, and from 2 to ``STREAM_WINDOW_GROWTH``
    times the last width (that many times when nothing matched)."""
    require(span_ns >= 1 and matched >= 0 and wanted >= 1, "a window and a page to fill")
    if matched == 0:
        return span_ns * STREAM_WINDOW_GROWTH
    estimate = span_ns * wanted * 5 // (matched * 4)
    return min(span_ns * STREAM_WINDOW_GROWTH, max(span_ns * 2, estimate))


class ShardRead(msgspec.Struct, frozen=True):
    """What a read of one shard found: its rows after the cursor in timestamp order, and
    ``scanned_ns``, the timestamp up to which every row of the shard was read (the rows
    given are all of the tenant's up to it, or the first of them if the read stopped at a
    full page, with ``scanned_ns`` its last row's timestamp)."""

    shard: int
    rows: list[Transfer]
    scanned_ns: int


def merge_reads(after: StreamCursor, reads: Sequence[ShardRead], limit: int) -> StreamPage:
    """One page of at most ``limit`` transfers from the shards' reads, merged in
    ``(timestamp, shard, id)`` order, and the cursor after it.

    A shard all of whose rows made the page moves to its ``scanned_ns``; a shard cut short
    by ``limit`` moves to the last of its rows on the page, so the next page starts with
    the first one left out."""
    require(1 <= limit <= STREAM_LIMIT_MAX, "a page holds 1 to 8189 transfers")
    merged: list[tuple[int, int, int, Transfer]] = []
    for read in reads:
        previous = after.positions[read.shard]
        require(read.scanned_ns >= previous, "a read does not go back")
        for row in read.rows:
            require(previous < row.timestamp <= read.scanned_ns,
                    "a shard's rows strictly increase within its read")
            previous = row.timestamp
            merged.append((row.timestamp, read.shard, row.id, row))
    merged.sort(key=lambda entry: entry[:3])
    page, left_out = merged[:limit], merged[limit:]
    cut = {shard for _, shard, _, _ in left_out}
    positions = list(after.positions)
    for read in reads:
        if read.shard not in cut:
            positions[read.shard] = read.scanned_ns
    for timestamp, shard, _, _ in page:  # in timestamp order: the last one stays
        if shard in cut:
            positions[shard] = timestamp
    return StreamPage(data=[row for *_, row in page], shards=[s for _, s, _, _ in page],
                      next_cursor=encode_stream_cursor(StreamCursor(tuple(positions))))


def item_cursors(after: str, page: StreamPage) -> list[str]:
    """The cursor that resumes right after each transfer of ``page`` (which continued from
    ``after``), computed from the shards the page names: the HTTP lines' and the client's
    items' own. Raises ``HistoryError`` (``invalid_cursor``) if ``after`` is not a cursor
    of the page's ledger."""
    shards = len(decode_stream_cursor(page.next_cursor, None).positions)
    cursor = decode_stream_cursor(after, shards)
    out = []
    for row, shard in zip(page.data, page.shards, strict=True):
        cursor = cursor.advance(shard, row.timestamp)
        out.append(encode_stream_cursor(cursor))
    return out
