"""The pools on txproc's request paths (actors.database.keeping_pool) against a real server:
a connection that comes back cleanly is handed out again without asyncpg's queue, and
anything else goes back through asyncpg's release as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from actors.database import keep_session, keeping_pool


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await keeping_pool(db_url, min_size=1, max_size=2, acquire_timeout_s=0.5,
                           reset=keep_session)
    try:
        yield p
    finally:
        p.terminate()


async def _backend(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT pg_backend_pid()"))


async def test_a_clean_connection_is_handed_out_again(pool: asyncpg.Pool) -> None:
    first = await _backend(pool)
    assert [await _backend(pool) for _ in range(5)] == [first] * 5
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1")
    assert await _backend(pool) == first


async def test_a_transaction_left_open_is_rolled_back_not_kept(pool: asyncpg.Pool) -> None:
    """A connection given back inside a transaction (or after an error) goes through
    asyncpg's release, which rolls it back; nothing of it reaches the next user."""
    await pool.execute("CREATE TEMP TABLE IF NOT EXISTS t (x int)")
    async with pool.acquire() as conn:
        await conn.execute("BEGIN")
        await conn.execute("SET LOCAL statement_timeout = '1s'")
    async with pool.acquire() as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SHOW statement_timeout") == "0"
    with pytest.raises(asyncpg.DivisionByZeroError):
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.fetchval("SELECT 1 / 0")
    async with pool.acquire() as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT 2") == 2


async def test_a_connection_the_server_ended_is_replaced(
    pool: asyncpg.Pool, db_url: str
) -> None:
    kept = await _backend(pool)
    admin = await asyncpg.connect(db_url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", kept)
    finally:
        await admin.close()
    await asyncio.sleep(0.2)  # the loop sees the socket close
    fresh = await _backend(pool)
    assert fresh != kept


async def test_max_size_still_bounds_kept_and_taken_connections(pool: asyncpg.Pool) -> None:
    """Kept connections count as in use: with two held, a third acquire waits out the
    pool's deadline; given back, both are handed out again."""
    async with pool.acquire() as a, pool.acquire() as b:
        held = {a.get_server_pid(), b.get_server_pid()}
        with pytest.raises(TimeoutError):
            await pool.acquire()
    assert len(pool._kept) == 2
    async with pool.acquire() as c1, pool.acquire() as c2:
        assert {c1.get_server_pid(), c2.get_server_pid()} == held


async def test_close_and_expiry_hand_kept_connections_back(db_url: str) -> None:
    p = await keeping_pool(db_url, min_size=1, max_size=2, reset=keep_session)
    first = await _backend(p)
    await p.expire_connections()
    assert await _backend(p) != first
    await asyncio.wait_for(p.close(), timeout=5)
    assert p._kept == []


async def test_waiters_get_the_connections_given_back(pool: asyncpg.Pool) -> None:
    """Twenty statements at once over two connections: those waiting in asyncpg's queue
    are handed the connections as they come back, and none waits out its deadline."""
    pids = await asyncio.gather(*[
        pool.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.05)") for _ in range(20)])
    assert len(set(pids)) == 2
