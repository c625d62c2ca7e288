"""Moving a shard's rows to another database of the ledger, offline (``txproc move-shard``;
docs/design.md §12, "Moving a shard"; docs/operations.md, "Adding a database").

The layout (which database holds each shard) is what the databases recorded: each holds
the ``partition_map`` rows of its own shards, and their union is the layout
(``PartitionMap.recorded``). A move copies the shard's rows into the target in one
transaction that also records the shard's partition map rows there, commits, and then
deletes them from the source in one transaction that also deletes its map rows there.
The source's transaction is opened first and holds its tables locked throughout, so
nothing writes the shard meanwhile. A crash between the two commits leaves the shard
recorded in both databases: `serve` refuses that layout, and the same command run again
finds the copy complete and finishes the deletion.

A transfer between an account of the shard and one of a shard that stays stays stored
once, where its coordinator's rows are; the other database gets a read-only *mirror* of it
(migration 0037: ``mirrored_transfers``, ``mirrored_resolutions``), so each database's
accounts are still explained by the rows it holds (verify, account history, balances at
an instant). The target's transaction copies into it the mirrors of the source's
transfers that reach the shard and drops the mirrors it held of the shard's own transfers
(those are stored there now); the source's transaction keeps mirrors of the shard's
transfers that reach a shard staying, drops the mirrors it held for the shard's accounts,
and records the shard's posting blocks left in it as folded (the balances moved whole).

Refused (``MoveRefused``, nothing written) unless it is safe: the processor stopped (no
session of the application role, no lease held), every saga between databases finished
and none touching the shard, no open pending transfer between the shard and a shard that
stays (its post, void or expiry would have to post in both databases), no archive in
force in the source, the target migrated as far as the source and holding nothing of the
shard, and no id of the shard's stored or burned already in the target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from actors.database import APP_ROLE
from actors.ledger.indexer import HISTORY_COLUMNS, MOVEMENTS_SQL
from actors.ledger.store import LedgerStore
from processor.ledger import PartitionMap
from processor.ledger.transit import transit_account_id

__all__ = ["MoveRefused", "Moved", "move_shard", "read_partition_rows", "recorded_layout",
           "rows_of_shard"]

CONNECT_TIMEOUT_S = 10.0
# A move of a large shard copies for minutes; each statement may take this long.
STATEMENT_TIMEOUT_S = 3_600.0
# How long the move waits for a table lock before it concludes something still uses the
# database (a running processor, an operator command).
LOCK_TIMEOUT_S = 5.0
# Rows read from the source per round trip and copied into the target.
CHUNK_ROWS = 20_000
# Candidates of a transit account id the sagas may use (actors/ledger/crossdb.py probes
# as many).
TRANSIT_SKIPS_MAX = 8

# The tables a move touches, locked in both databases for the whole move.
_TABLES = ("partition_map", "accounts", "transfers", "pending_resolutions", "failed_transfers",
           "ledger_chain", "shard_epochs", "partition_checkpoints", "account_history",
           "remote_posting_blocks", "posting_folds", "crossdb_transfers",
           "mirrored_transfers", "mirrored_resolutions")
# The mirror tables (migration 0037), append-only: a move drops the mirrors that become
# stored rows or lose their last account in a database, with their triggers set aside
# inside its own transaction as for _GUARDED.
_MIRRORS = ("mirrored_transfers", "mirrored_resolutions")
# Tables whose append-only triggers the source's deletion sets aside, inside its own
# transaction (the owner's ALTER TABLE ... DISABLE TRIGGER, enabled again before commit).
_GUARDED = ("partition_map", "accounts", "transfers", "pending_resolutions",
            "failed_transfers", "ledger_chain", "shard_epochs", *_MIRRORS)
_BALANCES = ("debits_pending", "debits_posted", "credits_pending", "credits_posted")
_OPEN_SAGAS = ("started", "debited", "compensating")


class MoveRefused(Exception):
    """A move that is not safe; ``code`` is stable (docs/operations.md lists them)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


