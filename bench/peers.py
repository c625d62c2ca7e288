"""The benchmark's peers: TigerBeetle on the same workload, and the ratios to every peer.

``python -m bench --tigerbeetle HOST:PORT`` sends the processor's batch workload (the same
accounts count, the same seeded uniform and hot transfers, the same batch size and requests
in flight) to a TigerBeetle server that someone else started, through TigerBeetle's own
Python client (PyPI ``tigerbeetle``, 0.17.x, an optional dependency imported only then).
Nothing here starts, builds or downloads TigerBeetle, and nothing talks to any address but
the one given.

Ids: accounts and transfers of a run start at seconds-since-epoch x 1e9 (as the processor's
do), so reruns against one TigerBeetle data file never collide; a fresh data file is not
needed. Our currency maps to a TigerBeetle ``ledger`` by its ISO 4217 numeric code (EUR:
978); accounts and transfers carry ``code`` 1 (both must be non-zero in TigerBeetle).

CPU: TigerBeetle's server CPU is read from the process listening on the port when the
address is this machine's and its pid is visible (psutil); otherwise only this process's
CPU (the client) is reported, and the run says so.

The ratio and report helpers at the bottom are pure, so unit tests import this module
without Ray, sockets or TigerBeetle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from bench import ledger

__all__ = [
    "ACCOUNT_CODE",
    "LEDGER_BY_CURRENCY",
    "TRANSFER_CODE",
    "TigerBeetleMissing",
    "comparison_rows",
    "drive_tigerbeetle",
    "import_tigerbeetle",
    "is_local_host",
    "parse_host_port",
    "ratios",
    "run_tigerbeetle",
    "split_host_port",
    "tb_ledger",
    "to_tb_accounts",
    "to_tb_transfers",
]

# ISO 4217 numeric codes: TigerBeetle's ledger is a u32 that must not be zero.
LEDGER_BY_CURRENCY = {"EUR": 978, "USD": 840, "GBP": 826, "CHF": 756, "JPY": 392}
ACCOUNT_CODE = 1
TRANSFER_CODE = 1
ID_BLOCK = 10**9
TIGERBEETLE_PIP = "tigerbeetle>=0.17,<0.18"
# Above this share of a core, this process (the Python client turning dataclasses into C
# structs) rather than the server limited TigerBeetle's figure.
CLIENT_BOUND_CORES = 0.85
# A phase shorter than this is too short to call its client CPU-bound (timer noise).
CLIENT_BOUND_WALL_S_MIN = 1.0
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class TigerBeetleMissing(ImportError):
    """The optional ``tigerbeetle`` client package is not installed."""


def import_tigerbeetle() -> Any:
    """The ``tigerbeetle`` module, or TigerBeetleMissing saying how to install it."""
    try:
        import tigerbeetle
    except ImportError as exc:
        raise TigerBeetleMissing(
            "--tigerbeetle needs TigerBeetle's Python client, an optional dependency: "
            f"install it with  .venv/bin/pip install '{TIGERBEETLE_PIP}'  "
            "(or the project's bench extra)") from exc
    return tigerbeetle


def tigerbeetle_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tigerbeetle")
    except PackageNotFoundError:
        return "unknown"


# -- the address (pure) -------------------------------------------------------------------


def split_host_port(value: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare ``port`` (loopback) as (host, port).

    Raises ValueError when the value is none of these.
    """
    value = value.strip()
    if value.isdigit():
        host, port_text = "127.0.0.1", value
    elif value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{value!r}: expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    if not host:
        raise ValueError(f"{value!r}: the host is empty")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: the port must be within 1..65535")
    return host, int(port_text)


def parse_host_port(value: str) -> str:
    """argparse type of ``--tigerbeetle``: the address normalised as TigerBeetle reads it.

    ``localhost`` becomes 127.0.0.1 (TigerBeetle's client takes IP addresses).
    """
    try:
        host, port = split_host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if host == "localhost":
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_local_host(host: str, local_addresses: set[str] | None = None) -> bool:
    """Whether ``host`` is this machine: loopback, or one of its interfaces' addresses."""
    if host in LOOPBACK_NAMES:
        return True
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return True
    if local_addresses is None:
        local_addresses = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values()
                           for a in addrs}
    return host in local_addresses


