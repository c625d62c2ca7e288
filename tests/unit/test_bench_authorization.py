"""The authorization benchmark's parts: the open-loop scheduler, the figures, the report, and
one tiny run against the session's processor.

Nothing here asserts a timing: figures come from ``python -m bench.authorization``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path

import httpx
import msgspec
import pytest

from adapters.sim.core import CARD_BEHAVIOUR
from adapters.sim.faults import Faults
from bench import authorization as auth
from bench.ledger import percentile
from processor.cardscan import contains_card_number
from processor.payments import AuthorizeRequest

MERCHANTS = {"USD": [11, 12, 13], "EUR": [21, 22]}


def test_due_count_spaces_sends_evenly_and_caps_the_total() -> None:
    """Send i is due at i/rate: the first at once, then one per interval, never more than
    the total, none before the start."""
    assert auth.due_count(-0.5, 10.0, 100) == 0
    assert auth.due_count(0.0, 10.0, 100) == 1
    assert auth.due_count(0.099, 10.0, 100) == 1
    assert auth.due_count(0.1, 10.0, 100) == 2
    assert auth.due_count(0.95, 10.0, 100) == 10
    assert auth.due_count(60.0, 10.0, 100) == 100


async def test_open_loop_sends_every_scheduled_request_once() -> None:
    """Every index is sent once, in schedule order, and answered with its outcome; latency
    counts from the scheduled send time, so it is at least the service time."""
    seen: list[int] = []

    async def send(i: int) -> tuple[int, str, str]:
        seen.append(i)
        await asyncio.sleep(0.005)
        return 201, "201 authorized", f"pay_{i}"

    run = await auth.open_loop(send, rate_per_s=200.0, duration_s=0.25, in_flight_max=64,
                               timeout_s=5.0)
    assert run.scheduled == 50 and run.dropped == 0 and run.abandoned == 0
    assert seen == list(range(50))
    assert [a.index for a in run.answers] == list(range(50))
    assert all(a.answered and a.latency_ms >= 5.0 for a in run.answers)
    assert {a.payment_id for a in run.answers} == {f"pay_{i}" for i in range(50)}
    assert run.elapsed_s > 0


async def test_open_loop_drops_what_is_due_while_in_flight_is_full() -> None:
    """Open loop: a stalled server does not slow the schedule; sends due while
    ``in_flight_max`` are outstanding are dropped and counted, not queued."""
    release = asyncio.Event()

    async def send(i: int) -> tuple[int, str, str]:
        await release.wait()
        return 201, "201 authorized", ""

    task = asyncio.ensure_future(auth.open_loop(send, rate_per_s=100.0, duration_s=0.1,
                                                in_flight_max=2, timeout_s=5.0))
    await asyncio.sleep(0.3)
    release.set()
    run = await task
    assert run.scheduled == 10
    assert len(run.answers) == 2 and run.dropped == 8


async def test_open_loop_records_timeouts_and_failures_without_an_answer() -> None:
    """A request past its timeout is ``timeout``, a failed one is named by its exception;
    neither counts as answered."""

    async def send(i: int) -> tuple[int, str, str]:
        if i == 0:
            await asyncio.sleep(10)
        if i == 1:
            raise ConnectionResetError("gone")
        return 503, "503 provider_unavailable", ""

    run = await auth.open_loop(send, rate_per_s=100.0, duration_s=0.03, in_flight_max=8,
                               timeout_s=0.2)
    outcomes = {a.index: (a.outcome, a.answered) for a in run.answers}
    assert outcomes == {0: ("timeout", False), 1: ("ConnectionResetError", False),
                        2: ("503 provider_unavailable", True)}


@pytest.mark.parametrize(("rate", "seconds"), [(0.0, 1.0), (10.0, 0.01)])
async def test_open_loop_refuses_an_empty_schedule(rate: float, seconds: float) -> None:
    async def send(i: int) -> tuple[int, str, str]:
        raise AssertionError("never sent")

    with pytest.raises(ValueError):
        await auth.open_loop(send, rate_per_s=rate, duration_s=seconds, in_flight_max=1,
                             timeout_s=1.0)


async def test_raw_client_reopens_a_connection_the_server_closed() -> None:
    """A keep-alive connection the server closed while idle (uvicorn does after 5 s) is
    opened afresh rather than failing the next request; headers and body arrive whole."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        seen.append(head + await reader.readexactly(length))
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()  # no "connection: close" said: the client finds out by itself

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = auth.RawClient(f"http://127.0.0.1:{port}", "tok", 4)
    try:
        for i in range(3):
            assert await client.post("/v1/payments", b'{"a":1}',
                                     {"Idempotency-Key": f"k{i}"}) == (201, b"{}")
            await asyncio.sleep(0.05)
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    assert len(seen) == 3
    assert seen[2].startswith(b"POST /v1/payments HTTP/1.1\r\n")
    assert b"Idempotency-Key: k2\r\n" in seen[2] and b"Authorization: Bearer tok\r\n" in seen[2]
    assert seen[2].endswith(b'\r\n\r\n{"a":1}')


