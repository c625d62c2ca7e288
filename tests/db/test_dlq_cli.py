"""`txproc dlq list` and `txproc dlq replay` against a real database."""

from __future__ import annotations

import subprocess
import sys

import asyncpg

from actors.payments import outbox
from processor.payments import Kind

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


async def test_steps_in_review_are_listed_and_retried_from_the_command_line(
        db_url: str) -> None:
    import json
    import time

    from actors.payments.store import PaymentStore
    from processor.payments import Payment, PaymentStatus, new_step

    store = await PaymentStore.connect(db_url, pool_size_max=2, connect_timeout_s=10,
                                       command_timeout_s=30)
    try:
        payment_id = "pay_" + "c" * 24
        step_id, base = await store.new_step_ids()
        step = new_step(step_id=step_id, transfer_base=base, kind=Kind.AUTHORIZE,
                        subject_id=payment_id, amount=500, currency="USD", provider="acme",
                        merchant_account_id=7)
        now_s = time.time()
        assert await store.create_payment(
            Payment(id=payment_id, merchant_account_id=7, amount=500, currency="USD",
                    payment_method="pm_4242_abcdefgh", status=PaymentStatus.PROCESSING,
                    provider="acme"), step, principal="alice", due_at_s=now_s)
        [aside] = await store.flag_for_review(now_s=now_s + 7_200, review_after_s=3_600,
                                              limit=10)
        listed = txproc("payments", "review", "list", "--database-url", db_url)
        assert listed.returncode == 0, listed.stderr
        [row] = [json.loads(line) for line in listed.stdout.splitlines()]
        assert (row["id"], row["subject_id"], row["phase"]) == (aside.id, payment_id, "provider")
        assert "pm_4242" not in listed.stdout
        nobody = txproc("payments", "review", "retry", str(aside.id), "--operator", " ",
                        "--reason", "checked", "--database-url", db_url)
        assert nobody.returncode == 2
        retried = txproc("payments", "review", "retry", str(aside.id), "--operator", "ops-jane",
                         "--reason", "provider shows no charge", "--database-url", db_url)
        assert retried.returncode == 0, retried.stderr
        assert "ops-jane" in retried.stdout
        assert await store.steps_in_review() == []
        again = txproc("payments", "review", "retry", str(aside.id), "--operator", "ops-jane",
                       "--reason", "twice", "--database-url", db_url)
        assert again.returncode == 1 and "not in review" in again.stderr
    finally:
        await store.close()
