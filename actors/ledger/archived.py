"""What the reads ask about archives (migration 0033; docs/design.md §16, "Archive and
restore"): the archive in force, and whether an id is an archived transfer's. Kept apart
from actors/ledger/archive.py (the operator's commands, with pyarrow) so the front's reads
import neither the commands nor Parquet."""

from __future__ import annotations

from typing import Any

from processor.archive import ArchiveBound
from processor.stream import StreamCursor

__all__ = ["active_archive", "archived_transfer", "stream_start"]

# The newest archive in force (migration 0033): one row of a small table, by a partial index.
_ACTIVE_ARCHIVE_SQL = """
SELECT name, boundary, shards, cuts FROM ledger_archives
WHERE restored_at IS NULL ORDER BY boundary DESC LIMIT 1
"""


async def active_archive(conn: Any) -> ArchiveBound | None:
    """The newest archive in force (processor/archive.py: what a read may still ask), or
    None when nothing is archived."""
    row = await conn.fetchrow(_ACTIVE_ARCHIVE_SQL)
    if row is None:
        return None
    cuts = [-1] * (max(row["shards"], default=-1) + 1)
    for shard, cut in zip(row["shards"], row["cuts"], strict=True):
        cuts[shard] = int(cut)
    return ArchiveBound(name=row["name"], boundary_ns=int(row["boundary"]), cuts=cuts)


async def archived_transfer(conn: Any, transfer_id: int) -> tuple[str, int] | None:
    """(archive name, tenant) if ``transfer_id`` is a transfer an archive in force holds."""
    row = await conn.fetchrow(
        "SELECT a.name, i.tenant FROM archived_transfer_ids i "
        "JOIN ledger_archives a ON a.id = i.archive_id WHERE i.id = $1", transfer_id)
    return None if row is None else (row["name"], int(row["tenant"]))


async def stream_start(conn: Any, cursor: StreamCursor, given: bool) -> StreamCursor:
    """The change stream's cursor with an archive in force: a shard's position below the
    archive's cut for it is refused ``archived`` when the consumer gave the cursor
    (``given``), and moved up to the cut when it starts from the beginning (no cursor)."""
    bound = await active_archive(conn)
    if bound is None:
        return cursor
    positions = list(cursor.positions)
    for shard, cut in enumerate(bound.cuts):
        if shard < len(positions) and positions[shard] < cut:
            if given:
                raise bound.refuse("the cursor")
            positions[shard] = cut
    return StreamCursor(tuple(positions))