# -- mapping our workload to TigerBeetle's objects (pure) ---------------------------------


def tb_ledger(currency: str) -> int:
    """TigerBeetle's ledger number for one of our currencies (its ISO 4217 numeric code)."""
    try:
        return LEDGER_BY_CURRENCY[currency]
    except KeyError:
        raise ValueError(f"no TigerBeetle ledger for currency {currency!r}") from None


def to_tb_accounts(tb: Any, accounts: Sequence[Any]) -> list[Any]:
    """``tb.Account`` objects for our accounts: same ids, no flags (no balance limits)."""
    return [tb.Account(id=a.id, ledger=tb_ledger(a.currency), code=ACCOUNT_CODE,
                       flags=tb.AccountFlags.NONE) for a in accounts]


def to_tb_transfers(tb: Any, transfers: Sequence[Any]) -> list[Any]:
    """``tb.Transfer`` objects for our plain transfers: same ids, accounts and amounts."""
    out = []
    ledgers: dict[str, int] = {}
    none = tb.TransferFlags.NONE
    make = tb.Transfer
    for t in transfers:
        if t.flags or t.pending_id or t.timeout_s:
            raise ValueError("only plain transfers are sent to TigerBeetle by the benchmark")
        number = ledgers.get(t.currency)
        if number is None:
            number = ledgers[t.currency] = tb_ledger(t.currency)
        out.append(make(id=t.id, debit_account_id=t.debit_account_id,
                        credit_account_id=t.credit_account_id, amount=t.amount,
                        ledger=number, code=TRANSFER_CODE, flags=none))
    return out


def status_name(result: Any) -> str:
    """``created``, ``exists``, ``exceeds_credits``... of one create_* result."""
    status = result.status
    return str(getattr(status, "name", status)).lower()


# -- the batch driver ---------------------------------------------------------------------


