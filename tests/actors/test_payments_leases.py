"""The payments actor runs its recovery worker, outbox relay and reconciliation scheduler
under leases (actors/lease.py): it holds all three, and after a SIGKILL its restarted
incarnation takes them over with the next fence."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import asyncpg
import ray

from actors.app.runtime import Processor
from actors.payments.actor import LEASE_RECONCILIATION, LEASE_RECOVERY, LEASE_RELAY

JOBS = {LEASE_RECOVERY, LEASE_RELAY, LEASE_RECONCILIATION}
WAIT_ROUNDS_MAX = 600  # 0.1 s each: a bound on waiting for what must happen


async def _leases(processor: Processor) -> dict[str, tuple[str, int, bool]]:
    """Each job's lease: holder, fence, and whether it is in force now."""
    conn = await asyncpg.connect(processor.config.shard.database_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT name, holder, fence, expires_at > now() AS live"
                                " FROM leases WHERE name = ANY($1::text[])", list(JOBS))
    finally:
        await conn.close()
    return {r["name"]: (r["holder"], r["fence"], r["live"]) for r in rows}


async def _until(processor: Processor, done: object) -> dict[str, tuple[str, int, bool]]:
    leases: dict[str, tuple[str, int, bool]] = {}
    for _ in range(WAIT_ROUNDS_MAX):
        with contextlib.suppress(Exception):  # the actor restarting: ask it again
            await asyncio.wait_for(processor.payments.start.remote(), timeout=5)
        leases = await _leases(processor)
        if done(leases):  # type: ignore[operator]
            return leases
        await asyncio.sleep(0.1)
    raise AssertionError(f"leases never got there: {leases}")


def _all_held(leases: dict[str, tuple[str, int, bool]]) -> bool:
    return set(leases) == JOBS and all(live for _, _, live in leases.values()) and len(
        {holder for holder, _, _ in leases.values()}) == 1


async def test_a_killed_payments_actor_hands_its_leases_to_its_successor(
        processor: Processor) -> None:
    """One holder has all three leases; SIGKILL of its process: the restarted actor holds
    all three again, as another holder, each fence one higher."""
    before = await _until(processor, _all_held)
    [holder] = {h for h, _, _ in before.values()}
    pid = await processor.payments.pid.remote()
    assert holder.split(":")[1] == str(pid)
    assert b"Payments" in Path(f"/proc/{pid}/cmdline").read_bytes()
    killed_s = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def taken_over(leases: dict[str, tuple[str, int, bool]]) -> bool:
        return _all_held(leases) and all(h != holder for h, _, _ in leases.values())

    after = await _until(processor, taken_over)
    print(f"leases taken over {time.monotonic() - killed_s:.1f} s after the SIGKILL")
    for job in JOBS:
        assert after[job][1] == before[job][1] + 1, (before, after)
    with contextlib.suppress(ray.exceptions.RayActorError):
        assert await processor.payments.pid.remote() != pid
