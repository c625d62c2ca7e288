"""The change stream over real RPC and HTTP, a real processor (two shards, PostgreSQL, Ray).

Every committed transfer of the caller's tenant arrives once, in timestamp order per shard,
while transfers commit on both shards; another tenant's never; a consumer resumes from a
saved cursor across a SIGKILL of a shard and its own restart without a gap or a repeat;
bad cursors and missing scopes are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import ray

from actors.app.runtime import Processor
from processor.client import Client, ClientError
from processor.codes import TransferResult
from processor.errors import LedgerError
from processor.ledger.partition import PartitionMap
from processor.stream import StreamCursor, StreamPage, encode_stream_cursor, item_cursors
from processor.types import ID_MAX, Transfer
from tests.running import SHARDS, IdSource, create_eur_accounts, token_for

# A transfer is in the stream once its shard's commit is: milliseconds; allow for a slow,
# shared machine and a shard restarting.
ARRIVES_WITHIN_S = 60.0
ACKNOWLEDGED = {TransferResult.ok, TransferResult.exists}


class Delivered(msgspec.Struct, frozen=True):
    cursor: str
    transfer: Transfer
    shard: int


def _t(tid: int, debit: int, credit: int) -> Transfer:
    return Transfer(id=tid, debit_account_id=debit, credit_account_id=credit, amount=1,
                    currency="EUR")


def _delivered(after: str, page: StreamPage) -> list[Delivered]:
    return [Delivered(c, t, s) for c, t, s in zip(item_cursors(after, page), page.data,
                                                  page.shards, strict=True)]


async def _read_until(client: Client, after: str, wanted: set[int], *, limit: int
                      ) -> tuple[list[Delivered], str]:
    """Page from ``after`` until every id of ``wanted`` arrived; what arrived, and the
    cursor after it."""
    out: list[Delivered] = []
    deadline = time.monotonic() + ARRIVES_WITHIN_S
    seen: set[int] = set()
    while not wanted <= seen:
        assert time.monotonic() < deadline, f"{len(wanted - seen)} transfers never arrived"
        page = await client.stream_transfers(after, limit=limit, wait_s=1.0)
        out += _delivered(after, page)
        seen |= {t.id for t in page.data}
        after = page.next_cursor
    return out, after


def _check_once_in_shard_order(delivered: list[Delivered]) -> None:
    ids = [d.transfer.id for d in delivered]
    assert len(ids) == len(set(ids)), "a transfer was delivered twice"
    for shard in {d.shard for d in delivered}:
        stamps = [d.transfer.timestamp for d in delivered if d.shard == shard]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), shard


async def test_every_transfer_arrives_once_while_both_shards_commit(
        processor: Processor, client: Client, http: httpx.AsyncClient, ids: IdSource) -> None:
    """Paging the stream in pages of 7 while another task commits transfers coordinated
    by both shards (and another tenant commits its own) delivers each of the tenant's
    transfers exactly once, each shard's in timestamp order, and none of the other
    tenant's; the HTTP lines carry the same transfers with cursors that resume after
    each; a long poll returns the transfer committed while it waited."""
    hub, *others = ids.take(9)
    # Ids hash to partitions, and a transfer is coordinated by its debit account's shard:
    # make sure a counterparty that debits (even k below) lives on the hub's other shard.
    owner = PartitionMap.uniform(SHARDS).shard_of
    while len({owner(hub), *(owner(o) for o in others[::2])}) < 2:
        others[0] = ids.one()
    await create_eur_accounts(client, [hub, *others])
    beta_token = token_for(processor, tenant="beta", subject="b")
    beta_accounts = ids.take(2)
    written: list[int] = []
    beta_written: list[int] = []
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            batch = [_t(ids.one(), *((hub, o) if k % 2 else (o, hub)))
                     for k, o in enumerate(others)]
            codes = await client.create_transfers(batch)
            assert set(codes) == {TransferResult.ok}
            written.extend(t.id for t in batch)
            await asyncio.sleep(0.005)

    async def beta_writer(beta: Client) -> None:
        while not stop.is_set():
            batch = [_t(ids.one(), *beta_accounts) for _ in range(3)]
            assert set(await beta.create_transfers(batch)) == {TransferResult.ok}
            beta_written.extend(t.id for t in batch)
            await asyncio.sleep(0.02)

    async with Client("127.0.0.1", processor.rpc_port, beta_token) as beta:
        await create_eur_accounts(beta, beta_accounts)
        # Start at the stream's end now: what earlier tests committed is not this test's.
        start = await _end(client)
        beta_start = await _end(beta)
        tasks = [asyncio.create_task(writer()), asyncio.create_task(beta_writer(beta))]
        delivered: list[Delivered] = []
        after = start
        try:
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                page = await client.stream_transfers(after, limit=7)
                delivered += _delivered(after, page)
                after = page.next_cursor
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        rest, after = await _read_until(client, after, set(written) - {
            d.transfer.id for d in delivered}, limit=7)
        delivered += rest
        beta_got, _ = await _read_until(beta, beta_start, set(beta_written), limit=500)
    assert len(written) > 50 and len(delivered) > len(written) // 2
    _check_once_in_shard_order(delivered)
    assert {d.transfer.id for d in delivered} == set(written)
    assert {d.shard for d in delivered} == {0, 1}, "the hub's transfers span both shards"
    assert {d.transfer.id for d in beta_got} == set(beta_written)
    assert not {d.transfer.id for d in beta_got} & set(written)
    # HTTP: the same transfers from the same start, a line each, then the cursor.
    lines: list[dict[str, object]] = []
    cursor = start
    while len(lines) < len(written):
        r = await http.get("/v1/transfers/stream",
                           params={"after": cursor, "limit": "100", "wait": "0"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/x-ndjson")
        *items, end = [msgspec.json.decode(line) for line in r.content.splitlines()]
        assert end == {"next_cursor": r.headers["txproc-next-cursor"]}
        lines += items
        cursor = end["next_cursor"]
    assert [line["transfer"]["id"] for line in lines] == [  # type: ignore[index]
        d.transfer.id for d in sorted(delivered, key=lambda d: (d.transfer.timestamp,
                                                                d.shard, d.transfer.id))]
    # A line's cursor resumes right after it.
    middle = len(lines) // 2
    resumed, _ = await _read_until(client, str(lines[middle]["cursor"]), {
        int(line["transfer"]["id"]) for line in lines[middle + 1:]},  # type: ignore[index]
        limit=1000)
    assert [d.transfer.id for d in resumed] == [
        line["transfer"]["id"] for line in lines[middle + 1:]]  # type: ignore[index]
    # A long poll from the end answers with what commits while it waits.
    end_cursor = await _end(client)
    poll = asyncio.create_task(client.stream_transfers(end_cursor, wait_s=15.0))
    await asyncio.sleep(0.3)
    late = ids.one()
    assert await client.create_transfers([_t(late, hub, others[0])]) == [TransferResult.ok]
    page = await poll
    assert [t.id for t in page.data] == [late]


async def _end(client: Client) -> str:
    """The cursor after everything the caller's tenant has in the stream now."""
    after = ""
    while True:
        page = await client.stream_transfers(after, limit=8189)
        after = page.next_cursor
        if len(page.data) < 8189:
            return after


