"""The ledger benchmark's parts: workloads, load drivers and server-side measurements.

The workload generators and the figure helpers at the top are pure (seeded randomness, no
Ray, no sockets), so unit tests import this module cheaply. The drivers take an already
running processor's ports; ``bench/__main__.py`` starts the processor and strings the
phases together, and ``loadtests/run.py`` reuses the process accounting.

Figures are printed and recorded, never asserted: this machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import msgspec
import numpy as np
import psutil

from processor.types import Account, Transfer

__all__ = [
    "AMOUNT_MAX_BENCH",
    "CURRENCY",
    "HTTP_CLIENTS",
    "HttpTransferBody",
    "RssSampler",
    "ServerProcesses",
    "drive_batches",
    "drive_http_open_loop",
    "hot_transfers",
    "latency_summary_ms",
    "listening_pid",
    "make_accounts",
    "percentile",
    "postmaster_pid_of",
    "run_pgbench",
    "shard_stats",
    "shard_stats_delta",
    "transfer_body_json",
    "uniform_transfers",
]

CURRENCY = "EUR"
# Transfers move 1..AMOUNT_MAX_BENCH minor units; the accounts carry no limit flags, so
# every well-formed transfer is accepted and the benchmark measures the accepted path.
AMOUNT_MAX_BENCH = 10_000
HOT_SHARE_DEFAULT = 0.5

# Process groups whose CPU counts as the server's; "ray_other" (raylet, GCS, idle workers)
# and "client" (this process) are reported beside them, not in the sum.
SERVER_GROUPS = ("shards", "front", "postgres")
HTTP_CONNECTIONS_PER_CLIENT = 4


# -- workloads (pure) ---------------------------------------------------------------------


def make_accounts(first_id: int, count: int) -> list[Account]:
    """``count`` accounts with ids ``first_id``.., without limit flags."""
    if count < 3:
        raise ValueError("a workload needs at least 3 accounts")
    return [Account(id=first_id + i, currency=CURRENCY) for i in range(count)]


def uniform_transfers(
    account_ids: Sequence[int], count: int, *, first_id: int, rng: random.Random
) -> list[Transfer]:
    """``count`` transfers between two distinct accounts drawn uniformly.

    Ids are ``first_id`` .. ``first_id + count - 1``; amounts 1..AMOUNT_MAX_BENCH.
    """
    n = len(account_ids)
    if n < 2:
        raise ValueError("uniform transfers need at least 2 accounts")
    out: list[Transfer] = []
    randrange = rng.randrange
    for i in range(count):
        a = randrange(n)
        b = randrange(n - 1)
        if b >= a:
            b += 1
        out.append(Transfer(id=first_id + i, debit_account_id=account_ids[a],
                            credit_account_id=account_ids[b],
                            amount=randrange(1, AMOUNT_MAX_BENCH + 1), currency=CURRENCY))
    return out


def hot_transfers(
    account_ids: Sequence[int],
    count: int,
    *,
    first_id: int,
    rng: random.Random,
    hot_share: float = HOT_SHARE_DEFAULT,
) -> list[Transfer]:
    """Like ``uniform_transfers``, but a ``hot_share`` of them touch ``account_ids[0]``.

    The hot account is the debit side of half of those and the credit side of the other
    half, so its balance stays near zero and it is contended from both directions.
    """
    if not 0.0 <= hot_share <= 1.0:
        raise ValueError("hot_share must be within 0..1")
    hot, others = account_ids[0], account_ids[1:]
    n = len(others)
    if n < 2:
        raise ValueError("hot transfers need at least 3 accounts")
    out: list[Transfer] = []
    randrange = rng.randrange
    rand = rng.random
    for i in range(count):
        if rand() < hot_share:
            other = others[randrange(n)]
            debit, credit = (hot, other) if rand() < 0.5 else (other, hot)
        else:
            a = randrange(n)
            b = randrange(n - 1)
            if b >= a:
                b += 1
            debit, credit = others[a], others[b]
        out.append(Transfer(id=first_id + i, debit_account_id=debit, credit_account_id=credit,
                            amount=randrange(1, AMOUNT_MAX_BENCH + 1), currency=CURRENCY))
    return out


class HttpTransferBody(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The JSON body of POST /v1/transfers (docs/api.md, TransferRequest)."""

    id: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    currency: str
    flags: tuple[str, ...] = ()
    pending_id: int = 0
    timeout_s: int = 0