async def drive_tigerbeetle(
    submit: Callable[[list[Any]], Any],
    items: Sequence[Any],
    *,
    batch_size: int,
    concurrency: int,
    phase_s_max: float = 0.0,
    request_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Send ``items`` through ``submit`` (a ``ClientAsync.create_*``) in batches.

    ``concurrency`` requests are kept queued at the client, as for the processor. TigerBeetle
    answers one result per event (0.17); only ``created`` counts as done. The client retries
    the network on its own, so an exception (eviction, a batch too large for the server) or
    a request unanswered after ``request_timeout_s`` ends the phase: the rest are counted
    lost. Figures mirror ``ledger.drive_batches``.
    """
    if not 1 <= concurrency <= 64:
        raise ValueError("concurrency must be within 1..64")
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    order = iter(range(len(chunks)))
    codes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies_ms: list[float] = []
    lost = 0
    submitted = 0
    stopped_early = False
    aborted = False
    started_s = time.perf_counter()
    cpu_started_s = time.process_time()

    async def worker() -> None:
        nonlocal lost, submitted, stopped_early, aborted
        for k in order:
            if aborted:
                return
            if phase_s_max > 0 and time.perf_counter() - started_s > phase_s_max:
                stopped_early = True
                return
            chunk = list(chunks[k])
            submitted += len(chunk)
            sent_s = time.perf_counter()
            try:
                results = await asyncio.wait_for(submit(chunk), timeout=request_timeout_s)
            except Exception as exc:
                errors["timeout" if isinstance(exc, TimeoutError) else type(exc).__name__] += 1
                lost += len(chunk)
                aborted = True
                return
            latencies_ms.append((time.perf_counter() - sent_s) * 1000)
            if len(results) != len(chunk):
                errors["result_count_mismatch"] += 1
            codes.update(status_name(r) for r in results)

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    elapsed_s = time.perf_counter() - started_s
    client_cpu_s = time.process_time() - cpu_started_s
    ok = codes.get("created", 0)
    return {
        "transfers_submitted": submitted,
        "transfers_ok": ok,
        "codes": dict(sorted(codes.items())),
        "request_errors": dict(errors),
        "transfers_lost": lost,
        "elapsed_s": round(elapsed_s, 3),
        "durable_transfers_per_s": round(ok / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "request_latency_ms": ledger.latency_summary_ms(latencies_ms),
        "stopped_early": stopped_early,
        "aborted": aborted,
        "client_cpu_s": round(client_cpu_s, 3),
    }


class _ServerCpu:
    """CPU seconds and RSS of the TigerBeetle server process, when it is visible."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._proc: psutil.Process | None = None
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                self._proc = psutil.Process(pid)

    def cpu_s(self) -> float | None:
        if self._proc is None:
            return None
        try:
            t = self._proc.cpu_times()
        except psutil.Error:
            return None
        return float(t.user + t.system)

    def rss_mib(self) -> float | None:
        if self._proc is None:
            return None
        try:
            return round(self._proc.memory_info().rss / 2**20, 1)
        except psutil.Error:
            return None


async def _measured(
    server: _ServerCpu, body: Callable[[], Any]
) -> dict[str, Any]:
    before = server.cpu_s()
    started = time.perf_counter()
    figures: dict[str, Any] = await body()
    wall_s = time.perf_counter() - started
    after = server.cpu_s()
    done = figures.get("transfers_ok", 0)
    cpu = round(after - before, 3) if before is not None and after is not None else None
    client = figures["client_cpu_s"]
    figures.update({
        "wall_s": round(wall_s, 3),
        "server_cpu_s": cpu,
        "server_cpu_us_per_transfer": (round(cpu * 1e6 / done, 1)
                                       if cpu is not None and done else None),
        "server_cpu_cores_busy": round(cpu / wall_s, 2) if cpu is not None and wall_s else None,
        "client_cpu_us_per_transfer": round(client * 1e6 / done, 1) if done else None,
        "client_cpu_cores_busy": round(client / wall_s, 2) if wall_s else None,
        "server_rss_mib": server.rss_mib(),
    })
    return figures


def _probe(host: str, port: int, timeout_s: float) -> None:
    """Fail fast with a clear message when nothing listens (the client would wait forever)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConnectionError(f"no TigerBeetle server answers at {host}:{port} ({exc}); "
                              "start one first (this benchmark never starts it)") from None


async def run_tigerbeetle(
    address: str,
    *,
    cluster_id: int,
    accounts: int,
    transfers: int,
    batch_size: int,
    concurrency: int,
    hot_share: float,
    seed: int,
    skip: set[str],
    phase_s_max: float = 0.0,
    say: Callable[[str], None] = print,
    tb: Any = None,
    pid_of: Callable[[int], int | None] = ledger.listening_pid,
    probe_timeout_s: float | None = 5.0,
    first_id: int | None = None,
) -> dict[str, Any]:
    """The processor's batch workload against the TigerBeetle server at ``address``.

    The same ``Random(seed)`` draws as the processor's run give the same debit/credit
    account pattern and amounts (ids offset). ``tb`` (the module), ``pid_of`` and
    ``probe_timeout_s=None`` let tests run this without a server.
    """
    tb = tb if tb is not None else import_tigerbeetle()
    host, port = split_host_port(address)
    if probe_timeout_s is not None:
        await asyncio.to_thread(_probe, host, port, probe_timeout_s)
    local = is_local_host(host)
    pid = pid_of(port) if local else None
    server = _ServerCpu(pid)
    if pid is None:
        cpu_counted = ("client only: the server is not on this machine" if not local else
                       "client only: the listening server's pid is not visible to this user")
    else:
        cpu_counted = f"TigerBeetle server process (pid {pid})"
    base = first_id if first_id is not None else int(time.time()) * ID_BLOCK
    out: dict[str, Any] = {
        "address": address,
        "cluster_id": cluster_id,
        "client": f"tigerbeetle {tigerbeetle_version()} (Python, ClientAsync)",
        "server_pid": pid,
        "cpu_counted": cpu_counted,
        "ledger": tb_ledger(ledger.CURRENCY),
        "first_id": base,
        "batch": batch_size,
        "concurrency": concurrency,
        "phases": {},
        "problems": [],
    }
    problems: list[str] = out["problems"]
    if pid is None:
        problems.append(f"tigerbeetle: CPU per transfer is {cpu_counted}")
    rng = random.Random(seed)
    our_accounts = ledger.make_accounts(base, accounts)
    account_ids = [a.id for a in our_accounts]
    next_id = base + accounts
    say(f"[bold]tigerbeetle[/]: {address}, cluster {cluster_id}, {out['client']}, "
        f"CPU: {cpu_counted}")
    client = tb.ClientAsync(cluster_id=cluster_id, replica_addresses=address)
    try:
        tb_accounts = to_tb_accounts(tb, our_accounts)

        async def create_accounts() -> dict[str, Any]:
            return await drive_tigerbeetle(client.create_accounts, tb_accounts,
                                           batch_size=batch_size, concurrency=1)

        phase = await _measured(server, create_accounts)
        phase["accounts"] = phase.pop("transfers_ok")
        out["phases"]["accounts"] = phase
        if phase["accounts"] != accounts:
            problems.append(f"tigerbeetle: account creation answered {phase['codes']} "
                            f"{phase['request_errors'] or ''}".rstrip())
            return out
        for name, make in (("uniform", ledger.uniform_transfers),
                           ("hot", ledger.hot_transfers)):
            if name in skip:
                continue
            kwargs: dict[str, Any] = {"hot_share": hot_share} if name == "hot" else {}
            ours = make(account_ids, transfers, first_id=next_id, rng=rng, **kwargs)
            next_id += len(ours)
            items = to_tb_transfers(tb, ours)
            del ours
            say(f"[bold]tigerbeetle {name}[/]: {len(items):,} transfers in batches of "
                f"{batch_size:,}, {concurrency} in flight")

            async def batches(t: list[Any] = items) -> dict[str, Any]:
                return await drive_tigerbeetle(client.create_transfers, t,
                                               batch_size=batch_size,
                                               concurrency=concurrency,
                                               phase_s_max=phase_s_max)

            phase = await _measured(server, batches)
            del items
            out["phases"][name] = phase
            problems.extend(_phase_problems(name, phase))
            cpu = phase["server_cpu_us_per_transfer"]
            say(f"  {phase['durable_transfers_per_s']:,.0f} transfers/s, server CPU "
                f"{'-' if cpu is None else f'{cpu:,.1f}'} us/transfer, client "
                f"{phase['client_cpu_cores_busy']} cores busy")
            if phase["aborted"]:
                break
    finally:
        try:
            await client.close()
        except Exception as exc:  # after an abandoned request its own check fails
            problems.append(f"tigerbeetle: closing the client failed: {exc!r} (expected "
                            "after a request that timed out)")
    return out


def _phase_problems(name: str, phase: dict[str, Any]) -> list[str]:
    out = []
    label = f"tigerbeetle {name}"
    if phase["request_errors"]:
        out.append(f"{label}: requests failed, phase ended: {phase['request_errors']}")
    if phase["transfers_lost"]:
        out.append(f"{label}: {phase['transfers_lost']} transfers never answered")
    if phase["stopped_early"]:
        out.append(f"{label}: stopped after --phase-seconds-max with "
                   f"{phase['transfers_submitted']:,} transfers sent")
    refused = {c: n for c, n in phase["codes"].items() if c != "created"}
    if refused:
        out.append(f"{label}: transfers not created: {refused}")
    busy = phase.get("client_cpu_cores_busy") or 0.0
    if busy > CLIENT_BOUND_CORES and (phase.get("wall_s") or 0.0) >= CLIENT_BOUND_WALL_S_MIN:
        out.append(f"{label}: the Python client was CPU-bound ({busy} cores): the figure "
                   "is a lower bound of the server's")
    return out


# -- ratios to the peers (pure) -----------------------------------------------------------

# Which TigerBeetle workload each processor phase is held against: the same one; single
# HTTP transfers have no TigerBeetle counterpart and are held against its uniform batches.
TIGERBEETLE_REFERENCE = {"uniform": "uniform", "uniform_batch": "uniform", "hot": "hot",
                         "hot_batch": "hot", "http": "uniform"}


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b to 3 significant digits (small ratios keep their precision); None if unknown."""
    if a is None or not b:
        return None
    return float(f"{a / b:.3g}")


def _cpu_s(us: float | None) -> float | None:
    return None if us is None else round(us / 1e6, 9)


def comparison_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measured system and workload: transfers/s, CPU-seconds per transfer
    (and in µs), what that CPU counts, and the ratios of both to pgbench and TigerBeetle.

    Ratios are this row's figure over the reference's: throughput over pgbench tps and
    over TigerBeetle's transfers/s on the same workload; CPU per transfer over PostgreSQL's
    CPU per TPC-B transaction and over TigerBeetle's server CPU per transfer. A CPU figure
    that is the client's only (TigerBeetle's server not visible) is shown but not compared.
    """
    phases = results.get("phases", {})
    pg = results.get("pgbench") or {}
    tb = results.get("tigerbeetle") or {}
    tb_phases = tb.get("phases", {})
    pg_tps = pg.get("tps")
    pg_cpu = pg.get("postgres_cpu_us_per_transaction")
    rows: list[dict[str, Any]] = []

    def add(key: str, rate_name: str, system: str, workload: str, rate: float | None,
            cpu_us: float | None, counted: str, *, tb_ref: str | None = None,
            cpu_comparable: bool = True) -> None:
        ref = tb_phases.get(tb_ref) if tb_ref else None
        cpu = cpu_us if cpu_comparable else None
        is_pgbench = system == "pgbench"
        rows.append({
            "key": key,
            "rate_name": rate_name,
            "system": system,
            "workload": workload,
            "transfers_per_s": rate,
            "cpu_s_per_transfer": _cpu_s(cpu_us),
            "cpu_us_per_transfer": cpu_us,
            "cpu_counted": counted,
            "over_pgbench_tps": None if is_pgbench else _ratio(rate, pg_tps),
            "tigerbeetle_reference": tb_ref if ref else None,
            "over_tigerbeetle_transfers_per_s": (
                _ratio(rate, ref.get("durable_transfers_per_s")) if ref else None),
            "cpu_over_pgbench": None if is_pgbench else _ratio(cpu, pg_cpu),
            "cpu_over_tigerbeetle": (
                _ratio(cpu, ref.get("server_cpu_us_per_transfer")) if ref else None),
        })

    server = "shards+front+postgres"
    for name in ("uniform", "uniform_batch", "hot", "hot_batch"):
        p = phases.get(name)
        if p is not None:
            workload, _, form = name.partition("_")
            label = f"{workload} TransferBatch" if form else f"{workload} batches"
            add(name, "durable_transfers_per_s", "txproc", label,
                p.get("durable_transfers_per_s"), p.get("server_cpu_us_per_transfer"),
                server, tb_ref=TIGERBEETLE_REFERENCE[name])
    # One HTTP phase per offered rate (http_1000, http_2000); runs before those had one, "http".
    for name, p in phases.items():
        if name == "http" or name.startswith("http_"):
            offered = p.get("offered_rate_per_s")
            workload = "single HTTP" + (f" {offered:,.0f}/s" if name != "http" else "")
            add(name, "ok_per_s", "txproc", workload, p.get("achieved_ok_per_s"),
                p.get("server_cpu_us_per_transfer"), server,
                tb_ref=TIGERBEETLE_REFERENCE["http"])
    if pg:
        add("pgbench", "tps", "pgbench", "TPC-B", pg_tps, pg_cpu, "postgres")
    for name in ("uniform", "hot"):
        p = tb_phases.get(name)
        if p is None:
            continue
        cpu = p.get("server_cpu_us_per_transfer")
        if cpu is not None:
            add(f"tigerbeetle_{name}", "transfers_per_s", "tigerbeetle", f"{name} batches",
                p.get("durable_transfers_per_s"), cpu, "server")
        else:  # the server is not visible: show the client's CPU, and say so
            add(f"tigerbeetle_{name}", "transfers_per_s", "tigerbeetle", f"{name} batches",
                p.get("durable_transfers_per_s"), p.get("client_cpu_us_per_transfer"),
                "client only", cpu_comparable=False)
    return rows


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """The ratios of ``comparison_rows`` under flat, self-describing keys, for the JSON.

    The pgbench throughput ratios keep their earlier names, e.g.
    ``uniform_durable_transfers_per_s_over_pgbench_tps`` and ``http_ok_per_s_over_pgbench_tps``.
    """
    out: dict[str, float] = {}
    for row in comparison_rows(results):
        if row["system"] == "pgbench":
            continue
        key, rate, ref = row["key"], row["rate_name"], row["tigerbeetle_reference"]
        cpu = "server_cpu_per_transfer"
        candidates = {
            f"{key}_{rate}_over_pgbench_tps": row["over_pgbench_tps"],
            f"{key}_{rate}_over_tigerbeetle_{ref}_transfers_per_s":
                row["over_tigerbeetle_transfers_per_s"],
            f"{key}_{cpu}_over_pgbench_postgres_cpu_per_transaction": row["cpu_over_pgbench"],
            f"{key}_{cpu}_over_tigerbeetle_{ref}_server_cpu_per_transfer":
                row["cpu_over_tigerbeetle"],
        }
        out.update({k: v for k, v in candidates.items() if v is not None})
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def comparison_cells(row: dict[str, Any]) -> list[str]:
    """The printed cells of one comparison row (the table and the Markdown share them)."""
    return [
        row["system"],
        row["workload"],
        _fmt(row["transfers_per_s"], ",.0f"),
        _fmt(row["cpu_us_per_transfer"], ",.1f", " µs"),
        row["cpu_counted"],
        _fmt(row["over_pgbench_tps"], ".3g"),
        _fmt(row["over_tigerbeetle_transfers_per_s"], ".3g"),
        _fmt(row["cpu_over_pgbench"], ".3g"),
        _fmt(row["cpu_over_tigerbeetle"], ".3g"),
    ]


# "CPU/transfer" is CPU-seconds per transfer, shown in µs; "/pgbench" is this row's
# transfers/s over pgbench's tps, "/TB" over TigerBeetle's transfers/s, and "CPU/..." the
# same for CPU per transfer (the JSON holds them under self-describing names).
COMPARISON_COLUMNS = (
    "system", "workload", "transfers/s", "CPU/transfer", "CPU of",
    "/pgbench", "/TB", "CPU/pgbench", "CPU/TB",
)


COMPARISON_NOTE = (
    "CPU/transfer: CPU-seconds per transfer (per TPC-B transaction for pgbench), in µs, of "
    "the processes named under 'CPU of'. Ratios are the row's figure over the reference's, "
    "measured in the same run on the same machine: /pgbench over pgbench's TPC-B tps, /TB "
    "over TigerBeetle's transfers/s on the same workload (single HTTP: over its uniform "
    "batches); CPU/pgbench and CPU/TB likewise for CPU per transfer (TigerBeetle: its server "
    "process).")


def comparison_markdown(results: dict[str, Any]) -> str:
    """The comparison as a Markdown table ('' when there is nothing to compare)."""
    rows = comparison_rows(results)
    if not rows:
        return ""
    lines = ["| " + " | ".join(COMPARISON_COLUMNS) + " |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(comparison_cells(r)) + " |" for r in rows]
    lines.append(f"\n{COMPARISON_NOTE}")
    return "\n".join(lines)
