"""``txproc archive`` and ``txproc restore``: closed months out of the database into Parquet
files and back (docs/design.md §16, "Archive and restore"; docs/operations.md).

``transfers`` is one unpartitioned table (§16 says why), so a month leaves it by DELETE,
under the session flag ``txproc.archive`` that the append-only triggers admit for this
alone (migration 0033) and that only the tables' owner can use (the service's role holds no
DELETE). The order of an archive:

1. In one REPEATABLE READ, READ ONLY snapshot: the boundary is the first instant of the
   month given; every shard's *cut* is its last chain link wholly below it, and the archive
   takes exactly the transfers and resolutions of each shard's links up to its cut (a link
   never straddles an archive: §15's chain stays checkable link by link). Refused unless
   the month is closed: every shard's position past the boundary (no row below it can
   still commit), every cut folded into the balance rows (a checkpoint past it), the
   history indexer past it, and every hold in the archive resolved inside it.
2. The rows go to one Parquet file per table and month (zstd), each file's rows hashed in
   the chain's canonical encoding as they are read; the files are read back and their
   digests, row counts and sha256 compared; the manifest (JSON) is written last.
3. One transaction with the flag set: the archive record (with the manifest's bytes and
   sha256), the balance checkpoint (each account's sums from the archived rows), the
   archived ids, then the DELETEs; the deleted counts and the checkpoint's sums must equal
   the manifest's, or it rolls back.

Nothing here runs on the commit path; shards go on committing beside it (every archived
row is committed, folded and below every shard's position, so no commit touches it).

A ledger over several databases (``archive_databases``, ``restore_databases``) has one
archive with a part per database, each exactly the above in its own database; every part
is exported before any deletes, and the deleting transactions commit one after another
only once all have done their work (docs/design.md §16, "Archive over several
databases").
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.lease import Fence, LeaseLost, hold
from actors.ledger.archived import active_archive
from actors.ledger.history import read_horizon
from processor.archive import (
    ARCHIVE_FORMAT,
    ArchiveBound,
    ArchiveFile,
    CurrencySums,
    Manifest,
    RetentionConfig,
    ShardCut,
    archive_name,
    decode_manifest,
    encode_manifest,
    month_of_ns,
    month_start_ns,
    retention_before,
)
from processor.history import format_rfc3339_ns
from processor.lease import LeaseConfig
from processor.ledger import (
    MAIN_DATABASE,
    SECTIONS,
    PartitionMap,
    SectionHasher,
    resolution_rows,
    transfer_rows,
)
from processor.types import TransferFlags, require

__all__ = ["LEASE_RETENTION", "ArchiveIncomplete", "ArchiveRefused", "ArchiveResult",
           "RestoreResult", "archive", "archive_databases", "archived_up_to", "restore",
           "restore_databases", "retain", "retention_loop"]

CONNECT_TIMEOUT_S = 10.0
STATEMENT_TIMEOUT_S = 3_600.0
CHUNK_ROWS = 50_000
MANIFEST_NAME = "manifest.json"
# One archive or restore at a time per database (pg_advisory_xact_lock's key).
_LOCK_KEY = 0x7478_6172_6368  # "txarch"
PARQUET_COMPRESSION = "zstd"

# The columns of each table, as stored and as written (every column the chain covers).
TRANSFER_FIELDS = (
    ("id", pa.int64()), ("debit_account_id", pa.int64()), ("credit_account_id", pa.int64()),
    ("amount", pa.int64()), ("currency", pa.string()), ("flags", pa.int32()),
    ("pending_id", pa.int64()), ("timeout_s", pa.int32()), ("code", pa.int32()),
    ("user_data", pa.string()), ("timestamp", pa.int64()), ("tenant", pa.int64()),
    ("origin", pa.int64()), ("partition", pa.int32()), ("local_legs", pa.int16()),
)
RESOLUTION_FIELDS = (
    ("pending_id", pa.int64()), ("kind", pa.int16()), ("transfer_id", pa.int64()),
    ("timestamp", pa.int64()),
)
_SCHEMAS = {"transfers": pa.schema(list(TRANSFER_FIELDS)),
            "pending_resolutions": pa.schema(list(RESOLUTION_FIELDS))}


class ArchiveRefused(Exception):
    """The archive or restore cannot be done as asked; the message says why and what to do.
    Nothing was deleted or inserted."""


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    name: str
    directory: Path
    manifest: Manifest
    seconds: float
    # Seconds per step: plan (the checks), export, read_back, delete (the transaction).
    steps_s: dict[str, float]


@dataclass(frozen=True, slots=True)
class RestoreResult:
    name: str
    transfers: int
    resolutions: int
    seconds: float
    database: str = MAIN_DATABASE  # whose rows they were (the manifest's key)


_PENDING = int(TransferFlags.PENDING)
_POST = int(TransferFlags.POST_PENDING)
_VOID = int(TransferFlags.VOID_PENDING)


def posted_mask(flags: np.ndarray) -> np.ndarray:
    """Which transfers count their amount as posted: plain ones and posts (a pending
    transfer counts as pending until resolved, a void posts nothing)."""
    posted: np.ndarray = ((flags & (_PENDING | _POST | _VOID)) == 0) | ((flags & _POST) != 0)
    return posted


# The digest of a file's rows: the chain's own canonical encoding (processor/ledger/chain.py),
# so a row that differs in any column hashes differently.


def transfers_digest(columns: dict[str, np.ndarray | list[str]],
                     hasher: SectionHasher | None = None) -> SectionHasher:
    """Feed transfers (a dict of the table's columns; ``currency`` as ``S3``,
    ``user_data`` a list of str) into ``hasher`` (a new one if None), in the order given."""
    hasher = hasher or SectionHasher(SECTIONS[0])
    ints = {k: np.asarray(v, dtype=np.int64) for k, v in columns.items()
            if k not in ("currency", "user_data")}
    user_data = list(columns["user_data"])
    hasher.update(transfer_rows(
        currency=np.asarray(columns["currency"], dtype="S3"),
        user_data=user_data if any(user_data) else None, **ints))
    return hasher


def resolutions_digest(columns: dict[str, np.ndarray],
                       hasher: SectionHasher | None = None) -> SectionHasher:
    """Feed pending resolutions into ``hasher`` (a new one if None), in the order given."""
    hasher = hasher or SectionHasher(SECTIONS[3])
    hasher.update(resolution_rows(**{k: np.asarray(v, dtype=np.int64)
                                     for k, v in columns.items()}))
    return hasher



# -- the archived set ------------------------------------------------------------------------

# The shards' cuts as (partition, cut) pairs: $1 partitions, $2 their shard's cut, $3 the
# greatest cut (a bound the timestamp's BRIN narrows the scan with).
_CUTS = "unnest($1::int[], $2::bigint[]) AS c(partition, cut)"
_TRANSFER_COLUMNS = ", ".join(f't."{name}"' for name, _ in TRANSFER_FIELDS)
_ARCHIVED_TRANSFERS = (f"FROM transfers t JOIN {_CUTS} ON c.partition = t.partition "
                       'WHERE t."timestamp" <= c.cut AND t."timestamp" <= $3')
_ARCHIVED_RESOLUTIONS = (f"FROM pending_resolutions r JOIN transfers p ON p.id = r.pending_id "
                         f"JOIN {_CUTS} ON c.partition = p.partition "
                         'WHERE r."timestamp" <= c.cut AND r."timestamp" <= $3')
_TRANSFERS_SQL = (f"SELECT {_TRANSFER_COLUMNS} {_ARCHIVED_TRANSFERS} "
                  'ORDER BY t."timestamp", t.id')
_RESOLUTIONS_SQL = ('SELECT r.pending_id, r.kind, r.transfer_id, r."timestamp" '
                    f'{_ARCHIVED_RESOLUTIONS} ORDER BY r."timestamp", r.pending_id')
# A hold in the archive whose resolution is not (still open, or resolved after its cut).
_OPEN_HOLD_SQL = (f"SELECT t.id {_ARCHIVED_TRANSFERS} AND (t.flags & 2) <> 0 "  # noqa: S608
                  "AND NOT EXISTS (SELECT 1 FROM pending_resolutions r "
                  'WHERE r.pending_id = t.id AND r."timestamp" <= c.cut) '
                  'ORDER BY t."timestamp" LIMIT 1')
# Each shard's last link wholly below the boundary ($1).
_CUT_LINKS_SQL = """
SELECT DISTINCT ON (shard) shard, seq, timestamp_max, digest FROM ledger_chain
WHERE timestamp_max < $1 ORDER BY shard, seq DESC
"""
# The balance checkpoint: each account's posted sums over the archived transfers (every
# hold in the archive is resolved inside it, so it holds nothing pending).
_CHECKPOINT_SQL = f"""
INSERT INTO archive_checkpoints (archive_id, account_id, debits_pending, debits_posted,
                                 credits_pending, credits_posted)
