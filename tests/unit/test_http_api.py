"""Tests of actors.edge.http_api: decoding, auth, limits and status mapping over a fake ledger."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable

import httpx
import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from actors.edge.http_api import (
    ERROR_CODES,
    OPERATIONS,
    AccountResponse,
    ErrorResponse,
    Operation,
    TransferResponse,
    build_app,
)
from processor import history, stream
from processor.codes import AccountResult, TransferResult
from processor.errors import Overloaded, Unavailable
from processor.history import (
    AccountBalancesAt,
    AccountTransfersFilter,
    TransfersPage,
    TransfersQuery,
)
from processor.identity import SCOPES, issue_token
from processor.ratelimit import RateLimiter
from processor.service import BATCH_ITEMS_MAX
from processor.types import Account, AccountFlags, Transfer
from tests.http_fuzz import (
    HEADER_TEXT,
    PAYMENT_OPERATIONS,
    FuzzRequest,
    assert_well_answered,
    requests_for,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW_S = 1_700_000_000
# The fake ledger refuses a transfer above this amount with exceeds_credits.
CREDIT_LIMIT = 1_000_000
BODY_BYTES_MAX = 4 * 1024 * 1024


class FakeLedger:
    """An in-memory LedgerService with just enough rules to produce every kind of result."""

    def __init__(self) -> None:
        self.accounts: dict[int, Account] = {}
        self.transfers: dict[int, Transfer] = {}
        # Raised by every method when set, as a shard at capacity or restarting would.
        self.error: Exception | None = None
        # Transfer ids an archive in force holds, with the archive's name.
        self.archived: dict[int, str] = {}
        # Lookups answer None, as a read that does not yet see a committed write would.
        self.forget = False
        self.ready = True
        self.submitted: list[Account | Transfer] = []
        self._timestamp_ns = 1_700_000_000_000_000_000

    def _tick_ns(self) -> int:
        self._timestamp_ns += 1
        return self._timestamp_ns

    def _raise_if_told(self) -> None:
        if self.error is not None:
            raise self.error

    def is_ready(self) -> bool:
        self._raise_if_told()
        return self.ready

    async def create_accounts(self, accounts: list[Account]) -> list[AccountResult]:
        self._raise_if_told()
        self.submitted.extend(accounts)
        return [self._create_account(account) for account in accounts]

    async def create_transfers(self, transfers: list[Transfer]) -> list[TransferResult]:
        self._raise_if_told()
        self.submitted.extend(transfers)
        return [self._create_transfer(transfer) for transfer in transfers]

    async def lookup_accounts(self, ids: list[int]) -> list[Account | None]:
        self._raise_if_told()
        return [None if self.forget else self.accounts.get(i) for i in ids]

    async def lookup_transfers(self, ids: list[int]) -> list[Transfer | None]:
        self._raise_if_told()
        return [None if self.forget else self.transfers.get(i) for i in ids]

    def _create_account(self, account: Account) -> AccountResult:
        limits = (
            AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
            | AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS
        )
        if account.id == 0:
            return AccountResult.id_must_not_be_zero
        if account.flags & limits == limits:
            return AccountResult.flags_are_mutually_exclusive
        stored = self.accounts.get(account.id)
        if stored is None:
            self.accounts[account.id] = msgspec.structs.replace(
                account, timestamp=self._tick_ns()
            )
            return AccountResult.ok
        for field in ("flags", "currency", "code", "user_data"):
            if getattr(stored, field) != getattr(account, field):
                return AccountResult[f"exists_with_different_{field}"]
        return AccountResult.exists

    def _create_transfer(self, transfer: Transfer) -> TransferResult:
        if transfer.id == 0:
            return TransferResult.id_must_not_be_zero
        if transfer.amount == 0:
            return TransferResult.amount_must_not_be_zero
        stored = self.transfers.get(transfer.id)
        if stored is not None:
            for field in ("flags", "amount", "currency", "code", "user_data"):
                if getattr(stored, field) != getattr(transfer, field):
                    return TransferResult[f"exists_with_different_{field}"]
            return TransferResult.exists
        if transfer.amount > CREDIT_LIMIT:
            return TransferResult.exceeds_credits
        self.transfers[transfer.id] = msgspec.structs.replace(
            transfer, timestamp=self._tick_ns()
        )
        return TransferResult.ok

    # History (processor.history.HistoryService), in memory: every stored row is final.

    def _page(self, query: AccountTransfersFilter | TransfersQuery, rows: list[Transfer],
              descending: bool) -> TransfersPage:
        after = history.decode_cursor(query)
        key = (lambda t: (-t.timestamp, -t.id)) if descending else (
            lambda t: (t.timestamp, t.id))
        rows = sorted((t for t in rows if query.from_ns <= t.timestamp < query.to_ns), key=key)
        if after is not None:
            rows = [t for t in rows if key(t) > key(msgspec.structs.replace(
                t, timestamp=after.timestamp, id=after.id))]
        if len(rows) <= query.limit:
            return TransfersPage(data=rows, next_cursor=None)
        last = rows[query.limit - 1]
        return TransfersPage(data=rows[:query.limit], next_cursor=history.encode_cursor(
            query, history.Position(last.timestamp, last.id)))

    async def get_account_transfers(self, query: AccountTransfersFilter,
                                    tenant: int) -> TransfersPage | None:
        self._raise_if_told()
        if query.account_id not in self.accounts:
            return None
        sides = {"debits": ("debit",), "credits": ("credit",), "both": ("debit", "credit")}
        rows = [t for t in self.transfers.values() if any(
            getattr(t, f"{side}_account_id") == query.account_id
            for side in sides[query.side])]
        return self._page(query, rows, query.order == "desc")

    async def query_transfers(self, query: TransfersQuery, tenant: int) -> TransfersPage:
        self._raise_if_told()
        rows = [t for t in self.transfers.values()
                if query.code in (None, t.code) and query.user_data in (None, t.user_data)]
        return self._page(query, rows, False)

    async def stream_transfers(self, after: str, limit: int, wait_s: float,
                               tenant: int) -> stream.StreamPage:
        """Every stored transfer as one shard's, in timestamp order."""
        self._raise_if_told()
        cursor = stream.decode_stream_cursor(after, 1)
        rows = sorted((t for t in self.transfers.values()
                       if t.timestamp > cursor.positions[0]), key=lambda t: t.timestamp)
        scanned = max([cursor.positions[0], *(t.timestamp for t in rows)])
        return stream.merge_reads(cursor, [stream.ShardRead(0, rows, scanned)], limit)

    async def archived_transfer(self, transfer_id: int, tenant: int) -> str | None:
        self._raise_if_told()
        return self.archived.get(transfer_id)

    async def get_account_balances(self, account_id: int, at_ns: int,
                                   tenant: int) -> AccountBalancesAt | None:
        self._raise_if_told()
        if account_id not in self.accounts:
            return None
        return history.balances_at(self.transfers.values(), [], account_id, at_ns)