async def _stats_when_back(shard: object) -> dict[str, float]:
    for _ in range(240):
        try:
            return await shard.stats.remote()  # type: ignore[attr-defined, no-any-return]
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            await asyncio.sleep(0.25)
    raise AssertionError("the shard did not come back")


async def test_a_consumer_resumes_across_a_shard_sigkill_and_its_own_restart(
        processor: Processor, client: Client, ids: IdSource) -> None:
    """A consumer reads part of the stream and saves a cursor from the middle of a page;
    a shard is SIGKILLed and comes back while transfers keep being committed (retried
    until answered); a new client from the saved cursor then reads the rest. What the two
    consumers read together is every acknowledged transfer, exactly once."""
    hub, *others = ids.take(7)
    await create_eur_accounts(client, [hub, *others])
    start = await _end(client)
    acknowledged: list[int] = []
    stop = asyncio.Event()

    async def writer() -> None:
        async with Client("127.0.0.1", processor.rpc_port, token_for(processor),
                          timeout_s=60) as gateway:
            while not stop.is_set():
                batch = [_t(ids.one(), *((hub, o) if k % 2 else (o, hub)))
                         for k, o in enumerate(others)]
                for _ in range(600):
                    try:
                        codes = await gateway.create_transfers(batch)
                    except (LedgerError, ClientError, ConnectionError, TimeoutError) as exc:
                        assert getattr(exc, "retryable", True), exc
                        await asyncio.sleep(0.25)
                        continue
                    assert set(codes) <= {*ACKNOWLEDGED, TransferResult.not_applied}, codes
                    acknowledged.extend(t.id for t, c in zip(batch, codes, strict=True)
                                        if c in ACKNOWLEDGED)
                    # Not applied (a shard's peer was down): sent again, as docs/api.md says.
                    batch = [t for t, c in zip(batch, codes, strict=True)
                             if c == TransferResult.not_applied]
                    if not batch:
                        break
                    await asyncio.sleep(0.25)
                else:
                    raise AssertionError("a batch was never answered")
                await asyncio.sleep(0.01)

    async def acknowledged_at_least(count: int) -> None:
        while len(acknowledged) < count:
            if task.done():
                task.result()  # the writer failed: its error, not a hang
                raise AssertionError("the writer stopped")
            await asyncio.sleep(0.05)

    task = asyncio.create_task(writer())
    try:
        await acknowledged_at_least(60)
        async with Client("127.0.0.1", processor.rpc_port, token_for(processor)) as first:
            before, _ = await _read_until(first, start, set(acknowledged[:30]), limit=11)
        # Saved mid-page: everything after it is the second consumer's.
        saved = len(before) // 2
        consumed_first = before[: saved + 1]
        victim = processor.shards[0]
        stats = await _stats_when_back(victim)
        assert b"LedgerShard" in Path(f"/proc/{stats['pid']}/cmdline").read_bytes()
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(stats["pid"]), signal.SIGKILL)
        await asyncio.sleep(1.0)
        after_kill = await _stats_when_back(victim)
        assert after_kill["epoch"] > stats["epoch"]
        await acknowledged_at_least(len(acknowledged) + 60)
    finally:
        stop.set()
        await task
    async with Client("127.0.0.1", processor.rpc_port, token_for(processor)) as second:
        wanted = set(acknowledged) - {d.transfer.id for d in consumed_first}
        consumed_second: list[Delivered] = []
        deadline = time.monotonic() + ARRIVES_WITHIN_S
        async for item in second.subscribe_transfers(consumed_first[-1].cursor, limit=13,
                                                     wait_s=1.0):
            consumed_second.append(Delivered(item.cursor, item.transfer, -1))
            wanted.discard(item.transfer.id)
            if not wanted:
                break
            assert time.monotonic() < deadline, f"{len(wanted)} never arrived"
    ids_first = [d.transfer.id for d in consumed_first]
    ids_second = [d.transfer.id for d in consumed_second]
    assert not set(ids_first) & set(ids_second), "delivered again after the resume"
    assert len(ids_second) == len(set(ids_second))
    assert set(ids_first) | set(ids_second) == set(acknowledged)