_JSON = msgspec.json.Encoder()


def transfer_body_json(t: Transfer) -> bytes:
    """The HTTP API body of a plain transfer (no flags)."""
    if t.flags:
        raise ValueError("only plain transfers are sent over HTTP by the benchmark")
    return _JSON.encode(HttpTransferBody(id=t.id, debit_account_id=t.debit_account_id,
                                         credit_account_id=t.credit_account_id,
                                         amount=t.amount, currency=t.currency))


# -- figures (pure) -----------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile ``p`` (0..100) of already sorted values; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil without floats drifting
    return float(sorted_values[min(len(sorted_values), int(rank)) - 1])


def latency_summary_ms(values_ms: Sequence[float]) -> dict[str, float]:
    """p50, p99, max and mean of latencies in milliseconds, rounded to 0.01 ms."""
    values = sorted(values_ms)
    mean = sum(values) / len(values) if values else 0.0
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), 2),
        "p99": round(percentile(values, 99), 2),
        "max": round(values[-1], 2) if values else 0.0,
        "mean": round(mean, 2),
    }


# -- server processes: CPU and memory -----------------------------------------------------


def listening_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (needs root for other users)."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    for c in connections:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return int(c.pid)
    return None


def libpq_target(url: str) -> dict[str, str]:
    """host, port, user, password and dbname of a postgresql:// URL (socket or TCP)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return {
        "host": query.get("host") or parts.hostname or "localhost",
        "port": query.get("port") or str(parts.port or 5432),
        "user": unquote(parts.username or "") or "postgres",
        "password": unquote(parts.password or ""),
        "dbname": unquote(parts.path.lstrip("/")) or "postgres",
    }


def postmaster_pid_of(url: str) -> int | None:
    """The postmaster's pid of a server on this machine, or None if it cannot be told.

    A Unix-socket server names its pid on the first line of the socket's lock file; a
    loopback TCP server is found by its listening port.
    """
    target = libpq_target(url)
    host, port = target["host"], int(target["port"])
    if host.startswith("/"):
        lock = Path(host) / f".s.PGSQL.{port}.lock"
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(lock.read_text().splitlines()[0].strip())
        return None
    if host in ("127.0.0.1", "localhost", "::1"):
        return listening_pid(port)
    return None


def _cpu_s(p: psutil.Process, *, with_reaped_children: bool = False) -> float:
    t = p.cpu_times()
    total = t.user + t.system
    if with_reaped_children:
        # Backends that exited and were reaped by the postmaster live on in its children_*
        # times; without them a short-lived connection's work would vanish.
        total += t.children_user + t.children_system
    return float(total)


@dataclass
class ServerProcesses:
    """The processes that make up the server, by group, and how to read their usage.

    ``shards`` and ``front`` are Ray worker pids; ``postmaster`` is the PostgreSQL server,
    whose backends are found afresh at every reading. ``exclude`` are this run's own helper
    processes (pgbench, locust) that must not be counted as Ray's.
    """

    shard_pids: list[int]
    front_pid: int | None
    postmaster_pid: int | None
    exclude: set[int] = field(default_factory=set)
    _procs: dict[int, psutil.Process] = field(default_factory=dict)

    def _proc(self, pid: int) -> psutil.Process | None:
        p = self._procs.get(pid)
        if p is None or not p.is_running():
            try:
                p = self._procs[pid] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                return None
        return p

    def members(self) -> dict[str, list[psutil.Process]]:
        """The live processes of every group (postgres: postmaster first, then backends)."""
        groups: dict[str, list[psutil.Process]] = {g: [] for g in (*SERVER_GROUPS, "ray_other")}
        for pid in self.shard_pids:
            if (p := self._proc(pid)) is not None:
                groups["shards"].append(p)
        if self.front_pid is not None and (p := self._proc(self.front_pid)) is not None:
            groups["front"].append(p)
        postgres_pids: set[int] = set()
        if self.postmaster_pid is not None and (pm := self._proc(self.postmaster_pid)):
            groups["postgres"].append(pm)
            with contextlib.suppress(psutil.NoSuchProcess):
                groups["postgres"] += pm.children(recursive=True)
            postgres_pids = {p.pid for p in groups["postgres"]}
        counted = set(self.shard_pids) | {self.front_pid} | postgres_pids | self.exclude
        # Everything else this process started (Ray's raylet, GCS, idle workers, agents).
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process().children(recursive=True):
                if child.pid not in counted and _descends_from_none(child, self.exclude):
                    groups["ray_other"].append(child)
        return groups

    def cpu_by_pid(self) -> dict[tuple[str, int], float]:
        """Cumulative CPU seconds (user + system) of every member, keyed by group and pid."""
        out: dict[tuple[str, int], float] = {}
        for group, procs in self.members().items():
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    reaped = group == "postgres" and p.pid == self.postmaster_pid
                    out[(group, p.pid)] = _cpu_s(p, with_reaped_children=reaped)
        me = psutil.Process()
        out[("client", me.pid)] = _cpu_s(me)
        return out

    def rss_bytes(self, members: dict[str, list[psutil.Process]] | None = None
                  ) -> dict[str, int]:
        """Resident set size summed per group (shared memory counts in every process), of
        ``members`` if given (as ``members()`` answered earlier)."""
        out: dict[str, int] = {}
        for group, procs in (self.members() if members is None else members).items():
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += p.memory_info().rss
            out[group] = total
        return out


def _descends_from_none(p: psutil.Process, excluded: set[int]) -> bool:
    if not excluded:
        return True
    with contextlib.suppress(psutil.NoSuchProcess):
        return not any(a.pid in excluded for a in p.parents())
    return False


def cpu_delta_s(
    before: dict[tuple[str, int], float], after: dict[tuple[str, int], float]
) -> dict[str, float]:
    """CPU seconds spent per group between two readings.

    A process that appeared in between counts from its start; one that vanished in between
    (a crashed shard) loses what it spent after ``before``, which the caller flags.
    """
    out: dict[str, float] = {}
    for (group, pid), cpu in after.items():
        spent = cpu - before.get((group, pid), 0.0)
        out[group] = out.get(group, 0.0) + max(spent, 0.0)
    out["server"] = sum(out.get(g, 0.0) for g in SERVER_GROUPS)
    return {g: round(v, 3) for g, v in out.items()}


class RssSampler:
    """Samples the server's RSS in the background and keeps the peaks since ``reset``."""

    # Finding the processes walks every process on the machine, a burst of CPU in the load
    # generator's process (its loop waits for the GIL meanwhile); reading the RSS of known
    # ones is cheap. So the groups are looked up again only this often.
    MEMBERS_REFRESH_S = 5.0

    def __init__(self, processes: ServerProcesses, *, interval_s: float = 0.5) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._processes = processes
        self._interval_s = interval_s
        self.peak_bytes: dict[str, int] = {}
        self.samples = 0
        self._members: dict[str, list[psutil.Process]] = {}
        self._members_at = -self.MEMBERS_REFRESH_S

    def reset(self) -> None:
        self.peak_bytes = {}
        self._members_at = -self.MEMBERS_REFRESH_S
        self.sample()

    def sample(self) -> None:
        if time.monotonic() - self._members_at >= self.MEMBERS_REFRESH_S:
            self._members = self._processes.members()
            self._members_at = time.monotonic()
        rss = self._processes.rss_bytes(self._members)
        rss["server"] = sum(rss.get(g, 0) for g in SERVER_GROUPS)
        for group, value in rss.items():
            self.peak_bytes[group] = max(self.peak_bytes.get(group, 0), value)
        self.samples += 1

    async def run(self) -> None:
        while True:
            # psutil reads /proc synchronously; a thread keeps the load driver's loop free.
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self._interval_s)