SELECT $4, account, 0, sum(d)::bigint, 0, sum(c)::bigint FROM (
    SELECT t.debit_account_id AS account, t.amount AS d, 0 AS c {_ARCHIVED_TRANSFERS}
      AND ((t.flags & 14) = 0 OR (t.flags & 4) <> 0)
    UNION ALL
    SELECT t.credit_account_id, 0, t.amount {_ARCHIVED_TRANSFERS}
      AND ((t.flags & 14) = 0 OR (t.flags & 4) <> 0)
) legs GROUP BY account
"""  # noqa: S608 - built from this module's constants only
# How many accounts the checkpoint will hold (those with a posted leg in the archive).
_ACCOUNTS_SQL = f"""
SELECT count(DISTINCT a) FROM (
    SELECT t.debit_account_id AS a {_ARCHIVED_TRANSFERS}
      AND ((t.flags & 14) = 0 OR (t.flags & 4) <> 0)
    UNION ALL
    SELECT t.credit_account_id {_ARCHIVED_TRANSFERS}
      AND ((t.flags & 14) = 0 OR (t.flags & 4) <> 0)) u
"""  # noqa: S608 - built from this module's constants only
_CHECKPOINT_SUMS_SQL = """
SELECT a.currency, sum(k.debits_posted)::numeric AS debits, sum(k.credits_posted)::numeric
       AS credits, count(*) AS accounts