def token(scopes: Iterable[str] = SCOPES, *, key: bytes = KEY, now_s: int = NOW_S,
          ttl_s: int = 3600) -> str:
    return issue_token(key, scopes, ttl_s=ttl_s, now_s=now_s)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


TOKEN = token()
AUTH = bearer(TOKEN)


def account_json(account_id: int = 1, **fields: object) -> dict[str, object]:
    return {"id": account_id, "currency": "EUR", **fields}


def transfer_json(transfer_id: int = 10, **fields: object) -> dict[str, object]:
    body: dict[str, object] = {
        "id": transfer_id, "debit_account_id": 1, "credit_account_id": 2, "amount": 500,
        "currency": "EUR",
    }
    return body | fields


def encode(value: object) -> bytes:
    return json.dumps(value).encode()


def assert_error(response: httpx.Response, status: int, code: str) -> ErrorResponse:
    """Check the status, the error shape, and that the code is a documented one."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = msgspec.json.decode(response.content, type=ErrorResponse)
    assert body.error.code == code, body
    assert ERROR_CODES[code] == status
    assert body.error.message
    return body


def make_client(ledger: FakeLedger, body_bytes_max: int = BODY_BYTES_MAX) -> httpx.AsyncClient:
    app = build_app(
        ledger, KEY, clock_s=lambda: float(NOW_S), ready=ledger.is_ready,
        body_bytes_max=body_bytes_max,
    )
    # raise_app_exceptions=False: a 500 must reach the test as a response, like a client.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://ledger.test")


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger()


@pytest.fixture
async def client(ledger: FakeLedger) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(ledger) as http:
        yield http


# ---------------------------------------------------------------------------------------
# Bad input: one row per input, with the status and code it must get.

ACCOUNT_BATCH_OVER = encode({"accounts": [account_json(i) for i in range(1, BATCH_ITEMS_MAX + 2)]})
TRANSFER_BATCH_OVER = encode(
    {"transfers": [transfer_json(i) for i in range(1, BATCH_ITEMS_MAX + 2)]}
)

# A string that is not UTF-8, and nesting deeper than any decoder's recursion limit.
NOT_UTF8_ACCOUNT = b'{"id": 1, "currency": "\xff\xfe"}'
NOT_UTF8_TRANSFER = (b'{"id": 1, "debit_account_id": 1, "credit_account_id": 2, "amount": 1, '
                     b'"currency": "\xff\xfe"}')
DEEP = b"[" * 200_000
DEEP_IN_OBJECT = b'{"id": 1, "currency": ' + b"[" * 200_000


def _not_utf8(path: str) -> bytes:
    item = NOT_UTF8_TRANSFER if "transfers" in path else NOT_UTF8_ACCOUNT
    if path.endswith("/batch"):
        return b'{"%s": [%s]}' % (b"transfers" if "transfers" in path else b"accounts", item)
    return item


BAD_INPUT = [
    # Refused as unreadable or as the wrong shape: a 400 either way, never a 500.
    *[pytest.param("POST", path, content, 400, code, fragment, id=f"{name}-{path[4:]}")
      for path in ("/v1/accounts", "/v1/transfers", "/v1/accounts/batch", "/v1/transfers/batch")
      for name, content, code, fragment in (
          ("not-utf8", _not_utf8(path), "malformed_json", "UTF-8"),
          ("deep", DEEP, "invalid_body", "array"),
          ("deep-in-object", DEEP_IN_OBJECT, "invalid_body", ""))],
    pytest.param("POST", "/v1/accounts", b"not json", 400, "malformed_json", "malformed",
                 id="non-json"),
    pytest.param("POST", "/v1/accounts", b"", 400, "malformed_json", "truncated", id="empty-body"),
    pytest.param("POST", "/v1/accounts", b'{"id": 1, "currency": "EUR"}{', 400, "malformed_json",
                 "trailing", id="trailing-bytes"),
    pytest.param("POST", "/v1/accounts", encode([1, "EUR"]), 400, "invalid_body", "object",
                 id="array-not-object"),
    pytest.param("POST", "/v1/accounts", encode(account_json(currency=978)), 400, "invalid_body",
                 "$.currency", id="wrong-type"),
    pytest.param("POST", "/v1/accounts", encode(account_json(balance=5)), 400, "invalid_body",
                 "`balance`", id="unknown-field"),
    pytest.param("POST", "/v1/accounts", encode(account_json(credits_posted=5)), 400,
                 "invalid_body", "`credits_posted`", id="balance-on-create"),
    pytest.param("POST", "/v1/accounts", encode({"id": 1}), 400, "invalid_body", "`currency`",
                 id="missing-field"),
    pytest.param("POST", "/v1/accounts", encode(account_json(currency="eur")), 400,
                 "invalid_body", "$.currency", id="currency-lower-case"),
    pytest.param("POST", "/v1/accounts", encode(account_json(flags=["no_such_flag"])), 400,
                 "invalid_body", "$.flags[0]", id="flag-unknown"),
    pytest.param("POST", "/v1/accounts", encode(account_json(flags=1)), 400, "invalid_body",
                 "$.flags", id="flags-as-bitmask"),
    pytest.param("POST", "/v1/accounts", encode(account_json(user_data="x" * 129)), 400,
                 "invalid_body", "$.user_data", id="user-data-too-long"),
    pytest.param("POST", "/v1/accounts", encode(account_json("1")), 400, "invalid_body", "$.id",
                 id="id-as-string"),
    pytest.param("POST", "/v1/transfers", b'{"id":10,"debit_account_id":1,"credit_account_id":2,'
                 b'"amount":1.5,"currency":"EUR"}', 400, "invalid_body", "$.amount",
                 id="amount-1.5"),
    pytest.param("POST", "/v1/transfers", encode(transfer_json(amount=1.0)), 400, "invalid_body",
                 "$.amount", id="amount-1.0"),
    pytest.param("POST", "/v1/transfers", encode(transfer_json(amount=-1)), 400, "invalid_body",
                 "$.amount", id="amount-negative"),
    pytest.param("POST", "/v1/transfers", encode(transfer_json(amount=2**63)), 400,
                 "invalid_body", "$.amount", id="amount-2**63"),
    pytest.param("POST", "/v1/transfers", encode(transfer_json(amount="500")), 400,
                 "invalid_body", "$.amount", id="amount-as-string"),
    pytest.param("POST", "/v1/transfers", encode(transfer_json(amount=True)), 400,
                 "invalid_body", "$.amount", id="amount-as-bool"),
    pytest.param("POST", "/v1/transfers", b'{"id":10,"debit_account_id":1,"credit_account_id":2,'
                 b'"amount":1e400,"currency":"EUR"}', 400, "invalid_body", "$.amount",
                 id="amount-1e400"),
    pytest.param("POST", "/v1/transfers", encode(transfer_json(timestamp=5)), 400,
                 "invalid_body", "`timestamp`", id="timestamp-on-create"),
    pytest.param("POST", "/v1/transfers", encode(transfer_json(flags=["pending", "posted"])), 400,
                 "invalid_body", "$.flags[1]", id="transfer-flag-unknown"),
    pytest.param("POST", "/v1/accounts", b"x" * (BODY_BYTES_MAX + 1), 413, "body_too_large",
                 "bytes", id="oversized-body"),
    pytest.param("POST", "/v1/accounts/batch", ACCOUNT_BATCH_OVER, 413, "batch_too_large",
                 "8189", id="account-batch-8190"),
    pytest.param("POST", "/v1/transfers/batch", TRANSFER_BATCH_OVER, 413, "batch_too_large",
                 "8189", id="transfer-batch-8190"),
    pytest.param("POST", "/v1/accounts/batch", encode({"accounts": []}), 400, "batch_empty",
                 "no items", id="account-batch-empty"),
    pytest.param("POST", "/v1/transfers/batch", encode({"transfers": []}), 400, "batch_empty",
                 "no items", id="transfer-batch-empty"),
    pytest.param("POST", "/v1/transfers/batch", encode([transfer_json()]), 400, "invalid_body",
                 "object", id="batch-bare-array"),
    pytest.param("POST", "/v1/transfers/batch",
                 encode({"transfers": [transfer_json(1), transfer_json(2, amount=-5)]}), 400,
                 "invalid_body", "$.transfers[1].amount", id="batch-one-bad-item"),
    pytest.param("GET", "/v1/accounts/abc", None, 400, "invalid_id", "integer", id="id-word"),
    pytest.param("GET", "/v1/accounts/0", None, 400, "invalid_id", "integer", id="id-zero"),
    pytest.param("GET", "/v1/accounts/-1", None, 400, "invalid_id", "integer", id="id-negative"),
    pytest.param("GET", "/v1/accounts/01", None, 400, "invalid_id", "integer",
                 id="id-leading-zero"),
    pytest.param("GET", "/v1/accounts/1.0", None, 400, "invalid_id", "integer", id="id-float"),
    pytest.param("GET", f"/v1/transfers/{2**63}", None, 400, "invalid_id", "integer",
                 id="id-2**63"),
    pytest.param("GET", "/v1/transfers/%EF%BC%91", None, 400, "invalid_id", "integer",
                 id="id-fullwidth-digit"),
    pytest.param("GET", "/v1/nothing", None, 404, "not_found", "route", id="unknown-route"),
    pytest.param("GET", "/v1/accounts", None, 405, "method_not_allowed", "method",
                 id="wrong-method"),
    pytest.param("DELETE", "/v1/transfers/1", None, 405, "method_not_allowed", "method",
                 id="delete"),
    pytest.param("POST", "/v1/accounts/", encode(account_json()), 404, "not_found", "route",
                 id="trailing-slash"),
]


@pytest.mark.parametrize(("method", "path", "content", "status", "code", "fragment"), BAD_INPUT)
async def test_bad_input_is_refused_with_its_code(
    client: httpx.AsyncClient, ledger: FakeLedger, method: str, path: str,
    content: bytes | None, status: int, code: str, fragment: str,
) -> None:
    """Each malformed request gets its documented status and code, and nothing is written."""
    response = await client.request(method, path, content=content, headers=AUTH)
    body = assert_error(response, status, code)
    assert fragment in body.error.message
    assert ledger.submitted == []


async def test_largest_batch_is_accepted(client: httpx.AsyncClient) -> None:
    """A batch of exactly BATCH_ITEMS_MAX items is evaluated, one result per item in order."""
    batch = {"accounts": [account_json(i) for i in range(1, BATCH_ITEMS_MAX + 1)]}
    response = await client.post("/v1/accounts/batch", content=encode(batch), headers=AUTH)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["id"] for r in results] == list(range(1, BATCH_ITEMS_MAX + 1))
    assert {r["status"] for r in results} == {"created"}


async def test_amount_limits_are_accepted(client: httpx.AsyncClient, ledger: FakeLedger) -> None:
    """Amounts 1 and 2**63 - 1 decode; the largest reaches the ledger and is refused by rule."""
    small = await client.post("/v1/transfers", json=transfer_json(1, amount=1), headers=AUTH)
    large = await client.post("/v1/transfers", json=transfer_json(2, amount=2**63 - 1),
                              headers=AUTH)
    assert small.status_code == 201
    assert_error(large, 422, "exceeds_credits")
    assert [t.amount for t in ledger.submitted] == [1, 2**63 - 1]


async def test_chunked_body_reading_stops_at_the_limit(ledger: FakeLedger) -> None:
    """A body without Content-Length is read only until it passes body_bytes_max, then 413."""
    chunks_sent = 0

    async def endless_body() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        for _ in range(1000):
            chunks_sent += 1
            yield b" " * 512

    async with make_client(ledger, body_bytes_max=1024) as http:
        response = await http.post("/v1/accounts", content=endless_body(), headers=AUTH)
    assert_error(response, 413, "body_too_large")
    assert chunks_sent <= 4


async def test_content_length_over_limit_is_refused_before_reading(ledger: FakeLedger) -> None:
    """A declared Content-Length over the limit is refused without reading a single chunk."""
    chunks_sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        chunks_sent += 1
        yield b"{}"

    async with make_client(ledger, body_bytes_max=1024) as http:
        headers = AUTH | {"Content-Length": "1025"}
        response = await http.post("/v1/accounts", content=body(), headers=headers)
    assert_error(response, 413, "body_too_large")
    assert chunks_sent == 0


async def test_non_numeric_content_length_is_refused(ledger: FakeLedger) -> None:
    """A Content-Length that is not a decimal integer is a 400 invalid_body, not a 500."""
    app = build_app(ledger, KEY, clock_s=lambda: float(NOW_S), ready=lambda: True)
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/accounts", "raw_path": b"/v1/accounts",
        "query_string": b"", "root_path": "", "server": ("ledger.test", 80),
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode()),
                    (b"content-length", b"2x")],
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 400
    body = msgspec.json.decode(sent[1]["body"], type=ErrorResponse)  # type: ignore[arg-type]
    assert body.error.code == "invalid_body"


def test_body_bytes_max_must_be_positive(ledger: FakeLedger) -> None:
    """A zero body limit is a configuration error, not an API that refuses every body."""
    with pytest.raises(ValueError, match="body_bytes_max"):
        build_app(ledger, KEY, clock_s=lambda: 0.0, ready=lambda: True, body_bytes_max=0)


# ---------------------------------------------------------------------------------------
# Authentication and scopes.

AUTH_CASES = [
    pytest.param({}, 401, "token_missing", id="no-header"),
    pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "token_missing", id="basic"),
    pytest.param({"Authorization": "Bearer"}, 401, "token_missing", id="empty-bearer"),
    pytest.param(bearer("not.a.token"), 401, "token_invalid", id="garbage"),
    pytest.param(bearer(token(key=OTHER_KEY)), 401, "token_invalid", id="forged"),
    pytest.param(bearer(token(now_s=NOW_S - 100, ttl_s=100)), 401, "token_expired", id="expired"),
    pytest.param(bearer(token(["accounts:read"])), 403, "scope_missing", id="wrong-scope"),
    pytest.param(bearer(token([])), 403, "scope_missing", id="no-scopes"),
]


@pytest.mark.parametrize(("headers", "status", "code"), AUTH_CASES)
async def test_auth_failures(
    client: httpx.AsyncClient, ledger: FakeLedger, headers: dict[str, str], status: int,
    code: str,
) -> None:
    """A request without a usable token or scope is refused before its body is looked at."""
    response = await client.post("/v1/accounts", content=b"not json", headers=headers)
    assert_error(response, status, code)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert ledger.submitted == []


SECURED = [pytest.param(op, id=op.name) for op in OPERATIONS if op.scope is not None]


@pytest.mark.parametrize("operation", SECURED)
async def test_every_secured_route_needs_its_own_scope(
    client: httpx.AsyncClient, operation: Operation
) -> None:
    """A token holding every scope but the route's own is refused with 403 scope_missing."""
    scope = operation.scope
    path = operation.path.replace("{id}", "1")
    others = [s for s in SCOPES if s != scope]
    response = await client.request(operation.method, path, headers=bearer(token(others)))
    assert_error(response, 403, "scope_missing")
    assert f'scope="{scope}"' in response.headers["www-authenticate"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json"])
async def test_probes_and_document_need_no_token(client: httpx.AsyncClient, path: str) -> None:
    """Health, readiness and the OpenAPI document answer without any Authorization header."""
    response = await client.get(path)
    assert response.status_code == 200


async def test_internal_error_log_carries_no_token(
    client: httpx.AsyncClient, ledger: FakeLedger, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception is a logged 500 internal, and the log never holds the token."""
    ledger.error = RuntimeError("the fake broke")
    with caplog.at_level(logging.ERROR, logger="actors.edge.http_api"):
        response = await client.post("/v1/accounts", json=account_json(), headers=AUTH)
    assert_error(response, 500, "internal")
    assert "POST /v1/accounts" in caplog.text
    assert "the fake broke" in caplog.text
    assert TOKEN not in caplog.text
    assert TOKEN.split(".")[2] not in caplog.text


# ---------------------------------------------------------------------------------------
# Status mapping of results and request-level errors.


async def test_account_created_then_replayed(client: httpx.AsyncClient) -> None:
    """A new account is 201 with its stored fields; the identical replay is 200 with the same."""
    body = account_json(7, flags=["debits_must_not_exceed_credits"], code=3, user_data="u")
    created = await client.post("/v1/accounts", json=body, headers=AUTH)
    replayed = await client.post("/v1/accounts", json=body, headers=AUTH)
    assert created.status_code == 201
    assert replayed.status_code == 200
    stored = msgspec.json.decode(created.content, type=AccountResponse)
    assert stored.flags == ("debits_must_not_exceed_credits",)
    assert stored.timestamp > 0
    assert (stored.debits_posted, stored.credits_posted) == (0, 0)
    assert replayed.json() == created.json()


async def test_account_flag_names_become_the_bitmask(
    client: httpx.AsyncClient, ledger: FakeLedger
) -> None:
    """Flag names reach the ledger as the AccountFlags bitmask, and both names set both bits."""
    body = account_json(flags=["credits_must_not_exceed_debits", "debits_must_not_exceed_credits"])
    response = await client.post("/v1/accounts", json=body, headers=AUTH)
    assert_error(response, 422, "flags_are_mutually_exclusive")
    assert ledger.submitted[0].flags == 0b11


ACCOUNT_MAPPING = [
    pytest.param(account_json(1, code=9), 409, "exists_with_different_code", id="conflict-code"),
    pytest.param(account_json(1, currency="USD"), 409, "exists_with_different_currency",
                 id="conflict-currency"),
    pytest.param(account_json(0), 422, "id_must_not_be_zero", id="id-zero"),
]


@pytest.mark.parametrize(("body", "status", "code"), ACCOUNT_MAPPING)
async def test_account_refusals(
    client: httpx.AsyncClient, body: dict[str, object], status: int, code: str
) -> None:
    """An exists_with_different_* result is a 409 and any other rule failure a 422."""
    first = await client.post("/v1/accounts", json=account_json(1), headers=AUTH)
    assert first.status_code == 201
    assert_error(await client.post("/v1/accounts", json=body, headers=AUTH), status, code)


async def test_transfer_created_then_replayed(client: httpx.AsyncClient) -> None:
    """A new transfer is 201 with its stored fields and flag names; the replay is 200."""
    body = transfer_json(timeout_s=30, flags=["pending", "linked"])
    created = await client.post("/v1/transfers", json=body, headers=AUTH)
    # Order of names does not matter: the same bits are the same transfer.
    replay = transfer_json(timeout_s=30, flags=["linked", "pending"])
    replayed = await client.post("/v1/transfers", json=replay, headers=AUTH)
    assert created.status_code == 201
    assert replayed.status_code == 200
    stored = msgspec.json.decode(created.content, type=TransferResponse)
    assert stored.flags == ("linked", "pending")
    assert (stored.amount, stored.timeout_s) == (500, 30)
    assert stored.timestamp > 0
    assert replayed.json() == created.json()


TRANSFER_MAPPING = [
    pytest.param(transfer_json(10, amount=501), 409, "exists_with_different_amount",
                 id="conflict-amount"),
    pytest.param(transfer_json(11, amount=CREDIT_LIMIT + 1), 422, "exceeds_credits",
                 id="exceeds-credits"),
    pytest.param(transfer_json(12, amount=0), 422, "amount_must_not_be_zero", id="amount-zero"),
]


@pytest.mark.parametrize(("body", "status", "code"), TRANSFER_MAPPING)
async def test_transfer_refusals(
    client: httpx.AsyncClient, body: dict[str, object], status: int, code: str
) -> None:
    """An exists_with_different_* result is a 409 and any other rule failure a 422."""
    first = await client.post("/v1/transfers", json=transfer_json(10), headers=AUTH)
    assert first.status_code == 201
    assert_error(await client.post("/v1/transfers", json=body, headers=AUTH), status, code)


async def test_get_account_and_transfer(client: httpx.AsyncClient) -> None:
    """A stored account and transfer read back as 200 with the bodies their creation returned."""
    account = await client.post("/v1/accounts", json=account_json(5), headers=AUTH)
    transfer = await client.post("/v1/transfers", json=transfer_json(6), headers=AUTH)
    got_account = await client.get("/v1/accounts/5", headers=AUTH)
    got_transfer = await client.get("/v1/transfers/6", headers=AUTH)
    assert (got_account.status_code, got_transfer.status_code) == (200, 200)
    assert got_account.json() == account.json()
    assert got_transfer.json() == transfer.json()


@pytest.mark.parametrize(("path", "code"), [
    pytest.param("/v1/accounts/404", "account_not_found", id="account"),
    pytest.param(f"/v1/accounts/{2**63 - 1}", "account_not_found", id="account-id-max"),
    pytest.param("/v1/transfers/404", "transfer_not_found", id="transfer"),
])
async def test_unknown_id_is_404(client: httpx.AsyncClient, path: str, code: str) -> None:
    """Reading an id that was never stored is 404 with the kind of item in the code."""
    assert_error(await client.get(path, headers=AUTH), 404, code)


async def test_batches_answer_in_request_order(client: httpx.AsyncClient) -> None:
    """A batch is 200 with one status per item, in request order, whatever each outcome."""
    await client.post("/v1/transfers", json=transfer_json(1), headers=AUTH)
    batch = {"transfers": [
        transfer_json(2), transfer_json(1), transfer_json(1, amount=7),
        transfer_json(3, amount=CREDIT_LIMIT + 1), transfer_json(0),
    ]}
    response = await client.post("/v1/transfers/batch", json=batch, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"results": [
        {"id": 2, "status": "created"},
        {"id": 1, "status": "exists"},
        {"id": 1, "status": "exists_with_different_amount"},
        {"id": 3, "status": "exceeds_credits"},
        {"id": 0, "status": "id_must_not_be_zero"},
    ]}


async def test_account_batch_statuses(client: httpx.AsyncClient) -> None:
    """An account batch reports created, exists and conflicts per item, in request order."""
    batch = {"accounts": [account_json(1), account_json(1), account_json(1, code=2)]}
    response = await client.post("/v1/accounts/batch", json=batch, headers=AUTH)
    assert response.json() == {"results": [
        {"id": 1, "status": "created"},
        {"id": 1, "status": "exists"},
        {"id": 1, "status": "exists_with_different_code"},
    ]}


LEDGER_ERRORS = [
    pytest.param(Overloaded("queue full", retry_after_s=0.2), 429, "overloaded", "1",
                 id="overloaded-0.2s"),
    pytest.param(Overloaded("queue full", retry_after_s=2.5), 429, "overloaded", "3",
                 id="overloaded-2.5s"),
    pytest.param(Unavailable("shard restarting", retry_after_s=7), 503, "unavailable", "7",
                 id="unavailable-7s"),
    pytest.param(Unavailable("shard restarting", retry_after_s=0), 503, "unavailable", "1",
                 id="unavailable-0s"),
]
LEDGER_ROUTES = [
    ("POST", "/v1/accounts", account_json()),
    ("POST", "/v1/accounts/batch", {"accounts": [account_json()]}),
    ("GET", "/v1/accounts/1", None),
    ("POST", "/v1/transfers", transfer_json()),
    ("POST", "/v1/transfers/batch", {"transfers": [transfer_json()]}),
    ("GET", "/v1/transfers/1", None),
]


@pytest.mark.parametrize(("error", "status", "code", "retry_after"), LEDGER_ERRORS)
@pytest.mark.parametrize(("method", "path", "body"), LEDGER_ROUTES)
async def test_ledger_errors_carry_retry_after(
    client: httpx.AsyncClient, ledger: FakeLedger, error: Exception, status: int, code: str,
    retry_after: str, method: str, path: str, body: object,
) -> None:
    """Overloaded is 429 and Unavailable 503 on every ledger route, Retry-After rounded up."""
    ledger.error = error
    response = await client.request(method, path, json=body, headers=AUTH)
    assert_error(response, status, code)
    assert response.headers["retry-after"] == retry_after


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/accounts", account_json()),
    ("/v1/transfers", transfer_json()),
])
async def test_stored_but_unreadable_is_503(
    client: httpx.AsyncClient, ledger: FakeLedger, path: str, body: object
) -> None:
    """If the stored item cannot be read back yet, the client is told to retry, not given 201."""
    ledger.forget = True
    response = await client.post(path, json=body, headers=AUTH)
    assert_error(response, 503, "unavailable")
    assert response.headers["retry-after"] == "1"
    ledger.forget = False
    assert (await client.post(path, json=body, headers=AUTH)).status_code == 200


async def test_readiness_follows_ready(client: httpx.AsyncClient, ledger: FakeLedger) -> None:
    """/readyz is 200 when ready() is true and 503 not_ready otherwise; /healthz stays 200."""
    assert (await client.get("/readyz")).json() == {"status": "ok"}
    ledger.ready = False
    assert_error(await client.get("/readyz"), 503, "not_ready")
    assert (await client.get("/healthz")).json() == {"status": "ok"}


# ---------------------------------------------------------------------------------------
# No input is a server error.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
FIELDS = sorted(set(transfer_json()) | {"flags", "pending_id", "timeout_s", "code", "user_data"})
NEAR_VALID = st.builds(
    lambda field, value: transfer_json(**{field: value}), st.sampled_from(FIELDS), JSON_VALUES
)
BODIES = st.one_of(
    st.binary(max_size=64),
    JSON_VALUES.map(encode),
    NEAR_VALID.map(encode),
    NEAR_VALID.map(lambda item: encode({"transfers": [item]})),
    NEAR_VALID.map(lambda item: encode({"accounts": [item]})),
)
POST_PATHS = ["/v1/accounts", "/v1/accounts/batch", "/v1/transfers", "/v1/transfers/batch"]


async def post_everywhere(body: bytes) -> set[int]:
    async with make_client(FakeLedger()) as http:
        return {(await http.post(path, content=body, headers=AUTH)).status_code
                for path in POST_PATHS}


@settings(max_examples=300, deadline=None)
@given(body=BODIES)
# An id in the processor's own range is refused 403 id_reserved (found by this test in a
# fresh-clone run: the set below had left that answer out).
@example(body=encode(transfer_json(credit_account_id=2**62)))
def test_no_body_is_a_server_error(body: bytes) -> None:
    """Arbitrary bytes, JSON and near-valid items get a 2xx or 4xx answer, never a 500."""
    statuses = asyncio.run(post_everywhere(body))
    assert statuses <= {200, 201, 400, 403, 409, 413, 422}


# Every Authorization a request may carry: the good token, none, one lacking scopes, an
# expired one, one signed with another key, and any text at all.
AUTHORIZATIONS = st.one_of(
    st.sampled_from([f"Bearer {TOKEN}", f"Bearer {TOKEN}", None,
                     f"Bearer {token(['accounts:read'])}",
                     f"Bearer {token(now_s=NOW_S - 7200)}", f"Bearer {token(key=OTHER_KEY)}"]),
    HEADER_TEXT,
)


async def send(request: FuzzRequest) -> httpx.Response:
    async with make_client(FakeLedger()) as http:
        return await http.request(request.method, request.path, headers=request.headers,
                                  content=request.body)


@pytest.mark.parametrize("op", [pytest.param(op, id=op.name) for op in OPERATIONS])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_no_request_to_any_route_is_a_server_error(op: Operation, data: st.DataObject) -> None:
    """Every route, the payments and webhook routes included, with any path values,
    Authorization, Idempotency-Key, signature headers and body: never a 5xx except 503 with
    Retry-After (here the payments routes answer ``unavailable``: this app has no payments),
    and every answer of 400 or more a JSON error whose code the route documents."""
    request = data.draw(requests_for(op, authorization=AUTHORIZATIONS))
    assert_well_answered(op, asyncio.run(send(request)))


def test_the_fuzzed_routes_are_every_route() -> None:
    """The fuzz above covers every route there is, payments and webhooks among them."""
    app = build_app(FakeLedger(), KEY, clock_s=lambda: float(NOW_S), ready=lambda: True)
    routes = {(method, route.path) for route in app.routes
              for method in getattr(route, "methods", ()) if method != "HEAD"}
    assert routes == {(op.method, op.path) for op in OPERATIONS}
    assert {op.name for op in PAYMENT_OPERATIONS} == {
        "create_payment", "get_payment", "capture_payment", "create_capture", "void_payment",
        "refund_payment", "increment_payment", "create_payout", "get_payout",
        "provider_webhook", "list_payments", "list_payouts"}


# ---------------------------------------------------------------------------------------
# The processor's own id range (processor/reserved.py).

RESERVED = 2**62
SYSTEM_AUTH = bearer(token((*SCOPES, "ledger:system")))


@pytest.mark.parametrize(("path", "body"), [
    pytest.param("/v1/accounts", account_json(RESERVED), id="account"),
    pytest.param("/v1/accounts/batch",
                 {"accounts": [account_json(5), account_json(RESERVED + 7)]}, id="accounts"),
    pytest.param("/v1/transfers", transfer_json(RESERVED), id="transfer-id"),
    pytest.param("/v1/transfers", transfer_json(debit_account_id=RESERVED + 1),
                 id="debit-clearing"),
    pytest.param("/v1/transfers", transfer_json(credit_account_id=2**63 - 1),
                 id="credit-reserved"),
    pytest.param("/v1/transfers", transfer_json(pending_id=RESERVED + 4, flags=["void_pending"]),
                 id="void-a-hold"),
    pytest.param("/v1/transfers/batch",
                 {"transfers": [transfer_json(11), transfer_json(12, debit_account_id=RESERVED)]},
                 id="transfers"),
])
async def test_the_processors_own_ids_are_refused_to_gateways(
    client: httpx.AsyncClient, ledger: FakeLedger, path: str, body: dict[str, object],
) -> None:
    """A gateway's token may not create, debit, credit or void anything from 2^62 up:
    403 ``id_reserved`` and nothing written; the system scope may."""
    response = await client.post(path, content=encode(body), headers=AUTH)
    assert_error(response, 403, "id_reserved")
    assert ledger.submitted == []
    allowed = await client.post(path, content=encode(body), headers=SYSTEM_AUTH)
    assert allowed.status_code != 403, allowed.text
    assert ledger.submitted


async def test_rate_limit_per_principal_answers_429_with_its_headers() -> None:
    """A principal over its budget gets 429 rate_limited with Retry-After and the RateLimit
    fields, and nothing of the request is applied; a batch takes one operation per item;
    another principal, of the same tenant, has its own budget."""
    ledger = FakeLedger()
    clock = [float(NOW_S)]
    app = build_app(ledger, KEY, clock_s=lambda: clock[0], ready=ledger.is_ready,
                    rate_limiter=RateLimiter(2, 4))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    other = bearer(issue_token(KEY, SCOPES, ttl_s=3600, now_s=NOW_S, subject="other"))
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger.test") as c:
        batch = {"accounts": [account_json(i) for i in (1, 2, 3)]}
        assert (await c.post("/v1/accounts/batch", json=batch, headers=AUTH)).status_code == 200
        assert (await c.get("/v1/accounts/1", headers=AUTH)).status_code == 200
        refused = await c.post("/v1/transfers", json=transfer_json(), headers=AUTH)
        assert_error(refused, 429, "rate_limited")
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["ratelimit-policy"] == '"principal";q=4;w=2'
        assert refused.headers["ratelimit"] == '"principal";r=0;t=2'
        assert 10 not in ledger.transfers
        assert (await c.get("/v1/accounts/1", headers=other)).status_code == 200
        clock[0] += 1.0  # two operations refill
        assert (await c.post("/v1/transfers", json=transfer_json(), headers=AUTH)
                ).status_code == 201
        # A batch larger than what is left is refused whole.
        too_many = {"transfers": [transfer_json(20), transfer_json(21)]}
        assert_error(await c.post("/v1/transfers/batch", json=too_many, headers=AUTH),
                     429, "rate_limited")
        assert 20 not in ledger.transfers and 21 not in ledger.transfers