async def shard_stats(shards: Sequence[Any]) -> list[dict[str, float]]:
    """Every shard actor's ``stats()``, in shard order."""
    return list(await asyncio.gather(*[s.stats.remote() for s in shards]))


def shard_stats_delta(
    before: list[dict[str, float]], after: list[dict[str, float]], wall_s: float
) -> list[dict[str, float]]:
    """What each shard did between two ``stats()`` readings, over ``wall_s`` seconds."""
    out = []
    for b, a in zip(before, after, strict=True):
        commits = a["commits"] - b["commits"]
        committed = a["transfers_committed"] - b["transfers_committed"]
        commit_s = a["commit_seconds"] - b["commit_seconds"]
        out.append({
            "shard": a["shard"],
            "restarted": a["epoch"] != b["epoch"] or a["pid"] != b["pid"],
            "transfers_committed": committed,
            "commits": commits,
            "commit_seconds": round(commit_s, 3),
            "commit_busy_share": round(commit_s / wall_s, 3) if wall_s > 0 else 0.0,
            "transfers_per_commit": round(committed / commits, 1) if commits else 0.0,
            "commit_ms_mean": round(commit_s * 1000 / commits, 2) if commits else 0.0,
            "checkpoints": a.get("checkpoints", 0) - b.get("checkpoints", 0),
            "checkpoint_seconds": round(
                a.get("checkpoint_seconds", 0.0) - b.get("checkpoint_seconds", 0.0), 3),
        })
    return out


