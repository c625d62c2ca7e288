"""The partner HTTP/JSON API: accounts and transfers over Starlette, with bearer-token scopes.

The JSON shapes here are the public contract and differ from the internal ``processor.types``
in two ways: flags travel as a list of names instead of a bitmask, and objects are keyed
instead of ``array_like``. Each JSON struct is converted to or from its internal type in one
function. Decoding is strict: floats, strings, negative numbers and values of 2**63 or more
are refused where an integer is expected, as are unknown and missing fields.

One table, ``OPERATIONS``, names every route with its scope, request type and possible
responses; the Starlette routes and the OpenAPI document are both built from it, so the
document cannot drift from the code. docs/api.md explains the contract in prose.
"""

from __future__ import annotations

import logging
import math
import re
import types
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Literal, Protocol, TypeVar, cast, get_args

import msgspec
from msgspec import Meta
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message, Receive, Scope, Send

from actors.edge.audit import AuditWriter, request_id_of
from actors.edge.credentials import Credentials, as_credentials
from actors.edge.signatures import RequestSignatures
from actors.edge.tenancy import visible_accounts, visible_transfers
from actors.ops import metrics, telemetry
from actors.payments import (
    AUDITED_OPERATIONS,
    ENDPOINTS_PAGE_MAX,
    EVENT_TYPE_PATTERN,
    EVENTS_PAGE_MAX,
    EXCEPTIONS_PAGE_MAX,
    ORIGIN_HEADER,
    RUNS_PAGE_MAX,
    EndpointsPage,
    EventsPage,
    ExceptionsPage,
    ExceptionView,
    PaymentFailure,
    PaymentsApiError,
    ResolveRequest,
    RunRequest,
    RunsPage,
    RunView,
    WebhookAnswer,
    api_error_of,
    require_key,
)
from processor.audit import (
    ACTIONS,
    AUDIT_PAGE_LIMIT_MAX,
    AuditEventsPage,
    AuditQueryError,
    audit_query_of,
)
from processor.codes import AccountResult, TransferResult
from processor.errors import (
    ERROR_STATUS,
    LedgerError,
    Overloaded,
    QuotaExceeded,
    TxprocError,
    register,
    statuses,
)
from processor.history import (
    HISTORY_LIMIT_MAX,
    AccountBalancesAt,
    AccountTransfersFilter,
    HistoryError,
    HistoryService,
    TransfersPage,
    TransfersQuery,
    parse_rfc3339_ns,
)
from processor.identity import (
    PROCESSOR_TENANT,
    SCOPES,
    SIGNATURE_ALGORITHM,
    SIGNATURE_CODES,
    AuthError,
    Claims,
    ScopeError,
    SignatureError,
    bearer_token,
    principal_of,
    require_scope,
)
from processor.payments import (
    ENDPOINT_ID_PATTERN,
    EVENT_TYPES,
    EVIDENCE_FILE_CHARS_MAX,
    EVIDENCE_FILES_MAX,
    EVIDENCE_TEXT_CHARS_MAX,
    LIST_KINDS,
    PAGE_LIMIT_MAX,
    AuthorizeRequest,
    CaptureRequest,
    DisputesPage,
    DisputeView,
    EvidenceRequest,
    IncrementRequest,
    ListError,
    PartialCaptureRequest,
    PaymentError,
    PaymentsPage,
    PaymentView,
    PayoutRequest,
    PayoutsPage,
    PayoutView,
    RefundRequest,
    RefundsPage,
    WebhookEndpointRequest,
    WebhookEndpointView,
    query_of_params,
)
from processor.ratelimit import RateLimiter
from processor.request_audit import AUDIT_HEADER
from processor.reserved import (
    RESERVED_ID_MIN_DEFAULT,
    SYSTEM_SCOPE,
    accounts_reserved,
    transfers_reserved,
)
from processor.service import BATCH_ITEMS_MAX, LedgerService
from processor.stream import (
    STREAM_CURSOR_CHARS_MAX,
    STREAM_LIMIT_DEFAULT,
    STREAM_LIMIT_MAX,
    STREAM_WAIT_S_DEFAULT,
    STREAM_WAIT_S_MAX,
    StreamService,
    item_cursors,
)
from processor.types import (
    CODE_MAX,
    ID_MAX,
    TIMEOUT_S_MAX,
    USER_DATA_CHARS_MAX,
    USER_DATA_PATTERN,
    Account,
    AccountFlags,
    Transfer,
    TransferFlags,
)

__all__ = [
    "BODY_BYTES_MAX_DEFAULT",
    "ERROR_CODES",
    "OPENAPI",
    "OPERATIONS",
    "AccountBatchRequest",
    "AccountBatchResponse",
    "AccountBatchResult",
    "AccountFlagName",
    "AccountRequest",
    "AccountResponse",
    "ErrorDetail",
    "ErrorResponse",
    "HealthResponse",
    "Operation",
    "Reply",
    "TransferBatchRequest",
    "TransferBatchResponse",
    "TransferBatchResult",
    "TransferFlagName",
    "TransferRequest",
    "TransferResponse",
    "account_from_request",
    "account_to_response",
    "build_app",
    "transfer_from_request",
    "transfer_to_response",
]

_HTTP_TRANSFER_SECONDS = metrics.TRANSFER_REQUEST_SECONDS.labels("http")
# Verified tokens remembered by the HTTP API; each holds one caller's claims until expiry.
VERIFIED_TOKENS_MAX = 10_000

logger = logging.getLogger(__name__)

BODY_BYTES_MAX_DEFAULT = 4 * 1024 * 1024
# An error message quotes msgspec's text, which may quote the offending input; a cap keeps a
# hostile body from being echoed back at length.
ERROR_MESSAGE_CHARS_MAX = 300
# The hot route, served without the framework (``_App``).
TRANSFERS_PATH = "/v1/transfers"
PAYMENTS_PATH = "/v1/payments"
_JSON_CONTENT_TYPE = (b"content-type", b"application/json")


def _require(condition: bool, what: str) -> None:
    """Raise AssertionError unless ``condition``; unlike ``assert`` it runs under ``-O``."""
    if not condition:
        raise AssertionError(what)


# ---------------------------------------------------------------------------------------
# JSON field types. Limits mirror processor.types so a value the ledger would refuse at
# decode time is refused here with a 400 naming the field; zero stays allowed so that the
# ledger names the rule (``id_must_not_be_zero``) with a 422.

Id = Annotated[int, Meta(ge=0, le=ID_MAX, description="Unsigned 63-bit integer.")]
Amount = Annotated[int, Meta(ge=0, le=ID_MAX, description="Integer minor units of currency.")]
Code = Annotated[int, Meta(ge=0, le=CODE_MAX, description="Caller-defined category.")]
TimeoutS = Annotated[int, Meta(ge=0, le=TIMEOUT_S_MAX, description="Seconds a hold lasts.")]
Currency = Annotated[str, Meta(pattern="^[A-Z]{3}$", description="ISO 4217 code.")]
# PostgreSQL text cannot hold U+0000: a commit carrying one fails and restarts the shard,
# failing every request committed with it, so the edge refuses it (400) as a bad field.
UserData = Annotated[str, Meta(max_length=USER_DATA_CHARS_MAX, pattern=USER_DATA_PATTERN,
                               description="Stored, never read; no U+0000.")]
TimestampNs = Annotated[
    int, Meta(ge=0, le=ID_MAX, description="Assigned by the server: ns since the Unix epoch.")
]

AccountFlagName = Literal["debits_must_not_exceed_credits", "credits_must_not_exceed_debits",
                          "history"]
TransferFlagName = Literal["linked", "pending", "post_pending", "void_pending"]

# Flag names are the lower-cased enum member names; the Literals above are spelled out so a
# reader sees the contract, and these checks keep them equal to the enums.
ACCOUNT_FLAG_BITS = {flag.name.lower(): int(flag) for flag in AccountFlags if flag.name}
TRANSFER_FLAG_BITS = {flag.name.lower(): int(flag) for flag in TransferFlags if flag.name}
_require(set(get_args(AccountFlagName)) == set(ACCOUNT_FLAG_BITS), "account flag names")
_require(set(get_args(TransferFlagName)) == set(TRANSFER_FLAG_BITS), "transfer flag names")

AccountFlagList = Annotated[
    tuple[AccountFlagName, ...], Meta(max_length=len(ACCOUNT_FLAG_BITS))
]
TransferFlagList = Annotated[
    tuple[TransferFlagName, ...], Meta(max_length=len(TRANSFER_FLAG_BITS))
]

# Batch statuses: "created" for ok, otherwise the result code's name (including "exists").
# The Literal is built from the enums so that a new code is documented without an edit here.
_ACCOUNT_STATUSES = ("created", *(r.name for r in AccountResult if r.name != "ok"))
_TRANSFER_STATUSES = ("created", *(r.name for r in TransferResult if r.name != "ok"))
AccountBatchStatus = Literal[_ACCOUNT_STATUSES]  # type: ignore[valid-type]
TransferBatchStatus = Literal[_TRANSFER_STATUSES]  # type: ignore[valid-type]


# ---------------------------------------------------------------------------------------
# Requests: unknown fields are refused, because a misspelt optional field silently taking
# its default is how money moves wrongly.


class AccountRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An account to create. Balances and timestamp are assigned by the server."""

    id: Id
    currency: Currency
    flags: AccountFlagList = ()
    code: Code = 0
    user_data: UserData = ""


class TransferRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A transfer to create; ``id`` is its idempotency key. Timestamp is server-assigned."""

    id: Id
    debit_account_id: Id
    credit_account_id: Id
    amount: Amount
    currency: Currency
    flags: TransferFlagList = ()
    pending_id: Id = 0
    timeout_s: TimeoutS = 0
    code: Code = 0
    user_data: UserData = ""


# The item-count limits of batches are checked after decoding, not by the decoder, because
# an empty batch (400 batch_empty) and an oversized one (413 batch_too_large) have their own
# codes; the OpenAPI document states them as minItems and maxItems.


class AccountBatchRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Accounts to create, evaluated in order."""

    accounts: list[AccountRequest]


class TransferBatchRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Transfers to create, evaluated in order; ``linked`` chains span consecutive items."""

    transfers: list[TransferRequest]


# ---------------------------------------------------------------------------------------
# Responses: every field is always present, so clients need no defaults of their own.


class AccountResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A stored account with its balances."""

    id: Id
    currency: Currency
    flags: AccountFlagList
    code: Code
    user_data: UserData
    debits_pending: Amount
    debits_posted: Amount
    credits_pending: Amount
    credits_posted: Amount
    timestamp: TimestampNs


class TransferResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A stored transfer."""

    id: Id
    debit_account_id: Id
    credit_account_id: Id
    amount: Amount
    currency: Currency
    flags: TransferFlagList
    pending_id: Id
    timeout_s: TimeoutS
    code: Code
    user_data: UserData
    timestamp: TimestampNs


class TransferPageResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A page of transfers in the order asked for; ``next_cursor`` reads the next page,
    null on the last."""

    data: list[TransferResponse]
    next_cursor: str | None


class StreamLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the change stream: a transfer and the cursor that resumes after it."""

    cursor: str
    transfer: TransferResponse


class StreamEnd(msgspec.Struct, frozen=True, kw_only=True):
    """The change stream's last line: the cursor the next request continues from."""

    next_cursor: str


class BalancesAtResponse(msgspec.Struct, frozen=True, kw_only=True):
    """An account's balances counting every movement with a timestamp at or before ``at``."""

    account_id: Id
    at: TimestampNs
    debits_pending: Amount
    debits_posted: Amount
    credits_pending: Amount
    credits_posted: Amount


class AccountBatchResult(msgspec.Struct, frozen=True):
    """The outcome of one account of a batch."""

    id: Id
    status: AccountBatchStatus


class TransferBatchResult(msgspec.Struct, frozen=True):
    """The outcome of one transfer of a batch."""

    id: Id
    status: TransferBatchStatus


class AccountBatchResponse(msgspec.Struct, frozen=True):
    """One result per account, in request order."""

    results: list[AccountBatchResult]


class TransferBatchResponse(msgspec.Struct, frozen=True):
    """One result per transfer, in request order."""

    results: list[TransferBatchResult]


class ErrorDetail(msgspec.Struct, frozen=True):
    """``code`` is stable and meant for programs; ``message`` is for people and may change."""

    code: str
    message: str


class ErrorResponse(msgspec.Struct, frozen=True):
    """The body of every response with a status of 400 or more."""

    error: ErrorDetail


class HealthResponse(msgspec.Struct, frozen=True):
    """Liveness or readiness."""

    status: Literal["ok"]


ACCOUNT_DECODER = msgspec.json.Decoder(AccountRequest)
TRANSFER_DECODER = msgspec.json.Decoder(TransferRequest)
ACCOUNT_BATCH_DECODER = msgspec.json.Decoder(AccountBatchRequest)
TRANSFER_BATCH_DECODER = msgspec.json.Decoder(TransferBatchRequest)
ENCODER = msgspec.json.Encoder()
# The change stream answers newline-delimited JSON, its resume cursor also in this header.
NDJSON = "application/x-ndjson"
STREAM_CURSOR_HEADER = "Txproc-Next-Cursor"


