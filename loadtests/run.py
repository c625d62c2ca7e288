"""One command for a bounded, headless load test of txproc, with a summary and pictures.

    .venv/bin/python loadtests/run.py --scenario partners --duration-s 20 --rate 50 --users 10

Without ``--target`` it starts a processor on embedded defaults (a fresh temporary data
directory with embedded PostgreSQL and the simulated payment providers, listening on
127.0.0.1 only; removed afterwards). With ``--target URL`` it drives that processor
instead (``--rpc-target HOST:PORT`` for the gateways scenario) and starts nothing: load
goes to loopback, or to an address given explicitly.

It creates and funds the accounts, then runs Locust headless on loadtests/locustfile.py as a
subprocess: the scenario's user class, ``--users`` users offering ``--rate`` requests/s in
all (Locust's ``constant_throughput`` per user; 0: each user sends as soon as answered), for
``--duration-s`` seconds or until ``--max-requests`` requests were sent, whichever comes
first; Locust is killed if it overruns by ``--grace-s``. The server's CPU seconds are read
with psutil before and after (Ray workers, raylet, GCS and Ray's other processes, the
simulated providers, PostgreSQL and its backends).

It writes to ``--out`` (default var/loadtests/<scenario>-<UTC timestamp>): summary.json,
summary.md, latency_over_time.png, latency_cdf.png, the raw per-request records and
Locust's CSV files; see loadtests/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtests import summary as summ
from loadtests.workload import SCENARIOS, Settings, post_setup_batch, scenario_setup_requests

__all__ = ["ServerCpu", "classify_process", "main", "parse_args", "parse_run_time_s",
           "read_stats_csv"]

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SCOPES = ("transfers:write", "transfers:read", "accounts:write", "accounts:read",
          "payments:write", "payments:read")
DURATION_MAX_S = 3600.0
CPU_SAMPLE_INTERVAL_S = 1.0
MAX_REQUESTS_DEFAULT = 100_000
MAX_REQUESTS_LIMIT = 10_000_000
USERS_DEFAULT = {"partners": 10, "gateways": 4, "hot-account": 10, "holds": 10}
RATE_DEFAULT = {"partners": 40.0, "gateways": 20.0, "hot-account": 200.0, "holds": 200.0}
_RUN_TIME = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?")


def parse_run_time_s(text: str) -> int:
    """Seconds of a Locust ``--run-time`` such as ``20s``, ``5m``, ``1h30m`` or ``90``."""
    match = _RUN_TIME.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"not a run time: {text!r}")
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(f"run time must be positive: {text!r}")
    return total


def read_stats_csv(path: Path) -> dict[str, dict[str, float]]:
    """Locust's ``<prefix>_stats.csv`` as {request name: figures}; "Aggregated" included.

    Figures: requests, failures, rps, p50_ms, p95_ms, p99_ms, max_ms (Locust rounds its
    percentiles to two significant digits above 100 ms).
    """
    out: dict[str, dict[str, float]] = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            out[row["Name"]] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "rps": float(row["Requests/s"]),
                "p50_ms": _number(row["50%"]),
                "p95_ms": _number(row["95%"]),
                "p99_ms": _number(row["99%"]),
                "max_ms": _number(row["Max Response Time"]),
            }
    return out


def _number(text: str) -> float:
    return float(text) if text and text != "N/A" else 0.0


# -- arguments --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtests/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="partners",
                   help="partners (HTTP transfers and payments), gateways (batched RPC), "
                        "hot-account (HTTP, half on one account), holds (HTTP ledger holds)")
    p.add_argument("--duration-s", type=float, default=None,
                   help=f"seconds of load, at most {DURATION_MAX_S:g} (default 20)")
    p.add_argument("--run-time", default=None,
                   help="the same in Locust's notation (20s, 5m); kept for old commands")
    p.add_argument("--rate", type=float, default=None,
                   help="offered requests/s in all (HTTP requests, or RPC calls of "
                        "--batch-size transfers); 0 sends as fast as answers come "
                        "(default per scenario: partners 40, gateways 20, others 200)")
    p.add_argument("--users", type=int, default=None,
                   help="simulated users (default: gateways 4, others 10)")
    p.add_argument("--spawn-rate", type=float, default=None,
                   help="users started per second (default: all within a second)")
    p.add_argument("--max-requests", type=int, default=MAX_REQUESTS_DEFAULT,
                   help="stop once this many requests were sent (default %(default)s)")
    p.add_argument("--target", default=None,
                   help="HTTP base URL of a running processor; nothing is started then")
    p.add_argument("--rpc-target", default=None,
                   help="HOST:PORT of its RPC listener (gateways scenario with --target)")
    p.add_argument("--token", default=None,
                   help="bearer token for --target (default: $TXPROC_TOKEN, or issued with "
                        "the key of --data-dir)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="data directory of the --target processor: its key issues the token "
                        "and its pg/postmaster.pid names PostgreSQL for the CPU figures")
    p.add_argument("--server-pid", type=int, action="append", default=[],
                   help="pid of a --target server process (e.g. txproc serve); it and its "
                        "descendants count as server CPU; repeatable")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default var/loadtests/<scenario>-<timestamp>)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="metrics port of the processor this run starts (9464 lets a local "
                        "Prometheus scrape it, see docs/operations.md); 0 picks a free one")
    p.add_argument("--vcpu-hour-price", type=float, default=summ.VCPU_HOUR_PRICE_USD,
                   help="USD per vCPU-hour for the cost per transaction (default "
                        "%(default)s)")
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--account-first", type=int, default=1_000_000)
    p.add_argument("--merchants", type=int, default=10)
    p.add_argument("--currency", default="EUR")
    p.add_argument("--batch-size", type=int, default=50,
                   help="transfers per RPC call (gateways)")
    p.add_argument("--shards", type=int, default=2, help="shards of the processor started here")
    p.add_argument("--grace-s", type=float, default=60.0,
                   help="kill Locust if it runs this much longer than the duration")
    p.add_argument("--csv-dir", type=Path, default=None,
                   help="where Locust's CSV files go (default: the output directory)")
    args = p.parse_args(argv)
    if args.duration_s is None:
        args.duration_s = float(parse_run_time_s(args.run_time)) if args.run_time else 20.0
    problems = [
        (0 < args.duration_s <= DURATION_MAX_S, f"--duration-s must be in (0, {DURATION_MAX_S:g}]"),
        (1 <= args.max_requests <= MAX_REQUESTS_LIMIT,
         f"--max-requests must be in [1, {MAX_REQUESTS_LIMIT:,}]"),
        (args.rate is None or args.rate >= 0, "--rate must not be negative"),
        (args.users is None or args.users >= 1, "--users must be at least 1"),
        (args.vcpu_hour_price >= 0, "--vcpu-hour-price must not be negative"),
        (args.target is not None or args.rpc_target is None,
         "--rpc-target is only for --target (a processor started here is found by itself)"),
        (args.target is not None or not (args.server_pid or args.data_dir or args.token),
         "--server-pid, --data-dir and --token are only for --target"),
        (not (args.target and args.scenario == "gateways" and not args.rpc_target),
         "the gateways scenario against --target needs --rpc-target HOST:PORT"),
    ]
    for ok, what in problems:
        if not ok:
            p.error(what)
    if args.target is not None:
        parts = urlsplit(args.target)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            p.error("--target must be an http(s) URL such as http://127.0.0.1:8080")
    if args.rate is None:
        args.rate = RATE_DEFAULT[args.scenario]
    if args.users is None:
        args.users = USERS_DEFAULT[args.scenario]
    if args.spawn_rate is None:
        args.spawn_rate = float(args.users)
    if args.out is None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = ROOT / "var" / "loadtests" / f"{args.scenario}-{stamp}"
    return args


# -- server CPU -------------------------------------------------------------------------------


def classify_process(cmdline: list[str], name: str, *, postgres: bool = False) -> str:
    """The group a server process's CPU is reported under: ``ray::<Class>`` for a Ray worker
    (its title while a method runs is ``ray::<Class>.<method>``), ``raylet``,
    ``gcs_server``, ``postgres``, ``providers`` (the simulated payment providers) or
    ``ray_other`` (Ray's agents and log monitor, and anything else started with the server).
    """
    first = cmdline[0] if cmdline else ""
    if postgres or name == "postgres" or first.endswith("/postgres"):
        return "postgres"
    if first.startswith("ray::"):
        return first.split(".", 1)[0].split(" ", 1)[0]
    base = os.path.basename(first) if first else name
    if base in ("raylet", "gcs_server") or name in ("raylet", "gcs_server"):
        return base if base in ("raylet", "gcs_server") else name
    if any(arg.startswith("adapters.sim.") for arg in cmdline):
        return "providers"
    return "ray_other"


@dataclass
class ServerCpu:
    """Cumulative CPU seconds of the server's processes, by group (see classify_process).

    The processes are the descendants of ``roots`` (and the roots themselves if
    ``count_roots``), plus ``postmaster`` and its backends, less ``exclude`` and their
    descendants (the load generator). Each process counts its own user + system time and
    that of its children it already reaped, so a backend or worker that exits during the
    run still counts (under its parent's group).
    """

    roots: list[int]
    count_roots: bool
    postmaster: int | None = None
    exclude: set[int] = field(default_factory=set)

    def read(self) -> dict[tuple[str, int], float]:
        import psutil

        seen: dict[int, psutil.Process] = {}
        for pid in self.roots:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                if self.count_roots:
                    seen[root.pid] = root
                for child in root.children(recursive=True):
                    seen[child.pid] = child
        postgres: set[int] = set()
        if self.postmaster is not None:
            with contextlib.suppress(psutil.Error):
                pm = psutil.Process(self.postmaster)
                seen[pm.pid] = pm
                postgres.add(pm.pid)
                for child in pm.children(recursive=True):
                    seen[child.pid] = child
                    postgres.add(child.pid)
        excluded = set(self.exclude)
        for pid in self.exclude:
            with contextlib.suppress(psutil.Error):
                excluded.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        out: dict[tuple[str, int], float] = {}
        for pid, proc in seen.items():
            if pid in excluded:
                continue
            with contextlib.suppress(psutil.Error):
                with proc.oneshot():
                    times = proc.cpu_times()
                    cmdline = proc.cmdline()
                    name = proc.name()
                group = classify_process(cmdline, name, postgres=pid in postgres)
                out[(group, pid)] = (times.user + times.system + times.children_user
                                     + times.children_system)
        return out


def totals_by_group(reading: dict[tuple[str, int], float]) -> dict[str, float]:
    """Cumulative CPU seconds per group of one ``ServerCpu.read``. Differences of these
    totals count a process that exited and was reaped by another member once, under its
    parent's group."""
    out: dict[str, float] = {}
    for (group, _pid), cpu in reading.items():
        out[group] = out.get(group, 0.0) + cpu
    return out


async def sample_cpu(cpu: ServerCpu, samples: list[tuple[float, dict[str, float]]],
                     stop: asyncio.Event, interval_s: float = CPU_SAMPLE_INTERVAL_S) -> None:
    """Append (time, totals_by_group) every ``interval_s`` until ``stop`` is set."""
    while True:
        begun = time.time()
        reading = await asyncio.to_thread(cpu.read)
        samples.append(((begun + time.time()) / 2, totals_by_group(reading)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
            return


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Server:
    http_url: str
    rpc_address: str
    token: str
    cpu: ServerCpu | None
    description: str


def _settings(args: argparse.Namespace, token: str, rpc_address: str) -> Settings:
    settings = Settings(token=token, account_first=args.account_first, accounts=args.accounts,
                        currency=args.currency, merchants=args.merchants,
                        batch_size=args.batch_size, rpc_address=rpc_address,
                        max_requests=args.max_requests)
    settings.check()
    return settings


def _locust_env(args: argparse.Namespace, server: Server, record_dir: Path) -> dict[str, str]:
    user_rps = args.rate / args.users if args.rate > 0 else 0.0
    env = {k: v for k, v in os.environ.items() if not k.startswith("TXPROC_")}
    env.update({
        "TXPROC_TOKEN": server.token,
        "TXPROC_ACCOUNT_FIRST": str(args.account_first),
        "TXPROC_ACCOUNTS": str(args.accounts),
        "TXPROC_MERCHANTS": str(args.merchants),
        "TXPROC_CURRENCY": args.currency,
        "TXPROC_BATCH_SIZE": str(args.batch_size),
        "TXPROC_RPC_ADDRESS": server.rpc_address,
        "TXPROC_USER_RPS": f"{user_rps:.6f}",
        "TXPROC_MAX_REQUESTS": str(args.max_requests),
        "TXPROC_RECORD_DIR": str(record_dir),
        "TXPROC_SKIP_SETUP": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    })
    return env


async def _locust(args: argparse.Namespace, server: Server, csv_prefix: Path,
                  record_dir: Path) -> tuple[int, str]:
    run_time_s = max(1, round(args.duration_s))
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
               "-u", str(args.users), "-r", str(args.spawn_rate), "--run-time", f"{run_time_s}s",
               "--host", server.http_url, "--csv", str(csv_prefix), "--only-summary",
               "--stop-timeout", "5", "--loglevel", "WARNING", SCENARIOS[args.scenario]]
    proc = await asyncio.create_subprocess_exec(
        *command, env=_locust_env(args, server, record_dir), cwd=str(ROOT),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if server.cpu is not None:
        server.cpu.exclude.add(proc.pid)
    try:
        raw, _ = await asyncio.wait_for(proc.communicate(), timeout=run_time_s + args.grace_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"locust overran its {run_time_s} s by {args.grace_s:g} s; "
                           "killed") from None
    output = raw.decode(errors="replace")
    # Locust exits 1 when some requests failed; that is a figure, not a harness failure.
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"locust exited {proc.returncode}:\n{output[-3000:]}")
    return proc.returncode or 0, output


async def _drive(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    """Set the accounts up, run Locust and read the CPU around it."""
    record_dir = args.out / "records"
    shutil.rmtree(record_dir, ignore_errors=True)
    record_dir.mkdir(parents=True)
    csv_dir = args.csv_dir or args.out
    csv_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(args, server.token, server.rpc_address)
    base = server.http_url.rstrip("/")
    for path, body in scenario_setup_requests(settings):
        await asyncio.to_thread(post_setup_batch, base + path, settings.token, body)
    print(f"{server.description}; accounts ready. Locust: {SCENARIOS[args.scenario]}, "
          f"{args.users} users, {args.rate:g} requests/s offered, {args.duration_s:g} s, "
          f"at most {args.max_requests:,} requests", flush=True)
    load_before = os.getloadavg()
    samples: list[tuple[float, dict[str, float]]] = []
    stop = asyncio.Event()
    sampler = (asyncio.create_task(sample_cpu(server.cpu, samples, stop))
               if server.cpu is not None else None)
    own_before = _own_cpu_s()
    started = time.time()
    try:
        exit_code, output = await _locust(args, server, csv_dir / "locust", record_dir)
    finally:
        stop.set()
        if sampler is not None:
            await sampler
    wall_s = time.time() - started
    return {
        "records": sorted(record_dir.glob("requests-*.csv")),
        "cpu_samples": samples if server.cpu is not None else None,
        "runner_cpu_s": round(_own_cpu_s() - own_before, 3),
        "wall_s": wall_s,
        "started": started,
        "locust_exit_code": exit_code,
        "locust_output": output,
        "stopped_by": "max_requests" if (record_dir / "budget-exhausted").exists()
        else "duration",
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


async def _run_embedded(args: argparse.Namespace) -> dict[str, Any]:
    from actors.app.runtime import start_processor
    from processor.config import Config, FrontConfig, ObservabilityConfig, ShardConfig
    from processor.identity import issue_token, signing_key

    scratch = Path(tempfile.mkdtemp(prefix="txproc-loadtest-"))
    config = Config(shard=ShardConfig(database_url="", shards=args.shards),
                    front=FrontConfig(host="127.0.0.1", http_port=0, rpc_port=0),
                    observability=ObservabilityConfig(metrics_port=args.metrics_port),
                    data_dir=str(scratch / "data"))
    begun = time.perf_counter()
    try:
        processor = await start_processor(config)
        ready_s = time.perf_counter() - begun
        try:
            key = signing_key(Path(config.data_dir), now_s=int(time.time()))
            token = issue_token(key, SCOPES, ttl_s=int(args.duration_s + args.grace_s) + 3600,
                                now_s=int(time.time()))
            cpu = ServerCpu(roots=[os.getpid()], count_roots=False,
                            postmaster=processor.embedded.pid if processor.embedded else None)
            server = Server(
                http_url=f"http://127.0.0.1:{processor.http_port}",
                rpc_address=f"127.0.0.1:{processor.rpc_port}", token=token, cpu=cpu,
                description=(f"processor started on embedded defaults: http "
                             f"127.0.0.1:{processor.http_port}, rpc 127.0.0.1:"
                             f"{processor.rpc_port}, {args.shards} shards, providers "
                             f"{sorted(processor.provider_urls)}, ready in {ready_s:.0f} s"))
            result = await _drive(args, server)
            result["target"] = "embedded (127.0.0.1)"
            return result
        finally:
            stopping = time.perf_counter()
            await processor.stop()
            print(f"processor stopped in {time.perf_counter() - stopping:.0f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _target_token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("TXPROC_TOKEN", "")
    if token:
        return str(token)
    if args.data_dir is None:
        raise SystemExit("--target needs a token: --token, $TXPROC_TOKEN or --data-dir")
    from processor.identity import issue_token, signing_key

    key = signing_key(args.data_dir, now_s=int(time.time()))
    return issue_token(key, SCOPES, ttl_s=int(args.duration_s + args.grace_s) + 3600,
                       now_s=int(time.time()))


def _postmaster_of(data_dir: Path | None) -> int | None:
    if data_dir is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((data_dir / "pg" / "postmaster.pid").read_text().splitlines()[0])
    return None


async def _run_target(args: argparse.Namespace) -> dict[str, Any]:
    postmaster = _postmaster_of(args.data_dir)
    cpu = (ServerCpu(roots=list(args.server_pid), count_roots=True, postmaster=postmaster)
           if args.server_pid or postmaster else None)
    server = Server(http_url=args.target, rpc_address=args.rpc_target or "",
                    token=_target_token(args), cpu=cpu,
                    description=f"target {args.target}")
    result = await _drive(args, server)
    result["target"] = args.target
    return result


# -- report -----------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    uptime = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5,
                                check=False).stdout.strip()
    return {"cpus": os.cpu_count(), "uptime": uptime}


def write_outputs(args: argparse.Namespace, result: dict[str, Any],
                  command: str) -> dict[str, Any]:
    """summary.json, summary.md and the PNGs in ``args.out``; returns the summary."""
    records = summ.read_records(result["records"])
    machine = _machine()
    lb, la = result["load_before"], result["load_after"]
    notes: list[str] = []
    samples = result["cpu_samples"]
    if samples is None:
        notes.append("server CPU not measured: give --server-pid (and --data-dir) with "
                     "--target")
    elif args.target and not args.server_pid:
        notes.append("server CPU covers PostgreSQL only (from --data-dir): give "
                     "--server-pid of the txproc serve process for Ray and the providers")
    elif args.target and args.data_dir is None:
        notes.append("server CPU covers the --server-pid trees only: an external PostgreSQL "
                     "(not a descendant) is not counted; give --data-dir for the embedded one")
    notes.append(f"the load generator (Locust) ran on the same machine; runner CPU "
                 f"{result['runner_cpu_s']:.2f} s not counted")
    run_info = {
        "command": command,
        "started_utc": dt.datetime.fromtimestamp(result["started"], dt.UTC).strftime(
            "%Y-%m-%d %H:%M:%S"),
        "target": result["target"],
        "duration_s": args.duration_s,
        "offered_rate": args.rate,
        "users": args.users,
        "max_requests": args.max_requests,
        "batch_size": args.batch_size if args.scenario == "gateways" else None,
        "stopped_by": result["stopped_by"],
        "wall_s": round(result["wall_s"], 2),
        "locust_exit_code": result["locust_exit_code"],
        "server_cpu_s_whole_locust_run": round(sum(samples[-1][1].values())
                                               - sum(samples[0][1].values()), 3)
        if samples else None,
        "machine": {**machine, "loadavg_before": lb, "loadavg_after": la},
        "machine_text": (f"{machine['cpus']} CPUs; load average 1/5/15 min before "
                         f"{lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}, after "
                         f"{la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}"),
        "notes": notes,
    }
    summary = summ.summarize(records, scenario=args.scenario, cpu_samples=samples,
                             vcpu_hour_price_usd=args.vcpu_hour_price, run=run_info)
    if not records:
        notes.append("no requests were recorded; see locust_output.txt")
    pictures: list[str] = []
    try:
        pictures = summ.render_pngs(summary, records, args.out)
    except ImportError:
        notes.append("no PNGs: matplotlib is not installed (pip install matplotlib)")
    summary["pictures"] = pictures
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(summ.render_markdown(summary, pictures))
    (args.out / "locust_output.txt").write_text(result["locust_output"])
    return summary


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    lat = summary.get("headline_latency_ms") or {}
    cost = summary.get("cost") or {}
    print(f"\n{summary['scenario']}: {summary['requests']:,} requests in "
          f"{summary['window_s']:.1f} s ({summary['requests_per_s']:,.1f}/s), stopped by "
          f"{summary['stopped_by']}")
    print(f"{summary['headline_operation']} latency ms: p50 {lat.get('p50', 0):,.1f}, "
          f"p95 {lat.get('p95', 0):,.1f}, p99 {lat.get('p99', 0):,.1f}")
    print(f"transfers/s {summary['transfers_per_s']:,.1f}, authorizations/s "
          f"{summary['authorizations_per_s']:,.1f}, error rate "
          f"{100 * summary['errors']['error_rate']:.2f} %")
    for code, v in summary["errors"]["by_code"].items():
        print(f"  {code}: {v['count']:,} ({100 * v['rate']:.2f} %)")
    if cost.get("measured") and "cpu_ms_per_transaction" in cost:
        print(f"server CPU {cost['cpu_s_total']:,.1f} s: {cost['cpu_ms_per_transaction']:,.3f} "
              f"ms per transaction, {cost['usd_per_million_transactions']:,.4f} USD per "
              f"million at {cost['vcpu_hour_price_usd']:g} USD/vCPU-hour")
    print(f"written: {out}/summary.md, summary.json"
          + "".join(f", {p}" for p in summary.get("pictures", [])))


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else argv
    args = parse_args(raw_argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join([".venv/bin/python", "loadtests/run.py", *raw_argv])
    runner = _run_target if args.target else _run_embedded
    result = asyncio.run(runner(args))
    summary = write_outputs(args, result, command)
    _print_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