FROM archive_checkpoints k JOIN accounts a ON a.id = k.account_id
WHERE k.archive_id = $1 GROUP BY a.currency
"""
_ARCHIVED_IDS_SQL = (f"INSERT INTO archived_transfer_ids (id, archive_id, tenant) "
                     f"SELECT t.id, $4, t.tenant {_ARCHIVED_TRANSFERS}")
_DELETE_RESOLUTIONS_SQL = (
    f"DELETE FROM pending_resolutions r USING transfers p, {_CUTS} "  # noqa: S608
    'WHERE p.id = r.pending_id AND c.partition = p.partition AND r."timestamp" <= c.cut '
    'AND r."timestamp" <= $3')
_DELETE_TRANSFERS_SQL = (f"DELETE FROM transfers t USING {_CUTS} "  # noqa: S608
                         'WHERE c.partition = t.partition AND t."timestamp" <= c.cut '
                         'AND t."timestamp" <= $3')


async def _connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S,
                                 command_timeout=STATEMENT_TIMEOUT_S,
                                 server_settings={"application_name": "txproc archive"})


async def _layout(conn: asyncpg.Connection) -> dict[int, int]:
    """partition -> shard: the map recorded at first start, else (shards started without
    one, as tests and tools do) the uniform layout over every shard that took an epoch."""
    rows = await conn.fetch("SELECT partition, shard FROM partition_map")
    if rows:
        return {int(r["partition"]): int(r["shard"]) for r in rows}
    shards = await conn.fetchval("SELECT max(shard) + 1 FROM shard_epochs")
    if not shards:
        return {}
    return dict(enumerate(PartitionMap.uniform(int(shards)).shard_of_partition))


def _cut_arrays(layout: dict[int, int], cuts: dict[int, int]) -> tuple[list[int], list[int], int]:
    """The (partition, cut) arrays of the statements above, and the greatest cut."""
    parts = [p for p, s in layout.items() if s in cuts]
    return parts, [cuts[layout[p]] for p in parts], max(cuts.values(), default=0)


# -- archive ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    boundary: int
    cuts: list[ShardCut]
    parts: list[int]
    part_cuts: list[int]
    cut_max: int

    @property
    def args(self) -> tuple[list[int], list[int], int]:
        return self.parts, self.part_cuts, self.cut_max


async def _plan(conn: asyncpg.Connection, before: str) -> _Plan:
    """Where the archive cuts, after checking that the month is closed (module docstring)."""
    boundary = month_start_ns(before)
    at = format_rfc3339_ns(boundary)
    previous = await active_archive(conn)
    if previous is not None and previous.boundary_ns >= boundary:
        raise ArchiveRefused(f"everything before {format_rfc3339_ns(previous.boundary_ns)} is "
                             f"archived already ({previous.name}); archive a later month")
    horizon = await read_horizon(conn)
    if horizon < boundary:
        raise ArchiveRefused(
            f"the months before {at} are not closed: a shard's position is at "
            f"{format_rfc3339_ns(horizon) if horizon else 'nothing committed'}, so rows "
            "before the boundary may still commit; archive once every shard has passed it")
    cuts = [ShardCut(shard=int(r["shard"]), seq=int(r["seq"]),
                     timestamp_max=int(r["timestamp_max"]), digest=bytes(r["digest"]).hex())
            for r in await conn.fetch(_CUT_LINKS_SQL, boundary)]
    layout = await _layout(conn)
    parts, part_cuts, cut_max = _cut_arrays(layout, {c.shard: c.timestamp_max for c in cuts})
    for cut in cuts:
        folded = await conn.fetchval(
            'SELECT min("timestamp") FROM partition_checkpoints WHERE partition = ANY($1)',
            [p for p, s in layout.items() if s == cut.shard])
        if folded is None or folded < cut.timestamp_max:
            raise ArchiveRefused(
                f"shard {cut.shard} has not checkpointed past its last link before {at} "
                "(its rows are not all in the balance rows yet); retry in a few seconds")
    if await conn.fetchval("SELECT to_regclass('account_history_position') IS NOT NULL"):
        position = await conn.fetchval(
            'SELECT "timestamp" FROM account_history_position WHERE id = 1')
        if position is not None and position < cut_max:
            raise ArchiveRefused(
                f"the history indexer is at {format_rfc3339_ns(int(position))}, before the "
                f"rows to archive; retry once it passed {at} (a running front moves it)")
    hold = await conn.fetchval(_OPEN_HOLD_SQL, parts, part_cuts, cut_max)
    if hold is not None:
        raise ArchiveRefused(
            f"pending transfer {hold} before {at} is not resolved before the boundary (open, "
            "or posted, voided or expired later); archive an earlier month, or once it is "
            "resolved archive the month after its resolution")
    return _Plan(boundary, cuts, parts, part_cuts, cut_max)


class _MonthWriter:
    """One table's rows, chunk by chunk, into a Parquet file per month, each file's rows
    hashed in the chain's encoding on the way."""

    def __init__(self, directory: Path, table: str) -> None:
        self.directory, self.table = directory, table
        self.files: dict[str, tuple[pq.ParquetWriter, SectionHasher, list[int]]] = {}

    def write(self, month: str, columns: dict[str, Any]) -> None:
        entry = self.files.get(month)
        if entry is None:
            path = self.directory / f"{self.table}-{month}.parquet"
            writer = pq.ParquetWriter(path, _SCHEMAS[self.table],
                                      compression=PARQUET_COMPRESSION)
            section = SECTIONS[0] if self.table == "transfers" else SECTIONS[3]
            entry = (writer, SectionHasher(section), [0])
            self.files[month] = entry
        writer, hasher, rows = entry
        _digest(self.table, columns, hasher)
        writer.write_table(pa.table(
            {k: pa.array(v, type=_SCHEMAS[self.table].field(k).type) for k, v in
             columns.items()}, schema=_SCHEMAS[self.table]))
        rows[0] += len(columns["timestamp"])

    def close(self) -> list[ArchiveFile]:
        out = []
        for month, (writer, hasher, rows) in sorted(self.files.items()):
            writer.close()
            name = f"{self.table}-{month}.parquet"
            out.append(ArchiveFile(table=self.table, month=month, file=name, rows=rows[0],
                                   sha256=_file_sha256(self.directory / name),
                                   rows_digest=hasher.digest().hex()))
        return out


