"""The pure rules of listing payments, payouts and refunds, and of their ``metadata``.

A list is the caller's tenant's objects, newest first: ordered by creation time, then id,
both descending. A page ends with an opaque cursor naming its last row's position
(creation time in microseconds and id); the next page is the rows strictly after that
position. New rows are created at the head of the order, so they never shift a walk
through the pages already under way: no row is shown twice and none that existed when
the walk began is skipped.

Filters, the same over HTTP (query parameters) and RPC (a JSON body):

===========================  ===========================  ==================================
HTTP                         JSON                         meaning
===========================  ===========================  ==================================
``status=S``                 ``"status": "S"``            the object's status (a step's for
                                                          refunds)
``merchant_account_id=N``    ``"merchant_account_id": N`` the merchant account
``created[gte]=T``           ``"created": {"gte": T}``    created at or after T
``created[lt]=T``            ``"created": {"lt": T}``     created before T
``reference=R``              ``"reference": "R"``         payments and payouts
``payment_id=P``             ``"payment_id": "P"``        refunds, disputes of one payment
``metadata[K]=V``            ``"metadata": {"K": "V"}``   metadata key K is exactly V (all
                                                          pairs must match)
``limit=N``                  ``"limit": N``               1 to 100, 10 by default
``cursor=C``                 ``"cursor": "C"``            the previous page's next_cursor
===========================  ===========================  ==================================

T is an RFC 3339 timestamp with its offset (``2026-12-01T00:00:00Z``; a ``+`` offset must be
percent-encoded in a query string) or whole Unix seconds. Anything else, a repeated or
unknown parameter included, is ``invalid_query``; a cursor not made by this list is
``invalid_cursor``.

Metadata is at most 20 pairs of a key of 1 to 40 characters and a value of at most 500,
both strings without U+0000 (PostgreSQL's jsonb cannot hold it): ``invalid_metadata``
otherwise.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import re
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from processor.errors import TxprocError, register
from processor.payments.disputes import DisputeStatus
from processor.payments.saga import PaymentStatus, PayoutStatus
from processor.types import ID_MAX

__all__ = [
    "CURSOR_CHARS_MAX",
    "LIST_KINDS",
    "METADATA_KEYS_MAX",
    "METADATA_KEY_CHARS_MAX",
    "METADATA_VALUE_CHARS_MAX",
    "PAGE_LIMIT_DEFAULT",
    "PAGE_LIMIT_MAX",
    "ListCode",
    "ListError",
    "ListFilter",
    "ListQuery",
    "Position",
    "check_list_query",
    "check_metadata",
    "decode_cursor",
    "encode_cursor",
    "query_of_params",
]

PAGE_LIMIT_DEFAULT = 10
PAGE_LIMIT_MAX = 100
CURSOR_CHARS_MAX = 200
METADATA_KEYS_MAX = 20
METADATA_KEY_CHARS_MAX = 40
METADATA_VALUE_CHARS_MAX = 500
_PARAMS_MAX = 40  # every filter once and a full metadata filter
_INTEGER_CHARS_MAX = 19  # a bigint's digits
_MICROS_PER_S = 1_000_000
_CURSOR_VERSION = 1
_INSTANT_S_MAX = 253_402_300_799  # the end of year 9999, UTC
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})")

# What each list is of, and the statuses it can be filtered by.
LIST_KINDS: dict[str, frozenset[str]] = {
    "payments": frozenset(s.value for s in PaymentStatus),
    "payouts": frozenset(s.value for s in PayoutStatus),
    # A refund is a step: its status is the operation's (processor... engine._op_status).
    "refunds": frozenset({"processing", "succeeded", "failed", "compensated"}),
    "disputes": frozenset(s.value for s in DisputeStatus),
}
# Filters that only some lists have.
_ONLY_FOR = {"reference": frozenset({"payments", "payouts"}),
             "payment_id": frozenset({"refunds", "disputes"})}
# Lists of objects without metadata.
_NO_METADATA = frozenset({"disputes"})


class ListCode(enum.StrEnum):
    """Why a list request or metadata is refused; each a 400."""

    invalid_query = "invalid_query"
    invalid_cursor = "invalid_cursor"
    invalid_metadata = "invalid_metadata"


# invalid_query and invalid_cursor are every list's (processor.errors).
register(400, {"invalid_metadata": "metadata that breaks its limits (pairs, key or value "
                                   "lengths, U+0000)"})


class ListError(TxprocError, ValueError):
    """A list query or a metadata object breaks a rule; ``code`` names which."""

    def __init__(self, code: ListCode, message: str) -> None:
        super().__init__(message, code=code.value)


Reference = Annotated[str, Meta(min_length=1, max_length=64, pattern="^[A-Za-z0-9_.:-]*$")]
Instant = int | Annotated[str, Meta(max_length=64)]


class CreatedRange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gte: Instant | None = None
    lt: Instant | None = None


class ListQuery(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A list request as it travels (RPC body, or the HTTP query made JSON)."""

    status: Annotated[str, Meta(max_length=32)] | None = None
    merchant_account_id: Annotated[int, Meta(ge=1, le=ID_MAX)] | None = None
    created: CreatedRange | None = None
    reference: Reference | None = None
    payment_id: Annotated[str, Meta(pattern="^pay_[0-9a-f]{24}$")] | None = None
    metadata: dict[str, str] = {}
    limit: Annotated[int, Meta(ge=1, le=PAGE_LIMIT_MAX)] = PAGE_LIMIT_DEFAULT
    cursor: Annotated[str, Meta(min_length=1, max_length=CURSOR_CHARS_MAX)] | None = None