# ---------------------------------------------------------------------------------------
# Conversions between the JSON structs and processor.types, one function per direction.


def _flag_bits(names: tuple[str, ...], bits: dict[str, int]) -> int:
    # A repeated name sets the same bit twice, which is harmless, so it is not refused.
    mask = 0
    for name in names:
        mask |= bits[name]
    return mask


def _flag_names(mask: int, bits: dict[str, int]) -> tuple[Any, ...]:
    _require(mask & ~sum(bits.values()) == 0, "stored flags are all known")
    return tuple(name for name, bit in bits.items() if mask & bit)


def account_from_request(item: AccountRequest, tenant: int = 0, origin: int = 0) -> Account:
    """The account to create for a caller whose tenant slot is ``tenant``, in the request
    whose audit record is ``origin``."""
    return Account(
        id=item.id,
        currency=item.currency,
        flags=_flag_bits(item.flags, ACCOUNT_FLAG_BITS),
        code=item.code,
        user_data=item.user_data,
        tenant=tenant,
        origin=origin,
    )


def account_to_response(account: Account) -> AccountResponse:
    return AccountResponse(
        id=account.id,
        currency=account.currency,
        flags=_flag_names(account.flags, ACCOUNT_FLAG_BITS),
        code=account.code,
        user_data=account.user_data,
        debits_pending=account.debits_pending,
        debits_posted=account.debits_posted,
        credits_pending=account.credits_pending,
        credits_posted=account.credits_posted,
        timestamp=account.timestamp,
    )


def transfer_from_request(item: TransferRequest, tenant: int = 0, origin: int = 0) -> Transfer:
    """The transfer to create for a caller whose tenant slot is ``tenant``, in the request
    whose audit record is ``origin``."""
    return Transfer(
        id=item.id,
        debit_account_id=item.debit_account_id,
        credit_account_id=item.credit_account_id,
        amount=item.amount,
        currency=item.currency,
        flags=_flag_bits(item.flags, TRANSFER_FLAG_BITS),
        pending_id=item.pending_id,
        timeout_s=item.timeout_s,
        code=item.code,
        user_data=item.user_data,
        tenant=tenant,
        origin=origin,
    )


def transfer_to_response(transfer: Transfer) -> TransferResponse:
    return TransferResponse(
        id=transfer.id,
        debit_account_id=transfer.debit_account_id,
        credit_account_id=transfer.credit_account_id,
        amount=transfer.amount,
        currency=transfer.currency,
        flags=_flag_names(transfer.flags, TRANSFER_FLAG_BITS),
        pending_id=transfer.pending_id,
        timeout_s=transfer.timeout_s,
        code=transfer.code,
        user_data=transfer.user_data,
        timestamp=transfer.timestamp,
    )


def _batch_status(result: AccountResult | TransferResult) -> str:
    return "created" if result.name == "ok" else result.name


# ---------------------------------------------------------------------------------------
# Error codes. Result codes of the ledger are error codes too (409 and 422); the rest are
# about the request as a whole. This is the complete list; docs/api.md explains each.


def _conflict_codes(enum: type[AccountResult] | type[TransferResult]) -> tuple[str, ...]:
    return tuple(r.name for r in enum if r.name.startswith("exists_with_different_"))


def _rule_codes(enum: type[AccountResult] | type[TransferResult]) -> tuple[str, ...]:
    conflicts = _conflict_codes(enum)
    return tuple(r.name for r in enum if r.name not in ("ok", "exists", *conflicts))


ACCOUNT_CONFLICT_CODES = _conflict_codes(AccountResult)
TRANSFER_CONFLICT_CODES = _conflict_codes(TransferResult)
ACCOUNT_RULE_CODES = _rule_codes(AccountResult)
TRANSFER_RULE_CODES = _rule_codes(TransferResult)

register(400, {
    "invalid_id": "the {id} in the path is not a decimal integer from 1 to 2^63-1",
    "batch_empty": "a batch with no items",
})
register(403, {"id_reserved": "an id of the request is in the processor's own range"})
register(404, {
    "not_found": "no route has this path",
    "account_not_found": "no account has this id",
    "transfer_not_found": "no transfer has this id",
})
register(405, {"method_not_allowed": "the route does not accept this method"})
register(413, {
    "body_too_large": "the body exceeds the server's limit",
    "batch_too_large": "a batch holds more items than the limit",
})
register(429, {"rate_limited": "the caller spent its rate limit; retry after Retry-After"})
register(503, {"not_ready": "/readyz: the service is starting or stopping"})
register(409, dict.fromkeys(ACCOUNT_CONFLICT_CODES + TRANSFER_CONFLICT_CODES,
                            "a single create found an item with the same id but other fields"))
# currency_mismatch is answered by payments too: registered once, in processor.errors.
register(422, dict.fromkeys(
    (code for code in ACCOUNT_RULE_CODES + TRANSFER_RULE_CODES if code != "currency_mismatch"),
    "a single create broke this ledger rule; nothing was written"))
# The codes about a request as a whole, as the edge answers them (statuses: the registry's).
REQUEST_ERROR_CODES: dict[str, int] = statuses((
    "malformed_json", "invalid_body", "invalid_id", "batch_empty", "invalid_query",
    "token_missing", "token_invalid", "token_expired", "token_revoked",
    # Signed requests (actors/edge/signatures.py), checked after the token.
    *SIGNATURE_CODES,
    "scope_missing", "id_reserved", "not_found", "account_not_found", "transfer_not_found",
    "method_not_allowed", "body_too_large", "batch_too_large", "overloaded", "rate_limited",
    "account_quota_exceeded", "internal", "unavailable", "not_ready",
))
# Every code an error body can carry, with its HTTP status: the whole registry
# (processor.errors), the payments' codes included.
ERROR_CODES: Mapping[str, int] = ERROR_STATUS


