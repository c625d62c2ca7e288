"""Settlement reconciliation runs: fetch a provider's report, match it, post its fees,
store what was found (migration 0023, docs/reconciliation.md).

The matching is pure (``processor.payments.reconcile``); this module does the I/O around
it, in the payments actor:

1. the report of (provider, date) is fetched over the provider's API with the adapter's
   ``build_settlement`` (authenticated as the provider wants) and read by its
   ``parse_report``;
2. the provider's capture, refund and payout steps of the days around it are read, each
   with the date of the report that matched it before (``reconciliation_matches``);
3. the fees of the matched lines are posted to the ledger through the same
   ``LedgerService`` the engine uses: fee account -> clearing account, with ids derived
   from the step, so a repeated run is answered ``exists`` and posts nothing twice;
4. the run, its new exceptions, the exceptions it closes (a late settlement matched, a
   discrepancy gone on a repeated run), the matches and the fees are written in one
   transaction, every table append-only.

Runs of one (provider, date) take turns (a lock per pair here, an advisory lock in the
database); a repeated run is a new *attempt* that finds the same exceptions again rather
than adding them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import logging
import ssl
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import aiohttp
import asyncpg
import msgspec
import yarl

from actors.lease import Fence, LeaseLost
from actors.ops import metrics
from actors.ops.audit_events import actor_of_origin, record_audit_event
from actors.payments.store import Where
from adapters.base import Adapter
from processor.codes import AccountResult, TransferResult
from processor.errors import LedgerError, TxprocError, register, statuses
from processor.payments import (
    Operation,
    PaymentsConfig,
    Reconciliation,
    Record,
    SettlementReport,
    fee_account_id,
    reconcile,
    record_window,
)
from processor.service import LedgerService
from processor.types import Account, Transfer

__all__ = [
    "EXCEPTIONS_PAGE_MAX",
    "RECONCILIATION_ERROR_STATUS",
    "RECONCILIATION_OPERATIONS",
    "RUNS_PAGE_MAX",
    "ExceptionView",
    "ExceptionsPage",
    "Reconciler",
    "ReconciliationRefused",
    "ResolveRequest",
    "RunRequest",
    "RunView",
    "RunsPage",
    "cli_principal",
    "serve_operation",
]

log = logging.getLogger("txproc.reconciliation")

REPORT_BYTES_MAX = 64 * 1024 * 1024
FETCH_TIMEOUT_S = 30.0
RUNS_PAGE_MAX = 100
EXCEPTIONS_PAGE_MAX = 500
# The exceptions shown with one run (its day's); the rest through the exceptions list.
RUN_EXCEPTIONS_MAX = 1_000
# A run of the scheduler looks this many days back for days not yet reconciled.
CATCH_UP_DAYS = 7
ERROR_CHARS_MAX = 300
RESOLVER = "reconciliation"  # who closes an exception a run closed
# The part of a resolution's note its audit event repeats (an event holds at most 4 KiB).
AUDIT_NOTE_CHARS_MAX = 500

Date = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}$")]
ProviderName = Annotated[str, msgspec.Meta(pattern="^[a-z][a-z0-9_]{0,31}$")]


class ReconciliationRefused(TxprocError):
    """A reconciliation request refused; ``code`` is stable (RECONCILIATION_ERROR_STATUS)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


register(404, {
    "reconciliation_run_not_found": "no reconciliation run has this id",
    "reconciliation_exception_not_found": "no reconciliation exception has this id",
})
register(409, {"exception_already_resolved": "the exception's resolution is already recorded"})
register(422, {"date_in_future": "the day to reconcile is after tomorrow"})
# Every code a reconciliation request can be refused with; the statuses are the registry's.
RECONCILIATION_ERROR_STATUS = statuses((
    "invalid_body", "malformed_json", "invalid_query",
    "provider_unknown", "date_in_future",
    "reconciliation_run_not_found", "reconciliation_exception_not_found",
    "exception_already_resolved",
))


class RunRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/reconciliation/runs``: reconcile this provider's report of this day."""

    provider: ProviderName
    date: Date


class ResolveRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/reconciliation/exceptions/{id}/resolve``."""

    resolution: Annotated[str, msgspec.Meta(pattern="^[a-z][a-z_]{0,39}$")]
    note: Annotated[str, msgspec.Meta(max_length=2_000)] = ""


class RunsQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    provider: ProviderName | None = None
    date: Date | None = None
    status: Literal["succeeded", "failed"] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=RUNS_PAGE_MAX)] = 20
    cursor: Annotated[str, msgspec.Meta(pattern=r"^\d{1,19}$")] | None = None


class ExceptionsQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    status: Literal["open", "resolved"] | None = None
    provider: ProviderName | None = None
    kind: Annotated[str, msgspec.Meta(pattern="^[a-z_]{1,40}$")] | None = None
    date: Date | None = None
    run_id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=EXCEPTIONS_PAGE_MAX)] = 100
    cursor: Annotated[str, msgspec.Meta(pattern=r"^\d{1,19}$")] | None = None


class ResolutionView(msgspec.Struct, frozen=True, kw_only=True):
    resolution: str
    note: str
    resolved_by: str
    resolved_at: str
    run_id: int | None = None  # the run that closed it (a late match, a re-run)


class ExceptionView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    provider: str
    date: str
    kind: str
    status: str  # open, resolved
    amount: int
    currency: str
    expected: dict[str, Any] | None
    found: dict[str, Any] | None
    step_id: int
    subject_id: str
    transfer_id: int
    provider_ref: str
    run_id: int
    created_at: str
    resolution: ResolutionView | None = None


class RunView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    provider: str
    date: str
    attempt: int
    status: str  # succeeded, failed
    error: str
    lines: int
    matched_count: int
    unmatched_count: int
    closed_count: int
    fees_posted: int
    totals: dict[str, Any]
    requested_by: str
    started_at: str
    finished_at: str
    # The day's exceptions (open and resolved), shown with one run; absent in lists.
    exceptions: list[ExceptionView] | None = None


class RunsPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[RunView]
    next_cursor: str | None


class ExceptionsPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[ExceptionView]
    next_cursor: str | None


RECONCILIATION_OPERATIONS: dict[str, str] = {
    "create_reconciliation_run": "reconciliation:write",
    "list_reconciliation_runs": "reconciliation:read",
    "get_reconciliation_run": "reconciliation:read",
    "list_reconciliation_exceptions": "reconciliation:read",
    "resolve_reconciliation_exception": "reconciliation:write",
}

_ENCODER = msgspec.json.Encoder()
_RUN_REQUEST = msgspec.json.Decoder(RunRequest)
_RESOLVE_REQUEST = msgspec.json.Decoder(ResolveRequest)
_RUNS_QUERY = msgspec.json.Decoder(RunsQuery)
_EXCEPTIONS_QUERY = msgspec.json.Decoder(ExceptionsQuery)
_FINAL_MONEY = {"succeeded"}


def cli_principal() -> str:
    """Who a command-line request is recorded as: ``cli:<OS user>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes, code: str = "invalid_body") -> Any:
    try:
        return decoder.decode(body or b"{}")
    except msgspec.ValidationError as exc:
        raise ReconciliationRefused(code, str(exc)[:ERROR_CHARS_MAX]) from exc
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ReconciliationRefused("malformed_json" if code == "invalid_body" else code,
                                    "the body is not JSON") from exc


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat()


def _today(clock_s: Callable[[], float]) -> dt.date:
    return dt.datetime.fromtimestamp(clock_s(), dt.UTC).date()


# --- reading our records ------------------------------------------------------------------------

_RECORDS_SQL = """
SELECT s.id, s.subject_id, s.kind, s.phase, s.amount, s.currency, s.provider_key,
       s.provider_ref, s.auth_ref, s.transfer_id,
       (s.updated_at AT TIME ZONE 'UTC')::date AS expected_on,
       m.settled_on AS matched_on, mu.settled_on AS undo_matched_on
FROM payment_steps s
LEFT JOIN reconciliation_matches m ON m.provider = s.provider AND m.record_key = s.id::text
LEFT JOIN reconciliation_matches mu
       ON mu.provider = s.provider AND mu.record_key = s.id::text || '-undo'
WHERE s.provider = $1 AND s.kind IN ('capture', 'refund', 'payout')
  AND s.updated_at >= $2 AND s.updated_at < $3
ORDER BY s.id
"""
_OPERATIONS = {"capture": Operation.CAPTURE, "refund": Operation.REFUND,
               "payout": Operation.PAYOUT}


