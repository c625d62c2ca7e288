"""``txproc archive`` and ``txproc restore`` against a real PostgreSQL, on a ledger the
shards' own rules and store wrote over four months (the clock the book plans with is the
test's): January, February, March and April 2026, on two shards, with holds posted and
voided, a burned id, and a hold of February posted in March.

It proves: the archive refuses a month that is not closed and one with a hold resolved
after the boundary; archive -> verify passes (balances from the checkpoint plus the hot
rows, the chain from the archive's cut) -> reads into archived time answer ``archived``
and reads after it answer as before -> a retry of an archived id is not applied ->
restore -> verify passes -> every read answers as before the archive; a changed file or
manifest is refused by restore; the service's role cannot delete even with the flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from actors.ledger import LedgerStore, verify
from actors.ledger.archive import ArchiveRefused, archive, restore
from actors.ledger.history import HistoryStore
from actors.ledger.indexer import HistoryIndexer
from processor.archive import month_start_ns
from processor.codes import TransferResult
from processor.history import AccountTransfersFilter, HistoryError, TransfersQuery
from processor.identity import PROCESSOR_TENANT
from processor.ledger import ArrayBook, PartitionMap
from processor.types import Account, Transfer, TransferFlags
from tests.db.test_verify import commit_batch
from tests.unit.ledger_sim import ColumnarBook, account_ids_on_shards

pytestmark = pytest.mark.asyncio

PENDING, POST = int(TransferFlags.PENDING), int(TransferFlags.POST_PENDING)
VOID = int(TransferFlags.VOID_PENDING)
DAY_NS = 86_400 * 10**9
JAN, FEB, MAR, APR = (month_start_ns(m) for m in ("2026-01", "2026-02", "2026-03", "2026-04"))


@dataclasses.dataclass(slots=True)
class Built:
    partitions: PartitionMap
    epochs: list[int]
    accounts: list[list[int]]
    january_ids: list[int]


async def build(url: str) -> Built:
    """Four months on two shards (module docstring); both shards checkpointed past April
    and the history indexer caught up, so January, February and March are closed."""
    return await build_over({"main": url}, PartitionMap.uniform(2))


async def build_over(urls: dict[str, str], partitions: PartitionMap) -> Built:
    """``build`` over the databases of ``urls`` (key -> URL) that ``partitions`` deals two
    shards to: each shard's rows, checkpoint, anchor and history index in its database."""
    stores = {key: await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                             command_timeout_s=30)
              for key, url in urls.items()}
    store_of = {s: stores[key] for key in urls for s in partitions.shards_of_database(key)}
    try:
        for key, each in stores.items():
            await each.ensure_partition_map(partitions, key)
        books = [ColumnarBook(s, partitions, recent_ids_max=1024) for s in (0, 1)]
        epochs = [await store_of[s].take_epoch(s) for s in (0, 1)]
        ids = account_ids_on_shards(partitions, 3)
        january: list[int] = []
        for book in books:
            january += await _four_months(store_of[book.shard], book, partitions,
                                          ids[book.shard], epochs[book.shard])
        for shard in (0, 1):
            await store_of[shard].checkpoint(shard, epochs[shard],
                                             partitions.partitions_of_shard(shard),
                                             floor_ns=APR + 10 * DAY_NS)
        for each in stores.values():
            await each.anchor("operator")
    finally:
        for each in stores.values():
            await each.close()
    for url in urls.values():
        indexer = HistoryIndexer(url, connect_timeout_s=10, command_timeout_s=30)
        indexer.width_ns = 200 * DAY_NS
        try:
            while not (await indexer.step())[1]:
                pass
        finally:
            await indexer.close()
    return Built(partitions, epochs, ids, january)