class ApiError(TxprocError):
    """A request refused with an HTTP status and a stable error code."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, code=code)
        _require(ERROR_CODES.get(code) == status, f"error code {code} belongs to status {status}")
        self.status = status
        self.headers = headers or {}


def _error_body(exc: ApiError) -> bytes:
    return ENCODER.encode(
        ErrorResponse(ErrorDetail(exc.code, exc.message[:ERROR_MESSAGE_CHARS_MAX])))


def _error_response(exc: ApiError) -> Response:
    return Response(_error_body(exc), exc.status, headers=exc.headers,
                    media_type="application/json")


def _json_response(status: int, body: msgspec.Struct) -> Response:
    return Response(ENCODER.encode(body), status, media_type="application/json")


def _refused(result: AccountResult | TransferResult, what: str) -> ApiError:
    status = ERROR_CODES[result.name]
    return ApiError(status, result.name, f"the {what} was not created: {result.name}")


def _retry_after_header(exc: LedgerError) -> dict[str, str]:
    # Retry-After takes whole seconds (RFC 9110 section 10.2.3); rounding up never invites
    # a retry before the server asked, and at least 1 keeps clients from spinning.
    return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}


# ---------------------------------------------------------------------------------------
# Reading requests.

T = TypeVar("T")

_CONTENT_LENGTH = re.compile(r"[0-9]{1,32}")
# A positive decimal without sign, spaces or leading zeros: one spelling per id, so that
# caches and logs never see two paths for the same account.
_PATH_ID = re.compile(r"[1-9][0-9]{0,18}")


async def _read_body(request: Request, body_bytes_max: int) -> bytes:
    """Return the request body, refusing it (413) as soon as it exceeds ``body_bytes_max``."""
    _check_declared_length(request.headers.get("content-length"), body_bytes_max)
    # Without a Content-Length (chunked encoding) the size is known only while reading, so
    # the body is read incrementally and reading stops at the first byte over the limit.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > body_bytes_max:
            raise ApiError(413, "body_too_large", f"the body exceeds {body_bytes_max} bytes")
    return bytes(body)


def _check_declared_length(declared: str | None, body_bytes_max: int) -> None:
    if declared is not None:
        if _CONTENT_LENGTH.fullmatch(declared) is None:
            raise ApiError(400, "invalid_body", "Content-Length is not a decimal integer")
        if int(declared) > body_bytes_max:
            raise ApiError(413, "body_too_large", f"the body exceeds {body_bytes_max} bytes")


async def _receive_body(receive: Receive, declared: str | None, body_bytes_max: int) -> bytes:
    """``_read_body`` straight over ASGI messages, for the route served without Starlette:
    the same limits and errors (a disconnect is Starlette's ``ClientDisconnect``)."""
    _check_declared_length(declared, body_bytes_max)
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if message["type"] != "http.request":
            continue
        chunk: bytes = message.get("body", b"")
        body += chunk
        if len(body) > body_bytes_max:
            raise ApiError(413, "body_too_large", f"the body exceeds {body_bytes_max} bytes")
        if not message.get("more_body", False):
            return body


def _replaying(body: bytes, receive: Receive) -> Receive:
    """An ASGI receive that gives ``body`` (already read) as the whole request, then
    whatever ``receive`` gives (a disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _send_json(send: Send, status: int, body: bytes, headers: dict[str, str] | None
                     ) -> None:
    """Answer a route served without Starlette as its ``Response`` would: the given headers
    first, then the length and the JSON content type."""
    raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                   for k, v in headers.items()] if headers else []
    raw_headers += [(b"content-length", str(len(body)).encode()), _JSON_CONTENT_TYPE]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of a header (ASGI names are lower-case), as Starlette's Headers.get."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_body", str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", str(exc)) from exc
    except UnicodeDecodeError as exc:  # a string that is not UTF-8
        raise ApiError(400, "malformed_json", "the body is not valid UTF-8") from exc
    except RecursionError as exc:
        raise ApiError(400, "malformed_json", "the body nests too deeply") from exc


def _path_id(request: Request) -> int:
    text = request.path_params["id"]
    if _PATH_ID.fullmatch(text) is None or int(text) > ID_MAX:
        raise ApiError(400, "invalid_id", f"the id must be an integer from 1 to {ID_MAX}")
    return int(text)


def _batch_items(items: list[T]) -> list[T]:
    if not items:
        raise ApiError(400, "batch_empty", "the batch holds no items")
    if len(items) > BATCH_ITEMS_MAX:
        raise ApiError(
            413, "batch_too_large", f"the batch holds {len(items)} items; at most "
            f"{BATCH_ITEMS_MAX} are accepted"
        )
    return items


# What a signature must be (RFC 9421, section 5.1), sent with every signature error.
ACCEPT_SIGNATURE = (
    'sig1=("@method" "@target-uri" "content-digest" "authorization");created;nonce;keyid;'
    f'alg="{SIGNATURE_ALGORITHM}"')

_AUTH_MESSAGES = {
    "token_missing": "send an Authorization: Bearer <token> header",
    "token_invalid": "the bearer token is not valid",
    "token_expired": "the bearer token has expired",
    "token_revoked": "the bearer token has been revoked",
}


# ---------------------------------------------------------------------------------------
# Endpoints. ``_Api`` holds what build_app was given; each endpoint method reads the request,
# calls the service, and encodes the answer. Authentication and the mapping of exceptions to
# responses happen once, in ``_Api.endpoint``, for every route.


class PaymentsService(Protocol):
    """Where the payments routes go: (status, JSON body, extra headers) for every answer;
    ``LedgerError`` when payments cannot take the request now (answered 503)."""

    async def call(self, principal: str, operation: str, key: str, subject_id: str,
                   body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        ...

    async def webhook(self, provider: str, headers: dict[str, str],
                      body: bytes) -> tuple[int, bytes, dict[str, str]]:
        ...


def _forwarded_headers(request: Request) -> dict[str, str]:
    """The request's headers for the payments actor, less the bearer token (checked here;
    payments never need it) and any audit header a client made up."""
    return {name: value for name, value in request.headers.items()
            if name not in _NOT_FORWARDED}


_NOT_FORWARDED = frozenset({"authorization", ORIGIN_HEADER, AUDIT_HEADER})


class _Api:
    def __init__(
        self,
        service: LedgerService,
        key: bytes | Credentials,
        *,
        clock_s: Callable[[], float],
        ready: Callable[[], bool],
        body_bytes_max: int,
        payments: PaymentsService | None = None,
        reserved_id_min: int = RESERVED_ID_MIN_DEFAULT,
        rate_limiter: RateLimiter,
        audit: AuditWriter | None = None,
        signatures: RequestSignatures | None = None,
    ) -> None:
        # Without a front's checks no client key is known: every signature is refused.
        self._signatures = (signatures if signatures is not None
                            else RequestSignatures(required=False, nonces=None))
        self._reserved_id_min = reserved_id_min
        self._limiter = rate_limiter
        self._audit = audit
        self._payments = payments
        self._service = service
        self._credentials = as_credentials(key)
        # Authorization header value -> its verified claims; oldest first, bounded.
        self._verified: OrderedDict[str, Claims] = OrderedDict()
        self._clock_s = clock_s
        self._ready = ready
        self._body_bytes_max = body_bytes_max

    def endpoint(self, operation: Operation) -> Callable[[Request], Awaitable[Response]]:
        """Return the Starlette endpoint of ``operation``: auth, then the handler, guarded."""
        handler = types.MethodType(operation.handler, self)

        async def guarded(request: Request) -> Response:
            try:
                if operation.scope is not None:
                    request.state.claims = self._authorize(
                        request.headers.get("authorization"), operation.scope)
                    if operation.method in ("POST", "DELETE"):
                        request = await self._signed(request)
                response: Response = await handler(request)
                return response
            except Exception as exc:  # noqa: BLE001 - every exception becomes a JSON answer, see _answer
                return _answer(request, exc)

        async def traced(request: Request) -> Response:
            if telemetry.TRACER is None:
                return await guarded(request)
            with telemetry.span(f"{operation.method} {operation.path}", attributes={
                    "http.request.method": operation.method,
                    "http.route": operation.path}) as current:
                response = await guarded(request)
                if current is not None:
                    current.set_attribute("http.response.status_code", response.status_code)
                return response

        traced.__name__ = operation.name
        return traced

    def _authorize(self, header: str | None, scope: str) -> Claims:
        """The claims of the ``Authorization`` header's token, which must carry ``scope``.

        Raises AuthError (401) or ScopeError (403)."""
        now_s = math.floor(self._clock_s())
        # Remembered by the whole header value: the same value always names the same token,
        # so a repeated one is neither parsed nor verified again.
        # A missing header is looked up as "", which is never stored: bearer_token refuses it.
        claims = self._verified.get(header or "")
        if claims is None or now_s >= claims.expires_at_s:
            # A token's signature is checked once; afterwards only its expiry, which a
            # remembered token is held to as well (so an expired one still answers 401).
            claims = self._credentials.verify(bearer_token(header), now_s=now_s)
            self._verified[header or ""] = claims
            if len(self._verified) > VERIFIED_TOKENS_MAX:
                self._verified.popitem(last=False)
        # Held to retired keys and revocations on every request, remembered or not.
        self._credentials.check(claims)
        require_scope(claims, scope)
        self._take(claims, 1, now_s)
        return claims

    def _take(self, claims: Claims, operations: int, now_s: float | None = None) -> None:
        """Take ``operations`` from the caller's rate limit, or raise 429 ``rate_limited``
        with ``Retry-After`` and the RateLimit header fields (processor/ratelimit.py)."""
        limiter = self._limiter
        if not limiter.enabled or operations <= 0:
            return
        decision = limiter.take(principal_of(claims), operations,
                                self._clock_s() if now_s is None else now_s)
        if decision.allowed:
            return
        raise ApiError(429, "rate_limited", (
            f"the rate limit of {limiter.rate_per_s:g} operations/s (burst {limiter.burst}) "
            "is spent; nothing was applied"), {
            "Retry-After": str(max(1, math.ceil(decision.retry_after_s))),
            "RateLimit-Policy": limiter.policy(),
            "RateLimit": f'"principal";r={decision.remaining};'
                         f"t={max(1, math.ceil(decision.reset_s))}",
        })

    async def _signed(self, request: Request) -> Request:
        """Check a state-changing request's signature after its token (actors/edge/
        signatures.py). A signed request's body is read here, for its digest, and handed
        on: the request returned reads it again. Raises ``SignatureError`` (401)."""
        verified = self._signatures.check(request.state.claims, request.scope)
        if verified is None:
            return request
        body = await _read_body(request, self._body_bytes_max)
        await self._signatures.admit(verified, body)
        return Request(request.scope, _replaying(body, request.receive))

    async def _origin(self, claims: Claims, request_id: str | None, operation: str,
                      items: int) -> int:
        """Write the request's audit record (actors/edge/audit.py); its id, 0 without a
        writer. Raises ``Unavailable`` (503) if it cannot be written."""
        if self._audit is None:
            return 0
        return await self._audit.record(claims, request_id_of(request_id), operation, items)

    async def healthz(self, request: Request) -> Response:
        return _json_response(200, HealthResponse("ok"))

    async def readyz(self, request: Request) -> Response:
        if not self._ready():
            raise ApiError(
                503, "not_ready", "the service is starting or stopping", {"Retry-After": "1"}
            )
        return _json_response(200, HealthResponse("ok"))

    async def openapi(self, request: Request) -> Response:
        return Response(OPENAPI_JSON, 200, media_type="application/json")

    def _check_reserved(self, claims: Claims, reserved: bool) -> None:
        """Refuse ids in the processor's own range to a caller without the system scope."""
        if reserved and SYSTEM_SCOPE not in claims.scopes:
            raise ApiError(403, "id_reserved",
                           f"ids from {self._reserved_id_min} up belong to the processor")

    async def create_account(self, request: Request) -> Response:
        item = _decode(ACCOUNT_DECODER, await _read_body(request, self._body_bytes_max))
        claims = request.state.claims
        self._check_reserved(claims, accounts_reserved([account_from_request(item)],
                                                       self._reserved_id_min))
        origin = await self._origin(claims, request.headers.get("x-request-id"),
                                    "create_accounts", 1)
        [result] = await self._create_accounts(
            [account_from_request(item, claims.tenant_slot, origin)])
        if result not in (AccountResult.ok, AccountResult.exists):
            raise _refused(result, "account")
        stored = await self._stored_account(item.id, claims)
        return _json_response(201 if result is AccountResult.ok else 200, stored)

    async def create_accounts(self, request: Request) -> Response:
        batch = _decode(ACCOUNT_BATCH_DECODER, await _read_body(request, self._body_bytes_max))
        items = _batch_items(batch.accounts)
        # One operation was taken with the token; the rest of the batch now, before any
        # part of it is applied.
        self._take(request.state.claims, len(items) - 1)
        claims = request.state.claims
        accounts = [account_from_request(item) for item in items]
        self._check_reserved(claims, accounts_reserved(accounts, self._reserved_id_min))
        origin = await self._origin(claims, request.headers.get("x-request-id"),
                                    "create_accounts", len(items))
        accounts = [account_from_request(item, claims.tenant_slot, origin) for item in items]
        results = await self._create_accounts(accounts)
        answers = [
            AccountBatchResult(item.id, _batch_status(result))
            for item, result in zip(items, results, strict=True)
        ]
        return _json_response(200, AccountBatchResponse(answers))

    async def get_account(self, request: Request) -> Response:
        account_id = _path_id(request)
        account = await self._lookup_account(account_id, request.state.claims)
        if account is None:
            raise ApiError(404, "account_not_found", f"no account has the id {account_id}")
        return _json_response(200, account_to_response(account))

    async def create_transfer(self, request: Request) -> Response:
        status, body = await self._create_transfer(
            request.state.claims, await _read_body(request, self._body_bytes_max),
            request.headers.get("x-request-id"))
        return Response(body, status, media_type="application/json")

    async def _create_transfer(self, claims: Claims, body: bytes,
                               request_id: str | None) -> tuple[int, bytes]:
        """POST /v1/transfers after authorization: the status and JSON body of the answer."""
        item = _decode(TRANSFER_DECODER, body)
        self._check_reserved(claims, transfers_reserved(
            [transfer_from_request(item)], self._reserved_id_min))
        origin = await self._origin(claims, request_id, "create_transfers", 1)
        transfer = transfer_from_request(item, claims.tenant_slot, origin)
        with _HTTP_TRANSFER_SECONDS.time():
            [result] = await self._create_transfers([transfer])
        if result not in (TransferResult.ok, TransferResult.exists):
            raise _refused(result, "transfer")
        stored = await self._stored_transfer(item.id, claims)
        return 201 if result is TransferResult.ok else 200, ENCODER.encode(stored)

    async def serve_create_transfer(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/transfers as a bare ASGI app: the hot route of single transfers.

        Answers exactly what the Starlette route does (same auth, limits, errors, headers),
        without the framework's per-request layers (middleware, router, Request and Response
        objects), which cost about as much CPU as the rest of the request.
        """
        await self._serve_direct(TRANSFERS_PATH, self._serve_create_transfer, scope, receive,
                                 send)

    async def _serve_direct(
        self, path: str,
        serve: Callable[[Scope, Receive], Awaitable[tuple[int, bytes, dict[str, str] | None]]],
        scope: Scope, receive: Receive, send: Send,
    ) -> None:
        """A POST route served without Starlette: ``serve``'s answer sent as its Response
        would be, inside a span of the route when tracing is on."""
        if telemetry.TRACER is None:
            status, body, headers = await serve(scope, receive)
        else:
            with telemetry.span(f"POST {path}", attributes={
                    "http.request.method": "POST", "http.route": path}) as current:
                status, body, headers = await serve(scope, receive)
                if current is not None:
                    current.set_attribute("http.response.status_code", status)
        await _send_json(send, status, body, headers)

    async def _serve_create_transfer(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, bytes, dict[str, str] | None]:
        headers = scope["headers"]
        try:
            claims = self._authorize(_header(headers, b"authorization"), "transfers:write")
            verified = self._signatures.check(claims, scope)
            body = await _receive_body(receive, _header(headers, b"content-length"),
                                       self._body_bytes_max)
            if verified is not None:
                await self._signatures.admit(verified, body)
            status, answer = await self._create_transfer(
                claims, body, _header(headers, b"x-request-id"))
            return status, answer, {}
        except Exception as exc:  # noqa: BLE001 - every exception becomes a JSON answer, as in endpoint()
            error = _api_error_of(exc, "POST", scope["path"])
            return error.status, _error_body(error), error.headers

    async def serve_create_payment(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/payments as a bare ASGI app, as ``serve_create_transfer``: every
        authorization crosses the front here, and the framework's layers cost about as much
        of the front's CPU as forwarding the request does. Answers exactly what the
        Starlette route (``create_payment``) answers."""
        await self._serve_direct(PAYMENTS_PATH, self._serve_create_payment, scope, receive,
                                 send)

    async def _serve_create_payment(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, bytes, dict[str, str] | None]:
        headers = scope["headers"]
        try:
            claims = self._authorize(_header(headers, b"authorization"), "payments:write")
            verified = self._signatures.check(claims, scope)
            body: bytes | None = None
            if verified is not None:
                body = await _receive_body(receive, _header(headers, b"content-length"),
                                           self._body_bytes_max)
                await self._signatures.admit(verified, body)
            payments = self._require_payments()
            key = _header(headers, b"idempotency-key")
            forwarded = {name.decode("latin-1"): value.decode("latin-1")
                         for name, value in headers}
            for name in _NOT_FORWARDED:
                forwarded.pop(name, None)
            # The key is checked before the body is read (the idempotency-key draft).
            require_key(key)
            if body is None:
                body = await _receive_body(receive, _header(headers, b"content-length"),
                                           self._body_bytes_max)
            forwarded[ORIGIN_HEADER] = str(self._delegated_origin(
                claims, _header(headers, b"x-request-id"), "authorize", forwarded))
            return await payments.call(principal_of(claims), "authorize", key or "", "", body,
                                       forwarded)
        except Exception as exc:  # noqa: BLE001 - every exception becomes a JSON answer, as in endpoint()
            error = _api_error_of(exc, "POST", scope["path"])
            return error.status, _error_body(error), error.headers or {}

    def _delegated_origin(self, claims: Claims, request_id: str | None, operation: str,
                          forwarded: dict[str, str]) -> int:
        """The audit record of a payments request whose first write the payments actor
        makes (``AUDITED_OPERATIONS``): made here and handed over in ``forwarded``
        (processor/request_audit.py); 0 without a writer."""
        if self._audit is None:
            return 0
        origin, forwarded[AUDIT_HEADER] = self._audit.delegate(
            claims, request_id_of(request_id), f"payments.{operation}", 1)
        return origin

    async def create_transfers(self, request: Request) -> Response:
        batch = _decode(TRANSFER_BATCH_DECODER, await _read_body(request, self._body_bytes_max))
        items = _batch_items(batch.transfers)
        self._take(request.state.claims, len(items) - 1)
        claims = request.state.claims
        transfers = [transfer_from_request(item) for item in items]
        self._check_reserved(claims, transfers_reserved(transfers, self._reserved_id_min))
        origin = await self._origin(claims, request.headers.get("x-request-id"),
                                    "create_transfers", len(items))
        transfers = [transfer_from_request(item, claims.tenant_slot, origin) for item in items]
        with _HTTP_TRANSFER_SECONDS.time():
            results = await self._create_transfers(transfers)
        answers = [
            TransferBatchResult(item.id, _batch_status(result))
            for item, result in zip(items, results, strict=True)
        ]
        return _json_response(200, TransferBatchResponse(answers))

    async def get_transfer(self, request: Request) -> Response:
        transfer_id = _path_id(request)
        transfer = await self._lookup_transfer(transfer_id, request.state.claims)
        if transfer is None:
            archived = getattr(self._service, "archived_transfer", None)
            name = None if archived is None else await archived(
                transfer_id, request.state.claims.tenant_slot)
            if name is not None:
                raise ApiError(410, "archived", f"transfer {transfer_id} is in a month "
                                                f"archived as {name}; restore it to read it")
            raise ApiError(404, "transfer_not_found", f"no transfer has the id {transfer_id}")
        return _json_response(200, transfer_to_response(transfer))

    # -- history, queries, balances at an instant (processor/history.py) -------------------

    def _history(self) -> HistoryService:
        """The service's history reads; 503 where the service has none."""
        if not hasattr(self._service, "query_transfers"):
            raise ApiError(503, "unavailable", "this server keeps no history",
                           {"Retry-After": "60"})
        return self._service  # type: ignore[return-value]

    async def get_account_transfers(self, request: Request) -> Response:
        account_id = _path_id(request)
        params = _history_params(request, _ACCOUNT_TRANSFERS_PARAMS)
        try:
            query = AccountTransfersFilter(account_id=account_id, **params)
            page = await self._history().get_account_transfers(
                query, request.state.claims.tenant_slot)
        except HistoryError as exc:
            raise ApiError(ERROR_CODES[exc.code], exc.code, exc.message) from exc
        if page is None:
            raise ApiError(404, "account_not_found", f"no account has the id {account_id}")
        return _json_response(200, _page_response(page))

    async def query_transfers(self, request: Request) -> Response:
        params = _history_params(request, _QUERY_TRANSFERS_PARAMS)
        try:
            page = await self._history().query_transfers(
                TransfersQuery(**params), request.state.claims.tenant_slot)
        except HistoryError as exc:
            raise ApiError(ERROR_CODES[exc.code], exc.code, exc.message) from exc
        return _json_response(200, _page_response(page))

    async def stream_transfers(self, request: Request) -> Response:
        """The change stream's next page as newline-delimited JSON: a line per transfer with
        its cursor, then ``{"next_cursor"}``, which the header repeats."""
        params = _history_params(request, _STREAM_PARAMS)
        service = self._service
        if not hasattr(service, "stream_transfers"):
            raise ApiError(503, "unavailable", "this server keeps no change stream",
                           {"Retry-After": "60"})
        after = params.get("after", "")
        try:
            page = await cast(StreamService, service).stream_transfers(
                after, params.get("limit", STREAM_LIMIT_DEFAULT),
                params.get("wait_s", STREAM_WAIT_S_DEFAULT), request.state.claims.tenant_slot)
            cursors = item_cursors(after, page)
        except HistoryError as exc:
            raise ApiError(ERROR_CODES[exc.code], exc.code, exc.message) from exc
        lines = [ENCODER.encode(StreamLine(cursor=c, transfer=transfer_to_response(t)))
                 for c, t in zip(cursors, page.data, strict=True)]
        lines.append(ENCODER.encode(StreamEnd(next_cursor=page.next_cursor)))
        return Response(b"\n".join(lines) + b"\n", 200, media_type=NDJSON,
                        headers={STREAM_CURSOR_HEADER: page.next_cursor})

    async def get_account_balances(self, request: Request) -> Response:
        account_id = _path_id(request)
        params = _history_params(request, {"at": "instant"})
        if "at_ns" not in params:
            raise ApiError(400, "invalid_query", "at (an RFC 3339 time) is required")
        try:
            balances = await self._history().get_account_balances(
                account_id, params["at_ns"], request.state.claims.tenant_slot)
        except HistoryError as exc:  # archived
            raise ApiError(ERROR_CODES[exc.code], exc.code, exc.message) from exc
        if balances is None:
            raise ApiError(404, "account_not_found", f"no account has the id {account_id}")
        return _json_response(200, _balances_response(balances))

    # -- payments -------------------------------------------------------------------------

    def _require_payments(self) -> PaymentsService:
        if self._payments is None:
            raise ApiError(503, "unavailable", "payments are not enabled on this server",
                           {"Retry-After": "60"})
        return self._payments

    async def _payments_call(self, request: Request, operation: str) -> Response:
        payments = self._require_payments()
        body = b""
        key = request.headers.get("idempotency-key")
        forwarded = _forwarded_headers(request)
        if request.method == "POST":
            # The key is checked before the body is read (the idempotency-key draft).
            require_key(key)
            body = await _read_body(request, self._body_bytes_max)
            if operation in AUDITED_OPERATIONS:
                # Written by the payments actor with the request's first write
                # (processor/request_audit.py): no statement of its own here.
                origin = self._delegated_origin(
                    request.state.claims, request.headers.get("x-request-id"), operation,
                    forwarded)
            else:
                origin = await self._origin(request.state.claims,
                                            request.headers.get("x-request-id"),
                                            f"payments.{operation}", 1)
            forwarded[ORIGIN_HEADER] = str(origin)
        elif request.method == "DELETE":
            origin = await self._origin(request.state.claims,
                                        request.headers.get("x-request-id"),
                                        f"payments.{operation}", 1)
            forwarded[ORIGIN_HEADER] = str(origin)
        status, answer, headers = await payments.call(
            principal_of(request.state.claims), operation, key or "",
            next(iter(request.path_params.values()), ""), body, forwarded)
        return Response(answer, status, headers=headers, media_type="application/json")

    async def create_payment(self, request: Request) -> Response:
        return await self._payments_call(request, "authorize")

    async def capture_payment(self, request: Request) -> Response:
        return await self._payments_call(request, "capture")

    async def create_capture(self, request: Request) -> Response:
        return await self._payments_call(request, "create_capture")

    async def increment_payment(self, request: Request) -> Response:
        return await self._payments_call(request, "increment")

    async def void_payment(self, request: Request) -> Response:
        return await self._payments_call(request, "void")

    async def refund_payment(self, request: Request) -> Response:
        return await self._payments_call(request, "refund")

    async def create_payout(self, request: Request) -> Response:
        return await self._payments_call(request, "payout")

    async def get_payment(self, request: Request) -> Response:
        return await self._payments_call(request, "get_payment")

    async def get_payout(self, request: Request) -> Response:
        return await self._payments_call(request, "get_payout")

    async def list_events(self, request: Request) -> Response:
        """The tenant's payment and payout events after a cursor, checked here and read by
        the payments actor (docs/payments.md, "Events")."""
        payments = self._require_payments()
        query = _events_query(request.query_params.multi_items())
        status, answer, headers = await payments.call(
            principal_of(request.state.claims), "list_events", "", "",
            ENCODER.encode(query), _forwarded_headers(request))
        return Response(answer, status, headers=headers, media_type="application/json")

    async def list_audit_events(self, request: Request) -> Response:
        """The audit events of operator and configuration actions (actors/ops/
        audit_events.py) after a cursor, oldest first: the caller's tenant's, or every one
        for the processor's own token."""
        try:
            query = audit_query_of(request.query_params.multi_items())
        except AuditQueryError as exc:
            raise ApiError(400, exc.code, str(exc)) from exc
        if self._audit is None:
            raise ApiError(503, "unavailable", "this server keeps no audit events",
                           {"Retry-After": "60"})
        slot = request.state.claims.tenant_slot
        page = await self._audit.events(
            query, tenant_slot=None if slot == PROCESSOR_TENANT else slot)
        return _json_response(200, page)

    async def _list(self, request: Request, operation: str, query: dict[str, Any]
                    ) -> Response:
        """A list operation: the query made JSON here, checked and read by the payments
        actor (processor/payments/listing.py), as RPC sends it."""
        payments = self._require_payments()
        status, answer, headers = await payments.call(
            principal_of(request.state.claims), operation, "", "", ENCODER.encode(query),
            _forwarded_headers(request))
        return Response(answer, status, headers=headers, media_type="application/json")

    async def list_payments(self, request: Request) -> Response:
        return await self._list(request, "list_payments", _list_query(request))

    async def list_payouts(self, request: Request) -> Response:
        return await self._list(request, "list_payouts", _list_query(request))

    async def list_refunds(self, request: Request) -> Response:
        return await self._list(request, "list_refunds", _list_query(request))

    async def list_disputes(self, request: Request) -> Response:
        return await self._list(request, "list_disputes", _list_query(request))

    async def get_dispute(self, request: Request) -> Response:
        return await self._payments_call(request, "get_dispute")

    async def submit_evidence(self, request: Request) -> Response:
        return await self._payments_call(request, "submit_evidence")

    async def create_webhook_endpoint(self, request: Request) -> Response:
        return await self._payments_call(request, "create_webhook_endpoint")

    async def list_webhook_endpoints(self, request: Request) -> Response:
        query = _list_query(request)
        if set(query) - {"limit", "cursor"}:
            raise ApiError(400, "invalid_query", "the list of endpoints takes limit and cursor")
        return await self._list(request, "list_webhook_endpoints", query)

    async def get_webhook_endpoint(self, request: Request) -> Response:
        return await self._payments_call(request, "get_webhook_endpoint")

    async def delete_webhook_endpoint(self, request: Request) -> Response:
        return await self._payments_call(request, "delete_webhook_endpoint")

    # -- settlement reconciliation (operators; docs/reconciliation.md) ---------------------

    async def _reconciliation_call(self, request: Request, operation: str,
                                   query: dict[str, Any] | None = None) -> Response:
        """A reconciliation operation, forwarded like the payments routes; a POST needs no
        Idempotency-Key (a run of a day is idempotent, a resolution happens once) and
        writes its audit record first."""
        payments = self._require_payments()
        body = ENCODER.encode(query) if query is not None else b""
        forwarded = _forwarded_headers(request)
        if request.method == "POST":
            body = await _read_body(request, self._body_bytes_max)
            origin = await self._origin(request.state.claims,
                                        request.headers.get("x-request-id"),
                                        f"reconciliation.{operation}", 1)
            forwarded[ORIGIN_HEADER] = str(origin)
        status, answer, headers = await payments.call(
            principal_of(request.state.claims), operation, "",
            next(iter(request.path_params.values()), ""), body, forwarded)
        return Response(answer, status, headers=headers, media_type="application/json")

    async def create_reconciliation_run(self, request: Request) -> Response:
        return await self._reconciliation_call(request, "create_reconciliation_run")

    async def list_reconciliation_runs(self, request: Request) -> Response:
        return await self._reconciliation_call(request, "list_reconciliation_runs",
                                               _reconciliation_query(request, _RUNS_PARAMS))

    async def get_reconciliation_run(self, request: Request) -> Response:
        return await self._reconciliation_call(request, "get_reconciliation_run")

    async def list_reconciliation_exceptions(self, request: Request) -> Response:
        return await self._reconciliation_call(
            request, "list_reconciliation_exceptions",
            _reconciliation_query(request, _EXCEPTIONS_PARAMS))

    async def resolve_reconciliation_exception(self, request: Request) -> Response:
        return await self._reconciliation_call(request, "resolve_reconciliation_exception")

    async def provider_webhook(self, request: Request) -> Response:
        payments = self._require_payments()
        body = await _read_body(request, self._body_bytes_max)
        status, answer, headers = await payments.webhook(
            request.path_params["provider"], _forwarded_headers(request), body)
        return Response(answer, status, headers=headers, media_type="application/json")

    # The service is checked on the way out: one answer per item, in order.

    async def _create_accounts(self, accounts: list[Account]) -> list[AccountResult]:
        results = await self._service.create_accounts(accounts)
        _require(len(results) == len(accounts), "one account result per account")
        return results

    async def _create_transfers(self, transfers: list[Transfer]) -> list[TransferResult]:
        results = await self._service.create_transfers(transfers)
        _require(len(results) == len(transfers), "one transfer result per transfer")
        return results

    async def _lookup_account(self, account_id: int, claims: Claims) -> Account | None:
        """The account, if it exists and the caller's tenant may see it (actors/edge/tenancy)."""
        [account] = await self._service.lookup_accounts([account_id])
        _require(account is None or account.id == account_id, "the account asked for")
        [account] = visible_accounts([account], claims.tenant_slot)
        return account

    async def _lookup_transfer(self, transfer_id: int, claims: Claims) -> Transfer | None:
        """The transfer, if it exists and the caller's tenant may see it."""
        [transfer] = await self._service.lookup_transfers([transfer_id])
        _require(transfer is None or transfer.id == transfer_id, "the transfer asked for")
        [transfer] = await visible_transfers(self._service, [transfer], claims.tenant_slot)
        return transfer

    # After ``ok`` or ``exists`` the item is stored, and the answer is the stored item with
    # its server-assigned fields. Should a read not see it yet, a retry is safe and will be
    # answered 200 from the stored item, so the client is told to retry rather than given a
    # body without its timestamp.

    async def _stored_account(self, account_id: int, claims: Claims) -> AccountResponse:
        account = await self._lookup_account(account_id, claims)
        if account is None:
            raise ApiError(503, "unavailable", "the account was stored; retry to read it",
                           headers={"Retry-After": "1"})
        return account_to_response(account)

    async def _stored_transfer(self, transfer_id: int, claims: Claims) -> TransferResponse:
        transfer = await self._lookup_transfer(transfer_id, claims)
        if transfer is None:
            raise ApiError(503, "unavailable", "the transfer was stored; retry to read it",
                           headers={"Retry-After": "1"})
        return transfer_to_response(transfer)