class Position(msgspec.Struct, frozen=True):
    """A row's place in a list: creation time (µs since the epoch), then id."""

    created_us: int
    id: str


class ListFilter(msgspec.Struct, frozen=True, kw_only=True):
    """A checked list request: what the store's query needs."""

    kind: str
    status: str | None = None
    merchant_account_id: int | None = None
    created_gte_us: int | None = None
    created_lt_us: int | None = None
    reference: str | None = None
    payment_id: str | None = None
    metadata: dict[str, str] = {}
    limit: int = PAGE_LIMIT_DEFAULT
    after: Position | None = None


def check_metadata(value: Any, *, code: ListCode = ListCode.invalid_metadata) -> dict[str, str]:
    """``value`` as metadata (a new dict), or ``ListError`` with ``code`` naming the rule
    broken: an object of at most 20 string pairs, keys 1-40 characters, values at most 500,
    neither holding U+0000."""
    if not isinstance(value, dict):
        raise ListError(code, "metadata is an object of string keys and string values")
    if len(value) > METADATA_KEYS_MAX:
        raise ListError(code, f"metadata has {len(value)} keys; at most {METADATA_KEYS_MAX}")
    checked: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not 1 <= len(key) <= METADATA_KEY_CHARS_MAX:
            raise ListError(code, f"a metadata key is 1 to {METADATA_KEY_CHARS_MAX} characters")
        if not isinstance(item, str) or len(item) > METADATA_VALUE_CHARS_MAX:
            raise ListError(code, f"metadata[{key}] is a string of at most "
                                  f"{METADATA_VALUE_CHARS_MAX} characters")
        if "\x00" in key or "\x00" in item:
            raise ListError(code, "metadata may not hold U+0000")
        checked[key] = item
    return checked


def query_of_params(items: list[tuple[str, str]]) -> dict[str, Any]:
    """The JSON form of a list's HTTP query (see the module docstring): ``metadata[K]`` and
    ``created[gte|lt]`` gathered into objects, whole numbers as integers. Raises
    ``ListError`` (``invalid_query``) for an unknown or repeated parameter; the values are
    checked by ``check_list_query``."""
    if len(items) > _PARAMS_MAX:
        raise ListError(ListCode.invalid_query, f"at most {_PARAMS_MAX} query parameters")
    names = [name for name, _ in items]
    if len(names) != len(set(names)):
        raise ListError(ListCode.invalid_query, "a query parameter is repeated")
    query: dict[str, Any] = {}
    for name, text in items:
        if name.startswith("metadata[") and name.endswith("]") and len(name) > len("metadata[]"):
            query.setdefault("metadata", {})[name[len("metadata["):-1]] = text
        elif name in ("created[gte]", "created[lt]"):
            query.setdefault("created", {})[name[len("created["):-1]] = _whole_or_text(text)
        elif name in ("limit", "merchant_account_id"):
            query[name] = _whole_or_text(text)
        elif name in ("status", "reference", "payment_id", "cursor"):
            query[name] = text
        else:
            raise ListError(ListCode.invalid_query, f"no list takes the parameter {name[:60]!r}")
    return query