async def _four_months(store: LedgerStore, book: ArrayBook, partitions: PartitionMap,
                       accounts: list[int], epoch: int) -> list[int]:
    """One shard's accounts and transfers of January to April (module docstring); the ids
    of its January transfers."""
    created = [Account(id=i, currency="EUR", code=1) for i in accounts]
    _, batch = book.create_accounts([created], JAN + DAY_NS)
    await store.commit([batch], fences={book.shard: epoch}, shard=book.shard,
                       partition_map=partitions)
    book.accounts_committed(batch)
    e = Transfer
    a, b, c = accounts
    base = 1000 * (book.shard + 1)
    batch = [e(id=base + 1, debit_account_id=a, credit_account_id=b, amount=500,
               currency="EUR", user_data="jan"),
             e(id=base + 2, debit_account_id=b, credit_account_id=c, amount=70,
               currency="EUR"),
             e(id=base + 3, debit_account_id=a, credit_account_id=c, amount=100,
               currency="EUR", flags=PENDING),
             e(id=base + 4, debit_account_id=b, credit_account_id=a, amount=30,
               currency="EUR", flags=PENDING),
             # Beyond nothing: c has 70 credits; a limit-free account, so this is
             # an id burned by a missing pending transfer instead.
             e(id=base + 5, debit_account_id=a, credit_account_id=b, amount=1,
               currency="EUR", pending_id=999_999, flags=POST)]
    codes = await commit_batch(store, book, partitions, batch, JAN + 5 * DAY_NS, epoch)
    assert codes[:4] == [0, 0, 0, 0] and codes[4] != 0
    codes = await commit_batch(store, book, partitions, [
        e(id=base + 6, debit_account_id=a, credit_account_id=c, amount=60,
          currency="EUR", pending_id=base + 3, flags=POST),
        e(id=base + 7, debit_account_id=b, credit_account_id=a, amount=30,
          currency="EUR", pending_id=base + 4, flags=VOID)], JAN + 9 * DAY_NS, epoch)
    assert codes == [0, 0]
    codes = await commit_batch(store, book, partitions, [
        e(id=base + 10 + k, debit_account_id=b, credit_account_id=a, amount=10 + k,
          currency="EUR") for k in range(3)], FEB + 3 * DAY_NS, epoch)
    assert codes == [0, 0, 0]
    # A hold of February posted in March: February cannot be archived alone.
    codes = await commit_batch(store, book, partitions, [
        e(id=base + 20, debit_account_id=c, credit_account_id=a, amount=5,
          currency="EUR", flags=PENDING)], FEB + 20 * DAY_NS, epoch)
    assert codes == [0]
    codes = await commit_batch(store, book, partitions, [
        e(id=base + 21, debit_account_id=c, credit_account_id=a, amount=5,
          currency="EUR", pending_id=base + 20, flags=POST),
        e(id=base + 22, debit_account_id=a, credit_account_id=b, amount=3,
          currency="EUR")], MAR + 2 * DAY_NS, epoch)
    assert codes == [0, 0]
    codes = await commit_batch(store, book, partitions, [
        e(id=base + 30, debit_account_id=b, credit_account_id=c, amount=2,
          currency="EUR", user_data="apr")], APR + 2 * DAY_NS, epoch)
    assert codes == [0]
    return [base + k for k in (1, 2, 3, 4, 6, 7)]


async def _reads(history: HistoryStore, accounts: list[int]) -> dict[str, Any]:
    """What the reads answer after the boundary of February (and, given no ``from``,
    from it on): account pages both ways, balances at instants, the tenant's query."""
    out: dict[str, Any] = {}
    for account in accounts:
        for order in ("asc", "desc"):
            page = await history.account_transfers(AccountTransfersFilter(
                account_id=account, from_ns=FEB, order=order, limit=3), PROCESSOR_TENANT)
            assert page is not None
            out[f"{account}/{order}"] = [t.id for t in page.data]
        for at in (FEB, MAR + 3 * DAY_NS, APR + 5 * DAY_NS):
            out[f"{account}@{at}"] = await history.balances_at(account, at, PROCESSOR_TENANT)
    query = await history.query_transfers(TransfersQuery(from_ns=FEB, limit=50),
                                          PROCESSOR_TENANT)
    out["query"] = [t.id for t in query.data]
    return out