# The query parameters of the history routes: name -> kind (how it is read).
_ACCOUNT_TRANSFERS_PARAMS = {"from": "instant", "to": "instant", "limit": "limit",
                             "cursor": "cursor", "order": "order", "side": "side"}
_QUERY_TRANSFERS_PARAMS = {"code": "code", "user_data": "user_data", "from": "instant",
                           "to": "instant", "limit": "limit", "cursor": "cursor"}
_STREAM_PARAMS = {"after": "after", "limit": "limit", "wait": "wait"}
_HISTORY_CHOICES = {"order": ("asc", "desc"), "side": ("debits", "credits", "both")}
_USER_DATA = re.compile(USER_DATA_PATTERN)


def _history_params(request: Request, known: dict[str, str]) -> dict[str, Any]:
    """The history route's query as the keyword arguments of its filter: instants as
    ``<name>_ns`` nanoseconds, whole numbers as ints. 400 ``invalid_query`` for an unknown
    or repeated parameter or a value out of its range (the cursor is checked by the
    store, against the filters: ``invalid_cursor``)."""
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for name, value in request.query_params.multi_items():
        kind = known.get(name)
        if kind is None or name in seen:
            raise ApiError(400, "invalid_query", f"unknown or repeated parameter {name[:40]!r}; "
                                                 f"this route takes {', '.join(known)}")
        seen.add(name)
        if kind == "instant":
            try:
                out[f"{name}_ns"] = parse_rfc3339_ns(value, name)
            except HistoryError as exc:
                raise ApiError(400, exc.code, exc.message) from exc
        elif kind in ("limit", "code"):
            low, high = (1, HISTORY_LIMIT_MAX) if kind == "limit" else (0, CODE_MAX)
            if not (value.isascii() and value.isdigit() and len(value) <= 10
                    and low <= int(value) <= high):
                raise ApiError(400, "invalid_query", f"{name} is a whole number from {low} "
                                                     f"to {high}")
            out[name] = int(value)
        elif kind in _HISTORY_CHOICES:
            if value not in _HISTORY_CHOICES[kind]:
                raise ApiError(400, "invalid_query",
                               f"{name} is one of {', '.join(_HISTORY_CHOICES[kind])}")
            out[name] = value
        elif kind == "user_data":
            if len(value) > USER_DATA_CHARS_MAX or _USER_DATA.fullmatch(value) is None:
                raise ApiError(400, "invalid_query", f"user_data is at most "
                                                     f"{USER_DATA_CHARS_MAX} characters, no NUL")
            out[name] = value
        elif kind == "wait":
            if not (value.isascii() and value.isdigit() and len(value) <= 2
                    and int(value) <= STREAM_WAIT_S_MAX):
                raise ApiError(400, "invalid_query", f"wait is a whole number of seconds "
                                                     f"from 0 to {STREAM_WAIT_S_MAX:g}")
            out["wait_s"] = float(value)
        elif kind == "after":  # a stream cursor: checked by the store
            if len(value) > STREAM_CURSOR_CHARS_MAX:
                raise ApiError(400, "invalid_cursor", "the cursor is not one this stream gave")
            out[name] = value
        else:  # the cursor: its length here, its contents against the filters later
            if not 1 <= len(value) <= 64:
                raise ApiError(400, "invalid_cursor", "the cursor is not one this list gave")
            out[name] = value
    return out