def records_of(rows: Sequence[Mapping[str, Any]]) -> list[Record]:
    """The records a report should match, from step rows (``_RECORDS_SQL``).

    A capture or refund or payout that succeeded moved money at the provider; one that
    failed did not; one still running may have. A compensated capture moved money twice:
    the capture, and its undo (a refund with the key ``<key>-undo``), neither in our
    ledger.
    """
    records = []
    for row in rows:
        phase, kind = row["phase"], row["kind"]
        compensated = phase == "compensated" and kind == "capture"
        settled = phase in _FINAL_MONEY or compensated
        posted = phase == "succeeded"
        transfer_id = 0 if not posted else row["transfer_id"] + (0 if kind == "capture" else 1)
        common = {"subject_id": row["subject_id"], "amount": row["amount"],
                  "currency": row["currency"], "expected_on": row["expected_on"].isoformat(),
                  "phase": phase, "settled": settled}
        records.append(Record(
            key=str(row["id"]), step_id=row["id"], operation=_OPERATIONS[kind],
            provider_key=row["provider_key"],
            provider_ref=row["provider_ref"] or row["auth_ref"], transfer_id=transfer_id,
            matched_on=row["matched_on"].isoformat() if row["matched_on"] else "", **common))
        if compensated:
            undo = row["undo_matched_on"]
            records.append(Record(
                key=f"{row['id']}-undo", step_id=row["id"], operation=Operation.REFUND,
                provider_key=f"{row['provider_key']}-undo", provider_ref="",
                matched_on=undo.isoformat() if undo else "", **common))
    return records


# --- the executor -------------------------------------------------------------------------------