@pytest.fixture
async def history(app_db_url: str) -> Any:
    """The front's history reads, as the service's role."""
    store = await HistoryStore.connect(app_db_url, pool_size_max=2, connect_timeout_s=10,
                                       command_timeout_s=30)
    try:
        yield store
    finally:
        await store.close()


async def test_archive_refused_until_closed(db_url: str, tmp_path: Path) -> None:
    """A month the shards have not passed is not closed; a hold of February posted in March
    keeps February from being archived; the refusals delete nothing and verify passes."""
    await build(db_url)
    with pytest.raises(ArchiveRefused, match="not closed"):
        await archive(db_url, "2026-06", tmp_path)
    with pytest.raises(ArchiveRefused, match=r"pending transfer [12]020"):
        await archive(db_url, "2026-03", tmp_path)
    with pytest.raises(ValueError, match="YYYY-MM"):
        await archive(db_url, "2026-3", tmp_path)
    result = await verify(db_url)
    assert result.report.problems == []
    assert "archives" not in result.report.checked


async def test_archive_verify_read_restore_round_trip(db_url: str, history: HistoryStore,
                                                      tmp_path: Path) -> None:
    """January archived: verify passes from the checkpoint and the cut; reads into January
    answer ``archived`` naming the archive, reads after it answer as before; after restore
    verify passes and every read, January's included, answers as before the archive."""
    built = await build(db_url)
    accounts = built.accounts[0] + built.accounts[1]
    before = await _reads(history, accounts)
    january_page = await history.account_transfers(AccountTransfersFilter(
        account_id=accounts[0], limit=50), PROCESSOR_TENANT)
    assert january_page is not None and january_page.data[0].timestamp < FEB
    january_balance = await history.balances_at(accounts[0], JAN + 20 * DAY_NS,
                                                PROCESSOR_TENANT)

    done = await archive(db_url, "2026-02", tmp_path)
    m = done.manifest
    assert (m.transfers, m.resolutions) == (12, 4)  # six transfers, two resolutions a shard
    assert [f.file for f in m.files] == ["transfers-2026-01.parquet",
                                         "pending_resolutions-2026-01.parquet"]
    assert m.currencies["EUR"].amount == 2 * (500 + 70 + 100 + 30 + 60 + 30)
    assert m.currencies["EUR"].posted == 2 * (500 + 70 + 60)
    assert {c.shard for c in m.shards} == {0, 1} and m.months == ["2026-01"]

    result = await verify(db_url)
    assert result.report.problems == []
    checked = result.report.checked
    assert checked["archives"] == 1 and checked["archived_transfers"] == 12
    assert checked["transfers"] == 14  # February on: 3 + 1 + 2 + 1 a shard

    assert await _reads(history, accounts) == before
    bound_page = await history.account_transfers(AccountTransfersFilter(
        account_id=accounts[0], limit=50), PROCESSOR_TENANT)  # no from: from the boundary
    assert bound_page is not None
    assert [t.id for t in bound_page.data] == [t.id for t in january_page.data
                                               if t.timestamp >= FEB]
    for read in (
        history.account_transfers(AccountTransfersFilter(
            account_id=accounts[0], from_ns=JAN, limit=5), PROCESSOR_TENANT),
        history.account_transfers(AccountTransfersFilter(
            account_id=accounts[0], to_ns=FEB, limit=5), PROCESSOR_TENANT),
        history.balances_at(accounts[0], JAN + 20 * DAY_NS, PROCESSOR_TENANT),
        history.query_transfers(TransfersQuery(from_ns=JAN + 1, limit=5), PROCESSOR_TENANT),
        history.stream.page(_old_cursor(), limit=5, wait_s=0, tenant=PROCESSOR_TENANT),
    ):
        with pytest.raises(HistoryError, match=done.name) as refused:
            await read
        assert refused.value.code == "archived"
    # A stream from the beginning starts at the cuts: every hot transfer, nothing archived.
    stream = await history.stream.page("", limit=100, wait_s=0, tenant=PROCESSOR_TENANT)
    assert len(stream.data) == 14 and min(t.timestamp for t in stream.data) >= FEB
    assert await history.archive_of(built.january_ids[0], PROCESSOR_TENANT) == done.name
    assert await history.archive_of(built.january_ids[0], 12345) is None

    back = await restore(db_url, done.directory)
    assert (back.transfers, back.resolutions) == (12, 4)
    result = await verify(db_url)
    assert result.report.problems == []
    assert "archives" not in result.report.checked
    assert result.report.checked["transfers"] == 26
    assert await _reads(history, accounts) == before
    again = await history.account_transfers(AccountTransfersFilter(
        account_id=accounts[0], limit=50), PROCESSOR_TENANT)
    assert again == january_page
    assert await history.balances_at(accounts[0], JAN + 20 * DAY_NS,
                                     PROCESSOR_TENANT) == january_balance
    assert await history.archive_of(built.january_ids[0], PROCESSOR_TENANT) is None
    with pytest.raises(ArchiveRefused, match="restored already"):
        await restore(db_url, done.directory)


