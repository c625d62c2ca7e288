"""The front's credentials watch (actors/edge/credentials.py CredentialsWatch) against a real
PostgreSQL, as the application role: a revocations read that hangs (the table locked by
another transaction) neither holds back a retired key nor stops the watch, and a fault in
looking at the key file does not stop the revocations being read."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from actors.edge import Credentials, CredentialsWatch, revoke_token_id
from processor.identity import (
    SCOPES,
    AuthError,
    issue_token,
    load_or_create_ring,
    retire_key,
    rotate_key,
)

INTERVAL_S = 0.1
READ_BOUND_S = 0.5
WAIT_S = 10.0  # a bound on waiting for a change that must come, not a speed claim


def _token(directory: pathlib.Path, token_id: str) -> str:
    ring = load_or_create_ring(directory, now_s=int(time.time()))
    return issue_token(ring.active.secret, SCOPES, ttl_s=3600, now_s=int(time.time()),
                       tenant="acme", subject="gw-1", token_id=token_id)


def _refusal(credentials: Credentials, token: str) -> str | None:
    try:
        credentials.verify(token, now_s=int(time.time()))
    except AuthError as exc:
        return exc.code
    return None


async def _until(check: Callable[[], object], expected: object) -> None:
    deadline = time.monotonic() + WAIT_S
    while (seen := check()) != expected:
        assert time.monotonic() < deadline, f"still {seen!r}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _watching(credentials: Credentials, url: str) -> AsyncIterator[CredentialsWatch]:
    watch = CredentialsWatch(credentials, url, connect_timeout_s=5, command_timeout_s=30,
                             interval_s=INTERVAL_S, read_bound_s=READ_BOUND_S)
    await watch.poll()
    task = asyncio.get_running_loop().create_task(watch.run())
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await watch.close()


async def _in_lock(db_url: str, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` while another transaction holds ``revoked_tokens`` exclusively, so that
    every read of it waits (here longer than the statement timeout allows the watch)."""
    conn = await asyncpg.connect(db_url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE revoked_tokens IN ACCESS EXCLUSIVE MODE")
            await body()
    finally:
        await conn.close()


async def test_a_hung_revocations_read_holds_back_neither_a_retired_key_nor_the_watch(
        tmp_path: pathlib.Path, db_url: str, app_db_url: str) -> None:
    old_token = _token(tmp_path, "old-key")
    credentials = Credentials.of_directory(tmp_path, now_s=int(time.time()))
    async with _watching(credentials, app_db_url):
        rotate_key(tmp_path, now_s=int(time.time()))
        old_kid = next(k.kid for k in load_or_create_ring(tmp_path, now_s=int(time.time())).keys
                       if k.state == "verify_only")
        assert _refusal(credentials, old_token) is None

        async def retire_while_locked() -> None:
            # Let a read start and hang on the lock, then retire the old key.
            await asyncio.sleep(3 * INTERVAL_S)
            retire_key(tmp_path, old_kid, now_s=int(time.time()))
            await _until(lambda: _refusal(credentials, old_token), "token_invalid")
            # Held past the read bound: the hung read is given up, not waited for.
            await asyncio.sleep(2 * READ_BOUND_S)

        await _in_lock(db_url, retire_while_locked)

        # The lock gone, a revocation made now is read on the watch's new connection.
        new_token_id = f"new-{uuid.uuid4().hex[:8]}"
        new_token = _token(tmp_path, new_token_id)
        assert _refusal(credentials, new_token) is None
        conn = await asyncpg.connect(db_url)  # an operator's command: the administrative role
        try:
            await revoke_token_id(conn, new_token_id)
        finally:
            await conn.close()
        await _until(lambda: _refusal(credentials, new_token), "token_revoked")


async def test_a_fault_looking_at_the_key_file_does_not_stop_the_revocations(
        tmp_path: pathlib.Path, db_url: str, app_db_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    token_id = f"t-{uuid.uuid4().hex[:8]}"
    token = _token(tmp_path, token_id)
    credentials = Credentials.of_directory(tmp_path, now_s=int(time.time()))
    async with _watching(credentials, app_db_url):
        def broken(*, force: bool = False) -> bool:
            raise RuntimeError("a fault of the key file's look")

        monkeypatch.setattr(credentials, "refresh_keys", broken)
        await asyncio.sleep(3 * INTERVAL_S)  # rounds that meet the fault
        conn = await asyncpg.connect(db_url)
        try:
            await revoke_token_id(conn, token_id)
        finally:
            await conn.close()
        await _until(lambda: _refusal(credentials, token), "token_revoked")
