"""``python -m bench``: the ledger benchmark, end to end on this machine.

Starts a processor (embedded PostgreSQL in a fresh temporary directory, removed afterwards,
unless ``--database-url``), creates the accounts, then measures in turn:

1. uniform: transfers between random accounts in RPC batches, a few requests in flight,
   sent as lists of ``Transfer``; then uniform_batch: the same workload as
   ``TransferBatch`` columns built from arrays (the client's fast form);
2. hot, hot_batch: the same, with half of all transfers debiting or crediting one account;
3. http_<rate>: single transfers over the HTTP API at each offered rate of ``--http-rate``
   in turn (open loop), e.g. http_1000 and http_2000, each after a warm-up at its rate
   (``--http-warmup-seconds``); before each that follows a phase which wrote transfers, the
   database is settled (VACUUM ANALYZE of the ledger's tables and a CHECKPOINT, as pgbench
   vacuums before its run), so the maintenance left due does not land inside it;
4. pgbench: PostgreSQL's own TPC-B on the same server, as the reference;
5. with ``--tigerbeetle HOST:PORT``: once the processor has stopped, the same batch workload
   (accounts, seeded uniform and hot transfers, batch size, requests in flight) against a
   TigerBeetle server someone else started, through TigerBeetle's Python client (the
   optional ``tigerbeetle`` package; see bench/peers.py). Its CPU is its server process's,
   found by the listening port when it runs on this machine, else the client's only.

For every phase it records the server's CPU seconds (shard and front Ray workers, postgres)
and the peak RSS of those processes. Prints a table, a comparison with the peers (transfers/s,
CPU-seconds per transfer and their ratios to pgbench and TigerBeetle) and a Markdown block,
and writes every figure with the machine's description to a JSON file. Figures are noisy on a
shared 2-core machine: compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from bench import ledger, peers
from processor.service import BATCH_ITEMS_MAX

__all__ = ["main", "parse_args"]

log = logging.getLogger("txproc.bench")
RESULTS_DIR = Path(__file__).parent / "results"
TOKEN_TTL_S = 6 * 3600
# Ids of a run start at seconds-since-epoch x 1e9, so runs against one --database-url never
# reuse an id (a run uses far fewer than 1e9 ids) and stay below 2**63.
ID_BLOCK = 10**9

# Each batch workload through each client form: a list of Transfer, then TransferBatch.
BATCH_PHASES = ("uniform", "uniform_batch", "hot", "hot_batch")
QUICK = {"transfers": 50_000, "http_seconds": 5.0, "pgbench_seconds": 5}
HTTP_RATES_DEFAULT = "1000,2000"


def _rates(text: str) -> list[float]:
    """``--http-rate``: comma-separated offered rates (requests/s), each above zero."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from exc
    if not rates or any(not 0 < r < float("inf") for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive numbers: {text!r}")
    return rates


def http_phase_name(rate_per_s: float) -> str:
    """The results key of the HTTP phase at an offered rate: ``http_1000``, ``http_2000``."""
    return f"http_{rate_per_s:g}"


def http_phases(phases: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The HTTP phases of a run in the order they ran (an older run's single ``http``
    phase too)."""
    return [(name, p) for name, p in phases.items()
            if name == "http" or name.startswith("http_")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfers", type=int, default=1_000_000,
                   help="transfers per batch workload (uniform and hot each)")
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=BATCH_ITEMS_MAX, help="transfers per request")
    p.add_argument("--concurrency", type=int, default=4, help="RPC requests in flight")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--hot-share", type=float, default=0.5)
    p.add_argument("--phase-seconds-max", type=float, default=300.0,
                   help="stop starting batches after this long in a batch phase "
                        "(0: never); the figures cover what was sent")
    p.add_argument("--http-rate", type=_rates, default=_rates(HTTP_RATES_DEFAULT),
                   metavar="RATE[,RATE...]",
                   help="offered requests/s; each rate is a phase of its own, run in turn "
                        f"(default {HTTP_RATES_DEFAULT})")
    p.add_argument("--http-seconds", type=float, default=20.0)
    p.add_argument("--http-warmup-seconds", type=float, default=2.0,
                   help="sends at the phase's rate before the measured seconds: they "
                        "open the connections; their answers count in the status counts, "
                        "the rate and the CPU, not in the latencies")
    p.add_argument("--http-client", choices=sorted(ledger.HTTP_CLIENTS), default="httpx",
                   help="httpx AsyncClient pools, or lean raw keep-alive connections (httpx "
                        "tops out near 500-700 req/s on one core of this machine)")
    p.add_argument("--http-connections", type=int, default=128,
                   help="connections, and so requests in flight, at most; sends beyond are "
                        "dropped and counted")
    p.add_argument("--pgbench-scale", type=int, default=10)
    p.add_argument("--pgbench-clients", type=int, default=8)
    p.add_argument("--pgbench-threads", type=int, default=2)
    p.add_argument("--pgbench-seconds", type=int, default=15)
    p.add_argument("--skip", default="", help="comma-separated phases to skip: "
                   "uniform,uniform_batch,hot,hot_batch,http,pgbench,audit; and settle: "
                   "the VACUUM ANALYZE and CHECKPOINT run between the batched and the HTTP "
                   "phases (as pgbench vacuums before its run)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--database-url", default="",
                   help="an existing PostgreSQL (its user must be able to create databases "
                        "for pgbench); default: embedded, in a temporary directory")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['transfers']:,} transfers, "
                        f"{QUICK['http_seconds']:.0f} s HTTP, pgbench -T "
                        f"{QUICK['pgbench_seconds']}")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results file (default bench/results/<date>[-quick].json)")
    p.add_argument("--tigerbeetle", type=peers.parse_host_port, default=None,
                   metavar="HOST:PORT",
                   help="also run the batch workload against the TigerBeetle server already "
                        "listening there (never started here; needs the optional "
                        f"'{peers.TIGERBEETLE_PIP}' client), after the processor has "
                        "stopped; --skip uniform/hot apply to it too; ids are time-based, so "
                        "a fresh data file is not needed")
    p.add_argument("--tigerbeetle-cluster-id", type=int, default=0,
                   help="the TigerBeetle cluster id (default 0)")
    args = p.parse_args(argv)
    if args.quick:
        args.transfers = min(args.transfers, QUICK["transfers"])
        args.http_seconds = min(args.http_seconds, QUICK["http_seconds"])
        args.pgbench_seconds = min(args.pgbench_seconds, QUICK["pgbench_seconds"])
    if not 1 <= args.batch <= BATCH_ITEMS_MAX:
        p.error(f"--batch must be within 1..{BATCH_ITEMS_MAX}")
    if args.accounts < 3 or args.transfers < 1:
        p.error("--accounts must be at least 3 and --transfers at least 1")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - {*BATCH_PHASES, "http", "settle", "pgbench", "audit"}
    if unknown:
        p.error(f"--skip: unknown phases {sorted(unknown)}")
    if not 0 <= args.tigerbeetle_cluster_id < 2**128:
        p.error("--tigerbeetle-cluster-id must be within 0..2**128-1")
    if args.out is None:
        day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        args.out = RESULTS_DIR / f"{day}{'-quick' if args.quick else ''}.json"
    return args


# -- the run ------------------------------------------------------------------------------


async def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine_info(), "args": _jsonable(vars(args)),
                               "phases": {}, "problems": []}
    async with ledger.scratch_processor(args.database_url, args.shards,
                                        prefix="txproc-bench-") as (processor, startup_s):
        results["startup_s"] = startup_s
        console.print(f"processor ready in {startup_s} s: {args.shards} shards, "
                      f"http {processor.http_port}, rpc {processor.rpc_port}, "
                      f"{'embedded PostgreSQL' if processor.embedded else 'external database'}")
        await _phases(args, processor, results, console)
    if args.tigerbeetle:
        # After the processor has stopped, so the two do not compete for the cores.
        await _tigerbeetle(args, results, console)
    _ratios(results)
    return results


async def _tigerbeetle(args: argparse.Namespace, results: dict[str, Any],
                       console: Console) -> None:
    try:
        tb = await peers.run_tigerbeetle(
            args.tigerbeetle, cluster_id=args.tigerbeetle_cluster_id,
            accounts=args.accounts, transfers=args.transfers, batch_size=args.batch,
            concurrency=args.concurrency, hot_share=args.hot_share, seed=args.seed,
            skip=args.skip, phase_s_max=args.phase_seconds_max, say=console.print)
    except Exception as exc:  # a peer missing must not lose the processor's figures
        results["problems"].append(f"tigerbeetle failed: {exc!r}")
        return
    results["problems"].extend(tb.pop("problems"))
    results["tigerbeetle"] = tb


async def _phases(
    args: argparse.Namespace, processor: Any, results: dict[str, Any], console: Console
) -> None:
    from processor.client import Client
    from processor.identity import SCOPES, issue_token, signing_key

    # The administrative role: the settle step's CHECKPOINT and pgbench's scratch database
    # need more than the service's own role (docs/security.md, "The database").
    url = processor.admin_database_url or processor.config.shard.database_url
    results["machine"]["postgres_version"] = await _server_version(url)
    stats0 = await ledger.shard_stats(processor.shards)
    postmaster = processor.embedded.pid if processor.embedded else ledger.postmaster_pid_of(url)
    processes = ledger.ServerProcesses(
        shard_pids=[int(s["pid"]) for s in stats0],
        front_pid=ledger.listening_pid(processor.http_port),
        postmaster_pid=postmaster,
    )
    if processes.front_pid is None:
        results["problems"].append("front pid not found: its CPU is not counted")
    if postmaster is None:
        results["problems"].append("postgres is not on this machine: its CPU is not counted")
    sampler = ledger.RssSampler(processes)
    sampler_task = asyncio.get_running_loop().create_task(sampler.run())
    key = signing_key(Path(processor.config.data_dir), now_s=int(time.time()))
    token = issue_token(key, SCOPES, ttl_s=TOKEN_TTL_S, now_s=int(time.time()))
    rng = random.Random(args.seed)
    next_id = int(time.time()) * ID_BLOCK
    idle_rss = processes.rss_bytes()
    results["idle_rss_mib"] = {g: _mib(v) for g, v in idle_rss.items()}
    try:
        async with Client("127.0.0.1", processor.rpc_port, token, timeout_s=120.0,
                          in_flight_max=max(args.concurrency, 4)) as client:
            accounts = ledger.make_accounts(next_id, args.accounts)
            next_id += args.accounts
            account_ids = [a.id for a in accounts]

            async def create_accounts() -> dict[str, Any]:
                codes: dict[str, int] = {}
                for i in range(0, len(accounts), BATCH_ITEMS_MAX):
                    for c in await client.create_accounts(accounts[i:i + BATCH_ITEMS_MAX]):
                        codes[c.name] = codes.get(c.name, 0) + 1
                return {"accounts": len(accounts), "codes": codes}

            phase = await _measured("accounts", processor, processes, sampler, create_accounts)
            results["phases"]["accounts"] = phase
            if phase["codes"].get("ok", 0) != len(accounts):
                results["problems"].append(f"account creation answered {phase['codes']}")
            for name in BATCH_PHASES:
                if name in args.skip:
                    continue
                workload, _, form = name.partition("_")
                make = ledger.hot_transfers if workload == "hot" else ledger.uniform_transfers
                console.print(f"[bold]{name}[/]: generating {args.transfers:,} transfers")
                kwargs: dict[str, Any] = {"hot_share": args.hot_share} if workload == "hot" \
                    else {}
                transfers = make(account_ids, args.transfers, first_id=next_id, rng=rng,
                                 **kwargs)
                next_id += len(transfers)
                # The fast form: columns the client built from its own arrays before sending.
                load: Any = ledger.as_batch_columns(transfers) if form else transfers
                console.print(f"[bold]{name}[/]: sending in batches of {args.batch:,}, "
                              f"{args.concurrency} in flight"
                              + (" as TransferBatch columns" if form else " as lists"))

                async def batches(t: Any = load) -> dict[str, Any]:
                    return await ledger.drive_batches(
                        client, t, batch_size=args.batch, concurrency=args.concurrency,
                        phase_s_max=args.phase_seconds_max)

                phase = await _measured(name, processor, processes, sampler, batches)
                del transfers, load
                results["phases"][name] = phase
                _note_phase_problems(name, phase, results)
                console.print(f"  {phase['durable_transfers_per_s']:,.0f} durable transfers/s, "
                              f"p99 {phase['request_latency_ms']['p99']:,.0f} ms")
        if "http" not in args.skip:
            settled: list[dict[str, Any]] = results.setdefault("settle_before_http", [])
            for i, rate_per_s in enumerate(args.http_rate):
                # Before each phase that follows one which wrote transfers.
                if "settle" not in args.skip and (i or not set(BATCH_PHASES) <= args.skip):
                    settled.append(await ledger.settle_database(url))
                    console.print("settled the database (VACUUM ANALYZE, CHECKPOINT): "
                                  f"{settled[-1]['seconds']} s")
                next_id = await _http_phase(args, processor, processes, sampler, results,
                                            console, token=token, account_ids=account_ids,
                                            rng=rng, rate_per_s=rate_per_s, first_id=next_id)
        if "pgbench" not in args.skip:
            console.print(f"[bold]pgbench[/]: -i -s {args.pgbench_scale}, then -c "
                          f"{args.pgbench_clients} -j {args.pgbench_threads} -T "
                          f"{args.pgbench_seconds}")
            try:
                results["pgbench"] = await ledger.run_pgbench(
                    url, processes, scale=args.pgbench_scale, clients=args.pgbench_clients,
                    threads=args.pgbench_threads, duration_s=args.pgbench_seconds)
                console.print(f"  {results['pgbench']['tps']:,.0f} tps")
            except Exception as exc:  # a reference figure missing must not lose the rest
                results["problems"].append(f"pgbench failed: {exc}")
        if "audit" not in args.skip:
            results["audit"] = await _audit(url)
            if not results["audit"]["passed"]:
                results["problems"].append(f"invariant audit FAILED: {results['audit']}")
        results["shards_at_end"] = await ledger.shard_stats(processor.shards)
    finally:
        sampler_task.cancel()
        await asyncio.gather(sampler_task, return_exceptions=True)


async def _http_phase(
    args: argparse.Namespace, processor: Any, processes: ledger.ServerProcesses,
    sampler: ledger.RssSampler, results: dict[str, Any], console: Console, *, token: str,
    account_ids: list[int], rng: random.Random, rate_per_s: float, first_id: int,
) -> int:
    """Single transfers over HTTP at one offered rate, open loop; returns the next free id."""
    name = http_phase_name(rate_per_s)
    count = int(rate_per_s * args.http_warmup_seconds) + int(rate_per_s * args.http_seconds)
    bodies = [ledger.transfer_body_json(t) for t in ledger.uniform_transfers(
        account_ids, count, first_id=first_id, rng=rng)]
    console.print(f"[bold]{name}[/]: {rate_per_s:,.0f} req/s offered for "
                  f"{args.http_warmup_seconds:g} s (warm-up) + {args.http_seconds:g} s")

    async def http() -> dict[str, Any]:
        return await ledger.drive_http_open_loop(
            f"http://127.0.0.1:{processor.http_port}", token, bodies,
            rate_per_s=rate_per_s, duration_s=args.http_seconds,
            connections_max=args.http_connections, client=args.http_client,
            warmup_s=args.http_warmup_seconds)

    phase = await _measured(name, processor, processes, sampler, http)
    results["phases"][name] = phase
    _note_phase_problems(name, phase, results)
    errors = sum(n for status, n in phase["answers_by_status"].items()
                 if status not in ("200", "201"))
    console.print(f"  {phase['achieved_ok_per_s']:,.0f} ok/s, {errors} errors, "
                  f"p50 {phase['latency_ms']['p50']:,.1f} ms, "
                  f"p99 {phase['latency_ms']['p99']:,.1f} ms, "
                  f"{_fmt(phase['server_cpu_us_per_transfer'])} us server CPU each")
    return first_id + count


async def _measured(
    name: str, processor: Any, processes: ledger.ServerProcesses,
    sampler: ledger.RssSampler, body: Any,
) -> dict[str, Any]:
    """Run ``body()`` and add CPU, RSS and shard figures measured around it."""
    before_stats = await ledger.shard_stats(processor.shards)
    processes.shard_pids = [int(s["pid"]) for s in before_stats]
    sampler.reset()
    before_cpu = processes.cpu_by_pid()
    started = time.perf_counter()
    figures = await body()
    wall_s = time.perf_counter() - started
    after_cpu = processes.cpu_by_pid()
    after_stats = await ledger.shard_stats(processor.shards)
    sampler.sample()
    cpu = ledger.cpu_delta_s(before_cpu, after_cpu)
    done = figures.get("transfers_ok") or figures.get("accounts") or 0
    figures.update({
        "wall_s": round(wall_s, 3),
        "cpu_s": cpu,
        "server_cpu_us_per_transfer": round(cpu["server"] * 1e6 / done, 1) if done else None,
        "server_cpu_cores_busy": round(cpu["server"] / wall_s, 2) if wall_s > 0 else None,
        "rss_mib_peak": {g: _mib(v) for g, v in sampler.peak_bytes.items()},
        "shards": ledger.shard_stats_delta(before_stats, after_stats, wall_s),
    })
    log.debug("phase %s: %s", name, figures)
    return figures


def _note_phase_problems(name: str, phase: dict[str, Any], results: dict[str, Any]) -> None:
    problems = results["problems"]
    for shard in phase["shards"]:
        if shard["restarted"]:
            problems.append(f"{name}: shard {shard['shard']} restarted during the phase")
    if phase.get("request_errors"):
        problems.append(f"{name}: requests refused or failed: {phase['request_errors']}")
    if phase.get("stopped_early"):
        problems.append(f"{name}: stopped after --phase-seconds-max with "
                        f"{phase['transfers_submitted']:,} transfers sent")
    if phase.get("transfers_lost"):
        problems.append(f"{name}: {phase['transfers_lost']} transfers never answered")
    codes = phase.get("codes", {})
    refused = {c: n for c, n in codes.items() if c != "ok"}
    if refused:
        problems.append(f"{name}: transfers refused: {refused}")
    statuses = phase.get("answers_by_status", {})
    bad = {s: n for s, n in statuses.items() if s not in ("200", "201")}
    if bad:
        problems.append(f"{name}: non-2xx answers: {bad}")
    if phase.get("generator_cpu_cores_busy", 0.0) > 0.85:
        problems.append(f"{name}: the load generator was CPU-bound "
                        f"({phase['generator_cpu_cores_busy']} cores): the achieved rate "
                        "is a lower bound")
    if phase.get("dropped_all_connections_busy"):
        problems.append(f"{name}: {phase['dropped_all_connections_busy']} of "
                        f"{phase['scheduled']} sends dropped (all connections busy)")


def _ratios(results: dict[str, Any]) -> None:
    """Every system's transfers/s and CPU-seconds per transfer, and the ratios to pgbench
    and TigerBeetle (bench/peers.py), into the results."""
    results["comparison"] = peers.comparison_rows(results)
    results["ratios"] = peers.ratios(results)


async def _audit(url: str) -> dict[str, Any]:
    from actors.ledger import LedgerStore

    started = time.perf_counter()
    store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=1800)
    try:
        audit = await store.audit()
    finally:
        await store.close()
    return {**msgspec.to_builtins(audit), "passed": audit.passed,
            "seconds": round(time.perf_counter() - started, 1)}


async def _server_version(url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        return str(await conn.fetchval("SHOW server_version", timeout=10))
    finally:
        await conn.close(timeout=5)


# -- reporting ----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil
    import ray

    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "ray": ray.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        return ""


def _mib(value: int) -> float:
    return round(value / 2**20, 1)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
            for k, v in values.items()}


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _phase_label(name: str, args: dict[str, Any], phase: dict[str, Any]) -> str:
    if name == "http" or name.startswith("http_"):
        return f"http {phase['offered_rate_per_s']:,.0f}/s"
    workload, _, form = name.partition("_")
    label = f"hot {args['hot_share']:.0%}" if workload == "hot" else workload
    return f"{label} TransferBatch" if form else label


def print_table(results: dict[str, Any], console: Console) -> None:
    args = results["args"]
    table = Table(title=f"txproc benchmark, {results['machine']['date_utc']} "
                        f"({results['machine']['cpu_count']} cores)",
                  caption=f"uniform/hot: {args['transfers']:,} transfers (at most), RPC "
                          f"batches of {args['batch']:,}, {args['concurrency']} in flight, "
                          f"{args['shards']} shards; http: single transfers, open loop, "
                          f"{args['http_seconds']:g} s; latency per request")
    for column in ("phase", "done/s", "p50 ms", "p99 ms", "max ms", "server CPU us/tr",
                   "cores busy", "peak RSS MiB", "commit busy"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    phases = results["phases"]
    rows = [(name, phases[name], False) for name in BATCH_PHASES if name in phases]
    rows += [(name, p, True) for name, p in http_phases(phases)]
    for name, p, http in rows:
        lat = p["latency_ms"] if http else p["request_latency_ms"]
        rate = p["achieved_ok_per_s"] if http else p["durable_transfers_per_s"]
        table.add_row(_phase_label(name, args, p), _fmt(rate), _fmt(lat["p50"], ",.1f"),
                      _fmt(lat["p99"], ",.1f"), _fmt(lat["max"], ",.1f"),
                      _fmt(p["server_cpu_us_per_transfer"], ",.0f"),
                      _fmt(p["server_cpu_cores_busy"], ".2f"),
                      _fmt(p["rss_mib_peak"].get("server")),
                      "/".join(f"{s['commit_busy_share']:.0%}" for s in p["shards"]))
    pg = results.get("pgbench")
    if pg is not None:
        table.add_row(f"pgbench -c {args['pgbench_clients']}", _fmt(pg["tps"]),
                      _fmt(pg["latency_ms_mean"], ",.2f") + "*", "-", "-",
                      _fmt(pg["postgres_cpu_us_per_transaction"], ",.0f") + "*", "-", "-",
                      "-")
    tb = results.get("tigerbeetle")
    for name, p in _tigerbeetle_phases(results):
        cpu = p["server_cpu_us_per_transfer"]
        cpu_cell = (_fmt(cpu, ",.1f") if cpu is not None else
                    _fmt(p["client_cpu_us_per_transfer"], ",.1f") + " c")
        lat = p["request_latency_ms"]
        table.add_row(f"TB {_phase_label(name, args, p)}",
                      _fmt(p["durable_transfers_per_s"]), _fmt(lat["p50"], ",.1f"),
                      _fmt(lat["p99"], ",.1f"), _fmt(lat["max"], ",.1f"), cpu_cell,
                      _fmt(p["server_cpu_cores_busy"], ".2f"), _fmt(p["server_rss_mib"]), "-")
    console.print(table)
    if pg is not None:
        console.print(f"  * pgbench: mean latency, and postgres CPU per transaction "
                      f"({pg['command']})")
    if tb is not None:
        console.print(f"  TB: TigerBeetle at {tb['address']} via {tb['client']}; CPU: "
                      f"{tb['cpu_counted']}" + ("  (c: client CPU only)"
                                                if tb["server_pid"] is None else ""))
    rows = results.get("comparison") or peers.comparison_rows(results)
    if rows:
        # The console has no room for the "CPU of" column: the caption says it instead.
        peer_table = Table(title="against peers, same run, same machine",
                           caption="CPU of: txproc shards+front+postgres, pgbench postgres, "
                                   "TigerBeetle its server (c: client only)\n"
                                   + peers.COMPARISON_NOTE)
        peer_table.add_column("system, workload", no_wrap=True)
        for column in peers.COMPARISON_COLUMNS[2:]:
            if column != "CPU of":
                peer_table.add_column(column, justify="right", no_wrap=True)
        for row in rows:
            system, workload, rate, cpu, counted, *ratio_cells = peers.comparison_cells(row)
            cpu += " c" if counted == "client only" else ""
            peer_table.add_row(f"{system} {workload}", rate, cpu, *ratio_cells)
        console.print(peer_table)
    for name, h in http_phases(phases):
        console.print(f"  {name} answers by status: {h['answers_by_status']}, dropped "
                      f"{h['dropped_all_connections_busy']}, generator lag max "
                      f"{h['generator_lag_ms_max']} ms, generator CPU "
                      f"{h['generator_cpu_cores_busy']} cores ({h['client']})")
    if results.get("audit"):
        a = results["audit"]
        console.print(f"  audit: {'passed' if a['passed'] else 'FAILED'} "
                      f"({a['accounts']:,} accounts, {a['transfers']:,} transfers, "
                      f"{a['seconds']} s)")
    for problem in results["problems"]:
        console.print(f"  [yellow]problem[/]: {problem}")


def markdown_rows(results: dict[str, Any]) -> str:
    """A Markdown table for the README: one row per phase, the run's date in each."""
    args = results["args"]
    date = results["machine"]["date_utc"][:10]
    cores = results["machine"]["cpu_count"]
    lines = [
        "| date | workload | durable transfers/s | p50 ms | p99 ms | server CPU us/transfer "
        "| peak server RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    phases = results["phases"]
    for name in BATCH_PHASES:
        p = phases.get(name)
        if p is None:
            continue
        workload, _, form = name.partition("_")
        kind = "uniform" if workload == "uniform" else f"hot account ({args['hot_share']:.0%})"
        kind += ", TransferBatch" if form else ", list[Transfer]"
        what = (f"{kind}, {p['transfers_submitted']:,} transfers, RPC batches of "
                f"{args['batch']:,} x "
                f"{args['concurrency']} in flight, {args['shards']} shards, {cores} cores")
        lat = p["request_latency_ms"]
        lines.append(f"| {date} | {what} | {_fmt(p['durable_transfers_per_s'])} | "
                     f"{_fmt(lat['p50'], ',.0f')} | {_fmt(lat['p99'], ',.0f')} | "
                     f"{_fmt(p['server_cpu_us_per_transfer'], ',.0f')} | "
                     f"{_fmt(p['rss_mib_peak'].get('server'))} |")
    for _, p in http_phases(phases):
        lat = p["latency_ms"]
        lines.append(f"| {date} | HTTP single transfers, {p['offered_rate_per_s']:,.0f}/s "
                     f"offered for {p['duration_s']:g} s after "
                     f"{p.get('warmup_s', 0):g} s of warm-up (open loop) | "
                     f"{_fmt(p['achieved_ok_per_s'])} | {_fmt(lat['p50'], ',.1f')} | "
                     f"{_fmt(lat['p99'], ',.1f')} | "
                     f"{_fmt(p['server_cpu_us_per_transfer'], ',.0f')} | "
                     f"{_fmt(p['rss_mib_peak'].get('server'))} |")
    pg = results.get("pgbench")
    if pg is not None:
        lines.append(f"| {date} | reference: {pg['command']}, same server | "
                     f"{_fmt(pg['tps'])} tps | {_fmt(pg['latency_ms_mean'], ',.2f')} (mean) | - "
                     f"| {_fmt(pg['postgres_cpu_us_per_transaction'], ',.0f')} (postgres) | - |")
    tb = results.get("tigerbeetle")
    for name, p in _tigerbeetle_phases(results):
        kind = "uniform" if name == "uniform" else f"hot account ({args['hot_share']:.0%})"
        cpu = p["server_cpu_us_per_transfer"]
        cpu_cell = (f"{_fmt(cpu, ',.1f')} (TigerBeetle server)" if cpu is not None else
                    f"{_fmt(p['client_cpu_us_per_transfer'], ',.1f')} (client only)")
        lat = p["request_latency_ms"]
        lines.append(f"| {date} | peer: TigerBeetle at {tb['address']} via {tb['client']}, "
                     f"{kind}, {p['transfers_submitted']:,} transfers, batches of "
                     f"{tb['batch']:,} x {tb['concurrency']} in flight, {cores} cores | "
                     f"{_fmt(p['durable_transfers_per_s'])} | {_fmt(lat['p50'], ',.0f')} | "
                     f"{_fmt(lat['p99'], ',.0f')} | {cpu_cell} | "
                     f"{_fmt(p['server_rss_mib'])} |")
    comparison = peers.comparison_markdown(results)
    if comparison:
        lines += ["", comparison]
    return "\n".join(lines)


def _tigerbeetle_phases(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    phases = (results.get("tigerbeetle") or {}).get("phases", {})
    return [(name, phases[name]) for name in ("uniform", "hot") if name in phases]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tigerbeetle:
        try:  # before the processor's minutes, not after
            peers.import_tigerbeetle()
        except peers.TigerBeetleMissing as exc:
            print(f"python -m bench: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Piped output has no width; rich would then fold the table into 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    started = time.perf_counter()
    results = asyncio.run(run(args, console))
    results["total_s"] = round(time.perf_counter() - started, 1)
    print_table(results, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(msgspec.json.format(msgspec.json.encode(results), indent=2) + b"\n")
    console.print(f"\nresults written to {args.out}\n")
    console.print("Markdown for the README:\n")
    print(markdown_rows(results))
    return 1 if results["problems"] and not results.get("audit", {}).get("passed", True) else 0


if __name__ == "__main__":
    sys.exit(main())
