"""``python -m bench.authorization``: card authorizations through the payments API, end to end.

Starts a processor (embedded PostgreSQL in a fresh temporary directory, removed afterwards,
unless ``--database-url``) with its two simulated payment providers, creates merchant
accounts (USD and EUR), then for every provider error rate in ``--error-rates``:

1. sets the faults of both simulated providers: a lognormal latency (``--provider-median-ms``,
   ``--provider-p99-ms``) and ``error_rate``, a 5xx answered before anything happens;
2. warms up for ``--warmup-s`` at the offered rate (not recorded);
3. drives an open loop of ``POST /v1/payments`` (authorize only, ``capture: false``) at
   ``--rate`` per second for ``--seconds``, each with its own Idempotency-Key; requests are
   launched on schedule whatever the answers do, at most ``--in-flight-max`` outstanding
   (what is due beyond that is dropped and counted);
4. waits (at most ``--resolve-wait-s``) for the payments answered ``202 processing`` (outcome
   unknown at the time) to reach their final status, and counts those.

It reports per error rate the achieved authorizations/s (201 answers per second of the
measured window), p50/p95/p99 latency of all answered requests and of the authorized ones
(from each request's scheduled send time, so a late generator shows instead of hiding), the
answers by status and error code, the provider actors' calls and retries, and the server's
CPU per request (shards, front, the payments, provider and risk actors and PostgreSQL; the
simulated providers and the rest of Ray are reported beside it). Figures are printed and recorded,
never asserted: this machine is shared and noisy.

With ``--idle-seconds N`` it first measures the same processes at rest for N seconds (after
the merchants are created, before any phase): the CPU a deployment spends whatever the rate,
per process group in milliseconds per second. Divided by a phase's rate it is the share of
that phase's CPU per request that is not the requests' own.

``measure(processor, ...)`` takes an already running processor, so a test can drive it
with the session's processor; it leaves the providers' faults cleared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil
from rich.console import Console
from rich.table import Table

from bench import ledger

__all__ = [
    "QUICK",
    "Answer",
    "HttpxClient",
    "OpenLoopRun",
    "RawClient",
    "due_count",
    "fault_body",
    "latency_figures",
    "loopback_source",
    "main",
    "markdown_rows",
    "measure",
    "open_loop",
    "outcome_label",
    "parse_args",
    "parse_error_rates",
    "payment_body",
    "processor_added",
    "summarize",
]

log = logging.getLogger("txproc.bench.authorization")
RESULTS_DIR = Path(__file__).parent / "results"
TOKEN_TTL_S = 6 * 3600
# Account ids of a run start at seconds-since-epoch x 1e9 (as in ``python -m bench``), so
# runs against one --database-url never reuse an id, and stay far below 2**62.
ID_BLOCK = 10**9
CURRENCIES = ("USD", "EUR")
AMOUNT_MIN, AMOUNT_MAX = 100, 10_000
PROVIDER_CHOICES = ("auto", "acme", "globex", "split")
CLIENT_CHOICES = ("raw", "httpx")
# Track at most this many ``202 processing`` payments to their final status.
RESOLVE_TRACKED_MAX = 1_000
ALL_FAULTS_OFF: dict[str, Any] = {}

QUICK = {"seconds": 2.0, "rate": 20.0, "warmup_s": 0.5, "resolve_wait_s": 10.0}

# A token's random part is letters, as the providers mint it: no digit run in it can
# look like a card number to the API's card-data scan.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def parse_error_rates(text: str) -> list[float]:
    """``"0,0.05"`` -> ``[0.0, 0.05]``; each within 0..1."""
    rates = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        rate = float(part)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"error rate {rate} is not within 0..1")
        rates.append(rate)
    if not rates:
        raise ValueError("no error rate given")
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.authorization", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=100.0, help="offered authorizations/s")
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per error rate")
    p.add_argument("--error-rates", default="0,0.05",
                   help="comma-separated provider error rates (5xx before anything happens)")
    p.add_argument("--provider-median-ms", type=float, default=40.0)
    p.add_argument("--provider-p99-ms", type=float, default=250.0)
    p.add_argument("--baseline", action="store_true",
                   help="first measure a phase with no provider latency and no errors: the "
                        "processor's own share of the latency")
    p.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto",
                   help="auto: the processor routes (the first provider of provider_order "
                        "serving the currency); acme/globex: ask for one; split: ask for "
                        "each in turn")
    p.add_argument("--client", choices=CLIENT_CHOICES, default="raw",
                   help="raw: lean keep-alive connections; httpx: httpx.AsyncClient (several "
                        "times the generator's CPU per request)")
    p.add_argument("--merchants", type=int, default=10, help="merchant accounts per currency")
    p.add_argument("--in-flight-max", type=int, default=256,
                   help="requests outstanding at most; sends due beyond are dropped, counted")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per request")
    p.add_argument("--warmup-s", type=float, default=2.0,
                   help="unrecorded load before each measured phase")
    p.add_argument("--resolve-wait-s", type=float, default=30.0,
                   help="how long to wait for 202-processing payments to finish (0: don't)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--database-url", default="",
                   help="an existing PostgreSQL; default: embedded, in a temporary directory")
    p.add_argument("--idle-seconds", type=float, default=0.0,
                   help="first measure the server's CPU at rest for this long (0: not)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['seconds']:g} s at {QUICK['rate']:g}/s per "
                        "error rate")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results file (default "
                        "bench/results/authorization-<date>[-quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, QUICK["seconds"])
        args.rate = min(args.rate, QUICK["rate"])
        args.warmup_s = min(args.warmup_s, QUICK["warmup_s"])
        args.resolve_wait_s = min(args.resolve_wait_s, QUICK["resolve_wait_s"])
    try:
        args.error_rates = parse_error_rates(args.error_rates)
    except ValueError as exc:
        p.error(f"--error-rates: {exc}")
    if args.rate <= 0 or args.seconds <= 0 or args.rate * args.seconds < 1:
        p.error("--rate and --seconds must be positive and send at least one request")
    if args.rate * args.seconds > 1_000_000:
        p.error("--rate x --seconds is capped at 1,000,000 requests per phase")
    if not 0 < args.provider_median_ms <= args.provider_p99_ms:
        p.error("need 0 < --provider-median-ms <= --provider-p99-ms")
    if args.merchants < 1 or args.in_flight_max < 1 or args.timeout_s <= 0:
        p.error("--merchants, --in-flight-max and --timeout-s must be positive")
    if args.warmup_s < 0 or args.resolve_wait_s < 0:
        p.error("--warmup-s and --resolve-wait-s must not be negative")
    if args.out is None:
        day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        args.out = RESULTS_DIR / f"authorization-{day}{'-quick' if args.quick else ''}.json"
    return args


# -- requests (pure) ----------------------------------------------------------------------


def fault_body(error_rate: float, *, median_ms: float | None, p99_ms: float | None,
               seed: int) -> dict[str, Any]:
    """The ``PUT /_sim/faults`` body: lognormal latency (none if ``median_ms`` is None)
    and ``error_rate``, reseeded so runs are comparable."""
    body: dict[str, Any] = {"error_rate": error_rate, "seed": seed}
    if median_ms is not None:
        body["latency"] = {"median_ms": median_ms, "p99_ms": p99_ms or median_ms}
    return body


def payment_body(rng: random.Random, merchants: Mapping[str, Sequence[int]],
                 provider: str | None = None) -> bytes:
    """A ``POST /v1/payments`` body: an authorization of 100..10,000 minor units in USD or
    EUR, on a fresh approving test card token (``pm_4242_<16 letters>``: a fresh token each
    time keeps the risk check's per-token velocity limit out of the way). A token whose hex
    happens to hold a Luhn-valid run of 13+ digits would be refused as card data: such
    draws are skipped."""
    from processor.cardscan import contains_card_number

    currency = CURRENCIES[rng.randrange(len(CURRENCIES))]
    accounts = merchants[currency]
    token = "pm_4242_" + "".join(rng.choice(_LETTERS) for _ in range(16))
    while contains_card_number(token):
        token = "pm_4242_" + "".join(rng.choice(_LETTERS) for _ in range(16))
    body: dict[str, Any] = {
        "amount": rng.randint(AMOUNT_MIN, AMOUNT_MAX),
        "currency": currency,
        "payment_method": token,
        "merchant_account_id": accounts[rng.randrange(len(accounts))],
        "capture": False,
    }
    if provider is not None:
        body["provider"] = provider
    return json.dumps(body, separators=(",", ":")).encode()


def outcome_label(status: int | str, body: Any) -> str:
    """What one answer says: ``"201 authorized"``, ``"202 processing"``, ``"402
    payment_declined"``, ``"503 provider_unavailable"``, ``"timeout"``, ..."""
    if isinstance(status, str):
        return status  # the request failed before an answer: "timeout", "ConnectError", ...
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            return f"{status} {error['code']}"
        if isinstance(body.get("status"), str):
            return f"{status} {body['status']}"
    return str(status)


# -- the open loop --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One request: its outcome (see ``outcome_label``), latency from its scheduled send
    time, the HTTP status (0 when there was no answer) and the payment id it named."""

    index: int
    outcome: str
    latency_ms: float
    http_status: int = 0
    payment_id: str = ""

    @property
    def answered(self) -> bool:
        return self.http_status > 0


# ``send(i)`` performs request ``i``; it returns (http status, outcome label, payment id).
Send = Callable[[int], Awaitable[tuple[int, str, str]]]


@dataclass
class OpenLoopRun:
    scheduled: int
    rate_per_s: float
    duration_s: float
    answers: list[Answer] = field(default_factory=list)
    dropped: int = 0
    lag_ms_max: float = 0.0
    elapsed_s: float = 0.0  # first scheduled send to the last answer
    generator_cpu_s: float = 0.0
    abandoned: int = 0  # overran their own timeout and were cancelled at the end


def due_count(elapsed_s: float, rate_per_s: float, total: int) -> int:
    """How many sends are due ``elapsed_s`` after the start: send ``i`` is due at
    ``i / rate_per_s`` (send 0 at once); never more than ``total``."""
    if elapsed_s < 0:
        return 0
    return min(total, int(elapsed_s * rate_per_s) + 1)


async def open_loop(send: Send, *, rate_per_s: float, duration_s: float, in_flight_max: int,
                    timeout_s: float) -> OpenLoopRun:
    """Launch ``send(i)`` for i in 0..rate*duration-1 at fixed intervals, whatever the
    answers do.

    Several sends go at once when the loop wakes late. A send due while ``in_flight_max``
    are outstanding is dropped and counted, so a stalled server cannot grow the backlog
    without bound. Each request gives up after ``timeout_s`` (outcome ``timeout``); any
    other exception is recorded by its type name. Latency runs from the scheduled send
    time (no coordinated omission). Times come from ``time.perf_counter``: uvloop's
    ``loop.time()`` has millisecond resolution.
    """
    total = int(rate_per_s * duration_s)
    if rate_per_s <= 0 or total < 1:
        raise ValueError("rate_per_s * duration_s must be at least 1")
    if in_flight_max < 1 or timeout_s <= 0:
        raise ValueError("in_flight_max and timeout_s must be positive")
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    run = OpenLoopRun(scheduled=total, rate_per_s=rate_per_s, duration_s=duration_s)
    tasks: set[asyncio.Task[None]] = set()
    last_answer_s = 0.0

    async def one(i: int, scheduled_s: float) -> None:
        nonlocal last_answer_s
        run.lag_ms_max = max(run.lag_ms_max, (clock() - scheduled_s) * 1000)
        status, outcome, payment_id = 0, "", ""
        try:
            async with asyncio.timeout(timeout_s):
                status, outcome, payment_id = await send(i)
        except Exception as exc:
            timed_out = isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__
            status, outcome = 0, "timeout" if timed_out else type(exc).__name__
        now_s = clock()
        last_answer_s = max(last_answer_s, now_s)
        run.answers.append(Answer(i, outcome, (now_s - scheduled_s) * 1000, status,
                                  payment_id))

    start_s = clock() + 0.02
    cpu_started_s = time.process_time()
    sent = 0
    while sent < total:
        due = due_count(clock() - start_s, rate_per_s, total)
        while sent < due:
            if len(tasks) >= in_flight_max:
                run.dropped += 1
            else:
                task = loop.create_task(one(sent, start_s + sent / rate_per_s))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent += 1
        # At least a millisecond: uvloop's timers have millisecond resolution, and a
        # shorter sleep spins on the CPU.
        await asyncio.sleep(max(0.001, start_s + sent / rate_per_s - clock()))
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout_s + 5)
    run.abandoned = len(tasks)
    for task in list(tasks):  # only if a request overran its own timeout
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    run.generator_cpu_s = time.process_time() - cpu_started_s
    run.elapsed_s = (last_answer_s or clock()) - start_s
    run.answers.sort(key=lambda a: a.index)
    return run


# -- HTTP clients -------------------------------------------------------------------------


class _RawConnection:
    """One keep-alive HTTP/1.1 connection: a request, then a Content-Length answer.

    The server closes a keep-alive connection idle for a few seconds (uvicorn: 5 s); one
    idle for ``IDLE_REUSE_S`` or closed by the server is opened afresh before it is used,
    so a slow phase does not turn the server's housekeeping into failed requests.
    """

    IDLE_REUSE_S = 2.0

    def __init__(self, host: str, port: int, source: str | None = None) -> None:
        self._host, self._port = host, port
        self._source = source
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used_s = 0.0

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        now_s = time.monotonic()
        if self._reader is not None and (self._reader.at_eof()
                                         or now_s - self._used_s > self.IDLE_REUSE_S):
            self.close()
        self._used_s = now_s
        try:
            if self._writer is None:
                self._reader, self._writer = await self._connect()
            assert self._reader is not None
            self._writer.write(head + body)
            answer = await self._reader.readuntil(b"\r\n\r\n")
            status = int(answer[9:12])
            lower = answer.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                raise ConnectionError("an answer without Content-Length")
            length = int(lower[at + 17:lower.index(b"\r\n", at + 2)])
            content = await self._reader.readexactly(length)
            if b"\r\nconnection: close" in lower:
                self.close()
            return status, content
        except BaseException:
            self.close()  # the connection's state is unknown: start afresh next time
            raise

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._source is not None:
            try:
                return await asyncio.open_connection(self._host, self._port,
                                                     local_addr=(self._source, 0))
            except OSError:  # the address is not this machine's: connect as usual
                self._source = None
        return await asyncio.open_connection(self._host, self._port)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def loopback_source(base_url: str, n: int) -> str | None:
    """A loopback address of its own for load generator ``n`` (``127.0.0.{n + 2}``) when
    the server is on 127.0.0.1, else None. Linux routes all of 127.0.0.0/8 to loopback.
    The server limits connections per peer address (``http_connections_per_peer_max``),
    and the simulated providers' webhooks come from 127.0.0.1 too: a generator sharing
    that address would be refused by that limit (a bare 503) past saturation, and the
    benchmark would count the refusals as the processor's."""
    host = base_url.removeprefix("http://").rpartition(":")[0]
    return f"127.0.0.{n + 2}" if host == "127.0.0.1" else None


class RawClient:
    """Lean keep-alive connections to one HTTP server, one request per connection at a
    time, opened as needed (at most ``connections_max``): httpx costs several times the
    CPU per request, which on two cores the server would miss."""

    def __init__(self, base_url: str, token: str, connections_max: int,
                 source: str | None = None) -> None:
        host_port = base_url.removeprefix("http://").rstrip("/")
        self._source = source  # the local address to connect from (loopback_source)
        self._host, _, port = host_port.rpartition(":")
        self._port = int(port)
        self._auth = f"Authorization: Bearer {token}\r\n".encode()
        self._free: list[_RawConnection] = []
        self._open = 0
        self._max = connections_max

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = (f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n{extra}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                ).encode() + self._auth + b"\r\n"
        if self._free:
            connection = self._free.pop()
        elif self._open < self._max:
            self._open += 1
            connection = _RawConnection(self._host, self._port, self._source)
        else:
            raise RuntimeError("all connections busy")
        try:
            return await connection.request(head, body)
        finally:
            self._free.append(connection)

    def close(self) -> None:
        for c in self._free:
            c.close()


class HttpxClient:
    """The same interface over ``httpx.AsyncClient`` (for comparison)."""

    def __init__(self, base_url: str, token: str, connections_max: int,
                 timeout_s: float) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(timeout_s),
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
            limits=httpx.Limits(max_connections=connections_max,
                                max_keepalive_connections=connections_max))

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        r = await self._client.post(path, content=body, headers=headers)
        return r.status_code, r.content

    async def aclose(self) -> None:
        await self._client.aclose()