def _digest(table: str, columns: dict[str, Any], hasher: SectionHasher) -> None:
    if table == "transfers":
        transfers_digest(columns, hasher)
    else:
        resolutions_digest(columns, hasher)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _months(stamps: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """(month, mask) of each month present in a chunk's timestamps (UTC; numpy's calendar
    months, vectorized: ``month_of_ns`` per row cost more than the rest of the export)."""
    months = stamps.astype("datetime64[ns]").astype("datetime64[M]")
    for month in np.unique(months).tolist():
        yield f"{month.year:04d}-{month.month:02d}", months == np.datetime64(month, "M")


async def _export(conn: asyncpg.Connection, plan: _Plan, directory: Path
                  ) -> tuple[list[ArchiveFile], dict[str, CurrencySums], int, int]:
    sums: dict[str, list[int]] = {}
    files: list[ArchiveFile] = []
    counts = {}
    for table, sql, fields in (("transfers", _TRANSFERS_SQL, TRANSFER_FIELDS),
                               ("pending_resolutions", _RESOLUTIONS_SQL, RESOLUTION_FIELDS)):
        writer = _MonthWriter(directory, table)
        counts[table] = 0
        cursor = await conn.cursor(sql, *plan.args)
        while records := await cursor.fetch(CHUNK_ROWS):
            counts[table] += len(records)
            columns = {name: list(col) for (name, _), col in
                       zip(fields, zip(*records, strict=True), strict=True)}
            stamps = np.asarray(columns["timestamp"], dtype=np.int64)
            for month, mask in _months(stamps):
                if mask.all():
                    writer.write(month, columns)
                    continue
                where = np.flatnonzero(mask).tolist()
                writer.write(month, {k: [v[i] for i in where] for k, v in columns.items()})
            if table == "transfers":
                _add_sums(sums, columns)
        files += writer.close()
    currencies = {code: CurrencySums(transfers=n, amount=a, posted=p)
                  for code, (n, a, p) in sorted(sums.items())}
    return files, currencies, counts["transfers"], counts["pending_resolutions"]


def _add_sums(sums: dict[str, list[int]], columns: dict[str, list[Any]]) -> None:
    amounts = np.asarray(columns["amount"], dtype=np.int64)
    posted = posted_mask(np.asarray(columns["flags"], dtype=np.int64))
    currency = np.asarray(columns["currency"])
    for code in np.unique(currency).tolist():
        mine = currency == code
        entry = sums.setdefault(str(code).strip(), [0, 0, 0])
        entry[0] += int(mine.sum())
        entry[1] += sum(amounts[mine].tolist())
        entry[2] += sum(amounts[mine & posted].tolist())


def read_file(path: Path, table: str) -> dict[str, list[Any]]:
    """A file's rows as columns, read back with the archive's schema (a file with other
    columns or types is refused: ``ArchiveRefused``)."""
    found = pq.read_table(path)
    if not found.schema.equals(_SCHEMAS[table], check_metadata=False):
        raise ArchiveRefused(f"{path.name}: its columns are not those of {table}")
    return {name: found.column(name).to_pylist() for name in found.column_names}


def _check_file(directory: Path, entry: ArchiveFile) -> dict[str, list[Any]]:
    """Read one file back: its sha256, row count and rows digest must be the manifest's."""
    path = directory / entry.file
    if not path.is_file():
        raise ArchiveRefused(f"{entry.file} is missing from {directory}")
    if _file_sha256(path) != entry.sha256:
        raise ArchiveRefused(f"{entry.file}: its sha256 is not the manifest's (changed or "
                             "damaged)")
    columns = read_file(path, entry.table)
    rows = len(columns["timestamp"])
    if rows != entry.rows:
        raise ArchiveRefused(f"{entry.file}: {rows} rows, the manifest says {entry.rows}")
    hasher = SectionHasher(SECTIONS[0] if entry.table == "transfers" else SECTIONS[3])
    if rows:
        _digest(entry.table, columns, hasher)
    if hasher.digest().hex() != entry.rows_digest:
        raise ArchiveRefused(f"{entry.file}: its rows are not the ones archived (digest)")
    stamps = columns["timestamp"]
    if rows and {month_of_ns(min(stamps)), month_of_ns(max(stamps))} != {entry.month}:
        raise ArchiveRefused(f"{entry.file}: rows outside {entry.month}")
    return columns


class _Laps:
    """Seconds per step of a command, as ``ArchiveResult.steps_s`` reports them."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self._lap = time.perf_counter()

    def __call__(self, name: str) -> None:
        self.steps[name] = round(time.perf_counter() - self._lap, 3)
        self._lap = time.perf_counter()


@dataclass(slots=True)
class _Prepared:
    """One database's part of an archive, exported and read back, not yet deleted."""

    directory: Path
    plan: _Plan
    manifest: Manifest
    data: bytes  # the manifest's bytes, as written
    laps: _Laps

    def result(self, started: datetime.datetime) -> ArchiveResult:
        seconds = (_utc_now() - started).total_seconds()
        return ArchiveResult(self.manifest.name, self.directory, self.manifest, seconds,
                             self.laps.steps)


async def archive(url: str, before: str, to: Path, *, now: datetime.datetime | None = None,
                  fence: Fence | None = None, database: str = MAIN_DATABASE) -> ArchiveResult:
    """Archive every closed month before ``before`` (``YYYY-MM``) into a new directory under
    ``to``; raises ``ArchiveRefused`` (nothing deleted) when the month is not closed, a hold
    before it is unresolved, the export does not read back as written, or the deletion
    does not match the manifest; ``ValueError`` for a month that is not ``YYYY-MM``. With
    ``fence`` (the schedule's lease), the deleting transaction checks it and refuses
    (``LeaseLost``) once another process has taken the lease over. ``database`` is the
    key the manifest names (``archive_databases`` archives a ledger of several)."""
    started = _utc_now()
    clock = now or started
    conn = await _connect(url)
    try:
        name = archive_name(before, clock)
        part = await _prepare(conn, before, to / name, name, clock, database,
                              allow_empty=False)
        try:
            async with conn.transaction():
                await _record_and_delete(conn, part, fence)
        except (ArchiveRefused, LeaseLost, asyncpg.PostgresError):
            # The server answered, so the transaction rolled back: no record names the
            # files. Any other error (the connection lost during COMMIT) leaves the outcome
            # unknown, and the files stay: `verify` or the record says which it was.
            shutil.rmtree(part.directory, ignore_errors=True)
            raise
        part.laps("delete")
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT_S)
    return part.result(started)


