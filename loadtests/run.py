"""Run the Locust harness against a processor started here, report, and stop everything.

    .venv/bin/python loadtests/run.py [--users 50] [--spawn-rate 50] [--run-time 20s]

Starts a processor on embedded defaults (a fresh temporary data directory, removed
afterwards), issues a token, runs ``locust --headless`` on loadtests/locustfile.py as a
subprocess with ``--csv``, then prints the authorization latency (p50/p95/p99), the request
rate and the server's CPU seconds per request (shard and front Ray workers plus postgres,
measured with psutil around the Locust run). Locust is killed if it overruns its run time
by more than ``--grace-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "parse_run_time_s", "read_stats_csv"]

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SCOPES = ("transfers:write", "accounts:write", "accounts:read")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtests/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--spawn-rate", type=float, default=50)
    p.add_argument("--run-time", default="20s")
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--account-first", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--grace-s", type=float, default=120.0,
                   help="kill Locust if it runs this much longer than --run-time")
    p.add_argument("--csv-dir", type=Path, default=None,
                   help="keep Locust's CSV files here (default: a temporary directory)")
    args = p.parse_args(argv)
    args.run_time_s = parse_run_time_s(args.run_time)
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from actors.runtime import start_processor
    from bench.ledger import ServerProcesses, cpu_delta_s, listening_pid, shard_stats
    from processor.auth import KEY_FILE_NAME, issue_token, load_or_create_key
    from processor.config import Config, FrontConfig, ShardConfig

    scratch = Path(tempfile.mkdtemp(prefix="txproc-locust-"))
    csv_dir = args.csv_dir or scratch / "csv"
    csv_dir.mkdir(parents=True, exist_ok=True)
    config = Config(shard=ShardConfig(database_url="", shards=args.shards),
                    front=FrontConfig(host="127.0.0.1", http_port=0, rpc_port=0),
                    data_dir=str(scratch / "data"))
    try:
        processor = await start_processor(config)
        try:
            key = load_or_create_key(Path(config.data_dir) / KEY_FILE_NAME)
            token = issue_token(key, SCOPES, ttl_s=args.run_time_s + 3600,
                                now_s=int(time.time()))
            stats = await shard_stats(processor.shards)
            processes = ServerProcesses(
                shard_pids=[int(s["pid"]) for s in stats],
                front_pid=listening_pid(processor.http_port),
                postmaster_pid=processor.embedded.pid if processor.embedded else None,
            )
            host = f"http://127.0.0.1:{processor.http_port}"
            print(f"processor ready: {host}, {args.shards} shards; running locust "
                  f"-u {args.users} -r {args.spawn_rate} --run-time {args.run_time}",
                  flush=True)
            before = processes.cpu_by_pid()
            started = time.perf_counter()
            output = await _locust(args, host, token, csv_dir / "txproc", processes)
            wall_s = time.perf_counter() - started
            cpu = cpu_delta_s(before, processes.cpu_by_pid())
        finally:
            await processor.stop()
        figures = read_stats_csv(csv_dir / "txproc_stats.csv")
        failures_csv = csv_dir / "txproc_failures.csv"
        failures = failures_csv.read_text() if failures_csv.exists() else ""
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"stats": figures, "cpu_s": cpu, "wall_s": wall_s, "locust_output": output,
            "failures_csv": failures}


async def _locust(
    args: argparse.Namespace, host: str, token: str, prefix: Path, processes: Any
) -> str:
    env = {**os.environ, "TXPROC_TOKEN": token, "TXPROC_ACCOUNTS": str(args.accounts),
           "TXPROC_ACCOUNT_FIRST": str(args.account_first)}
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
               "-u", str(args.users), "-r", str(args.spawn_rate), "--run-time", args.run_time,
               "--host", host, "--csv", str(prefix), "--only-summary", "--stop-timeout", "5",
               "--loglevel", "WARNING"]
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    processes.exclude.add(proc.pid)
    try:
        raw, _ = await asyncio.wait_for(proc.communicate(),
                                        timeout=args.run_time_s + args.grace_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"locust overran --run-time by {args.grace_s} s; killed") from None
    output = raw.decode(errors="replace")
    # Locust exits 1 when some requests failed; that is a figure, not a harness failure.
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"locust exited {proc.returncode}:\n{output[-3000:]}")
    return output


def report(result: dict[str, Any]) -> None:
    stats = result["stats"]
    print(f"\n{'request':<12}{'requests':>10}{'failures':>10}{'req/s':>10}{'p50 ms':>9}"
          f"{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for name, f in stats.items():
        print(f"{name:<12}{f['requests']:>10,}{f['failures']:>10,}{f['rps']:>10,.1f}"
              f"{f['p50_ms']:>9,.0f}{f['p95_ms']:>9,.0f}{f['p99_ms']:>9,.0f}"
              f"{f['max_ms']:>9,.0f}")
    total = stats.get("Aggregated", {})
    authorize = stats.get("authorize", {})
    cpu = result["cpu_s"]
    requests = total.get("requests", 0)
    print(f"\nauthorization latency: p50 {authorize.get('p50_ms', 0):,.0f} ms, "
          f"p95 {authorize.get('p95_ms', 0):,.0f} ms, p99 {authorize.get('p99_ms', 0):,.0f} ms")
    print(f"requests/s (all kinds): {total.get('rps', 0):,.1f}")
    print(f"server CPU-seconds over the run: {cpu.get('server', 0):.2f} (shards "
          f"{cpu.get('shards', 0):.2f}, front {cpu.get('front', 0):.2f}, postgres "
          f"{cpu.get('postgres', 0):.2f}); Ray's own processes {cpu.get('ray_other', 0):.2f}")
    if requests:
        print(f"server CPU per request: {cpu.get('server', 0) * 1e6 / requests:,.0f} us "
              f"({requests:,} requests, account setup included)")
    if result["failures_csv"].count("\n") > 1:
        print("\nfailures (Locust's failures.csv):\n" + result["failures_csv"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