def _page_response(page: TransfersPage) -> TransferPageResponse:
    return TransferPageResponse(data=[transfer_to_response(t) for t in page.data],
                                next_cursor=page.next_cursor)


def _balances_response(b: AccountBalancesAt) -> BalancesAtResponse:
    return BalancesAtResponse(account_id=b.account_id, at=b.at_ns,
                              debits_pending=b.debits_pending, debits_posted=b.debits_posted,
                              credits_pending=b.credits_pending,
                              credits_posted=b.credits_posted)


_EVENT_TYPE = re.compile(EVENT_TYPE_PATTERN)
_EVENTS_QUERY_NAMES = frozenset({"after", "type", "limit"})


def _events_query(items: list[tuple[str, str]]) -> dict[str, Any]:
    """``after`` (an event id, 0 by default), ``type`` and ``limit`` (1 to 1000, 100 by
    default), each at most once; anything else is 400 ``invalid_query``."""
    names = [name for name, _ in items]
    unknown = sorted(set(names) - _EVENTS_QUERY_NAMES)
    if unknown or len(names) != len(set(names)):
        raise ApiError(400, "invalid_query", "the query takes after, type and limit, once each")
    values = dict(items)
    query: dict[str, Any] = {}
    for name, low, high in (("after", 0, ID_MAX), ("limit", 1, EVENTS_PAGE_MAX)):
        text = values.get(name)
        if text is None:
            continue
        if not (text.isascii() and text.isdigit() and len(text) <= 19) or not (
                low <= int(text) <= high):
            raise ApiError(400, "invalid_query", f"{name} is a whole number from {low} to {high}")
        query[name] = int(text)
    event_type = values.get("type")
    if event_type is not None:
        if len(event_type) > 100 or _EVENT_TYPE.fullmatch(event_type) is None:
            raise ApiError(400, "invalid_query", "type is an event type such as payment.captured")
        query["type"] = event_type
    return query


def _list_query(request: Request) -> dict[str, Any]:
    """A list's query parameters as the JSON the payments actor reads; 400
    ``invalid_query`` for an unknown or repeated one (the values are checked there)."""
    try:
        return query_of_params(request.query_params.multi_items())
    except ListError as exc:
        raise ApiError(400, exc.code, str(exc)) from exc


# The query parameters of the reconciliation lists, and which are integers.
_RUNS_PARAMS = {"provider": False, "date": False, "status": False, "limit": True,
                "cursor": False}
_EXCEPTIONS_PARAMS = {"status": False, "provider": False, "kind": False, "date": False,
                      "run_id": True, "limit": True, "cursor": False}


def _reconciliation_query(request: Request, known: dict[str, bool]) -> dict[str, Any]:
    """A reconciliation list's query as JSON; 400 ``invalid_query`` for an unknown or
    repeated parameter or an integer that is not one (the rest is checked there)."""
    query: dict[str, Any] = {}
    for name, value in request.query_params.multi_items():
        if name not in known or name in query:
            raise ApiError(400, "invalid_query", f"unknown or repeated parameter {name[:40]!r}")
        if known[name]:
            if not (value.isascii() and value.isdigit() and len(value) <= 18):
                raise ApiError(400, "invalid_query", f"{name} is not a whole number")
            query[name] = int(value)
        else:
            query[name] = value
    return query


def _answer(request: Request, exc: Exception) -> Response:
    """Map an exception raised while serving ``request`` to its JSON error response."""
    return _error_response(_api_error_of(exc, request.method, request.url.path))


def _api_error_of(exc: Exception, method: str, path: str) -> ApiError:
    """The status, code and headers an exception raised while serving a request answers."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PaymentError):
        exc = api_error_of(exc)
    if isinstance(exc, PaymentsApiError):
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return ApiError(exc.status, exc.code, exc.message, headers)
    if isinstance(exc, AuthError):
        # The auth module's own message is not echoed: a fixed text per code can never
        # quote any part of a token.
        message = _AUTH_MESSAGES.get(exc.code, "the bearer token is not valid")
        code = exc.code if exc.code in _AUTH_MESSAGES else "token_invalid"
        return ApiError(401, code, message, {"WWW-Authenticate": "Bearer"})
    if isinstance(exc, SignatureError):
        # A fixed text per rule, never a header's value; the token's scheme is the challenge.
        return ApiError(401, exc.code, exc.message,
                        {"WWW-Authenticate": "Bearer", "Accept-Signature": ACCEPT_SIGNATURE})
    if isinstance(exc, ScopeError):
        challenge = f'Bearer error="insufficient_scope", scope="{exc.scope}"'
        message = f"the token lacks the scope {exc.scope}"
        return ApiError(403, "scope_missing", message, {"WWW-Authenticate": challenge})
    if isinstance(exc, Overloaded):
        return ApiError(429, "overloaded", exc.message, _retry_after_header(exc))
    if isinstance(exc, QuotaExceeded):
        return ApiError(422, QuotaExceeded.code, exc.message)
    if isinstance(exc, LedgerError):
        # Every request-level ledger error means nothing was written and the request may be
        # repeated unchanged (processor/errors.py), which is what 503 tells a client.
        return ApiError(503, "unavailable", exc.message, _retry_after_header(exc))
    if isinstance(exc, ClientDisconnect):
        # Nobody will read this answer; it only keeps a vanished client out of the 500 logs.
        return ApiError(400, "invalid_body", "the client disconnected")
    return _internal_api_error(method, path, exc)


def _internal_error(request: Request, exc: BaseException) -> Response:
    return _error_response(_internal_api_error(request.method, request.url.path, exc))


def _internal_api_error(method: str, path: str, exc: BaseException) -> ApiError:
    # Method and path only: headers (the token) and bodies never reach the log.
    logger.error("internal error serving %s %s", method, path, exc_info=exc)
    return ApiError(500, "internal", "internal error; it has been logged")


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Answer the router's own 404 and 405 in the shape of every other error."""
    status = exc.status_code
    headers = dict(exc.headers or {})
    if status == 405:
        return _error_response(
            ApiError(405, "method_not_allowed", "the path does not accept this method", headers)
        )
    if status == 404:
        return _error_response(ApiError(404, "not_found", "no such route", headers))
    return _internal_error(request, exc)


async def _unhandled(request: Request, exc: Exception) -> Response:
    """Last resort for an exception outside an endpoint (endpoints answer their own)."""
    return _internal_error(request, exc)


# ---------------------------------------------------------------------------------------
# The route table.


class Reply(msgspec.Struct, frozen=True):
    """One documented response of an operation; ``codes`` are the error codes it carries.

    ``body`` is the struct type of the body (of each line, for newline-delimited JSON), or
    ``dict`` for a free-form JSON object.
    """

    status: int
    description: str
    body: Any
    codes: tuple[str, ...] = ()
    media_type: str = "application/json"


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    """One route: what it needs, what it reads, and every response it can give."""

    name: str
    method: str
    path: str
    summary: str
    handler: Callable[[_Api, Request], Awaitable[Response]]
    scope: str | None
    request: Any = None
    replies: tuple[Reply, ...]


def _error_reply(status: int, description: str, *codes: str) -> Reply:
    _require(all(ERROR_CODES[code] == status for code in codes), f"codes of {status}")
    return Reply(status, description, ErrorResponse, codes)


_BAD_BODY = _error_reply(
    400, "The body is not JSON, or does not match the schema.", "malformed_json", "invalid_body"
)
_BAD_BATCH = _error_reply(
    400,
    "The body is not JSON, does not match the schema, or holds no items.",
    "malformed_json",
    "invalid_body",
    "batch_empty",
)
_BAD_ID = _error_reply(400, f"The path id is not an integer from 1 to {ID_MAX}.", "invalid_id")
_UNAUTHORIZED = _error_reply(
    401, "No usable bearer token.", "token_missing", "token_invalid", "token_expired",
    "token_revoked"
)
# State-changing routes: the token, then the request's signature (docs/security.md,
# "Signed requests").
_UNAUTHORIZED_SIGNED = _error_reply(
    401, "No usable bearer token; or the request's signature is missing where the server "
    "requires one, does not hold, is outside its time window or was used before (these "
    "carry Accept-Signature, the signature wanted: RFC 9421, section 5.1).",
    "token_missing", "token_invalid", "token_expired", "token_revoked", *SIGNATURE_CODES)
_FORBIDDEN = _error_reply(403, "The token lacks the operation's scope.", "scope_missing")
# Creating accounts and transfers: ids from 2^62 up are the processor's own.
_FORBIDDEN_CREATE = _error_reply(
    403, "The token lacks the operation's scope, or an id (of the item, its accounts or its "
    "pending transfer) is in the processor's own range, from 2^62 up; nothing was written.",
    "scope_missing", "id_reserved")
_TOO_LARGE = _error_reply(413, "The body is larger than the server accepts.", "body_too_large")
_TOO_LARGE_BATCH = _error_reply(
    413,
    f"The body is too large, or the batch holds more than {BATCH_ITEMS_MAX} items.",
    "body_too_large",
    "batch_too_large",
)
_OVERLOADED = _error_reply(
    429, "The ledger is at capacity, or the caller spent its rate limit; retry after "
    "Retry-After seconds.", "overloaded", "rate_limited"
)
# Reads of payments and payouts never reach the ledger, but take from the rate limit.
_RATE_LIMITED = _error_reply(
    429, "The caller spent its rate limit; retry after Retry-After seconds.", "rate_limited"
)
_UNAVAILABLE = _error_reply(
    503, "The ledger cannot answer now; retry after Retry-After seconds.", "unavailable"
)
_INTERNAL = _error_reply(
    500, "An unexpected server error, logged. Retrying the same ids is safe.", "internal"
)
_LEDGER_TROUBLE = (_OVERLOADED, _INTERNAL, _UNAVAILABLE)


def _create_replies(
    body: type, conflicts: tuple[str, ...], rules: tuple[str, ...], what: str
) -> tuple[Reply, ...]:
    quota = (QuotaExceeded.code,) if what == "account" else ()
    return (
        Reply(201, f"The {what} was created; the body is the stored {what}.", body),
        Reply(200, f"An identical {what} was already stored; the body is that {what}.", body),
        _BAD_BODY,
        _UNAUTHORIZED_SIGNED,
        _FORBIDDEN_CREATE,
        _error_reply(409, f"A {what} with this id is stored with other fields.", *conflicts),
        _TOO_LARGE,
        _error_reply(422, f"The ledger refused the {what}, or creating it would pass the "
                          "tenant's quota; nothing was written.", *rules, *quota),
        *_LEDGER_TROUBLE,
    )


def _batch_replies(body: type, what: str) -> tuple[Reply, ...]:
    quota = (_error_reply(422, "Creating the batch would pass the tenant's quota of accounts; "
                               "nothing was written.", QuotaExceeded.code),
             ) if what == "account" else ()
    return (
        Reply(200, f"One result per {what}, in request order.", body),
        _BAD_BATCH,
        _UNAUTHORIZED_SIGNED,
        _FORBIDDEN_CREATE,
        _TOO_LARGE_BATCH,
        *quota,
        *_LEDGER_TROUBLE,
    )


