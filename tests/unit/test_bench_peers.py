"""The benchmark's peers (bench/peers.py): the TigerBeetle adapter and the ratios.

No processor, no Ray and no TigerBeetle server here. The adapter is driven through a fake
``tigerbeetle`` module whose client records what it is sent: these tests check the mapping
of our workload onto TigerBeetle's objects and the accounting of its answers, not
TigerBeetle. Where the real client package is installed, the objects are also converted to
its C structs, which checks field names and ranges without a server.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import io
import os
import random
import re
import socket
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from bench import __main__ as bench_main
from bench import ledger, peers
from bench.__main__ import markdown_rows, parse_args, print_table
from processor.types import Transfer

# -- a fake tigerbeetle module ------------------------------------------------------------


class FakeAccountFlags(enum.IntFlag):
    NONE = 0


class FakeTransferFlags(enum.IntFlag):
    NONE = 0


class FakeStatus(enum.IntEnum):
    CREATED = 0xFFFFFFFF
    EXISTS = 46
    EXCEEDS_CREDITS = 54


@dataclasses.dataclass
class FakeAccount:
    id: int = 0
    ledger: int = 0
    code: int = 0
    flags: int = 0


@dataclasses.dataclass
class FakeTransfer:
    id: int = 0
    debit_account_id: int = 0
    credit_account_id: int = 0
    amount: int = 0
    ledger: int = 0
    code: int = 0
    flags: int = 0


@dataclasses.dataclass
class FakeResult:
    timestamp: int
    status: FakeStatus


class FakeClient:
    """Records every call; answers created, or what ``answers`` says for an id."""

    def __init__(self, cluster_id: int, replica_addresses: str, *,
                 answers: dict[int, FakeStatus], fail_at_call: int | None) -> None:
        self.cluster_id = cluster_id
        self.replica_addresses = replica_addresses
        self.answers = answers
        self.fail_at_call = fail_at_call
        self.accounts: list[list[FakeAccount]] = []
        self.transfers: list[list[FakeTransfer]] = []
        self.closed = False

    def _answer(self, batch: list[Any]) -> list[FakeResult]:
        calls = len(self.accounts) + len(self.transfers)
        if self.fail_at_call is not None and calls == self.fail_at_call:
            raise RuntimeError("evicted")
        return [FakeResult(1, self.answers.get(x.id, FakeStatus.CREATED)) for x in batch]

    async def create_accounts(self, batch: list[FakeAccount]) -> list[FakeResult]:
        answer = self._answer(batch)
        self.accounts.append(batch)
        return answer

    async def create_transfers(self, batch: list[FakeTransfer]) -> list[FakeResult]:
        answer = self._answer(batch)
        self.transfers.append(batch)
        return answer

    async def close(self) -> None:
        self.closed = True


def fake_tigerbeetle(answers: dict[int, FakeStatus] | None = None,
                     fail_at_call: int | None = None) -> SimpleNamespace:
    module = SimpleNamespace(Account=FakeAccount, Transfer=FakeTransfer,
                             AccountFlags=FakeAccountFlags, TransferFlags=FakeTransferFlags,
                             clients=[])

    def client_async(*, cluster_id: int, replica_addresses: str) -> FakeClient:
        client = FakeClient(cluster_id, replica_addresses, answers=answers or {},
                            fail_at_call=fail_at_call)
        module.clients.append(client)
        return client

    module.ClientAsync = client_async
    return module


# -- the address --------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [
    ("127.0.0.1:3000", "127.0.0.1:3000"),
    ("localhost:3001", "127.0.0.1:3001"),
    ("3002", "127.0.0.1:3002"),
    ("10.1.2.3:65535", "10.1.2.3:65535"),
    ("[::1]:3000", "[::1]:3000"),
])
def test_host_port_is_parsed_and_normalised(given: str, expected: str) -> None:
    """HOST:PORT, [IPv6]:PORT and a bare port are read; localhost becomes 127.0.0.1."""
    assert peers.parse_host_port(given) == expected
    assert peers.split_host_port(expected)[1] == int(expected.rsplit(":", 1)[1])


@pytest.mark.parametrize("given", ["tb", ":3000", "h:0", "h:65536", "h:x", "::1:3000",
                                   "[::1]3000", "[::1]", ""])
def test_bad_host_port_is_refused(given: str) -> None:
    """Anything but HOST:PORT with a port in 1..65535 is an argument error."""
    with pytest.raises(argparse.ArgumentTypeError):
        peers.parse_host_port(given)


def test_tigerbeetle_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    """--tigerbeetle is optional, normalised, and a bad one stops at parsing."""
    args = parse_args(["--quick"])
    assert args.tigerbeetle is None and args.tigerbeetle_cluster_id == 0
    args = parse_args(["--quick", "--tigerbeetle", "localhost:3000",
                       "--tigerbeetle-cluster-id", "7"])
    assert (args.tigerbeetle, args.tigerbeetle_cluster_id) == ("127.0.0.1:3000", 7)
    for bad in (["--tigerbeetle", "nowhere"], ["--tigerbeetle-cluster-id", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert "tigerbeetle" in capsys.readouterr().err


def test_local_hosts() -> None:
    """Loopback in any spelling, and this machine's own addresses, are local."""
    mine = {"192.168.7.2"}
    for host in ("localhost", "127.0.0.1", "127.0.0.2", "::1", "192.168.7.2"):
        assert peers.is_local_host(host, mine)
    assert not peers.is_local_host("192.168.7.3", mine)


