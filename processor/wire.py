"""The binary RPC protocol between gateways and the ledger: MessagePack frames over TCP.

Every frame is a 4-byte big-endian unsigned length followed by that many bytes of one
MessagePack-encoded message. Messages are array-like msgspec structs in two tagged unions,
``Request`` (client to server) and ``Response`` (server to client); the tag is a small
integer in the first array slot, stable forever, never reused.

A conversation:

* The client's first frame is ``Hello(token, version)``; the server answers ``HelloOk``
  with the token's expiry and its own protocol version, or refuses a version it does not
  speak (``protocol_version_unsupported``). Version 2 added ``CreateTransferBatch``, the
  columnar form of ``CreateTransfers`` (processor.batch); a version-1 connection that sends
  one is answered ``protocol_version_unsupported`` rather than having it misread. The
  client may send ``Hello`` again at any time to replace an expiring token; requests
  already accepted keep running under the old one.
* Each request carries a ``request_id`` chosen by the client (u64), unique among that
  connection's requests in flight; the server does not check uniqueness. Many requests may
  be in flight on one connection and their responses come back in any order, matched by
  ``request_id``.
* An ``Error`` with a ``request_id`` answers that request alone; the connection stays open.
  An ``Error`` whose ``request_id`` is ``None`` is about the connection (a bad frame, a
  refused or missing ``Hello``, too many connections, a deadline passed, a token expired
  and not replaced): the server reads nothing more, answers the requests it already
  accepted, then closes the connection.
* The server bounds what a connection may hold (docs/security.md, "Edge limits"): the
  first frame must be a small ``Hello``, a connection with nothing to say is closed after
  an idle timeout, a frame's body must follow its header promptly, and a client that does
  not read its responses is cut off without a word.

``ERROR_CODES`` lists the stable error codes. Per-item outcomes are not errors: they are
result codes (``processor.codes``) inside the create results.
"""

from __future__ import annotations

import struct
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from processor.history import AccountBalancesAt
from processor.service import BATCH_ITEMS_MAX
from processor.stream import STREAM_CURSOR_CHARS_MAX
from processor.types import CODE_MAX, ID_MAX, TIMEOUT_S_MAX, USER_DATA_CHARS_MAX, Account, Transfer

__all__ = [
    "ERROR_CODES",
    "FRAME_BYTES_MAX",
    "FRAME_HEADER_BYTES",
    "HELLO_BYTES_MAX",
    "PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS",
    "REQUEST_ID_MAX",
    "TOKEN_CHARS_MAX",
    "AccountBalancesResult",
    "CreateAccounts",
    "CreateAccountsResult",
    "CreateTransferBatch",
    "CreateTransferBatchResult",
    "CreateTransfers",
    "CreateTransfersResult",
    "Error",
    "FrameTooLarge",
    "GetAccountBalances",
    "GetAccountTransfers",
    "Hello",
    "HelloOk",
    "LookupAccounts",
    "LookupAccountsResult",
    "LookupTransfers",
    "LookupTransfersResult",
    "MalformedFrame",
    "PaymentCall",
    "PaymentResult",
    "QueryTransfers",
    "Request",
    "Response",
    "StreamTransfers",
    "TransfersPageResult",
    "TransfersStreamResult",
    "decode_request",
    "decode_response",
    "encode_frame",
    "frame_length",
]

FRAME_HEADER_BYTES = 4
# The largest frame body, in bytes, either way. The worst case it must hold is a full batch
# (BATCH_ITEMS_MAX items) whose every field is at its maximum: an array-like Transfer is then
# 587 bytes, because user_data is limited to 128 characters and each may take 4 bytes of
# UTF-8, so 8,189 of them take 4.81 MB. 5 MiB holds that plus the envelope; an import-time
# check below keeps the two in step if the types change. With ASCII user_data a full batch
# is about 1.7 MB.
FRAME_BYTES_MAX = 5 * 1024 * 1024
REQUEST_ID_MAX = 2**64 - 1
# A token of this module's issuer is about 250 characters; the limit only stops abuse.
TOKEN_CHARS_MAX = 4096