class Reconciler:
    """Runs reconciliations for the payments actor (and the scheduler in it)."""

    def __init__(self, *, pool: asyncpg.Pool, ledger: LedgerService,
                 adapters: Mapping[str, Adapter], base_urls: Mapping[str, str],
                 config: PaymentsConfig, clock_s: Callable[[], float] = time.time,
                 tls: ssl.SSLContext | None = None) -> None:
        self._pool = pool
        self._ledger = ledger
        self._adapters = dict(adapters)
        self._base_urls = {name: url.rstrip("/") for name, url in base_urls.items()}
        self._config = config
        self._clock_s = clock_s
        self._tls = tls
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    @property
    def providers(self) -> list[str]:
        return sorted(self._adapters)

    async def open_fee_accounts(self) -> None:
        """Create every provider's fee account per currency (repeats are ``exists``)."""
        accounts = [Account(id=fee_account_id(self._config, name, currency), currency=currency)
                    for name in self.providers
                    for currency in sorted(self._adapters[name].currencies)]
        results = await self._ledger.create_accounts(accounts)
        bad = [r for r in results if r not in (AccountResult.ok, AccountResult.exists)]
        if bad:
            raise RuntimeError(f"fee accounts refused: {sorted({r.name for r in bad})}")

    # -- one run -------------------------------------------------------------------------------

    async def run(self, provider: str, date: str, *, requested_by: str,
                  fence: Fence | None = None) -> RunView:
        """Reconcile ``provider``'s report of ``date`` now and answer the run (which may
        have failed: the report could not be fetched or read, or the ledger was away).

        The scheduler passes the ``fence`` of the lease it runs under: the run is stored
        only if that lease is still its own (``actors.lease``). Raises
        ``ReconciliationRefused`` for an unknown provider or a day not begun, ``LeaseLost``
        when the fence is stale (nothing of the run is stored).
        """
        if provider not in self._adapters:
            raise ReconciliationRefused("provider_unknown", "no provider has this name")
        try:
            day = dt.date.fromisoformat(date)
        except ValueError as exc:
            raise ReconciliationRefused("invalid_body", "date is not a day") from exc
        # A provider ahead of UTC may have published tomorrow's report already; later
        # days have nothing settled. A run of a day not over is partial: the schedule
        # runs the day again once it is over (``days_to_run``).
        if day > _today(self._clock_s) + dt.timedelta(days=1):
            raise ReconciliationRefused("date_in_future",
                                        "a day after tomorrow has nothing settled yet")
        lock = self._locks.setdefault((provider, date), asyncio.Lock())
        async with lock:
            started_s, started = time.perf_counter(), dt.datetime.now(dt.UTC)
            status = "failed"
            try:
                run_id = await self._run(provider, date, requested_by, started, fence)
                status = "succeeded"
            except _RunFailed as failed:
                run_id = await self._store_failure(provider, date, requested_by, started,
                                                   str(failed), fence)
            finally:
                metrics.RECONCILIATION_RUN_SECONDS.labels(provider, status).observe(
                    time.perf_counter() - started_s)
                metrics.RECONCILIATION_RUNS.labels(provider, status).inc()
        view = await self.get_run(run_id)
        await self.refresh_metrics()
        return view

    async def _run(self, provider: str, date: str, requested_by: str,
                   started: dt.datetime, fence: Fence | None) -> int:
        report = await self._fetch(provider, date)
        first, last = record_window(date)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                _RECORDS_SQL, provider,
                dt.datetime.combine(dt.date.fromisoformat(first), dt.time(), dt.UTC),
                dt.datetime.combine(dt.date.fromisoformat(last) + dt.timedelta(days=1),
                                    dt.time(), dt.UTC))
        result = reconcile(provider, date, report, records_of(rows), self._config)
        posted = await self._post_fees(result)
        return await self._store(provider, date, requested_by, started, report, result, posted,
                                 fence)

    async def _fetch(self, provider: str, date: str) -> SettlementReport:
        adapter = self._adapters[provider]
        call = adapter.build_settlement(date, self._clock_s())
        url = yarl.URL(self._base_urls[provider] + call.path, encoded=True)
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(
                    timeout=timeout,
                    connector=aiohttp.TCPConnector(ssl=self._tls or True)) as session, \
                    session.request(call.method, url, headers=call.headers) as answer:
                body = await answer.content.read(REPORT_BYTES_MAX + 1)
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _RunFailed(f"report_unavailable: {type(exc).__name__}") from exc
        if status != 200:
            raise _RunFailed(f"report_unavailable: the provider answered {status}")
        if len(body) > REPORT_BYTES_MAX:
            raise _RunFailed("report_unreadable: larger than the limit")
        try:
            return adapter.parse_report(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _RunFailed(f"report_unreadable: {str(exc)[:200]}") from exc

    async def _post_fees(self, result: Reconciliation) -> set[int]:
        """Post the fees; answers the transfer ids the ledger holds now (posted or there
        already). A refusal is logged and the fee left out (the next run tries again)."""
        if not result.fees:
            return set()
        transfers = [Transfer(id=f.transfer_id, debit_account_id=f.debit_account_id,
                              credit_account_id=f.credit_account_id, amount=f.amount,
                              currency=f.currency) for f in result.fees]
        try:
            answers = await self._ledger.create_transfers(transfers)
        except LedgerError as exc:
            raise _RunFailed(f"ledger_unavailable: {type(exc).__name__}") from exc
        posted = set()
        for fee, answer in zip(result.fees, answers, strict=True):
            if answer in (TransferResult.ok, TransferResult.exists):
                posted.add(fee.transfer_id)
            else:
                log.error("the ledger refused the fee of record %s: %s", fee.record_key,
                          answer.name)
        return posted

    async def _store(self, provider: str, date: str, requested_by: str,
                     started: dt.datetime, report: SettlementReport, result: Reconciliation,
                     posted: set[int], fence: Fence | None) -> int:
        day = dt.date.fromisoformat(date)
        keys = {d.key for d in result.discrepancies}
        late_keys = [f"missing:{key}" for key in result.late]
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_CLASS,
                               zlib.crc32(f"{provider}/{date}".encode()) - 2**31)
            if fence is not None:
                await fence.check(conn)  # a stale scheduler stores no run (actors.lease)
            attempt = await conn.fetchval(
                "SELECT coalesce(max(attempt), 0) + 1 FROM reconciliation_runs"
                " WHERE provider = $1 AND settled_on = $2", provider, day)
            known = await conn.fetch(
                "SELECT e.id, e.key FROM reconciliation_exceptions e"
                " LEFT JOIN reconciliation_resolutions r ON r.exception_id = e.id"
                " WHERE e.provider = $1 AND e.settled_on = $2 AND r.exception_id IS NULL",
                provider, day)
            cleared = [row["id"] for row in known if row["key"] not in keys]
            settled_late = [row["id"] for row in await conn.fetch(
                "SELECT e.id FROM reconciliation_exceptions e"
                " LEFT JOIN reconciliation_resolutions r ON r.exception_id = e.id"
                " WHERE e.provider = $1 AND e.key = ANY($2::text[]) AND e.settled_on < $3"
                " AND r.exception_id IS NULL", provider, late_keys, day)]
            totals = {c: msgspec.to_builtins(t) for c, t in sorted(result.totals.items())}
            run_id: int = await conn.fetchval(
                "INSERT INTO reconciliation_runs (provider, settled_on, attempt, status,"
                " lines, matched_count, unmatched_count, totals, closed_count, fees_posted,"
                " requested_by, started_at, finished_at)"
                " VALUES ($1, $2, $3, 'succeeded', $4, $5, $6, $7::jsonb, $8, $9, $10, $11,"
                " now()) RETURNING id",
                provider, day, attempt, len(report.lines) + len(report.fees),
                result.matched_count, result.unmatched_count, _ENCODER.encode(totals).decode(),
                len(cleared) + len(settled_late), len(posted), requested_by, started)
            await conn.executemany(
                "INSERT INTO reconciliation_exceptions (provider, settled_on, kind, key, amount,"
                " currency, expected, found, step_id, subject_id, transfer_id, provider_ref,"
                " run_id) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9, $10, $11,"
                " $12, $13) ON CONFLICT (provider, settled_on, key) DO NOTHING",
                [(provider, day, d.kind.value, d.key, d.amount, d.currency,
                  None if d.expected is None else _ENCODER.encode(d.expected).decode(),
                  None if d.found is None else _ENCODER.encode(d.found).decode(),
                  d.step_id, d.subject_id, d.transfer_id, d.provider_ref, run_id)
                 for d in result.discrepancies])
            await conn.executemany(
                "INSERT INTO reconciliation_resolutions (exception_id, resolution, note,"
                " resolved_by, run_id) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (exception_id) DO NOTHING",
                [(i, "cleared", "not found again by a later run of the same day", RESOLVER,
                  run_id) for i in cleared]
                + [(i, "settled_late", f"matched on the report of {date}", RESOLVER, run_id)
                   for i in settled_late])
            await conn.executemany(
                "INSERT INTO reconciliation_matches (provider, record_key, step_id, settled_on,"
                " run_id, late) VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (provider, record_key) DO NOTHING",
                [(provider, m.record_key, m.step_id, day, run_id, m.late)
                 for m in result.matches])
            await conn.executemany(
                "INSERT INTO reconciliation_fees (transfer_id, provider, settled_on, record_key,"
                " debit_account_id, credit_account_id, amount, currency, run_id)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                " ON CONFLICT (transfer_id) DO NOTHING",
                [(f.transfer_id, provider, day, f.record_key, f.debit_account_id,
                  f.credit_account_id, f.amount, f.currency, run_id)
                 for f in result.fees if f.transfer_id in posted])
        log.info("reconciled %s %s: %d lines, %d matched, %d exceptions, %d closed",
                 provider, date, len(report.lines) + len(report.fees), result.matched_count,
                 result.unmatched_count, len(cleared) + len(settled_late))
        return run_id

    async def _store_failure(self, provider: str, date: str, requested_by: str,
                             started: dt.datetime, error: str, fence: Fence | None) -> int:
        log.warning("reconciliation of %s %s failed: %s", provider, date, error)
        day = dt.date.fromisoformat(date)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_CLASS,
                               zlib.crc32(f"{provider}/{date}".encode()) - 2**31)
            if fence is not None:
                await fence.check(conn)  # a stale scheduler stores no run (actors.lease)
            run_id: int = await conn.fetchval(
                "INSERT INTO reconciliation_runs (provider, settled_on, attempt, status, error,"
                " requested_by, started_at, finished_at)"
                " SELECT $1, $2, coalesce(max(attempt), 0) + 1, 'failed', $3, $4, $5, now()"
                " FROM reconciliation_runs WHERE provider = $1 AND settled_on = $2"
                " RETURNING id", provider, day, error[:ERROR_CHARS_MAX], requested_by, started)
        return run_id

    # -- reading -------------------------------------------------------------------------------

    async def get_run(self, run_id: int) -> RunView:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM reconciliation_runs WHERE id = $1", run_id)
            if row is None:
                raise ReconciliationRefused("reconciliation_run_not_found",
                                            "no reconciliation run has this id")
            exceptions = await conn.fetch(
                _exceptions_sql("e.provider = $1 AND e.settled_on = $2", "$3"),
                row["provider"], row["settled_on"], RUN_EXCEPTIONS_MAX)
        return _run_view(row, [_exception_view(e) for e in exceptions])

    async def list_runs(self, body: bytes) -> RunsPage:
        query: RunsQuery = _decode(_RUNS_QUERY, body, "invalid_query")
        where = Where()
        where.add_if("provider = {}", query.provider)
        where.add_if("status = {}", query.status)
        where.add_if("settled_on = {}", None if query.date is None else _day(query.date))
        where.add_if("id < {}", None if query.cursor is None else int(query.cursor))
        limit = where.param(query.limit + 1)
        async with self._pool.acquire() as conn:
            # Fixed column names and placeholders only; the values are bound.
            sql = (f"SELECT * FROM reconciliation_runs WHERE {where.sql()}"  # noqa: S608
                   f" ORDER BY id DESC LIMIT {limit}")
            rows = await conn.fetch(sql, *where.args)
        page = [_run_view(r, None) for r in rows[:query.limit]]
        more = len(rows) > query.limit
        return RunsPage(data=page, next_cursor=str(page[-1].id) if more else None)

    async def list_exceptions(self, body: bytes) -> ExceptionsPage:
        query: ExceptionsQuery = _decode(_EXCEPTIONS_QUERY, body, "invalid_query")
        where = Where()
        where.add_if("e.provider = {}", query.provider)
        where.add_if("e.kind = {}", query.kind)
        where.add_if("e.run_id = {}", query.run_id)
        where.add_if("e.settled_on = {}", None if query.date is None else _day(query.date))
        if query.status is not None:
            where.add("r.exception_id IS NULL" if query.status == "open"
                      else "r.exception_id IS NOT NULL")
        where.add_if("e.id < {}", None if query.cursor is None else int(query.cursor))
        limit = where.param(query.limit + 1)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_exceptions_sql(where.sql(), limit, "DESC"), *where.args)
        page = [_exception_view(r) for r in rows[:query.limit]]
        more = len(rows) > query.limit
        return ExceptionsPage(data=page, next_cursor=str(page[-1].id) if more else None)

    async def resolve(self, exception_id: int, body: bytes, *, resolved_by: str,
                      origin: int = 0) -> ExceptionView:
        """Record an operator's resolution of an open exception (once), and with it, in
        the same transaction, a ``reconciliation_exception.resolved`` audit event of the
        API caller whose request's audit record is ``origin`` (actors/edge/audit.py)."""
        request: ResolveRequest = _decode(_RESOLVE_REQUEST, body)
        if "\0" in request.note or any(0xD800 <= ord(c) <= 0xDFFF for c in request.note):
            raise ReconciliationRefused("invalid_body",
                                        "the note holds U+0000 or a lone surrogate")
        async with self._pool.acquire() as conn, conn.transaction():
            exception = await conn.fetchrow(
                "SELECT provider, settled_on, kind, amount, currency"
                " FROM reconciliation_exceptions WHERE id = $1", exception_id)
            if exception is None:
                raise ReconciliationRefused("reconciliation_exception_not_found",
                                            "no reconciliation exception has this id")
            inserted = await conn.fetchval(
                "INSERT INTO reconciliation_resolutions (exception_id, resolution, note,"
                " resolved_by) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (exception_id) DO NOTHING RETURNING exception_id",
                exception_id, request.resolution, request.note, resolved_by)
            if inserted is None:
                raise ReconciliationRefused("exception_already_resolved",
                                            "this exception is resolved already")
            actor, request_id = await actor_of_origin(
                conn, origin, subject=resolved_by.partition("/")[2] or resolved_by)
            await record_audit_event(
                conn, actor=actor, action="reconciliation_exception.resolved",
                target_kind="reconciliation_exception", target_id=str(exception_id),
                tenant_slot=0, request_id=request_id, details={
                    "provider": exception["provider"],
                    "date": exception["settled_on"].isoformat(), "kind": exception["kind"],
                    "amount": exception["amount"], "currency": exception["currency"],
                    "resolution": request.resolution,
                    "note": request.note[:AUDIT_NOTE_CHARS_MAX]})
            row = await conn.fetchrow(_exceptions_sql("e.id = $1", "1"), exception_id)
        await self.refresh_metrics()
        return _exception_view(row)

    # -- schedule and metrics ------------------------------------------------------------------

    async def days_to_run(self, provider: str) -> list[str]:
        """The days from ``CATCH_UP_DAYS`` ago to yesterday without a succeeded run that
        started after the day was over (a run during the day saw part of it)."""
        today = _today(self._clock_s)
        first = today - dt.timedelta(days=CATCH_UP_DAYS)
        async with self._pool.acquire() as conn:
            done = {row["settled_on"] for row in await conn.fetch(
                "SELECT DISTINCT settled_on FROM reconciliation_runs WHERE provider = $1"
                " AND status = 'succeeded' AND settled_on >= $2"
                " AND started_at >= (settled_on + 1)::timestamp AT TIME ZONE 'UTC'",
                provider, first)}
        days = [first + dt.timedelta(days=n) for n in range(CATCH_UP_DAYS)]
        return [day.isoformat() for day in days if day not in done]

    async def run_due(self, fence: Fence | None = None) -> int:
        """Run every provider's days not yet reconciled (oldest first); answers how many.
        ``fence``: the scheduler's lease (``run``)."""
        count = 0
        for provider in self.providers:
            for date in await self.days_to_run(provider):
                await self.run(provider, date, requested_by="schedule", fence=fence)
                count += 1
        return count

    async def run_schedule(self, every_s: float, stopping: asyncio.Event,
                           fence: Fence | None = None) -> None:
        """Catch up at start, then every ``every_s``: each day up to yesterday gets a run
        (a day whose run failed is tried again on the next round). ``fence``: the lease the
        schedule runs under (``run``)."""
        while not stopping.is_set():
            try:
                await self.run_due(fence)
            except (asyncio.CancelledError, LeaseLost):
                raise  # LeaseLost: another scheduler holds the lease; this one ends
            except Exception:
                log.exception("scheduled reconciliation failed; trying again next round")
            try:
                await asyncio.wait_for(stopping.wait(), timeout=every_s)
            except TimeoutError:
                pass

    async def refresh_metrics(self) -> None:
        """Lag per provider and the open exceptions, for the node's metrics."""
        for provider in self.providers:
            pending = await self.days_to_run(provider)
            lag_s = 0.0
            if pending:
                oldest_end = dt.datetime.combine(
                    dt.date.fromisoformat(pending[0]) + dt.timedelta(days=1), dt.time(), dt.UTC)
                lag_s = max(0.0, self._clock_s() - oldest_end.timestamp())
            metrics.RECONCILIATION_LAG_SECONDS.labels(provider).set(lag_s)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT e.provider, e.kind, e.currency, count(*) AS n, sum(e.amount) AS amount"
                " FROM reconciliation_exceptions e"
                " LEFT JOIN reconciliation_resolutions r ON r.exception_id = e.id"
                " WHERE r.exception_id IS NULL GROUP BY 1, 2, 3")
        counts: dict[tuple[str, str], int] = {}
        for provider in self.providers:
            for kind in _KINDS:
                counts[(provider, kind)] = 0
        for row in rows:
            key = (row["provider"], row["kind"])
            counts[key] = counts.get(key, 0) + row["n"]
            metrics.RECONCILIATION_OPEN_EXCEPTION_AMOUNT.labels(
                row["provider"], row["kind"], row["currency"]).set(int(row["amount"]))
        for (provider, kind), count in counts.items():
            metrics.RECONCILIATION_OPEN_EXCEPTIONS.labels(provider, kind).set(count)