def _old_cursor() -> str:
    """A stream cursor a consumer kept from January: each shard at its first day."""
    from processor.stream import StreamCursor, encode_stream_cursor

    return encode_stream_cursor(StreamCursor((JAN + DAY_NS, JAN + DAY_NS)))


async def test_a_retry_of_an_archived_id_is_not_applied(db_url: str, app_db_url: str,
                                                        tmp_path: Path) -> None:
    """A shard that has forgotten January (a new incarnation's book) reads an archived id
    back with the burned ones and answers ``id_archived``; the high-water mark covers it;
    nothing is written; after restore the same retry is ``exists`` again."""
    built = await build(db_url)
    await archive(db_url, "2026-02", tmp_path)
    a, b, _ = built.accounts[0]
    retry = Transfer(id=1001, debit_account_id=a, credit_account_id=b, amount=500,
                     currency="EUR", user_data="jan")
    # As the service's role, as a shard reads and commits.
    store = await LedgerStore.connect(app_db_url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=30)
    try:
        assert await store.ids_max() >= 2022
        known = await store.fetch_known([1001], [])
        assert known.transfers == {} and known.failed == {1001: TransferResult.id_archived}
        book = ColumnarBook(0, built.partitions, recent_ids_max=1024)
        plan = book.plan_transfers([[retry]], APR + 20 * DAY_NS, known)
        batch = book.finalize(plan, {}, APR + 20 * DAY_NS)
        assert batch.codes == [TransferResult.id_archived]
        epoch = await store.take_epoch(0)
        await store.commit([batch], fences={0: epoch}, shard=0,
                           partition_map=built.partitions)
        conn = await asyncpg.connect(db_url, timeout=10)
        try:
            assert await conn.fetchval("SELECT count(*) FROM transfers WHERE id = 1001") == 0
            assert await conn.fetchval(
                "SELECT count(*) FROM failed_transfers WHERE id = 1001") == 0
        finally:
            await conn.close()
    finally:
        await store.close()
    result = await verify(db_url)
    assert result.report.problems == []


async def test_restore_refuses_a_changed_file_or_manifest(db_url: str,
                                                          tmp_path: Path) -> None:
    """A file whose bytes changed, a file swapped for another month's rows, or a manifest
    edited (with the files' checksums made to fit it) are refused; nothing is inserted,
    the archive stays in force and verify passes."""
    await build(db_url)
    done = await archive(db_url, "2026-02", tmp_path)
    damaged = tmp_path / "damaged"
    shutil.copytree(done.directory, damaged)
    target = damaged / "transfers-2026-01.parquet"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ArchiveRefused, match="sha256"):
        await restore(db_url, damaged)
    edited = tmp_path / "edited"
    shutil.copytree(done.directory, edited)
    manifest = edited / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"transfers": 12',
                                                       b'"transfers": 12 '))
    with pytest.raises(ArchiveRefused, match="not the manifest"):
        await restore(db_url, edited)
    result = await verify(db_url)
    assert result.report.problems == [] and result.report.checked["archives"] == 1


