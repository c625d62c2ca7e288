"""Leases in a real PostgreSQL (actors.lease, migration 0030), as the application role: one
holder at a time, a takeover after the holder goes silent, a rising fence, and a stale
holder's fenced write refused."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from actors.lease import Fence, LeaseLost, acquire, check_fence, hold, read_lease
from processor.lease import LeaseConfig

# Short, so the takeovers below take about a second.
FAST = LeaseConfig(ttl_s=1.0, renew_interval_s=0.2, margin_s=0.3)
WAIT_S = 30.0  # a bound on waiting for an event that must come, not a speed claim


@pytest.fixture
async def pools(app_db_url: str) -> AsyncIterator[list[asyncpg.Pool]]:
    """Two pools, as two processes would have."""
    made = [await asyncpg.create_pool(app_db_url, min_size=1, max_size=2, timeout=10)
            for _ in range(2)]
    try:
        yield made
    finally:
        for pool in made:
            pool.terminate()


@dataclass
class Worker:
    """Work that records when it ran under which fence, and when it was stopped."""

    name: str
    log: list[tuple[str, str, int, float]]
    started: asyncio.Event = field(default_factory=asyncio.Event)
    fences: list[int] = field(default_factory=list)

    async def __call__(self, fence: Fence) -> None:
        self.fences.append(fence.value)
        self.log.append(("start", self.name, fence.value, time.monotonic()))
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.log.append(("stop", self.name, fence.value, time.monotonic()))


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_contenders_race_for_a_new_lease_and_one_wins(pools: list[asyncpg.Pool]) -> None:
    """Ten contenders asking at once for a lease nobody holds: exactly one gets fence 1."""
    answers = await asyncio.gather(*[acquire(pools[i % 2], "race", f"c{i}", FAST.ttl_s)
                                     for i in range(10)])
    assert sorted(a for a in answers if a is not None) == [1]
    row, _ = await read_lease(pools[0], "race")
    assert row is not None and row.holder == f"c{answers.index(1)}"


async def test_one_holder_and_a_takeover_when_it_goes_silent(pools: list[asyncpg.Pool]) -> None:
    """Two contenders: only one runs the work; when its database connections die (its
    process gone, without releasing) the other takes over with the next fence, and the first
    had stopped its work before the second started."""
    log: list[tuple[str, str, int, float]] = []
    a, b = Worker("a", log), Worker("b", log)
    task_a = asyncio.create_task(hold(pools[0], "job", "a", FAST, a))
    await asyncio.wait_for(a.started.wait(), WAIT_S)
    task_b = asyncio.create_task(hold(pools[1], "job", "b", FAST, b))
    try:
        await asyncio.sleep(4 * FAST.renew_interval_s)  # several renewals of a's, b looking
        assert not b.started.is_set()
        row, _ = await read_lease(pools[1], "job")
        assert row is not None and (row.holder, row.fence) == ("a", 1)
        pools[0].terminate()  # a can neither renew nor release
        await asyncio.wait_for(b.started.wait(), WAIT_S)
        assert b.fences == [2]
        stop_a = next(at for kind, who, _, at in log if (kind, who) == ("stop", "a"))
        start_b = next(at for kind, who, _, at in log if (kind, who) == ("start", "b"))
        assert stop_a < start_b, log
        row, _ = await read_lease(pools[1], "job")
        assert row is not None and (row.holder, row.fence) == ("b", 2)
    finally:
        await _cancel(task_a)
        await _cancel(task_b)


async def test_a_cancelled_holder_releases_and_the_next_takes_over_at_once(
        pools: list[asyncpg.Pool]) -> None:
    """A holder that is stopped (its task cancelled) releases the lease, so the other takes
    it at its next look rather than after the TTL; the fence goes up on each change."""
    log: list[tuple[str, str, int, float]] = []
    a, b = Worker("a", log), Worker("b", log)
    task_a = asyncio.create_task(hold(pools[0], "handover", "a", FAST, a))
    await asyncio.wait_for(a.started.wait(), WAIT_S)
    task_b = asyncio.create_task(hold(pools[1], "handover", "b", FAST, b))
    try:
        await asyncio.sleep(2 * FAST.renew_interval_s)
        await _cancel(task_a)
        assert log[-1][:2] == ("stop", "a")
        row, now_s = await read_lease(pools[1], "handover")
        assert row is not None
        # Released (ended now, its fence kept), or b has taken it already.
        assert (row.holder == "a" and row.fence == 1 and row.expires_at_s <= now_s) or (
            row.holder == "b" and row.fence == 2), row
        await asyncio.wait_for(b.started.wait(), WAIT_S)
        assert (a.fences, b.fences) == ([1], [2])
        # a comes back as a new incarnation (a new holder name) and waits its turn.
        again = Worker("a2", log)
        task_a = asyncio.create_task(hold(pools[0], "handover", "a2", FAST, again))
        await asyncio.sleep(3 * FAST.renew_interval_s)
        assert not again.started.is_set()
        await _cancel(task_b)
        await asyncio.wait_for(again.started.wait(), WAIT_S)
        assert again.fences == [3]
    finally:
        await _cancel(task_a)
        await _cancel(task_b)


async def test_a_stale_holders_fenced_write_is_refused(pools: list[asyncpg.Pool]) -> None:
    """After a takeover, a write fenced with the old fence is refused in its transaction and
    leaves nothing; one with the current fence commits."""
    assert await acquire(pools[0], "fenced", "old", 0.2) == 1
    await asyncio.sleep(0.3)  # the old holder stopped renewing; its lease has ended
    assert await acquire(pools[1], "fenced", "new", FAST.ttl_s) == 2
    async with pools[0].acquire() as conn:
        await conn.execute("CREATE TEMP TABLE written (by text)")
        with pytest.raises(LeaseLost):
            async with conn.transaction():
                await check_fence(conn, "fenced", 1)
                await conn.execute("INSERT INTO written VALUES ('old')")
        async with conn.transaction():
            await Fence("fenced", 2).check(conn)
            await conn.execute("INSERT INTO written VALUES ('new')")
        assert [r["by"] for r in await conn.fetch("SELECT by FROM written")] == ["new"]


async def test_a_fenced_write_in_progress_holds_off_the_takeover(
        pools: list[asyncpg.Pool]) -> None:
    """A takeover waits for a fenced transaction that began before it: the write commits
    under the old fence, and only then does the fence rise."""
    assert await acquire(pools[0], "inflight", "old", 0.2) == 1
    await asyncio.sleep(0.3)
    async with pools[0].acquire() as conn, conn.transaction():
        await check_fence(conn, "inflight", 1)
        takeover = asyncio.create_task(acquire(pools[1], "inflight", "new", FAST.ttl_s))
        await asyncio.sleep(0.3)
        assert not takeover.done()  # blocked on the row the fenced write holds
    assert await asyncio.wait_for(takeover, WAIT_S) == 2


class _FailingReads:
    """A real pool whose lease statements (the read, ``fetchrow``, and a holder's one-statement
    renewal, ``fetchval``) fail with ``failures`` in turn first: what a connection cut
    mid-operation can raise beyond the database errors."""

    def __init__(self, pool: asyncpg.Pool, failures: list[BaseException]) -> None:
        self._pool = pool
        self._failures = failures

    async def fetchrow(self, *args: object) -> object:
        if self._failures:
            raise self._failures.pop(0)
        return await self._pool.fetchrow(*args)

    async def fetchval(self, *args: object) -> object:
        if self._failures:
            raise self._failures.pop(0)
        return await self._pool.fetchval(*args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._pool, name)


async def test_no_failure_of_a_renewal_ends_the_holder(pools: list[asyncpg.Pool]) -> None:
    """A holder whose renewals fail with errors that are not the database's (a driver's
    internal error, a cancellation that is not the task's own) keeps its loop: it still
    holds the lease and runs the work once the reads answer again. The loop used to end on
    them, releasing the lease with its live process still named as the holder, and the
    work it guards stopped for good (a payments actor's recovery worker, in a test run)."""
    log: list[tuple[str, str, int, float]] = []
    work = Worker("a", log)
    failing = _FailingReads(pools[0], [asyncpg.exceptions.InternalClientError("cut"),
                                       asyncio.CancelledError(), RuntimeError("odd")])
    task = asyncio.create_task(hold(failing, "outlives", "a", FAST, work))  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(work.started.wait(), WAIT_S)
        assert not failing._failures and not task.done()
        # Cut again while held: the work is stopped when renewals stay away past the TTL's
        # margin, and starts again when they come back, under the same holder.
        failing._failures.extend([RuntimeError("odd")] * 8)
        deadline = time.monotonic() + WAIT_S
        while work.fences != [1, 1] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert work.fences == [1, 1] and not task.done(), log
        row, now_s = await read_lease(pools[1], "outlives")
        assert row is not None and row.holder == "a" and row.expires_at_s > now_s
    finally:
        await _cancel(task)
    assert log[-1][:2] == ("stop", "a")


class _Counting:
    """A pool that counts the statements run through it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.statements = 0

    async def fetchval(self, *args: object) -> object:
        self.statements += 1
        return await self._pool.fetchval(*args)

    async def fetchrow(self, *args: object) -> object:
        self.statements += 1
        return await self._pool.fetchrow(*args)


async def test_a_holders_renewal_is_one_statement_and_decides_as_before(
        pools: list[asyncpg.Pool]) -> None:
    """With the fence it holds, a holder renews in one statement; once another holder took
    the lease over, the same call reads the row and waits, as any contender does."""
    counting = _Counting(pools[0])
    assert await acquire(counting, "renew-one", "a", 0.3) == 1  # type: ignore[arg-type]
    before = counting.statements
    assert await acquire(counting, "renew-one", "a", 0.3, 1) == 1  # type: ignore[arg-type]
    assert counting.statements == before + 1
    await asyncio.sleep(0.35)
    assert await acquire(pools[1], "renew-one", "b", FAST.ttl_s) == 2
    before = counting.statements
    assert await acquire(counting, "renew-one", "a", 0.3, 1) is None  # type: ignore[arg-type]
    assert counting.statements == before + 2
    # The holder's lost fence renews nothing: b still holds it.
    row, _ = await read_lease(pools[0], "renew-one")
    assert row is not None and (row.holder, row.fence) == ("b", 2)