class _RunFailed(Exception):
    """A run that could not reconcile (report or ledger away); recorded as failed."""


_LOCK_CLASS = 0x7265636F  # "reco": advisory locks of (provider, date) runs
_KINDS = ("missing", "amount_mismatch", "currency_mismatch", "unknown", "duplicate",
          "unexpected_fee", "status_mismatch", "batch_mismatch")


def _exceptions_sql(where: str, limit: str, order: str = "ASC") -> str:
    """Exceptions with their resolutions; ``where`` and ``limit`` bind their values."""
    # Fixed column names and placeholders only; the values are bound.
    head = ("SELECT e.*, r.resolution, r.note, r.resolved_by, r.resolved_at,"
            " r.run_id AS resolved_run_id FROM reconciliation_exceptions e"
            " LEFT JOIN reconciliation_resolutions r ON r.exception_id = e.id")
    return f"{head} WHERE {where} ORDER BY e.id {order} LIMIT {limit}"


def _day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise ReconciliationRefused("invalid_query", "date is not a day") from exc


def _json_field(value: Any) -> Any:
    if value is None:
        return None
    return msgspec.json.decode(value) if isinstance(value, str | bytes) else value


def _exception_view(row: Mapping[str, Any]) -> ExceptionView:
    resolution = None
    if row["resolution"] is not None:
        resolution = ResolutionView(resolution=row["resolution"], note=row["note"],
                                    resolved_by=row["resolved_by"],
                                    resolved_at=_iso(row["resolved_at"]),
                                    run_id=row["resolved_run_id"])
    return ExceptionView(
        id=row["id"], provider=row["provider"], date=row["settled_on"].isoformat(),
        kind=row["kind"], status="open" if resolution is None else "resolved",
        amount=row["amount"], currency=row["currency"],
        expected=_json_field(row["expected"]), found=_json_field(row["found"]),
        step_id=row["step_id"], subject_id=row["subject_id"], transfer_id=row["transfer_id"],
        provider_ref=row["provider_ref"], run_id=row["run_id"],
        created_at=_iso(row["created_at"]), resolution=resolution)