def _get_replies(body: type, what: str, not_found: str) -> tuple[Reply, ...]:
    return (
        Reply(200, f"The stored {what}.", body),
        _BAD_ID,
        _UNAUTHORIZED,
        _FORBIDDEN,
        _error_reply(404, f"No {what} has this id.", not_found),
        *_LEDGER_TROUBLE,
    )


def _payment_replies(body: type, *, created: bool) -> tuple[Reply, ...]:
    ok = (Reply(201, "Done; the body is the payment or payout as it now stands.", body),) if (
        created) else (Reply(200, "Done; the body is the payment as it now stands.", body),)
    return (
        *ok,
        Reply(202, "Accepted, outcome not known yet (a provider is pending or did not "
                   "answer); the recovery worker settles it, GET shows the outcome.", body),
        _error_reply(400, "No or a malformed Idempotency-Key, a malformed body, metadata "
                          "beyond its limits, or card data in the request.",
                     "idempotency_key_missing", "idempotency_key_invalid",
                     "card_data_not_allowed", "malformed_json", "invalid_body",
                     "invalid_metadata"),
        _UNAUTHORIZED_SIGNED,
        _FORBIDDEN,
        Reply(402, "Declined by the provider or the risk check; the body carries the error "
                   "and the payment.", PaymentFailure, ("payment_declined", "risk_declined")),
        _error_reply(404, "No payment of yours has this id.", "payment_not_found"),
        _error_reply(409, "The same Idempotency-Key is in flight, or another operation on "
                          "this payment is.", "idempotency_key_in_use", "operation_in_progress"),
        _TOO_LARGE,
        _error_reply(422, "Refused by the payment rules, or the Idempotency-Key was used "
                          "with another request.", "idempotency_key_reused",
                     "payment_not_capturable", "capture_exceeds_authorized",
                     "capture_not_found", "authorization_expired", "increment_not_supported",
                     "payment_not_incrementable", "increment_exceeds_maximum",
                     "payment_not_voidable",
                     "payment_not_refundable", "refund_exceeds_captured",
                     "merchant_account_not_found", "currency_mismatch",
                     "currency_not_supported", "provider_unknown",
                     "insufficient_funds", "amount_must_be_positive", "payment_failed",
                     "payout_failed"),
        _OVERLOADED,
        _INTERNAL,
        _error_reply(503, "No provider (or the ledger) could take it; nothing was done and "
                          "the same request may be sent again.", "provider_unavailable",
                     "unavailable"),
    )


def _list_replies(body: type, description: str) -> tuple[Reply, ...]:
    return (
        Reply(200, description, body),
        _error_reply(400, "A query parameter is unknown, repeated or out of range, or the "
                          "cursor is not one this list gave.", "invalid_query",
                     "invalid_cursor"),
        _UNAUTHORIZED, _FORBIDDEN, _RATE_LIMITED, _INTERNAL, _UNAVAILABLE,
    )


def _history_replies(not_found: str | None) -> tuple[Reply, ...]:
    missing = (_error_reply(404, "No account of yours has this id.", not_found),
               ) if not_found else ()
    bad_id = ("invalid_id",) if not_found else ()
    return (
        Reply(200, "Up to limit transfers and the cursor of the next page (null on the "
                   "last).", TransferPageResponse),
        _error_reply(400, "A query parameter is unknown, repeated or out of range, the "
                          "cursor is not one this list gave for these filters"
                          + (", or the id is not an integer from 1 to 2^63-1." if not_found
                             else "."), *bad_id, "invalid_query", "invalid_cursor"),
        _UNAUTHORIZED, _FORBIDDEN, *missing, _ARCHIVED, *_LEDGER_TROUBLE,
    )


_ARCHIVED = _error_reply(410, "The read reaches into months archived by `txproc archive`; "
                              "the message names the archive and its boundary.", "archived")
