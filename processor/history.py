"""Account history, transfer queries and balances at an instant: the pure part.

What the edges (HTTP and RPC) and the store share: the filters as typed structs, their
limits, RFC 3339 instants to nanoseconds and back, the opaque page cursor, and the
reference model of a balance at an instant (``balances_at``), against which the store's
SQL is tested. No I/O here; the store (actors/ledger/history.py) runs the queries.

Every list is keyset-paginated on ``(timestamp, id)``: a cursor names the last row a page
covered, and the next page starts strictly after it (before it, newest first). Rows never
change and a position never moves, so a cursor stays valid while transfers commit; the
store serves only rows at or below a *horizon* every shard has passed, so that no row can
later appear behind a cursor already given (docs/design.md, "History and queries").
"""

from __future__ import annotations

import base64
import calendar
import datetime
import hashlib
import re
import struct
from collections.abc import Iterable
from typing import Annotated, Literal, Protocol

import msgspec
from msgspec import Meta

from processor.errors import TxprocError, register
from processor.service import BATCH_ITEMS_MAX
from processor.types import CODE_MAX, ID_MAX, USER_DATA_CHARS_MAX, Transfer, TransferFlags

__all__ = [
    "HISTORY_LIMIT_DEFAULT",
    "HISTORY_LIMIT_MAX",
    "QUERY_SCAN_ROWS_MAX",
    "TIMESTAMP_END",
    "AccountBalancesAt",
    "AccountTransfersFilter",
    "Expiry",
    "HistoryError",
    "HistoryService",
    "Position",
    "TransfersPage",
    "TransfersQuery",
    "balances_at",
    "decode_cursor",
    "encode_cursor",
    "format_rfc3339_ns",
    "parse_rfc3339_ns",
]

# A page holds at most as many transfers as a create request (TigerBeetle's batch size).
HISTORY_LIMIT_MAX = BATCH_ITEMS_MAX
HISTORY_LIMIT_DEFAULT = 100
# A filtered query reads at most this many of the tenant's rows per request, matching or
# not; a page may then hold fewer than ``limit`` rows with a cursor to read on from, so a
# rare code costs several requests, never one unbounded scan.
QUERY_SCAN_ROWS_MAX = 65_536
# ``to`` when none is given: past every timestamp the ledger can assign.
TIMESTAMP_END = ID_MAX

Nanos = Annotated[int, Meta(ge=0, le=ID_MAX)]
Limit = Annotated[int, Meta(ge=1, le=HISTORY_LIMIT_MAX)]
CursorText = Annotated[str, Meta(max_length=64)]


class HistoryError(TxprocError, ValueError):
    """A filter, instant or cursor the caller sent is not usable: ``code`` is
    ``invalid_query`` or ``invalid_cursor`` (HTTP 400), or ``archived`` (HTTP 410: it reaches
    into months an archive took out of the database, processor/archive.py); over RPC, an
    error of that code."""

    def __init__(self, code: Literal["invalid_query", "invalid_cursor", "archived"],
                 message: str) -> None:
        super().__init__(message, code=code)


register(410, {"archived": "the read reaches into archived months; the message names the "
                           "archive and its boundary (restore it to read them)"})


class AccountTransfersFilter(msgspec.Struct, frozen=True, kw_only=True,
                             forbid_unknown_fields=True):
    """One account's transfers with a timestamp in ``[from_ns, to_ns)``, on ``side``."""

    account_id: Annotated[int, Meta(ge=1, le=ID_MAX)]
    from_ns: Nanos = 0
    to_ns: Nanos = TIMESTAMP_END
    limit: Limit = HISTORY_LIMIT_DEFAULT
    cursor: CursorText = ""
    order: Literal["asc", "desc"] = "asc"
    side: Literal["debits", "credits", "both"] = "both"