@dataclass(slots=True)
class Moved:
    """What a move did: the shard, its source and target, rows moved per table."""

    shard: int
    source: str
    target: str
    rows: dict[str, int] = field(default_factory=dict)
    resumed: bool = False
    seconds: float = 0.0


async def _connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S,
                                 command_timeout=STATEMENT_TIMEOUT_S,
                                 server_settings={"application_name": "txproc move-shard"})


async def read_partition_rows(urls: dict[str, str]) -> dict[str, list[tuple[int, int, str]]]:
    """Each database's ``partition_map`` rows (partition, shard, key), by key."""
    rows: dict[str, list[tuple[int, int, str]]] = {}
    for key, url in urls.items():
        conn = await _connect(url)
        try:
            rows[key] = [(int(r[0]), int(r[1]), str(r[2])) for r in await conn.fetch(
                "SELECT partition, shard, database_key FROM partition_map ORDER BY 1")]
        finally:
            await conn.close(timeout=CONNECT_TIMEOUT_S)
    return rows


async def recorded_layout(urls: dict[str, str],
                          first_start: PartitionMap | None = None) -> PartitionMap | None:
    """The layout the databases at ``urls`` (by key, main first) recorded, or None if none
    recorded one (a first start). ``first_start``, the dealt layout, is returned when the
    rows found are its own and some database lacks its rows (a first start that stopped
    between databases). Raises ValueError for a layout that cannot be served
    (``PartitionMap.recorded``)."""
    rows = await read_partition_rows(urls)
    if not any(rows.values()):
        return None
    if first_start is not None and all(
            not part or part == first_start.rows_of_database(key) for key, part in rows.items()):
        return first_start
    return PartitionMap.recorded(rows)


async def move_shard(urls: dict[str, str], shard: int, target: str, *,
                     chunk_rows: int = CHUNK_ROWS) -> Moved:
    """Move ``shard``'s rows into database ``target`` (a key of ``urls``: main, db1, ...,
    administrative URLs in the order of the ledger's first start, the new database
    included). Raises MoveRefused when it is not safe (nothing written), asyncpg's errors
    when a database cannot be read."""
    started = time.perf_counter()
    if target not in urls:
        raise MoveRefused("unknown_database",
                          f"no database {target!r} among the ones given ({', '.join(urls)})")
    await _check_stopped(urls)
    rows = await read_partition_rows(urls)
    resumed = _in_two(rows, shard, target)
    if resumed:
        rows[target] = [r for r in rows[target] if r[1] != shard]
    try:
        layout = PartitionMap.recorded({k: v for k, v in rows.items() if v})
    except ValueError as exc:
        raise MoveRefused("layout", str(exc)) from exc
    if not 0 <= shard < layout.shards:
        raise MoveRefused("unknown_shard", f"the ledger has shards 0..{layout.shards - 1}")
    source = layout.database_of_shard[shard]
    if source == target:
        raise MoveRefused("same_database", f"shard {shard} is in {target} already")
    if layout.shards_of_database(source) == [shard] and not resumed:
        raise MoveRefused("last_shard", f"shard {shard} is the last one in {source}, and "
                          "every database of the ledger holds a shard")
    moved = Moved(shard, source, target, resumed=resumed)
    await _check_sagas(urls, layout, layout.with_shard_in(shard, target), shard)
    partitions = layout.partitions_of_shard(shard)
    after = layout.with_shard_in(shard, target)
    # The partitions whose shards are in the target once the shard is there.
    target_partitions = [p for s in after.shards_of_database(target)
                         for p in after.partitions_of_shard(s)]
    src = await _connect(urls[source])
    dst = await _connect(urls[target])
    try:
        async with src.transaction():
            await _lock(src, source)
            await _check_source(src, shard, partitions)
            async with dst.transaction():
                await _lock(dst, target)
                if resumed:
                    await _check_copy(src, dst, shard, partitions)
                else:
                    await _check_target(dst, shard, partitions)
                    await _copy(src, dst, shard, partitions, moved, chunk_rows)
                    await _mirror_into_target(src, dst, partitions, target_partitions,
                                              moved, chunk_rows)
                    moved.rows["account_history"] = await _index_history(dst, partitions)
            await _delete(src, shard, partitions, moved)
    finally:
        await dst.close(timeout=CONNECT_TIMEOUT_S)
        await src.close(timeout=CONNECT_TIMEOUT_S)
    for key in (target, source):
        # The chains' heads as they are now, the moved one's in its new home: every link
        # of both databases is anchored again.
        store = await LedgerStore.connect(urls[key], pool_size_max=2,
                                          connect_timeout_s=CONNECT_TIMEOUT_S,
                                          command_timeout_s=STATEMENT_TIMEOUT_S)
        try:
            await store.anchor("operator")
        finally:
            await store.close()
    moved.seconds = time.perf_counter() - started
    return moved


