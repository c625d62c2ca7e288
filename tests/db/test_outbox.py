"""Tests of actors.payments.outbox against a real PostgreSQL and a real HTTP receiver on
loopback."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import pytest

from actors.database import database_url_with_name
from actors.payments.outbox import (
    OutboxRelay,
    PayloadTooLargeError,
    RelayLimits,
    Verdict,
    backlog,
    dlq_list,
    dlq_replay,
    enqueue,
    set_subscribers,
    verdict_of,
    verify,
)
from processor.types import InvariantError

SECRET = b"outbox-test-signing-secret-32byt"
TIMEOUT_S = 10.0
# Small enough that a test of several retries takes a fraction of a second.
FAST = RelayLimits(
    batch_max=50, in_flight_max=10, attempts_max=8, backoff_base_s=0.01, backoff_cap_s=0.05,
    delivery_deadline_s=3600.0, request_timeout_s=0.5, lease_s=10.0, poll_interval_s=0.01,
    statement_timeout_s=2.0,
)
HANG = "hang"


def _limits(**changes: float) -> RelayLimits:
    """FAST with ``changes``, checked like any new limits."""
    fields = {name: getattr(FAST, name) for name in FAST.__struct_fields__}
    return RelayLimits(**{**fields, **changes})


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answer: int | str


@dataclass
class Receiver:
    """An HTTP/1.1 server on 127.0.0.1 answering each POST by the next entry of ``script``.

    An entry is a status, a (status, headers) pair, or HANG (never answer); once the script is
    used up it answers ``default``. Every request is recorded before it is answered.
    """

    script: list[int | str | tuple[int, dict[str, str]]] = field(default_factory=list)
    default: int = 200
    delay_s: float = 0.0
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while request_line := await reader.readline():
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                entry = self.script.pop(0) if self.script else self.default
                status, extra = entry if isinstance(entry, tuple) else (entry, {})
                path = request_line.decode("latin-1").split()[1]
                self.requests.append(Received(path, headers, body, status))
                if status == HANG:
                    await asyncio.sleep(3600)
                await asyncio.sleep(self.delay_s)
                lines = [f"HTTP/1.1 {status} Whatever", "content-length: 0"]
                lines += [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    def event_ids(self, path: str = "/hook") -> list[int]:
        return [int(r.headers["webhook-id"]) for r in self.requests if r.path == path]


class FakeClock:
    """Unix seconds that move only when told to."""

    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class FixedJitter(random.Random):
    """Draws the same fraction every time, so backoff delays are exact."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def random(self) -> float:
        return self.fraction


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(
        db_url, min_size=1, max_size=4, timeout=TIMEOUT_S, command_timeout=TIMEOUT_S
    )
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _enqueue(pool: asyncpg.Pool, n: int = 1) -> list[int]:
    """Commit ``n`` events in one transaction and return their ids."""
    async with pool.acquire() as conn, conn.transaction():
        return [
            await enqueue(conn, event_type="payment.captured", aggregate_id=f"pay_{i}",
                          payload={"amount": 1250 + i, "currency": "EUR"})
            for i in range(n)
        ]


