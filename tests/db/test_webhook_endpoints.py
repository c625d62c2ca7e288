"""Tenants' webhook endpoints beside operators' subscribers, against a real PostgreSQL, the
real outbox relay and a real HTTP receiver on 127.0.0.1: who gets which event, signed with
which key; ``--event-subscriber`` leaves endpoints alone; removing an endpoint drops its
undelivered deliveries and takes its dead letters out of the operator's list."""

from __future__ import annotations

import base64
import json
import time

import asyncpg
import pytest

from actors.payments import outbox, webhook_endpoints
from processor.identity import tenant_slot
from tests.receiver import receiving

RELAY_SECRET = b"relay-secret-of-at-least-32bytes"
ENDPOINT_SECRET = bytes(range(32))
FAST = outbox.RelayLimits(batch_max=50, in_flight_max=10, attempts_max=1, backoff_base_s=0.01,
                          backoff_cap_s=0.05, request_timeout_s=1.0, lease_s=20.0,
                          poll_interval_s=0.01, statement_timeout_s=2.0)


async def _payment(conn: asyncpg.Connection, payment_id: str, tenant: str) -> None:
    await conn.execute(
        "INSERT INTO payments (id, merchant_account_id, amount, currency, payment_method, "
        "status, principal) VALUES ($1, 1, 100, 'USD', 'pm_test_token', 'authorized', $2)",
        payment_id, f"{tenant_slot(tenant)}/someone")


async def _event(pool: asyncpg.Pool, event_type: str, aggregate_id: str) -> int:
    async with pool.acquire() as conn, conn.transaction():
        return await outbox.enqueue(conn, event_type=event_type, aggregate_id=aggregate_id,
                                    payload={"id": aggregate_id})


async def test_operators_get_every_event_and_endpoints_their_tenants_types(db_url: str) -> None:
    """An operator's subscriber receives every event signed with the relay's key; a
    tenant's endpoint receives only that tenant's events of its types, signed with its own
    key; an event of another tenant, or of another type, is not even queued for it."""
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    try:
        async with receiving() as receiver, pool.acquire() as conn:
            await outbox.set_subscribers(pool, {"ops": receiver.url("/ops")})
            await webhook_endpoints.create_endpoint(
                conn, endpoint_id="we_" + "a" * 24, tenant=str(tenant_slot("acme")),
                url=receiver.url("/acme"), events=("payment.captured",),
                secret=ENDPOINT_SECRET)
            await _payment(conn, "pay_acme", "acme")
            await _payment(conn, "pay_other", "other")
            await _event(pool, "payment.authorized", "pay_acme")
            captured = await _event(pool, "payment.captured", "pay_acme")
            await _event(pool, "payment.captured", "pay_other")
            queued = await conn.fetch("SELECT event_id, subscriber FROM outbox_deliveries")
            assert sorted(r["subscriber"] for r in queued) == ["ops"] * 3 + ["we_" + "a" * 24]
            async with outbox.OutboxRelay(pool, signing_secret=RELAY_SECRET,
                                          limits=FAST) as relay:
                assert await relay.run_once() == 4
            now_s = time.time()
            [mine] = receiver.at("/acme")
            assert json.loads(mine.body)["id"] == captured
            assert outbox.verify(ENDPOINT_SECRET, mine.headers, mine.body, now_s=now_s)
            assert not outbox.verify(RELAY_SECRET, mine.headers, mine.body, now_s=now_s)
            ops = receiver.at("/ops")
            assert len(ops) == 3
            assert all(outbox.verify(RELAY_SECRET, d.headers, d.body, now_s=now_s)
                       for d in ops)
    finally:
        await pool.close()


async def test_event_subscriber_flags_leave_endpoints_alone(db_url: str) -> None:
    """Setting the operators' subscribers (every start of serve) neither deactivates nor
    rewrites a tenant's endpoint, and a flag may not take an endpoint's name."""
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            view, created = await webhook_endpoints.create_endpoint(
                conn, endpoint_id="we_" + "b" * 24, tenant="7", url="https://example.com/b",
                events=(), secret=ENDPOINT_SECRET)
            assert created and base64.b64decode(view.secret[6:]) == ENDPOINT_SECRET
        await outbox.set_subscribers(pool, {"ops": "https://example.com/ops"})
        await outbox.set_subscribers(pool, {})
        with pytest.raises(ValueError, match="webhook endpoints"):
            await outbox.set_subscribers(pool, {view.id: "https://example.com/x"})
        row = await pool.fetchrow("SELECT active, url FROM event_subscribers WHERE name = $1",
                                  view.id)
        assert (row["active"], row["url"]) == (True, "https://example.com/b")
        assert await webhook_endpoints.endpoint_of(pool, "7", view.id) is not None
        assert await webhook_endpoints.endpoint_of(pool, "8", view.id) is None
    finally:
        await pool.close()


async def test_removing_an_endpoint_drops_its_queue_and_its_dead_letters_from_view(
        db_url: str) -> None:
    """After removal, an endpoint's undelivered deliveries are gone (not parked), its dead
    letters are neither listed, counted nor replayed, and another tenant cannot remove it."""
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            view, _ = await webhook_endpoints.create_endpoint(
                conn, endpoint_id="we_" + "c" * 24, tenant=str(tenant_slot("acme")),
                url="http://127.0.0.1:9/refused", events=(), secret=ENDPOINT_SECRET)
            await _payment(conn, "pay_c", "acme")
            first = await _event(pool, "payment.authorized", "pay_c")
            async with outbox.OutboxRelay(pool, signing_secret=RELAY_SECRET,
                                          limits=FAST) as relay:
                assert await relay.run_once() == 1  # refused: one attempt, dead
            await _event(pool, "payment.captured", "pay_c")
            assert [r["event_id"] for r in await outbox.dlq_list(pool, 10)] == [first]
            assert await webhook_endpoints.remove_endpoint(conn, view.id, "999") is None
            removed = await webhook_endpoints.remove_endpoint(conn, view.id,
                                                              str(tenant_slot("acme")))
            assert removed is not None and removed.id == view.id
            assert await conn.fetchval("SELECT count(*) FROM outbox_deliveries "
                                       "WHERE delivered_at IS NULL") == 0
            assert await outbox.dlq_list(pool, 10) == []
            assert (await outbox.backlog(pool))["dead_letters"] == 0
            assert await outbox.dlq_replay(pool, None) == 0
            assert await webhook_endpoints.remove_endpoint(conn, view.id, None) is None
    finally:
        await pool.close()
