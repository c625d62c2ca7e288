"""The pure parts of the load-test harness: workload flows, summary math, cost, markdown and
pictures. No processor, no Ray, no Locust (which would monkey-patch this process)."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import pytest

from loadtests import summary as summ
from loadtests.run import classify_process, parse_args, totals_by_group
from loadtests.workload import (
    Budget,
    HotAccountFlow,
    KeySource,
    PartnerFlow,
    Settings,
    card_token,
    error_code,
    parse_mix,
    scenario_setup_requests,
)

R = summ.Record


def _settings(**kw: object) -> Settings:
    base: dict[str, object] = {"token": "t", "account_first": 100, "accounts": 50}
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


def test_percentiles_nearest_rank_and_weighted() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [summ.percentile(values, p) for p in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert summ.percentile([], 99) == 0.0
    assert summ.percentile([7.0], 50) == 7.0
    # (value, count) pairs weigh like repeated values.
    pairs = [(10.0, 90), (100.0, 9), (1000.0, 1)]
    expanded = sorted([10.0] * 90 + [100.0] * 9 + [1000.0])
    for p in (50, 90, 91, 95, 99, 99.5, 100):
        assert summ.weighted_percentile(pairs, p) == summ.percentile(expanded, p)
    assert summ.weighted_percentile([], 50) == 0.0


def test_records_parse_and_torn_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "requests-1.csv"
    path.write_text("10.5,http,authorize,12.000,1,authorized,1\n"
                    "10.0,item,transfer,5.000,0,exceeds_credits,3\n"
                    "\n"
                    "11.0,http,capt")  # the last line of a killed process
    records = summ.read_records([path])
    assert [r.name for r in records] == ["transfer", "authorize"]  # sorted by start
    assert records[0] == R(10.0, "item", "transfer", 5.0, False, "exceeds_credits", 3)
    assert summ.parse_record("not,a,record") is None


def _gateway_and_http_records() -> list[summ.Record]:
    return [
        R(0.0, "batch", "create_transfers batch", 40.0, True, "ok"),
        R(0.0, "item", "transfer", 40.0, True, "ok", 8),
        R(0.0, "item", "transfer", 40.0, False, "exceeds_credits", 2),
        R(1.0, "batch", "create_transfers batch", 60.0, False, "overloaded"),
        R(1.0, "item", "transfer", 60.0, False, "overloaded", 10),
        R(1.5, "http", "authorize", 100.0, True, "authorized"),
        R(1.6, "http", "authorize", 300.0, False, "payment_declined"),
        R(1.9, "http", "transfer", 20.0, True, "created"),
    ]


def test_operation_stats_and_error_rates_by_code() -> None:
    records = _gateway_and_http_records()
    errors = summ.error_rates_by_code(records)
    # Operations: 20 RPC items + 3 HTTP requests; batches are not operations.
    assert errors["operations"] == 23 and errors["errors"] == 13
    assert errors["by_code"] == {
        "overloaded": {"count": 10, "rate": round(10 / 23, 6)},
        "exceeds_credits": {"count": 2, "rate": round(2 / 23, 6)},
        "payment_declined": {"count": 1, "rate": round(1 / 23, 6)},
    }
    assert errors["rpc_calls"] == 2
    assert errors["rpc_calls_failed_by_code"] == {"overloaded": {"count": 1, "rate": 0.5}}

    ops = summ.operation_stats([r for r in records if r.is_operation], window=2.0)
    transfer = ops["transfer"]
    assert (transfer["count"], transfer["ok"], transfer["errors"]) == (21, 9, 12)
    assert transfer["codes"] == {"overloaded": 10, "ok": 8, "exceeds_credits": 2,
                                 "created": 1}
    assert transfer["ok_per_s"] == 4.5
    # 1 at 20 ms, 10 at 40 ms, 10 at 60 ms.
    assert transfer["latency_ms"]["p50"] == 40.0 and transfer["latency_ms"]["p99"] == 60.0
    assert ops["authorize"]["error_rate"] == 0.5


def test_summarize_counts_transfers_authorizations_and_cost() -> None:
    records = [R(100.0 + i * 0.01, "http", name, 10.0 + i % 7, ok, code)
               for i, (name, ok, code) in enumerate(
                   [("authorize", True, "authorized")] * 300
                   + [("transfer", True, "created")] * 150
                   + [("capture", True, "captured")] * 40
                   + [("refund", False, "refund_exceeds_captured")] * 10)]
    # Cumulative CPU samples: 2 CPU-s per second in all, from 99 s to 106 s.
    samples = [(99.0 + t, {"ray::Front": 1.0 * t, "postgres": 0.5 * t, "raylet": 0.5 * t})
               for t in range(8)]
    s = summ.summarize(records, scenario="partners", cpu_samples=samples,
                       vcpu_hour_price_usd=0.036, run={"command": "x", "users": 3})
    assert s["users"] == 3 and s["command"] == "x"
    assert s["requests"] == 500 and s["transfers"] == 150 and s["authorizations"] == 300
    window = s["window_s"]
    assert window == pytest.approx(4.99 + 0.012, abs=1e-6)  # last: 104.99 s + 12 ms
    assert s["transfers_per_s"] == round(150 / window, 2)
    assert s["headline_operation"] == "authorize"
    assert s["authorization_latency_ms"] == s["operations"]["authorize"]["latency_ms"]
    cost = s["cost"]
    assert cost["cpu_s_total"] == pytest.approx(2 * window, abs=1e-3)
    assert cost["transactions"] == 450
    assert cost["cpu_ms_per_transaction"] == pytest.approx(2 * window * 1000 / 450, rel=1e-3)
    assert cost["usd_per_transaction"] == pytest.approx(2 * window / 450 * 0.036 / 3600,
                                                        rel=1e-3)
    assert cost["operations_ok"] == 490
    assert cost["cpu_s_by_kind"] == {"postgres": pytest.approx(0.5 * window, abs=1e-3),
                                     "ray_system": pytest.approx(0.5 * window, abs=1e-3),
                                     "ray_workers": pytest.approx(window, abs=1e-3)}
    assert s["errors"]["by_code"]["refund_exceeds_captured"]["count"] == 10
    over_time = s["latency_over_time"]
    assert [row["t_s"] for row in over_time] == [0.0, 1.0, 2.0]  # authorizations: 3 s
    assert sum(row["count"] for row in over_time) == 300
    assert all(row["p50"] <= row["p95"] <= row["p99"] for row in over_time)
    assert all(c["cores"] == pytest.approx(2.0) for c in s["cpu_cores_over_time"])
    json.dumps(s)  # the summary is plain JSON


def test_cost_figures_and_cpu_interpolation() -> None:
    c = summ.cost_figures({"ray::LedgerShard": 6.0, "postgres": 4.0}, 5_000, 6_000, 0.04)
    assert c["cpu_ms_per_transaction"] == 2.0
    assert c["usd_per_transaction"] == pytest.approx(10 / 5_000 * 0.04 / 3600)
    assert c["usd_per_million_transactions"] == pytest.approx(0.0222, abs=1e-4)
    assert c["cpu_ms_per_operation"] == pytest.approx(10_000 / 6_000, abs=1e-4)
    assert summ.cost_figures(None, 10, 10) == {"measured": False, "vcpu_hour_price_usd": 0.04}
    assert "cpu_ms_per_transaction" not in summ.cost_figures({"x": 1.0}, 0, 0)

    samples = [(10.0, {"a": 0.0}), (12.0, {"a": 4.0, "b": 2.0}), (14.0, {"a": 4.0, "b": 2.0})]
    assert summ.cpu_at(samples, 11.0) == {"a": 2.0, "b": 1.0}  # b had spent nothing at 10
    assert summ.cpu_at(samples, 5.0) == {"a": 0.0}
    assert summ.cpu_between(samples, 11.0, 20.0) == {"a": 2.0, "b": 1.0}
    assert summ.cpu_cores_over_time(samples, 10.0) == [{"t_s": 1.0, "cores": 3.0},
                                                       {"t_s": 3.0, "cores": 0.0}]
    assert summ.cpu_cores_over_time(samples, 12.5, 13.0) == [{"t_s": 0.5, "cores": 0.0}]
    reading = {("postgres", 1): 1.5, ("postgres", 2): 0.5, ("raylet", 3): 1.0}
    assert totals_by_group(reading) == {"postgres": 2.0, "raylet": 1.0}


def test_cdf_points_are_monotonic_and_end_at_one() -> None:
    records = [R(0.0, "http", "authorize", float(v), True, "authorized")
               for v in range(1, 2001)]
    points = summ.cdf_points(records, "authorize", points_max=100)
    assert 90 <= len(points) <= 101
    assert points[-1] == (2000.0, 1.0)
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in itertools.pairwise(points))
    assert summ.cdf_points(records, "nothing") == []


def test_markdown_names_the_figures() -> None:
    s = summ.summarize(_gateway_and_http_records(), scenario="gateways",
                       cpu_samples=[(0.0, {"ray::LedgerShard": 0.0}),
                                    (3.0, {"ray::LedgerShard": 3.0})],
                       run={"command": ".venv/bin/python loadtests/run.py --scenario gateways",
                            "stopped_by": "duration", "notes": ["a note"]})
    md = summ.render_markdown(s, ["latency_cdf.png"])
    assert md.startswith("# txproc load test: gateways\n")
    assert "`create_transfers batch` latency: p50 40.0 ms" in md
    assert "| transfer | overloaded | 10 |" in md
    assert "| overloaded | 10 | 43.478 |" in md
    assert "| create_transfers batch | 2 | 1 | 1 | 50.00 |" in md
    assert "server CPU-ms per transaction" in md and "| ray::LedgerShard |" in md
    assert "![latency_cdf.png](latency_cdf.png)" in md and "- a note" in md
    unmeasured = summ.render_markdown(summ.summarize([], scenario="partners"))
    assert "not measured" in unmeasured


def test_pngs_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = [R(i * 0.05, "http", name, 5.0 + (i % 13) * 3, i % 17 != 0,
                 "authorized" if i % 17 else "payment_declined")
               for i, name in zip(range(200), itertools.cycle(["authorize", "transfer"]),
                                  strict=False)]
    samples = [(t * 1.0, {"ray::Front": t * 0.7}) for t in range(12)]
    s = summ.summarize(records, scenario="partners", cpu_samples=samples)
    names = summ.render_pngs(s, records, tmp_path)
    assert names == ["latency_over_time.png", "latency_cdf.png"]
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_process_groups() -> None:
    assert classify_process(["ray::LedgerShard.create_transfers"], "ray::LedgerShar") \
        == "ray::LedgerShard"
    assert classify_process(["ray::IDLE"], "ray::IDLE") == "ray::IDLE"
    assert classify_process(["/x/ray/core/src/ray/raylet/raylet", "--flag"], "raylet") \
        == "raylet"
    assert classify_process(["/x/gcs_server", "--a"], "gcs_server") == "gcs_server"
    assert classify_process(["/x/bin/postgres", "-D", "d"], "postgres") == "postgres"
    assert classify_process(["postgres: txproc 127.0.0.1 idle"], "postgres") == "postgres"
    assert classify_process(["python", "-m", "adapters.sim.acme", "--port", "0"], "python") \
        == "providers"
    assert classify_process(["python", "x/log_monitor.py"], "python") == "ray_other"
    assert summ.cpu_kind("ray::Front") == "ray_workers"
    assert summ.cpu_kind("ray::DashboardAgent") == "ray_system"
    assert summ.cpu_kind("gcs_server") == "ray_system"


def test_runner_arguments_are_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--scenario", "gateways"])
    assert (args.duration_s, args.users, args.rate, args.max_requests) == (20.0, 4, 20.0,
                                                                           100_000)
    assert args.out.name.startswith("gateways-")
    assert parse_args(["--run-time", "1m"]).duration_s == 60.0
    for bad in (["--duration-s", "0"], ["--duration-s", "7200"], ["--max-requests", "0"],
                ["--rpc-target", "10.0.0.1:7070"], ["--server-pid", "1"],
                ["--target", "http://127.0.0.1:8080", "--scenario", "gateways"],
                ["--target", "127.0.0.1:8080"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    capsys.readouterr()


def test_partner_flow_captures_authorized_and_refunds_captured_payments() -> None:
    settings = _settings(partner_mix=parse_mix("transfer=3,authorize=3,capture=2,refund=1"))
    rng = random.Random(5)
    flow = PartnerFlow(settings, rng, itertools.count(1), KeySource(random.Random(1)))
    authorized: dict[str, int] = {}
    captured: dict[str, int] = {}
    keys: set[str] = set()
    names: list[str] = []
    for n in range(3000):
        call = flow.next_call()
        names.append(call.name)
        body = json.loads(call.body)
        if call.name == "transfer":
            assert call.idempotency_key is None and call.path == "/v1/transfers"
            assert body["debit_account_id"] != body["credit_account_id"]
            flow.answered(call, 201, {**body})
            continue
        assert call.idempotency_key is not None and call.idempotency_key not in keys
        keys.add(call.idempotency_key)
        assert not re.search(r"\d{13}", call.idempotency_key)
        if call.name == "authorize":
            assert body["merchant_account_id"] in settings.merchant_ids
            assert re.fullmatch(r"pm_4242_[a-z]{16}", body["payment_method"])
            assert 100 <= body["amount"] < 10_000 and body["capture"] is False
            pid = f"pay_{n}"
            authorized[pid] = body["amount"]
            flow.answered(call, 201, {"id": pid, "status": "authorized",
                                      "amount": body["amount"]})
        elif call.name == "capture":
            assert call.path == f"/v1/payments/{call.payment_id}/capture"
            assert 1 <= body["amount"] <= authorized.pop(call.payment_id)
            captured[call.payment_id] = body["amount"]
            flow.answered(call, 200, {"id": call.payment_id, "status": "captured",
                                      "captured_amount": body["amount"]})
        else:
            assert call.path == f"/v1/payments/{call.payment_id}/refunds"
            assert 1 <= body["amount"] <= captured.pop(call.payment_id)
    counts = {name: names.count(name) for name in ("transfer", "authorize", "capture",
                                                   "refund")}
    assert abs(counts["transfer"] / 3000 - 3 / 9) < 0.04
    assert abs(counts["refund"] / 3000 - 1 / 9) < 0.04
    # A declined authorization is not captured later.
    flow2 = PartnerFlow(_settings(partner_mix=parse_mix("authorize=1,capture=1")),
                        random.Random(1), itertools.count(1), KeySource())
    for _ in range(50):
        call = flow2.next_call()
        assert call.name == "authorize"
        flow2.answered(call, 402, {"error": {"code": "payment_declined"},
                                   "payment": {"id": "p", "status": "declined"}})


def test_workload_helpers() -> None:
    rng = random.Random(3)
    assert all(not re.search(r"\d{13}", card_token(rng)) for _ in range(2000))
    flow = HotAccountFlow(_settings(), random.Random(2), itertools.count(1))
    calls = [flow.next_call() for _ in range(4000)]
    hot = [json.loads(c.body) for c in calls if c.name == "transfer hot"]
    assert abs(len(hot) / 4000 - 0.5) < 0.03
    s = _settings()
    assert all(s.hot_account_id in (b["debit_account_id"], b["credit_account_id"])
               for b in hot)
    setup = [(p, b) for p, b in scenario_setup_requests(s)]
    assert [p for p, _ in setup] == ["/v1/accounts/batch", "/v1/transfers/batch",
                                     "/v1/accounts/batch"]
    extra = [a["id"] for a in setup[-1][1]["accounts"]]  # type: ignore[union-attr]
    assert extra == [s.hot_account_id, *s.merchant_ids]
    assert error_code(422, '{"error": {"code": "payment_not_capturable"}}') \
        == "payment_not_capturable"
    assert error_code(502, "<html>") == "http_502" and error_code(0, None) == "no_answer"
    budget = Budget(2)
    assert [budget.take() for _ in range(3)] == [True, True, False] and budget.exhausted
    assert all(Budget(0).take() for _ in range(10))
    with pytest.raises(ValueError):
        parse_mix("authorize=1,payout=1")
    with pytest.raises(ValueError):
        parse_mix("transfer=0")
    with pytest.raises(ValueError):
        Settings.from_env({"TXPROC_TOKEN": "t", "TXPROC_BATCH_SIZE": "0"})