def _run_view(row: Mapping[str, Any], exceptions: list[ExceptionView] | None) -> RunView:
    return RunView(
        id=row["id"], provider=row["provider"], date=row["settled_on"].isoformat(),
        attempt=row["attempt"], status=row["status"], error=row["error"], lines=row["lines"],
        matched_count=row["matched_count"], unmatched_count=row["unmatched_count"],
        closed_count=row["closed_count"], fees_posted=row["fees_posted"],
        totals=_json_field(row["totals"]), requested_by=row["requested_by"],
        started_at=_iso(row["started_at"]), finished_at=_iso(row["finished_at"]),
        exceptions=exceptions)


async def serve_operation(reconciler: Reconciler | None, *, principal: str, operation: str,
                          subject_id: str, body: bytes, origin: int = 0) -> tuple[int, bytes]:
    """One reconciliation operation of the API (HTTP and RPC alike): (status, JSON body).
    ``origin`` is the request's audit record, whose caller a resolution's audit event
    names. Raises ``ReconciliationRefused`` for what it refuses."""
    if reconciler is None:
        raise ReconciliationRefused("provider_unknown", "reconciliation is not running here")
    if operation == "create_reconciliation_run":
        request: RunRequest = _decode(_RUN_REQUEST, body)
        view = await reconciler.run(request.provider, request.date, requested_by=principal)
        return 200, _ENCODER.encode(view)
    if operation == "list_reconciliation_runs":
        return 200, _ENCODER.encode(await reconciler.list_runs(body))
    if operation == "list_reconciliation_exceptions":
        return 200, _ENCODER.encode(await reconciler.list_exceptions(body))
    number = int(subject_id) if subject_id.isascii() and subject_id.isdigit() and (
        len(subject_id) <= 18) else 0
    if operation == "get_reconciliation_run":
        if number == 0:
            raise ReconciliationRefused("reconciliation_run_not_found",
                                        "no reconciliation run has this id")
        return 200, _ENCODER.encode(await reconciler.get_run(number))
    if number == 0:
        raise ReconciliationRefused("reconciliation_exception_not_found",
                                    "no reconciliation exception has this id")
    view_ = await reconciler.resolve(number, body, resolved_by=principal, origin=origin)
    return 200, _ENCODER.encode(view_)


