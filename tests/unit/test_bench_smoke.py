"""The benchmark and load-test harnesses import without Ray and generate valid workloads.

Nothing here is timed: figures come from ``python -m bench`` and ``loadtests/run.py``.
Locust monkey-patches the standard library with gevent when imported, so the locustfile is
exercised in a subprocess, never in the test process.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from actors.edge.http_api import TRANSFER_DECODER
from bench import ledger
from bench.__main__ import QUICK, http_phase_name, markdown_rows, parse_args
from loadtests.run import parse_run_time_s, read_stats_csv
from processor.types import AMOUNT_MAX

ACCOUNTS = ledger.make_accounts(5_000, 500)
ACCOUNT_IDS = [a.id for a in ACCOUNTS]


def _check_transfers(transfers: list, first_id: int, count: int) -> None:
    assert [t.id for t in transfers] == list(range(first_id, first_id + count))
    known = set(ACCOUNT_IDS)
    for t in transfers:
        assert t.debit_account_id != t.credit_account_id
        assert t.debit_account_id in known and t.credit_account_id in known
        assert 1 <= t.amount <= ledger.AMOUNT_MAX_BENCH <= AMOUNT_MAX
        assert (t.currency, t.flags, t.pending_id, t.timeout_s) == (ledger.CURRENCY, 0, 0, 0)


def test_uniform_transfers_are_valid_and_spread() -> None:
    """Uniform transfers have consecutive unique ids, two distinct known accounts each, and
    reach most accounts."""
    transfers = ledger.uniform_transfers(ACCOUNT_IDS, 20_000, first_id=77, rng=random.Random(3))
    _check_transfers(transfers, 77, 20_000)
    touched = {t.debit_account_id for t in transfers} | {t.credit_account_id for t in transfers}
    assert len(touched) > 0.95 * len(ACCOUNT_IDS)


def test_uniform_transfers_are_deterministic_for_a_seed() -> None:
    """The same seed gives the same workload, so runs are comparable."""
    a = ledger.uniform_transfers(ACCOUNT_IDS, 100, first_id=1, rng=random.Random(9))
    b = ledger.uniform_transfers(ACCOUNT_IDS, 100, first_id=1, rng=random.Random(9))
    assert a == b


@pytest.mark.parametrize("hot_share", [0.0, 0.5, 0.9])
def test_hot_transfers_touch_the_hot_account_at_the_asked_share(hot_share: float) -> None:
    """About ``hot_share`` of hot-workload transfers touch account_ids[0], on both sides
    about equally, and never on both sides of one transfer."""
    n = 20_000
    transfers = ledger.hot_transfers(ACCOUNT_IDS, n, first_id=10, rng=random.Random(5),
                                     hot_share=hot_share)
    _check_transfers(transfers, 10, n)
    hot = ACCOUNT_IDS[0]
    debits = sum(t.debit_account_id == hot for t in transfers)
    credits = sum(t.credit_account_id == hot for t in transfers)
    assert abs((debits + credits) / n - hot_share) < 0.02
    assert abs(debits - credits) / n < 0.03


def test_http_bodies_are_what_the_api_decodes() -> None:
    """The benchmark's HTTP bodies decode with the API's own strict decoder, unchanged."""
    for t in ledger.uniform_transfers(ACCOUNT_IDS, 50, first_id=2**62, rng=random.Random(1)):
        item = TRANSFER_DECODER.decode(ledger.transfer_body_json(t))
        assert (item.id, item.debit_account_id, item.credit_account_id, item.amount,
                item.currency, item.flags) == (t.id, t.debit_account_id, t.credit_account_id,
                                               t.amount, t.currency, ())


def test_percentile_is_nearest_rank() -> None:
    """p50/p99 of 1..100 are 50 and 99; an empty list gives 0."""
    values = [float(v) for v in range(1, 101)]
    assert ledger.percentile(values, 50) == 50.0
    assert ledger.percentile(values, 99) == 99.0
    assert ledger.percentile(values, 100) == 100.0
    assert ledger.percentile([], 50) == 0.0
    assert ledger.latency_summary_ms([3.0, 1.0, 2.0])["max"] == 3.0


def test_cpu_delta_counts_new_processes_and_sums_the_server() -> None:
    """A process that appears between readings counts whole; server = shards+front+postgres."""
    before = {("shards", 1): 1.0, ("front", 2): 2.0, ("postgres", 3): 3.0}
    after = {("shards", 1): 1.5, ("front", 2): 2.25, ("postgres", 3): 3.0,
             ("postgres", 4): 0.5, ("ray_other", 5): 7.0}
    delta = ledger.cpu_delta_s(before, after)
    assert delta["server"] == pytest.approx(1.25)
    assert delta["ray_other"] == pytest.approx(7.0)


def test_libpq_target_reads_socket_and_tcp_urls() -> None:
    """pgbench's -h/-p/-U come from the unix-socket DSN of the embedded server or a TCP URL."""
    socket = ledger.libpq_target("postgresql://postgres@/postgres?host=/tmp/pg%20x&port=5432")
    assert (socket["host"], socket["port"], socket["user"]) == ("/tmp/pg x", "5432", "postgres")
    tcp = ledger.libpq_target("postgresql://u:p@127.0.0.1:6543/db")
    assert (tcp["host"], tcp["port"], tcp["user"], tcp["password"], tcp["dbname"]) == (
        "127.0.0.1", "6543", "u", "p", "db")