# -- figures (pure) -------------------------------------------------------------------------


def latency_figures(values_ms: Sequence[float]) -> dict[str, float]:
    """count, p50, p95, p99 (nearest rank), max and mean, in ms rounded to 0.01."""
    values = sorted(values_ms)
    return {
        "count": len(values),
        "p50": round(ledger.percentile(values, 50), 2),
        "p95": round(ledger.percentile(values, 95), 2),
        "p99": round(ledger.percentile(values, 99), 2),
        "max": round(values[-1], 2) if values else 0.0,
        "mean": round(sum(values) / len(values), 2) if values else 0.0,
    }


def summarize(run: OpenLoopRun) -> dict[str, Any]:
    """The figures of one open-loop phase of authorizations."""
    outcomes = Counter(a.outcome for a in run.answers)
    authorized = [a.latency_ms for a in run.answers if a.http_status == 201]
    answered = [a.latency_ms for a in run.answers if a.answered]
    elapsed = run.elapsed_s
    return {
        "offered_rate_per_s": run.rate_per_s,
        "duration_s": run.duration_s,
        "scheduled": run.scheduled,
        "sent": len(run.answers),
        "dropped_in_flight_max": run.dropped,
        "answered": len(answered),
        "outcomes": dict(sorted(outcomes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "elapsed_s": round(elapsed, 3),
        "achieved_authorizations_per_s": round(len(authorized) / elapsed, 1) if elapsed > 0
        else 0.0,
        "answered_per_s": round(len(answered) / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": {"answered": latency_figures(answered),
                       "authorized": latency_figures(authorized)},
        "generator_lag_ms_max": round(run.lag_ms_max, 2),
        # CPU of this whole process (the generator, and Ray's driver threads, mostly idle)
        # per second: near 1.0 means the generator, not the server, was the limit.
        "generator_cpu_cores_busy": round(run.generator_cpu_s / elapsed, 2) if elapsed > 0
        else 0.0,
        "abandoned": run.abandoned,
    }


def processor_added(answers: Sequence[Answer], served_ms: Mapping[str, float]
                    ) -> dict[str, Any]:
    """What the processor added to each authorized request (201): its latency from the
    scheduled send less the time the provider spent on its authorization (``served_ms``
    by our payment id, the reference the provider records: the simulators'
    ``GET /_sim/charges``). Figures as ``latency_figures``, plus ``unmatched``: authorized
    answers whose provider time was not found (they are left out)."""
    added, unmatched = [], 0
    for a in answers:
        if a.http_status != 201:
            continue
        provider_ms = served_ms.get(a.payment_id)
        if provider_ms is None:
            unmatched += 1
            continue
        added.append(a.latency_ms - provider_ms)
    return {**latency_figures(added), "unmatched": unmatched}


def share(phase: dict[str, Any], status: int) -> float:
    """The share of sent requests answered with HTTP ``status``."""
    sent: int = phase["sent"] or 1
    outcomes: dict[str, int] = phase["outcomes"]
    return sum(n for o, n in outcomes.items() if o.split(" ", 1)[0] == str(status)) / sent


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _added(phase: dict[str, Any]) -> str:
    added = phase.get("processor_added_ms")
    if not added or not added["count"]:
        return "-"
    return f"{added['p50']:,.1f} / {added['p99']:,.1f}"


def _phase_label(phase: dict[str, Any]) -> str:
    faults = phase["faults"]
    latency = faults.get("latency")
    lat = f"{latency['median_ms']:g}/{latency['p99_ms']:g} ms" if latency else "no latency"
    return f"{faults['error_rate']:.0%} errors, {lat}"


def markdown_rows(results: dict[str, Any]) -> str:
    """A Markdown block for the README: the command, the machine and one row per phase."""
    machine = results["machine"]
    date = machine["date_utc"][:10]
    lines = [
        f"`{machine['command']}` on {date}, {machine['cpu_count']} cores "
        f"({machine['cpu_model'] or 'unknown CPU'}), load average at start "
        f"{machine['load_average_at_start'][0]:g}:",
        "",
        "| date | provider errors, latency median/p99 | offered/s | authorized/s | p50 ms "
        "| p95 ms | p99 ms | 201 / 202 / 402 / 503 / other | server CPU ms/request "
        "| processor-added p50 / p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for p in results["phases"]:
        lat = p["latency_ms"]["answered"]
        shares = [share(p, s) for s in (201, 202, 402, 503)]
        other = max(0.0, 1.0 - sum(shares))
        lines.append(
            f"| {date} | {_phase_label(p)} | {_fmt(p['offered_rate_per_s'])} | "
            f"{_fmt(p['achieved_authorizations_per_s'], ',.1f')} | {_fmt(lat['p50'], ',.1f')} | "
            f"{_fmt(lat['p95'], ',.1f')} | {_fmt(lat['p99'], ',.1f')} | "
            f"{' / '.join(f'{s:.1%}' for s in (*shares, other))} | "
            f"{_fmt(p.get('server_cpu_ms_per_request'), ',.2f')} | "
            f"{_added(p)} |")
    return "\n".join(lines)


# -- server processes -----------------------------------------------------------------------


@dataclass
class _Processes:
    """The server's processes (``ledger.ServerProcesses``), with the payments, provider and
    risk actors and the simulated providers told apart: ledger's accounting would lump them
    into ``ray_other``."""

    server: ledger.ServerProcesses
    provider_pids: set[int]
    sim_pids: list[int]
    payments_pids: set[int] = field(default_factory=set)  # the payments actor
    risk_pids: set[int] = field(default_factory=set)  # the risk actor
    _sims: dict[int, psutil.Process] = field(default_factory=dict)

    def cpu_by_pid(self) -> dict[tuple[str, int], float]:
        out: dict[tuple[str, int], float] = {}
        for (group, pid), cpu in self.server.cpu_by_pid().items():
            if pid in self.provider_pids:
                group = "providers"
            elif pid in self.payments_pids:
                group = "payments"
            elif pid in self.risk_pids:
                group = "risk"
            out[(group, pid)] = cpu
        for pid in self.sim_pids:
            with contextlib.suppress(psutil.Error):
                p = self._sims.get(pid) or self._sims.setdefault(pid, psutil.Process(pid))
                t = p.cpu_times()
                out[("sims", pid)] = t.user + t.system
        return out


async def _processes(processor: Any) -> tuple[_Processes, list[str]]:
    problems = []
    stats = await ledger.shard_stats(processor.shards)
    try:
        front_pid: int | None = int(await processor.front.pid.remote())
    except Exception:  # an older front without pid(): find it by its port
        front_pid = ledger.listening_pid(processor.http_port)
    provider_pids = set()
    for provider in processor.providers:
        with contextlib.suppress(Exception):
            provider_pids.add(int(await provider.pid.remote()))
    payments_pids = set()
    if getattr(processor, "payments", None) is not None:
        with contextlib.suppress(Exception):
            payments_pids.add(int(await processor.payments.pid.remote()))
    risk_pids = set()
    if getattr(processor, "risk", None) is not None:
        with contextlib.suppress(Exception):
            risk_pids.add(int(await processor.risk.pid.remote()))
    url = processor.config.shard.database_url
    postmaster = processor.embedded.pid if processor.embedded else ledger.postmaster_pid_of(url)
    if front_pid is None:
        problems.append("front pid not found: its CPU is not counted")
    if postmaster is None:
        problems.append("postgres is not on this machine: its CPU is not counted")
    sim_pids = [int(s.pid) for s in processor.sims]
    server = ledger.ServerProcesses(shard_pids=[int(s["pid"]) for s in stats],
                                    front_pid=front_pid, postmaster_pid=postmaster,
                                    exclude=set(sim_pids))
    return _Processes(server, provider_pids, sim_pids, payments_pids, risk_pids), problems


# The processes a figure of server CPU counts: the ledger's and the payments side's actors
# and PostgreSQL (the simulated providers and the rest of Ray are reported beside them).
_SERVER = (*ledger.SERVER_GROUPS, "payments", "providers", "risk")


def idle_figures(before: dict[tuple[str, int], float], after: dict[tuple[str, int], float],
                 wall_s: float) -> dict[str, float]:
    """CPU milliseconds per second of wall time spent by each process group between two
    readings, and ``server``: the groups a phase's server CPU counts."""
    if wall_s <= 0:
        raise ValueError("an idle reading spans some time")
    cpu = ledger.cpu_delta_s(before, after)
    server = sum(cpu.get(g, 0.0) for g in _SERVER)
    out = {g: round(v * 1000 / wall_s, 1) for g, v in cpu.items() if g != "server"}
    out["server"] = round(server * 1000 / wall_s, 1)
    return out


def _cpu_figures(before: dict[tuple[str, int], float], after: dict[tuple[str, int], float],
                 requests: int, wall_s: float) -> dict[str, Any]:
    cpu = ledger.cpu_delta_s(before, after)
    server = sum(cpu.get(g, 0.0) for g in _SERVER)
    cpu["server"] = round(server, 3)  # shards, front, payments, provider and risk actors, postgres
    return {
        "cpu_s": cpu,
        "server_cpu_ms_per_request": round(server * 1000 / requests, 2) if requests else None,
        "server_cpu_cores_busy": round(server / wall_s, 2) if wall_s > 0 else None,
    }


# -- the measurement ------------------------------------------------------------------------


class _Sims:
    """The processor's simulated providers, driven through their admin API."""

    def __init__(self, processor: Any) -> None:
        self.urls: dict[str, str] = dict(processor.provider_urls)
        data = Path(processor.config.data_dir) / "providers"
        self.admin = {name: json.loads((data / f"{name}.json").read_text())["admin_token"]
                      for name in self.urls}

    async def webhooks(self, http: Any) -> dict[str, dict[str, int]]:
        """Each simulator's webhook counts so far (emitted, delivered, attempts_failed...)."""
        out = {}
        for name, url in sorted(self.urls.items()):
            r = await http.get(f"{url}/_sim/stats",
                               headers={"authorization": f"Bearer {self.admin[name]}"})
            if r.status_code == 200:
                out[name] = {k: int(v) for k, v in r.json()["webhooks"].items()}
        return out

    async def served(self, http: Any) -> dict[str, float]:
        """Every simulator's time per authorization so far, by our payment id (its
        ``reference``), in milliseconds (docs/providers.md, ``served_ms``)."""
        out: dict[str, float] = {}
        for name, url in sorted(self.urls.items()):
            r = await http.get(f"{url}/_sim/charges",
                               headers={"authorization": f"Bearer {self.admin[name]}"},
                               timeout=60)
            if r.status_code != 200:
                raise RuntimeError(f"{name}: GET /_sim/charges answered {r.status_code}")
            for op in r.json()["operations"]:
                if op["operation"] == "authorize" and op.get("served_ms") is not None:
                    out[str(op["reference"])] = float(op["served_ms"])
        return out

    async def set_faults(self, http: Any, faults: dict[str, Any], seed: int) -> None:
        for i, (name, url) in enumerate(sorted(self.urls.items())):
            body = {**faults, "seed": seed + i} if "seed" in faults else faults
            r = await http.put(f"{url}/_sim/faults", json=body,
                               headers={"authorization": f"Bearer {self.admin[name]}"})
            if r.status_code != 200:
                raise RuntimeError(f"{name}: PUT /_sim/faults answered {r.status_code}: "
                                   f"{r.text[:500]}")


async def _provider_stats(processor: Any) -> dict[str, dict[str, Any]]:
    infos = await asyncio.gather(*[p.info.remote() for p in processor.providers])
    return {i["name"]: i for i in infos}


def _provider_delta(before: dict[str, dict[str, Any]],
                    after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        out[name] = {k: a[k] - b.get(k, 0) for k in ("calls", "attempts", "retries",
                                                     "rejected_open", "rejected_bulkhead")
                     if isinstance(a.get(k), int)}
        out[name]["breaker_at_end"] = a.get("breaker")
    return out


async def create_merchants(processor: Any, token: str, per_currency: int,
                           first_id: int) -> dict[str, list[int]]:
    """``per_currency`` merchant accounts in each of CURRENCIES (they may not go below
    zero, as merchants usually are), created over RPC."""
    from processor.client import Client
    from processor.codes import AccountResult
    from processor.types import Account, AccountFlags

    limited = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
    merchants: dict[str, list[int]] = {}
    accounts = []
    next_id = first_id
    for currency in CURRENCIES:
        merchants[currency] = list(range(next_id, next_id + per_currency))
        accounts += [Account(id=i, currency=currency, flags=limited)
                     for i in merchants[currency]]
        next_id += per_currency
    async with Client("127.0.0.1", processor.rpc_port, token, timeout_s=60.0) as client:
        codes = await client.create_accounts(accounts)
    refused = [c.name for c in codes if c != AccountResult.ok]
    if refused:
        raise RuntimeError(f"merchant accounts refused: {Counter(refused)}")
    return merchants


async def _resolve(http: Any, payment_ids: Sequence[str], wait_s: float) -> dict[str, Any]:
    """Poll ``GET /v1/payments/{id}`` until none is ``processing`` or ``wait_s`` passed;
    the final statuses by count and how long it took."""
    tracked = list(dict.fromkeys(p for p in payment_ids if p))[:RESOLVE_TRACKED_MAX]
    final: dict[str, str] = {}
    started = time.perf_counter()
    pending = list(tracked)
    while pending and time.perf_counter() - started < wait_s:
        await asyncio.sleep(0.5)
        answers = await asyncio.gather(*[http.get(f"/v1/payments/{p}") for p in pending],
                                       return_exceptions=True)
        still = []
        for pid, r in zip(pending, answers, strict=True):
            status = (r.json().get("status") if not isinstance(r, BaseException)
                      and r.status_code == 200 else None)
            if status in (None, "processing"):
                still.append(pid)
            else:
                final[pid] = status
        pending = still
    statuses = Counter(final.values())
    if pending:
        statuses["still processing"] = len(pending)
    return {"tracked": len(tracked), "final_status": dict(statuses),
            "seconds": round(time.perf_counter() - started, 1)}


def _phases(error_rates: Sequence[float], *, median_ms: float, p99_ms: float,
            baseline: bool) -> list[tuple[str, dict[str, Any]]]:
    out = []
    if baseline:
        out.append(("baseline", fault_body(0.0, median_ms=None, p99_ms=None, seed=0)))
    for rate in error_rates:
        out.append((f"errors {rate:g}", fault_body(rate, median_ms=median_ms, p99_ms=p99_ms,
                                                   seed=0)))
    return out


async def measure(
    processor: Any,
    *,
    error_rates: Sequence[float] = (0.0, 0.05),
    rate_per_s: float = 100.0,
    seconds: float = 15.0,
    provider_median_ms: float = 40.0,
    provider_p99_ms: float = 250.0,
    baseline: bool = False,
    provider: str = "auto",
    merchants_per_currency: int = 10,
    in_flight_max: int = 256,
    timeout_s: float = 30.0,
    warmup_s: float = 2.0,
    resolve_wait_s: float = 30.0,
    seed: int = 1,
    client: str = "raw",
    idle_s: float = 0.0,
    console: Console | None = None,
) -> dict[str, Any]:
    """Measure authorizations against an already running ``processor`` (see the module's
    docstring); returns ``{"phases": [...], "problems": [...]}``, and ``"idle"`` when
    ``idle_s`` > 0. The providers' faults are cleared afterwards, whatever happens."""
    import httpx

    from processor.identity import SCOPES, issue_token, signing_key

    if provider not in PROVIDER_CHOICES:
        raise ValueError(f"provider must be one of {PROVIDER_CHOICES}")
    if client not in CLIENT_CHOICES:
        raise ValueError(f"client must be one of {CLIENT_CHOICES}")
    say = console.print if console is not None else (lambda *a, **k: None)
    key = signing_key(Path(processor.config.data_dir), now_s=int(time.time()))
    token = issue_token(key, SCOPES, ttl_s=TOKEN_TTL_S, now_s=int(time.time()))
    rng = random.Random(seed)
    merchants = await create_merchants(processor, token, merchants_per_currency,
                                       int(time.time()) * ID_BLOCK + rng.randrange(ID_BLOCK // 2))
    processes, problems = await _processes(processor)
    sims = _Sims(processor)
    names = sorted(processor.provider_urls)
    run_id = uuid.uuid4().hex[:12]
    results: dict[str, Any] = {"phases": [], "problems": problems,
                               "merchants": {c: len(m) for c, m in merchants.items()}}
    if idle_s > 0:
        say(f"[bold]idle[/]: the server's CPU at rest for {idle_s:g} s")
        before = await asyncio.to_thread(processes.cpu_by_pid)
        started = time.perf_counter()
        await asyncio.sleep(idle_s)
        after = await asyncio.to_thread(processes.cpu_by_pid)
        results["idle"] = idle_figures(before, after, time.perf_counter() - started)
        say(f"  server at rest: {results['idle']['server']:,.1f} ms/s {results['idle']}")
    base_url = f"http://127.0.0.1:{processor.http_port}"
    # The load goes through ``load``; payment look-ups and the simulators' admin API, which
    # are not measured, through httpx.
    load: RawClient | HttpxClient = (
        RawClient(base_url, token, in_flight_max, loopback_source(base_url, 0))
        if client == "raw"
        else HttpxClient(base_url, token, in_flight_max, timeout_s))
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s),
                                 headers={"authorization": f"Bearer {token}"}) as http, \
            httpx.AsyncClient(timeout=10.0) as admin:
        counter = iter(range(10**12))

        def make_send(tag: str) -> Send:
            async def send(i: int) -> tuple[int, str, str]:
                choice = None
                if provider == "split":
                    choice = names[i % len(names)]
                elif provider != "auto":
                    choice = provider
                body = payment_body(rng, merchants, choice)
                status, content = await load.post("/v1/payments", body, {
                    # Letters between the parts: digits joined by '_' or '-' could read as a
                    # card number.
                    "Idempotency-Key": f"bench_{run_id}_p{tag}_k{next(counter)}"})
                try:
                    decoded = msgspec.json.decode(content)
                except msgspec.DecodeError:
                    decoded = None
                payment = decoded.get("payment") if isinstance(decoded, dict) else None
                view = payment if isinstance(payment, dict) else decoded
                pid = view.get("id", "") if isinstance(view, dict) else ""
                return status, outcome_label(status, decoded), str(pid)
            return send

        try:
            for n, (name, faults) in enumerate(_phases(
                    error_rates, median_ms=provider_median_ms, p99_ms=provider_p99_ms,
                    baseline=baseline)):
                phase_seed = seed * 1000 + n * 10
                await sims.set_faults(admin, faults, phase_seed)
                say(f"[bold]{name}[/]: faults {faults | {'seed': phase_seed}}; "
                    f"{rate_per_s:g}/s offered for {seconds:g} s"
                    + (f" after {warmup_s:g} s warm-up" if warmup_s > 0 else ""))
                if warmup_s > 0 and rate_per_s * warmup_s >= 1:
                    await open_loop(make_send(f"{n}w"), rate_per_s=rate_per_s,
                                    duration_s=warmup_s, in_flight_max=in_flight_max,
                                    timeout_s=timeout_s)
                providers_before = await _provider_stats(processor)
                engine_before = await processor.payments.stats.remote()
                webhooks_before = await sims.webhooks(admin)
                cpu_before = await asyncio.to_thread(processes.cpu_by_pid)
                started = time.perf_counter()
                run = await open_loop(make_send(str(n)), rate_per_s=rate_per_s,
                                      duration_s=seconds, in_flight_max=in_flight_max,
                                      timeout_s=timeout_s)
                wall_s = time.perf_counter() - started
                cpu_after = await asyncio.to_thread(processes.cpu_by_pid)
                providers_after = await _provider_stats(processor)
                phase = {"name": name, "faults": {**faults, "seed": phase_seed},
                         "provider_choice": provider, **summarize(run)}
                phase.update(_cpu_figures(cpu_before, cpu_after, phase["answered"], wall_s))
                phase["provider_actors"] = _provider_delta(providers_before, providers_after)
                # The payments engine's counters over the phase (steps parked or recovered,
                # claims lost, provider events that came before the answer they repeat).
                engine_after = await processor.payments.stats.remote()
                phase["payments_engine"] = {k: v - engine_before.get(k, 0)
                                            for k, v in engine_after.items()}
                # Deliveries per event show events sent back to be delivered again; read
                # right after the phase, so the last events may still be on their way.
                webhooks_after = await sims.webhooks(admin)
                phase["provider_webhooks"] = {
                    name: {k: v - webhooks_before.get(name, {}).get(k, 0)
                           for k, v in counts.items()}
                    for name, counts in webhooks_after.items()}
                phase["processor_added_ms"] = processor_added(run.answers,
                                                              await sims.served(admin))
                processing = [a.payment_id for a in run.answers if a.http_status == 202]
                if processing and resolve_wait_s > 0:
                    phase["processing_resolved"] = await _resolve(http, processing,
                                                                  resolve_wait_s)
                results["phases"].append(phase)
                _note_problems(phase, results["problems"])
                lat = phase["latency_ms"]["answered"]
                say(f"  {phase['achieved_authorizations_per_s']:,.1f} authorized/s, p50 "
                    f"{lat['p50']:,.1f} ms, p99 {lat['p99']:,.1f} ms; {phase['outcomes']}")
        finally:
            with contextlib.suppress(Exception):
                await sims.set_faults(admin, ALL_FAULTS_OFF, 0)
            if isinstance(load, RawClient):
                load.close()
            else:
                await load.aclose()
    return results


def _note_problems(phase: dict[str, Any], problems: list[str]) -> None:
    name = phase["name"]
    if phase["dropped_in_flight_max"]:
        problems.append(f"{name}: {phase['dropped_in_flight_max']} of {phase['scheduled']} "
                        "sends dropped (in-flight limit reached)")
    if phase["abandoned"]:
        problems.append(f"{name}: {phase['abandoned']} requests overran their timeout")
    if phase["generator_cpu_cores_busy"] > 0.85:
        problems.append(f"{name}: the load generator was CPU-bound "
                        f"({phase['generator_cpu_cores_busy']} cores): figures are bounds")
    unexpected = {o: n for o, n in phase["outcomes"].items()
                  if o.split(" ", 1)[0] not in ("201", "202", "402", "503")}
    if unexpected:
        problems.append(f"{name}: unexpected answers {unexpected}")
    resolved = phase.get("processing_resolved")
    if resolved and resolved["final_status"].get("still processing"):
        problems.append(f"{name}: {resolved['final_status']['still processing']} payments "
                        f"still processing {resolved['seconds']} s after the phase")


# -- the run --------------------------------------------------------------------------------


async def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from bench.__main__ import machine_info

    machine = machine_info()
    machine["command"] = " ".join([Path(sys.executable).name, "-m", "bench.authorization",
                                   *sys.argv[1:]])
    results: dict[str, Any] = {"machine": machine, "args": _jsonable(vars(args))}
    async with ledger.scratch_processor(args.database_url, args.shards,
                                        prefix="txproc-bench-auth-") as (processor, startup_s):
        results["startup_s"] = startup_s
        console.print(f"processor ready in {startup_s} s: {args.shards} shards, "
                      f"http {processor.http_port}, providers {processor.provider_urls}, "
                      f"{'embedded PostgreSQL' if processor.embedded else 'external database'}")
        results.update(await measure(
            processor, error_rates=args.error_rates, rate_per_s=args.rate,
            seconds=args.seconds, provider_median_ms=args.provider_median_ms,
            provider_p99_ms=args.provider_p99_ms, baseline=args.baseline,
            provider=args.provider, merchants_per_currency=args.merchants,
            in_flight_max=args.in_flight_max, timeout_s=args.timeout_s,
            warmup_s=args.warmup_s, resolve_wait_s=args.resolve_wait_s, seed=args.seed,
            client=args.client, idle_s=args.idle_seconds, console=console))
    return results


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def print_table(results: dict[str, Any], console: Console) -> None:
    machine = results["machine"]
    args = results["args"]
    table = Table(title=f"txproc authorizations, {machine['date_utc']} "
                        f"({machine['cpu_count']} cores, load {machine['load_average_at_start']})",
                  caption=f"POST /v1/payments (authorize), open loop, {args['seconds']:g} s per "
                          f"phase, provider routing {args['provider']}, {args['client']} "
                          "client; latency from the scheduled send; CPU: shards, front, "
                          "payments, provider and risk actors, postgres")
    for column in ("phase", "offered/s", "authorized/s", "p50 ms", "p95 ms", "p99 ms",
                   "auth p50", "auth p99", "added p50/p99", "201", "202", "402", "503",
                   "other",
                   "CPU ms/req", "cores busy"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for p in results["phases"]:
        lat, ok = p["latency_ms"]["answered"], p["latency_ms"]["authorized"]
        counts = [sum(n for o, n in p["outcomes"].items() if o.split(" ", 1)[0] == s)
                  for s in ("201", "202", "402", "503")]
        table.add_row(_phase_label(p), _fmt(p["offered_rate_per_s"]),
                      _fmt(p["achieved_authorizations_per_s"], ",.1f"),
                      _fmt(lat["p50"], ",.1f"), _fmt(lat["p95"], ",.1f"),
                      _fmt(lat["p99"], ",.1f"), _fmt(ok["p50"], ",.1f"),
                      _fmt(ok["p99"], ",.1f"), _added(p), *[str(c) for c in counts],
                      str(p["sent"] - sum(counts)),
                      _fmt(p["server_cpu_ms_per_request"], ",.2f"),
                      _fmt(p["server_cpu_cores_busy"], ".2f"))
    console.print(table)
    for p in results["phases"]:
        console.print(f"  {p['name']}: {p['outcomes']}, dropped {p['dropped_in_flight_max']}, "
                      f"generator lag max {p['generator_lag_ms_max']} ms, generator CPU "
                      f"{p['generator_cpu_cores_busy']} cores; CPU s {p['cpu_s']}")
        for name, d in p["provider_actors"].items():
            console.print(f"    provider {name}: {d}")
        for name, d in p.get("provider_webhooks", {}).items():
            console.print(f"    {name} webhooks: {d}")
        if "processing_resolved" in p:
            console.print(f"    202s afterwards: {p['processing_resolved']}")
    if "idle" in results:
        idle = results["idle"]
        console.print(f"  at rest: server {idle['server']:,.1f} ms of CPU per second "
                      f"({', '.join(f'{g} {v:,.1f}' for g, v in idle.items() if g != 'server')})")
    for problem in results["problems"]:
        console.print(f"  [yellow]problem[/]: {problem}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    console = Console() if sys.stdout.isatty() else Console(width=140)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    started = time.perf_counter()
    try:
        results = asyncio.run(run(args, console))
    except KeyboardInterrupt:
        console.print("interrupted; everything started was stopped")
        return 130
    results["total_s"] = round(time.perf_counter() - started, 1)
    print_table(results, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(msgspec.json.format(msgspec.json.encode(results), indent=2) + b"\n")
    console.print(f"\nresults written to {args.out}\n")
    console.print("Markdown for the README:\n")
    print(markdown_rows(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