# -- the RPC batch driver -----------------------------------------------------------------


def as_batch_columns(transfers: Sequence[Transfer]) -> Any:
    """The transfers as one TransferBatch built from numpy arrays, as a client holding its
    transfers in arrays would send them."""
    from processor.batch import TransferBatch

    def column(name: str) -> Any:
        return np.fromiter((getattr(t, name) for t in transfers), np.int64, len(transfers))

    return TransferBatch.from_arrays(
        id=column("id"), debit_account_id=column("debit_account_id"),
        credit_account_id=column("credit_account_id"), amount=column("amount"),
        currency=np.array([t.currency for t in transfers], dtype="S3"))


async def drive_batches(
    client: Any,
    transfers: Any,
    *,
    batch_size: int,
    concurrency: int,
    attempts_max: int = 5,
    phase_s_max: float = 0.0,
) -> dict[str, Any]:
    """Send ``transfers`` in batches of ``batch_size`` with ``concurrency`` requests in flight.

    With ``phase_s_max`` > 0, no new batch is started after that many seconds, so a slow
    server ends the phase early instead of holding the run; the figures then cover the
    batches sent (``stopped_early``).

    ``transfers`` is a sequence of ``Transfer`` (sent as lists) or a ``TransferBatch``
    (sent as its slices). ``client`` is a connected ``processor.client.Client``. A request
    refused as a whole (overloaded, unavailable, timeout) is sent again unchanged, at most
    ``attempts_max`` times in all: ids are idempotency keys, so a resent batch that had
    committed answers
    ``exists``. Only ``ok`` counts as a durable transfer: the server acknowledges after the
    commit, so every ok is durable.
    """
    from processor.client import ClientError
    from processor.errors import LedgerError

    if not 1 <= concurrency <= 64:
        raise ValueError("concurrency must be within 1..64")
    if hasattr(transfers, "take"):
        n = len(transfers)
        chunks: list[Any] = [transfers.take(np.arange(i, min(i + batch_size, n)))
                             for i in range(0, n, batch_size)]
    else:
        chunks = [transfers[i:i + batch_size] for i in range(0, len(transfers), batch_size)]
    order = iter(range(len(chunks)))
    codes: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    latencies_ms: list[float] = []
    lost = 0
    submitted = 0
    stopped_early = False
    phase_started = time.perf_counter()

    async def worker() -> None:
        nonlocal lost, submitted, stopped_early
        for k in order:
            if phase_s_max > 0 and time.perf_counter() - phase_started > phase_s_max:
                stopped_early = True
                return
            chunk = chunks[k] if hasattr(chunks[k], "take") else list(chunks[k])
            submitted += len(chunk)
            for _attempt in range(attempts_max):
                started = time.perf_counter()
                try:
                    result = await client.create_transfers(chunk)
                except LedgerError as exc:
                    errors[exc.code] += 1
                    await asyncio.sleep(min(exc.retry_after_s, 2.0))
                    continue
                except (TimeoutError, ClientError) as exc:
                    errors[getattr(exc, "code", type(exc).__name__)] += 1
                    await asyncio.sleep(0.5)
                    continue
                latencies_ms.append((time.perf_counter() - started) * 1000)
                if isinstance(result, list):
                    codes.update(int(c) for c in result)
                else:  # a TransferBatch's codes: one byte each
                    values, counts = np.unique(result, return_counts=True)
                    codes.update(dict(zip(values.tolist(), counts.tolist(), strict=True)))
                break
            else:
                lost += len(chunk)

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    elapsed_s = time.perf_counter() - phase_started
    figures = _batch_figures(codes, errors, latencies_ms, elapsed_s, submitted, lost)
    figures["stopped_early"] = stopped_early
    return figures