async def _prepare(conn: asyncpg.Connection, before: str, directory: Path, name: str,
                   clock: datetime.datetime, database: str, *,
                   allow_empty: bool) -> _Prepared:
    """Plan, export, read back and write the manifest of one database's part into
    ``directory`` (made here; removed again if this raises)."""
    laps = _Laps()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        plan = await _plan(conn, before)
        laps("plan")
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=False)
        try:
            manifest = await _export_and_check(conn, plan, directory, name, before, clock,
                                               laps, database=database,
                                               allow_empty=allow_empty)
            data = encode_manifest(manifest)
            _write_new(directory / MANIFEST_NAME, data)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)  # nothing refers to it
            raise
    return _Prepared(directory, plan, manifest, data, laps)


async def _export_and_check(conn: asyncpg.Connection, plan: _Plan, directory: Path, name: str,
                            before: str, clock: datetime.datetime,
                            step: Callable[[str], None], *, database: str,
                            allow_empty: bool) -> Manifest:
    """The files, read back, and the manifest that describes them (not yet written); an
    archive without rows is refused unless ``allow_empty`` (a database's part of an archive
    of several: every database then has the same boundary in force)."""
    files, currencies, transfers, resolutions = await _export(conn, plan, directory)
    accounts = await conn.fetchval(_ACCOUNTS_SQL, *plan.args)
    step("export")
    if transfers == 0 and resolutions == 0 and not allow_empty:
        raise ArchiveRefused(f"nothing to archive before {before}")
    for entry in files:  # the export, read back
        _check_file(directory, entry)
    step("read_back")
    return Manifest(
        format=ARCHIVE_FORMAT, name=name, before=before, boundary_ns=plan.boundary,
        boundary=format_rfc3339_ns(plan.boundary), created_at=clock.isoformat(),
        shards=plan.cuts, files=files, transfers=transfers, resolutions=resolutions,
        accounts=int(accounts), currencies=currencies, months=sorted({f.month for f in files}),
        database=database)