class TransfersQuery(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The caller's tenant's transfers with a timestamp in ``[from_ns, to_ns)``, oldest
    first; ``code`` and ``user_data`` (exact) when given."""

    code: Annotated[int, Meta(ge=0, le=CODE_MAX)] | None = None
    user_data: Annotated[str, Meta(max_length=USER_DATA_CHARS_MAX)] | None = None
    from_ns: Nanos = 0
    to_ns: Nanos = TIMESTAMP_END
    limit: Limit = HISTORY_LIMIT_DEFAULT
    cursor: CursorText = ""


class TransfersPage(msgspec.Struct, frozen=True, kw_only=True):
    """Up to ``limit`` transfers in order; ``next_cursor`` reads on, None on the last page."""

    data: list[Transfer]
    next_cursor: str | None


class AccountBalancesAt(msgspec.Struct, frozen=True, kw_only=True):
    """An account's four balances counting every movement with a timestamp at or before
    ``at_ns`` (nanoseconds since the Unix epoch)."""

    account_id: int
    at_ns: int
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int


class HistoryService(Protocol):
    """What the edges call; the front implements it over its own PostgreSQL pool.

    ``tenant`` is the caller's tenant slot (0: the processor's own token, which sees every
    tenant's rows). The account methods answer None for an account the tenant may not
    see, exactly as for an unknown id. Raises ``HistoryError`` for a bad cursor and
    ``processor.errors.Unavailable`` when the database cannot answer."""

    async def get_account_transfers(self, query: AccountTransfersFilter,
                                    tenant: int) -> TransfersPage | None: ...

    async def query_transfers(self, query: TransfersQuery, tenant: int) -> TransfersPage: ...

    async def get_account_balances(self, account_id: int, at_ns: int,
                                   tenant: int) -> AccountBalancesAt | None: ...


# ---------------------------------------------------------------------------------------
# RFC 3339 instants, to the nanosecond.

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))")
_RFC3339_CHARS_MAX = 40


def parse_rfc3339_ns(text: str, name: str = "instant") -> int:
    """Nanoseconds since the Unix epoch of an RFC 3339 date-time with its offset (``Z`` or
    ``+hh:mm``) and up to nine fractional digits, from 1970 to 2262.

    Raises ``HistoryError`` (``invalid_query``, naming ``name``) for anything else: no
    offset, a leap second, a day the month does not have, an instant out of range."""
    bad = HistoryError("invalid_query", f"{name} is an RFC 3339 time with its offset, such as "
                                        "2026-12-01T00:00:00.000000001Z, from 1970 to 2262")
    match = _RFC3339.fullmatch(text) if len(text) <= _RFC3339_CHARS_MAX else None
    if match is None:
        raise bad
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
            and hour <= 23 and minute <= 59 and second <= 59) or year < 1:
        raise bad
    offset_s = 0
    if match.group(9) is not None:
        offset_hours, offset_minutes = int(match.group(10)), int(match.group(11))
        if offset_hours > 23 or offset_minutes > 59:
            raise bad
        offset_s = (offset_hours * 3600 + offset_minutes * 60) * (
            -1 if match.group(9) == "-" else 1)
    seconds = calendar.timegm((year, month, day, hour, minute, second)) - offset_s
    fraction = (match.group(7) or "").ljust(9, "0")
    nanos = seconds * 1_000_000_000 + int(fraction)
    if not 0 <= nanos <= ID_MAX:
        raise bad
    return nanos


def format_rfc3339_ns(nanos: int) -> str:
    """``nanos`` since the Unix epoch as RFC 3339 in UTC with nine fractional digits."""
    seconds, fraction = divmod(nanos, 1_000_000_000)
    year, month, day, hour, minute, second = _utc_fields(seconds)
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}." \
           f"{fraction:09d}Z"


def _utc_fields(seconds: int) -> tuple[int, int, int, int, int, int]:
    t = _EPOCH + datetime.timedelta(seconds=seconds)
    return t.year, t.month, t.day, t.hour, t.minute, t.second


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


# ---------------------------------------------------------------------------------------
# Cursors: opaque to callers, checked on the way in.
#
# 26 bytes, URL-safe base64 without padding: a version, the kind of list, the position
# (timestamp, id) and 8 bytes of a digest of the filter it was made for, so a cursor used
# with another list, another account or other filters is refused rather than silently
# starting somewhere unrelated.

_CURSOR = struct.Struct(">BBqq8s")
_CURSOR_VERSION = 1
_KINDS = {"account_asc": 1, "account_desc": 2, "query": 3}


class Position(msgspec.Struct, frozen=True):
    """A place in ``(timestamp, id)`` order."""

    timestamp: int
    id: int


def _filter_digest(kind: str, fields: Iterable[object]) -> bytes:
    text = "\x1f".join([kind, *("" if f is None else repr(f) for f in fields)])
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def _fields(query: AccountTransfersFilter | TransfersQuery) -> tuple[str, tuple[object, ...]]:
    if isinstance(query, AccountTransfersFilter):
        return f"account_{query.order}", (query.account_id, query.side, query.from_ns,
                                           query.to_ns)
    return "query", (query.code, query.user_data, query.from_ns, query.to_ns)


def encode_cursor(query: AccountTransfersFilter | TransfersQuery, at: Position) -> str:
    """The cursor that continues ``query`` after ``at`` (before it, newest first)."""
    kind, fields = _fields(query)
    raw = _CURSOR.pack(_CURSOR_VERSION, _KINDS[kind], at.timestamp, at.id,
                       _filter_digest(kind, fields))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(query: AccountTransfersFilter | TransfersQuery) -> Position | None:
    """The position ``query.cursor`` continues from; None without a cursor.

    Raises ``HistoryError`` (``invalid_cursor``) for a cursor this list did not make for
    these filters."""
    if not query.cursor:
        return None
    bad = HistoryError("invalid_cursor", "the cursor is not one this list gave for these "
                                         "filters")
    text = query.cursor
    if len(text) != 35 or re.fullmatch(r"[A-Za-z0-9_-]+", text) is None:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=")
    except ValueError as exc:
        raise bad from exc
    if len(raw) != _CURSOR.size:
        raise bad
    version, kind_number, timestamp, transfer_id, digest = _CURSOR.unpack(raw)
    kind, fields = _fields(query)
    if (version != _CURSOR_VERSION or kind_number != _KINDS[kind]
            or digest != _filter_digest(kind, fields) or not 0 <= timestamp <= ID_MAX
            or not 0 <= transfer_id <= ID_MAX):
        raise bad
    return Position(timestamp, transfer_id)


# ---------------------------------------------------------------------------------------
# The reference model of a balance at an instant.


class Expiry(msgspec.Struct, frozen=True):
    """A pending transfer released by its timeout at ``timestamp``."""

    pending_id: int
    timestamp: int


def balances_at(transfers: Iterable[Transfer], expiries: Iterable[Expiry], account_id: int,
                at_ns: int) -> AccountBalancesAt:
    """``account_id``'s balances counting every committed movement at or before ``at_ns``.

    ``transfers`` are committed transfers (any accounts; others are skipped), with every
    pending transfer a post or void names among them. A pending transfer adds its amount
    to pending at its timestamp; a post releases its hold's whole amount and adds its own
    amount to posted, a void releases the hold, an expiry releases it at the expiry's
    timestamp; anything else adds to posted. This is the per-object statement the store's
    SQL is tested against."""
    by_id = {t.id: t for t in transfers}
    debits = [0, 0]  # pending, posted
    credits = [0, 0]
    for t in by_id.values():
        if t.timestamp > at_ns or account_id not in (t.debit_account_id, t.credit_account_id):
            continue
        side = debits if t.debit_account_id == account_id else credits
        if t.flags & TransferFlags.PENDING:
            side[0] += t.amount
        elif t.flags & (TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING):
            side[0] -= by_id[t.pending_id].amount
            if t.flags & TransferFlags.POST_PENDING:
                side[1] += t.amount
        else:
            side[1] += t.amount
    for e in expiries:
        hold = by_id.get(e.pending_id)
        if hold is None or e.timestamp > at_ns:
            continue
        if hold.debit_account_id == account_id:
            debits[0] -= hold.amount
        elif hold.credit_account_id == account_id:
            credits[0] -= hold.amount
    return AccountBalancesAt(account_id=account_id, at_ns=at_ns, debits_pending=debits[0],
                             debits_posted=debits[1], credits_pending=credits[0],
                             credits_posted=credits[1])