def test_quick_shrinks_the_run_and_the_report_renders() -> None:
    """--quick caps transfers and durations; the Markdown block renders from results."""
    args = parse_args(["--quick"])
    assert args.transfers == QUICK["transfers"] and args.pgbench_seconds == QUICK[
        "pgbench_seconds"]
    assert args.out.name.endswith("-quick.json")
    results = {
        "args": {"hot_share": 0.5, "batch": 8189, "concurrency": 4, "shards": 2},
        "machine": {"date_utc": "2026-11-25T00:00:00+00:00", "cpu_count": 2},
        "phases": {"uniform": {"transfers_submitted": 10, "durable_transfers_per_s": 5.0,
                               "request_latency_ms": {"p50": 1.0, "p99": 2.0},
                               "server_cpu_us_per_transfer": 3.0,
                               "rss_mib_peak": {"server": 4.0}}},
        "ratios": {},
    }
    results["phases"]["uniform_batch"] = results["phases"]["uniform"]
    rows = markdown_rows(results)
    assert "| 2026-11-25 | uniform, list[Transfer], 10 transfers" in rows
    assert "| 2026-11-25 | uniform, TransferBatch, 10 transfers" in rows


def test_http_rates_are_one_phase_each() -> None:
    """--http-rate takes a comma-separated list (default 1,000 and 2,000/s), refuses a
    non-positive rate, and every HTTP phase gets its own row in the Markdown block."""
    assert parse_args([]).http_rate == [1000.0, 2000.0]
    assert parse_args(["--http-rate", "500"]).http_rate == [500.0]
    assert parse_args(["--http-rate", "1000, 2500.5"]).http_rate == [1000.0, 2500.5]
    for bad in ("0", "fast", "1000,-1", ""):
        with pytest.raises(SystemExit):
            parse_args(["--http-rate", bad])
    assert [http_phase_name(r) for r in (1000.0, 2000.0, 2500.5)] == [
        "http_1000", "http_2000", "http_2500.5"]
    lat = {"p50": 1.0, "p99": 2.0}

    def phase(rate: float) -> dict:
        return {"offered_rate_per_s": rate, "duration_s": 10.0, "achieved_ok_per_s": rate,
                "latency_ms": lat, "server_cpu_us_per_transfer": 300.0,
                "rss_mib_peak": {"server": 4.0}}

    results = {"args": {"hot_share": 0.5, "batch": 8189, "concurrency": 4, "shards": 2},
               "machine": {"date_utc": "2026-12-05T00:00:00+00:00", "cpu_count": 2},
               "phases": {"http_1000": phase(1000.0), "http_2000": phase(2000.0)},
               "ratios": {}}
    rows = markdown_rows(results)
    assert "HTTP single transfers, 1,000/s offered for 10 s" in rows
    assert "HTTP single transfers, 2,000/s offered for 10 s" in rows


def test_run_time_and_stats_csv_parse(tmp_path: Path) -> None:
    """Locust run times and its stats CSV are read as run.py needs them."""
    assert [parse_run_time_s(t) for t in ("20s", "90", "2m", "1h1m5s")] == [20, 90, 120, 3665]
    with pytest.raises(ValueError):
        parse_run_time_s("soon")
    path = tmp_path / "x_stats.csv"
    path.write_text(
        '"Type","Name","Request Count","Failure Count","Median Response Time",'
        '"Average Response Time","Min Response Time","Max Response Time",'
        '"Average Content Size","Requests/s","Failures/s","50%","66%","75%","80%","90%",'
        '"95%","98%","99%","99.9%","99.99%","100%"\n'
        '"POST","authorize","10","1","12","13.5","5","40","300","2.5","0.1","12","14","15",'
        '"16","20","30","35","40","40","40","40"\n'
        ',"Aggregated","10","1","12","13.5","5","40","300","2.5","0.1","12","14","15","16",'
        '"20","30","35","40","40","40","40"\n')
    stats = read_stats_csv(path)
    assert stats["authorize"]["p95_ms"] == 30.0 and stats["Aggregated"]["requests"] == 10


