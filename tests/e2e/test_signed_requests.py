"""Signed requests (RFC 9421) on the running processor, over real HTTP: a front started with
``require_signed_requests`` beside the session's, client keys made and revoked by the
`txproc` command as an operator runs it, nonces shared by the two fronts through the
database.

The session's processor is shared: these tests use a tenant and subjects of their own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from actors.app.runtime import Processor
from adapters.signing import ClientKeyAuth
from tests.running import ExtraFront, IdSource, extra_front, token_for

TXPROC = [sys.executable, "-m", "actors.app.cli"]
TENANT = f"signed-{uuid.uuid4().hex[:8]}"
SUBJECT = "gateway-1"
# Fronts read the client keys every 0.5 s; a key made or revoked must be in force on
# every front within this of the command's return.
IN_FORCE_WITHIN_S = 2.0


def _txproc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TXPROC, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy(), check=False)


def _create_client(processor: Processor, subject: str) -> dict[str, str]:
    done = _txproc("keys", "create-client", "--tenant", TENANT, "--subject", subject,
                   "--database-url", processor.admin_database_url)
    assert done.returncode == 0, done.stderr
    key: dict[str, str] = json.loads(done.stdout)
    return key


@pytest.fixture(scope="module")
async def signed_front(processor: Processor) -> AsyncIterator[ExtraFront]:
    """A front that requires signed requests, beside the session's, sharing its shards."""
    async with extra_front(processor, require_signed_requests=True) as front:
        yield front


@pytest.fixture(scope="module")
def client_key(processor: Processor) -> dict[str, str]:
    """The client key of the test principal, made by `txproc keys create-client`."""
    return _create_client(processor, SUBJECT)


def _http(port: int, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10,
                             headers={"Authorization": f"Bearer {token}"})


def _auth(key: dict[str, str], *, age_s: float = 0.0) -> ClientKeyAuth:
    secret = base64.b64decode(key["secret"])
    return ClientKeyAuth(key["key_id"], secret, clock_s=lambda: time.time() - age_s)


def _signed(http: httpx.AsyncClient, key: dict[str, str], path: str,
            body: dict[str, object]) -> httpx.Request:
    """A request signed now, to be sent as it is (once, twice, or changed)."""
    request = http.build_request("POST", path, json=body)
    return next(_auth(key).auth_flow(request))


def _code(response: httpx.Response) -> tuple[int, str]:
    """The status and, for an error, its code."""
    if response.status_code < 400:
        return response.status_code, ""
    return response.status_code, response.json()["error"]["code"]


async def _within(deadline_s: float, probe: Callable[[], Awaitable[object]],
                  expected: object) -> None:
    started = time.monotonic()
    while True:
        answer = await probe()
        if answer == expected:
            return
        elapsed_s = time.monotonic() - started
        assert elapsed_s < deadline_s, f"still {answer!r} after {elapsed_s:.2f} s"
        await asyncio.sleep(0.1)


def test_create_client_prints_the_key_as_json(client_key: dict[str, str]) -> None:
    """`txproc keys create-client` prints one JSON object: a key id, a base64 secret of 32
    random bytes, the tenant and the subject."""
    assert set(client_key) == {"key_id", "secret", "tenant", "subject"}
    assert client_key["key_id"].startswith("ck_") and len(client_key["key_id"]) == 35
    assert len(base64.b64decode(client_key["secret"], validate=True)) == 32
    assert (client_key["tenant"], client_key["subject"]) == (TENANT, SUBJECT)