ERROR_CODES: Final = frozenset(
    {
        # the length prefix exceeds FRAME_BYTES_MAX, or before Hello the server's limit for
        # a Hello (at least HELLO_BYTES_MAX); connection closed, the body left unread
        "frame_too_large",
        "malformed_frame",  # the body is not a valid Request; connection closed
        "batch_too_large",  # more than BATCH_ITEMS_MAX items or ids in one request
        "token_missing",  # a request came before Hello; connection closed
        # Hello carried a bad token, or a request came after the token's signing key was
        # retired; connection closed
        "token_invalid",
        # on Hello: connection closed; on a request: refresh with Hello; with no new Hello
        # by the token's expiry plus the server's grace: connection closed
        "token_expired",
        # the token was revoked (txproc token revoke), at Hello or on a request; connection
        # closed, requests already accepted answered first
        "token_revoked",
        "scope_missing",  # the token does not grant the operation's scope
        "id_reserved",  # an id is in the processor's own range (processor/reserved.py)
        "overloaded",  # the ledger or the server is full; retry after retry_after_s
        # the principal's rate limit (processor.ratelimit): nothing of the request was
        # applied; retry after retry_after_s
        "rate_limited",
        "unavailable",  # a shard or the database is down; retry after retry_after_s
        "too_many_in_flight",  # the connection has in_flight_per_connection_max requests
        # creating the accounts would pass the tenant's quota (--max-accounts-per-tenant);
        # nothing of the request was created
        "account_quota_exceeded",
        "ledger_error",  # a LedgerError of no more specific kind; see its message
        "unknown_operation",  # a PaymentCall named no payments operation
        "invalid_batch",  # a CreateTransferBatch's columns break the format; nothing applied
        "protocol_version_unsupported",  # Hello asked for, or a frame needs, another version
        # no frame and no request in flight for the server's idle timeout; connection
        # closed, and nothing sent after it was read (the client retries it: Unavailable)
        "idle_timeout",
        "frame_timeout",  # a frame's body came too slowly (the server's frame timeout)
        "internal",  # a bug on the server; the request may or may not have been applied
        # a history request's filter is out of range (processor.history): nothing read
        "invalid_query",
        "invalid_cursor",  # a cursor that list did not give for these filters
        # a history read, balances at an instant or a stream cursor reaching into months an
        # archive took out of the database; the message names the archive (processor/archive.py)
        "archived",
        # GetAccountTransfers, GetAccountBalances: no account of the caller's has the id
        "account_not_found",
    }
)

# msgspec bounds only fit in an int64, so REQUEST_ID_MAX is not written into the type;
# MessagePack cannot carry an integer beyond u64, which enforces it on decode anyway.
RequestId = Annotated[int, Meta(ge=0)]
Id = Annotated[int, Meta(ge=0, le=ID_MAX)]
Token = Annotated[str, Meta(max_length=TOKEN_CHARS_MAX)]


# Requests are the public inbound API, so unknown fields are refused (STYLE.md, Messages).
PROTOCOL_VERSION = 2
PROTOCOL_VERSIONS = frozenset({1, 2})


class Hello(msgspec.Struct, frozen=True, array_like=True, tag=1, forbid_unknown_fields=True):
    """Authenticates the connection; must be the first frame, may be re-sent to refresh.

    ``version`` is the protocol version the client speaks (1 when absent: the first one).
    """

    token: Token
    version: Annotated[int, Meta(ge=0, le=65535)] = 1


class CreateAccounts(
    msgspec.Struct, frozen=True, array_like=True, tag=2, forbid_unknown_fields=True
):
    request_id: RequestId
    items: list[Account]


class CreateTransfers(
    msgspec.Struct, frozen=True, array_like=True, tag=3, forbid_unknown_fields=True
):
    request_id: RequestId
    items: list[Transfer]


# A column's size is bounded by the frame; a batch of more than BATCH_ITEMS_MAX transfers
# is answered batch_too_large, not refused as a malformed frame.
Column = bytes


