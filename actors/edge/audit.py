"""Audit records: who made each change, written before the change is applied.

Every state-changing request an edge accepts (creating accounts or transfers, every
payments operation) first gets an audit record in ``audit_requests`` (migration 0012): the
caller's tenant, subject and token id, the request id and the operation. Its id, the
request's *origin*, is stamped on every account and transfer the request creates
(``Account.origin``, ``Transfer.origin``), so "who made this?" is one join away
(docs/security.md, "Audit"). The record of a payments request that claims an
Idempotency-Key is made here but written by the payments actor, with the request's first
statement (``delegate``; processor/request_audit.py).

Records arriving together are written as one INSERT (those of one event-loop pass, and
while an INSERT is in flight, all that arrive meanwhile: one in flight at a time, so the
busier the edge the larger each INSERT, with no added wait when it is quiet), on a pool whose
sessions run with ``synchronous_commit = off``: the edge waits for the INSERT, so its commit
record precedes in the WAL that of any row naming it, and PostgreSQL flushes the WAL in
order; when such a row is durable, so is its record (on one server: docs/security.md says
what changes with several). A record that cannot be written fails the request as
``unavailable`` before anything of it is applied, so no change goes unrecorded.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from actors.database import keep_session, keeping_pool
from actors.ops.audit_events import list_audit_events
from processor.audit import AuditEventsPage, AuditQuery
from processor.errors import Unavailable
from processor.identity import Claims
from processor.request_audit import RequestRecord, encode_header

__all__ = ["AuditWriter", "request_id_of"]

log = logging.getLogger(__name__)

_INSERT = """
INSERT INTO audit_requests (id, tenant, tenant_name, subject, token_id, request_id,
                            operation, items, at)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::int[], $9::timestamptz[])