def test_probe_fails_fast_when_nothing_listens() -> None:
    """With no server at the address the run stops at once with a clear message, instead of
    the client waiting for a server forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match="no TigerBeetle server answers"):
        peers._probe("127.0.0.1", port, 2.0)


# -- mapping ------------------------------------------------------------------------------


def _workload(seed: int = 4, count: int = 50) -> tuple[list[Any], list[Transfer]]:
    accounts = ledger.make_accounts(1_000, 20)
    transfers = ledger.hot_transfers([a.id for a in accounts], count, first_id=5_000,
                                     rng=random.Random(seed))
    return accounts, transfers


def test_accounts_and_transfers_map_onto_tigerbeetle_objects() -> None:
    """Same ids, accounts and amounts; our EUR is ledger 978; codes are non-zero; no flags."""
    tb = fake_tigerbeetle()
    accounts, transfers = _workload()
    tb_accounts = peers.to_tb_accounts(tb, accounts)
    assert [a.id for a in tb_accounts] == [a.id for a in accounts]
    assert {(a.ledger, a.code, a.flags) for a in tb_accounts} == {(978, 1, 0)}
    tb_transfers = peers.to_tb_transfers(tb, transfers)
    assert [(t.id, t.debit_account_id, t.credit_account_id, t.amount) for t in tb_transfers] \
        == [(t.id, t.debit_account_id, t.credit_account_id, t.amount) for t in transfers]
    assert {(t.ledger, t.code, t.flags) for t in tb_transfers} == {(978, 1, 0)}
    with pytest.raises(ValueError, match="plain"):
        peers.to_tb_transfers(tb, [Transfer(id=1, debit_account_id=2, credit_account_id=3,
                                            amount=4, currency="EUR", flags=2)])
    with pytest.raises(ValueError, match="currency"):
        peers.tb_ledger("XTS")


def test_mapped_objects_convert_to_the_real_clients_structs() -> None:
    """Where TigerBeetle's client is installed, our objects pass its own field checks and
    convert to its C structs unchanged (no server needed)."""
    tb = pytest.importorskip("tigerbeetle")
    from tigerbeetle import bindings

    accounts, transfers = _workload()
    for a in peers.to_tb_accounts(tb, accounts):
        assert bindings.CAccount.from_param(a).to_python() == a
    for t in peers.to_tb_transfers(tb, transfers):
        assert bindings.CTransfer.from_param(t).to_python() == t
    result = bindings.CreateTransferResult(timestamp=1, status=tb.CreateTransferStatus.CREATED)
    assert peers.status_name(result) == "created"


def test_missing_client_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the optional package, --tigerbeetle stops before the processor starts, with a
    message naming the package to install."""
    monkeypatch.setitem(sys.modules, "tigerbeetle", None)
    with pytest.raises(peers.TigerBeetleMissing, match=re.escape("tigerbeetle>=0.17,<0.18")):
        peers.import_tigerbeetle()
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(bench_main, "run", None)  # would fail loudly if reached
    assert bench_main.main(["--quick", "--tigerbeetle", "127.0.0.1:3000"]) == 2
    assert "pip install" in err.getvalue()


