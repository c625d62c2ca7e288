"""POST /v1/payments is served without Starlette (``actors.edge.http_api._App``) for speed, as
POST /v1/transfers is; these tests prove it answers byte for byte what the Starlette route
answers and hands the payments actor exactly the same request, for every kind of outcome."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.edge.http_api import build_app
from processor.errors import Unavailable
from processor.identity import Claims
from processor.payments.idempotency import KEY_CHARS_MAX
from processor.ratelimit import RateLimiter
from tests.unit.test_http_api import (
    AUTH,
    KEY,
    NOW_S,
    FakeLedger,
    bearer,
    encode,
    token,
    transfer_json,
)
from tests.unit.test_telemetry import spans  # noqa: F401 - the fixture, shared

BODY_BYTES_MAX = 1024
BODY = b'{"amount": 1000, "currency": "USD", "merchant_account_id": 7}'
KEYED = AUTH | {"Idempotency-Key": "order-4711"}


class FakePayments:
    """Answers every call as told, and remembers what it was handed."""

    def __init__(self, answer: tuple[int, bytes, dict[str, str]] | Exception) -> None:
        self.answer = answer
        self.calls: list[tuple[Any, ...]] = []

    async def call(self, principal: str, operation: str, key: str, subject_id: str,
                   body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        self.calls.append((principal, operation, key, subject_id, body, headers))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    async def webhook(self, provider: str, headers: dict[str, str],
                      body: bytes) -> tuple[int, bytes, dict[str, str]]:
        raise AssertionError("no webhook here")


class FakeAudit:
    """Hands out records 1, 2, ... so that both routes' requests can be compared; the
    request ids it was given (generated when the client sent none) are kept apart."""

    def __init__(self) -> None:
        self.next_id = 0
        self.request_ids: list[str] = []

    def delegate(self, claims: Claims, request_id: str, operation: str,
                 items: int) -> tuple[int, str]:
        self.next_id += 1
        self.request_ids.append(request_id)
        return self.next_id, f"{self.next_id}:{claims.subject}:{operation}:{items}"

    async def record(self, claims: Claims, request_id: str, operation: str,
                     items: int) -> int:
        """A record the edge writes itself (a ledger route's)."""
        self.next_id += 1
        return self.next_id


CREATED: tuple[int, bytes, dict[str, str]] = (201, b'{"id": "pay_1", "status": "authorized"}', {})
CASES: list[Any] = [
    pytest.param(KEYED, BODY, CREATED, id="created-201"),
    pytest.param(KEYED | {"X-Request-Id": "req-1", "X-Other": "kept",
                          "Txproc-Origin": "99", "Txproc-Audit": "forged"},
                 BODY, CREATED, id="headers-forwarded-and-dropped"),
    pytest.param(KEYED, BODY, (409, b'{"code": "operation_in_progress"}',
                               {"Retry-After": "1"}), id="in-progress-409-headers"),
    pytest.param(KEYED, BODY, (402, b'{"code": "payment_declined"}', {}), id="declined-402"),
    pytest.param(KEYED, BODY, Unavailable("payments restarting", retry_after_s=1.0),
                 id="unavailable-503"),
    pytest.param(KEYED, BODY, RuntimeError("a bug"), id="internal-500"),
    pytest.param(AUTH, BODY, CREATED, id="no-key-400"),
    pytest.param(AUTH | {"Idempotency-Key": "k" * (KEY_CHARS_MAX + 1)}, BODY, CREATED,
                 id="key-too-long-400"),
    pytest.param({"Idempotency-Key": "k1"}, BODY, CREATED, id="no-token-401"),
    pytest.param(bearer("not.a.token") | {"Idempotency-Key": "k1"}, BODY, CREATED,
                 id="bad-token-401"),
    pytest.param(bearer(token(now_s=NOW_S - 7200)) | {"Idempotency-Key": "k1"}, BODY,
                 CREATED, id="expired-401"),
    pytest.param(bearer(token(["payments:read"])) | {"Idempotency-Key": "k1"}, BODY,
                 CREATED, id="scope-403"),
    pytest.param(KEYED | {"Content-Length": "2x"}, b"{}", CREATED, id="content-length-400"),
    pytest.param(AUTH | {"Content-Length": "2x"}, b"{}", CREATED,
                 id="key-checked-before-length-400"),
    pytest.param(KEYED, b" " * (BODY_BYTES_MAX + 1), CREATED, id="too-large-413"),
    pytest.param(KEYED, "chunked", CREATED, id="chunked-201"),
    pytest.param(KEYED, "chunked-too-large", CREATED, id="chunked-too-large-413"),
    pytest.param(KEYED, BODY, None, id="payments-off-503"),
]


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 100):
        yield body[i:i + 100]


