"""Tests that /openapi.json describes the app exactly: its routes, scopes and statuses."""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgspec
import pytest
from starlette.routing import Route

import actors.edge.http_api as http_api
from processor.codes import AccountResult, TransferResult
from processor.errors import Overloaded, QuotaExceeded, Unavailable
from processor.history import HistoryError
from processor.identity import SCOPES
from processor.service import BATCH_ITEMS_MAX
from tests.unit.test_http_api import (
    AUTH,
    CREDIT_LIMIT,
    KEY,
    NOW_S,
    FakeLedger,
    account_json,
    bearer,
    encode,
    make_client,
    token,
    transfer_json,
)

API_DOC = pathlib.Path(__file__).parents[2] / "docs" / "api.md"
PAYMENTS_DOC = pathlib.Path(__file__).parents[2] / "docs" / "payments.md"
# Payments operations need providers and a database; their documented statuses are produced
# over the real stack by tests/e2e/test_payments_e2e.py (events: tests/e2e/test_events.py;
# lists and webhook endpoints: tests/e2e/test_payment_lists.py, test_webhook_endpoints.py;
# disputes: tests/e2e/test_disputes_e2e.py; reconciliation:
# tests/e2e/test_reconciliation_e2e.py). Audit events need the database as well:
# tests/e2e/test_audit_events.py.
PAYMENTS_PATHS = ("/v1/payments", "/v1/payouts", "/v1/providers", "/v1/events", "/v1/refunds",
                  "/v1/webhook_endpoints", "/v1/disputes", "/v1/reconciliation",
                  "/v1/audit-events")
DOCUMENT = http_api.OPENAPI
NO_SCOPES = bearer(token([]))

Prepare = Callable[[httpx.AsyncClient, FakeLedger], Awaitable[None]]


async def _nothing(client: httpx.AsyncClient, ledger: FakeLedger) -> None:
    return None


async def seeded(client: httpx.AsyncClient, ledger: FakeLedger) -> None:
    """Store account 1 and transfer 10, through the API itself."""
    assert (await client.post("/v1/accounts", json=account_json(1), headers=AUTH)).is_success
    assert (await client.post("/v1/transfers", json=transfer_json(10), headers=AUTH)).is_success


def failing(error: Exception) -> Prepare:
    async def prepare(client: httpx.AsyncClient, ledger: FakeLedger) -> None:
        ledger.error = error

    return prepare


# A read reaching into archived months (docs/api.md, "archived").
ARCHIVED = failing(HistoryError("archived", "the range reaches before 2026-02-01, archived "
                                            "as before-2026-02-20261206T180000Z"))


async def archived_transfer(client: httpx.AsyncClient, ledger: FakeLedger) -> None:
    ledger.archived[11] = "before-2026-02-20261206T180000Z"


async def not_ready(client: httpx.AsyncClient, ledger: FakeLedger) -> None:
    ledger.ready = False


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    """A request meant to produce one documented status; ``path`` replaces the template."""

    path: str | None = None
    body: bytes | None = None
    headers: dict[str, str] = msgspec.field(default_factory=lambda: dict(AUTH))
    prepare: Prepare = _nothing


def ledger_trouble(body: bytes | None) -> dict[int, Scenario]:
    """The statuses every route that calls the ledger can produce whatever its input."""
    return {
        401: Scenario(body=body, headers={}),
        403: Scenario(body=body, headers=NO_SCOPES),
        429: Scenario(body=body, prepare=failing(Overloaded("full", retry_after_s=1))),
        500: Scenario(body=body, prepare=failing(RuntimeError("bug"))),
        503: Scenario(body=body, prepare=failing(Unavailable("down", retry_after_s=1))),
    }


ACCOUNT = encode(account_json(1))
TRANSFER = encode(transfer_json(10))
TOO_LARGE = b" " * (4 * 1024 * 1024 + 1)