# -- the driver and the run, against the fake client --------------------------------------


async def test_driver_batches_and_counts_per_event_results() -> None:
    """Batches of the asked size are sent; only 'created' counts; other answers are counted
    by name."""
    tb = fake_tigerbeetle(answers={5_003: FakeStatus.EXISTS, 5_004: FakeStatus.EXCEEDS_CREDITS})
    client = tb.ClientAsync(cluster_id=0, replica_addresses="127.0.0.1:3000")
    items = peers.to_tb_transfers(tb, _workload(count=25)[1])
    figures = await peers.drive_tigerbeetle(client.create_transfers, items, batch_size=10,
                                            concurrency=2)
    assert sorted(len(b) for b in client.transfers) == [5, 10, 10]
    assert sorted(t.id for b in client.transfers for t in b) == [t.id for t in items]
    assert figures["transfers_ok"] == 23 and figures["transfers_submitted"] == 25
    assert figures["codes"] == {"created": 23, "exceeds_credits": 1, "exists": 1}
    assert figures["request_latency_ms"]["count"] == 3
    assert not figures["aborted"] and figures["transfers_lost"] == 0


async def test_driver_ends_the_phase_on_a_client_error() -> None:
    """An exception from the client (eviction, too much data) ends the phase; what was not
    answered is counted lost, not retried forever."""
    tb = fake_tigerbeetle(fail_at_call=1)
    client = tb.ClientAsync(cluster_id=0, replica_addresses="127.0.0.1:3000")
    items = peers.to_tb_transfers(tb, _workload(count=30)[1])
    figures = await peers.drive_tigerbeetle(client.create_transfers, items, batch_size=10,
                                            concurrency=1)
    assert figures["aborted"] and figures["request_errors"] == {"RuntimeError": 1}
    assert figures["transfers_ok"] == 10 and figures["transfers_lost"] == 10
    assert figures["transfers_submitted"] == 20