async def test_bad_cursors_limits_and_scopes_are_refused(
        processor: Processor, client: Client, http: httpx.AsyncClient) -> None:
    """A cursor the stream did not give (garbage, another shard count, ahead of the
    ledger) is 400 invalid_cursor over HTTP and the request error invalid_cursor over
    RPC; limits out of range are invalid_query; a token without transfers:read is 403
    scope_missing, and over RPC scope_missing."""
    bad = {
        "garbage": "nonsense",
        "three shards": encode_stream_cursor(StreamCursor((1, 2, 3))),
        "ahead": encode_stream_cursor(StreamCursor((ID_MAX, ID_MAX))),
        "too long": "A" * 3000,
    }
    for why, cursor in bad.items():
        r = await http.get("/v1/transfers/stream", params={"after": cursor, "wait": "0"})
        assert r.status_code == 400, why
        assert r.json()["error"]["code"] == "invalid_cursor", why
        if len(cursor) < 2800:
            with pytest.raises(ClientError) as refused:
                await client.stream_transfers(cursor)
            assert refused.value.code == "invalid_cursor", why
    for params in ({"limit": "0"}, {"limit": "8190"}, {"wait": "21"}, {"wait": "1.5"},
                   {"cursor": "x"}, {"after": "", "limit": "1", "wait": "0", "x": "1"}):
        r = await http.get("/v1/transfers/stream", params=params)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_query", params
    for kwargs in ({"limit": 0}, {"limit": 8190}, {"wait_s": 20.5}, {"wait_s": -1.0}):
        with pytest.raises(ClientError) as refused:
            await client.stream_transfers("", **kwargs)  # type: ignore[arg-type]
        assert refused.value.code == "invalid_query", kwargs
    reader = token_for(processor, scopes=("accounts:read", "transfers:write"))
    r = await http.get("/v1/transfers/stream", headers={"Authorization": f"Bearer {reader}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "scope_missing"
    async with Client("127.0.0.1", processor.rpc_port, reader) as limited:
        with pytest.raises(ClientError) as refused:
            await limited.stream_transfers("")
        assert refused.value.code == "scope_missing"
