"""actors/edge/audit.py: records written together in one statement; a record that cannot
be written refuses its request (no change goes unrecorded)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from actors.edge.audit import AuditWriter, request_id_of
from processor.errors import Unavailable
from processor.identity import Claims
from processor.request_audit import decode_header

CLAIMS = Claims(subject="s", scopes=frozenset(), expires_at_s=10, tenant="t", token_id="j")


class _Pool:
    """The one call the writer makes, recorded; ``fail`` makes it raise as a lost server
    would."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail

    async def execute(self, sql: str, *args: Any) -> str:
        self.calls.append(args)
        if self.fail:
            raise asyncpg.PostgresConnectionError("gone")
        return "INSERT"


async def test_records_arriving_together_are_one_statement_with_distinct_ids() -> None:
    pool = _Pool()
    writer = AuditWriter(pool, clock_s=lambda: 1.0)  # type: ignore[arg-type]
    ids = await asyncio.gather(*(writer.record(CLAIMS, f"r{i}", "create_transfers", i + 1)
                                 for i in range(5)))
    assert len(pool.calls) == 1
    row_ids, tenants, names, subjects, jtis, requests, ops, items, _ = pool.calls[0]
    assert row_ids == ids and len(set(ids)) == 5 and all(0 < i < 2**63 for i in ids)
    assert names == ["t"] * 5 and subjects == ["s"] * 5 and jtis == ["j"] * 5
    assert requests == [f"r{i}" for i in range(5)] and items == [1, 2, 3, 4, 5]
    assert tenants == [CLAIMS.tenant_slot] * 5 and ops == ["create_transfers"] * 5


async def test_a_record_that_cannot_be_written_refuses_the_request() -> None:
    writer = AuditWriter(_Pool(fail=True), clock_s=lambda: 1.0)  # type: ignore[arg-type]
    with pytest.raises(Unavailable):
        await writer.record(CLAIMS, "r", "create_accounts", 1)


@pytest.mark.parametrize(("header", "kept"), [
    ("abc-123", True), (None, False), ("", False), ("x" * 129, False), ("ünï", False),
    ("tab\there", False)])
def test_request_ids_are_kept_only_when_printable_ascii(header: str | None, kept: bool) -> None:
    value = request_id_of(header)
    assert (value == header) is kept
    assert value.isascii() and value.isprintable() and 0 < len(value) <= 128


async def test_records_arriving_while_one_insert_runs_share_the_next() -> None:
    """One INSERT in flight at a time: records arriving while it runs are written together
    by the next one, whatever the number of event-loop passes they came in."""
    release = asyncio.Event()

    class _SlowPool(_Pool):
        async def execute(self, sql: str, *args: Any) -> str:
            self.calls.append(args)
            if len(self.calls) == 1:
                await release.wait()
            return "INSERT"

    pool = _SlowPool()
    writer = AuditWriter(pool, clock_s=lambda: 1.0)  # type: ignore[arg-type]
    first = asyncio.ensure_future(writer.record(CLAIMS, "r0", "create_transfers", 1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    later = []
    for i in range(4):  # four passes of the loop while the first INSERT waits
        later.append(asyncio.ensure_future(writer.record(CLAIMS, f"r{i + 1}", "op", 1)))
        await asyncio.sleep(0)
    assert len(pool.calls) == 1
    release.set()
    await asyncio.gather(first, *later)
    assert len(pool.calls) == 2 and pool.calls[1][5] == ["r1", "r2", "r3", "r4"]


async def test_a_failed_insert_refuses_only_its_own_records() -> None:
    """A record arriving after a failed INSERT is written by the next one."""
    pool = _Pool(fail=True)
    writer = AuditWriter(pool, clock_s=lambda: 1.0)  # type: ignore[arg-type]
    with pytest.raises(Unavailable):
        await writer.record(CLAIMS, "r", "create_accounts", 1)
    pool.fail = False
    assert await writer.record(CLAIMS, "r2", "create_accounts", 1) > 0


async def test_the_writer_vouches_only_for_records_it_wrote_and_remembers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``wrote`` is true for a record once its INSERT ran, never for one that failed or
    another writer's, and only for the newest ``RECENT_MAX``."""
    import actors.edge.audit as audit

    monkeypatch.setattr(audit, "RECENT_MAX", 3)
    writer = AuditWriter(_Pool(), clock_s=lambda: 1.0)  # type: ignore[arg-type]
    ids = [await writer.record(CLAIMS, f"r{i}", "payments.authorize", 1) for i in range(4)]
    assert [writer.wrote(i) for i in ids] == [False, True, True, True]
    failing = AuditWriter(_Pool(fail=True), clock_s=lambda: 1.0)  # type: ignore[arg-type]
    with pytest.raises(Unavailable):
        await failing.record(CLAIMS, "r", "payments.authorize", 1)
    assert not failing.wrote(ids[-1])
    assert failing._recent == {}


async def test_a_record_handed_to_payments_is_not_written_here_and_is_vouched_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``delegate`` writes nothing; its record says who sent the request, and its id counts
    as written (the payments actor writes it before anything can be posted with it), among
    the same newest ``RECENT_MAX`` as the records written here."""
    import actors.edge.audit as audit

    monkeypatch.setattr(audit, "RECENT_MAX", 2)
    pool = _Pool()
    writer = AuditWriter(pool, clock_s=lambda: 5.5)  # type: ignore[arg-type]
    origin, header = writer.delegate(CLAIMS, "req-9", "payments.authorize", 1)
    assert pool.calls == []
    handed = decode_header(header)
    assert handed.id == origin
    assert (handed.tenant, handed.tenant_name, handed.subject, handed.token_id,
            handed.request_id, handed.operation, handed.items, handed.at_s) == (
        CLAIMS.tenant_slot, "t", "s", "j", "req-9", "payments.authorize", 1, 5.5)
    assert handed.id > 0 and writer.wrote(handed.id)
    written = await writer.record(CLAIMS, "r", "create_transfers", 1)
    later, _ = writer.delegate(CLAIMS, "req-10", "payments.authorize", 1)
    assert [writer.wrote(i) for i in (handed.id, written, later)] == [False, True, True]
