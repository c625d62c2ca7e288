"""Moving a shard between two databases (actors/ledger/relocation.py; docs/design.md §12,
"Moving a shard") on the ledger the verify tests build with the shards' own rules and
store (tests/db/test_verify.py: two shards, shard 0's transfers plain, posted, voided,
expired and burned, part of them folded by a checkpoint and part not).

What it shows: a move stopped between its two commits leaves a layout `serve` refuses,
and the same move again finishes it; every balance is then what it was and `verify`
passes over both databases; a shard with an open hold reaching a shard that stays, and the
last shard of a database, are refused with nothing written.
"""

from __future__ import annotations

import random

import asyncpg
import pytest

from actors.app.verification import verify_databases
from actors.ledger import relocation
from actors.ledger.relocation import MoveRefused, move_shard, recorded_layout
from processor.ledger import PartitionMap, partition_of
from tests.db.test_verify import build_ledger

LAYOUT = PartitionMap.uniform(2)
_BALANCES_SQL = """
SELECT id, debits_pending, debits_posted, credits_pending, credits_posted
FROM account_balances ORDER BY id
"""


async def _fetch(url: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def _count(url: str, table: str) -> int:
    rows = await _fetch(url, f"SELECT count(*) FROM {table}")
    return int(rows[0][0])  # type: ignore[call-overload]


async def test_an_interrupted_move_is_finished_by_running_it_again(
        db_url: str, second_db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A move that stops after the target committed is refused by serve's layout reading
    and finished by the same command: balances unchanged, nothing of the shard left behind,
    verify passing over both databases."""
    await build_ledger(db_url)
    urls = {"main": db_url, "db1": second_db_url}
    before = await _fetch(db_url, _BALANCES_SQL)

    async def crash(*_: object) -> None:
        raise ConnectionResetError("lost the source between the commits")

    with monkeypatch.context() as patched:
        patched.setattr(relocation, "_delete", crash)
        with pytest.raises(ConnectionResetError):
            await move_shard(urls, 0, "db1", chunk_rows=3)
    with pytest.raises(ValueError, match="shard 0 is recorded in databases 'main' and 'db1'"):
        await recorded_layout(urls)

    moved = await move_shard(urls, 0, "db1", chunk_rows=3)
    assert moved.resumed and moved.rows["transfers"] == 20
    assert moved.rows["failed_transfers"] == 1 and moved.rows["pending_resolutions"] == 3
    assert await recorded_layout(urls) == LAYOUT.with_shard_in(0, "db1")
    after = sorted(await _fetch(db_url, _BALANCES_SQL)
                   + await _fetch(second_db_url, _BALANCES_SQL))
    assert after == before
    for table in ("transfers", "failed_transfers", "pending_resolutions", "ledger_chain"):
        assert await _count(db_url, table) == (1 if table == "ledger_chain" else 0), table
    result = await verify_databases(urls)
    assert result.report.problems == []
    assert result.report.checked["anchored_elsewhere"] >= 1

    with pytest.raises(MoveRefused, match="last_shard"):
        await move_shard(urls, 1, "db1")


async def test_an_open_hold_across_the_shards_is_refused(db_url: str,
                                                         second_db_url: str) -> None:
    """An open pending transfer from an account of the moving shard to one of a shard
    that stays (its post, void or expiry would post in both databases) refuses the move
    with pending_crosses_shards, the target left empty; resolved, the same transfer is
    mirrored instead (tests/e2e/test_move_shard.py moves such a ledger)."""
    ledger = await build_ledger(db_url)
    other = next(i for i in range(10**9, 10**9 + 10_000) if LAYOUT.shard_of(i) == 1)
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO accounts (id, currency, flags, code, user_data, \"timestamp\", "
            "partition, tenant, origin) SELECT $1, 'EUR', 0, 1, '', 1, $2, tenant, 0 "
            "FROM accounts LIMIT 1", other, LAYOUT.partitions_of_shard(1)[0])
        await conn.execute(
            "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, "
            "flags, pending_id, timeout_s, code, user_data, \"timestamp\", partition, "
            "local_legs, tenant, origin) SELECT 99, $1, $2, 1, 'EUR', 2, 0, 0, 1, '', 2, "
            "partition, 1, tenant, 0 FROM accounts WHERE id = $1",
            ledger.accounts[0], other)
    finally:
        await conn.close()
    with pytest.raises(MoveRefused, match="pending transfer 99 joins an account of shard 0"):
        await move_shard({"main": db_url, "db1": second_db_url}, 0, "db1")
    assert await _count(second_db_url, "accounts") == 0
    assert await _count(second_db_url, "partition_map") == 0
    assert await _count(second_db_url, "mirrored_transfers") == 0


# The kinds of problem about balances and mirrors (the synthetic ledger below has no
# chain, so verify's chain problems are expected there and ignored).
_BALANCE_KINDS = {"debits_pending_mismatch", "debits_posted_mismatch",
                  "credits_pending_mismatch", "credits_posted_mismatch",
                  "currency_pending_not_balanced", "currency_posted_not_balanced",
                  "debit_account_missing", "credit_account_missing", "mirror_without_original"}


async def _synthetic_ledger(url: str, layout: PartitionMap) -> dict[int, int]:
    """Three shards' rows written straight into ``url``: 300 accounts, 3,000 plain
    transfers between random accounts (two thirds of them across shards) and 30 holds
    that expired, every balance folded into its row. Each account's posted credits less
    debits, by id."""
    rng = random.Random(14)
    ids = list(range(1, 301))
    parts = {i: partition_of(i) for i in ids}
    sums = {i: [0, 0] for i in ids}
    transfers, resolutions = [], []
    for k in range(3_030):
        debit, credit = rng.sample(ids, 2)
        pending = k >= 3_000
        transfers.append((k + 1, debit, credit, k % 7 + 1, "EUR", 2 if pending else 0, 0,
                          60 if pending else 0, 1, "", 1_000 + k, parts[debit], 3, 1, 0))
        if pending:
            resolutions.append((k + 1, 3, 0, 10_000 + k))
        else:
            sums[debit][0] += k % 7 + 1
            sums[credit][1] += k % 7 + 1
    conn = await asyncpg.connect(url)
    try:
        await conn.executemany(
            "INSERT INTO partition_map (partition, shard, database_key) VALUES ($1, $2, 'main')",
            list(enumerate(layout.shard_of_partition)))
        await conn.execute("INSERT INTO shard_epochs VALUES (0, 1), (1, 1), (2, 1)")
        await conn.execute('UPDATE partition_checkpoints SET "timestamp" = 1000000')
        await conn.copy_records_to_table(
            "accounts", records=[(i, "EUR", 0, 1, "", 1, parts[i], 1, 0, 0, sums[i][0], 0,
                                  sums[i][1]) for i in ids],
            columns=("id", "currency", "flags", "code", "user_data", "timestamp", "partition",
                     "tenant", "origin", "debits_pending", "debits_posted", "credits_pending",
                     "credits_posted"))
        await conn.copy_records_to_table("transfers", records=transfers, columns=(
            "id", "debit_account_id", "credit_account_id", "amount", "currency", "flags",
            "pending_id", "timeout_s", "code", "user_data", "timestamp", "partition",
            "local_legs", "tenant", "origin"))
        await conn.copy_records_to_table("pending_resolutions", records=resolutions,
                                         columns=("pending_id", "kind", "transfer_id",
                                                  "timestamp"))
    finally:
        await conn.close()
    return {i: sums[i][1] - sums[i][0] for i in ids}


async def _mirrors_needed(urls: dict[str, str]) -> dict[str, tuple[list[int], list[int]]]:
    """Per database, the ids it mirrors and the ids it should: the transfers stored in
    another database with an account here (and, for resolutions, those of mirrored holds)."""
    accounts = {k: {r[0] for r in await _fetch(u, "SELECT id FROM accounts")}
                for k, u in urls.items()}
    stored = {k: await _fetch(u, "SELECT id, debit_account_id, credit_account_id "
                                 "FROM transfers") for k, u in urls.items()}
    found = {}
    for key, url in urls.items():
        want = sorted(t[0] for other, rows in stored.items() if other != key for t in rows
                      if accounts[key] & {t[1], t[2]})
        have = [r[0] for r in await _fetch(url, "SELECT id FROM mirrored_transfers ORDER BY id")]
        found[key] = (have, want)
    return found


async def test_moves_after_moves_keep_exactly_the_mirrors_needed(
        db_url: str, second_db_url: str) -> None:
    """Shards moved out, further, and back (0 to db1, 1 to db1, 0 back to main) over a
    ledger whose shards all trade with each other: after each move every database mirrors
    exactly the transfers stored elsewhere with an account of its own (none twice, none
    left over when its shard came back), every balance is as before, and verify finds no
    balance or mirror problem in either database."""
    layout = PartitionMap.uniform(3)
    urls = {"main": db_url, "db1": second_db_url}
    nets = await _synthetic_ledger(db_url, layout)
    for shard, target in ((0, "db1"), (1, "db1"), (0, "main")):
        await move_shard(urls, shard, target, chunk_rows=500)
        for key, (have, want) in (await _mirrors_needed(urls)).items():
            assert have == want, (shard, target, key)
        balances = await _fetch(db_url, _BALANCES_SQL) + await _fetch(second_db_url,
                                                                      _BALANCES_SQL)
        assert {r[0]: r[4] - r[2] for r in balances} == nets  # type: ignore[operator]
        result = await verify_databases(urls)
        assert [p for p in result.report.problems if p.kind in _BALANCE_KINDS] == []
        assert result.report.checked["mirrors_checked"] > 0
    assert await _count(db_url, "mirrored_resolutions") + await _count(
        second_db_url, "mirrored_resolutions") > 0