class CreateTransferBatch(
    msgspec.Struct, frozen=True, array_like=True, tag=7, forbid_unknown_fields=True
):
    """``CreateTransfers`` as fixed-width little-endian columns (protocol version 2).

    processor.batch gives each column's width and range; ``user_data`` is empty when every
    transfer's is. Answered by ``CreateTransferBatchResult``.
    """

    request_id: RequestId
    id: Column
    debit_account_id: Column
    credit_account_id: Column
    amount: Column
    currency: Column
    flags: Column
    pending_id: Column
    timeout_s: Column
    code: Column
    user_data: list[Annotated[str, Meta(max_length=USER_DATA_CHARS_MAX)]] = []


class LookupAccounts(
    msgspec.Struct, frozen=True, array_like=True, tag=4, forbid_unknown_fields=True
):
    request_id: RequestId
    ids: list[Id]


class LookupTransfers(
    msgspec.Struct, frozen=True, array_like=True, tag=5, forbid_unknown_fields=True
):
    request_id: RequestId
    ids: list[Id]


class PaymentCall(msgspec.Struct, frozen=True, array_like=True, tag=6, forbid_unknown_fields=True):
    """One payments operation, with the HTTP API's semantics (docs/payments.md).

    ``operation`` is authorize, capture, create_capture, increment, void, refund, payout,
    get_payment, get_payout, list_events, list_payments, list_payouts, list_refunds,
    create_webhook_endpoint, list_webhook_endpoints, get_webhook_endpoint or
    delete_webhook_endpoint; ``subject_id`` the payment, payout or endpoint id where the
    operation names one; ``body`` the same JSON the HTTP endpoint takes (a list's query as
    JSON: processor/payments/listing.py). Creations need ``idempotency_key``.
    """

    request_id: RequestId
    operation: Annotated[str, Meta(max_length=32)]
    idempotency_key: Annotated[str, Meta(max_length=255)] = ""
    subject_id: Annotated[str, Meta(max_length=64)] = ""
    body: Annotated[bytes, Meta(max_length=65536)] = b""


# History, queries and balances at an instant (processor.history; docs/api.md, "History
# and queries"). Their fields are loosely typed here and checked by the server against
# processor.history's filters, so a value out of range is answered ``invalid_query`` for
# that request instead of closing the connection as a malformed frame. A server older
# than these messages does close it (malformed_frame).


class GetAccountTransfers(
    msgspec.Struct, frozen=True, array_like=True, tag=8, forbid_unknown_fields=True
):
    """One account's transfers with a timestamp in ``[from_ns, to_ns)``, ``limit`` (1 to
    8,189) at a time, ``order`` "asc" or "desc", ``side`` "debits", "credits" or "both";
    ``cursor`` is the previous page's ``next_cursor``. Answered by ``TransfersPageResult``."""

    request_id: RequestId
    account_id: int
    from_ns: int = 0
    to_ns: int = ID_MAX
    limit: int = 100
    cursor: Annotated[str, Meta(max_length=64)] = ""
    order: Annotated[str, Meta(max_length=8)] = "asc"
    side: Annotated[str, Meta(max_length=8)] = "both"


class QueryTransfers(msgspec.Struct, frozen=True, array_like=True, tag=9,
                     forbid_unknown_fields=True):
    """The caller's tenant's transfers with ``code`` and ``user_data`` (None: any) and a
    timestamp in ``[from_ns, to_ns)``, oldest first. Answered by ``TransfersPageResult``."""

    request_id: RequestId
    code: int | None = None
    user_data: Annotated[str, Meta(max_length=USER_DATA_CHARS_MAX)] | None = None
    from_ns: int = 0
    to_ns: int = ID_MAX
    limit: int = 100
    cursor: Annotated[str, Meta(max_length=64)] = ""


class GetAccountBalances(msgspec.Struct, frozen=True, array_like=True, tag=10,
                         forbid_unknown_fields=True):
    """An account's balances counting every movement at or before ``at_ns`` (nanoseconds
    since the Unix epoch). Answered by ``AccountBalancesResult``."""

    request_id: RequestId
    account_id: int
    at_ns: int