def test_locustfile_flow_places_holds_then_settles_them() -> None:
    """In a subprocess (Locust patches with gevent): the authorization flow's ids are unique,
    every settlement names an acknowledged hold with its accounts and at most its amount,
    captures are about the asked share, and the setup batches create and fund every account."""
    script = textwrap.dedent("""
        import itertools, json, random
        from loadtests.locustfile import AuthorizationFlow, Settings, setup_requests
        s = Settings.from_env({"TXPROC_TOKEN": "t", "TXPROC_ACCOUNT_FIRST": "100",
                               "TXPROC_ACCOUNTS": "50", "TXPROC_CAPTURE_SHARE": "0.75"})
        flow = AuthorizationFlow(s, random.Random(2), itertools.count(1))
        sent = []
        for _ in range(4000):
            r = flow.next_request()
            sent.append({"name": r.name, "body": json.loads(r.body)})
            flow.answered(r, True)
        setup = [(p, len(b.get("accounts", b.get("transfers", []))))
                 for p, b in setup_requests(s)]
        print(json.dumps({"sent": sent, "setup": setup, "open": flow.holds_open}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    sent = out["sent"]
    ids = [r["body"]["id"] for r in sent]
    assert len(ids) == len(set(ids))
    holds = {}
    settled = set()
    kinds = {"authorize": 0, "capture": 0, "void": 0}
    for r in sent:
        body = r["body"]
        kinds[r["name"]] += 1
        assert body["debit_account_id"] != body["credit_account_id"]
        assert 100 <= body["debit_account_id"] < 150 and 100 <= body["credit_account_id"] < 150
        if r["name"] == "authorize":
            assert body["flags"] == ["pending"] and body["timeout_s"] > 0
            holds[body["id"]] = body
            continue
        hold = holds[body["pending_id"]]
        assert body["pending_id"] not in settled
        settled.add(body["pending_id"])
        assert (body["debit_account_id"], body["credit_account_id"]) == (
            hold["debit_account_id"], hold["credit_account_id"])
        assert 1 <= body["amount"] <= hold["amount"]
        if r["name"] == "void":
            assert body["flags"] == ["void_pending"] and body["amount"] == hold["amount"]
        else:
            assert body["flags"] == ["post_pending"]
    assert len(holds) == len(settled) + out["open"]
    assert abs(kinds["capture"] / (kinds["capture"] + kinds["void"]) - 0.75) < 0.05
    assert out["setup"] == [["/v1/accounts/batch", 51], ["/v1/transfers/batch", 50]]


async def test_framework_comparison_serves_the_same_endpoint() -> None:
    """The Starlette app of the framework benchmark decodes a transfer and answers 201,
    and refuses a malformed one, so the measurement exercises the real decode path."""
    import httpx
    import msgspec

    from bench.http_frameworks import BODY, starlette_app

    transport = httpx.ASGITransport(app=starlette_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.post("/v1/transfers", content=BODY)).status_code == 201
        # The benchmark app has no error handling of its own: a bad body reaches msgspec.
        with pytest.raises(msgspec.ValidationError):
            await c.post("/v1/transfers", content=b'{"id": 1.5}')


def test_memory_bench_reports_growth_per_million() -> None:
    """bench.memory turns two RSS readings into MiB per million items, and refuses a run
    that would measure nothing."""
    from bench.memory import parse_args as memory_args
    from bench.memory import per_million_mib

    assert per_million_mib(100 * 2**20, 150 * 2**20, 200_000) == 250.0
    assert per_million_mib(0, 2**20, 0) is None
    args = memory_args(["--accounts", "10", "--holds", "0"])
    assert args.out.name.startswith("memory-")
    with pytest.raises(SystemExit):
        memory_args(["--accounts", "1"])


def test_recovery_bench_arguments() -> None:
    """bench.recovery defaults to the issue's million transfers and refuses an empty run."""
    from bench.recovery import parse_args as recovery_args

    args = recovery_args([])
    assert args.transfers == 1_000_000 and args.out.name.startswith("recovery-")
    with pytest.raises(SystemExit):
        recovery_args(["--transfers", "0"])


async def test_warm_up_sends_count_everywhere_but_in_the_latencies() -> None:
    """The open-loop driver's warm-up sends at the phase's rate and counts their answers,
    but only the sends after it make the latency figures (here: a server slow at first)."""
    import asyncio
    import time

    from bench.ledger import drive_http_open_loop

    started = time.monotonic()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if time.monotonic() - started < 0.4:
                    await asyncio.sleep(0.08)
                writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        out = await drive_http_open_loop(
            f"http://127.0.0.1:{port}", "t", [b"{}"] * 200, rate_per_s=100.0,
            duration_s=0.6, warmup_s=0.6, connections_max=32, client="raw")
    finally:
        server.close()
    assert out["answers_by_status"] == {"201": 120} and out["transfers_ok"] == 120
    assert out["latency_ms"]["count"] == 60
    assert out["latency_ms"]["max"] < 60.0  # the slow start is all in the warm-up
    assert len(out["latency_p99_ms_by_second"]) == 1
