"""`txproc archive` and `txproc restore` against a running `txproc serve`, over real HTTP and
RPC (docs/design.md §16, "Archive and restore"; docs/api.md, "Archived months").

The served ledger's clock is the wall clock, so its old months are written before it
starts, as tests/db/test_archive.py writes them: January to April 2026 on two shards, dealt
over two databases (shard 0 in main on the session's server, shard 1 in db1 on the second),
by the shards' own rules with the test's clock. Then `serve` recovers them, and while it
serves, `txproc archive --before 2026-02` runs given both databases.

It shows: account history, balances at an instant and a transfer lookup into January
answer HTTP 410 `archived` (the lookup from either database), the RPC client gets
`archived` for the reads and `id_archived` for a retry of an archived transfer; reads
after the boundary answer as before and new transfers commit; `txproc verify` passes;
after `txproc restore` every read answers as before the archive and the retry `exists`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.database import create_database, drop_database
from actors.migrate import migrate
from processor.client import Client, ClientError
from processor.codes import TransferResult
from processor.history import format_rfc3339_ns
from processor.identity import SCOPES, SYSTEM_SCOPES, issue_token, load_or_create_ring
from processor.ledger import PartitionMap
from processor.types import Transfer
from tests.db.test_archive import APR, DAY_NS, FEB, JAN, MAR, Built, build_over
from tests.e2e.test_several_databases import TXPROC, Served, serving_over

pytestmark = pytest.mark.asyncio

LAYOUT = PartitionMap.dealt(2, ("main", "db1"))  # shard 0 in main, shard 1 in db1
MAY = APR + 30 * DAY_NS


@pytest.fixture
async def ledger(pg_admin_url: str, second_pg_admin_url: str, app_password_file: Path,
                 tmp_path: Path) -> AsyncIterator[tuple[Served, Built, str]]:
    """January to April written into two new databases, then served; (the service, what
    was written, a token of the processor's, which sees every account)."""
    name = f"txproc_arc_{uuid.uuid4().hex[:12]}"
    urls = {"main": await create_database(pg_admin_url, name + "_a"),
            "db1": await create_database(second_pg_admin_url, name + "_b")}
    try:
        for url in urls.values():
            await migrate(url)
        built = await build_over(urls, LAYOUT)
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        async with serving_over(urls, data_dir, app_password_file,
                                ["--shards", "2", "--no-payments"]) as served:
            ring = load_or_create_ring(data_dir, now_s=int(time.time()))
            token = issue_token(ring.active.secret, (*SCOPES, *SYSTEM_SCOPES), ttl_s=3600,
                                now_s=int(time.time()), subject="archive-e2e")
            yield served, built, token
    finally:
        await drop_database(pg_admin_url, name + "_a")
        await drop_database(second_pg_admin_url, name + "_b")


def _at(ns: int) -> str:
    return format_rfc3339_ns(ns)


async def _txproc(*args: str) -> tuple[int, str]:
    """A `txproc` command in a process of its own: its exit code and what it printed."""
    proc = await asyncio.create_subprocess_exec(
        *TXPROC, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=180)
    assert proc.returncode is not None
    return proc.returncode, output.decode()


async def _after_boundary(http: httpx.AsyncClient, built: Built) -> dict[str, Any]:
    """What HTTP answers from February to May (a range no new transfer falls in): each
    account's page both ways and its balances at three instants, per database."""
    out: dict[str, Any] = {}
    for account in built.accounts[0] + built.accounts[1]:
        for order in ("asc", "desc"):
            page = await http.get(f"/v1/accounts/{account}/transfers", params={
                "from": _at(FEB), "to": _at(MAY), "order": order, "limit": 50})
            assert page.status_code == 200, page.text
            out[f"{account}/{order}"] = [t["id"] for t in page.json()["data"]]
        for at in (FEB, MAR + 3 * DAY_NS, APR + 5 * DAY_NS):
            balances = await http.get(f"/v1/accounts/{account}/balances",
                                      params={"at": _at(at)})
            assert balances.status_code == 200, balances.text
            out[f"{account}@{at}"] = balances.json()
    return out


async def _january(http: httpx.AsyncClient, built: Built) -> dict[str, httpx.Response]:
    """The reads into January: one account of each database's page from January and its
    balances in January, and a January transfer of each database by id."""
    out = {}
    for shard in (0, 1):
        account = built.accounts[shard][0]
        out[f"page{shard}"] = await http.get(f"/v1/accounts/{account}/transfers",
                                             params={"from": _at(JAN), "to": _at(MAY),
                                                     "limit": 50})
        out[f"balances{shard}"] = await http.get(f"/v1/accounts/{account}/balances",
                                                 params={"at": _at(JAN + 20 * DAY_NS)})
        out[f"transfer{shard}"] = await http.get(f"/v1/transfers/{1000 * (shard + 1) + 1}")
    return out


async def _commit_new(client: Client, built: Built, transfer_id: int) -> None:
    """A new transfer on each database's shard commits (today's timestamp)."""
    for shard in (0, 1):
        a, b, _ = built.accounts[shard]
        codes = await client.create_transfers([Transfer(
            id=transfer_id + shard, debit_account_id=a, credit_account_id=b, amount=1,
            currency="EUR")])
        assert codes == [TransferResult.ok]


async def test_archive_and_restore_while_serving(ledger: tuple[Served, Built, str],
                                                 tmp_path: Path) -> None:
    """January archived while `serve` runs: reads into it answer 410 `archived` over HTTP
    and `archived` over RPC, a retry of an archived id `id_archived`, reads after it as
    before, new transfers commit, verify passes; after restore every read answers as
    before the archive and the retry `exists`."""
    served, built, token = ledger
    given = [arg for url in served.urls.values() for arg in ("--database-url", url)]
    retry = Transfer(id=1001, debit_account_id=built.accounts[0][0],
                     credit_account_id=built.accounts[0][1], amount=500, currency="EUR",
                     user_data="jan")
    # Idle connections are dropped well before the server's 5 s keep-alive timeout: the
    # CLI steps between requests can take about that long, and a connection the server
    # closes just as it is reused answers nothing ("Server disconnected").
    async with httpx.AsyncClient(base_url=served.base, timeout=30, headers={
            "Authorization": f"Bearer {token}"},
            limits=httpx.Limits(keepalive_expiry=2.0)) as http, \
            Client("127.0.0.1", served.rpc_port, token) as client:
        after = await _after_boundary(http, built)
        january = await _january(http, built)
        assert all(r.status_code == 200 for r in january.values()), january
        assert await client.create_transfers([retry]) == [TransferResult.exists]
        await _commit_new(client, built, 900_000)

        code, output = await _txproc("archive", "--before", "2026-02", "--to",
                                     str(tmp_path / "archives"), *given)
        assert code == 0, output
        assert output.count("archived 6 transfers and 2 resolutions of ") == 2, output
        [made] = list((tmp_path / "archives").iterdir())

        for what, answer in (await _january(http, built)).items():
            assert answer.status_code == 410, (what, answer.text)
            assert answer.json()["error"]["code"] == "archived"
            assert made.name in answer.json()["error"]["message"]
        for read in (client.get_account_transfers(built.accounts[1][0], from_ns=JAN),
                     client.get_account_balances(built.accounts[1][0], JAN + 20 * DAY_NS)):
            with pytest.raises(ClientError) as refused:
                await read
            assert refused.value.code == "archived" and made.name in str(refused.value)
        assert await client.create_transfers([retry]) == [TransferResult.id_archived]
        assert await client.lookup_transfers([1001]) == [None]
        assert await _after_boundary(http, built) == after
        await _commit_new(client, built, 900_010)
        code, output = await _txproc("verify", *given)
        assert code == 0 and "2 archive(s) in force" in output, output  # one a database

        code, output = await _txproc("restore", str(made), *given)
        assert code == 0 and f"restored {made.name} of db1" in output, output
        restored = await _january(http, built)
        for what, answer in restored.items():
            assert (answer.status_code, answer.json()) == (
                january[what].status_code, january[what].json()), what
        assert await _after_boundary(http, built) == after
        assert await client.create_transfers([retry]) == [TransferResult.exists]
        assert await client.lookup_transfers([1001]) != [None]
        code, output = await _txproc("verify", *given)
        assert code == 0 and "archive(s) in force" not in output, output