SCENARIOS: dict[tuple[str, str], dict[int, Scenario]] = {
    ("GET", "/healthz"): {200: Scenario(headers={})},
    ("GET", "/readyz"): {
        200: Scenario(headers={}),
        500: Scenario(headers={}, prepare=failing(RuntimeError("bug"))),
        503: Scenario(headers={}, prepare=not_ready),
    },
    ("GET", "/openapi.json"): {200: Scenario(headers={})},
    ("POST", "/v1/accounts"): {
        **ledger_trouble(ACCOUNT),
        201: Scenario(body=ACCOUNT),
        200: Scenario(body=ACCOUNT, prepare=seeded),
        400: Scenario(body=b"{"),
        409: Scenario(body=encode(account_json(1, code=5)), prepare=seeded),
        413: Scenario(body=TOO_LARGE),
        422: Scenario(body=encode(account_json(0))),
    },
    ("POST", "/v1/accounts/batch"): {
        **ledger_trouble(encode({"accounts": [account_json(1)]})),
        200: Scenario(body=encode({"accounts": [account_json(1), account_json(0)]})),
        400: Scenario(body=encode({"accounts": []})),
        413: Scenario(body=encode({"accounts": [account_json(1)] * (BATCH_ITEMS_MAX + 1)})),
        422: Scenario(body=encode({"accounts": [account_json(1)]}),
                      prepare=failing(QuotaExceeded("the tenant's quota would be passed"))),
    },
    ("GET", "/v1/accounts/{id}"): {
        **ledger_trouble(None),
        200: Scenario(path="/v1/accounts/1", prepare=seeded),
        400: Scenario(path="/v1/accounts/x"),
        404: Scenario(path="/v1/accounts/2"),
    },
    ("POST", "/v1/transfers"): {
        **ledger_trouble(TRANSFER),
        201: Scenario(body=TRANSFER),
        200: Scenario(body=TRANSFER, prepare=seeded),
        400: Scenario(body=encode(transfer_json(10, amount=1.5))),
        409: Scenario(body=encode(transfer_json(10, amount=9)), prepare=seeded),
        413: Scenario(body=TOO_LARGE),
        422: Scenario(body=encode(transfer_json(11, amount=CREDIT_LIMIT + 1))),
    },
    ("POST", "/v1/transfers/batch"): {
        **ledger_trouble(encode({"transfers": [transfer_json(10)]})),
        200: Scenario(body=encode({"transfers": [transfer_json(10), transfer_json(0)]})),
        400: Scenario(body=encode({"transfers": [{"id": 1}]})),
        413: Scenario(body=encode({"transfers": [transfer_json(1)] * (BATCH_ITEMS_MAX + 1)})),
    },
    ("GET", "/v1/transfers/{id}"): {
        **ledger_trouble(None),
        200: Scenario(path="/v1/transfers/10", prepare=seeded),
        400: Scenario(path="/v1/transfers/0"),
        404: Scenario(path="/v1/transfers/11"),
        410: Scenario(path="/v1/transfers/11", prepare=archived_transfer),
    },
    ("GET", "/v1/accounts/{id}/transfers"): {
        **ledger_trouble(None),
        200: Scenario(path="/v1/accounts/1/transfers?limit=1&side=debits", prepare=seeded),
        400: Scenario(path="/v1/accounts/1/transfers?order=sideways"),
        404: Scenario(path="/v1/accounts/2/transfers"),
        410: Scenario(path="/v1/accounts/1/transfers", prepare=ARCHIVED),
    },
    ("GET", "/v1/accounts/{id}/balances"): {
        **{status: msgspec.structs.replace(
            scenario, path="/v1/accounts/1/balances?at=2026-12-01T00:00:00Z")
           for status, scenario in ledger_trouble(None).items()},
        200: Scenario(path="/v1/accounts/1/balances?at=2026-12-01T00:00:00.000000001Z",
                      prepare=seeded),
        400: Scenario(path="/v1/accounts/1/balances?at=2026-12-01"),
        404: Scenario(path="/v1/accounts/2/balances?at=2026-12-01T00:00:00Z"),
        410: Scenario(path="/v1/accounts/1/balances?at=2026-01-01T00:00:00Z",
                      prepare=ARCHIVED),
    },
    ("GET", "/v1/transfers/stream"): {
        **ledger_trouble(None),
        200: Scenario(path="/v1/transfers/stream?limit=1&wait=0", prepare=seeded),
        400: Scenario(path="/v1/transfers/stream?after=nonsense"),
        410: Scenario(path="/v1/transfers/stream", prepare=ARCHIVED),
    },
    ("GET", "/v1/transfers"): {
        **ledger_trouble(None),
        200: Scenario(path="/v1/transfers?code=0", prepare=seeded),
        400: Scenario(path="/v1/transfers?cursor=nonsense"),
        410: Scenario(path="/v1/transfers", prepare=ARCHIVED),
    },
}


def documented_operations() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, methods in DOCUMENT["paths"].items()
        for method, operation in methods.items()
    }


def app_routes() -> set[tuple[str, str]]:
    app = http_api.build_app(FakeLedger(), KEY, clock_s=lambda: NOW_S, ready=lambda: True)
    found = set()
    for route in app.routes:
        assert isinstance(route, Route), f"{route!r} is not a plain route"
        # Starlette answers HEAD for every GET route by itself; HEAD is not documented.
        for method in (route.methods or set()) - {"HEAD"}:
            found.add((method, route.path))
    return found


def resolve(ref: str) -> dict[str, Any]:
    prefix = "#/components/schemas/"
    assert ref.startswith(prefix), ref
    return DOCUMENT["components"]["schemas"][ref.removeprefix(prefix)]


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    """The app's routes and methods are exactly the document's paths and operations."""
    assert app_routes() == set(documented_operations())


def test_document_is_openapi_3_1_with_resolvable_refs() -> None:
    """The document declares OpenAPI 3.1 and every $ref in it points at a defined schema."""
    assert DOCUMENT["openapi"] == "3.1.0"
    text = json.dumps(DOCUMENT)
    refs = {part.split('"')[0] for part in text.split('"$ref": "')[1:]}
    assert refs
    for ref in refs:
        assert resolve(ref)