"""
_REQUEST_ID_CHARS_MAX = 128
# How many of its newest records a writer remembers having written (``wrote``): an
# authorization's posting follows its request by milliseconds; a step the recovery worker
# finishes minutes later may find its record forgotten, and then gets one of its own.
RECENT_MAX = 50_000
_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def request_id_of(header: str | None) -> str:
    """A client's X-Request-Id as recorded: printable ASCII, at most 128 characters; anything
    else is replaced by a fresh id (recorded, never refused)."""
    if header and len(header) <= _REQUEST_ID_CHARS_MAX and header.isascii() \
            and header.isprintable():
        return header
    return secrets.token_hex(16)


@dataclass(slots=True)
class _Pending:
    id: int
    claims: Claims
    request_id: str
    operation: str
    items: int
    at: dt.datetime


class AuditWriter:
    """Writes audit records in small batches; ``record`` answers the record's id."""

    def __init__(self, pool: asyncpg.Pool, *, clock_s: Callable[[], float]) -> None:
        self._pool = pool
        self._clock_s = clock_s
        self._pending: list[tuple[_Pending, asyncio.Future[None]]] = []
        # A flush is scheduled or running; records arriving meanwhile join its next INSERT.
        self._flushing = False
        # Ids of the newest records written, oldest first (a dict keeps insertion order).
        self._recent: dict[int, None] = {}

    @classmethod
    async def connect(cls, url: str, *, connect_timeout_s: float, command_timeout_s: float,
                      clock_s: Callable[[], float]) -> AuditWriter:
        pool = await keeping_pool(
            url, min_size=1, max_size=2, timeout=connect_timeout_s,
            command_timeout=command_timeout_s,
            # See the module docstring: ordered by the WAL before the rows that name it.
            server_settings={"synchronous_commit": "off", "application_name": "txproc-audit"},
            reset=keep_session)
        return cls(pool, clock_s=clock_s)

    async def close(self) -> None:
        await self._pool.close()

    async def events(self, query: AuditQuery, *, tenant_slot: int | None) -> AuditEventsPage:
        """A page of the audit events (``GET /v1/audit-events``; actors/ops/audit_events.py),
        of ``tenant_slot`` only or, for None, every one. Raises ``Unavailable`` when the
        database cannot answer."""
        try:
            return await list_audit_events(self._pool, query, tenant_slot=tenant_slot)
        except _ERRORS as exc:
            raise Unavailable("the audit events cannot be read now",
                              retry_after_s=1.0) from exc

    async def record(self, claims: Claims, request_id: str, operation: str,
                     items: int) -> int:
        """Write a record of this request; its id (the origin to stamp). Raises
        ``Unavailable`` if it cannot be written (nothing of the request may then be
        applied)."""
        entry = _Pending(secrets.randbits(63) or 1, claims, request_id, operation, items,
                         dt.datetime.fromtimestamp(self._clock_s(), tz=dt.UTC))
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((entry, done))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(lambda: loop.create_task(self._flush()))
        await done
        return entry.id

    def delegate(self, claims: Claims, request_id: str, operation: str,
                 items: int) -> tuple[int, str]:
        """A record of this request for the payments actor to write with its first write
        (processor/request_audit.py), not written here: its id (the request's origin) and
        the ``AUDIT_HEADER`` value that hands it over. The id counts as written
        (``wrote``): the payments actor writes it in the statement that creates what could
        name it, so no posting can name it before it is durable."""
        record = RequestRecord(
            id=secrets.randbits(63) or 1, tenant=claims.tenant_slot, tenant_name=claims.tenant,
            subject=claims.subject, token_id=claims.token_id, request_id=request_id,
            operation=operation, items=items, at_s=self._clock_s())
        self._remember([record.id])
        return record.id, encode_header(record)

    async def _flush(self) -> None:
        """Write what is pending, then what arrived while that was written, until nothing
        is left."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._write(batch)
        finally:
            self._flushing = False

    async def _write(self, batch: list[tuple[_Pending, asyncio.Future[None]]]) -> None:
        rows = [e for e, _ in batch]
        try:
            await self._pool.execute(
                _INSERT, [e.id for e in rows], [e.claims.tenant_slot for e in rows],
                [e.claims.tenant for e in rows], [e.claims.subject for e in rows],
                [e.claims.token_id for e in rows], [e.request_id for e in rows],
                [e.operation for e in rows], [e.items for e in rows], [e.at for e in rows])
        except _ERRORS as exc:
            log.warning("audit records not written (%d requests refused): %r", len(rows), exc)
            error = Unavailable("the audit record could not be written; nothing was applied",
                                retry_after_s=1.0)
            for _, done in batch:
                if not done.done():
                    done.set_exception(error)
            return
        self._remember([e.id for e in rows])
        for _, done in batch:
            if not done.done():
                done.set_result(None)

    def _remember(self, ids: list[int]) -> None:
        recent = self._recent
        for record_id in ids:
            recent[record_id] = None
        while len(recent) > RECENT_MAX:
            del recent[next(iter(recent))]

    def wrote(self, record_id: int) -> bool:
        """Whether this writer wrote record ``record_id``, or handed it to the payments
        actor (``delegate``), among its ``RECENT_MAX`` newest: its INSERT has then run, or
        runs before anything the payments actor posts with it, so its commit precedes in
        the WAL that of any row stamped with it."""
        return record_id in self._recent


# What made a ledger row or a payment's steps: its audit records (``txproc audit``).
_WHO_MADE = {
    "account": "SELECT a.*, x.id::text AS object FROM accounts x "
               "JOIN audit_requests a ON a.id = x.origin WHERE x.id = $1::text::bigint",
    "transfer": "SELECT a.*, x.id::text AS object FROM transfers x "
                "JOIN audit_requests a ON a.id = x.origin WHERE x.id = $1::text::bigint",
    "payment": "SELECT a.*, s.id::text || ' ' || s.kind AS object FROM payment_steps s "
               "JOIN audit_requests a ON a.id = s.origin WHERE s.subject_id = $1 "
               "ORDER BY s.id",
}


# A ledger row kept in a further database (docs/design.md §12): its origin there, its
# record in the main database's audit_requests.
_ORIGIN_OF = {
    "account": "SELECT origin, id::text AS object FROM accounts WHERE id = $1::text::bigint",
    "transfer": "SELECT origin, id::text AS object FROM transfers WHERE id = $1::text::bigint",
}
_RECORD_SQL = "SELECT a.*, $2::text AS object FROM audit_requests a WHERE a.id = $1"


async def who_made(conn: asyncpg.Connection, kind: str, object_id: str,
                   ledgers: Sequence[asyncpg.Connection] = ()) -> list[dict[str, str]]:
    """The audit records of an account or transfer (by id) or of the steps of a payment or
    payout (by its id), oldest first: what ``txproc audit`` prints. ``kind`` is one of
    account, transfer, payment (payouts are payments here). ``conn`` is the main
    database's; ``ledgers`` the further databases' of a ledger over several, asked for an
    account or transfer the main one does not hold (its record is in main's)."""
    if kind in ("account", "transfer") and not object_id.isdigit():
        raise ValueError(f"a {kind} id is a number, got {object_id!r}")
    rows = list(await conn.fetch(_WHO_MADE[kind], object_id))
    if kind in _ORIGIN_OF:
        for ledger in ledgers:
            for made in await ledger.fetch(_ORIGIN_OF[kind], object_id):
                rows += await conn.fetch(_RECORD_SQL, made["origin"], made["object"])
    return [{k: str(v) for k, v in row.items()} for row in rows]