def _app(payments: FakePayments | None, *, limiter: RateLimiter | None = None,
         audit: FakeAudit | None = None) -> Any:
    return build_app(FakeLedger(), KEY, clock_s=lambda: float(NOW_S), ready=lambda: True,
                     body_bytes_max=BODY_BYTES_MAX, payments=payments,
                     audit=audit or FakeAudit(),  # type: ignore[arg-type]
                     rate_limiter=limiter)


async def _post(app: Any, headers: dict[str, str], body: bytes | str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger.test") as c:
        if body == "chunked":
            content: Any = _chunks(BODY)
        elif body == "chunked-too-large":
            content = _chunks(b" " * (3 * BODY_BYTES_MAX))
        else:
            content = body
        return await c.post("/v1/payments", content=content, headers=headers)


@pytest.mark.parametrize(("headers", "body", "answer"), CASES)
async def test_the_direct_route_answers_and_forwards_as_starlette_does(
        headers: dict[str, str], body: bytes | str,
        answer: tuple[int, bytes, dict[str, str]] | Exception | None) -> None:
    """Status, every header in order and the body are the same from both routes, and so is
    every call the payments actor gets (principal, operation, key, body, headers)."""
    answers, calls, audits = [], [], []
    for direct in (True, False):
        payments = None if answer is None else FakePayments(answer)
        audit = FakeAudit()
        app = _app(payments, audit=audit)
        answers.append(await _post(app if direct else app.framework, headers, body))
        calls.append(None if payments is None else payments.calls)
        audits.append(audit.request_ids)
    if "X-Request-Id" in headers:
        assert audits == [["req-1"], ["req-1"]]
    else:
        assert [len(ids) for ids in audits[0:1]] == [len(ids) for ids in audits[1:2]]
    direct_answer, framework_answer = answers
    assert direct_answer.status_code == framework_answer.status_code
    assert direct_answer.headers.raw == framework_answer.headers.raw
    assert direct_answer.content == framework_answer.content
    assert direct_answer.headers["content-type"] == "application/json"
    assert calls[0] == calls[1]
    if calls[0]:
        [(_principal, operation, key, subject, sent, forwarded)] = calls[0]
        assert (operation, key, subject) == ("authorize", "order-4711", "")
        assert sent == BODY
        assert "authorization" not in forwarded
        assert forwarded["txproc-origin"] == "1"
        assert forwarded["txproc-audit"].startswith("1:")


async def test_the_rate_limit_answers_alike_on_both_routes() -> None:
    """The second request within the burst of one is refused with the same 429 and
    headers by both routes, before the payments actor is called."""
    answers = []
    for direct in (True, False):
        payments = FakePayments(CREATED)
        app = _app(payments, limiter=RateLimiter(0.001, 1))
        target = app if direct else app.framework
        first = await _post(target, KEYED, BODY)
        answers.append(await _post(target, KEYED, BODY))
        assert first.status_code == 201 and len(payments.calls) == 1
    assert answers[0].status_code == 429
    assert answers[0].headers.raw == answers[1].headers.raw
    assert answers[0].content == answers[1].content


async def test_the_direct_route_is_taken_and_others_reach_starlette() -> None:
    """POST /v1/payments never reaches the framework; the payment routes below it do."""
    app = _app(FakePayments(CREATED))
    reached: list[tuple[str, str]] = []
    framework = app.framework

    async def spy(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append((scope["method"], scope["path"]))
        await framework(scope, receive, send)

    app.framework = spy
    assert (await _post(app, KEYED, BODY)).status_code == 201
    assert reached == []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger.test") as c:
        await c.post("/v1/payments/pay_1/void", headers=KEYED)
        await c.get("/v1/payments", headers=AUTH)
    assert reached == [("POST", "/v1/payments/pay_1/void"), ("GET", "/v1/payments")]


async def test_both_direct_routes_answer_inside_a_span_of_their_route(
        spans: InMemorySpanExporter) -> None:  # noqa: F811 - the fixture imported above
    """With tracing on, each route served without Starlette makes one span named by its
    method and route, carrying the status it answered."""
    app = _app(FakePayments((402, b'{"code": "payment_declined"}', {})))
    assert (await _post(app, KEYED, BODY)).status_code == 402
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger.test") as c:
        answer = await c.post("/v1/transfers", content=encode(transfer_json()), headers=AUTH)
        assert answer.status_code == 201
    routes = [(span.name, (span.attributes or {}).get("http.route"),
               (span.attributes or {}).get("http.response.status_code"))
              for span in spans.get_finished_spans() if span.name.startswith("POST")]
    assert routes == [("POST /v1/payments", "/v1/payments", 402),
                      ("POST /v1/transfers", "/v1/transfers", 201)]