_ENDPOINT_NOT_FOUND = _error_reply(404, "No webhook endpoint of yours has this id.",
                                   "webhook_endpoint_not_found")

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        name="healthz", method="GET", path="/healthz", summary="Liveness: the process serves.",
        handler=_Api.healthz, scope=None,
        replies=(Reply(200, "The process is alive.", HealthResponse),),
    ),
    Operation(
        name="readyz", method="GET", path="/readyz",
        summary="Readiness: the ledger can take requests.", handler=_Api.readyz, scope=None,
        replies=(
            Reply(200, "Ready.", HealthResponse),
            _INTERNAL,
            _error_reply(503, "Starting or stopping.", "not_ready"),
        ),
    ),
    Operation(
        name="openapi", method="GET", path="/openapi.json", summary="This document.",
        handler=_Api.openapi, scope=None, replies=(Reply(200, "OpenAPI 3.1 document.", dict),),
    ),
    Operation(
        name="create_account", method="POST", path="/v1/accounts",
        summary="Create one account.", handler=_Api.create_account, scope="accounts:write",
        request=AccountRequest,
        replies=_create_replies(
            AccountResponse, ACCOUNT_CONFLICT_CODES, ACCOUNT_RULE_CODES, "account"
        ),
    ),
    Operation(
        name="create_accounts", method="POST", path="/v1/accounts/batch",
        summary="Create up to 8189 accounts.", handler=_Api.create_accounts,
        scope="accounts:write", request=AccountBatchRequest,
        replies=_batch_replies(AccountBatchResponse, "account"),
    ),
    Operation(
        name="get_account", method="GET", path="/v1/accounts/{id}",
        summary="Read one account with its balances.", handler=_Api.get_account,
        scope="accounts:read",
        replies=_get_replies(AccountResponse, "account", "account_not_found"),
    ),
    Operation(
        name="create_transfer", method="POST", path=TRANSFERS_PATH,
        summary="Create one transfer.", handler=_Api.create_transfer, scope="transfers:write",
        request=TransferRequest,
        replies=_create_replies(
            TransferResponse, TRANSFER_CONFLICT_CODES, TRANSFER_RULE_CODES, "transfer"
        ),
    ),
    Operation(
        name="create_transfers", method="POST", path="/v1/transfers/batch",
        summary="Create up to 8189 transfers.", handler=_Api.create_transfers,
        scope="transfers:write", request=TransferBatchRequest,
        replies=_batch_replies(TransferBatchResponse, "transfer"),
    ),
    # Before /v1/transfers/{id}, which would take "stream" for an id.
    Operation(
        name="stream_transfers", method="GET", path="/v1/transfers/stream",
        summary="The change stream: your tenant's committed transfers after a cursor, as "
                "newline-delimited JSON, long-polled.",
        handler=_Api.stream_transfers, scope="transfers:read",
        replies=(
            Reply(200, "A line per transfer (a StreamLine: the transfer and the cursor after "
                       "it), then a line {\"next_cursor\": ...} to continue from.",
                  StreamLine, media_type=NDJSON),
            _error_reply(400, "A query parameter is unknown, repeated or out of range, or the "
                              "cursor is not one this stream gave.", "invalid_query",
                         "invalid_cursor"),
            _UNAUTHORIZED, _FORBIDDEN, _ARCHIVED, *_LEDGER_TROUBLE,
        ),
    ),
    Operation(
        name="get_transfer", method="GET", path="/v1/transfers/{id}",
        summary="Read one transfer.", handler=_Api.get_transfer, scope="transfers:read",
        replies=(*_get_replies(TransferResponse, "transfer", "transfer_not_found"), _ARCHIVED),
    ),
    Operation(
        name="get_account_transfers", method="GET", path="/v1/accounts/{id}/transfers",
        summary="The account's transfers in a time range, oldest (or newest) first, a page "
                "at a time.",
        handler=_Api.get_account_transfers, scope="accounts:read",
        replies=_history_replies("account_not_found"),
    ),
    Operation(
        name="get_account_balances", method="GET", path="/v1/accounts/{id}/balances",
        summary="The account's four balances as of an instant (at, RFC 3339).",
        handler=_Api.get_account_balances, scope="accounts:read",
        replies=(
            Reply(200, "The balances counting every movement at or before at.",
                  BalancesAtResponse),
            _error_reply(400, "The id is not an integer from 1 to 2^63-1, or at is missing, "
                              "repeated or not an RFC 3339 time from 1970 to 2262.",
                         "invalid_id", "invalid_query"),
            _UNAUTHORIZED, _FORBIDDEN,
            _error_reply(404, "No account of yours has this id.", "account_not_found"),
            _ARCHIVED, *_LEDGER_TROUBLE,
        ),
    ),
    Operation(
        name="query_transfers", method="GET", path=TRANSFERS_PATH,
        summary="The transfers your tenant created, filtered by code and user_data, oldest "
                "first, a page at a time.",
        handler=_Api.query_transfers, scope="transfers:read",
        replies=_history_replies(None),
    ),
    Operation(
        name="create_payment", method="POST", path=PAYMENTS_PATH,
        summary="Authorize a payment (and capture it with capture: true). Needs an "
                "Idempotency-Key header.",
        handler=_Api.create_payment, scope="payments:write", request=AuthorizeRequest,
        replies=_payment_replies(PaymentView, created=True),
    ),
    Operation(
        name="get_payment", method="GET", path="/v1/payments/{payment_id}",
        summary="Read a payment with its operations.", handler=_Api.get_payment,
        scope="payments:read",
        replies=(Reply(200, "The payment.", PaymentView), _UNAUTHORIZED, _FORBIDDEN,
                 _error_reply(404, "No payment of yours has this id.", "payment_not_found"),
                 _RATE_LIMITED, _INTERNAL, _UNAVAILABLE),
    ),
    Operation(
        name="capture_payment", method="POST", path="/v1/payments/{payment_id}/capture",
        summary="Capture all or part of what is authorized, once (the rest is released).",
        handler=_Api.capture_payment, scope="payments:write", request=CaptureRequest,
        replies=_payment_replies(PaymentView, created=False),
    ),
    Operation(
        name="create_capture", method="POST", path="/v1/payments/{payment_id}/captures",
        summary="Capture part of an authorized payment, one of several: final releases the "
                "rest, otherwise it stays capturable. Never more than was authorized.",
        handler=_Api.create_capture, scope="payments:write", request=PartialCaptureRequest,
        replies=_payment_replies(PaymentView, created=False),
    ),
    Operation(
        name="increment_payment", method="POST", path="/v1/payments/{payment_id}/increments",
        summary="Raise an open authorization by amount (incremental authorization), where "
                "its provider offers it (increment_not_supported otherwise).",
        handler=_Api.increment_payment, scope="payments:write", request=IncrementRequest,
        replies=_payment_replies(PaymentView, created=False),
    ),
    Operation(
        name="void_payment", method="POST", path="/v1/payments/{payment_id}/void",
        summary="Release what an authorization still holds (after partial captures, the "
                "rest).",
        handler=_Api.void_payment, scope="payments:write",
        replies=_payment_replies(PaymentView, created=False),
    ),
    Operation(
        name="refund_payment", method="POST", path="/v1/payments/{payment_id}/refunds",
        summary="Refund all or part of what was captured, or of one capture (capture_id); "
                "may be repeated.",
        handler=_Api.refund_payment, scope="payments:write", request=RefundRequest,
        replies=_payment_replies(PaymentView, created=False),
    ),
    Operation(
        name="create_payout", method="POST", path="/v1/payouts",
        summary="Pay a merchant's posted balance out to a bank account through a provider.",
        handler=_Api.create_payout, scope="payouts:write", request=PayoutRequest,
        replies=_payment_replies(PayoutView, created=True),
    ),
    Operation(
        name="get_payout", method="GET", path="/v1/payouts/{payout_id}",
        summary="Read a payout.", handler=_Api.get_payout, scope="payments:read",
        replies=(Reply(200, "The payout.", PayoutView), _UNAUTHORIZED, _FORBIDDEN,
                 _error_reply(404, "No payout of yours has this id.", "payout_not_found"),
                 _RATE_LIMITED, _INTERNAL, _UNAVAILABLE),
    ),
    Operation(
        name="list_events", method="GET", path="/v1/events",
        summary="The tenant's payment and payout events after a cursor, oldest first.",
        handler=_Api.list_events, scope="events:read",
        replies=(Reply(200, "Up to limit events, and the cursor to read on from.", EventsPage),
                 _error_reply(400, "A query parameter is unknown, repeated or out of range.",
                              "invalid_query"),
                 _UNAUTHORIZED, _FORBIDDEN, _RATE_LIMITED, _INTERNAL, _UNAVAILABLE),
    ),
    *(Operation(
        name=f"list_{kind}", method="GET", path=f"/v1/{kind}",
        summary=f"The tenant's {kind}, newest first, filtered, a page at a time.",
        handler=handler, scope="payments:read",
        replies=_list_replies(page, f"Up to limit {kind} and the cursor of the next page "
                                    "(null on the last)."),
    ) for kind, page, handler in (("payments", PaymentsPage, _Api.list_payments),
                                  ("payouts", PayoutsPage, _Api.list_payouts),
                                  ("refunds", RefundsPage, _Api.list_refunds))),
    Operation(
        name="list_disputes", method="GET", path="/v1/disputes",
        summary="The tenant's disputes (chargebacks), newest first, filtered, a page at a "
                "time.",
        handler=_Api.list_disputes, scope="payments:read",
        replies=_list_replies(DisputesPage, "Up to limit disputes and the cursor of the next "
                                            "page (null on the last)."),
    ),
    Operation(
        name="get_dispute", method="GET", path="/v1/disputes/{dispute_id}",
        summary="Read a dispute: its status, amount, fee, deadline and evidence.",
        handler=_Api.get_dispute, scope="payments:read",
        replies=(Reply(200, "The dispute.", DisputeView), _UNAUTHORIZED, _FORBIDDEN,
                 _error_reply(404, "No dispute of yours has this id.", "dispute_not_found"),
                 _RATE_LIMITED, _INTERNAL, _UNAVAILABLE),
    ),
    Operation(
        name="submit_evidence", method="POST", path="/v1/disputes/{dispute_id}/evidence",
        summary="Submit evidence against a dispute that needs a response (once); the "
                "provider reviews it. Needs an Idempotency-Key header.",
        handler=_Api.submit_evidence, scope="disputes:write", request=EvidenceRequest,
        replies=(
            Reply(200, "Taken by the provider: the dispute is under review.", DisputeView),
            Reply(202, "Sent, the provider's answer not known yet; GET shows the outcome.",
                  DisputeView),
            _error_reply(400, "No or a malformed Idempotency-Key, a malformed body, evidence "
                              "beyond its limits, or card data in the request.",
                         "idempotency_key_missing", "idempotency_key_invalid",
                         "card_data_not_allowed", "malformed_json", "invalid_body",
                         "invalid_evidence"),
            _UNAUTHORIZED_SIGNED, _FORBIDDEN,
            _error_reply(404, "No dispute of yours has this id.", "dispute_not_found"),
            _error_reply(409, "The same Idempotency-Key is in flight, or another step of "
                              "this dispute is.", "idempotency_key_in_use",
                         "operation_in_progress"),
            _TOO_LARGE,
            _error_reply(422, "The dispute takes no evidence (under review, decided, past its "
                              "deadline), the provider did not take it, or the "
                              "Idempotency-Key was used with another request.",
                         "idempotency_key_reused", "dispute_not_open",
                         "evidence_deadline_passed", "evidence_not_accepted"),
            _RATE_LIMITED, _INTERNAL, _UNAVAILABLE,
        ),
    ),
    Operation(
        name="list_audit_events", method="GET", path="/v1/audit-events",
        summary="Audit events of operator and configuration actions (keys, tokens, client "
                "keys, webhook endpoints, dead-letter replays, reviews) after a cursor, "
                "oldest first: the tenant's, or every one for the processor's own token.",
        handler=_Api.list_audit_events, scope="audit:read",
        replies=(
            Reply(200, "Up to limit events and the cursor of the next page (null on the "
                       "last).", AuditEventsPage),
            _error_reply(400, "A query parameter is unknown, repeated or out of range, "
                              "after and cursor are both given, or the cursor is not one "
                              "this list gave.", "invalid_query", "invalid_cursor"),
            _UNAUTHORIZED, _FORBIDDEN, _RATE_LIMITED, _INTERNAL, _UNAVAILABLE,
        ),
    ),
    Operation(
        name="create_webhook_endpoint", method="POST", path="/v1/webhook_endpoints",
        summary="Register where the tenant's payment and payout events are sent; the answer "
                "shows the signing secret, once. Needs an Idempotency-Key header.",
        handler=_Api.create_webhook_endpoint, scope="webhooks:write",
        request=WebhookEndpointRequest,
        replies=(
            Reply(201, "Created; the body carries the id and the signing secret.",
                  WebhookEndpointView),
            _error_reply(400, "No or a malformed Idempotency-Key, a malformed body, a URL "
                              "that is not http(s), has credentials or is too long, or an "
                              "unknown event type.", "idempotency_key_missing",
                         "idempotency_key_invalid", "card_data_not_allowed", "malformed_json",
                         "invalid_body", "webhook_url_invalid", "webhook_event_type_unknown"),
            _UNAUTHORIZED_SIGNED, _FORBIDDEN,
            _error_reply(409, "The same Idempotency-Key is in flight.",
                         "idempotency_key_in_use"),
            _TOO_LARGE,
            _error_reply(422, "The Idempotency-Key was used with another request, or the "
                              "tenant has as many endpoints as it may.",
                         "idempotency_key_reused", "webhook_endpoint_limit_reached"),
            _RATE_LIMITED, _INTERNAL, _UNAVAILABLE,
        ),
    ),
    Operation(
        name="list_webhook_endpoints", method="GET", path="/v1/webhook_endpoints",
        summary="The tenant's webhook endpoints (no secrets), newest first.",
        handler=_Api.list_webhook_endpoints, scope="webhooks:read",
        replies=_list_replies(EndpointsPage, "Up to limit endpoints and the cursor of the "
                                             "next page (null on the last)."),
    ),
    Operation(
        name="get_webhook_endpoint", method="GET",
        path="/v1/webhook_endpoints/{webhook_endpoint_id}",
        summary="Read a webhook endpoint (no secret).", handler=_Api.get_webhook_endpoint,
        scope="webhooks:read",
        replies=(Reply(200, "The endpoint.", WebhookEndpointView), _UNAUTHORIZED, _FORBIDDEN,
                 _ENDPOINT_NOT_FOUND, _RATE_LIMITED, _INTERNAL, _UNAVAILABLE),
    ),
    Operation(
        name="delete_webhook_endpoint", method="DELETE",
        path="/v1/webhook_endpoints/{webhook_endpoint_id}",
        summary="Remove a webhook endpoint: nothing more is sent to it, and its deliveries "
                "not yet made are dropped.",
        handler=_Api.delete_webhook_endpoint, scope="webhooks:write",
        replies=(Reply(200, "Removed; the body is the endpoint as it was.",
                       WebhookEndpointView),
                 _UNAUTHORIZED_SIGNED, _FORBIDDEN, _ENDPOINT_NOT_FOUND, _RATE_LIMITED,
                 _INTERNAL, _UNAVAILABLE),
    ),
    Operation(
        name="create_reconciliation_run", method="POST", path="/v1/reconciliation/runs",
        summary="Reconcile a provider's settlement report of a day now and answer the run "
                "with the day's exceptions (docs/reconciliation.md).",
        handler=_Api.create_reconciliation_run, scope="reconciliation:write",
        request=RunRequest,
        replies=(Reply(200, "The run (succeeded, or failed with its error) and the day's "
                            "exceptions.", RunView),
                 _BAD_BODY, _UNAUTHORIZED_SIGNED, _FORBIDDEN, _TOO_LARGE,
                 _error_reply(422, "No provider has this name, or the day is after "
                                   "tomorrow.", "provider_unknown", "date_in_future"),
                 _RATE_LIMITED, _INTERNAL, _UNAVAILABLE),
    ),
    Operation(
        name="list_reconciliation_runs", method="GET", path="/v1/reconciliation/runs",
        summary="Reconciliation runs, newest first, filtered, a page at a time.",
        handler=_Api.list_reconciliation_runs, scope="reconciliation:read",
        replies=(Reply(200, "Up to limit runs and the cursor of the next page (null on the "
                            "last).", RunsPage),
                 _error_reply(400, "A query parameter is unknown, repeated or out of range.",
                              "invalid_query"),
                 _UNAUTHORIZED, _FORBIDDEN, _RATE_LIMITED, _INTERNAL, _UNAVAILABLE),
    ),
    Operation(
        name="get_reconciliation_run", method="GET", path="/v1/reconciliation/runs/{run_id}",
        summary="One reconciliation run with its day's exceptions.",
        handler=_Api.get_reconciliation_run, scope="reconciliation:read",
        replies=(Reply(200, "The run.", RunView), _UNAUTHORIZED, _FORBIDDEN,
                 _error_reply(404, "No run has this id.", "reconciliation_run_not_found"),
                 _RATE_LIMITED, _INTERNAL, _UNAVAILABLE),
    ),
    Operation(
        name="list_reconciliation_exceptions", method="GET",
        path="/v1/reconciliation/exceptions",
        summary="Reconciliation exceptions, newest first, filtered (status=open), a page at "
                "a time.",
        handler=_Api.list_reconciliation_exceptions, scope="reconciliation:read",
        replies=(Reply(200, "Up to limit exceptions and the cursor of the next page (null "
                            "on the last).", ExceptionsPage),
                 _error_reply(400, "A query parameter is unknown, repeated or out of range.",
                              "invalid_query"),
                 _UNAUTHORIZED, _FORBIDDEN, _RATE_LIMITED, _INTERNAL, _UNAVAILABLE),
    ),
    Operation(
        name="resolve_reconciliation_exception", method="POST",
        path="/v1/reconciliation/exceptions/{exception_id}/resolve",
        summary="Resolve an open reconciliation exception with a resolution and a note, "
                "recorded with who did it (once).",
        handler=_Api.resolve_reconciliation_exception, scope="reconciliation:write",
        request=ResolveRequest,
        replies=(Reply(200, "The exception, resolved.", ExceptionView),
                 _BAD_BODY, _UNAUTHORIZED_SIGNED, _FORBIDDEN,
                 _error_reply(404, "No exception has this id.",
                              "reconciliation_exception_not_found"),
                 _error_reply(409, "The exception is resolved already.",
                              "exception_already_resolved"),
                 _TOO_LARGE, _RATE_LIMITED, _INTERNAL, _UNAVAILABLE),
    ),
    Operation(
        name="provider_webhook", method="POST", path="/v1/providers/{provider}/webhooks",
        summary="A provider's signed event (HMAC over timestamp and body; no bearer token).",
        # The event is a JSON object in the provider's own shape (adapters/), so the
        # document says no more than that.
        handler=_Api.provider_webhook, scope=None, request=dict,
        replies=(
            Reply(200, "Accepted: applied, a duplicate, or about something that moved on; "
                  "for a provider's batch, status \"batch\" and each event's, in order.",
                  WebhookAnswer),
            _error_reply(400, "The event cannot be read.", "webhook_malformed"),
            _error_reply(401, "The signature or its timestamp does not hold.",
                         "webhook_signature_invalid", "webhook_timestamp_out_of_tolerance"),
            _error_reply(404, "No provider has this name.", "webhook_provider_unknown"),
            _TOO_LARGE, _INTERNAL, _UNAVAILABLE,
        ),
    ),
)
_require(all(op.scope is None or op.scope in SCOPES for op in OPERATIONS), "scopes are known")


# ---------------------------------------------------------------------------------------
# The OpenAPI 3.1 document, built once from OPERATIONS and the structs above.

_REF = "#/components/schemas/{name}"
_SECURITY_SCHEME = "bearer"
_SCOPE_TEXT = {
    "accounts:read": "read accounts and their balances",
    "accounts:write": "create accounts",
    "transfers:read": "read transfers",
    "transfers:write": "create transfers",
    "payments:read": "read payments and payouts",
    "payments:write": "authorize, capture, void and refund payments",
    "payouts:write": "pay merchants out",
    "events:read": "read the stream of payment and payout events",
    "webhooks:read": "read the tenant's webhook endpoints",
    "webhooks:write": "create and remove the tenant's webhook endpoints",
    "disputes:write": "submit evidence against disputes",
    "audit:read": "read the audit events of operator and configuration actions",
    "reconciliation:read": "read settlement reconciliation runs and exceptions",
    "reconciliation:write": "run settlement reconciliation and resolve its exceptions",
}
_require(set(_SCOPE_TEXT) == set(SCOPES), "every scope is described")


def _response_object(reply: Reply, refs: dict[Any, Any]) -> dict[str, Any]:
    description = reply.description
    if reply.codes:
        description += " Error codes: " + ", ".join(reply.codes) + "."
    schema = {"type": "object"} if reply.body is dict else refs[reply.body]
    entry: dict[str, Any] = {
        "description": description,
        "content": {reply.media_type: {"schema": schema}},
    }
    if reply.media_type == NDJSON:
        entry["headers"] = {STREAM_CURSOR_HEADER: {
            "description": "The cursor to continue from, as on the last line.",
            "schema": {"type": "string"}}}
    if reply.codes:
        entry["x-error-codes"] = list(reply.codes)
    if reply.status in (429, 503):
        entry["headers"] = {"Retry-After": {
            "description": "Whole seconds to wait before retrying, at least 1.",
            "schema": {"type": "integer", "minimum": 1},
        }}
    if reply.status in (401, 403):
        entry["headers"] = {"WWW-Authenticate": {
            "description": "The bearer challenge (RFC 6750).", "schema": {"type": "string"},
        }}
    return entry


