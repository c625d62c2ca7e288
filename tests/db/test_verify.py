"""``txproc verify`` against a real PostgreSQL: a ledger written through the store passes,
and every kind of tampering a superuser can do behind the ledger's back (an amount edited,
an amount and its balances edited together, a transfer removed from the middle, the
chain's last batch removed, a forged row inserted) is named by table, row and kind.

The ledger is built by the shards' own rules and store (ArrayBook, LedgerStore.commit):
two shards, accounts with a limit, plain transfers, a hold posted in part, a hold voided,
a hold expired, a burned id, a checkpoint (so balances live in rows as well as replay),
then more commits and an anchor.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass

import asyncpg
import pytest

from actors.ledger import LedgerStore, verify
from processor.ledger import ArrayBook, Known, PartitionMap
from processor.types import Account, AccountFlags, Transfer, TransferFlags
from tests.unit.ledger_sim import ColumnarBook, account_ids_on_shards

pytestmark = pytest.mark.asyncio

DISABLE = "ALTER TABLE {table} DISABLE TRIGGER USER"
ENABLE = "ALTER TABLE {table} ENABLE TRIGGER USER"
PENDING, POST = int(TransferFlags.PENDING), int(TransferFlags.POST_PENDING)
VOID = int(TransferFlags.VOID_PENDING)
LIMITED = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)


@dataclass(frozen=True, slots=True)
class Ledger:
    """What the builder wrote: the accounts of shard 0 and the ids of some transfers."""

    accounts: list[int]
    plain: list[int]
    last_batch: list[int]


async def commit_batch(store: LedgerStore, book: ArrayBook, partitions: PartitionMap,
                       transfers: list[Transfer], now: int, epoch: int) -> list[int]:
    """Plan, commit and settle ``transfers`` as the shard of ``book`` does (one batch at
    ``now``, fenced by ``epoch``); their result codes."""
    plan = book.plan_transfers([transfers], now, Known())
    batch = book.finalize(plan, {}, now)
    await store.commit([batch], fences={book.shard: epoch}, shard=book.shard,
                       partition_map=partitions)
    book.committed(batch)
    return batch.codes


async def build_ledger(url: str) -> Ledger:
    """A small ledger of two shards, committed as the shards commit (see the module)."""
    partitions = PartitionMap.uniform(2)
    store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=30)
    store.one_statement_rows_max = 4  # both commit forms
    try:
        await store.ensure_partition_map(partitions)
        books = [ColumnarBook(s, partitions, recent_ids_max=1024) for s in (0, 1)]
        epochs = [await store.take_epoch(s) for s in (0, 1)]
        ids = account_ids_on_shards(partitions, 4)
        now = time.time_ns()
        for book, own in zip(books, ids, strict=True):
            accounts = [Account(id=i, currency="EUR", code=1) for i in own[:3]]
            accounts.append(Account(id=own[3], currency="EUR", code=1, user_data="wallet ü",
                                    flags=LIMITED))
            _, batch = book.create_accounts([accounts], now)
            await store.commit([batch], fences={book.shard: epochs[book.shard]},
                               shard=book.shard, partition_map=partitions)
            book.accounts_committed(batch)
        a, b, c, limited = ids[0]
        e = Transfer  # short
        book, epoch = books[0], epochs[0]
        codes = await commit_batch(store, book, partitions, [
            e(id=10, debit_account_id=a, credit_account_id=b, amount=500, currency="EUR"),
            e(id=11, debit_account_id=b, credit_account_id=c, amount=70, currency="EUR",
              user_data="invoice 11"),
            e(id=12, debit_account_id=c, credit_account_id=limited, amount=40,
              currency="EUR"),
        ], now + 1, epoch)
        assert codes == [0, 0, 0]
        codes = await commit_batch(store, book, partitions, [
            e(id=20, debit_account_id=a, credit_account_id=c, amount=100, currency="EUR",
              flags=PENDING),
            e(id=21, debit_account_id=b, credit_account_id=a, amount=30, currency="EUR",
              flags=PENDING),
            e(id=22, debit_account_id=a, credit_account_id=b, amount=9, currency="EUR",
              flags=PENDING, timeout_s=1),
            # Beyond the limited account's credits: burned.
            e(id=23, debit_account_id=limited, credit_account_id=a, amount=41,
              currency="EUR"),
        ], now + 2, epoch)
        assert codes[:3] == [0, 0, 0] and codes[3] != 0
        codes = await commit_batch(store, book, partitions, [
            e(id=30, debit_account_id=a, credit_account_id=c, amount=60, currency="EUR",
              pending_id=20, flags=POST),
            e(id=31, debit_account_id=b, credit_account_id=a, amount=30, currency="EUR",
              pending_id=21, flags=VOID),
        ], now + 3, epoch)
        assert codes == [0, 0]
        # The hold of 22 expires with the next batch (its timeout is 1 s).
        await store.checkpoint(0, epoch, partitions.partitions_of_shard(0))
        plain = list(range(40, 50))
        codes = await commit_batch(store, book, partitions, [
            e(id=i, debit_account_id=b, credit_account_id=a, amount=i, currency="EUR")
            for i in plain], now + 3 * 10**9, epoch)
        assert codes == [0] * len(plain)
        last = [60, 61]
        codes = await commit_batch(store, book, partitions, [
            e(id=i, debit_account_id=a, credit_account_id=c, amount=1, currency="EUR")
            for i in last], now + 4 * 10**9, epoch)
        assert codes == [0, 0]
        await store.anchor("operator")
        return Ledger(ids[0], plain, last)
    finally:
        await store.close()


async def _tamper(url: str, table: str, *statements: str) -> None:
    """Run ``statements`` as the superuser with ``table``'s triggers disabled."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        async with conn.transaction():
            await conn.execute(DISABLE.format(table=table))
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(ENABLE.format(table=table))
    finally:
        await conn.close()