async def test_served_document_is_the_built_one() -> None:
    """GET /openapi.json serves the very document these tests inspect."""
    async with make_client(FakeLedger()) as client:
        response = await client.get("/openapi.json")
    assert response.json() == json.loads(json.dumps(DOCUMENT))


def test_every_operation_declares_its_scope() -> None:
    """Secured operations name one known scope on the bearer scheme and document 401 and 403."""
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert schemes["bearer"] == schemes["bearer"] | {"type": "http", "scheme": "bearer"}
    for key, operation in documented_operations().items():
        if key[1].startswith("/v1/providers/"):
            # Providers sign their webhooks (HMAC over timestamp and body) instead.
            assert operation["security"] == []
            assert "401" in operation["responses"]
        elif key[1].startswith("/v1/"):
            [requirement] = operation["security"]
            [scope] = requirement["bearer"]
            assert scope in SCOPES
            assert {"401", "403"} <= operation["responses"].keys()
        else:
            assert operation["security"] == []


def test_every_documented_status_has_a_scenario() -> None:
    """Each operation's documented statuses are exactly those its scenarios below produce."""
    documented = {
        key: {int(status) for status in operation["responses"]}
        for key, operation in documented_operations().items()
        if not key[1].startswith(PAYMENTS_PATHS)
    }
    assert documented == {key: set(statuses) for key, statuses in SCENARIOS.items()}


SCENARIO_CASES = [
    pytest.param(method, path, status, scenario, id=f"{method} {path} {status}")
    for (method, path), statuses in SCENARIOS.items()
    for status, scenario in statuses.items()
]


@pytest.mark.parametrize(("method", "path", "status", "scenario"), SCENARIO_CASES)
async def test_documented_status_is_produced(
    method: str, path: str, status: int, scenario: Scenario
) -> None:
    """The handler produces the documented status with a body matching the documented schema."""
    ledger = FakeLedger()
    async with make_client(ledger) as client:
        await scenario.prepare(client, ledger)
        url = scenario.path or path.replace("{id}", "1")
        response = await client.request(method, url, content=scenario.body,
                                         headers=scenario.headers)
    assert response.status_code == status, response.text
    documented = documented_operations()[(method, path)]["responses"][str(status)]
    if http_api.NDJSON in documented["content"]:
        # A line per item in the documented schema, then the line to continue from.
        *lines, last = response.content.splitlines()
        name = documented["content"][http_api.NDJSON]["schema"]["$ref"].rsplit("/", 1)[1]
        assert lines and all(msgspec.json.decode(line, type=getattr(http_api, name))
                             for line in lines)
        end = msgspec.json.decode(last, type=http_api.StreamEnd)
        assert response.headers[http_api.STREAM_CURSOR_HEADER] == end.next_cursor
        return
    schema = documented["content"]["application/json"]["schema"]
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        # Strict decoding into the struct the schema was generated from checks the shape.
        body = msgspec.json.decode(response.content, type=getattr(http_api, name))
    else:
        body = msgspec.json.decode(response.content)
    if status >= 400:
        assert body.error.code in documented["x-error-codes"]
    for header in documented.get("headers", {}):
        assert header in response.headers


SECURED = [
    pytest.param(method, path, op["security"][0]["bearer"][0], id=f"{method} {path}")
    for (method, path), op in documented_operations().items()
    if op["security"] and not path.startswith(PAYMENTS_PATHS)
]


@pytest.mark.parametrize(("method", "path", "scope"), SECURED)
async def test_documented_scope_is_enough(method: str, path: str, scope: str) -> None:
    """A token holding only the documented scope gets past authentication and authorization."""
    async with make_client(FakeLedger()) as client:
        response = await client.request(method, path.replace("{id}", "1"),
                                         headers=bearer(token([scope])))
    assert response.status_code not in (401, 403)


def test_error_codes_are_consistent_and_in_the_prose() -> None:
    """Every documented error code has one status, and docs/api.md explains every code."""
    prose = API_DOC.read_text() + PAYMENTS_DOC.read_text()
    for operation in documented_operations().values():
        for status, response in operation["responses"].items():
            for code in response.get("x-error-codes", []):
                assert http_api.ERROR_CODES[code] == int(status), (code, status)
    missing = [code for code in http_api.ERROR_CODES if f"`{code}`" not in prose]
    assert missing == []


def precedence_table(prose: str, heading: str) -> list[tuple[int, str]]:
    """The ``| number | `code` |`` rows of the table under ``heading`` in docs/api.md."""
    section = prose.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \|", section, flags=re.MULTILINE)
    return [(int(number), name) for number, name in rows]


@pytest.mark.parametrize("enum", [AccountResult, TransferResult])
def test_precedence_tables_match_the_enums(enum: type[AccountResult | TransferResult]) -> None:
    """docs/api.md lists every result code with its number, in the order of processor/codes.py."""
    heading = f"(`{enum.__name__}`)"
    expected = [(int(member), member.name) for member in enum]
    assert precedence_table(API_DOC.read_text(), heading) == expected