def _in_two(rows: dict[str, list[tuple[int, int, str]]], shard: int, target: str) -> bool:
    """Whether ``shard`` is recorded in ``target`` and in another database: a move into
    ``target`` committed its copy and stopped before the source's deletion."""
    return (any(r[1] == shard for r in rows.get(target, []))
            and any(r[1] == shard for k, part in rows.items() if k != target for r in part))


# -- checks ---------------------------------------------------------------------------------

_SESSIONS_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE usename = $1 AND datname = current_database() AND pid <> pg_backend_pid()
"""
_LEASES_SQL = """
SELECT name, holder FROM leases WHERE expires_at > clock_timestamp() ORDER BY name LIMIT 1
"""
_SAGAS_SQL = """
SELECT id, tenant, debit_account_id, credit_account_id, currency, debit_database,
       credit_database, state FROM crossdb_transfers
"""


async def _check_stopped(urls: dict[str, str]) -> None:
    """No processor runs on any database (no session of the application role, no lease
    held), and every database is migrated as far as main."""
    versions: set[int] | None = None
    for key, url in urls.items():
        conn = await _connect(url)
        try:
            sessions = int(await conn.fetchval(_SESSIONS_SQL, APP_ROLE))
            if sessions:
                raise MoveRefused("server_running", f"{key}: {sessions} session(s) of "
                                  f"{APP_ROLE} are connected: stop the processor first")
            here = await _versions(conn)
            versions = here if versions is None else versions
            if missing := sorted(versions - here):
                raise MoveRefused("not_migrated", f"{key} lacks migrations {missing}: run "
                                  "`txproc migrate` with the same --database-url list first")
            lease = await conn.fetchrow(_LEASES_SQL)
            if lease is not None:
                raise MoveRefused("server_running", f"{key}: lease {lease['name']} is held "
                                  f"by {lease['holder']}: stop the processor (a lease "
                                  "lapses seconds after its holder stopped)")
        finally:
            await conn.close(timeout=CONNECT_TIMEOUT_S)


async def _versions(conn: asyncpg.Connection) -> set[int]:
    try:
        return {int(v) for v in await conn.fetchval(
            "SELECT array_agg(version) FROM schema_migrations") or []}
    except asyncpg.UndefinedTableError:
        return set()


async def _check_sagas(urls: dict[str, str], layout: PartitionMap, after: PartitionMap,
                       shard: int) -> None:
    """No saga between databases is open or touches the shard, and the move changes no
    transit account the sagas use (their ids derive from the layout)."""
    pairs: set[tuple[int, str, str, str]] = set()
    for key, url in urls.items():
        conn = await _connect(url)
        try:
            for r in await conn.fetch(_SAGAS_SQL):
                if r["state"] in _OPEN_SAGAS:
                    raise MoveRefused("saga_open", f"{key}: transfer {r['id']} between "
                                      f"databases is {r['state']}: start the processor "
                                      "until its relay finished every saga, then stop it")
                if shard in (layout.shard_of(r["debit_account_id"]),
                             layout.shard_of(r["credit_account_id"])):
                    raise MoveRefused("saga_touches_shard", f"{key}: transfer {r['id']} "
                                      f"between databases has an account on shard {shard}")
                pairs.add((int(r["tenant"]), r["debit_database"], r["credit_database"],
                           r["currency"]))
        finally:
            await conn.close(timeout=CONNECT_TIMEOUT_S)
    for tenant, d1, d2, currency in sorted(pairs):
        for side in ("out", "in"):
            if _transits(layout, tenant, d1, d2, currency, side) != _transits(
                    after, tenant, d1, d2, currency, side):
                raise MoveRefused("transit_accounts_move", f"the transit accounts of tenant "
                                  f"{tenant} {d1}->{d2} {currency} derive from the layout, and "
                                  "this move would change them")


def _transits(layout: PartitionMap, tenant: int, d1: str, d2: str, currency: str,
              side: Any) -> list[int]:
    return [transit_account_id(layout, tenant=tenant, debit_database=d1, credit_database=d2,
                               currency=currency, side=side, skip=skip)
            for skip in range(TRANSIT_SKIPS_MAX)]


async def _lock(conn: asyncpg.Connection, key: str) -> None:
    await conn.execute(f"SET LOCAL lock_timeout = '{int(LOCK_TIMEOUT_S * 1000)}ms'")
    try:
        await conn.execute(f"LOCK TABLE {', '.join(_TABLES)} IN ACCESS EXCLUSIVE MODE")
    except asyncpg.LockNotAvailableError as exc:
        raise MoveRefused("server_running", f"{key}: its ledger tables are in use: stop the "
                          "processor and any operator command first") from exc
    sessions = int(await conn.fetchval(_SESSIONS_SQL, APP_ROLE))
    if sessions:
        raise MoveRefused("server_running", f"{key}: {sessions} session(s) of {APP_ROLE} "
                          "connected: stop the processor first")


# A pending transfer of the source, not resolved, between an account of the shard and one
# of a shard that stays (a hold is coordinated by its debit account's shard; both accounts
# are in the source).
_OPEN_CROSSING_SQL = """
SELECT t.id FROM transfers t
JOIN accounts d ON d.id = t.debit_account_id
JOIN accounts c ON c.id = t.credit_account_id
WHERE (t.flags & 2) <> 0 AND (d.partition = ANY($1::int[])) <> (c.partition = ANY($1::int[]))
  AND NOT EXISTS (SELECT 1 FROM pending_resolutions r WHERE r.pending_id = t.id)
