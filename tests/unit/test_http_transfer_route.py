"""POST /v1/transfers is served without Starlette (``actors.edge.http_api._App``) for speed; these
tests prove that route answers byte for byte what the Starlette route answers, for every kind
of outcome, over the fake ledger of test_http_api."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from actors.edge.http_api import build_app
from processor.errors import Overloaded, Unavailable
from tests.unit.test_http_api import (
    AUTH,
    CREDIT_LIMIT,
    KEY,
    NOW_S,
    FakeLedger,
    bearer,
    encode,
    token,
    transfer_json,
)

BODY_BYTES_MAX = 1024


def _chunks(body: bytes) -> Callable[[], AsyncIterator[bytes]]:
    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 100):
            yield body[i:i + 100]
    return stream


# One row per outcome: headers, body, and what the fake ledger does before the request.
CASES: list[Any] = [
    pytest.param(AUTH, encode(transfer_json()), None, id="created-201"),
    pytest.param(AUTH, encode(transfer_json(amount=CREDIT_LIMIT + 1)), None,
                 id="refused-422"),
    pytest.param(AUTH, encode(transfer_json(id=0)), None, id="id-zero-422"),
    pytest.param(AUTH, b'{"id": ', None, id="malformed-json-400"),
    pytest.param(AUTH, encode(transfer_json(id=1.5)), None, id="invalid-body-400"),
    pytest.param(AUTH, encode(transfer_json(extra=1)), None, id="unknown-field-400"),
    pytest.param({}, encode(transfer_json()), None, id="no-token-401"),
    pytest.param({"Authorization": "Basic abc"}, encode(transfer_json()), None,
                 id="other-scheme-401"),
    pytest.param(bearer("not.a.token"), encode(transfer_json()), None, id="bad-token-401"),
    pytest.param(bearer(token(now_s=NOW_S - 7200)), encode(transfer_json()), None,
                 id="expired-401"),
    pytest.param(bearer(token(["accounts:read"])), encode(transfer_json()), None,
                 id="scope-403"),
    pytest.param(AUTH | {"Content-Length": "2x"}, b"{}", None, id="content-length-400"),
    pytest.param(AUTH, b" " * (BODY_BYTES_MAX + 1), None, id="too-large-413"),
    pytest.param(AUTH, "chunked-too-large", None, id="chunked-too-large-413"),
    pytest.param(AUTH, "chunked", None, id="chunked-201"),
    pytest.param(AUTH, encode(transfer_json()), "overloaded", id="overloaded-429"),
    pytest.param(AUTH, encode(transfer_json()), "unavailable", id="unavailable-503"),
    pytest.param(AUTH, encode(transfer_json()), "forget", id="not-read-back-503"),
    pytest.param(AUTH, encode(transfer_json()), "exists", id="exists-200"),
    pytest.param(AUTH, encode(transfer_json(amount=7)), "exists", id="conflict-409"),
    pytest.param(AUTH, encode(transfer_json()), "crash", id="internal-500"),
]


def _ledger(setup: str | None) -> FakeLedger:
    ledger = FakeLedger()
    if setup == "overloaded":
        ledger.error = Overloaded("shard 0 queue is full", retry_after_s=0.1)
    elif setup == "unavailable":
        ledger.error = Unavailable("shard 0 is restarting", retry_after_s=2.5)
    elif setup == "forget":
        ledger.forget = True
    elif setup == "exists":
        ledger._create_transfer(_stored())
    elif setup == "crash":
        ledger.error = RuntimeError("a bug")
    return ledger


def _stored() -> Any:
    from actors.edge.http_api import TRANSFER_DECODER, transfer_from_request

    return transfer_from_request(TRANSFER_DECODER.decode(encode(transfer_json())))


async def _post(app: Any, headers: dict[str, str], body: bytes | str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger.test") as c:
        if body == "chunked":
            content: Any = _chunks(encode(transfer_json()))()
        elif body == "chunked-too-large":
            content = _chunks(b" " * (3 * BODY_BYTES_MAX))()
        else:
            content = body
        return await c.post("/v1/transfers", content=content, headers=headers)


def _app(ledger: FakeLedger) -> Any:
    return build_app(ledger, KEY, clock_s=lambda: float(NOW_S), ready=lambda: True,
                     body_bytes_max=BODY_BYTES_MAX)


@pytest.mark.parametrize(("headers", "body", "setup"), CASES)
async def test_the_direct_route_answers_as_starlette_does(
        headers: dict[str, str], body: bytes | str, setup: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    """Status, every header in order, and the body are the same from both routes."""
    direct = await _post(_app(_ledger(setup)), headers, body)
    framework = await _post(_app(_ledger(setup)).framework, headers, body)
    assert direct.status_code == framework.status_code
    assert direct.headers.raw == framework.headers.raw
    assert direct.content == framework.content
    assert direct.headers["content-type"] == "application/json"


async def test_the_direct_route_is_taken_and_others_reach_starlette() -> None:
    """POST /v1/transfers never reaches the framework; other routes, other methods and a
    mounted root path do."""
    app = _app(FakeLedger())
    reached: list[tuple[str, str]] = []
    framework = app.framework

    async def spy(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append((scope["method"], scope["path"]))
        await framework(scope, receive, send)

    app.framework = spy
    assert (await _post(app, AUTH, encode(transfer_json()))).status_code == 201
    assert reached == []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger.test") as c:
        assert (await c.get("/v1/transfers/10", headers=AUTH)).status_code == 200
        assert (await c.delete("/v1/transfers", headers=AUTH)).status_code == 405
    assert reached == [("GET", "/v1/transfers/10"), ("DELETE", "/v1/transfers")]


async def test_a_client_gone_before_its_body_is_answered_as_starlette_does() -> None:
    """A disconnect while the body is read answers 400 invalid_body on both routes."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    answers = []
    for app in (_app(FakeLedger()), _app(FakeLedger()).framework):
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/transfers",
            "raw_path": b"/v1/transfers", "query_string": b"", "root_path": "",
            "server": ("ledger.test", 80),
            "headers": [(b"authorization", AUTH["Authorization"].encode())],
        }
        await app(scope, receive, send)
        answers.append(sent)
    assert answers[0] == answers[1]
    assert answers[0][0]["status"] == 400