async def test_run_sends_the_processors_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TigerBeetle run creates the accounts, then sends the same seeded uniform and hot
    transfers as the processor's run (ids offset), in the same batches; with the server's
    pid visible its CPU is counted, and the client is closed."""
    tb = fake_tigerbeetle()
    said: list[str] = []
    out = await peers.run_tigerbeetle(
        "127.0.0.1:3000", cluster_id=5, accounts=30, transfers=45, batch_size=20,
        concurrency=2, hot_share=0.5, seed=11, skip=set(), say=said.append, tb=tb,
        pid_of=lambda port: os.getpid(), probe_timeout_s=None, first_id=10_000)
    (client,) = tb.clients
    assert (client.cluster_id, client.replica_addresses, client.closed) == (
        5, "127.0.0.1:3000", True)
    assert [a.id for b in client.accounts for a in b] == list(range(10_000, 10_030))
    rng = random.Random(11)
    account_ids = list(range(10_000, 10_030))
    uniform = ledger.uniform_transfers(account_ids, 45, first_id=10_030, rng=rng)
    hot = ledger.hot_transfers(account_ids, 45, first_id=10_075, rng=rng, hot_share=0.5)
    sent = sorted((t.id, t.debit_account_id, t.credit_account_id, t.amount)
                  for b in client.transfers for t in b)
    assert sent == [(t.id, t.debit_account_id, t.credit_account_id, t.amount)
                    for t in uniform + hot]
    assert sorted(len(b) for b in client.transfers) == [5, 5, 20, 20, 20, 20]
    assert out["server_pid"] == os.getpid() and out["problems"] == []
    for name in ("uniform", "hot"):
        phase = out["phases"][name]
        assert phase["transfers_ok"] == 45 and phase["server_cpu_s"] is not None
        assert phase["server_cpu_us_per_transfer"] is not None
    assert out["phases"]["accounts"]["accounts"] == 30 and out["ledger"] == 978
    assert any("tigerbeetle uniform" in s for s in said)


async def test_run_without_a_visible_server_reports_client_cpu_only() -> None:
    """A server whose pid cannot be seen (or not on this machine) gives client-side CPU only,
    and the run says so; skipped phases are skipped for TigerBeetle too."""
    tb = fake_tigerbeetle()
    out = await peers.run_tigerbeetle(
        "127.0.0.1:3000", cluster_id=0, accounts=10, transfers=12, batch_size=8,
        concurrency=1, hot_share=0.5, seed=1, skip={"hot"}, say=lambda _: None, tb=tb,
        pid_of=lambda port: None, probe_timeout_s=None)
    assert list(out["phases"]) == ["accounts", "uniform"]
    uniform = out["phases"]["uniform"]
    assert uniform["server_cpu_us_per_transfer"] is None
    assert uniform["client_cpu_us_per_transfer"] is not None
    assert out["server_pid"] is None and "client only" in out["cpu_counted"]
    assert any("client only" in p for p in out["problems"])


async def test_run_stops_when_accounts_are_refused() -> None:
    """If TigerBeetle refuses the accounts (say, the ids exist with another ledger), no
    transfers are sent and the answer is a problem of the run."""
    tb = fake_tigerbeetle(answers={100: FakeStatus.EXISTS})
    out = await peers.run_tigerbeetle(
        "127.0.0.1:3000", cluster_id=0, accounts=10, transfers=12, batch_size=8,
        concurrency=1, hot_share=0.5, seed=1, skip=set(), say=lambda _: None, tb=tb,
        pid_of=lambda port: None, probe_timeout_s=None, first_id=100)
    assert tb.clients[0].transfers == [] and tb.clients[0].closed
    assert any("account creation" in p for p in out["problems"])


async def test_a_failed_tigerbeetle_run_keeps_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TigerBeetle failure becomes a problem of the run; the processor's figures stay."""
    async def refuse(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ConnectionError("no TigerBeetle server answers at 127.0.0.1:3000")

    monkeypatch.setattr(peers, "run_tigerbeetle", refuse)
    args = parse_args(["--quick", "--tigerbeetle", "127.0.0.1:3000"])
    results: dict[str, Any] = {"problems": [], "phases": {}}
    await bench_main._tigerbeetle(args, results, Console(file=io.StringIO()))
    assert "tigerbeetle" not in results
    assert "no TigerBeetle server answers" in results["problems"][0]


# -- ratios and the report ----------------------------------------------------------------


def _results(*, tigerbeetle: bool, server_cpu: bool = True) -> dict[str, Any]:
    lat = {"p50": 1.0, "p99": 2.0, "max": 3.0, "count": 3, "mean": 1.5}
    results: dict[str, Any] = {
        "args": {"hot_share": 0.5, "batch": 8189, "concurrency": 4, "shards": 2,
                 "transfers": 1000, "http_seconds": 5.0, "pgbench_clients": 8},
        "machine": {"date_utc": "2026-11-26T00:00:00+00:00", "cpu_count": 2},
        "phases": {
            "uniform": {"transfers_submitted": 1000, "durable_transfers_per_s": 16000.0,
                        "request_latency_ms": lat, "server_cpu_us_per_transfer": 100.0,
                        "server_cpu_cores_busy": 1.6, "rss_mib_peak": {"server": 600.0},
                        "shards": []},
            "hot": {"transfers_submitted": 1000, "durable_transfers_per_s": 12000.0,
                    "request_latency_ms": lat, "server_cpu_us_per_transfer": 120.0,
                    "server_cpu_cores_busy": 1.5, "rss_mib_peak": {"server": 610.0},
                    "shards": []},
            "http": {"offered_rate_per_s": 1000.0, "duration_s": 5.0,
                     "achieved_ok_per_s": 900.0, "latency_ms": lat,
                     "server_cpu_us_per_transfer": 1500.0, "server_cpu_cores_busy": 1.3,
                     "rss_mib_peak": {"server": 620.0}, "shards": [],
                     "answers_by_status": {"201": 4500}, "dropped_all_connections_busy": 0,
                     "generator_lag_ms_max": 1.0, "generator_cpu_cores_busy": 0.5,
                     "client": "raw"},
        },
        "pgbench": {"command": "pgbench -c 8 -j 2 -T 5 (after -i -s 10)", "tps": 2000.0,
                    "latency_ms_mean": 4.0, "postgres_cpu_us_per_transaction": 800.0},
        "problems": [],
    }
    if tigerbeetle:
        def phase(rate: float, cpu: float) -> dict[str, Any]:
            return {"transfers_submitted": 1000, "durable_transfers_per_s": rate,
                    "request_latency_ms": lat,
                    "server_cpu_us_per_transfer": cpu if server_cpu else None,
                    "server_cpu_cores_busy": 0.4 if server_cpu else None,
                    "client_cpu_us_per_transfer": 13.0, "server_rss_mib": 1100.0}

        results["tigerbeetle"] = {
            "address": "127.0.0.1:3000", "client": "tigerbeetle 0.17.9 (Python, ClientAsync)",
            "cpu_counted": "TigerBeetle server process (pid 42)" if server_cpu else
                           "client only: the server is not on this machine",
            "server_pid": 42 if server_cpu else None, "batch": 8189, "concurrency": 4,
            "phases": {"uniform": phase(80000.0, 10.0), "hot": phase(60000.0, 12.0)},
        }
    return results


def test_ratios_to_pgbench_and_tigerbeetle() -> None:
    """Every processor figure over pgbench tps and over TigerBeetle on the same workload
    (HTTP over its uniform batches), and CPU per transfer over each peer's."""
    r = peers.ratios(_results(tigerbeetle=True))
    assert r["uniform_durable_transfers_per_s_over_pgbench_tps"] == 8.0
    assert r["hot_durable_transfers_per_s_over_pgbench_tps"] == 6.0
    assert r["http_ok_per_s_over_pgbench_tps"] == 0.45
    assert r["uniform_durable_transfers_per_s_over_tigerbeetle_uniform_transfers_per_s"] == 0.2
    assert r["hot_durable_transfers_per_s_over_tigerbeetle_hot_transfers_per_s"] == 0.2
    assert r["http_ok_per_s_over_tigerbeetle_uniform_transfers_per_s"] == pytest.approx(
        0.01125, rel=0.01)  # to 3 significant digits
    assert r["uniform_server_cpu_per_transfer_over_pgbench_postgres_cpu_per_transaction"] \
        == 0.125
    assert r["uniform_server_cpu_per_transfer_over_tigerbeetle_uniform_server_cpu_per_transfer"] \
        == 10.0
    assert r["hot_server_cpu_per_transfer_over_tigerbeetle_hot_server_cpu_per_transfer"] == 10.0
    assert r["tigerbeetle_uniform_transfers_per_s_over_pgbench_tps"] == 40.0
    assert r["tigerbeetle_hot_server_cpu_per_transfer_over_pgbench_postgres_cpu_per_transaction"] \
        == 0.015


def test_ratios_without_tigerbeetle_or_pgbench() -> None:
    """Without TigerBeetle only the pgbench ratios are there; without pgbench as well,
    none, and nothing fails on the missing figures."""
    r = peers.ratios(_results(tigerbeetle=False))
    assert r and not any("tigerbeetle" in k for k in r)
    bare = _results(tigerbeetle=False)
    del bare["pgbench"]
    assert peers.ratios(bare) == {}
    assert peers.comparison_markdown({"phases": {}}) == ""


def test_client_only_cpu_is_shown_but_never_compared() -> None:
    """When TigerBeetle's server CPU could not be read, its row shows the client's CPU,
    labelled so, and no CPU ratio is drawn from it."""
    results = _results(tigerbeetle=True, server_cpu=False)
    rows = {(r["system"], r["workload"]): r for r in peers.comparison_rows(results)}
    tb = rows[("tigerbeetle", "uniform batches")]
    assert tb["cpu_us_per_transfer"] == 13.0 and tb["cpu_s_per_transfer"] == 1.3e-05
    assert tb["cpu_counted"].startswith("client only") and tb["cpu_over_pgbench"] is None
    assert rows[("txproc", "uniform batches")]["cpu_over_tigerbeetle"] is None
    assert rows[("txproc", "uniform batches")]["over_tigerbeetle_transfers_per_s"] == 0.2
    assert not any("cpu_per_transfer_over_tigerbeetle" in k or k.startswith(
        "tigerbeetle_uniform_server_cpu") for k in peers.ratios(results))


def test_markdown_rows_with_tigerbeetle() -> None:
    """The README block has TigerBeetle's rows beside the processor's and pgbench's, and a
    comparison table with transfers/s, CPU-seconds per transfer and the ratios."""
    md = markdown_rows(_results(tigerbeetle=True))
    assert "| 2026-11-26 | peer: TigerBeetle at 127.0.0.1:3000 via tigerbeetle 0.17.9" in md
    assert "| 80,000 | 1 | 2 | 10.0 (TigerBeetle server) | 1,100 |" in md
    assert "| system | workload | transfers/s | CPU/transfer | CPU of |" in md
    assert ("| txproc | uniform batches | 16,000 | 100.0 µs | shards+front+postgres "
            "| 8 | 0.2 | 0.125 | 10 |") in md
    assert "| txproc | single HTTP | 900 | 1,500.0 µs |" in md
    assert "| pgbench | TPC-B | 2,000 | 800.0 µs | postgres | - | - | - | - |" in md
    assert "| tigerbeetle | hot batches | 60,000 | 12.0 µs | server | 30 | - | 0.015 | - |" in md
    assert "CPU-seconds per transfer" in md


def test_markdown_rows_without_tigerbeetle() -> None:
    """Without --tigerbeetle nothing about it appears but the empty ratio column."""
    md = markdown_rows(_results(tigerbeetle=False))
    assert "peer: TigerBeetle" not in md and "| tigerbeetle |" not in md
    assert "| txproc | hot batches | 12,000 | 120.0 µs | shards+front+postgres " \
           "| 6 | - | 0.15 | - |" in md


def test_printed_table_shows_the_peers() -> None:
    """The printed report has TigerBeetle's rows and the comparison table."""
    results = _results(tigerbeetle=True, server_cpu=False)
    bench_main._ratios(results)
    out = io.StringIO()
    print_table(results, Console(file=out, width=120))
    text = out.getvalue()
    assert "TB uniform" in text and "13.0 c" in text and "TB: TigerBeetle at" in text
    assert "against peers" in text and "tigerbeetle hot batches" in text
    assert "13.0 µs c" in text and "…" not in text  # nothing cut off
    assert results["comparison"] and "uniform_durable_transfers_per_s_over_pgbench_tps" in \
        results["ratios"]


def test_a_cpu_bound_client_is_named_only_over_a_long_enough_phase() -> None:
    """Client CPU over wall time is noise for a phase of milliseconds; over a second it
    says the Python client, not the server, set the figure."""
    phase = {"request_errors": 0, "transfers_lost": 0, "stopped_early": False,
             "codes": {"created": 10},
             "client_cpu_cores_busy": 1.7, "wall_s": 0.02}
    assert peers._phase_problems("uniform", phase) == []
    phase["wall_s"] = 3.0
    [note] = peers._phase_problems("uniform", phase)
    assert "CPU-bound" in note
    phase["client_cpu_cores_busy"] = 0.4
    assert peers._phase_problems("uniform", phase) == []
