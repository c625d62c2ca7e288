"""Audit events in a real PostgreSQL (migration 0025, actors/ops/audit_events.py): the
writer appends a linear chain under concurrency as the service's role, rolls back with its
caller, nobody may change or remove a row, tampering as a superuser is named by the chain
check, and the listing pages and filters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from actors.ops.audit_events import (
    check_audit_log,
    list_audit_events,
    operator_actor,
    record_audit_event,
)
from processor.audit import AuditActor, AuditEventError, AuditQuery, decode_audit_cursor

TOKEN = AuditActor(kind="token", subject="ops-7", tenant="acme", token_id="jti-1")


@pytest.fixture
async def app_conn(app_db_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(app_db_url, timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


async def _rotated(conn: asyncpg.Connection, n: int, *, tenant_slot: int = 0) -> None:
    await record_audit_event(conn, actor=operator_actor(), action="keys.rotated",
                             target_kind="signing_key", target_id=f"k{n}",
                             tenant_slot=tenant_slot, details={"n": n})


async def test_concurrent_writers_make_one_linear_chain(app_db_url: str) -> None:
    """Twenty writers on their own connections, as the service's role, at once: ids 1..20
    without a gap, every row linked to the one before (the chain check finds nothing)."""
    conns = [await asyncpg.connect(app_db_url, timeout=10) for _ in range(20)]
    try:
        await asyncio.gather(*[_rotated(c, i) for i, c in enumerate(conns)])
        ids = [r["id"] for r in await conns[0].fetch("SELECT id FROM audit_events ORDER BY id")]
        assert ids == list(range(1, 21))
        checked, problems = await check_audit_log(conns[0], page_rows=3)
        assert (checked, problems) == (20, [])
    finally:
        for c in conns:
            await c.close()


async def test_an_event_rolls_back_with_its_change(app_conn: asyncpg.Connection) -> None:
    """An event written in a transaction that rolls back leaves nothing, and the next
    event takes the id it would have had: the chain has no gap."""
    await _rotated(app_conn, 1)
    with pytest.raises(RuntimeError):
        async with app_conn.transaction():
            await _rotated(app_conn, 2)
            raise RuntimeError("the change it records failed")
    record = await record_audit_event(app_conn, actor=TOKEN, action="webhook_endpoint.created",
                                      target_kind="webhook_endpoint", target_id="we_1",
                                      tenant_slot=5, request_id="req-9")
    assert record.event.id == 2
    assert await check_audit_log(app_conn) == (2, [])
    with pytest.raises(AuditEventError):
        await record_audit_event(app_conn, actor=TOKEN, action="keys.rotated",
                                 target_kind="signing_key", target_id="k",
                                 details={"ratio": 0.5})
    assert await app_conn.fetchval("SELECT count(*) FROM audit_events") == 2


@pytest.mark.parametrize("statement", [
    "UPDATE audit_events SET actor_subject = 'someone else'",
    "DELETE FROM audit_events WHERE id = 1",
    "TRUNCATE audit_events",
])
async def test_nobody_changes_or_removes_an_event(app_conn: asyncpg.Connection, db_url: str,
                                                  statement: str) -> None:
    """The service's role is refused by privilege, and the tables' owner by the
    append-only trigger (TXA01)."""
    await _rotated(app_conn, 1)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_conn.execute(statement)
    owner = await asyncpg.connect(db_url, timeout=10)
    try:
        with pytest.raises(asyncpg.PostgresError, match="append-only") as refused:
            await owner.execute(statement)
        assert refused.value.sqlstate == "TXA01"
    finally:
        await owner.close()


@pytest.mark.parametrize(("tamper", "named"), [
    ("UPDATE audit_events SET target_id = 'k-forged' WHERE id = 2", [(2, "digest_mismatch")]),
    ("UPDATE audit_events SET details = '{\"n\": 9}' WHERE id = 3", [(3, "digest_mismatch")]),
    ("UPDATE audit_events SET at = at + interval '1 second' WHERE id = 1",
     [(1, "digest_mismatch")]),
    ("DELETE FROM audit_events WHERE id = 2", [(3, "id_gap"), (3, "digest_mismatch")]),
    ("INSERT INTO audit_events SELECT 9, at, actor_kind, actor_tenant, actor_subject, "
     "actor_token_id, tenant_slot, action, target_kind, target_id, details, request_id, "
     "digest FROM audit_events WHERE id = 4", [(9, "id_gap"), (9, "digest_mismatch")]),
])
async def test_tampering_as_a_superuser_is_named(app_conn: asyncpg.Connection, db_url: str,
                                                 tamper: str, named: list[tuple[int, str]]
                                                 ) -> None:
    """With the triggers bypassed (session_replication_role, a superuser's), an edited,
    removed or forged row is named by the chain check, by id and kind."""
    for n in range(4):
        await _rotated(app_conn, n)
    owner = await asyncpg.connect(db_url, timeout=10)
    try:
        await owner.execute("SET session_replication_role = replica")
        await owner.execute(tamper)
    finally:
        await owner.close()
    _, problems = await check_audit_log(app_conn)
    assert [(p["id"], p["kind"]) for p in problems] == named


async def test_the_listing_pages_and_filters(app_conn: asyncpg.Connection) -> None:
    """Oldest first after a cursor, a tenant sees only its own events, an action filter
    keeps only that action, and the last page has no cursor."""
    for n in range(5):
        await _rotated(app_conn, n, tenant_slot=7 if n % 2 else 0)
    await record_audit_event(app_conn, actor=TOKEN, action="webhook_endpoint.deleted",
                             target_kind="webhook_endpoint", target_id="we_2", tenant_slot=7)
    first = await list_audit_events(app_conn, AuditQuery(limit=4), tenant_slot=None)
    assert [e.id for e in first.data] == [1, 2, 3, 4] and first.next_cursor is not None
    rest = await list_audit_events(
        app_conn, AuditQuery(after=decode_audit_cursor(first.next_cursor), limit=4),
        tenant_slot=None)
    assert [e.id for e in rest.data] == [5, 6] and rest.next_cursor is None
    tenant = await list_audit_events(app_conn, AuditQuery(), tenant_slot=7)
    assert [e.id for e in tenant.data] == [2, 4, 6]
    deleted = await list_audit_events(app_conn, AuditQuery(action="webhook_endpoint.deleted"),
                                      tenant_slot=None)
    [event] = deleted.data
    assert (event.actor.subject, event.actor.token_id, event.target.id) == \
        ("ops-7", "jti-1", "we_2")
    assert first.data[0].details == {"n": 0}


async def test_details_survive_jsonb_exactly(app_conn: asyncpg.Connection) -> None:
    """Details that jsonb stores in its own form (key order, escapes, non-ASCII text, the
    largest integers, nesting) read back to the same digest: the chain check finds
    nothing."""
    details = {"z": [1, -(2**63 - 1), 2**63 - 1, None, True, False],
               "a": {"é": "\u2028 \"quoted\" \\ \t tab", "emoji": "\U0001f600", "": ""},
               "long key with spaces": {"nested": {"deeper": ["x"]}}}
    await record_audit_event(app_conn, actor=AuditActor(kind="service", subject="tests"),
                             action="schema.migrated", target_kind="schema", target_id="25",
                             details=details)
    assert await check_audit_log(app_conn) == (1, [])
    page = await list_audit_events(app_conn, AuditQuery(), tenant_slot=None)
    assert page.data[0].details == details
