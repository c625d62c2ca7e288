"""Tests of processor.wire: frame encoding, decoding and the limits on frame length."""

from __future__ import annotations

import struct

import msgspec
import pytest

from processor import wire
from processor.codes import AccountResult, TransferResult
from processor.service import BATCH_ITEMS_MAX
from processor.types import (
    CODE_MAX,
    ID_MAX,
    TIMEOUT_S_MAX,
    USER_DATA_CHARS_MAX,
    Account,
    Transfer,
)

ACCOUNT = Account(id=7, currency="EUR", flags=1, code=10, user_data="customer 7")
TRANSFER = Transfer(
    id=11, debit_account_id=7, credit_account_id=8, amount=250, currency="EUR", user_data="x"
)
# Every field at its maximum, user_data in 4-byte UTF-8 characters: the largest items.
WORST_USER_DATA = "\U0010ffff" * USER_DATA_CHARS_MAX
WORST_TRANSFER = Transfer(
    id=ID_MAX, debit_account_id=ID_MAX, credit_account_id=ID_MAX, amount=ID_MAX,
    currency="USD", flags=0xFFFF, pending_id=ID_MAX, timeout_s=TIMEOUT_S_MAX, code=CODE_MAX,
    user_data=WORST_USER_DATA, timestamp=ID_MAX,
)  # fmt: skip
WORST_ACCOUNT = Account(
    id=ID_MAX, currency="USD", flags=0xFFFF, code=CODE_MAX, user_data=WORST_USER_DATA,
    debits_pending=ID_MAX, debits_posted=ID_MAX, credits_pending=ID_MAX,
    credits_posted=ID_MAX, timestamp=ID_MAX,
)  # fmt: skip


def _split(frame: bytes) -> bytes:
    """Check a frame's length prefix and return its body."""
    length = wire.frame_length(frame[: wire.FRAME_HEADER_BYTES])
    body = frame[wire.FRAME_HEADER_BYTES :]
    assert len(body) == length
    return body


@pytest.mark.parametrize(
    "request_",
    [
        wire.Hello("header.payload.signature"),
        wire.CreateAccounts(1, [ACCOUNT, Account(id=8, currency="EUR")]),
        wire.CreateTransfers(2**64 - 1, [TRANSFER]),
        wire.LookupAccounts(0, [7, 8, ID_MAX]),
        wire.LookupTransfers(3, []),
    ],
    ids=lambda message: type(message).__name__,
)
def test_request_round_trip(request_: wire.Request) -> None:
    """Every request kind decodes, from its frame, to an equal request."""
    assert wire.decode_request(_split(wire.encode_frame(request_))) == request_


@pytest.mark.parametrize(
    "response",
    [
        wire.HelloOk(1_700_000_900),
        wire.CreateAccountsResult(1, [AccountResult.ok, AccountResult.exists]),
        wire.CreateTransfersResult(2, [TransferResult.exceeds_credits]),
        wire.LookupAccountsResult(3, [ACCOUNT, None]),
        wire.LookupTransfersResult(4, [None, TRANSFER]),
        wire.Error(5, "overloaded", "the shard queue is full", 0.25),
        wire.Error(None, "malformed_frame", "not a request"),
    ],
    ids=lambda message: f"{type(message).__name__}",
)
def test_response_round_trip(response: wire.Response) -> None:
    """Every response kind decodes, from its frame, to an equal response."""
    assert wire.decode_response(_split(wire.encode_frame(response))) == response


def test_frame_header_is_big_endian_body_length() -> None:
    """The first 4 bytes are the body length, big-endian unsigned."""
    frame = wire.encode_frame(wire.LookupAccounts(1, [1, 2, 3]))
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4


def test_frame_length_limit() -> None:
    """A length prefix up to FRAME_BYTES_MAX is accepted and one byte more is refused."""
    assert wire.frame_length(struct.pack(">I", wire.FRAME_BYTES_MAX)) == wire.FRAME_BYTES_MAX
    with pytest.raises(wire.FrameTooLarge):
        wire.frame_length(struct.pack(">I", wire.FRAME_BYTES_MAX + 1))
    with pytest.raises(wire.FrameTooLarge):
        wire.frame_length(b"\xff\xff\xff\xff")


