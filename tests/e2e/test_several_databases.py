"""A ledger over two PostgreSQL servers (docs/design.md §12, "One database → several"):
`txproc serve` given `--database-url` twice, four shards dealt over the two databases
(shards 0 and 2 on main, 1 and 3 on db1), run as its own process with its own Ray so that
its shards do not take the session processor's actor names.

What it shows: each shard's rows land in its own database; transfers whose accounts share a
database commit as before, across shards too; a transfer between databases is refused with
``accounts_in_different_databases`` (422 over HTTP, the result code over RPC, in columns
too) and nothing of it or of its chain is stored; lookups, history, queries and the change
stream read each shard's rows from its database; `txproc verify` checks both. Payments run
too (one simulated provider): each payment's postings stay in its merchant account's
database, against the provider's clearing account in the merchant account's placement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from actors.database import (
    APP_PASSWORD_FILE_NAME,
    APP_ROLE,
    create_database,
    drop_database,
    read_password_file,
    write_password_file,
)
from processor.batch import TransferBatch
from processor.client import Client, ClientError
from processor.codes import AccountResult, TransferResult
from processor.errors import LedgerError
from processor.identity import DEFAULT_TENANT, SCOPES, issue_token, load_or_create_ring
from processor.ledger import PartitionMap
from processor.types import Account, AccountFlags, Transfer, TransferFlags
from tests.ports import free_port

TXPROC = [sys.executable, "-m", "actors.app.cli"]
SHARDS = 4
LAYOUT = PartitionMap.dealt(SHARDS, ("main", "db1"))
R = TransferResult


@dataclass(frozen=True)
class Served:
    base: str  # the HTTP API's root
    rpc_port: int
    token: str
    urls: dict[str, str]  # database key -> administrative URL
    pid: int  # the `txproc serve` process
    data_dir: Path  # its --data-dir (the token key ring is there)




@pytest.fixture(scope="module")
async def served(pg_admin_url: str, second_pg_admin_url: str, app_password_file: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """The ledger over two databases, with payments through one simulated provider; the
    fault tests below kill its parts (after the payments test). One serve for the module:
    each start is a Ray of its own."""
    async with _serving(pg_admin_url, second_pg_admin_url, app_password_file,
                        tmp_path_factory, ["--provider", "acme"]) as running:
        yield running


@contextlib.asynccontextmanager
async def _serving(pg_admin_url: str, second_pg_admin_url: str, app_password_file: Path,
                   tmp_path_factory: pytest.TempPathFactory,
                   payments: list[str]) -> AsyncIterator[Served]:
    name = f"txproc_mdb_{uuid.uuid4().hex[:12]}"
    urls = {"main": await create_database(pg_admin_url, name + "_a"),
            "db1": await create_database(second_pg_admin_url, name + "_b")}
    try:
        async with serving_over(urls, tmp_path_factory.mktemp("several-databases"),
                                app_password_file, ["--shards", str(SHARDS), *payments,
                                                    "--payments-cpu-nice", "0"]
                                ) as running:
            yield running
    finally:
        await drop_database(pg_admin_url, name + "_a")
        await drop_database(second_pg_admin_url, name + "_b")


@contextlib.asynccontextmanager
async def serving_over(urls: dict[str, str], data_dir: Path, app_password_file: Path,
                       args: list[str]) -> AsyncIterator[Served]:
    """`txproc serve` over the databases of ``urls`` (main first) with ``args``, in its own
    process and its own Ray, until ready; stopped on the way out. ``Served.token`` is the
    default tenant's, with every scope of a tenant."""
    # The session's servers keep the application role's password of the session: the
    # processor is given that one, so it changes no password other tests rely on.
    password = read_password_file(app_password_file, APP_ROLE)
    assert password is not None
    write_password_file(data_dir / APP_PASSWORD_FILE_NAME, APP_ROLE, password)
    http_port, rpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TXPROC_DATABASE_URL")}
    given = [arg for url in urls.values() for arg in ("--database-url", url)]
    proc = _start([
        "serve", "--data-dir", str(data_dir), "--http-port", str(http_port),
        "--rpc-port", str(rpc_port), "--metrics-port", "0", *args, *given], env)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 180
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if (await http.get(f"{base}/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await _sleep(0.5)
        if proc.poll() is not None or time.monotonic() >= deadline:
            raise AssertionError(f"never ready; serve said:\n{_stop(proc)[-4000:]}")
        ring = load_or_create_ring(data_dir, now_s=int(time.time()))
        token = issue_token(ring.active.secret, SCOPES, ttl_s=3600, now_s=int(time.time()),
                            tenant=DEFAULT_TENANT, subject="local")
        yield Served(base, rpc_port, token, urls, proc.pid, data_dir)
    finally:
        _stop(proc)


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([*TXPROC, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, then SIGKILL if it lingers; what it printed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate(timeout=30)
    return output


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TXPROC, *args], capture_output=True, text=True, timeout=120,
                          check=False)


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


class Ids:
    """Account ids by database and shard, and fresh transfer ids, for this module."""

    def __init__(self) -> None:
        self._next = int(time.time()) * 1_000_000 + 500_000

    def transfer(self) -> int:
        self._next += 1
        return self._next

    def account(self, shard: int) -> int:
        while True:
            self._next += 1
            if LAYOUT.shard_of(self._next) == shard:
                return self._next


@pytest.fixture(scope="module")
def ids() -> Ids:
    return Ids()


@pytest.fixture
async def client(served: Served) -> AsyncIterator[Client]:
    async with Client("127.0.0.1", served.rpc_port, served.token) as c:
        yield c


async def _accounts(client: Client, ids: Ids, shards: list[int]) -> list[int]:
    """One EUR account on each of these shards, funded from a bank account on its shard."""
    made = [ids.account(s) for s in shards]
    codes = await client.create_accounts([Account(id=i, currency="EUR") for i in made])
    assert codes == [AccountResult.ok] * len(made)
    return made


async def _rows(url: str, table: str, ids: list[int]) -> set[int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(f"SELECT id FROM {table} WHERE id = ANY($1::bigint[])", ids)
    finally:
        await conn.close()
    return {r["id"] for r in rows}


async def test_each_shard_writes_to_its_database(served: Served, client: Client,
                                                 ids: Ids) -> None:
    """Accounts and transfers are stored in the database of their shard only, and
    transfers within one database commit across shards as they always did."""
    a0, a1, a2, a3 = await _accounts(client, ids, [0, 1, 2, 3])
    within = [Transfer(id=ids.transfer(), debit_account_id=a0, credit_account_id=a2,
                       amount=5, currency="EUR"),  # main, shard 0 -> shard 2
              Transfer(id=ids.transfer(), debit_account_id=a3, credit_account_id=a1,
                       amount=7, currency="EUR")]  # db1, shard 3 -> shard 1
    assert await client.create_transfers(within) == [R.ok, R.ok]
    assert await _rows(served.urls["main"], "accounts", [a0, a1, a2, a3]) == {a0, a2}
    assert await _rows(served.urls["db1"], "accounts", [a0, a1, a2, a3]) == {a1, a3}
    assert await _rows(served.urls["main"], "transfers", [t.id for t in within]) == {
        within[0].id}
    assert await _rows(served.urls["db1"], "transfers", [t.id for t in within]) == {
        within[1].id}
    found = await client.lookup_accounts([a0, a1, a2, a3])
    assert [(a.id, a.debits_posted, a.credits_posted) for a in found if a is not None] == [
        (a0, 5, 0), (a1, 0, 7), (a2, 0, 5), (a3, 7, 0)]
    stored = await client.lookup_transfers([t.id for t in within])
    assert [t.id for t in stored if t is not None] == [t.id for t in within]


async def test_payments_postings_stay_in_each_merchant_accounts_database(
        served: Served, ids: Ids) -> None:
    """An authorization, a partial capture and a refund for a merchant account in each
    database: the balances are the payment's, every posting (hold, capture, refund hold and
    its post) is stored in the merchant account's database and none in the other, and no
    transfer between databases was needed for them; `txproc verify` passes over both."""
    merchants = [ids.account(0), ids.account(1)]  # shard 0 on main, shard 1 on db1
    async with Client("127.0.0.1", served.rpc_port, served.token) as client:
        codes = await client.create_accounts([
            Account(id=m, currency="USD", flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
            for m in merchants])
    assert codes == [AccountResult.ok] * 2
    headers = {"authorization": f"Bearer {served.token}"}
    async with httpx.AsyncClient(base_url=served.base, headers=headers, timeout=30) as http:
        for m in merchants:
            idem, deadline = uuid.uuid4().hex, time.monotonic() + 60
            body = {"amount": 800, "currency": "USD", "merchant_account_id": m,
                    "payment_method": "pm_4242_" + uuid.uuid4().hex[:12], "capture": False,
                    "provider": "acme"}
            while True:  # 503 while the payments actor is still starting; same key again
                r = await http.post("/v1/payments", headers={"idempotency-key": idem},
                                    json=body)
                if r.status_code != 503 or time.monotonic() > deadline:
                    break
                await _sleep(0.5)
            assert (r.status_code, r.json()["status"]) == (201, "authorized"), r.text
            payment = r.json()["id"]
            r = await http.post(f"/v1/payments/{payment}/capture", json={"amount": 500},
                                headers={"idempotency-key": uuid.uuid4().hex})
            assert (r.status_code, r.json()["status"]) == (200, "captured"), r.text
            r = await http.post(f"/v1/payments/{payment}/refunds", json={"amount": 100},
                                headers={"idempotency-key": uuid.uuid4().hex})
            assert r.status_code == 200, r.text
    async with Client("127.0.0.1", served.rpc_port, served.token) as client:
        found = await client.lookup_accounts(merchants)
    assert [(a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted)
            for a in found if a is not None] == [(0, 100, 0, 500)] * 2
    for m, home, other in ((merchants[0], "main", "db1"), (merchants[1], "db1", "main")):
        counts = {}
        for db in (home, other):
            conn = await asyncpg.connect(served.urls[db])
            try:
                counts[db] = (
                    await conn.fetchval("SELECT count(*) FROM transfers WHERE "
                                        "debit_account_id = $1 OR credit_account_id = $1", m),
                    await conn.fetchval("SELECT count(*) FROM crossdb_transfers WHERE "
                                        "debit_account_id = $1 OR credit_account_id = $1", m))
            finally:
                await conn.close()
        assert counts == {home: (4, 0), other: (0, 0)}
    both = await asyncio.to_thread(_run, [
        "verify", "--json", "--database-url", served.urls["main"],
        "--database-url", served.urls["db1"]])
    assert both.returncode == 0, both.stdout + both.stderr


async def test_linked_and_pending_transfers_between_databases_are_refused(
        served: Served, client: Client, ids: Ids) -> None:
    """A transfer between databases inside a linked chain, or a pending one, answers
    accounts_in_different_databases (over RPC and as a 422 over HTTP), the rest of its
    chain linked_event_failed; other chains of the request commit; nothing refused is
    stored or burned, so the same request answers the same again."""
    a0, a1, a2, a3 = await _accounts(client, ids, [0, 1, 2, 3])
    linked, pending = int(TransferFlags.LINKED), int(TransferFlags.PENDING)
    request = [
        Transfer(id=ids.transfer(), debit_account_id=a0, credit_account_id=a2, amount=1,
                 currency="EUR"),                              # main only: ok
        Transfer(id=ids.transfer(), debit_account_id=a0, credit_account_id=a2, amount=1,
                 currency="EUR", flags=linked),                # chain: main ...
        Transfer(id=ids.transfer(), debit_account_id=a2, credit_account_id=a1, amount=1,
                 currency="EUR"),                              # ... then main -> db1
        Transfer(id=ids.transfer(), debit_account_id=a3, credit_account_id=a0, amount=1,
                 currency="EUR", flags=pending, timeout_s=60),  # a hold across
        Transfer(id=ids.transfer(), debit_account_id=a1, credit_account_id=a3, amount=1,
                 currency="EUR"),                              # db1 only: ok
    ]
    expected = [R.ok, R.linked_event_failed, R.accounts_in_different_databases,
                R.accounts_in_different_databases, R.ok]
    assert await client.create_transfers(request) == expected
    refused = [t.id for t, code in zip(request, expected, strict=True) if code != R.ok]
    for url in served.urls.values():
        assert await _rows(url, "transfers", refused) == set()
        assert await _rows(url, "failed_transfers", refused) == set()
    again = await client.create_transfers(request)
    assert again == [R.exists, *expected[1:4], R.exists]
    auth = {"Authorization": f"Bearer {served.token}"}
    async with httpx.AsyncClient(base_url=served.base, headers=auth, timeout=10) as http:
        r = await http.post("/v1/transfers", json={
            "id": ids.transfer(), "debit_account_id": a2, "credit_account_id": a3,
            "amount": 1, "currency": "EUR", "flags": ["pending"], "timeout_s": 60})
        assert (r.status_code, r.json()["error"]["code"]) == (
            422, "accounts_in_different_databases"), r.text


async def _log(url: str, transfer_ids: list[int]) -> dict[int, tuple[str, int | None]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id, state, result FROM crossdb_transfers "
                                "WHERE id = ANY($1::bigint[])", transfer_ids)
    finally:
        await conn.close()
    return {r["id"]: (r["state"], r["result"]) for r in rows}


async def test_a_transfer_between_databases_moves_through_transit_accounts(
        served: Served, client: Client, ids: Ids) -> None:
    """A plain transfer between databases commits as two steps, one in each database,
    over RPC (objects and columns) and HTTP (201 with the transfer as sent); a repeat
    answers exists and moves nothing again; the log records each as credited."""
    a0, a1, a2, a3 = await _accounts(client, ids, [0, 1, 2, 3])
    request = [Transfer(id=ids.transfer(), debit_account_id=d, credit_account_id=c,
                        amount=a, currency="EUR")
               for d, c, a in [(a0, a1, 10), (a3, a2, 20), (a0, a2, 1)]]
    assert await client.create_transfers(request) == [R.ok, R.ok, R.ok]
    assert await client.create_transfers(request) == [R.exists, R.exists, R.exists]
    batch = TransferBatch.from_transfers([
        Transfer(id=ids.transfer(), debit_account_id=a2, credit_account_id=a3, amount=5,
                 currency="EUR"),
        Transfer(id=ids.transfer(), debit_account_id=a1, credit_account_id=a3, amount=2,
                 currency="EUR")])
    codes = await client.create_transfers(batch)
    assert [TransferResult(int(c)) for c in codes] == [R.ok, R.ok]
    auth = {"Authorization": f"Bearer {served.token}"}
    single = {"id": ids.transfer(), "debit_account_id": a1, "credit_account_id": a0,
              "amount": 3, "currency": "EUR"}
    async with httpx.AsyncClient(base_url=served.base, headers=auth, timeout=10) as http:
        r = await http.post("/v1/transfers", json=single)
        assert r.status_code == 201, r.text
        body = r.json()
        assert (body["debit_account_id"], body["credit_account_id"]) == (a1, a0), body
    balances = {a.id: (a.debits_posted, a.credits_posted)
                for a in await client.lookup_accounts([a0, a1, a2, a3]) if a is not None}
    assert balances == {a0: (11, 3), a1: (5, 10), a2: (5, 21), a3: (20, 7)}
    crossing = [request[0].id, request[1].id, single["id"]]
    # A lookup answers the transfer as sent, not one of its steps.
    looked = await client.lookup_transfers(crossing)
    assert [(t.debit_account_id, t.credit_account_id, t.amount) for t in looked
            if t is not None] == [(a0, a1, 10), (a3, a2, 20), (a1, a0, 3)]
    logs = {**await _log(served.urls["main"], crossing), **await _log(served.urls["db1"],
                                                                       crossing)}
    assert logs == {i: ("credited", 0) for i in crossing}


async def test_a_refused_credit_is_compensated(served: Served, client: Client,
                                               ids: Ids) -> None:
    """When the credit side refuses (a limit, an account that does not exist), the debit
    is given back by a compensation in its own database and the transfer answers the
    refusal; a repeat answers the same, and nothing moves twice."""
    a0, = await _accounts(client, ids, [0])
    limited = ids.account(1)
    flags = int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
    assert await client.create_accounts([Account(id=limited, currency="EUR", flags=flags)]
                                        ) == [AccountResult.ok]
    missing = ids.account(3)
    request = [Transfer(id=ids.transfer(), debit_account_id=a0, credit_account_id=c,
                        amount=9, currency="EUR") for c in (limited, missing)]
    expected = [R.exceeds_debits, R.credit_account_not_found]
    assert await client.create_transfers(request) == expected
    assert await client.create_transfers(request) == expected
    [found] = await client.lookup_accounts([a0])
    assert found is not None and (found.debits_posted, found.credits_posted) == (18, 18)
    assert await client.lookup_transfers([t.id for t in request]) == [None, None]
    logs = await _log(served.urls["main"], [t.id for t in request])
    assert logs == {t.id: ("compensated", int(code))
                    for t, code in zip(request, expected, strict=True)}


async def test_the_relay_finishes_what_a_front_left(served: Served, client: Client,
                                                    ids: Ids) -> None:
    """A logged transfer no front drives any more (its front died after writing the row)
    is finished by the relay of its debit database: credited, or compensated when its
    credit side refuses."""
    a0, a1 = await _accounts(client, ids, [0, 1])
    t_ok, t_missing = ids.transfer(), ids.transfer()
    conn = await asyncpg.connect(served.urls["main"])
    try:
        for t, credit in ((t_ok, a1), (t_missing, ids.account(3))):
            await conn.execute(
                "INSERT INTO crossdb_transfers (id, tenant, debit_account_id, "
                "credit_account_id, amount, currency, code, user_data, debit_database, "
                "credit_database, state, updated_at) VALUES ($1, $2, $3, $4, 4, 'EUR', 0, "
                "'', 'main', 'db1', 'started', now() - interval '1 minute')",
                t, await conn.fetchval("SELECT tenant FROM accounts WHERE id = $1", a0),
                a0, credit)
    finally:
        await conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        logs = await _log(served.urls["main"], [t_ok, t_missing])
        if all(state in ("credited", "compensated") for state, _ in logs.values()):
            break
        await _sleep(0.5)
    assert logs == {t_ok: ("credited", 0),
                    t_missing: ("compensated", int(R.credit_account_not_found))}
    balances = {a.id: (a.debits_posted, a.credits_posted)
                for a in await client.lookup_accounts([a0, a1]) if a is not None}
    assert balances == {a0: (8, 4), a1: (0, 4)}


async def test_history_queries_and_the_stream_read_every_database(
        served: Served, client: Client, ids: Ids) -> None:
    """An account's history and balances come from its own database; the tenant's query
    and the change stream merge both databases' rows, each transfer once."""
    a0, a1, a2, a3 = await _accounts(client, ids, [0, 1, 2, 3])
    made = [Transfer(id=ids.transfer(), debit_account_id=d, credit_account_id=c, amount=3,
                     currency="EUR", code=4242)
            for d, c in [(a0, a2), (a1, a3), (a2, a0), (a3, a1), (a0, a2), (a3, a1)]]
    assert await client.create_transfers(made) == [R.ok] * len(made)
    want = {t.id for t in made}
    mine = {made[1].id, made[3].id, made[5].id}  # a3's
    deadline = time.monotonic() + 30
    while True:  # the history horizon follows each shard's checkpoints
        page = await client.get_account_transfers(a3, limit=10)
        queried: list[int] = []
        cursor = ""
        while True:
            q = await client.query_transfers(code=4242, limit=2, cursor=cursor)
            queried += [t.id for t in q.data]
            if q.next_cursor is None:
                break
            cursor = q.next_cursor
        done = {t.id for t in page.data} == mine and want <= set(queried)
        if done or time.monotonic() > deadline:
            break
        await _sleep(0.5)
    assert sorted(t.id for t in page.data) == sorted(mine)
    assert want <= set(queried) and len(queried) == len(set(queried))
    at = max(t.timestamp for t in page.data)
    balances = await client.get_account_balances(a3, at)
    assert (balances.debits_posted, balances.credits_posted) == (6, 3)
    streamed: list[int] = []
    rows: list[tuple[int, int, int]] = []
    shard_of: dict[int, int] = {}
    after = ""
    for _ in range(10_000):
        s = await client.stream_transfers(after, limit=50)
        streamed += [t.id for t in s.data]
        rows += [(t.id, t.debit_account_id, t.credit_account_id) for t in s.data]
        shard_of.update((t.id, shard) for t, shard in zip(s.data, s.shards, strict=True))
        after = s.next_cursor
        if want <= set(streamed):
            break
        if not s.data:
            await _sleep(0.2)
    # Each stored row once; a transfer between databases (other tests') is two rows, its
    # steps, one in each database, under its id.
    assert want <= set(streamed) and len(rows) == len(set(rows))
    # Each from the shard that coordinated it (its debit account's), of either database.
    assert {shard_of[t.id] for t in made} == {0, 1, 2, 3}
    assert all(shard_of[t.id] == LAYOUT.shard_of(t.debit_account_id) for t in made)


async def test_a_front_killed_between_steps_loses_and_doubles_nothing(
        served: Served, ids: Ids) -> None:
    """SIGKILL of the front while transfers between databases are in flight: the relay
    finishes every one whose row was written, the gateway's resend of every request
    answers ok or exists, and the money moved is exactly the sum of the transfers, once,
    on both sides."""
    async with Client("127.0.0.1", served.rpc_port, served.token) as c:
        a0, a1 = await _accounts(c, ids, [0, 1])
    requests = [[Transfer(id=ids.transfer(), debit_account_id=a0, credit_account_id=a1,
                          amount=1 + (k % 7), currency="EUR") for k in range(5)]
                for _ in range(200)]
    total = sum(t.amount for r in requests for t in r)

    async def gateway() -> int:
        """How many requests were answered before the front went away."""
        async with Client("127.0.0.1", served.rpc_port, served.token) as c:
            for n, r in enumerate(requests):
                try:
                    await c.create_transfers(r)
                except (LedgerError, ClientError, TimeoutError, OSError):
                    return n  # everything is resent below
        return len(requests)

    sending = asyncio.create_task(gateway())
    await _sleep(0.3)
    fronts = [p for p in psutil.Process(served.pid).children(recursive=True)
              if "ray::Front" in " ".join(_cmdline(p))]
    assert fronts, "the front's process"
    for p in fronts:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    answered = await asyncio.wait_for(sending, timeout=60)
    assert 0 < answered < len(requests), answered  # the kill fell inside the burst
    deadline = time.monotonic() + 120
    answers: list[TransferResult] = []
    while True:  # the supervisor starts the front again on its ports
        try:
            async with Client("127.0.0.1", served.rpc_port, served.token) as c:
                answers = []
                for r in requests:
                    answers += await c.create_transfers(r)
            break
        except (LedgerError, ClientError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            await _sleep(0.5)
    assert set(answers) <= {R.ok, R.exists}
    every = [t.id for r in requests for t in r]
    assert set((await _log(served.urls["main"], every)).values()) == {("credited", 0)}
    async with Client("127.0.0.1", served.rpc_port, served.token) as c:
        found = await c.lookup_accounts([a0, a1])
    assert [(a.debits_posted, a.credits_posted) for a in found if a is not None] == [
        (total, 0), (0, total)]


async def _epochs(url: str) -> dict[int, int]:
    conn = await asyncpg.connect(url)
    try:
        return {r["shard"]: r["epoch"] for r in await conn.fetch(
            "SELECT shard, epoch FROM shard_epochs")}
    finally:
        await conn.close()


async def test_killed_shards_recover_from_their_own_database(
        served: Served, client: Client, ids: Ids) -> None:
    """SIGKILL of every shard process: each comes back with the next epoch taken in its
    own database, its accounts' balances rebuilt from that database's rows, and transfers
    within either database go on."""
    a0, a1, a2, a3 = await _accounts(client, ids, [0, 1, 2, 3])
    before = [Transfer(id=ids.transfer(), debit_account_id=d, credit_account_id=c,
                       amount=11, currency="EUR") for d, c in [(a0, a2), (a1, a3)]]
    assert await client.create_transfers(before) == [R.ok, R.ok]
    epochs = {k: await _epochs(url) for k, url in served.urls.items()}
    assert set(epochs["main"]) == {0, 2} and set(epochs["db1"]) == {1, 3}
    victims = [p for p in psutil.Process(served.pid).children(recursive=True)
               if "LedgerShard" in " ".join(_cmdline(p))]
    assert len(victims) == SHARDS
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    after = [Transfer(id=ids.transfer(), debit_account_id=d, credit_account_id=c,
                      amount=1, currency="EUR") for d, c in [(a2, a0), (a3, a1)]]
    deadline = time.monotonic() + 120
    codes: dict[int, R] = {}
    while True:  # the front retries a restarting shard; a request may still fail whole,
        # or answer not_applied for the part of a shard still away (docs/api.md: send
        # that part again)
        pending = [t for t in after if codes.get(t.id, R.not_applied) is R.not_applied]
        if not pending:
            break
        try:
            codes.update(zip([t.id for t in pending], await client.create_transfers(pending),
                             strict=True))
        except (LedgerError, ClientError, TimeoutError):
            pass
        if any(c is R.not_applied for c in codes.values()) or len(codes) < len(after):
            assert time.monotonic() < deadline, codes
            await _sleep(0.5)
    # exists: a resend of a part whose first answer was lost with a failed request
    assert all(codes[t.id] in (R.ok, R.exists) for t in after), codes
    for key, url in served.urls.items():
        now = await _epochs(url)
        assert set(now) == set(epochs[key])
        assert all(now[s] > epochs[key][s] for s in now), (key, epochs[key], now)
    found = await client.lookup_accounts([a0, a1, a2, a3])
    assert [(a.debits_posted, a.credits_posted) for a in found if a is not None] == [
        (11, 1), (11, 1), (1, 11), (1, 11)]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


async def test_audit_names_who_made_a_row_of_either_database(
        served: Served, client: Client, ids: Ids) -> None:
    """`txproc audit` given both databases finds the request that made an account or a
    transfer kept in the further database (its record is in main's audit log)."""
    a0, a1, a3 = await _accounts(client, ids, [0, 1, 3])
    t = Transfer(id=ids.transfer(), debit_account_id=a1, credit_account_id=a3, amount=1,
                 currency="EUR")  # db1 -> db1
    assert await client.create_transfers([t]) == [R.ok]
    urls = ["--database-url", served.urls["main"], "--database-url", served.urls["db1"]]
    for kind, object_id in (("account", a1), ("transfer", t.id), ("account", a0)):
        done = await asyncio.to_thread(_run, ["audit", f"--{kind}", str(object_id), *urls])
        assert done.returncode == 0, done.stdout + done.stderr
        assert f'"object": "{object_id}"' in done.stdout
    alone = await asyncio.to_thread(
        _run, ["audit", "--account", str(a1), "--database-url", served.urls["main"]])
    assert alone.returncode == 1  # main alone does not hold it


async def test_verify_checks_every_database(served: Served, client: Client,
                                            ids: Ids) -> None:
    """`txproc verify` given both databases checks each (its own rows, chains and
    balances) and passes; given only the main one it passes on main alone."""
    await _accounts(client, ids, [0, 1])
    both = await asyncio.to_thread(_run, [
        "verify", "--json", "--database-url", served.urls["main"],
        "--database-url", served.urls["db1"]])
    assert both.returncode == 0, both.stdout + both.stderr
    assert '"databases": 2' in both.stdout
    # The sagas of the other tests moved money between the databases (all finished): it
    # is all there, each transit account mirroring its pair's.
    assert '"transit_pairs"' in both.stdout and "transit_skipped" not in both.stdout
    # A log row claiming a credit that never moved breaks the mirror, and verify says so.
    a0, = await _accounts(client, ids, [0])
    conn = await asyncpg.connect(served.urls["main"])
    try:
        tenant = await conn.fetchval("SELECT tenant FROM accounts WHERE id = $1", a0)
        forged = ids.transfer()
        await conn.execute(
            "INSERT INTO crossdb_transfers (id, tenant, debit_account_id, credit_account_id, "
            "amount, currency, code, user_data, debit_database, credit_database, state, "
            "result) VALUES ($1, $2, $3, $4, 7, 'EUR', 0, '', 'main', 'db1', 'credited', 0)",
            forged, tenant, a0, ids.account(1))
        broken = await asyncio.to_thread(_run, [
            "verify", "--database-url", served.urls["main"],
            "--database-url", served.urls["db1"]])
    finally:
        await conn.execute("DELETE FROM crossdb_transfers WHERE id = $1", forged)
        await conn.close()
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "transit_mirror" in broken.stdout
    main = await asyncio.to_thread(
        _run, ["verify", "--json", "--database-url", served.urls["main"]])
    assert main.returncode == 0, main.stdout + main.stderr
    assert '"databases"' not in main.stdout