async def test_an_untouched_ledger_verifies(db_url: str) -> None:
    """Every check passes on a ledger written by the store: each row chained, balances
    (folded and not) equal to their re-derivation, holds resolved once, anchors matching."""
    await build_ledger(db_url)
    result = await verify(db_url, chunk_rows=7)
    assert result.report.problems == []
    checked = result.report.checked
    assert checked["transfers"] == 20 and checked["accounts"] == 8
    assert checked["failed_transfers"] == 1 and checked["pending_resolutions"] == 3
    assert checked["chained_transfers"] == 20 and checked["anchors"] == 1
    assert checked["links_after_newest_anchor"] == 0
    assert result.rows_per_s > 0


async def test_an_edited_amount_is_named(db_url: str) -> None:
    """An amount changed in place breaks its link's transfers section and, once folded,
    the balances of both its accounts."""
    await build_ledger(db_url)
    await _tamper(db_url, "transfers", "UPDATE transfers SET amount = 501 WHERE id = 10")
    report = (await verify(db_url)).report
    first = report.problems[0]
    assert (first.table, first.id, first.kind) == ("transfers", "shard 0 link 2",
                                                   "rows_changed")
    kinds = {(p.table, p.kind) for p in report.problems}
    assert ("accounts", "debits_posted_mismatch") in kinds


async def test_an_amount_edited_with_its_balances_is_named(db_url: str) -> None:
    """Editing an amount and the balance rows that hold it together keeps every balance
    equal to its re-derivation, and the chain still names the transfers section."""
    ledger = await build_ledger(db_url)
    a, b = ledger.accounts[:2]
    await _tamper(db_url, "transfers", "UPDATE transfers SET amount = 900 WHERE id = 10")
    await _tamper(db_url, "accounts",
                  f"UPDATE accounts SET debits_posted = debits_posted + 400 WHERE id = {a}",
                  f"UPDATE accounts SET credits_posted = credits_posted + 400 WHERE id = {b}")
    report = (await verify(db_url)).report
    assert [(p.table, p.id, p.kind) for p in report.problems] == [
        ("transfers", "shard 0 link 2", "rows_changed")]


async def test_a_transfer_removed_from_the_middle_is_named(db_url: str) -> None:
    """A transfer deleted from a batch in the middle of the chain leaves its link a row
    short."""
    ledger = await build_ledger(db_url)
    await _tamper(db_url, "transfers", f"DELETE FROM transfers WHERE id = {ledger.plain[3]}")
    report = (await verify(db_url)).report
    first = report.problems[0]
    assert (first.table, first.kind, first.expected, first.found) == (
        "transfers", "row_count", "10", "9")


