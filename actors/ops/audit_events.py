"""Audit events in PostgreSQL (migration 0025): the writer every operator and configuration
action calls, the API's and the CLI's listing, and the chain check over the whole table.

``record_audit_event`` appends one event inside the caller's transaction when there is
one (a savepoint of it), so the event commits or rolls back with the change it records;
on a connection outside a transaction it commits on its own. It takes an advisory lock
held to the commit, reads the chain's last id and digest, and inserts the next row with
the database's clock: two writers never link to the same row, and ids follow commit
order. The lock serializes audit writes only (operator actions are rare); take it last,
after the caller's own locks, as every caller here does.

The pure part (encoding, digests, the chain check, the query's checks) is
processor/audit.py.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
from collections.abc import Mapping
from typing import Any

import asyncpg

from processor.audit import (
    AUDIT_EVENTS_TABLE,
    GENESIS_DIGEST,
    AuditActor,
    AuditEventsPage,
    AuditQuery,
    AuditRecord,
    ChainProblem,
    at_us_of,
    check_audit_chain,
    encode_audit_cursor,
    event_view,
    next_record,
    record_of_row,
)

__all__ = [
    "AUDIT_LOCK_KEY",
    "CHAIN_PAGE_ROWS",
    "actor_of_origin",
    "check_audit_log",
    "list_audit_events",
    "operator_actor",
    "record_audit_event",
]

# The transaction-level advisory lock every audit write holds to its commit: "txprocae" in
# ASCII, so it can be recognized in pg_locks.
AUDIT_LOCK_KEY = 0x7478_7072_6F63_6165
STATEMENT_TIMEOUT_S = 30.0
# Rows read per statement by the chain check.
CHAIN_PAGE_ROWS = 10_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

_INSERT = """
INSERT INTO audit_events (id, at, actor_kind, actor_tenant, actor_subject, actor_token_id,
                          tenant_slot, action, target_kind, target_id, details, request_id,
                          digest)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13)
"""
_COLUMNS = ("id, at, actor_kind, actor_tenant, actor_subject, actor_token_id, tenant_slot, "
            "action, target_kind, target_id, details::text AS details, request_id, digest")


def operator_actor() -> AuditActor:
    """The operating-system user running this ``txproc`` command, as an actor (its uid
    when the system has no name for it)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no LOGNAME/USER and no passwd entry (a bare container)
        user = ""
    return AuditActor(kind="operator", subject=user or f"uid:{os.getuid()}")


async def actor_of_origin(conn: asyncpg.Connection | asyncpg.Pool, origin: int, *,
                          subject: str) -> tuple[AuditActor, str]:
    """The API caller of the request whose audit record is ``origin`` (actors/edge/
    audit.py), and its request id: the token's tenant, subject and id as the edge recorded
    them. Without a record (``origin`` 0: an edge without an audit writer) the caller is
    known by ``subject`` only, and the request id is empty."""
    row = None
    if origin > 0:
        row = await conn.fetchrow(
            "SELECT tenant_name, subject, token_id, request_id FROM audit_requests "
            "WHERE id = $1", origin, timeout=STATEMENT_TIMEOUT_S)
    if row is None:
        return AuditActor(kind="token", subject=subject or "unknown"), ""
    return (AuditActor(kind="token", subject=row["subject"], tenant=row["tenant_name"],
                       token_id=row["token_id"]), row["request_id"])


async def record_audit_event(
    conn: asyncpg.Connection, *, actor: AuditActor, action: str, target_kind: str,
    target_id: str, tenant_slot: int = 0, details: Mapping[str, Any] | None = None,
    request_id: str = "",
) -> AuditRecord:
    """Append one audit event and answer it (with its id and digest).

    ``action`` is one of ``processor.audit.ACTIONS``; ``tenant_slot`` the tenant the action
    concerns (its ``audit:read`` tokens see the event), 0 for the whole processor;
    ``details`` a JSON object without floats and without secrets (at most 4 KiB). Runs in
    the caller's transaction when ``conn`` is in one. Raises ``AuditEventError`` (a
    ``ValueError``) for an event that may not be written, before anything is written, and
    asyncpg's errors when the database refuses or is away."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", AUDIT_LOCK_KEY,
                           timeout=STATEMENT_TIMEOUT_S)
        last = await conn.fetchrow(
            "SELECT clock_timestamp() AS now, e.id, e.digest FROM (SELECT 1) AS one "
            "LEFT JOIN LATERAL (SELECT id, digest FROM audit_events ORDER BY id DESC "
            "LIMIT 1) AS e ON true", timeout=STATEMENT_TIMEOUT_S)
        record = next_record(
            previous_id=last["id"] or 0,
            previous_digest=GENESIS_DIGEST if last["digest"] is None else bytes(last["digest"]),
            at_us=at_us_of(last["now"]), actor=actor, action=action,
            target_kind=target_kind, target_id=target_id, tenant_slot=tenant_slot,
            details=details, request_id=request_id)
        event = record.event
        await conn.execute(
            _INSERT, event.id, _EPOCH + dt.timedelta(microseconds=event.at_us),
            actor.kind, actor.tenant, actor.subject, actor.token_id, event.tenant_slot,
            event.action, event.target_kind, event.target_id, json.dumps(event.details),
            event.request_id, record.digest, timeout=STATEMENT_TIMEOUT_S)
    return record


async def list_audit_events(conn: asyncpg.Connection | asyncpg.Pool, query: AuditQuery, *,
                            tenant_slot: int | None) -> AuditEventsPage:
    """The events after ``query.after``, oldest first, at most ``query.limit``, of
    ``query.action`` when given; those of ``tenant_slot`` only, or every one for None (the
    processor's own token, an operator). ``next_cursor`` is None on the last page."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM audit_events WHERE id > $1 "
        "AND ($2::bigint IS NULL OR tenant_slot = $2) AND ($3::text IS NULL OR action = $3) "
        "ORDER BY id LIMIT $4", query.after, tenant_slot, query.action, query.limit + 1,
        timeout=STATEMENT_TIMEOUT_S)
    page = [record_of_row(row) for row in rows[:query.limit]]
    more = len(rows) > query.limit
    return AuditEventsPage(
        data=[event_view(record) for record in page],
        next_cursor=encode_audit_cursor(page[-1].event.id) if more else None)


async def check_audit_log(conn: asyncpg.Connection, *, page_rows: int = CHAIN_PAGE_ROWS
                          ) -> tuple[int, list[ChainProblem]]:
    """Check the whole chain of ``audit_events`` (processor.audit.check_audit_chain), a
    page of ``page_rows`` rows at a time: how many rows were checked, and every problem.
    Run it in a repeatable-read transaction to check one snapshot of a live table."""
    if page_rows < 1:
        raise ValueError(f"page_rows must be at least 1, got {page_rows}")
    problems: list[ChainProblem] = []
    checked = 0
    after = 0
    previous = GENESIS_DIGEST
    while True:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM {AUDIT_EVENTS_TABLE} WHERE id > $1 ORDER BY id LIMIT $2",
            after, page_rows, timeout=STATEMENT_TIMEOUT_S)
        if not rows:
            return checked, problems
        records = [record_of_row(row) for row in rows]
        problems += check_audit_chain(records, previous_digest=previous, first_id=after + 1)
        checked += len(records)
        after = records[-1].event.id
        previous = records[-1].digest