def test_summary_counts_outcomes_rates_and_percentiles() -> None:
    """Achieved authorizations/s are 201s per second of the window; percentiles are taken
    over answered requests (all statuses) and over the authorized ones separately."""
    answers = [auth.Answer(i, "201 authorized", float(i + 1), 201) for i in range(90)]
    answers += [auth.Answer(90 + i, "202 processing", 500.0 + i, 202) for i in range(5)]
    answers += [auth.Answer(95, "402 payment_declined", 3.0, 402),
                auth.Answer(96, "503 provider_unavailable", 4.0, 503),
                auth.Answer(97, "timeout", 30_000.0, 0)]
    run = auth.OpenLoopRun(scheduled=100, rate_per_s=10.0, duration_s=10.0, answers=answers,
                           dropped=2, elapsed_s=9.0, generator_cpu_s=0.9)
    s = auth.summarize(run)
    assert (s["scheduled"], s["sent"], s["dropped_in_flight_max"], s["answered"]) == (
        100, 98, 2, 97)
    assert s["outcomes"] == {"201 authorized": 90, "202 processing": 5,
                             "402 payment_declined": 1, "503 provider_unavailable": 1,
                             "timeout": 1}
    assert s["achieved_authorizations_per_s"] == 10.0
    assert s["generator_cpu_cores_busy"] == 0.1
    ok = s["latency_ms"]["authorized"]
    assert (ok["count"], ok["p50"], ok["p95"], ok["p99"], ok["max"]) == (90, 45, 86, 90, 90)
    answered = sorted(a.latency_ms for a in answers if a.answered)
    lat = s["latency_ms"]["answered"]
    assert lat["count"] == 97
    assert lat["p99"] == percentile(answered, 99) == 504.0  # the timeout is not in it
    assert auth.share(s, 202) == pytest.approx(5 / 98)
    empty = auth.latency_figures([])
    assert (empty["count"], empty["p50"], empty["max"]) == (0, 0.0, 0.0)


def test_outcome_label_names_status_and_code() -> None:
    assert auth.outcome_label(201, {"id": "pay_1", "status": "authorized"}) == "201 authorized"
    assert auth.outcome_label(202, {"status": "processing"}) == "202 processing"
    assert auth.outcome_label(402, {"error": {"code": "payment_declined", "message": "x"},
                                    "payment": {"status": "declined"}}) == (
        "402 payment_declined")
    assert auth.outcome_label(502, None) == "502"
    assert auth.outcome_label("timeout", None) == "timeout"


def test_payment_bodies_decode_as_authorizations_on_approving_tokens() -> None:
    """Bodies decode with the API's own strict type, in the merchant's currency, on fresh
    approving card tokens that the card-data scan lets through; same seed, same bodies."""
    rng = random.Random(4)
    tokens = set()
    for i in range(2_000):
        raw = auth.payment_body(rng, MERCHANTS, "globex" if i % 2 else None)
        req = msgspec.json.decode(raw, type=AuthorizeRequest)
        assert req.merchant_account_id in MERCHANTS[req.currency]
        assert auth.AMOUNT_MIN <= req.amount <= auth.AMOUNT_MAX and req.capture is False
        assert req.provider == ("globex" if i % 2 else None)
        assert re.fullmatch(r"pm_4242_[a-z]{16}", req.payment_method)
        assert not contains_card_number(req.payment_method)
        tokens.add(req.payment_method)
    assert len(tokens) == 2_000 and "4242" not in CARD_BEHAVIOUR
    assert auth.payment_body(random.Random(9), MERCHANTS) == auth.payment_body(
        random.Random(9), MERCHANTS)


