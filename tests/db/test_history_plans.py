"""How the history reads are planned (a real PostgreSQL, the migrated schema).

The tail of a history page above the indexer's position is a thin timestamp range of
``transfers``, but the BRIN's estimate for it is a large part of the table; past a few
hundred thousand transfers the planner gathered each tail with parallel workers, whose
start-up cost a page ten times its reading (docs/design.md §16). The read's settings must
rule that out however cheap parallel plans look to the planner.
"""

from __future__ import annotations

import asyncpg

from actors.ledger.history import _ACCOUNT_SQL, _TAIL_BY_TIMESTAMP

# Parallel plans as cheap as the planner can be told they are: it picks one wherever it
# is allowed to.
_PARALLEL_FOR_NOTHING = ("SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; "
                         "SET min_parallel_table_scan_size = 0; "
                         "SET min_parallel_index_scan_size = 0")
# account, after (timestamp, id), from, to, limit + 1, the indexer's position
_ARGS = (1, 0, 0, 0, 2**62, 101, 0)


async def _plans(conn: asyncpg.Connection, settings: str) -> dict[tuple[str, bool], str]:
    async with conn.transaction(isolation="repeatable_read"):
        if settings:
            await conn.execute(settings)
        return {key: "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *_ARGS))
                for key, sql in _ACCOUNT_SQL.items()}


async def test_a_history_page_never_waits_for_parallel_workers(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(_PARALLEL_FOR_NOTHING)
        # Without the read's settings the planner does gather, so the check below can fail.
        assert any("Gather" in plan for plan in (await _plans(conn, "")).values())
        for key, plan in (await _plans(conn, _TAIL_BY_TIMESTAMP)).items():
            assert "Gather" not in plan, (key, plan)
    finally:
        await conn.close()
