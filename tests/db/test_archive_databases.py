"""``txproc archive`` and ``txproc restore`` over a ledger of two databases (docs/design.md
§16, "Archive over several databases"): the ledger of tests/db/test_archive.py, its two
shards dealt over the session's server (main: shard 0) and the second server (db1: shard
1), January to April 2026 written by the shards' own rules with the test's clock.

It proves: one archive makes one part per database, each recorded and deleted in its own
database; `verify` over both passes after the archive and after the restore; reads routed
to either database (account history, balances at an instant, the merged query, the
stream, an archived id's lookup) answer ``archived`` into January and as before after it;
restore puts each part back into its own database and refuses without it; a refusal in
one database deletes nothing in the other; a commit that fails in one database after the
other committed is finished by running the command again, archive and restore alike.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from actors.app.verification import verify_databases
from actors.database import app_role_url
from actors.ledger.archive import (
    ArchiveIncomplete,
    ArchiveRefused,
    archive_databases,
    archived_up_to,
    restore_databases,
)
from actors.ledger.history import HistoryStore, query_across
from actors.ledger.stream import MultiStreamReader
from processor.history import AccountTransfersFilter, HistoryError, TransfersQuery
from processor.identity import PROCESSOR_TENANT
from processor.ledger import PartitionMap
from processor.stream import StreamCursor, encode_stream_cursor
from tests.db.test_archive import DAY_NS, FEB, JAN, Built, _cli, _reads, build_over

pytestmark = pytest.mark.asyncio

LAYOUT = PartitionMap.dealt(2, ("main", "db1"))  # shard 0 in main, shard 1 in db1


@pytest.fixture
async def urls(db_url: str, second_db_url: str) -> dict[str, str]:
    return {"main": db_url, "db1": second_db_url}


@pytest.fixture
async def histories(urls: dict[str, str],
                    app_password_file: Path) -> AsyncIterator[dict[str, HistoryStore]]:
    """The front's history reads of each database, as the service's role."""
    out: dict[str, HistoryStore] = {}
    try:
        for key, url in urls.items():
            out[key] = await HistoryStore.connect(
                await app_role_url(url, app_password_file), pool_size_max=2,
                connect_timeout_s=10, command_timeout_s=30)
        yield out
    finally:
        for history in out.values():
            await history.close()


async def _ok(urls: dict[str, str]) -> dict[str, Any]:
    """``txproc verify`` over both databases passes; what it checked."""
    result = await verify_databases(urls)
    assert result.report.problems == []
    return dict(result.report.checked)


async def _everything(histories: dict[str, HistoryStore], built: Built) -> dict[str, Any]:
    """Every read after February's start, each database's accounts read from it, and the
    query merged over both as the front merges it."""
    out = {key: await _reads(histories[key], built.accounts[shard])
           for shard, key in enumerate(("main", "db1"))}
    merged = await query_across(list(histories.values()),
                                TransfersQuery(from_ns=FEB, limit=50), PROCESSOR_TENANT)
    out["merged"] = [t.id for t in merged.data]
    return out


async def test_archive_verify_read_restore_over_two_databases(
        urls: dict[str, str], histories: dict[str, HistoryStore], tmp_path: Path) -> None:
    """January of both databases archived as one archive with a part each; verify passes;
    reads into January answer ``archived`` from either database and reads after it as
    before; restore without db1's URL is refused, with it each part goes home; verify
    passes and every read, January's included, answers as before. The CLI does the same."""
    built = await build_over(urls, LAYOUT)
    await _ok(urls)
    before = await _everything(histories, built)
    january = {key: await histories[key].account_transfers(AccountTransfersFilter(
        account_id=built.accounts[shard][0], limit=50), PROCESSOR_TENANT)
        for shard, key in enumerate(("main", "db1"))}

    parts = await archive_databases(urls, "2026-02", tmp_path)
    assert [p.manifest.database for p in parts] == ["main", "db1"]
    [name] = {p.name for p in parts}
    assert [p.directory for p in parts] == [tmp_path / name / "main", tmp_path / name / "db1"]
    for part, shard in zip(parts, (0, 1), strict=True):
        assert (part.manifest.transfers, part.manifest.resolutions) == (6, 2)
        assert [c.shard for c in part.manifest.shards] == [shard]  # each database's own
    checked = await _ok(urls)
    assert checked["archives"] == 2 and checked["archived_transfers"] == 12
    assert checked["transfers"] == 14

    assert await _everything(histories, built) == before
    for shard, key in enumerate(("main", "db1")):
        history, account = histories[key], built.accounts[shard][0]
        for read in (
            history.account_transfers(AccountTransfersFilter(
                account_id=account, from_ns=JAN, limit=5), PROCESSOR_TENANT),
            history.balances_at(account, JAN + 20 * DAY_NS, PROCESSOR_TENANT),
        ):
            with pytest.raises(HistoryError, match=name) as refused:
                await read
            assert refused.value.code == "archived"
        assert await history.archive_of(1000 * (shard + 1) + 1, PROCESSOR_TENANT) == name
    with pytest.raises(HistoryError, match=name):
        await query_across(list(histories.values()), TransfersQuery(from_ns=JAN + 1, limit=5),
                           PROCESSOR_TENANT)
    stream = MultiStreamReader([(histories["main"].pool, [0]), (histories["db1"].pool, [1])],
                               shards=2)
    page = await stream.page("", limit=100, wait_s=0, tenant=PROCESSOR_TENANT)
    assert len(page.data) == 14 and min(t.timestamp for t in page.data) >= FEB
    with pytest.raises(HistoryError, match=name):
        await stream.page(encode_stream_cursor(StreamCursor((JAN + DAY_NS, JAN + DAY_NS))),
                          limit=5, wait_s=0, tenant=PROCESSOR_TENANT)
    with pytest.raises(ArchiveRefused, match="archived already in every database"):
        await archive_databases(urls, "2026-02", tmp_path)
    assert await archived_up_to(urls, "2026-02")

    with pytest.raises(ArchiveRefused, match="database db1, which is not given"):
        await restore_databases({"main": urls["main"]}, tmp_path / name)
    back = await restore_databases(urls, tmp_path / name)
    assert [(b.database, b.transfers, b.resolutions) for b in back] == [("main", 6, 2),
                                                                          ("db1", 6, 2)]
    checked = await _ok(urls)
    assert "archives" not in checked and checked["transfers"] == 26
    assert await _everything(histories, built) == before
    for shard, key in enumerate(("main", "db1")):
        assert await histories[key].account_transfers(AccountTransfersFilter(
            account_id=built.accounts[shard][0], limit=50), PROCESSOR_TENANT) == january[key]

    # The commands, given both URLs as `serve` is.
    given = ["--database-url", urls["main"], "--database-url", urls["db1"]]
    done = await _cli("archive", "--before", "2026-02", "--to", str(tmp_path / "cli"), *given)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("archived 6 transfers and 2 resolutions of ") == 2, done.stdout
    [made] = list((tmp_path / "cli").iterdir())
    text = await _cli("verify", *given)
    assert text.returncode == 0 and "2 archive(s) in force" in text.stdout, text
    back_cli = await _cli("restore", str(made), *given)
    assert back_cli.returncode == 0 and f"restored {made.name} of db1" in back_cli.stdout, \
        back_cli.stderr
    assert "archives" not in await _ok(urls)