LIMIT 1
"""


async def _check_source(conn: asyncpg.Connection, shard: int, partitions: list[int]) -> None:
    crossing = await conn.fetchval(_OPEN_CROSSING_SQL, partitions)
    if crossing is not None:
        raise MoveRefused("pending_crosses_shards", f"pending transfer {crossing} joins an "
                          f"account of shard {shard} and one of a shard that stays, and is "
                          "open: post or void it (or start the processor until it expired), "
                          "then move")
    collision = await conn.fetchval(_SOURCE_MIRROR_COLLISION_SQL, partitions)
    if collision is not None:
        raise MoveRefused("id_collision", f"transfer {collision} of shard {shard} would be "
                          "mirrored in the source, which holds a mirror of that id already")
    archives = await conn.fetchval(
        "SELECT count(*) FROM ledger_archives WHERE restored_at IS NULL")
    if archives:
        raise MoveRefused("archive_in_force", f"{archives} archive(s) in force in the "
                          "source: restore them first (`txproc restore`)")


_HOLDS_SQL = """
SELECT (SELECT count(*) FROM accounts WHERE partition = ANY($1::int[]))
     + (SELECT count(*) FROM transfers WHERE partition = ANY($1::int[]))
     + (SELECT count(*) FROM failed_transfers WHERE shard = $2)
     + (SELECT count(*) FROM ledger_chain WHERE shard = $2)
     + (SELECT count(*) FROM shard_epochs WHERE shard = $2)
     + (SELECT count(*) FROM partition_map WHERE shard = $2)