def test_fault_bodies_are_what_the_simulators_accept() -> None:
    body = auth.fault_body(0.05, median_ms=40.0, p99_ms=250.0, seed=7)
    faults = msgspec.json.decode(json.dumps(body), type=Faults)
    assert (faults.error_rate, faults.seed, faults.latency.median_ms,  # type: ignore[union-attr]
            faults.latency.p99_ms) == (0.05, 7, 40.0, 250.0)  # type: ignore[union-attr]
    assert msgspec.json.decode(json.dumps(auth.fault_body(0.0, median_ms=None, p99_ms=None,
                                                          seed=1)), type=Faults).latency is None


def test_args_quick_error_rates_and_default_output() -> None:
    args = auth.parse_args(["--quick"])
    assert (args.seconds, args.rate) == (auth.QUICK["seconds"], auth.QUICK["rate"])
    assert args.error_rates == [0.0, 0.05]
    assert re.fullmatch(r"authorization-\d{4}-\d{2}-\d{2}-quick\.json", args.out.name)
    assert auth.parse_args(["--error-rates", "0.1, 0.2,"]).error_rates == [0.1, 0.2]
    assert auth.parse_args([]).out.parent == Path(auth.__file__).parent / "results"
    for bad in (["--error-rates", "1.5"], ["--rate", "0"],
                ["--provider-median-ms", "300", "--provider-p99-ms", "250"]):
        with pytest.raises(SystemExit):
            auth.parse_args(bad)


def test_markdown_rows_render_one_row_per_phase() -> None:
    phase = {"faults": {"error_rate": 0.05, "latency": {"median_ms": 40.0, "p99_ms": 250.0}},
             "offered_rate_per_s": 100.0, "achieved_authorizations_per_s": 88.5, "sent": 100,
             "outcomes": {"201 authorized": 90, "202 processing": 5, "503 provider_unavailable": 4,
                          "timeout": 1},
             "latency_ms": {"answered": {"p50": 61.25, "p95": 180.0, "p99": 260.5}},
             "server_cpu_ms_per_request": 21.5}
    results = {"machine": {"date_utc": "2026-11-25T00:00:00+00:00", "cpu_count": 2,
                           "cpu_model": "Test CPU", "load_average_at_start": [0.5, 0.4, 0.3],
                           "command": "python -m bench.authorization"},
               "phases": [phase, {**phase, "faults": {"error_rate": 0.0, "latency": None},
                                  "server_cpu_ms_per_request": None}]}
    text = auth.markdown_rows(results)
    assert "`python -m bench.authorization` on 2026-11-25, 2 cores (Test CPU)" in text
    assert ("| 2026-11-25 | 5% errors, 40/250 ms | 100 | 88.5 | 61.2 | 180.0 | 260.5 | "
            "90.0% / 5.0% / 0.0% / 4.0% / 1.0% | 21.50 |") in text
    assert "| 2026-11-25 | 0% errors, no latency |" in text and text.endswith("| - | - |")
    with_added = auth.markdown_rows({**results, "phases": [
        {**phase, "processor_added_ms": {"count": 3, "p50": 4.25, "p99": 9.5}}]})
    assert with_added.endswith("| 21.50 | 4.2 / 9.5 |")