async def _run_until(
    relays: list[OutboxRelay], done: Callable[[], Awaitable[bool]], deadline_s: float = 10.0
) -> None:
    """Run the relays' loops until ``done`` answers true, then stop them."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(stop)) for relay in relays]
    try:
        async with asyncio.timeout(deadline_s):
            while not await done():
                for task in tasks:
                    if task.done():
                        task.result()
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def _delivery(pool: asyncpg.Pool, event_id: int, subscriber: str = "a") -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT attempts, last_error, delivered_at, extract(epoch FROM next_attempt_at)::float8 "
        "AS next_attempt_s FROM outbox_deliveries WHERE event_id = $1 AND subscriber = $2",
        event_id, subscriber,
    )
    assert row is not None
    return row


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.delivered), (202, Verdict.delivered), (204, Verdict.delivered),
        (299, Verdict.delivered), (301, Verdict.retry), (400, Verdict.retry),
        (401, Verdict.retry), (404, Verdict.retry), (408, Verdict.retry),
        (410, Verdict.dead), (413, Verdict.dead), (422, Verdict.retry), (429, Verdict.retry),
        (500, Verdict.retry), (503, Verdict.retry),
    ],
)
def test_verdict_of_status(status: int, verdict: Verdict) -> None:
    """Only 2xx is delivered, only 410 and 413 are final failures, everything else retries."""
    assert verdict_of(status) is verdict


async def test_event_commits_and_rolls_back_with_the_state_change(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """An event and its deliveries exist exactly when the transaction that wrote them commits."""
    await set_subscribers(pool, {"a": receiver.url(), "b": receiver.url(), "c": receiver.url()})
    await set_subscribers(pool, {"a": receiver.url(), "b": receiver.url()})
    await pool.execute("CREATE TABLE test_state_changes (id text PRIMARY KEY)")

    async def capture(payment_id: str, *, commit: bool) -> None:
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("INSERT INTO test_state_changes VALUES ($1)", payment_id)
            await enqueue(conn, event_type="payment.captured", aggregate_id=payment_id,
                          payload={"payment": payment_id})
            await (tx.commit() if commit else tx.rollback())

    await capture("pay_rolled_back", commit=False)
    assert await pool.fetchval("SELECT count(*) FROM test_state_changes") == 0
    assert await pool.fetchval("SELECT count(*) FROM events") == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox_deliveries") == 0

    await capture("pay_committed", commit=True)
    assert await pool.fetchval("SELECT count(*) FROM test_state_changes") == 1
    events = await pool.fetch("SELECT aggregate_id, payload::text FROM events")
    assert [(e[0], json.loads(e[1])) for e in events] == [
        ("pay_committed", {"payment": "pay_committed"})
    ]
    subscribers = await pool.fetch("SELECT subscriber FROM outbox_deliveries ORDER BY 1")
    assert [r[0] for r in subscribers] == ["a", "b"]


async def test_enqueue_refuses_misuse(pool: asyncpg.Pool) -> None:
    """Outside a transaction, oversized, non-object or badly named events are refused."""
    async with pool.acquire() as conn:
        with pytest.raises(InvariantError):
            await enqueue(conn, event_type="payment.captured", aggregate_id="p", payload={})
        async with conn.transaction():
            event_id = await enqueue(conn, event_type="payment.captured", aggregate_id="p",
                                     payload=b'{"raw": true}')
        assert await conn.fetchval("SELECT payload FROM events WHERE id = $1", event_id) == (
            '{"raw": true}'
        )
        cases: list[tuple[type[Exception], str, str, dict[str, object] | bytes]] = [
            (PayloadTooLargeError, "payment.captured", "p", {"x": "y" * 70_000}),
            (asyncpg.CheckViolationError, "payment.captured", "p", b"[1, 2]"),
            (asyncpg.CheckViolationError, "Payment Captured", "p", {}),
            (asyncpg.CheckViolationError, "payment.captured", "", {}),
        ]
        for error, event_type, aggregate_id, payload in cases:
            with pytest.raises(error):
                async with conn.transaction():
                    await enqueue(conn, event_type=event_type, aggregate_id=aggregate_id,
                                  payload=payload)
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("UPDATE events SET aggregate_id = 'q'")
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("DELETE FROM events")
        assert await conn.fetchval("SELECT count(*) FROM events") == 1


async def test_delivery_is_signed(
    db_url: str, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """A delivery is a POST of the event JSON whose HMAC-SHA256 signature checks out by hand."""
    await set_subscribers(pool, {"a": receiver.url()})
    (event_id,) = await _enqueue(pool)
    before = await backlog(pool)
    assert before["undelivered"] == 1
    assert 0 <= before["oldest_undelivered_age_s"] < 5

    # From a DSN the relay opens (and closes) its own pool and HTTP client.
    async with OutboxRelay(db_url, signing_secret=SECRET, limits=FAST) as relay:
        assert await relay.run_once() == 1

    (request,) = receiver.requests
    headers, body = request.headers, request.body
    assert headers["webhook-id"] == str(event_id)
    assert headers["txproc-event-type"] == "payment.captured"
    assert headers["txproc-delivery-attempt"] == "1"
    assert headers["content-type"] == "application/json"
    timestamp_s = int(headers["webhook-timestamp"])
    assert abs(timestamp_s - time.time()) < 5
    mac = hmac.new(SECRET, f"{event_id}.{timestamp_s}.".encode() + body, hashlib.sha256)
    assert headers["webhook-signature"] == "v1," + base64.b64encode(mac.digest()).decode()
    envelope = json.loads(body)
    assert envelope["id"] == event_id
    assert envelope["type"] == "payment.captured"
    assert envelope["aggregate_id"] == "pay_0"
    assert envelope["data"] == {"amount": 1250, "currency": "EUR"}
    assert envelope["created_at"].endswith("Z")

    assert verify(SECRET, headers, body, now_s=time.time())
    assert not verify(SECRET, headers, body + b" ", now_s=time.time())
    assert not verify(b"another-secret-of-32-bytes-long!", headers, body, now_s=time.time())
    assert not verify(SECRET, headers, body, now_s=timestamp_s + 301)
    assert (await _delivery(pool, event_id))["delivered_at"] is not None
    assert await backlog(pool) == {
        "undelivered": 0, "parked": 0, "oldest_undelivered_age_s": 0.0, "dead_letters": 0
    }


async def test_retries_back_off_exponentially_up_to_the_cap(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """Each failure schedules the next attempt min(cap, base * 2**(n-1)) * jitter later."""
    await set_subscribers(pool, {"a": receiver.url()})
    (event_id,) = await _enqueue(pool)
    receiver.script = [500, 503, 502, 500, 500]
    clock = FakeClock(time.time() + 1)
    limits = _limits(backoff_base_s=1.0, backoff_cap_s=4.0)
    expected_delays_s = [0.5, 1.0, 2.0, 2.0, 2.0]
    async with OutboxRelay(pool, signing_secret=SECRET, limits=limits, clock=clock,
                           rng=FixedJitter(0.5)) as relay:
        for attempt, delay_s in enumerate(expected_delays_s, start=1):
            assert await relay.run_once() == 1
            row = await _delivery(pool, event_id)
            assert row["attempts"] == attempt
            assert row["next_attempt_s"] == pytest.approx(clock.now_s + delay_s, abs=1e-5)
            clock.now_s += delay_s - 0.01
            assert await relay.run_once() == 0, "not due before its delay"
            clock.now_s += 0.01
        assert await relay.run_once() == 1
    row = await _delivery(pool, event_id)
    assert row["attempts"] == 6
    assert row["delivered_at"] is not None
    assert row["last_error"] == "HTTP 500"
    assert [r.headers["txproc-delivery-attempt"] for r in receiver.requests] == [
        "1", "2", "3", "4", "5", "6"
    ]


async def test_retry_after_is_the_least_delay(pool: asyncpg.Pool, receiver: Receiver) -> None:
    """A 429 with Retry-After waits at least that long, even when the backoff is shorter."""
    await set_subscribers(pool, {"a": receiver.url()})
    (event_id,) = await _enqueue(pool)
    receiver.script = [(429, {"retry-after": "3"})]
    clock = FakeClock(time.time() + 1)
    limits = _limits(backoff_base_s=1.0, backoff_cap_s=60.0)
    async with OutboxRelay(pool, signing_secret=SECRET, limits=limits, clock=clock,
                           rng=FixedJitter(0.5)) as relay:
        assert await relay.run_once() == 1
    row = await _delivery(pool, event_id)
    assert row["next_attempt_s"] == pytest.approx(clock.now_s + 3.0, abs=1e-5)
    assert row["last_error"] == "HTTP 429"


async def test_a_retry_after_that_is_not_ascii_digits_is_ignored(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """``Retry-After: ²`` (a digit to str.isdigit(), not to float()) counts as absent: the
    delivery backs off as usual and the relay goes on."""
    await set_subscribers(pool, {"a": receiver.url()})
    (event_id,) = await _enqueue(pool)
    receiver.script = [(429, {"retry-after": "\u00b2"})]
    clock = FakeClock(time.time() + 1)
    limits = _limits(backoff_base_s=1.0, backoff_cap_s=60.0)
    async with OutboxRelay(pool, signing_secret=SECRET, limits=limits, clock=clock,
                           rng=FixedJitter(0.5)) as relay:
        assert await relay.run_once() == 1
    row = await _delivery(pool, event_id)
    assert row["last_error"] == "HTTP 429"
    assert clock.now_s < row["next_attempt_s"] < clock.now_s + 2.0


async def test_hanging_receiver_times_out_and_is_retried(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """A request that gets no answer fails after request_timeout_s and the retry delivers it."""
    await set_subscribers(pool, {"a": receiver.url()})
    (event_id,) = await _enqueue(pool)
    receiver.script = [HANG, 500]
    limits = _limits(request_timeout_s=0.3)
    started_s = time.monotonic()
    async with OutboxRelay(pool, signing_secret=SECRET, limits=limits) as relay:
        async def delivered() -> bool:
            return (await _delivery(pool, event_id))["delivered_at"] is not None

        await _run_until([relay], delivered)
    assert time.monotonic() - started_s >= 0.3
    assert [r.answer for r in receiver.requests] == [HANG, 500, 200]
    row = await _delivery(pool, event_id)
    assert row["attempts"] == 3
    assert relay.statistics().retried == 2
    assert relay.statistics().delivered == 1


async def test_exhausted_attempts_dead_letter_and_replay_delivers(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """After attempts_max failures a delivery is a counted dead letter; a replay delivers it."""
    await set_subscribers(pool, {"a": receiver.url()})
    first, second = await _enqueue(pool, 2)
    receiver.default = 500
    limits = _limits(attempts_max=3)
    async with OutboxRelay(pool, signing_secret=SECRET, limits=limits) as relay:
        async def both_dead() -> bool:
            return (await backlog(pool))["dead_letters"] == 2

        await _run_until([relay], both_dead)
        assert sorted(receiver.event_ids()) == [first] * 3 + [second] * 3
        counts = await backlog(pool)
        assert (counts["undelivered"], counts["dead_letters"]) == (0, 2)
        letters = await dlq_list(pool, 10)
        listed = sorted((d["event_id"], d["subscriber"], d["attempts"], d["last_error"])
                        for d in letters)
        assert listed == [(first, "a", 3, "HTTP 500"), (second, "a", 3, "HTTP 500")]
        assert await pool.fetchval("SELECT count(*) FROM outbox_deliveries") == 0

        receiver.default = 200
        async with pool.acquire() as conn:
            assert await dlq_replay(conn, [first]) == 1
            assert await dlq_replay(conn, [first]) == 0, "a replayed letter is not replayed again"
        counts = await backlog(pool)
        assert (counts["undelivered"], counts["dead_letters"]) == (1, 1)
        assert counts["oldest_undelivered_age_s"] > 0

        async def first_delivered() -> bool:
            return (await _delivery(pool, first))["delivered_at"] is not None

        await _run_until([relay], first_delivered)
        assert await dlq_replay(pool, None) == 1
        assert await dlq_replay(pool, None) == 0

        async def all_delivered() -> bool:
            return (await backlog(pool))["undelivered"] == 0

        await _run_until([relay], all_delivered)
    replayed = receiver.requests[6:]
    assert [(int(r.headers["webhook-id"]), r.headers["txproc-delivery-attempt"], r.answer)
            for r in replayed] == [(first, "1", 200), (second, "1", 200)]
    assert await backlog(pool) == {
        "undelivered": 0, "parked": 0, "oldest_undelivered_age_s": 0.0, "dead_letters": 0
    }
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 2
    assert relay.statistics().dead_lettered == 2


async def test_gone_dead_letters_at_once(pool: asyncpg.Pool, receiver: Receiver) -> None:
    """410 Gone is final: the delivery dies on its first attempt, nothing is retried."""
    await set_subscribers(pool, {"a": receiver.url()})
    (event_id,) = await _enqueue(pool)
    receiver.default = 410
    async with OutboxRelay(pool, signing_secret=SECRET, limits=FAST) as relay:
        assert await relay.run_once() == 1
        await asyncio.sleep(0.1)
        assert await relay.run_once() == 0
    assert len(receiver.requests) == 1
    (letter,) = await dlq_list(pool, 1)
    assert (letter["event_id"], letter["attempts"], letter["last_error"]) == (
        event_id, 1, "HTTP 410"
    )


async def test_deadline_dead_letters_before_attempts_run_out(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """A delivery still failing delivery_deadline_s after it was enqueued dies at that failure."""
    await set_subscribers(pool, {"a": receiver.url()})
    (event_id,) = await _enqueue(pool)
    receiver.default = 503
    clock = FakeClock(time.time() + 1)
    limits = _limits(delivery_deadline_s=30.0)
    async with OutboxRelay(pool, signing_secret=SECRET, limits=limits, clock=clock) as relay:
        assert await relay.run_once() == 1
        assert (await backlog(pool))["dead_letters"] == 0
        clock.now_s += 31
        assert await relay.run_once() == 1
    (letter,) = await dlq_list(pool, 1)
    assert (letter["event_id"], letter["attempts"]) == (event_id, 2)


async def test_crashed_relay_attempt_is_retried_after_its_lease(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """A relay dying mid-request keeps the delivery leased for lease_s, then it is sent again."""
    await set_subscribers(pool, {"a": receiver.url()})
    (event_id,) = await _enqueue(pool)
    receiver.script = [HANG]
    clock = FakeClock(time.time() + 1)
    limits = _limits(request_timeout_s=5.0, lease_s=40.0)
    async with OutboxRelay(pool, signing_secret=SECRET, limits=limits, clock=clock) as doomed:
        crashing = asyncio.create_task(doomed.run_once())
        async with asyncio.timeout(5):
            while not receiver.requests:
                await asyncio.sleep(0.01)
        crashing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await crashing
    async with OutboxRelay(pool, signing_secret=SECRET, limits=limits, clock=clock) as heir:
        clock.now_s += limits.lease_s - 0.01
        assert await heir.run_once() == 0, "leased to the crashed relay"
        clock.now_s += 0.01
        assert await heir.run_once() == 1
    assert [r.headers["txproc-delivery-attempt"] for r in receiver.requests] == ["1", "2"]
    assert (await _delivery(pool, event_id))["delivered_at"] is not None


async def test_two_relays_never_send_one_delivery_twice(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """Relays claiming concurrently with SKIP LOCKED split the work: each event arrives once."""
    await set_subscribers(pool, {"a": receiver.url()})
    event_ids = await _enqueue(pool, 300)
    receiver.delay_s = 0.002
    limits = _limits(batch_max=20, in_flight_max=5)
    async with (
        OutboxRelay(pool, signing_secret=SECRET, limits=limits) as one,
        OutboxRelay(pool, signing_secret=SECRET, limits=limits) as other,
    ):
        async def drained() -> bool:
            return (await backlog(pool))["undelivered"] == 0

        await _run_until([one, other], drained, deadline_s=15.0)
    counts = collections.Counter(receiver.event_ids())
    assert sorted(counts) == sorted(event_ids)
    assert set(counts.values()) == {1}
    assert one.statistics().claimed > 0
    assert other.statistics().claimed > 0
    assert one.statistics().claimed + other.statistics().claimed == len(event_ids)


async def test_inactive_subscriber_gets_nothing(pool: asyncpg.Pool, receiver: Receiver) -> None:
    """A deactivated subscriber gets no new deliveries and its pending ones are parked."""
    await set_subscribers(pool, {"a": receiver.url("/a"), "b": receiver.url("/b")})
    (before,) = await _enqueue(pool)
    await set_subscribers(pool, {"a": receiver.url("/a")})
    (after,) = await _enqueue(pool)
    async with OutboxRelay(pool, signing_secret=SECRET, limits=FAST) as relay:
        assert await relay.run_once() == 2
        assert await relay.run_once() == 0
    assert sorted(receiver.event_ids("/a")) == [before, after]
    assert receiver.event_ids("/b") == []
    assert (await backlog(pool))["parked"] == 1
    rows = await pool.fetch("SELECT event_id, subscriber FROM outbox_deliveries ORDER BY 1, 2")
    assert [tuple(r) for r in rows] == [(before, "a"), (before, "b"), (after, "a")]

    await set_subscribers(pool, {"a": receiver.url("/a"), "b": receiver.url("/b")})
    async with OutboxRelay(pool, signing_secret=SECRET, limits=FAST) as relay:
        assert await relay.run_once() == 1
    assert receiver.event_ids("/b") == [before]


async def test_relay_loop_outlives_an_unavailable_database(pg_admin_url: str) -> None:
    """While the database cannot be reached the loop counts the errors and keeps polling."""
    missing = database_url_with_name(pg_admin_url, "txproc_outbox_no_such_database")
    stop = asyncio.Event()
    async with OutboxRelay(missing, signing_secret=SECRET, limits=FAST) as relay:
        loop = asyncio.create_task(relay.run(stop))
        async with asyncio.timeout(5):
            while relay.statistics().database_errors < 2:
                assert not loop.done()
                await asyncio.sleep(0.01)
        stop.set()
        await loop
    assert relay.statistics().claimed == 0


async def test_set_subscribers_refuses_bad_configuration(pool: asyncpg.Pool) -> None:
    """A URL that is not http(s) or a name needing quotes is refused, and nothing is written."""
    with pytest.raises(ValueError, match="http"):
        await set_subscribers(pool, {"a": "ftp://example.org/x"})
    for url in ("not a url", "http:///no-host", "http://exa mple.org/\x00"):
        with pytest.raises(ValueError, match="http"):
            await set_subscribers(pool, {"a": url})
    with pytest.raises(asyncpg.CheckViolationError):
        await set_subscribers(pool, {"Not Valid": "http://example.org/x"})
    assert await pool.fetchval("SELECT count(*) FROM event_subscribers") == 0


@pytest.mark.parametrize(
    "limits",
    [
        {"in_flight_max": 0},
        {"in_flight_max": 60, "batch_max": 50},
        {"attempts_max": 0},
        {"backoff_base_s": 0.0},
        {"backoff_base_s": 2.0, "backoff_cap_s": 1.0},
        {"request_timeout_s": 0.0},
        {"poll_interval_s": 0.0},
        {"lease_s": 5.0},
    ],
)
def test_contradicting_limits_are_refused(limits: dict[str, float]) -> None:
    """Zero never means unbounded, and the lease must outlast a whole batch of requests."""
    with pytest.raises(ValueError, match="relay limits break the rule"):
        _limits(**limits)
