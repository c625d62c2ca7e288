"""`txproc dlq list` and `txproc dlq replay` against a real database."""

from __future__ import annotations

import subprocess
import sys

import asyncpg

from actors.payments import outbox

RELAY_SECRET = b"s" * 32
LIMITS = outbox.RelayLimits(batch_max=4, in_flight_max=2, attempts_max=1, backoff_base_s=0.01,
                            backoff_cap_s=0.05, request_timeout_s=1.0, lease_s=10.0,
                            poll_interval_s=0.05, statement_timeout_s=2.0)


def txproc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "actors.app.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


async def test_dead_letters_are_listed_and_replayed_from_the_command_line(db_url: str) -> None:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        # Port 9 on loopback refuses connections: the one allowed attempt fails.
        await outbox.set_subscribers(pool, {"nowhere": "http://127.0.0.1:9/events"})
        async with pool.acquire() as conn, conn.transaction():
            event_id = await outbox.enqueue(conn, event_type="payment.authorized",
                                            aggregate_id="pay_x", payload={"amount": 1})
        async with outbox.OutboxRelay(pool, signing_secret=RELAY_SECRET, limits=LIMITS) as relay:
            assert await relay.run_once() == 1
        assert (await outbox.backlog(pool))["dead_letters"] == 1

        listed = txproc("dlq", "list", "--database-url", db_url)
        assert listed.returncode == 0, listed.stderr
        assert f"event_id={event_id}" in listed.stdout
        assert "subscriber=nowhere" in listed.stdout

        replayed = txproc("dlq", "replay", "--all", "--database-url", db_url)
        assert (replayed.returncode, replayed.stdout.strip()) == (0, "replayed: 1")
        assert (await outbox.backlog(pool))["dead_letters"] == 0
        due = await pool.fetchval(
            "SELECT count(*) FROM outbox_deliveries WHERE event_id = $1 AND delivered_at IS NULL",
            event_id)
        assert due == 1
        again = txproc("dlq", "replay", "--event-id", str(event_id), "--database-url", db_url)
        assert again.stdout.strip() == "replayed: 0"
    finally:
        await pool.close()