async def test_signed_requests_on_a_front_that_requires_them(
        processor: Processor, signed_front: ExtraFront, client_key: dict[str, str],
        ids: IdSource) -> None:
    """Unsigned: signature_required. Signed: 201, on a Starlette route and on the single
    transfer route. The same request again: request_replayed, on this front and on the
    session's. Its body changed: signature_invalid. Signed 31 s ago: signature_expired.
    Reads need no signature."""
    token = token_for(processor, tenant=TENANT, subject=SUBJECT)
    debit, credit, transfer_id = ids.take(3)
    async with _http(signed_front.http_port, token) as http, \
            _http(processor.http_port, token) as session_http:
        account = {"id": debit, "currency": "EUR"}
        assert _code(await http.post("/v1/accounts", json=account)) == (
            401, "signature_required")
        # The key was made just now: every front takes it within half a second.
        await _within(IN_FORCE_WITHIN_S, lambda: _send_code(http, _signed(
            http, client_key, "/v1/accounts", account)), (201, ""))
        credit_account = _signed(http, client_key, "/v1/accounts",
                                 {"id": credit, "currency": "EUR"})
        assert _code(await http.send(credit_account)) == (201, "")
        assert _code(await http.send(credit_account)) == (401, "request_replayed")
        # The other front shares the nonces: the copy is refused there too. It is sent with
        # the Host it was signed for, as a load balancer in front of both would pass it.
        copy = session_http.build_request("POST", "/v1/accounts", content=credit_account.content,
                                          headers=credit_account.headers)
        assert copy.url.port == processor.http_port != signed_front.http_port
        assert _code(await session_http.send(copy)) == (401, "request_replayed")

        transfer = {"id": transfer_id, "debit_account_id": debit, "credit_account_id": credit,
                    "amount": 100, "currency": "EUR"}
        signed = _signed(http, client_key, "/v1/transfers", transfer)
        changed = http.build_request("POST", "/v1/transfers", headers=signed.headers,
                                     content=signed.content.replace(b"100", b"900"))
        assert _code(await http.send(changed)) == (401, "signature_invalid")
        assert _code(await http.post("/v1/transfers", json=transfer)) == (
            401, "signature_required")
        assert _code(await http.send(signed)) == (201, "")
        assert _code(await http.send(signed)) == (401, "request_replayed")
        old = await http.post("/v1/transfers", json=transfer | {"id": ids.one()},
                              auth=_auth(client_key, age_s=31))
        assert _code(old) == (401, "signature_expired")
        assert (await http.get(f"/v1/transfers/{transfer_id}")).json()["amount"] == 100


async def test_key_of_another_subject_and_a_revoked_key(
        processor: Processor, signed_front: ExtraFront, client_key: dict[str, str],
        ids: IdSource) -> None:
    """A key of another subject of the same tenant is signature_invalid with this token;
    a key revoked by `txproc keys revoke-client` is refused within two seconds."""
    token = token_for(processor, tenant=TENANT, subject=SUBJECT)
    other = _create_client(processor, "gateway-2")
    doomed = _create_client(processor, SUBJECT)
    async with _http(signed_front.http_port, token) as http:
        def create(key: dict[str, str]) -> Callable[[], Awaitable[tuple[int, str]]]:
            return lambda: _send_code(http, _signed(
                http, key, "/v1/accounts", {"id": ids.one(), "currency": "EUR"}))

        await _within(IN_FORCE_WITHIN_S, create(doomed), (201, ""))
        assert await create(other)() == (401, "signature_invalid")
        assert await create(client_key)() == (201, "")
        done = _txproc("keys", "revoke-client", doomed["key_id"],
                       "--database-url", processor.admin_database_url)
        assert done.returncode == 0, done.stderr
        await _within(IN_FORCE_WITHIN_S, create(doomed), (401, "signature_invalid"))
        assert await create(client_key)() == (201, "")
    again = _txproc("keys", "revoke-client", doomed["key_id"],
                    "--database-url", processor.admin_database_url)
    assert again.returncode == 1 and "no client key" in again.stderr


def test_create_client_refuses_a_missing_data_directory(tmp_path: Path) -> None:
    """Without --database-url, a data directory that does not exist is an error, not a new
    embedded database that no server reads."""
    missing = tmp_path / "nowhere"
    done = _txproc("keys", "create-client", "--tenant", TENANT, "--subject", SUBJECT,
                   "--data-dir", str(missing), "--database-url", "")
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not missing.exists()


async def _send_code(http: httpx.AsyncClient, request: httpx.Request) -> tuple[int, str]:
    return _code(await http.send(request))