async def test_only_the_owner_with_the_flag_deletes(db_url: str, app_db_url: str) -> None:
    """The append-only trigger admits a DELETE of transfers only under txproc.archive, and
    the service's role is refused it even with the flag (no privilege); the owner's DELETE
    under the flag without an archive's record is named by verify."""
    await build(db_url)
    owner = await asyncpg.connect(db_url, timeout=10)
    app = await asyncpg.connect(app_db_url, timeout=10)
    try:
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await owner.execute("DELETE FROM transfers WHERE id = 1001")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with app.transaction():
                await app.execute("SET LOCAL txproc.archive = 'on'")
                await app.execute("DELETE FROM transfers WHERE id = 1001")
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            async with owner.transaction():
                await owner.execute("SET LOCAL txproc.archive = 'on'")
                await owner.execute("UPDATE transfers SET amount = 1 WHERE id = 1001")
        # The flag misused by the owner, without an archive: verify names it.
        async with owner.transaction():
            await owner.execute("SET LOCAL txproc.archive = 'on'")
            await owner.execute("DELETE FROM transfers WHERE id = 1002")
    finally:
        await owner.close()
        await app.close()
    kinds = {(p.table, p.kind) for p in (await verify(db_url)).report.problems}
    assert ("transfers", "row_count") in kinds
    assert ("accounts", "credits_posted_mismatch") in kinds



async def test_two_archives_restore_newest_first(db_url: str, history: HistoryStore,
                                                 tmp_path: Path) -> None:
    """January, then February and March: verify passes with both in force (checkpoints
    summed, each archive's cut checked); the older cannot be restored before the newer;
    restored newest first, verify passes and the reads answer as at the start. The CLI
    runs the same commands."""
    built = await build(db_url)
    accounts = built.accounts[0] + built.accounts[1]
    start = await history.account_transfers(AccountTransfersFilter(
        account_id=accounts[0], limit=50), PROCESSOR_TENANT)
    first = await archive(db_url, "2026-02", tmp_path)
    done = await _cli("archive", "--before", "2026-04", "--to", str(tmp_path),
                      "--database-url", db_url)
    assert done.returncode == 0 and "archived 12 transfers" in done.stdout, done.stderr
    [second] = [p for p in tmp_path.iterdir() if p != first.directory]
    result = await verify(db_url)
    assert result.report.problems == []
    assert result.report.checked["archives"] == 2
    text = await _cli("verify", "--database-url", db_url)
    assert text.returncode == 0 and "2 archive(s) in force: 30 rows" in text.stdout, text
    assert result.report.checked["transfers"] == 2  # April's, one a shard
    with pytest.raises(HistoryError, match=second.name):
        await history.balances_at(accounts[0], MAR + 3 * DAY_NS, PROCESSOR_TENANT)
    assert await history.balances_at(accounts[0], APR + 5 * DAY_NS, PROCESSOR_TENANT) \
        is not None
    with pytest.raises(ArchiveRefused, match="restore that one first"):
        await restore(db_url, first.directory)
    again = await _cli("archive", "--before", "2026-03", "--to", str(tmp_path),
                       "--database-url", db_url)
    assert again.returncode == 1 and "archived already" in again.stderr
    back = await _cli("restore", str(second), "--database-url", db_url)
    assert back.returncode == 0 and "restored " + second.name in back.stdout, back.stderr
    assert (await verify(db_url)).report.problems == []
    await restore(db_url, first.directory)
    assert (await verify(db_url)).report.problems == []
    assert await history.account_transfers(AccountTransfersFilter(
        account_id=accounts[0], limit=50), PROCESSOR_TENANT) == start