def test_processor_added_is_latency_less_the_provider_s_time() -> None:
    """Per authorized answer, its latency less the provider's time for its payment (by our
    payment id); other answers and authorizations the provider has no time for are left
    out, the latter counted."""
    answers = [auth.Answer(i, "201 authorized", 50.0 + i, 201, f"pay_{i}") for i in range(10)]
    answers += [auth.Answer(10, "402 payment_declined", 7.0, 402, "pay_10"),
                auth.Answer(11, "201 authorized", 80.0, 201, "pay_unknown")]
    served = {f"pay_{i}": 45.0 + i for i in range(11)}  # every one 5 ms under its latency
    added = auth.processor_added(answers, served)
    assert (added["count"], added["p50"], added["p99"], added["max"]) == (10, 5.0, 5.0, 5.0)
    assert added["unmatched"] == 1


def test_idle_figures_are_milliseconds_per_second_by_group_and_for_the_server() -> None:
    before = {("front", 1): 10.0, ("shards", 2): 5.0, ("payments", 3): 1.0,
              ("sims", 4): 2.0, ("postgres", 5): 3.0}
    after = {("front", 1): 10.2, ("shards", 2): 5.1, ("payments", 3): 1.05,
             ("sims", 4): 2.5, ("postgres", 5): 3.0, ("risk", 6): 0.01}
    idle = auth.idle_figures(before, after, wall_s=10.0)
    assert idle["front"] == 20.0 and idle["shards"] == 10.0 and idle["payments"] == 5.0
    assert idle["risk"] == 1.0 and idle["sims"] == 50.0
    # The simulators are reported, not counted as the server's.
    assert idle["server"] == 36.0
    with pytest.raises(ValueError):
        auth.idle_figures(before, after, wall_s=0.0)


async def test_a_tiny_run_against_the_session_processor(processor) -> None:  # type: ignore[no-untyped-def]
    """``measure`` drives the real payments API open loop, counts what was sent, and leaves
    the simulated providers without faults. (A low error rate: a high one could open the
    breaker for the rest of the session.)"""
    results = await auth.measure(processor, error_rates=[0.0, 0.1], rate_per_s=20.0,
                                 seconds=1.0, warmup_s=0.0, resolve_wait_s=5.0,
                                 merchants_per_currency=2, timeout_s=20.0, idle_s=1.0)
    assert [p["faults"]["error_rate"] for p in results["phases"]] == [0.0, 0.1]
    # At rest the processor still spends some CPU (Ray's threads, the actors' timers): about
    # 60 ms/s in all, while one process alone may stay under a 10 ms clock tick.
    assert results["idle"]["server"] > 0
    for p in results["phases"]:
        assert p["scheduled"] == 20
        assert p["sent"] + p["dropped_in_flight_max"] == 20
        assert set(p["outcomes"]) <= {"201 authorized", "202 processing",
                                      "503 provider_unavailable", "timeout"}, p["outcomes"]
        assert p["provider_actors"]["acme"]["calls"] >= 1
        assert p["server_cpu_ms_per_request"] is None or p["server_cpu_ms_per_request"] > 0
        # The provider's time is found for every authorization, and is less than the whole.
        added = p["processor_added_ms"]
        assert added["unmatched"] == 0, added
        assert added["count"] == p["outcomes"].get("201 authorized", 0)
        assert added["count"] == 0 or added["p50"] > 0, added
    assert results["phases"][0]["outcomes"].get("201 authorized", 0) >= 1
    sims = auth._Sims(processor)
    async with httpx.AsyncClient(timeout=10) as http:
        for name, url in sims.urls.items():
            r = await http.get(f"{url}/_sim/faults",
                               headers={"authorization": f"Bearer {sims.admin[name]}"})
            assert r.json()["faults"] == msgspec.to_builtins(Faults())


async def test_a_generator_connects_from_a_loopback_address_of_its_own() -> None:
    """On 127.0.0.1 a load generator connects from 127.0.0.{n + 2}, so that the server's
    per-address connection limit does not count it with the simulators' webhooks; another
    host gets no source address."""
    peers: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    try:
        assert auth.loopback_source(base, 0) == "127.0.0.2"
        assert auth.loopback_source("http://10.0.0.5:8080", 0) is None
        client = auth.RawClient(base, "t", 2, auth.loopback_source(base, 1))
        assert await client.post("/x", b"{}", {}) == (200, b"ok")
        client.close()
    finally:
        server.close()
        await server.wait_closed()
    assert peers == ["127.0.0.3"]