async def test_a_refusal_in_one_database_deletes_nothing_in_any(
        urls: dict[str, str], tmp_path: Path) -> None:
    """db1's history indexer behind January's rows: db1 refuses, and main, whose part
    was ready, deletes nothing either; no files stay; once db1 is closed it archives."""
    await build_over(urls, LAYOUT)
    owner = await asyncpg.connect(urls["db1"], timeout=10)
    try:
        position = await owner.fetchval(
            'SELECT "timestamp" FROM account_history_position WHERE id = 1')
        await owner.execute('UPDATE account_history_position SET "timestamp" = $1 WHERE id = 1',
                            JAN)
        with pytest.raises(ArchiveRefused, match=r"^db1: the history indexer"):
            await archive_databases(urls, "2026-02", tmp_path)
        assert list(tmp_path.iterdir()) == []
        assert not await archived_up_to({"main": urls["main"]}, "2026-02")
        await owner.execute('UPDATE account_history_position SET "timestamp" = $1 WHERE id = 1',
                            position)
    finally:
        await owner.close()
    assert "archives" not in await _ok(urls)
    assert len(await archive_databases(urls, "2026-02", tmp_path)) == 2


# A commit that fails in main after db1 committed (main commits last): a deferred
# constraint trigger that raises at COMMIT, on the statement each command makes last.
_FAIL_AT_COMMIT = """
CREATE FUNCTION test_fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'injected at commit'; END $$;
CREATE CONSTRAINT TRIGGER test_fail_at_commit AFTER {event} ON ledger_archives
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_fail_at_commit();
"""
_HEAL = ("DROP TRIGGER test_fail_at_commit ON ledger_archives; "
         "DROP FUNCTION test_fail_at_commit();")