def _batch_figures(
    codes: Counter[int], errors: Counter[str], latencies_ms: list[float], elapsed_s: float,
    submitted: int, lost: int,
) -> dict[str, Any]:
    from processor.codes import TransferResult

    names = {TransferResult(c).name: n for c, n in sorted(codes.items())}
    ok = names.get("ok", 0)
    return {
        "transfers_submitted": submitted,
        "transfers_ok": ok,
        "codes": names,
        "request_errors": dict(errors),
        "transfers_lost": lost,
        "elapsed_s": round(elapsed_s, 3),
        "durable_transfers_per_s": round(ok / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "request_latency_ms": latency_summary_ms(latencies_ms),
    }


# -- the HTTP open-loop driver ------------------------------------------------------------


class _HttpxSenders:
    """Several ``httpx.AsyncClient`` pools of HTTP_CONNECTIONS_PER_CLIENT connections each.

    A request is only given to a pool with a free connection, so none waits inside httpx,
    whose pool bookkeeping grows with its queue and with its size.
    """

    def __init__(self, base_url: str, token: str, connections_max: int, timeout_s: float):
        per = HTTP_CONNECTIONS_PER_CLIENT
        self._sizes = [min(per, connections_max - i) for i in range(0, connections_max, per)]
        self._busy = [0] * len(self._sizes)
        self._turn = 0
        self._args = (base_url, token, timeout_s)
        self._stack = contextlib.AsyncExitStack()
        self._clients: list[Any] = []

    async def __aenter__(self) -> _HttpxSenders:
        _cache_missing_sniffio()
        import httpx

        base_url, token, timeout_s = self._args
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        for size in self._sizes:
            limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
            self._clients.append(await self._stack.enter_async_context(httpx.AsyncClient(
                base_url=base_url, headers=headers, timeout=httpx.Timeout(timeout_s),
                limits=limits)))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    def acquire(self) -> int | None:
        for _ in range(len(self._sizes)):  # round robin over pools with a free connection
            self._turn = (self._turn + 1) % len(self._sizes)
            if self._busy[self._turn] < self._sizes[self._turn]:
                self._busy[self._turn] += 1
                return self._turn
        return None

    def release(self, slot: int) -> None:
        self._busy[slot] -= 1

    async def post(self, slot: int, body: bytes) -> int:
        response = await self._clients[slot].post("/v1/transfers", content=body)
        return int(response.status_code)


class _RawConnection:
    """One keep-alive HTTP/1.1 connection that POSTs and reads a Content-Length answer."""

    # A connection idle this long is opened afresh: the server closes idle keep-alive
    # connections after 5 s (uvicorn's default), and a request written as it does so is
    # lost (IncompleteReadError), which clients avoid the same way (httpx: keepalive_expiry).
    IDLE_S_MAX = 4.0

    def __init__(self, host: str, port: int, head: bytes) -> None:
        self._host, self._port, self._head = host, port, head
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used_at = 0.0

    async def post(self, body: bytes) -> int:
        try:
            now = time.monotonic()
            if self._writer is not None and now - self._used_at > self.IDLE_S_MAX:
                self.close()
            self._used_at = now
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self._host,
                                                                           self._port)
            assert self._reader is not None
            self._writer.write(b"%s%d\r\n\r\n%s" % (self._head, len(body), body))
            head = await self._reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                raise ConnectionError("an answer without Content-Length")
            length = int(lower[at + 17:lower.index(b"\r\n", at + 2)])
            await self._reader.readexactly(length)
            if b"\r\nconnection: close" in lower:
                self.close()
            return status
        except BaseException:
            self.close()  # the connection's state is unknown: start afresh next time
            raise

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class _RawSenders:
    """``connections_max`` lean connections: for rates httpx cannot generate on one core."""

    def __init__(self, base_url: str, token: str, connections_max: int, timeout_s: float):
        parts = urlsplit(base_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        head = (f"POST /v1/transfers HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                "Content-Length: ").encode()
        self._connections = [_RawConnection(host, port, head) for _ in range(connections_max)]
        self._free = list(range(connections_max))

    async def __aenter__(self) -> _RawSenders:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for c in self._connections:
            c.close()

    def acquire(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)

    async def post(self, slot: int, body: bytes) -> int:
        return await self._connections[slot].post(body)


HTTP_CLIENTS = {"httpx": _HttpxSenders, "raw": _RawSenders}


async def drive_http_open_loop(
    base_url: str,
    token: str,
    bodies: Sequence[bytes],
    *,
    rate_per_s: float,
    duration_s: float,
    connections_max: int = 128,
    timeout_s: float = 10.0,
    client: str = "httpx",
    warmup_s: float = 0.0,
) -> dict[str, Any]:
    """POST single transfers at a fixed offered rate, whatever the answers do.

    The first ``warmup_s`` seconds of sends (at the same rate, before ``duration_s`` more)
    open the connections and warm the server's paths: their answers count in the status
    counts, the rate and the CPU, not in the latency figures.

    Sends are scheduled at ``1 / rate_per_s`` intervals from the start (several at once when
    the loop wakes late). At most ``connections_max`` requests are outstanding, one per
    connection: a send due while every connection is busy is dropped and counted, so a
    stalled server cannot grow the backlog without bound. Each request gives up after
    ``timeout_s``. Latency runs from the scheduled send time, so a late generator shows in
    the figures instead of hiding behind them (coordinated omission). ``client`` is
    ``httpx`` (several AsyncClient pools) or ``raw`` (plain keep-alive connections, for
    rates beyond what httpx generates on one core). Returns counts by status and latency
    of the 2xx answers.
    """
    warmup_sends = int(rate_per_s * warmup_s)
    total = warmup_sends + int(rate_per_s * duration_s)
    if rate_per_s <= 0 or total < 1:
        raise ValueError("rate_per_s * duration_s must be at least 1")
    if len(bodies) < total:
        raise ValueError(f"{total} sends need as many bodies, got {len(bodies)}")
    if connections_max < 1:
        raise ValueError("connections_max must be at least 1")
    # What exists now lives through the phase: frozen, the collector's full passes skip
    # it, so they do not stall the sends (restored at the end).
    gc.collect()
    gc.freeze()
    try:
        return await _drive(base_url, token, bodies, rate_per_s=rate_per_s,
                            duration_s=duration_s, connections_max=connections_max,
                            timeout_s=timeout_s, client=client, warmup_s=warmup_s,
                            warmup_sends=warmup_sends, total=total)
    finally:
        gc.unfreeze()


async def _drive(
    base_url: str, token: str, bodies: Sequence[bytes], *, rate_per_s: float,
    duration_s: float, connections_max: int, timeout_s: float, client: str,
    warmup_s: float, warmup_sends: int, total: int,
) -> dict[str, Any]:
    """``drive_http_open_loop`` once its arguments are checked: ``total`` sends, the first
    ``warmup_sends`` of them the warm-up."""
    loop = asyncio.get_running_loop()
    statuses: Counter[str] = Counter()
    latencies_ms: list[float] = []
    # Second of the phase (by scheduled send) -> latencies: a stall shows where it was.
    by_second: dict[int, list[float]] = {}
    lag_ms_max = 0.0
    dropped = 0
    last_answer_s = 0.0
    tasks: set[asyncio.Task[None]] = set()
    async with HTTP_CLIENTS[client](base_url, token, connections_max, timeout_s) as senders:

        async def send(slot: int, i: int, scheduled_s: float) -> None:
            nonlocal lag_ms_max, last_answer_s
            lag_ms_max = max(lag_ms_max, (loop.time() - scheduled_s) * 1000)
            try:
                async with asyncio.timeout(timeout_s):
                    status = await senders.post(slot, bodies[i])
                statuses[str(status)] += 1
                if 200 <= status < 300 and i >= warmup_sends:
                    latency_ms = (loop.time() - scheduled_s) * 1000
                    latencies_ms.append(latency_ms)
                    by_second.setdefault(int((i - warmup_sends) / rate_per_s),
                                         []).append(latency_ms)
            except Exception as exc:
                timed_out = isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__
                statuses["timeout" if timed_out else type(exc).__name__] += 1
            finally:
                senders.release(slot)
                last_answer_s = loop.time()

        start_s = loop.time() + 0.05
        cpu_started_s = time.process_time()
        sent = 0
        while sent < total:
            now_s = loop.time()
            due = min(total, int((now_s - start_s) * rate_per_s) + 1) if now_s >= start_s else 0
            while sent < due:
                slot = senders.acquire()
                if slot is None:
                    dropped += 1
                else:
                    task = loop.create_task(send(slot, sent, start_s + sent / rate_per_s))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                sent += 1
            # Sleep until the next send is due, but at least a millisecond: uvloop's timers
            # have millisecond resolution, and a shorter sleep spins on the CPU.
            await asyncio.sleep(max(0.001, start_s + sent / rate_per_s - loop.time()))
        if tasks:
            await asyncio.wait(set(tasks), timeout=timeout_s + 5)
        for task in list(tasks):  # only if a request overran its own timeout
            task.cancel()
    generator_cpu_s = time.process_time() - cpu_started_s
    ok = sum(n for s, n in statuses.items() if s.isdigit() and 200 <= int(s) < 300)
    elapsed_s = (last_answer_s or loop.time()) - start_s
    return {
        "client": client,
        "offered_rate_per_s": rate_per_s,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "scheduled": total,
        "dropped_all_connections_busy": dropped,
        "answers_by_status": dict(sorted(statuses.items())),
        "transfers_ok": ok,
        "elapsed_s": round(elapsed_s, 3),
        "achieved_ok_per_s": round(ok / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "latency_ms": latency_summary_ms(latencies_ms),
        "latency_p99_ms_by_second": [
            round(percentile(sorted(by_second.get(second, [])), 99), 1) if second in by_second
            else None for second in range(max(by_second, default=-1) + 1)],
        "generator_lag_ms_max": round(lag_ms_max, 2),
        # CPU of this whole process (the generator, and Ray's driver threads, mostly idle)
        # per second of the phase; near 1.0 means the generator, not the server, was the
        # limit and the achieved rate is a lower bound.
        "generator_cpu_cores_busy": round(generator_cpu_s / elapsed_s, 2) if elapsed_s else 0.0,
        "connections_max": connections_max,
    }


# What the batched phases leave due (autovacuum on millions of new rows, PostgreSQL's own
# checkpoint) runs before the HTTP phases rather than inside them, as pgbench vacuums its
# tables before a run.
SETTLE_SQL = ("VACUUM (ANALYZE) transfers, failed_transfers, pending_resolutions, accounts, "
              "remote_posting_blocks, partition_checkpoints")


async def settle_database(url: str) -> dict[str, Any]:
    """VACUUM (ANALYZE) the ledger's tables, then CHECKPOINT (if the role may); returns
    how long it took and whether the checkpoint ran."""
    import asyncpg

    started = time.perf_counter()
    conn = await asyncpg.connect(url, command_timeout=600)
    try:
        await conn.execute(SETTLE_SQL)
        try:
            await conn.execute("CHECKPOINT")
            checkpoint = True
        except asyncpg.InsufficientPrivilegeError:
            checkpoint = False
    finally:
        await conn.close()
    return {"seconds": round(time.perf_counter() - started, 2), "checkpoint": checkpoint}


def _cache_missing_sniffio() -> None:
    """Make a missing ``sniffio`` cheap to look for.

    httpcore imports sniffio each time it creates a lock (several per request). When the
    package is not installed, each of those imports fails afresh and searches sys.path,
    which cost a third of the generator's CPU here. A ``None`` in ``sys.modules`` makes the
    import fail at once; httpcore then assumes asyncio, which is what runs here.
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


# -- pgbench on the same server -----------------------------------------------------------

PGBENCH_DATABASE = "txproc_bench_pgbench"
_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")
_LATENCY = re.compile(r"latency average = ([0-9.]+) ms")


def pgbench_binary() -> str:
    """``pgbench`` from PATH, else the one shipped in the pgserver package."""
    found = shutil.which("pgbench")
    if found:
        return found
    import pgserver

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench")


async def run_pgbench(
    admin_url: str,
    processes: ServerProcesses,
    *,
    scale: int,
    clients: int,
    threads: int,
    duration_s: int,
) -> dict[str, Any]:
    """TPC-B by pgbench into a scratch database of the server at ``admin_url``.

    Creates the database, ``pgbench -i -s scale``, then ``pgbench -c -j -T``; drops the
    database afterwards. Returns tps, average latency and the postgres CPU per transaction.
    Raises ``RuntimeError`` with pgbench's output if it fails.
    """
    from actors.database import create_database, drop_database

    binary = pgbench_binary()
    target = libpq_target(admin_url)
    env = dict(os.environ)
    if target["password"]:
        env["PGPASSWORD"] = target["password"]
    passfile = dict(parse_qsl(urlsplit(admin_url).query)).get("passfile")
    if passfile:
        env["PGPASSFILE"] = passfile
    conn = ["-h", target["host"], "-p", target["port"], "-U", target["user"]]
    await drop_database(admin_url, PGBENCH_DATABASE)
    await create_database(admin_url, PGBENCH_DATABASE)
    try:
        init_started = time.perf_counter()
        await _run([binary, "-i", "-q", "-s", str(scale), *conn, PGBENCH_DATABASE], env,
                   timeout_s=900, processes=processes)
        init_s = time.perf_counter() - init_started
        before = processes.cpu_by_pid()
        out = await _run([binary, "-c", str(clients), "-j", str(threads), "-T", str(duration_s),
                          *conn, PGBENCH_DATABASE], env, timeout_s=duration_s + 300,
                         processes=processes)
        cpu = cpu_delta_s(before, processes.cpu_by_pid())
    finally:
        await drop_database(admin_url, PGBENCH_DATABASE)
    tps_match, latency_match = _TPS.search(out), _LATENCY.search(out)
    if tps_match is None:
        raise RuntimeError(f"no tps in pgbench output:\n{out[-2000:]}")
    tps = float(tps_match.group(1))
    transactions = tps * duration_s
    return {
        "binary": binary,
        "version": (await _run([binary, "--version"], env, timeout_s=10)).strip(),
        "command": f"pgbench -c {clients} -j {threads} -T {duration_s} (after -i -s {scale})",
        "init_s": round(init_s, 1),
        "tps": round(tps, 1),
        "latency_ms_mean": float(latency_match.group(1)) if latency_match else None,
        "postgres_cpu_s": cpu.get("postgres", 0.0),
        "postgres_cpu_us_per_transaction": (
            round(cpu.get("postgres", 0.0) * 1e6 / transactions, 1) if transactions else None
        ),
    }


async def _run(
    command: list[str], env: dict[str, str], *, timeout_s: float,
    processes: ServerProcesses | None = None,
) -> str:
    """Run ``command``; its output, or RuntimeError. Killed after ``timeout_s``."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        stdin=subprocess.DEVNULL,
    )
    if processes is not None:
        processes.exclude.add(proc.pid)
    try:
        raw, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{command[0]} did not finish in {timeout_s} s") from None
    finally:
        if processes is not None:
            processes.exclude.discard(proc.pid)
    out = raw.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{out[-2000:]}")
    return out


@contextlib.asynccontextmanager
async def scratch_processor(database_url: str, shards: int, *, prefix: str,
                            shard_options: dict[str, Any] | None = None, fronts: int = 0,
                            payments_rules: dict[str, Any] | None = None,
                            ray_address: str = "", payments: bool = True,
                            ) -> AsyncIterator[tuple[Any, float]]:
    """A processor on loopback with free ports, in a data directory removed afterwards;
    yields it with its start-up time in seconds, and stops everything it started.
    ``shard_options`` are further ShardConfig fields; ``fronts`` as ``Config.fronts``;
    ``payments_rules`` further PaymentsConfig fields; ``ray_address`` a running cluster
    to start on (default: a local Ray of its own); ``payments`` False serves the ledger
    only."""
    from actors.app.runtime import start_processor
    from processor.config import (
        Config,
        FrontConfig,
        ObservabilityConfig,
        PaymentsSection,
        ShardConfig,
    )

    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    config = Config(
        shard=ShardConfig(database_url=database_url, shards=shards, **(shard_options or {})),
        front=FrontConfig(host="127.0.0.1", http_port=0, rpc_port=0),
        data_dir=str(scratch),
        observability=ObservabilityConfig(metrics_port=0),
        fronts=fronts,
        ray_address=ray_address,
        payments=PaymentsSection(rules=msgspec.structs.replace(
            PaymentsSection().rules, **(payments_rules or {}))) if payments else
        PaymentsSection(enabled=False, providers=()),
    )
    try:
        started = time.perf_counter()
        processor = await start_processor(config)
        try:
            yield processor, round(time.perf_counter() - started, 2)
        finally:
            await processor.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_benchmark(parse_args: Any, run: Any, argv: list[str] | None) -> dict[str, Any]:
    """A benchmark module's ``main``: parse ``argv``, run, print and write the results."""
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    results: dict[str, Any] = asyncio.run(run(args))
    write_results(args.out, results)
    return results


def write_results(out: Path, results: dict[str, Any]) -> None:
    """Print ``results`` as JSON and write them to ``out`` (a benchmark module's end)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"results written to {out}")