def _write_new(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


async def _record_and_delete(conn: asyncpg.Connection, part: _Prepared,
                             fence: Fence | None) -> None:
    """The record, the checkpoint, the archived ids and the DELETEs, in the caller's
    transaction; raises (so that it rolls back) unless each count and sum is the
    manifest's (and ``fence`` holds)."""
    plan, manifest = part.plan, part.manifest
    await conn.execute("SET LOCAL txproc.archive = 'on'")
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
    if fence is not None:
        await fence.check(conn)
    previous = await active_archive(conn)
    if previous is not None and previous.boundary_ns >= plan.boundary:
        raise ArchiveRefused(f"{previous.name} was archived meanwhile; nothing deleted")
    archive_id = await conn.fetchval(
        "INSERT INTO ledger_archives (name, boundary, shards, seqs, cuts, digests, "
        "transfers, resolutions, manifest, manifest_sha256) VALUES ($1, $2, $3, $4, $5, "
        "$6, $7, $8, $9, $10) RETURNING id",
        manifest.name, plan.boundary, [c.shard for c in plan.cuts],
        [c.seq for c in plan.cuts], [c.timestamp_max for c in plan.cuts],
        [bytes.fromhex(c.digest) for c in plan.cuts], manifest.transfers,
        manifest.resolutions, part.data, hashlib.sha256(part.data).digest())
    await conn.execute(_CHECKPOINT_SQL, *plan.args, archive_id)
    ids = await conn.execute(_ARCHIVED_IDS_SQL, *plan.args, archive_id)
    resolutions = await conn.execute(_DELETE_RESOLUTIONS_SQL, *plan.args)
    transfers = await conn.execute(_DELETE_TRANSFERS_SQL, *plan.args)
    found = (_count(ids), _count(transfers), _count(resolutions))
    if found != (manifest.transfers, manifest.transfers, manifest.resolutions):
        raise ArchiveRefused(f"the database holds other rows than the export (ids, "
                             f"transfers, resolutions: {found}); nothing deleted")
    await _check_checkpoint(conn, archive_id, manifest)


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


async def _check_checkpoint(conn: asyncpg.Connection, archive_id: int,
                            manifest: Manifest) -> None:
    """Per currency, the checkpoint adds the manifest's posted sum to each side."""
    rows = await conn.fetch(_CHECKPOINT_SUMS_SQL, archive_id)
    found = {r["currency"].strip(): (int(r["debits"]), int(r["credits"])) for r in rows}
    expected = {c: (s.posted, s.posted) for c, s in manifest.currencies.items() if s.posted}
    if found != expected or sum(r["accounts"] for r in rows) != manifest.accounts:
        raise ArchiveRefused(f"the balance checkpoint's sums {found} are not the export's "
                             f"{expected}; nothing deleted")


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# -- several databases (docs/design.md §16, "Archive over several databases") ----------------


class ArchiveIncomplete(Exception):
    """An archive or restore over several databases committed in some databases and not in
    others (a commit failed between them: the databases cannot commit together). The
    message names both; the same command again finishes it (the databases done are
    skipped). ``done``: the keys committed; ``failed``: the key whose commit failed, and
    ``answered`` whether its server answered the failure (then it rolled back; otherwise
    its outcome is unknown until the command runs again)."""

    def __init__(self, message: str, *, done: list[str], failed: str, answered: bool) -> None:
        super().__init__(message)
        self.done, self.failed, self.answered = done, failed, answered


async def _connect_all(urls: Mapping[str, str]) -> dict[str, asyncpg.Connection]:
    conns: dict[str, asyncpg.Connection] = {}
    try:
        for key, url in urls.items():
            conns[key] = await _connect(url)
    except BaseException:
        await _close_all(conns)
        raise
    return conns


async def _close_all(conns: Mapping[str, asyncpg.Connection]) -> None:
    for conn in conns.values():
        await conn.close(timeout=CONNECT_TIMEOUT_S)


async def _commit_together(conns: Mapping[str, asyncpg.Connection], keys: list[str],
                           work: Callable[[str, asyncpg.Connection], Any],
                           what: str) -> None:
    """Run ``work(key, conn)`` in one transaction per database of ``keys`` (main first), all
    of them open at once, then commit them in the reverse order, main last (its transaction
    holds the schedule's fence until the end). A failure before the first commit rolls every
    one back and is raised as is; a failure of a later commit leaves the earlier ones
    committed and raises ``ArchiveIncomplete`` naming them."""
    opened: list[tuple[str, Any]] = []
    try:
        for key in keys:
            transaction = conns[key].transaction()
            await transaction.start()
            opened.append((key, transaction))
            await work(key, conns[key])
    except BaseException:
        for _, transaction in reversed(opened):
            with contextlib.suppress(Exception):
                await transaction.rollback()
        raise
    done: list[str] = []
    for key, transaction in reversed(opened):
        try:
            await transaction.commit()
        except BaseException as exc:
            left = [k for k, _ in opened if k not in done]
            for k, other in opened:
                if k in left and k != key:
                    with contextlib.suppress(Exception):
                        await other.rollback()
            if not done:
                raise
            raise ArchiveIncomplete(
                f"{what} committed in {', '.join(reversed(done))} but not in "
                f"{', '.join(left)} ({key}: {exc!r}); run the same command again to finish "
                "(the databases done are skipped), then `txproc verify`",
                done=list(done), failed=key,
                answered=isinstance(exc, asyncpg.PostgresError)) from exc
        done.append(key)


async def archive_databases(urls: Mapping[str, str], before: str, to: Path, *,
                            now: datetime.datetime | None = None,
                            fence: Fence | None = None) -> list[ArchiveResult]:
    """``archive`` over a ledger's databases (``urls``: key -> URL, main first): one archive,
    one part per database in ``to/<name>/<key>/`` (each a complete archive of that
    database's rows, recorded in that database), archived and deleted in all of them or in
    none, as far as separate databases allow (``_commit_together``). Databases that an
    archive in force covers up to ``before`` already are skipped (that finishes an earlier
    run that ended with ``ArchiveIncomplete``). One database: exactly ``archive``.

    Raises ``ArchiveRefused`` (nothing deleted anywhere) when any database refuses (not
    closed, an open hold, a check) or every one is archived already; ``ArchiveIncomplete``
    when some databases committed and others did not; ``LeaseLost`` as ``archive``."""
    if len(urls) == 1:
        [(key, url)] = urls.items()
        return [await archive(url, before, to, now=now, fence=fence, database=key)]
    # Main first: its transaction opens first and commits last, holding the fence.
    require(next(iter(urls)) == MAIN_DATABASE, "the ledger's databases start with main")
    started = _utc_now()
    clock = now or started
    boundary = month_start_ns(before)
    conns = await _connect_all(urls)
    try:
        todo = [key for key, conn in conns.items()
                if not _covers(await active_archive(conn), boundary)]
        if not todo:
            raise ArchiveRefused(f"everything before {format_rfc3339_ns(boundary)} is "
                                 "archived already in every database; archive a later month")
        parent = to / archive_name(before, clock)
        parent.mkdir(parents=True, exist_ok=False)
        parts: dict[str, _Prepared] = {}
        try:
            for key in todo:
                try:
                    parts[key] = await _prepare(conns[key], before, parent / key,
                                                parent.name, clock, key, allow_empty=True)
                except ArchiveRefused as exc:
                    raise ArchiveRefused(f"{key}: {exc}") from exc  # which database
            if not any(p.manifest.transfers or p.manifest.resolutions
                       for p in parts.values()):
                raise ArchiveRefused(f"nothing to archive before {before} in any database")

            async def delete(key: str, conn: asyncpg.Connection) -> None:
                if key == MAIN_DATABASE and fence is not None:
                    await fence.check(conn)  # held in share mode until main commits, last
                if key in parts:
                    await _record_and_delete(conn, parts[key], None)

            # Main's transaction opens too when main is done already: the fence is there.
            keys = [k for k in conns if k in parts or (k == MAIN_DATABASE and fence)]
            deleting = time.perf_counter()
            try:
                await _commit_together(conns, keys, delete, f"the archive {parent.name}")
            except ArchiveIncomplete as exc:
                if set(parts) - set(exc.done):
                    raise
                # Only main's transaction, holding the fence and nothing else, failed.
        except ArchiveIncomplete as exc:
            # A part whose database rolled back is named by no record: its files go; a
            # part whose commit's outcome is unknown keeps them (its record may exist).
            keep = {*exc.done, *(() if exc.answered else (exc.failed,))}
            for key, part in parts.items():
                if key not in keep:
                    shutil.rmtree(part.directory, ignore_errors=True)
            raise
        except (ArchiveRefused, LeaseLost, asyncpg.PostgresError):
            shutil.rmtree(parent, ignore_errors=True)  # nothing committed names the files
            raise
    finally:
        await _close_all(conns)
    for part in parts.values():  # one phase for all: the transactions commit together
        part.laps.steps["delete"] = round(time.perf_counter() - deleting, 3)
    return [part.result(started) for part in parts.values()]


def _covers(bound: ArchiveBound | None, boundary_ns: int) -> bool:
    return bound is not None and bound.boundary_ns >= boundary_ns


async def archived_up_to(urls: Mapping[str, str], before: str) -> bool:
    """Whether an archive in force covers everything before ``before`` (``YYYY-MM``) in
    every database of ``urls`` (key -> URL)."""
    boundary = month_start_ns(before)
    conns = await _connect_all(urls)
    try:
        return all([_covers(await active_archive(c), boundary) for c in conns.values()])
    finally:
        await _close_all(conns)


# -- the schedule (serve --retain-hot-months) ------------------------------------------------

LEASE_RETENTION = "archive-retention"
log = logging.getLogger("txproc.archive")


async def retain(urls: Mapping[str, str], config: RetentionConfig, *, now: datetime.datetime,
                 fence: Fence | None = None) -> list[ArchiveResult]:
    """One pass of the schedule over the ledger's databases (``urls``: key -> URL, main
    first): archive what ``config`` says is no longer hot, unless it is archived already
    (an empty list). Raises what ``archive_databases`` raises."""
    before = retention_before(now, config.hot_months)
    if await archived_up_to(urls, before):
        return []
    return await archive_databases(urls, before, Path(config.directory), now=now, fence=fence)


async def retention_loop(urls: Mapping[str, str], config: RetentionConfig, *, holder: str,
                         clock: Callable[[], datetime.datetime] = _utc_now,
                         lease: LeaseConfig | None = None) -> None:
    """Run ``retain`` every ``config.interval_s`` while ``holder`` holds the lease
    ``archive-retention`` (kept in main: one process of the cluster at a time), until
    cancelled. A refusal (a month not closed yet, a hold open across the boundary) is
    logged and tried again at the next pass; nothing is deleted by a refused pass."""
    pool = await asyncpg.create_pool(urls[MAIN_DATABASE], min_size=1, max_size=2,
                                     timeout=CONNECT_TIMEOUT_S, command_timeout=60.0,
                                     server_settings={"application_name": "txproc retention"})

    async def work(fence: Fence) -> None:
        while True:
            try:
                done = await retain(urls, config, now=clock(), fence=fence)
            except ArchiveRefused as exc:
                log.info("archive retention: not now: %s", exc)
            except (asyncpg.PostgresError, OSError, LeaseLost, ArchiveIncomplete) as exc:
                log.warning("archive retention: failed, retried next pass: %r", exc)
            else:
                for part in done:
                    log.info("archive retention: archived %d transfers of %s before %s into "
                             "%s", part.manifest.transfers, part.manifest.database,
                             part.manifest.boundary, part.directory)
            await asyncio.sleep(config.interval_s)

    try:
        await hold(pool, LEASE_RETENTION, holder, lease or LeaseConfig(), work)
    finally:
        await pool.close()


# -- restore ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Part:
    """An archive's part read from its directory and checked against its manifest."""

    directory: Path
    manifest: Manifest
    data: bytes  # the manifest's bytes
    tables: dict[str, list[dict[str, list[Any]]]]


def _load(directory: Path) -> _Part:
    """Read and check a part: the manifest's form, each file against it (sha256, rows,
    months, rows digest), the counts; raises ``ArchiveRefused``."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArchiveRefused(f"{directory} holds no {MANIFEST_NAME}")
    data = path.read_bytes()
    try:
        manifest = decode_manifest(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise ArchiveRefused(f"{path}: not an archive manifest ({exc})") from exc
    tables: dict[str, list[dict[str, list[Any]]]] = {"transfers": [],
                                                      "pending_resolutions": []}
    for entry in manifest.files:
        tables[entry.table].append(_check_file(directory, entry))
    counts = {t: sum(len(c["timestamp"]) for c in parts) for t, parts in tables.items()}
    if (counts["transfers"], counts["pending_resolutions"]) != (manifest.transfers,
                                                                manifest.resolutions):
        raise ArchiveRefused(f"the files hold {counts}, the manifest says "
                             f"{manifest.transfers} transfers, {manifest.resolutions} "
                             "resolutions")
    return _Part(directory, manifest, data, tables)


async def _insert(conn: asyncpg.Connection, part: _Part) -> None:
    """In the caller's transaction: check the record, put the rows back, remove the ids
    and mark the record restored."""
    await conn.execute("SET LOCAL txproc.archive = 'on'")
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
    archive_id = await _check_record(conn, part.manifest, part.data)
    for table, fields in (("transfers", TRANSFER_FIELDS),
                          ("pending_resolutions", RESOLUTION_FIELDS)):
        names = [n for n, _ in fields]
        for columns in part.tables[table]:
            await conn.copy_records_to_table(
                table, columns=names, records=zip(*(columns[n] for n in names), strict=True))
    await conn.execute("DELETE FROM archived_transfer_ids WHERE archive_id = $1", archive_id)
    await conn.execute("UPDATE ledger_archives SET restored_at = now() WHERE id = $1",
                       archive_id)


def _restored(started: datetime.datetime, part: _Part) -> RestoreResult:
    seconds = (_utc_now() - started).total_seconds()
    return RestoreResult(part.manifest.name, part.manifest.transfers,
                         part.manifest.resolutions, seconds, part.manifest.database)


async def restore(url: str, directory: Path) -> RestoreResult:
    """Put an archive's rows back; raises ``ArchiveRefused`` (nothing inserted) when the
    manifest is not the one recorded, a file does not match it, the archive is restored
    already, or a newer archive is in force (restore that one first)."""
    started = _utc_now()
    part = _load(directory)
    conn = await _connect(url)
    try:
        async with conn.transaction():
            await _insert(conn, part)
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT_S)
    return _restored(started, part)


def _parts(directory: Path) -> list[_Part]:
    """The parts an archive directory holds: itself (a ``manifest.json`` in it: an archive
    of one database, or one part of an archive of several), else each subdirectory with
    one (an archive of several databases), all of one archive."""
    if (directory / MANIFEST_NAME).is_file():
        return [_load(directory)]
    found = sorted(p for p in directory.iterdir() if (p / MANIFEST_NAME).is_file()) \
        if directory.is_dir() else []
    if not found:
        raise ArchiveRefused(f"{directory} holds no {MANIFEST_NAME}, nor parts holding one")
    parts = [_load(p) for p in found]
    if len({p.manifest.name for p in parts}) != 1 or len(
            {p.manifest.database for p in parts}) != len(parts):
        raise ArchiveRefused(f"{directory}'s parts are not one archive's, one per database")
    return parts


async def restore_databases(urls: Mapping[str, str], directory: Path) -> list[RestoreResult]:
    """``restore`` of an archive of one or several databases (``urls``: key -> URL, as
    given to ``archive_databases``): each part back into the database its manifest names,
    in all of them or in none, as far as separate databases allow (``_commit_together``).
    Parts restored already are skipped when others are left (that finishes a run that
    ended with ``ArchiveIncomplete``). Raises ``ArchiveRefused`` (nothing inserted) as
    ``restore`` does, or when a part's database is not among ``urls``."""
    started = _utc_now()
    found = {p.manifest.database: p for p in _parts(directory)}
    missing = sorted(set(found) - set(urls))
    if missing:
        raise ArchiveRefused(
            f"the archive holds rows of database {', '.join(missing)}, which is not given: "
            "give every --database-url the ledger was served with, in the same order")
    parts = {key: found[key] for key in urls if key in found}  # main first
    conns = await _connect_all({key: urls[key] for key in urls if key in parts})
    try:
        if len(parts) > 1:  # parts restored by an earlier run are skipped
            for key, conn in conns.items():
                if await conn.fetchval(
                        "SELECT restored_at IS NOT NULL FROM ledger_archives WHERE name = $1",
                        parts[key].manifest.name):
                    del parts[key]
        if not parts:
            raise ArchiveRefused(f"{directory.name} was restored already in every database")

        async def insert(key: str, conn: asyncpg.Connection) -> None:
            await _insert(conn, parts[key])

        await _commit_together(conns, [k for k in conns if k in parts], insert,
                               f"the restore of {directory.name}")
    finally:
        await _close_all(conns)
    return [_restored(started, part) for part in parts.values()]


async def _check_record(conn: asyncpg.Connection, manifest: Manifest, data: bytes) -> int:
    """The archive's record: present, in force, the newest, and naming this manifest."""
    record = await conn.fetchrow(
        "SELECT id, manifest, manifest_sha256, restored_at FROM ledger_archives "
        "WHERE name = $1", manifest.name)
    if record is None:
        raise ArchiveRefused(f"this database has no archive {manifest.name}")
    if record["restored_at"] is not None:
        raise ArchiveRefused(f"{manifest.name} was restored already, at "
                             f"{record['restored_at']:%Y-%m-%d %H:%M:%S %Z}")
    if (bytes(record["manifest_sha256"]) != hashlib.sha256(data).digest()
            or bytes(record["manifest"]) != data):
        raise ArchiveRefused(f"{MANIFEST_NAME} is not the manifest {manifest.name} recorded "
                             "(changed since the archive)")
    newest = await active_archive(conn)
    if newest is not None and newest.name != manifest.name:
        raise ArchiveRefused(f"{newest.name}, archived after it, is in force: restore that "
                             "one first (archives are restored newest first)")
    return int(record["id"])