async def test_a_commit_failing_between_databases_is_finished_by_running_again(
        urls: dict[str, str], tmp_path: Path) -> None:
    """main's commit fails after db1's: the archive says which committed, keeps db1's part
    and removes main's; run again, it archives main alone into a new directory, and verify
    passes. The restore of an archive likewise: db1 restored, main not; run again, db1 is
    skipped and main restored."""
    await build_over(urls, LAYOUT)
    main = await asyncpg.connect(urls["main"], timeout=10)
    try:
        await main.execute(_FAIL_AT_COMMIT.format(event="INSERT"))
        with pytest.raises(ArchiveIncomplete, match="committed in db1 but not in main") as got:
            await archive_databases(urls, "2026-02", tmp_path / "a")
        assert (got.value.done, got.value.failed, got.value.answered) == (["db1"], "main", True)
        [first] = list((tmp_path / "a").iterdir())
        assert [p.name for p in first.iterdir()] == ["db1"]
        assert await archived_up_to({"db1": urls["db1"]}, "2026-02")
        assert not await archived_up_to(urls, "2026-02")
        await main.execute(_HEAL)
        [rest] = await archive_databases(urls, "2026-02", tmp_path / "b")
        assert rest.manifest.database == "main" and rest.manifest.transfers == 6
        checked = await _ok(urls)
        assert checked["archives"] == 2 and checked["archived_transfers"] == 12

        # Each part is restored from where it went; then one archive of both, restored with
        # main failing at its commit.
        await restore_databases(urls, rest.directory.parent)
        await restore_databases(urls, first)
        assert "archives" not in await _ok(urls)
        # A name of its own: archive names are unique per second (processor.archive).
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=5)
        parts = await archive_databases(urls, "2026-02", tmp_path / "c", now=later)
        await main.execute(_FAIL_AT_COMMIT.format(event="UPDATE"))
        with pytest.raises(ArchiveIncomplete, match="committed in db1 but not in main"):
            await restore_databases(urls, parts[0].directory.parent)
        assert await archived_up_to({"main": urls["main"]}, "2026-02")
        assert not await archived_up_to({"db1": urls["db1"]}, "2026-02")
        await main.execute(_HEAL)
        [again] = await restore_databases(urls, parts[0].directory.parent)
        assert again.database == "main"
    finally:
        await main.close()
    assert "archives" not in await _ok(urls)


async def test_the_retention_schedule_archives_every_database(urls: dict[str, str],
                                                              tmp_path: Path) -> None:
    """serve --retain-hot-months over two databases: on 2026-05-02 with 3 hot months one
    pass archives January of both (a part each), the next finds nothing new."""
    from actors.ledger.archive import retain
    from processor.archive import RetentionConfig

    await build_over(urls, LAYOUT)
    config = RetentionConfig(hot_months=3, directory=str(tmp_path), interval_s=1.0)
    may = datetime.datetime(2026, 5, 2, tzinfo=datetime.UTC)
    parts = await retain(urls, config, now=may)
    assert [(p.manifest.database, p.manifest.before) for p in parts] == [
        ("main", "2026-02"), ("db1", "2026-02")]
    assert await retain(urls, config, now=may) == []
    assert (await _ok(urls))["archives"] == 2