async def test_the_chains_last_batch_removed_is_found_by_the_anchor(db_url: str) -> None:
    """Removing the last batch's transfers and its link leaves a chain that is consistent
    in itself, but shorter than the anchor recorded."""
    ledger = await build_ledger(db_url)
    ids = ",".join(map(str, ledger.last_batch))
    await _tamper(db_url, "transfers", f"DELETE FROM transfers WHERE id IN ({ids})")
    await _tamper(db_url, "ledger_chain",
                  "DELETE FROM ledger_chain WHERE shard = 0 AND seq = "
                  "(SELECT max(seq) FROM ledger_chain WHERE shard = 0)")
    report = (await verify(db_url)).report
    assert [(p.table, p.kind) for p in report.problems] == [
        ("ledger_anchors", "anchored_link_missing")]


@pytest.mark.parametrize(("timestamp", "kind"), [("max", "unchained_row"),
                                                 ("inside", "row_count")])
async def test_a_forged_row_is_named(db_url: str, timestamp: str, kind: str) -> None:
    """A transfer inserted behind the store's back belongs to no link (after the chain's
    head: named by id) or makes a link a row too long (inside a batch's range)."""
    ledger = await build_ledger(db_url)
    a, b = ledger.accounts[:2]
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        bounds = await conn.fetchrow(
            "SELECT max(timestamp_max) AS high, min(timestamp_max) FILTER (WHERE seq = 3)"
            " AS inside FROM ledger_chain WHERE shard = 0")
        stamp = bounds["high"] + 1 if timestamp == "max" else bounds["inside"] - 1
        await conn.execute(
            "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency,"
            " flags, pending_id, timeout_s, code, user_data, timestamp, partition, local_legs,"
            " tenant) SELECT 999, $1, $2, 5, 'EUR', 0, 0, 0, 1, '', $3, partition, 3, tenant"
            " FROM accounts WHERE id = $1", a, b, stamp)
    finally:
        await conn.close()
    report = (await verify(db_url)).report
    first = report.problems[0]
    assert (first.table, first.kind) == ("transfers", kind)
    if kind == "unchained_row":
        assert first.id == "999"


async def test_verify_runs_beside_commits_on_one_snapshot(db_url: str) -> None:
    """Commits landing while verify reads do not make it see half a batch: it reads one
    snapshot, so the ledger passes however the two interleave."""
    await build_ledger(db_url)
    partitions = PartitionMap.uniform(2)
    store = await LedgerStore.connect(db_url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=30)
    try:
        book = ColumnarBook(0, partitions, recent_ids_max=1024)
        epoch = await store.take_epoch(0)
        accounts, _ = await store.load_shard(0, partitions.partitions_of_shard(0))
        for account in accounts:
            book.load_account(account)
        book.last_timestamp = await store.checkpoint_timestamp(
            partitions.partitions_of_shard(0))
        a, b = sorted(x.id for x in accounts if not x.flags)[:2]

        async def commits() -> None:
            for k in range(20):
                await commit_batch(store, book, partitions, [
                    Transfer(id=1000 + 10 * k + j, debit_account_id=a, credit_account_id=b,
                             amount=1, currency="EUR") for j in range(5)],
                    time.time_ns(), epoch)

        results = await asyncio.gather(commits(), verify(db_url, chunk_rows=3),
                                       verify(db_url, chunk_rows=50))
    finally:
        await store.close()
    assert [r.report.problems for r in results[1:]] == [[], []]
    assert (await verify(db_url)).report.problems == []


async def test_the_cli_prints_json_and_exits_non_zero_naming_the_problem(
    db_url: str,
) -> None:
    """``txproc verify --database-url U --json`` prints the report and exits 1 when a
    problem is found, 0 when none is."""
    await build_ledger(db_url)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "import sys; from actors.app.cli import main; "
             "sys.exit(main(sys.argv[1:]))", "verify", "--database-url", db_url, "--json"],
            capture_output=True, text=True, timeout=120, check=False)

    ok = await asyncio.to_thread(run)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    await _tamper(db_url, "transfers", "UPDATE transfers SET amount = 2 WHERE id = 60")
    broken = await asyncio.to_thread(run)
    body = json.loads(broken.stdout)
    assert broken.returncode == 1
    assert body["ok"] is False and set(body) >= {"rows_per_s", "checked", "problems"}
    assert body["problems"][0]["table"] == "transfers"