"""


async def rows_of_shard(conn: asyncpg.Connection, shard: int, partitions: list[int]) -> int:
    """How many rows of ``shard`` (whose partitions are ``partitions``) this database
    holds, over every table a move copies."""
    return int(await conn.fetchval(_HOLDS_SQL, partitions, shard))


async def _check_target(conn: asyncpg.Connection, shard: int, partitions: list[int]) -> None:
    held = await rows_of_shard(conn, shard, partitions)
    if held:
        raise MoveRefused("target_holds_shard", f"the target holds {held} row(s) of shard "
                          f"{shard} already")


_COUNTS_SQL = """
SELECT (SELECT count(*) FROM accounts WHERE partition = ANY($1::int[])),
       (SELECT count(*) FROM transfers WHERE partition = ANY($1::int[])),
       (SELECT count(*) FROM failed_transfers WHERE shard = $2),
       (SELECT count(*) FROM ledger_chain WHERE shard = $2)
"""


async def _check_copy(src: asyncpg.Connection, dst: asyncpg.Connection, shard: int,
                      partitions: list[int]) -> None:
    """A resumed move: the target's copy (committed whole, in one transaction) matches."""
    here = tuple(await src.fetchrow(_COUNTS_SQL, partitions, shard))
    there = tuple(await dst.fetchrow(_COUNTS_SQL, partitions, shard))
    if here != there:
        raise MoveRefused("target_holds_shard", f"shard {shard} is recorded in both "
                          f"databases and their rows differ (source {here}, target {there})")


# -- the copy -------------------------------------------------------------------------------

async def _columns(conn: asyncpg.Connection, table: str) -> list[str]:
    return [r[0] for r in await conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = "
        "current_schema() AND table_name = $1 AND is_generated = 'NEVER' "
        "AND is_identity = 'NO' ORDER BY ordinal_position", table)]


async def _copy(src: asyncpg.Connection, dst: asyncpg.Connection, shard: int,
                partitions: list[int], moved: Moved, chunk_rows: int) -> None:
    accounts = await _columns(src, "accounts")
    # Each account with its whole balance (the view adds what is not folded yet): the
    # target's checkpoint of the shard's partitions is then moved past every row, so the
    # moved shard starts there with nothing to fold.
    select = ", ".join(f"b.{c}" if c in _BALANCES else f"a.{_quoted(c)}" for c in accounts)
    copies = [
        ("accounts", f"SELECT {select} FROM accounts a JOIN account_balances b "  # noqa: S608
                     "ON b.id = a.id WHERE a.partition = ANY($1::int[])", partitions),
        ("transfers", "SELECT {cols} FROM transfers WHERE partition = ANY($1::int[])",
         partitions),
        ("pending_resolutions", "SELECT {cols} FROM pending_resolutions r WHERE EXISTS "
                                "(SELECT 1 FROM transfers p WHERE p.id = r.pending_id "
                                "AND p.partition = ANY($1::int[]))", partitions),
        ("failed_transfers", "SELECT {cols} FROM failed_transfers WHERE shard = $1", shard),
        ("ledger_chain", "SELECT {cols} FROM ledger_chain WHERE shard = $1", shard),
        ("shard_epochs", "SELECT {cols} FROM shard_epochs WHERE shard = $1", shard),
    ]
    for table, query, arg in copies:
        names = accounts if table == "accounts" else await _columns(src, table)
        sql = query.format(cols=", ".join(_quoted(c) for c in names))
        moved.rows[table] = await _stream(src, dst, table, names, sql, (arg,), chunk_rows)
    await dst.copy_records_to_table("partition_map", records=[
        (p, shard, moved.target) for p in partitions],
        columns=("partition", "shard", "database_key"))
    moved.rows["partition_map"] = len(partitions)
    await _check_ids(dst, shard, partitions)
    await _fold_checkpoints(src, dst, partitions)


def _quoted(column: str) -> str:
    return f'"{column}"'