def _whole_or_text(text: str) -> int | str:
    if text.isascii() and text.isdigit() and len(text) <= _INTEGER_CHARS_MAX:
        return int(text)
    return text


def check_list_query(kind: str, query: ListQuery) -> ListFilter:
    """A ``ListQuery`` for the list ``kind`` (payments, payouts, refunds) made a
    ``ListFilter``. Raises ``ListError``: ``invalid_query`` for a status the kind does not
    have, a filter it does not take, a bad time or metadata filter, ``invalid_cursor`` for
    a cursor that is not this list's."""
    statuses = LIST_KINDS[kind]
    if query.status is not None and query.status not in statuses:
        raise ListError(ListCode.invalid_query,
                        f"status is one of {', '.join(sorted(statuses))}")
    for name, kinds in _ONLY_FOR.items():
        if getattr(query, name) is not None and kind not in kinds:
            raise ListError(ListCode.invalid_query, f"the {kind} list takes no {name}")
    if query.metadata and kind in _NO_METADATA:
        raise ListError(ListCode.invalid_query, f"the {kind} list takes no metadata")
    created = query.created or CreatedRange()
    metadata = check_metadata(query.metadata, code=ListCode.invalid_query)
    return ListFilter(
        kind=kind, status=query.status, merchant_account_id=query.merchant_account_id,
        created_gte_us=None if created.gte is None else _instant_us("created[gte]", created.gte),
        created_lt_us=None if created.lt is None else _instant_us("created[lt]", created.lt),
        reference=query.reference, payment_id=query.payment_id, metadata=metadata,
        limit=query.limit,
        after=None if query.cursor is None else decode_cursor(kind, query.cursor))


def _instant_us(name: str, value: int | str) -> int:
    """Microseconds since the epoch of an RFC 3339 timestamp or whole Unix seconds."""
    refused = ListError(ListCode.invalid_query,
                        f"{name} is an RFC 3339 time with its offset, or Unix seconds")
    if isinstance(value, int):
        if not 0 <= value <= _INSTANT_S_MAX:
            raise refused
        return value * _MICROS_PER_S
    # RFC 3339 only: a date, a time and an offset; fromisoformat alone takes more forms
    # (week dates, no offset, no seconds).
    if _RFC3339.fullmatch(value) is None:
        raise refused
    try:
        moment = dt.datetime.fromisoformat(value.replace("z", "Z"))
    except (ValueError, OverflowError):
        raise refused from None
    if moment.tzinfo is None:
        raise refused
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    micros = (delta.days * 86_400 + delta.seconds) * _MICROS_PER_S + delta.microseconds
    # From the epoch on, as whole seconds are: nothing is created before it, and a time
    # beyond year 1 UTC could not be handed to the database.
    if not 0 <= micros <= _INSTANT_S_MAX * _MICROS_PER_S:
        raise refused
    return micros


def encode_cursor(kind: str, position: Position) -> str:
    """The opaque cursor of ``position`` in the list ``kind``."""
    raw = msgspec.json.encode([_CURSOR_VERSION, kind, position.created_us, position.id])
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


_CURSOR = msgspec.json.Decoder(tuple[int, str, int, Annotated[str, Meta(max_length=64)]])


def decode_cursor(kind: str, cursor: str) -> Position:
    """The position a cursor of the list ``kind`` names; ``ListError`` (``invalid_cursor``)
    for anything else: not ours, of another list, or damaged."""
    refused = ListError(ListCode.invalid_cursor, "the cursor is not one this list gave")
    if len(cursor) > CURSOR_CHARS_MAX or not cursor.isascii():
        raise refused
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, cursor_kind, created_us, row_id = _CURSOR.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise refused from None
    if version != _CURSOR_VERSION or cursor_kind != kind or not row_id or created_us < 0:
        raise refused
    if kind == "refunds" and not (row_id.isascii() and row_id.isdigit()):
        raise refused
    return Position(created_us, row_id)
