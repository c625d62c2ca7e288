"""Leases in PostgreSQL (``leases``, migration 0030): the SQL, and ``hold``, which runs a
piece of work only while this process holds the lease named for it.

The decisions are ``processor.lease``'s; here they are applied with compare-and-set updates
on the database's clock. ``hold`` contends every ``renew_interval_s``; while it holds the
lease it runs the work as a task and renews; when a renewal shows the lease lost (another
holder), or no renewal succeeded for ``ttl_s - margin_s`` (the database away, this process
paused), it cancels the work before a successor can have taken over. Cancelled itself (the
actor stopping), it cancels the work and releases the lease, so a successor need not wait
for the end of the TTL.

Work whose writes a stale holder could spoil (a process paused past its lease that wakes
mid-write) calls ``Fence.check`` in the write's own transaction: it locks the lease row in
share mode and refuses (``LeaseLost``) unless the fence is still the row's, so either the
write commits before a takeover or it is refused after one (docs/design.md §12, "Leases").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import asyncpg

from processor.lease import Action, Holding, LeaseConfig, LeaseRow, decide

__all__ = ["Fence", "LeaseLost", "acquire", "check_fence", "hold", "read_lease", "release"]

log = logging.getLogger("txproc.lease")

DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

_READ = """
SELECT l.holder, l.fence, extract(epoch FROM l.expires_at)::float8 AS expires_at_s,
       extract(epoch FROM clock_timestamp())::float8 AS now_s
FROM (SELECT 1) AS one LEFT JOIN leases l ON l.name = $1
"""
_CREATE = """
INSERT INTO leases (name, holder, fence, expires_at)
VALUES ($1, $2, 1, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (name) DO NOTHING RETURNING fence
"""
# Compare-and-set: the row must still be what was read, and a takeover must still find
# the lease expired (its holder may have renewed between the read and this update).
_SET = """
UPDATE leases SET holder = $2, fence = $3,
                  expires_at = clock_timestamp() + make_interval(secs => $4)
WHERE name = $1 AND holder = $5 AND fence = $6
  AND ($5 = $2 OR expires_at <= clock_timestamp())
RETURNING fence
"""
# A holder's renewal in one statement: what ``decide`` answers for a row this holder still
# holds with this fence (RENEW, same fence), without reading the row first.
_RENEW = """
UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => $4)
WHERE name = $1 AND holder = $2 AND fence = $3
RETURNING fence
"""
_RELEASE = """
UPDATE leases SET expires_at = clock_timestamp()
WHERE name = $1 AND holder = $2 AND fence = $3
"""
_CHECK = "SELECT 1 FROM leases WHERE name = $1 AND fence = $2 FOR SHARE"


class LeaseLost(Exception):
    """A fenced write found that another holder has taken the lease over."""


@dataclass(frozen=True, slots=True)
class Fence:
    """The lease a piece of work runs under: its name and fence."""

    name: str
    value: int

    async def check(self, conn: asyncpg.Connection) -> None:
        """Raise ``LeaseLost`` unless the lease still has this fence; call it inside the
        transaction of the write it guards (see the module docstring)."""
        await check_fence(conn, self.name, self.value)


async def check_fence(conn: asyncpg.Connection, name: str, fence: int) -> None:
    """Raise ``LeaseLost`` unless lease ``name`` still has ``fence``; holds the row in share
    mode until the caller's transaction ends, so no takeover commits in between."""
    if await conn.fetchval(_CHECK, name, fence) is None:
        raise LeaseLost(f"lease {name} is no longer held with fence {fence}")


async def read_lease(pool: asyncpg.Pool, name: str) -> tuple[LeaseRow | None, float]:
    """The lease row (None if there is none) and the database's clock, seconds."""
    row = await pool.fetchrow(_READ, name)
    assert row is not None  # noqa: S101 - the LEFT JOIN always answers one row
    lease = None if row["holder"] is None else LeaseRow(
        row["holder"], int(row["fence"]), float(row["expires_at_s"]))
    return lease, float(row["now_s"])