async def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """``txproc`` with these arguments, in a process of its own."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", "import sys; from actors.app.cli import main; "
                         "sys.exit(main(sys.argv[1:]))", *argv],
        capture_output=True, text=True, timeout=120, check=False)


async def test_archive_beside_live_commits(db_url: str, app_db_url: str,
                                           tmp_path: Path) -> None:
    """Online: shard 0 goes on committing (and checkpointing) in April while January is
    archived; every commit lands, nothing archived is touched, and verify passes after."""
    built = await build(db_url)
    a, b, _ = built.accounts[0]
    store = await LedgerStore.connect(app_db_url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=30)
    book = ColumnarBook(0, built.partitions, recent_ids_max=1024)
    try:
        epoch = await store.take_epoch(0)
        await store.checkpoint(0, epoch, built.partitions.partitions_of_shard(0))
        # A new incarnation of shard 0, recovered as a shard recovers.
        accounts, pending = await store.load_shard(0, built.partitions.partitions_of_shard(0))
        for account in accounts:
            book.load_account(account)
        for hold in pending:
            book.load_pending(hold)
        assert pending == []
        committed: list[int] = []

        async def writer() -> None:
            for k in range(20):
                now = APR + 20 * DAY_NS + k * 10**6
                codes = await commit_batch(store, book, built.partitions, [
                    Transfer(id=5000 + k, debit_account_id=a, credit_account_id=b, amount=1,
                             currency="EUR")], now, epoch)
                assert codes == [0]
                committed.append(5000 + k)
                if k % 5 == 4:
                    await store.checkpoint(0, epoch, built.partitions.partitions_of_shard(0))
                await asyncio.sleep(0)

        done, _ = await asyncio.gather(archive(db_url, "2026-02", tmp_path), writer())
    finally:
        await store.close()
    assert done.manifest.transfers == 12 and len(committed) == 20
    result = await verify(db_url)
    assert result.report.problems == []
    assert result.report.checked["transfers"] == 14 + 20


async def test_the_retention_schedule(db_url: str, tmp_path: Path) -> None:
    """serve --retain-hot-months: on 2026-05-02 with 3 hot months a pass archives January
    (the boundary 2026-02), the next pass finds nothing new; the loop under its lease does
    the same with its clock, and a stale fence refuses the deletion."""
    from actors.lease import Fence, LeaseLost
    from actors.ledger.archive import LEASE_RETENTION, archived_up_to, retain, retention_loop
    from processor.archive import RetentionConfig
    from processor.lease import LeaseConfig

    await build(db_url)
    config = RetentionConfig(hot_months=3, directory=str(tmp_path / "a"), interval_s=1.0)
    may = datetime.datetime(2026, 5, 2, tzinfo=datetime.UTC)
    with pytest.raises(LeaseLost):  # no lease row: no fence of it holds
        await retain({"main": db_url}, config, now=may, fence=Fence(LEASE_RETENTION, 7))
    assert list((tmp_path / "a").iterdir()) == []  # the refused pass left no files
    [first] = await retain({"main": db_url}, config, now=may)
    assert first.manifest.before == "2026-02"
    assert await retain({"main": db_url}, config, now=may) == []
    # The loop, a month later: February (and March) wait for the hold posted in March, so
    # with 1 hot month on 2026-05-02 it archives up to April once that month is closed.
    later = RetentionConfig(hot_months=1, directory=str(tmp_path / "b"), interval_s=1.0)
    task = asyncio.get_running_loop().create_task(retention_loop(
        {"main": db_url}, later, holder="test", clock=lambda: may,
        lease=LeaseConfig(ttl_s=4.0, renew_interval_s=0.5, margin_s=1.0)))
    try:
        for _ in range(100):  # until the pass has committed (its files exist before that)
            if await archived_up_to({"main": db_url}, "2026-04"):
                break
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    [made] = list((tmp_path / "b").iterdir())
    assert made.name.startswith("before-2026-04-")
    result = await verify(db_url)
    assert result.report.problems == [] and result.report.checked["archives"] == 2


async def test_posted_mask() -> None:
    """Plain transfers and posts count as posted; pending transfers and voids do not."""
    from actors.ledger.archive import posted_mask

    flags = np.array([0, PENDING, POST, VOID, int(TransferFlags.LINKED)])
    assert posted_mask(flags).tolist() == [True, False, True, False, True]