def test_encode_refuses_a_body_over_the_limit() -> None:
    """A message whose body would exceed FRAME_BYTES_MAX is refused when it is encoded."""
    ids_count = wire.FRAME_BYTES_MAX // 9 + 1  # ID_MAX takes 9 bytes in MessagePack.
    with pytest.raises(wire.FrameTooLarge):
        wire.encode_frame(wire.LookupAccounts(1, [ID_MAX] * ids_count))


@pytest.mark.parametrize(
    "message",
    [
        wire.CreateTransfers(2**64 - 1, [WORST_TRANSFER] * BATCH_ITEMS_MAX),
        wire.CreateAccounts(2**64 - 1, [WORST_ACCOUNT] * BATCH_ITEMS_MAX),
        wire.LookupTransfersResult(2**64 - 1, [WORST_TRANSFER] * BATCH_ITEMS_MAX),
        wire.LookupAccountsResult(2**64 - 1, [WORST_ACCOUNT] * BATCH_ITEMS_MAX),
    ],
    ids=lambda message: type(message).__name__,
)
def test_full_batch_of_largest_items_fits_in_a_frame(message: wire.Request) -> None:
    """A batch of BATCH_ITEMS_MAX items with every field at its maximum can be framed."""
    frame = wire.encode_frame(message)
    assert len(frame) - wire.FRAME_HEADER_BYTES <= wire.FRAME_BYTES_MAX


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # a byte MessagePack never uses
        b"garbage that is not messagepack",
        msgspec.msgpack.encode([99, 1, []]),  # an unknown tag
        msgspec.msgpack.encode([2, 1]),  # a missing field
        msgspec.msgpack.encode([2, -1, []]),  # a negative request id
        b"\x93\x02\xd3\xff\xff\xff\xff\xff\xff\xff\xff\x90",  # a request id of int64 -1
        msgspec.msgpack.encode([4, 1, [True]]),  # a bool where an id belongs
        msgspec.msgpack.encode([4, 1, [1.5]]),  # a float where an id belongs
        msgspec.msgpack.encode([4, 1, [1], "extra"]),  # an unknown trailing field
        msgspec.msgpack.encode([1, "t" * (wire.TOKEN_CHARS_MAX + 1)]),  # a token too long
        msgspec.msgpack.encode([64, 1_700_000_000]),  # a response sent as a request
        msgspec.msgpack.encode([2, 1, [[1, "usd"]]]),  # a currency of the wrong shape
        msgspec.msgpack.encode([3, 1, [[1, 2, 3, -5, "EUR"]]]),  # a negative amount
        b"\x92\x01\xa2\xff\xfe",  # a Hello whose token is not UTF-8
        b"\x91" * 100_000 + b"\xc0",  # nesting deeper than any recursion limit
    ],
)
def test_malformed_request_bodies_are_refused(body: bytes) -> None:
    """Bodies that are not a valid request raise MalformedFrame, never another error."""
    with pytest.raises(wire.MalformedFrame):
        wire.decode_request(body)


def test_responses_tolerate_fields_from_a_newer_server() -> None:
    """A response with an extra trailing field still decodes, for rolling deploys."""
    body = msgspec.msgpack.encode([69, 5, "overloaded", "full", 0.5, "a newer field"])
    assert wire.decode_response(body) == wire.Error(5, "overloaded", "full", 0.5)


def test_error_codes_include_every_code_the_protocol_names() -> None:
    """The stable error codes listed in the brief are all in ERROR_CODES."""
    assert {
        "frame_too_large", "malformed_frame", "batch_too_large", "token_missing",
        "token_invalid", "token_expired", "scope_missing", "overloaded", "unavailable",
        "too_many_in_flight", "internal",
    } <= wire.ERROR_CODES  # fmt: skip
