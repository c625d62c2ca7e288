"""Tests of the edges' credentials (actors/edge/credentials.py): both listeners check every
request's token against the current key ring and revocations, remembered tokens included,
and a key rotated in verifies at once. The HTTP app over ASGI, the RPC server on loopback; no
Ray, no database (the revocations are set as the front's poller would set them)."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import httpx
import pytest

from actors.edge import Credentials, build_app, start_rpc_server
from processor.client import Client, ClientError
from processor.identity import (
    SCOPES,
    Revocations,
    issue_token,
    load_or_create_ring,
    retire_key,
    revocations_of,
    rotate_key,
)
from tests.unit.test_http_api import FakeLedger, assert_error, bearer

NOW_S = 1_700_000_000


class FakeClock:
    """A monotonic clock the test moves, so the key file's look-again pace is exact."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def credentials(tmp_path: pathlib.Path, clock: FakeClock) -> Credentials:
    load_or_create_ring(tmp_path, now_s=NOW_S)
    # The test's clock paces the key file's looks.
    return Credentials.of_directory(tmp_path, now_s=NOW_S, monotonic_s=clock)


def _token(directory: pathlib.Path, *, subject: str = "gw-1", token_id: str | None = None,
           issued_at_s: int = NOW_S) -> str:
    ring = load_or_create_ring(directory, now_s=NOW_S)
    return issue_token(ring.active.secret, SCOPES, ttl_s=3600, now_s=issued_at_s,
                       tenant="acme", subject=subject, token_id=token_id)


@pytest.fixture
async def http(credentials: Credentials) -> AsyncIterator[httpx.AsyncClient]:
    ledger = FakeLedger()
    app = build_app(ledger, credentials, clock_s=lambda: float(NOW_S), ready=ledger.is_ready)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger.test") as client:
        yield client


async def _get(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.get("/v1/accounts/1", headers=bearer(token))


async def test_http_revocation_reaches_a_remembered_token(
        tmp_path: pathlib.Path, credentials: Credentials, http: httpx.AsyncClient) -> None:
    """A token the HTTP API already verified (and remembers) is refused token_revoked once
    its jti is revoked, and a subject's revocation refuses its tokens issued up to it but
    not one issued later."""
    token = _token(tmp_path, token_id="jti-http")
    older = _token(tmp_path, subject="gw-2", issued_at_s=NOW_S - 10)
    later = _token(tmp_path, subject="gw-2", issued_at_s=NOW_S + 1)
    for each in (token, older, later):
        assert (await _get(http, each)).status_code == 404  # authorized; no such account
    credentials.set_revocations(revocations_of([
        ("jti-http", None, None, 0), (None, "acme", "gw-2", NOW_S)]))
    assert_error(await _get(http, token), 401, "token_revoked")
    assert_error(await _get(http, older), 401, "token_revoked")
    assert (await _get(http, later)).status_code == 404
    credentials.set_revocations(Revocations())
    assert (await _get(http, token)).status_code == 404


async def test_http_rotation_and_retirement_without_restart(
        tmp_path: pathlib.Path, credentials: Credentials, clock: FakeClock,
        http: httpx.AsyncClient) -> None:
    """A key rotated in verifies at once (an unknown kid makes the file be looked at
    again), the old key's tokens keep working, and after the old key is retired its
    remembered token is refused token_invalid."""
    old = _token(tmp_path)
    assert (await _get(http, old)).status_code == 404
    rotate_key(tmp_path, now_s=NOW_S)
    new = _token(tmp_path)
    clock.now_s += 1  # past the look-again pace
    assert (await _get(http, new)).status_code == 404
    assert (await _get(http, old)).status_code == 404
    retire_key(tmp_path, load_or_create_ring(tmp_path, now_s=NOW_S).keys[0].kid, now_s=NOW_S)
    clock.now_s += 1
    assert credentials.refresh_keys() is True  # as the front's poller does twice a second
    assert_error(await _get(http, old), 401, "token_invalid")
    assert (await _get(http, new)).status_code == 404


@pytest.fixture
async def rpc_port(credentials: Credentials) -> AsyncIterator[int]:
    server = await start_rpc_server(FakeLedger(), credentials, host="127.0.0.1", port=0,
                                    clock_s=lambda: float(NOW_S))
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_rpc_revocation_closes_the_connection(
        tmp_path: pathlib.Path, credentials: Credentials, rpc_port: int) -> None:
    """On an RPC connection whose Hello was accepted, the next request after the token's
    revocation is refused token_revoked (the connection is closed), and a new connection
    with the same token is refused at Hello; another token of the subject is unaffected."""
    token = _token(tmp_path, token_id="jti-rpc")
    other = _token(tmp_path, token_id="jti-other")
    async with Client("127.0.0.1", rpc_port, token, retries_max=0) as client, \
            Client("127.0.0.1", rpc_port, other, retries_max=0) as bystander:
        assert await client.lookup_accounts([1]) == [None]
        assert await bystander.lookup_accounts([1]) == [None]
        credentials.set_revocations(revocations_of([("jti-rpc", None, None, 0)]))
        for _attempt in range(2):  # on the open connection, then at a new Hello
            with pytest.raises(ClientError) as info:
                await client.lookup_accounts([1])
            assert info.value.code == "token_revoked"
        assert await bystander.lookup_accounts([1]) == [None]


async def test_rpc_retired_key_is_refused_on_an_open_connection(
        tmp_path: pathlib.Path, credentials: Credentials, rpc_port: int) -> None:
    """After the key of an open connection's token is retired, its next request is refused
    token_invalid; a token of the new active key goes on."""
    old = _token(tmp_path)
    async with Client("127.0.0.1", rpc_port, old, retries_max=0) as client:
        assert await client.lookup_accounts([1]) == [None]
        first_kid = load_or_create_ring(tmp_path, now_s=NOW_S).active.kid
        rotate_key(tmp_path, now_s=NOW_S)
        retire_key(tmp_path, first_kid, now_s=NOW_S)
        assert credentials.refresh_keys(force=True) is True
        with pytest.raises(ClientError) as info:
            await client.lookup_accounts([1])
        assert info.value.code == "token_invalid"
    async with Client("127.0.0.1", rpc_port, _token(tmp_path), retries_max=0) as client:
        assert await client.lookup_accounts([1]) == [None]