async def _stream(src: asyncpg.Connection, dst: asyncpg.Connection, table: str,
                  columns: list[str], sql: str, args: tuple[Any, ...], chunk_rows: int) -> int:
    """The rows of ``sql`` (with ``args``) in the source, copied into ``table`` of the
    target ``chunk_rows`` at a time; a duplicate key there refuses the move."""
    count = 0
    # A cursor of its own, closed at the end: the source's deletion later in the same
    # transaction may not alter a table an open portal still reads.
    # Named per table, so each FETCH is a statement of its own (asyncpg caches a
    # statement's row description by its text).
    await src.execute(f"DECLARE move_{table} NO SCROLL CURSOR FOR {sql}", *args)
    while records := await src.fetch(f"FETCH {int(chunk_rows)} FROM move_{table}"):
        try:
            await dst.copy_records_to_table(table, records=[tuple(r) for r in records],
                                            columns=columns)
        except asyncpg.UniqueViolationError as exc:
            raise MoveRefused("id_collision", f"{table}: {exc.detail or exc}") from exc
        count += len(records)
    await src.execute(f"CLOSE move_{table}")
    return count


# An id of the moved shard that the target stores or burns in another table already.
_IDS_SQL = """
SELECT id FROM (
    SELECT t.id FROM transfers t JOIN failed_transfers f ON f.id = t.id
    WHERE t.partition = ANY($1::int[]) OR f.shard = $2
    UNION ALL
    SELECT t.id FROM transfers t JOIN archived_transfer_ids x ON x.id = t.id
    WHERE t.partition = ANY($1::int[])
    UNION ALL
    SELECT f.id FROM failed_transfers f JOIN archived_transfer_ids x ON x.id = f.id
    WHERE f.shard = $2
) ids LIMIT 1
"""


async def _check_ids(dst: asyncpg.Connection, shard: int, partitions: list[int]) -> None:
    collision = await dst.fetchval(_IDS_SQL, partitions, shard)
    if collision is not None:
        raise MoveRefused("id_collision", f"transfer id {collision} of shard {shard} is "
                          "stored or burned in the target already")


async def _fold_checkpoints(src: asyncpg.Connection, dst: asyncpg.Connection,
                            partitions: list[int]) -> None:
    """The target's checkpoints of the shard's partitions past every moved row (the
    accounts came with their whole balances); never lowered (they only move forward)."""
    upto = int(await src.fetchval(
        'SELECT greatest((SELECT max("timestamp") FROM transfers '
        "WHERE partition = ANY($1::int[])), (SELECT max(r.\"timestamp\") "
        "FROM pending_resolutions r JOIN transfers p ON p.id = r.pending_id "
        "WHERE p.partition = ANY($1::int[])), 0)", partitions))
    await dst.execute(
        'UPDATE partition_checkpoints SET "timestamp" = $2 '
        'WHERE partition = ANY($1::int[]) AND "timestamp" < $2', partitions, upto)


_HISTORY_SQL = (
    f"INSERT INTO account_history ({', '.join(_quoted(c) for c in HISTORY_COLUMNS)}) "  # noqa: S608
    f"SELECT * FROM ({MOVEMENTS_SQL}) m WHERE m.account_id IN "
    "(SELECT id FROM accounts WHERE partition = ANY($3::int[]))")


async def _index_history(dst: asyncpg.Connection, partitions: list[int]) -> int:
    """The moved accounts' history rows up to the target's indexer position, computed
    there as its indexer computes them (rows above it, its indexer adds as for any row)."""
    position = int(await dst.fetchval(
        'SELECT "timestamp" FROM account_history_position WHERE id = 1'))
    if position == 0:
        return 0
    status = await dst.execute(_HISTORY_SQL, 0, position, partitions)
    return int(status.split()[-1])


# -- mirrors (migration 0037) ---------------------------------------------------------------

def _on_shard(alias: str, on: bool) -> str:
    """Whether the debit or credit account of transfer ``alias`` is an account of this
    database on the shard's partitions ($1), or (``on`` False) one of a shard here that
    stays. A database holds only its own shards' accounts, so an account elsewhere is
    neither."""
    where = "a.partition = ANY($1::int[])" if on else "NOT a.partition = ANY($1::int[])"
    return (f"EXISTS (SELECT 1 FROM accounts a WHERE a.id IN ({alias}.debit_account_id, "  # noqa: S608
            f"{alias}.credit_account_id) AND {where})")