class StreamTransfers(msgspec.Struct, frozen=True, array_like=True, tag=15,
                      forbid_unknown_fields=True):
    """The change stream (processor.stream): the caller's tenant's transfers committed
    after the cursor ``after`` ("" from the beginning), at most ``limit`` (1 to 8,189); if
    there are none yet, the server waits up to ``wait_s`` seconds (0 to 20) for some.
    Answered by ``TransfersStreamResult``."""

    request_id: RequestId
    after: Annotated[str, Meta(max_length=STREAM_CURSOR_CHARS_MAX)] = ""
    limit: int = 100
    wait_s: float = 0.0


# Responses tolerate fields added by a newer server, so clients survive a rolling deploy.
class HelloOk(msgspec.Struct, frozen=True, array_like=True, tag=64):
    """The token was accepted; it expires at ``expires_at_s`` (seconds since the epoch).

    ``version`` is the protocol version the server speaks (1 when absent).
    """

    expires_at_s: int
    version: int = 1


class CreateAccountsResult(msgspec.Struct, frozen=True, array_like=True, tag=65):
    """One ``AccountResult`` value per submitted account, in order."""

    request_id: RequestId
    codes: list[int]


class CreateTransfersResult(msgspec.Struct, frozen=True, array_like=True, tag=66):
    """One ``TransferResult`` value per submitted transfer, in order."""

    request_id: RequestId
    codes: list[int]


class CreateTransferBatchResult(msgspec.Struct, frozen=True, array_like=True, tag=71):
    """One ``TransferResult`` value per transfer of the batch, a byte each, in order."""

    request_id: RequestId
    codes: bytes


class LookupAccountsResult(msgspec.Struct, frozen=True, array_like=True, tag=67):
    """One account per requested id, in order; ``None`` where no such account exists."""

    request_id: RequestId
    items: list[Account | None]


class LookupTransfersResult(msgspec.Struct, frozen=True, array_like=True, tag=68):
    """One transfer per requested id, in order; ``None`` where no such transfer exists."""

    request_id: RequestId
    items: list[Transfer | None]


class PaymentResult(msgspec.Struct, frozen=True, array_like=True, tag=70):
    """The answer to a ``PaymentCall``: the HTTP status and JSON body the HTTP API gives."""

    request_id: RequestId
    status: int
    body: bytes
    replayed: bool = False


class TransfersPageResult(msgspec.Struct, frozen=True, array_like=True, tag=72):
    """A page of transfers in the order asked for; ``next_cursor`` None on the last."""

    request_id: RequestId
    items: list[Transfer]
    next_cursor: str | None = None


class AccountBalancesResult(msgspec.Struct, frozen=True, array_like=True, tag=73):
    """The balances a ``GetAccountBalances`` asked for."""

    request_id: RequestId
    balances: AccountBalancesAt


class TransfersStreamResult(msgspec.Struct, frozen=True, array_like=True, tag=79):
    """A page of the change stream: the transfers in delivery order, the shard of each
    (one byte per transfer), and the cursor to continue from, also after an empty page.
    The cursor after each transfer is ``processor.stream.item_cursors``'s."""

    request_id: RequestId
    items: list[Transfer]
    shards: bytes
    next_cursor: str


class Error(msgspec.Struct, frozen=True, array_like=True, tag=69):
    """A request, or with ``request_id`` None the connection, failed with ``code``.

    ``retry_after_s`` is a hint in seconds for retryable codes and 0 otherwise.
    """

    request_id: RequestId | None
    code: str
    message: str
    retry_after_s: float = 0.0


Request = (
    Hello | CreateAccounts | CreateTransfers | LookupAccounts | LookupTransfers | PaymentCall
    | CreateTransferBatch | GetAccountTransfers | QueryTransfers | GetAccountBalances
    | StreamTransfers
)
Response = (
    HelloOk
    | CreateAccountsResult
    | CreateTransfersResult
    | LookupAccountsResult
    | LookupTransfersResult
    | PaymentResult
    | CreateTransferBatchResult
    | TransfersPageResult
    | AccountBalancesResult
    | TransfersStreamResult
    | Error
)

_HEADER = struct.Struct(">I")
_ENCODER = msgspec.msgpack.Encoder()
_REQUEST_DECODER: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
_RESPONSE_DECODER: msgspec.msgpack.Decoder[Response] = msgspec.msgpack.Decoder(Response)