def _operation_object(op: Operation, refs: dict[Any, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "operationId": op.name,
        "summary": op.summary,
        "security": [] if op.scope is None else [{_SECURITY_SCHEME: [op.scope]}],
        "responses": {str(r.status): _response_object(r, refs) for r in op.replies},
    }
    if "{id}" in op.path:
        entry["parameters"] = [{
            "name": "id", "in": "path", "required": True,
            "schema": {"type": "integer", "minimum": 1, "maximum": ID_MAX},
        }]
    for name, pattern in (("payment_id", "^pay_[0-9a-f]{24}$"),
                          ("payout_id", "^po_[0-9a-f]{24}$"),
                          ("provider", "^[a-z][a-z0-9_]{0,31}$"),
                          ("webhook_endpoint_id", ENDPOINT_ID_PATTERN),
                          ("run_id", "^[1-9][0-9]{0,17}$"),
                          ("exception_id", "^[1-9][0-9]{0,17}$")):
        if "{" + name + "}" in op.path:
            entry["parameters"] = [{
                "name": name, "in": "path", "required": True,
                "schema": {"type": "string", "pattern": pattern},
            }]
    if op.path == "/v1/events":
        entry["parameters"] = [
            {"name": "after", "in": "query", "required": False,
             "description": "Events after this id (the previous page's next_cursor).",
             "schema": {"type": "integer", "minimum": 0, "maximum": ID_MAX}},
            {"name": "type", "in": "query", "required": False,
             "schema": {"type": "string", "pattern": EVENT_TYPE_PATTERN, "maxLength": 100}},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": EVENTS_PAGE_MAX}},
        ]
    if op.path == "/v1/audit-events":
        entry["parameters"] = [
            {"name": "after", "in": "query", "required": False,
             "description": "Events after this id (not with cursor).",
             "schema": {"type": "integer", "minimum": 0, "maximum": ID_MAX}},
            {"name": "cursor", "in": "query", "required": False,
             "description": "The previous page's next_cursor (not with after).",
             "schema": {"type": "string", "minLength": 1, "maxLength": 64}},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": AUDIT_PAGE_LIMIT_MAX}},
            {"name": "action", "in": "query", "required": False,
             "schema": {"type": "string", "enum": sorted(ACTIONS)}},
        ]
    elif op.name in _RECONCILIATION_LISTS:
        entry["parameters"] = _RECONCILIATION_LISTS[op.name]
    elif op.method == "GET" and op.name.startswith("list_") and op.name != "list_events":
        entry["parameters"] = _list_parameters(op.name.removeprefix("list_"))
    if op.name in _HISTORY_PARAMETERS:
        entry.setdefault("parameters", []).extend(_HISTORY_PARAMETERS[op.name])
    if op.scope is not None and op.method == "POST" and op.path.startswith(
            ("/v1/payments", "/v1/payouts", "/v1/webhook_endpoints")):
        entry.setdefault("parameters", []).append({
            "name": "Idempotency-Key", "in": "header", "required": True,
            "description": "1-255 visible ASCII characters, unique per intended operation.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        })
    if op.request is not None:
        entry["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[op.request]}},
        }
    return entry


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_DAY = {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}
_PROVIDER = {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,31}$"}
_CURSOR = {"type": "string", "pattern": "^[0-9]{1,19}$"}
_RECONCILIATION_LISTS: dict[str, list[dict[str, Any]]] = {
    "list_reconciliation_runs": [
        _query("provider", _PROVIDER), _query("date", _DAY),
        _query("status", {"type": "string", "enum": ["succeeded", "failed"]}),
        _query("limit", {"type": "integer", "minimum": 1, "maximum": RUNS_PAGE_MAX}),
        _query("cursor", _CURSOR)],
    "list_reconciliation_exceptions": [
        _query("status", {"type": "string", "enum": ["open", "resolved"]}),
        _query("provider", _PROVIDER),
        _query("kind", {"type": "string", "pattern": "^[a-z_]{1,40}$"}), _query("date", _DAY),
        _query("run_id", {"type": "integer", "minimum": 1, "maximum": ID_MAX}),
        _query("limit", {"type": "integer", "minimum": 1, "maximum": EXCEPTIONS_PAGE_MAX}),
        _query("cursor", _CURSOR)],
}


_INSTANT = {"type": "string", "format": "date-time", "maxLength": 40,
            "description": "RFC 3339 with its offset and up to nine fractional digits."}
_HISTORY_PAGING = [
    _query("from", _INSTANT | {"description": "Transfers at or after this instant."}),
    _query("to", _INSTANT | {"description": "Transfers before this instant."}),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": HISTORY_LIMIT_MAX,
                     "default": 100}),
    _query("cursor", {"type": "string", "minLength": 1, "maxLength": 64,
                      "description": "The previous page's next_cursor, with the same "
                                     "filters."}),
]
_HISTORY_PARAMETERS: dict[str, list[dict[str, Any]]] = {
    "get_account_transfers": [
        *_HISTORY_PAGING,
        _query("order", {"type": "string", "enum": ["asc", "desc"], "default": "asc"}),
        _query("side", {"type": "string", "enum": ["debits", "credits", "both"],
                        "default": "both"}),
    ],
    "query_transfers": [
        _query("code", {"type": "integer", "minimum": 0, "maximum": CODE_MAX}),
        _query("user_data", {"type": "string", "maxLength": USER_DATA_CHARS_MAX,
                             "pattern": USER_DATA_PATTERN}),
        *_HISTORY_PAGING,
    ],
    "get_account_balances": [
        {"name": "at", "in": "query", "required": True, "schema": _INSTANT},
    ],
    "stream_transfers": [
        _query("after", {"type": "string", "maxLength": STREAM_CURSOR_CHARS_MAX,
                         "pattern": "^[A-Za-z0-9_-]*$",
                         "description": "A cursor the stream gave (a line's or next_cursor); "
                                        "none: from the beginning."}),
        _query("limit", {"type": "integer", "minimum": 1, "maximum": STREAM_LIMIT_MAX,
                         "default": STREAM_LIMIT_DEFAULT}),
        _query("wait", {"type": "integer", "minimum": 0, "maximum": int(STREAM_WAIT_S_MAX),
                        "default": int(STREAM_WAIT_S_DEFAULT),
                        "description": "Seconds to wait for a transfer when none is new."}),
    ],
}


def _list_parameters(kind: str) -> list[dict[str, Any]]:
    """The query parameters of a list (processor/payments/listing.py)."""
    paging = [
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1,
                    "maximum": ENDPOINTS_PAGE_MAX if kind == "webhook_endpoints"
                    else PAGE_LIMIT_MAX}},
        {"name": "cursor", "in": "query", "required": False,
         "description": "The previous page's next_cursor.",
         "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
    ]
    if kind == "webhook_endpoints":
        return paging
    instant = {"oneOf": [{"type": "string", "format": "date-time"},
                         {"type": "integer", "minimum": 0}]}
    filters: list[dict[str, Any]] = [
        {"name": "status", "in": "query", "required": False,
         "schema": {"type": "string", "enum": sorted(LIST_KINDS[kind])}},
        {"name": "merchant_account_id", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": ID_MAX}},
        {"name": "created", "in": "query", "required": False, "style": "deepObject",
         "explode": True,
         "description": "created[gte] and created[lt]: an RFC 3339 time with its offset, or "
                        "Unix seconds.",
         "schema": {"type": "object", "additionalProperties": False,
                    "properties": {"gte": instant, "lt": instant}}},
        {"name": "metadata", "in": "query", "required": False, "style": "deepObject",
         "explode": True, "description": "metadata[key]=value: that key holds exactly "
                                         "that value (every pair given must match).",
         "schema": _METADATA_SCHEMA},
    ]
    if kind == "disputes":  # no metadata; payment_id as refunds
        filters = filters[:-1]
    if kind in ("refunds", "disputes"):
        filters.append({"name": "payment_id", "in": "query", "required": False,
                        "schema": {"type": "string", "pattern": "^pay_[0-9a-f]{24}$"}})
    else:
        filters.append({"name": "reference", "in": "query", "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 64,
                                   "pattern": "^[A-Za-z0-9_.:-]*$"}})
    return filters + paging


# Metadata's limits (processor.payments.listing.check_metadata), which the request structs
# leave to that check so that every breach answers invalid_metadata.
_METADATA_SCHEMA: dict[str, Any] = {
    "type": "object", "maxProperties": 20,
    "propertyNames": {"minLength": 1, "maxLength": 40},
    "additionalProperties": {"type": "string", "maxLength": 500},
}


def _openapi_document() -> dict[str, Any]:
    struct_types = sorted(
        {op.request for op in OPERATIONS if op.request is not None}
        | {r.body for op in OPERATIONS for r in op.replies if r.body not in (None, dict)},
        key=lambda t: t.__name__,
    )
    schemas, components = msgspec.json.schema_components(struct_types, ref_template=_REF)
    refs = dict(zip(struct_types, schemas, strict=True))
    for name, field in (("AccountBatchRequest", "accounts"), ("TransferBatchRequest", "transfers")):
        components[name]["properties"][field] |= {"minItems": 1, "maxItems": BATCH_ITEMS_MAX}
    for name in ("AuthorizeRequest", "PayoutRequest", "RefundRequest"):
        components[name]["properties"]["metadata"] = dict(_METADATA_SCHEMA)
    components["WebhookEndpointRequest"]["properties"]["url"] |= {"maxLength": 2048}
    # Evidence limits (processor.payments.check_evidence: every breach invalid_evidence).
    components["EvidenceRequest"]["properties"]["text"] |= {
        "minLength": 1, "maxLength": EVIDENCE_TEXT_CHARS_MAX}
    components["EvidenceRequest"]["properties"]["files"] |= {
        "maxItems": EVIDENCE_FILES_MAX,
        "items": {"type": "string", "minLength": 1, "maxLength": EVIDENCE_FILE_CHARS_MAX}}
    components["WebhookEndpointRequest"]["properties"]["events"] = {
        "anyOf": [{"type": "array", "minItems": 1, "maxItems": 32,
                   "items": {"type": "string", "enum": list(EVENT_TYPES)}},
                  {"type": "null"}],
        "description": "The event types to send; omitted or null: every type."}
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation_object(op, refs)
    scopes = "; ".join(f"`{scope}`: {text}" for scope, text in _SCOPE_TEXT.items())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "txproc ledger API",
            "version": "1",
            "description": "Accounts and transfers of a double-entry ledger. See docs/api.md.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {_SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": f"HS256 JWT carrying scopes. Scopes: {scopes}.",
            }},
        },
    }


OPENAPI: dict[str, Any] = _openapi_document()
OPENAPI_JSON: bytes = ENCODER.encode(OPENAPI)


def build_app(
    service: LedgerService,
    key: bytes | Credentials,
    *,
    clock_s: Callable[[], float],
    ready: Callable[[], bool],
    body_bytes_max: int = BODY_BYTES_MAX_DEFAULT,
    payments: PaymentsService | None = None,
    reserved_id_min: int = RESERVED_ID_MIN_DEFAULT,
    rate_limiter: RateLimiter | None = None,
    audit: AuditWriter | None = None,
    signatures: RequestSignatures | None = None,
) -> _App:
    """Return the ASGI app serving the partner API over ``service``.

    ``key`` verifies bearer tokens: one key, or a front's ``Credentials`` (its key ring and
    revocations, checked on every request); ``clock_s`` gives seconds since the Unix epoch
    for token expiry; ``ready`` answers /readyz; a request body over ``body_bytes_max`` bytes is
    refused with 413. Raises ``ValueError`` for a ``body_bytes_max`` below 1.
    ``payments`` serves the payments routes once their token and scope are checked (the
    front's ``PaymentsLink`` to the payments actor); without it they answer 503.
    Account and transfer ids from ``reserved_id_min`` up are refused (403 ``id_reserved``)
    to a token without the system scope (processor/reserved.py). A request beyond its
    principal's ``rate_limiter`` budget (one operation, or one per item of a batch) is
    refused with 429 ``rate_limited``. With ``audit``, every state-changing request writes
    its audit record before it is applied, and what it creates carries the record's id.
    ``signatures`` checks the signatures of state-changing requests after their token
    (actors/edge/signatures.py; 401 ``signature_*``, ``request_replayed``); without it,
    unsigned requests pass and a signed one is refused (no client key is known).
    """
    if body_bytes_max < 1:
        raise ValueError(f"body_bytes_max must be positive, got {body_bytes_max}")
    api = _Api(service, key, clock_s=clock_s, ready=ready, body_bytes_max=body_bytes_max,
               payments=payments, reserved_id_min=reserved_id_min,
               rate_limiter=rate_limiter or RateLimiter(0, 0), audit=audit,
               signatures=signatures)
    routes = [
        Route(op.path, api.endpoint(op), methods=[op.method], name=op.name) for op in OPERATIONS
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_exception, Exception: _unhandled},  # type: ignore[dict-item]
    )
    # A trailing slash is a different, unknown path: a redirect would turn a POST into a
    # second request that some clients replay as GET.
    app.router.redirect_slashes = False
    return _App(app, api)


class _App:
    """The API's ASGI app: POST /v1/transfers and POST /v1/payments served directly, every
    other request by Starlette (which also serves those routes when the app is mounted
    under a root path)."""

    def __init__(self, framework: Starlette, api: _Api) -> None:
        self.framework = framework
        self._api = api

    @property
    def routes(self) -> list[BaseRoute]:
        """Every route, the one served directly included (Starlette holds it too)."""
        return self.framework.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get(
                "root_path"):
            path = scope["path"]
            if path == TRANSFERS_PATH:
                await self._api.serve_create_transfer(scope, receive, send)
                return
            if path == PAYMENTS_PATH:
                await self._api.serve_create_payment(scope, receive, send)
                return
        await self.framework(scope, receive, send)