def _listed(alias: str, columns: list[str]) -> str:
    return ", ".join(f"{alias}.{_quoted(c)}" for c in columns)


def _names(columns: list[str]) -> str:
    return ", ".join(_quoted(c) for c in columns)


# What the target mirrors, read in the source: the transfers of shards staying there with
# a leg on the shard, and the mirrors the source kept for the shard's accounts whose
# originals are not stored in the target ($2: the target's partitions once the shard is
# there). Then the resolutions of those that were pending.
_REACHING_SQL = """
SELECT {t} FROM transfers t WHERE NOT t.partition = ANY($1::int[]) AND {on_t}
UNION ALL
SELECT {t} FROM mirrored_transfers t WHERE NOT t.partition = ANY($2::int[]) AND {on_t}
"""
_REACHING_RESOLUTIONS_SQL = """
SELECT {r} FROM pending_resolutions r JOIN transfers t ON t.id = r.pending_id
WHERE NOT t.partition = ANY($1::int[]) AND {on_t}
UNION ALL
SELECT {r} FROM mirrored_resolutions r JOIN mirrored_transfers t ON t.id = r.pending_id
WHERE NOT t.partition = ANY($2::int[]) AND {on_t}
"""
# The target's mirrors of the shard's own transfers: stored there from now on.
_DROP_STORED_SQL = (
    "DELETE FROM mirrored_resolutions r USING mirrored_transfers t "
    "WHERE t.id = r.pending_id AND t.partition = ANY($1::int[])",
    "DELETE FROM mirrored_transfers WHERE partition = ANY($1::int[])",
)


async def _mirror_into_target(src: asyncpg.Connection, dst: asyncpg.Connection,
                              partitions: list[int], target_partitions: list[int],
                              moved: Moved, chunk_rows: int) -> None:
    """The target's mirrors as the shard's arrival leaves them (module docstring)."""
    dropped = 0
    for table in _MIRRORS:
        await dst.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
    for sql in _DROP_STORED_SQL:
        dropped += int((await dst.execute(sql, partitions)).split()[-1])
    for table in _MIRRORS:
        await dst.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
    moved.rows["mirrors_dropped_in_target"] = dropped
    transfers = await _columns(src, "mirrored_transfers")
    resolutions = await _columns(src, "mirrored_resolutions")
    copies = (
        ("mirrored_transfers", transfers,
         _REACHING_SQL.format(t=_listed("t", transfers), on_t=_on_shard("t", True))),
        ("mirrored_resolutions", resolutions,
         _REACHING_RESOLUTIONS_SQL.format(r=_listed("r", resolutions),
                                          on_t=_on_shard("t", True))),
    )
    for table, names, sql in copies:
        moved.rows[f"{table}_into_target"] = await _stream(
            src, dst, table, names, sql, (partitions, target_partitions), chunk_rows)


# A transfer of the shard the source will mirror whose id a mirror it keeps has already.
_SOURCE_MIRROR_COLLISION_SQL = f"""
SELECT t.id FROM transfers t JOIN mirrored_transfers m ON m.id = t.id
WHERE t.partition = ANY($1::int[]) AND {_on_shard("t", False)}
  AND NOT {_on_shard("m", True)}
LIMIT 1
"""  # noqa: S608 - built from this module's constants only