class FrameTooLarge(ValueError):
    """A frame's body is longer than ``FRAME_BYTES_MAX``."""

    def __init__(self, length_bytes: int) -> None:
        super().__init__(f"a frame of {length_bytes} bytes exceeds {FRAME_BYTES_MAX} bytes")
        self.length_bytes = length_bytes


class MalformedFrame(ValueError):
    """A frame's body is not a valid message of the expected direction."""


def encode_frame(message: Request | Response) -> bytes:
    """Return ``message`` as a whole frame: length prefix and MessagePack body.

    Raises ``FrameTooLarge`` if the body would exceed ``FRAME_BYTES_MAX`` bytes.
    """
    buffer = bytearray(FRAME_HEADER_BYTES)
    # Encoding after the reserved header avoids copying the body to prepend its length.
    _ENCODER.encode_into(message, buffer, FRAME_HEADER_BYTES)
    length_bytes = len(buffer) - FRAME_HEADER_BYTES
    if length_bytes > FRAME_BYTES_MAX:
        raise FrameTooLarge(length_bytes)
    _HEADER.pack_into(buffer, 0, length_bytes)
    return bytes(buffer)


def frame_length(header: bytes) -> int:
    """Return the body length in bytes announced by a 4-byte frame header.

    Raises ``FrameTooLarge`` if it exceeds ``FRAME_BYTES_MAX``, so that the caller refuses
    the frame before reading (or buffering) its body.
    """
    (length_bytes,) = _HEADER.unpack(header)
    if length_bytes > FRAME_BYTES_MAX:
        raise FrameTooLarge(length_bytes)
    return int(length_bytes)


def decode_request(body: bytes | memoryview) -> Request:
    """Decode a frame body sent by a client. Raises ``MalformedFrame``."""
    try:
        return _REQUEST_DECODER.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedFrame(str(exc)) from exc


def decode_response(body: bytes | memoryview) -> Response:
    """Decode a frame body sent by a server. Raises ``MalformedFrame``."""
    try:
        return _RESPONSE_DECODER.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedFrame(str(exc)) from exc


def _worst_case_batch_bytes() -> int:
    """The body size of the largest valid lookup result or create request, in bytes."""
    user_data = "\U0010ffff" * USER_DATA_CHARS_MAX
    transfer = Transfer(
        id=ID_MAX, debit_account_id=ID_MAX, credit_account_id=ID_MAX, amount=ID_MAX,
        currency="XXX", flags=0xFFFF, pending_id=ID_MAX, timeout_s=TIMEOUT_S_MAX,
        code=CODE_MAX, user_data=user_data, timestamp=ID_MAX,
    )  # fmt: skip
    account = Account(
        id=ID_MAX, currency="XXX", flags=0xFFFF, code=CODE_MAX, user_data=user_data,
        debits_pending=ID_MAX, debits_posted=ID_MAX, credits_pending=ID_MAX,
        credits_posted=ID_MAX, timestamp=ID_MAX,
    )  # fmt: skip
    item_bytes = max(len(_ENCODER.encode(transfer)), len(_ENCODER.encode(account)))
    # A columnar batch: 53 bytes of columns per transfer, plus its user_data string.
    column_bytes = 8 * 5 + 3 + 2 + 4 + 4 + len(_ENCODER.encode(user_data))
    # The envelope is a tag, a request id and array and bytes headers: well under 64 bytes.
    return max(item_bytes, column_bytes) * BATCH_ITEMS_MAX + 64


# Kept on under python -O: a full batch that cannot be framed would be a protocol bug.
if _worst_case_batch_bytes() > FRAME_BYTES_MAX:
    raise RuntimeError("FRAME_BYTES_MAX cannot hold a full batch; raise it")

# The body size of the largest valid Hello, in bytes (about 16 KiB: a token of
# TOKEN_CHARS_MAX four-byte characters). A server may refuse a larger first frame unread,
# so that a client not yet authenticated cannot make it buffer FRAME_BYTES_MAX.
HELLO_BYTES_MAX: Final = len(_ENCODER.encode(Hello("\U0010ffff" * TOKEN_CHARS_MAX, 65535)))