async def acquire(pool: asyncpg.Pool, name: str, me: str, ttl_s: float,
                  held: int | None = None) -> int | None:
    """Create, renew or take over lease ``name`` for ``me`` as ``processor.lease.decide``
    says; answers the fence if ``me`` holds it now, else None. Raises the database's
    errors (``DATABASE_ERRORS``).

    ``held``: the fence ``me`` believes it holds. Its renewal is then tried first as one
    statement; only if the row is no longer ``me``'s with that fence is it read and
    decided as for any contender."""
    if held is not None:
        renewed = await pool.fetchval(_RENEW, name, me, held, ttl_s)
        if renewed is not None:
            return int(renewed)
    row, now_s = await read_lease(pool, name)
    decision = decide(row, me, now_s)
    if decision.action is Action.WAIT:
        return None
    if decision.action is Action.CREATE:
        fence = await pool.fetchval(_CREATE, name, me, ttl_s)
    else:
        assert row is not None  # noqa: S101 - decide answers CREATE for no row
        fence = await pool.fetchval(_SET, name, me, decision.fence, ttl_s, row.holder,
                                    row.fence)
    return None if fence is None else int(fence)


async def release(pool: asyncpg.Pool, name: str, me: str, fence: int) -> None:
    """End ``me``'s lease now (its fence stays), so the next contender need not wait."""
    await pool.execute(_RELEASE, name, me, fence)


Work = Callable[[Fence], Coroutine[Any, Any, None]]


def _cancelled_from_outside() -> bool:
    """Whether the running task has been asked to stop (``Task.cancel``, not yet undone)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def hold(pool: asyncpg.Pool, name: str, me: str, config: LeaseConfig, work: Work, *,
               monotonic_s: Callable[[], float] = time.monotonic) -> None:
    """Run ``work(fence)`` while ``me`` holds lease ``name``, until cancelled.

    ``me`` names this holder uniquely (a restarted process is another holder). The work is
    started when the lease is taken, cancelled when it is lost or can no longer be trusted,
    and started again if it ends while the lease is held.
    """
    holding: Holding | None = None
    task: asyncio.Task[None] | None = None

    def stop_work(why: str) -> None:
        nonlocal holding, task
        if task is not None and not task.done():
            log.warning("lease %s: stopping its work (%s)", name, why)
            task.cancel()
        holding, task = None, None

    try:
        while True:
            sent_s = monotonic_s()
            bound_s = config.renew_interval_s if holding is None else max(
                0.01, min(config.renew_interval_s, holding.remaining_s(sent_s)))
            try:
                async with asyncio.timeout(bound_s):
                    fence = await acquire(pool, name, me, config.ttl_s,
                                          None if holding is None else holding.fence)
            except DATABASE_ERRORS as exc:
                log.warning("lease %s: not renewed: %r", name, exc)
            except asyncio.CancelledError:
                if _cancelled_from_outside():
                    raise
                # Not this task's cancellation (the driver's own, leaking out of a
                # connection cancelled mid-operation): a failed renewal like any other.
                log.warning("lease %s: not renewed: a cancellation meant for another", name)
            except Exception:  # the loop must outlive any one failure (log.exception)
                # Nothing but a cancellation may end the loop: a loop that ends releases
                # the lease, and where this process is the only contender (one payments
                # actor) the work it guards stops everywhere, silently.
                log.exception("lease %s: not renewed: an unexpected failure", name)
            else:
                if fence is None:
                    if holding is not None:
                        stop_work("another holder took it over")
                elif holding is not None and holding.fence == fence:
                    holding.renewed(sent_s)
                else:
                    stop_work("a new fence")
                    holding = Holding(config, fence, sent_s)
                    log.info("lease %s: held by %s with fence %d", name, me, fence)
            if holding is not None and not holding.valid(monotonic_s()):
                stop_work("not renewed in time")
            if holding is not None and (task is None or task.done()):
                if task is not None and not task.cancelled() and task.exception() is not None:
                    log.error("lease %s: its work failed; starting it again",
                              name, exc_info=task.exception())
                task = asyncio.get_running_loop().create_task(
                    work(Fence(name, holding.fence)), name=f"lease:{name}")
            now_s = monotonic_s()
            pause_s = config.renew_interval_s if holding is None else min(
                config.renew_interval_s, holding.remaining_s(now_s))
            await asyncio.sleep(max(0.01, pause_s))
    finally:
        held = holding
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if held is not None:
            with contextlib.suppress(*DATABASE_ERRORS):
                async with asyncio.timeout(config.renew_interval_s):
                    await release(pool, name, me, held.fence)