async def _mirror_in_source(conn: asyncpg.Connection, shard: int, partitions: list[int],
                            moved: Moved) -> None:
    """Inside the source's deletion, before the shard's rows go: its mirrors for the
    shard's accounts dropped (no account of theirs stays), mirrors kept of the shard's
    transfers that reach a shard staying, and the shard's posting blocks left here
    recorded as folded."""
    on, off = _on_shard("t", True), _on_shard("t", False)
    dropped = 0
    for sql in (f"DELETE FROM mirrored_resolutions r USING mirrored_transfers t "  # noqa: S608
                f"WHERE t.id = r.pending_id AND {on}",
                f"DELETE FROM mirrored_transfers t WHERE {on}"):  # noqa: S608
        dropped += int((await conn.execute(sql, partitions)).split()[-1])
    moved.rows["mirrors_dropped_in_source"] = dropped
    transfers = await _columns(conn, "mirrored_transfers")
    resolutions = await _columns(conn, "mirrored_resolutions")
    kept = 0
    for sql in (
        f"INSERT INTO mirrored_transfers ({_names(transfers)}) "  # noqa: S608
        f"SELECT {_listed('t', transfers)} FROM transfers t "
        f"WHERE t.partition = ANY($1::int[]) AND {off}",
        f"INSERT INTO mirrored_resolutions ({_names(resolutions)}) "  # noqa: S608
        f"SELECT {_listed('r', resolutions)} FROM pending_resolutions r "
        f"JOIN transfers t ON t.id = r.pending_id "
        f"WHERE t.partition = ANY($1::int[]) AND {off}",
    ):
        kept += int((await conn.execute(sql, partitions)).split()[-1])
    moved.rows["mirrors_kept_in_source"] = kept
    # The balances moved whole (the view's blocks included): the blocks left here for the
    # shard are in them. Recorded as folded up to this transaction (no block is being
    # written: the blocks table is locked), so were the shard ever to come back, none
    # would count twice.
    await conn.execute(_FOLD_LEFT_BLOCKS_SQL, shard)


_FOLD_LEFT_BLOCKS_SQL = """
INSERT INTO posting_folds (shard, seq, horizon, epoch, blocks, legs)
SELECT $1, coalesce((SELECT max(f.seq) FROM posting_folds f WHERE f.shard = $1), 0) + 1,
       pg_current_xact_id(),
       coalesce((SELECT e.epoch FROM shard_epochs e WHERE e.shard = $1), 0),
       c.blocks, c.legs
FROM (SELECT count(*)::int AS blocks,
             coalesce(sum(cardinality(b.account_ids)), 0)::bigint AS legs
      FROM remote_posting_blocks b
      WHERE b.shard = $1 AND b.xid >= posting_horizon($1)) c
WHERE c.blocks > 0
"""


# -- the source's deletion ------------------------------------------------------------------

# (table, statement, whether its one argument is the shard's partitions or the shard).
_DELETES = (
    ("account_history", "DELETE FROM account_history WHERE account_id IN "
                        "(SELECT id FROM accounts WHERE partition = ANY($1::int[]))", True),
    ("pending_resolutions", "DELETE FROM pending_resolutions r USING transfers p "
                            "WHERE p.id = r.pending_id AND p.partition = ANY($1::int[])", True),
    ("transfers", "DELETE FROM transfers WHERE partition = ANY($1::int[])", True),
    ("accounts", "DELETE FROM accounts WHERE partition = ANY($1::int[])", True),
    ("failed_transfers", "DELETE FROM failed_transfers WHERE shard = $1", False),
    ("ledger_chain", "DELETE FROM ledger_chain WHERE shard = $1", False),
    ("shard_epochs", "DELETE FROM shard_epochs WHERE shard = $1", False),
    ("partition_map", "DELETE FROM partition_map WHERE shard = $1", False),
)


async def _delete(conn: asyncpg.Connection, shard: int, partitions: list[int],
                  moved: Moved) -> None:
    """Every row of the shard out of the source, its map rows with them. The append-only
    triggers are set aside for this transaction only (by the tables' owner; enabled again
    before it commits, so no other session ever sees them off). Each table loses exactly
    the rows the target received, or nothing commits."""
    for table in _GUARDED:
        await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
    await _mirror_in_source(conn, shard, partitions, moved)
    for table, sql, by_partitions in _DELETES:
        status = await conn.execute(sql, partitions if by_partitions else shard)
        deleted = int(status.split()[-1])
        copied = moved.rows.get(table)
        if table == "account_history":
            moved.rows["account_history_deleted"] = deleted
        elif copied is None:  # a resumed move: the copy was committed before
            moved.rows[table] = deleted
        elif deleted != copied:
            raise MoveRefused("copy_mismatch", f"{table}: {deleted} rows to delete, "
                              f"{copied} copied")
    for table in _GUARDED:
        await conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
