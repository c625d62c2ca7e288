"""The benchmark's settle step runs against a real, migrated ledger database."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from bench.ledger import settle_database

pytestmark = pytest.mark.asyncio


async def test_settle_vacuums_the_ledger_tables_and_checkpoints(db_url: str) -> None:
    out = await settle_database(db_url)
    assert out["checkpoint"] is True and out["seconds"] >= 0
    conn = await asyncpg.connect(db_url)
    try:
        for _ in range(50):  # statistics arrive when the settling session has ended
            vacuumed = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_user_tables WHERE relname = 'transfers' "
                "AND vacuum_count > 0")
            if vacuumed:
                break
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    assert vacuumed == 1
