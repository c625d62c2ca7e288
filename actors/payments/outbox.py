"""The transactional outbox of payment events: written with the state change, sent at least once.

Writing. ``enqueue`` runs inside the caller's open transaction, so the event and one delivery
row per active subscriber that wants it commit or roll back together with the state change
they report. Operators' subscribers (``txproc serve --event-subscriber``) want every event;
a tenant's webhook endpoint (``POST /v1/webhook_endpoints``) wants the events of that
tenant's payments and payouts, of the types it names.
No event is ever sent for a change that did not commit, and none is lost for one that did.

Sending. An ``OutboxRelay`` claims a batch of due deliveries with ``FOR UPDATE SKIP LOCKED``
and, in the same statement, counts the attempt and pushes ``next_attempt_at`` to the end of a
lease (``lease_s``); then it commits and posts the batch, at most ``in_flight_max`` requests at
once. Other relays skip the locked rows while the claim runs and find them not due afterwards,
so two relays never send the same delivery at the same time. A relay that dies mid-batch
leaves its deliveries to be claimed again when the lease ends: a crash costs one attempt,
so a delivery that crashes the relay still ends in the dead-letter table. Results are written
fenced on the attempt number, so a relay that outlived its lease cannot overwrite the outcome
of a newer attempt. Delivery is at least once: a crash between a consumer's 2xx and our
commit sends that event again, and consumers deduplicate on ``webhook-id``.

The request. ``POST`` of the JSON envelope ``{"id", "type", "aggregate_id", "created_at",
"data"}`` (``EventEnvelope``) to the subscriber's URL, redirects not followed, with the headers
of the Standard Webhooks specification:

- ``webhook-id``: the event id in decimal, the same on every attempt and for every subscriber;
- ``webhook-timestamp``: when this attempt was signed, integer Unix seconds;
- ``webhook-signature``: ``v1,`` then base64 of HMAC-SHA256 over
  ``f"{webhook-id}.{webhook-timestamp}."`` followed by the exact body bytes, keyed with the
  subscriber's secret: a tenant's webhook endpoint has its own (actors/payments/
  webhook_endpoints.py), an operator's subscriber uses the relay's (raw bytes; a Standard
  Webhooks library wants them as ``"whsec_" + base64(secret)``, the form an endpoint's
  secret is shown in). Consumers should reject a timestamp more than five minutes
  from their clock (``verify`` does);
- ``txproc-event-type``: the event type, to route without parsing the body;
- ``txproc-delivery-attempt``: 1 for the first attempt, 2 for the second, and so on.

Outcomes, decided by ``verdict_of`` and ``OutboxRelay``:

- any 2xx: delivered;
- 410 Gone and 413 Content Too Large: dead-lettered at once. 410 is the consumer saying the
  endpoint will never take events again; 413 means these exact bytes will always be too big.
  Neither improves with retries, and an operator can replay both after a fix;
- every other status (other 4xx included: 400/401/403/404 are most often a deploy or a
  credential being fixed right now), a timeout after ``request_timeout_s`` and a transport
  error: retried after a delay drawn uniformly from ``[0, min(backoff_cap_s, backoff_base_s *
  2 ** (failures - 1))]`` (exponential backoff with full jitter). On 429 and 503 a
  ``Retry-After`` in seconds, capped at ``backoff_cap_s``, is the least delay;
- after ``attempts_max`` failed attempts, or once ``delivery_deadline_s`` has passed since the
  delivery was enqueued (or replayed), the delivery moves to ``dead_letters`` in one
  statement that deletes it from ``outbox_deliveries``.

Subscribers that are deactivated get no new deliveries; their pending ones are parked (not
sent, counted apart by ``backlog``) until they are active again. ``dlq_replay`` puts dead
letters back as due now with attempts and deadline reset.

Clocks: ``enqueue`` and ``dlq_replay`` stamp rows with the database's ``now()``; the relay
compares and schedules with its injected clock. A relay clock behind the database's delays
deliveries by the difference, and never loses one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import hashlib
import hmac
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import msgspec

from processor.payments import backoff_s
from processor.types import require

__all__ = [
    "ENDPOINT_NAME_PREFIX",
    "HEADER_ATTEMPT",
    "HEADER_EVENT_ID",
    "HEADER_EVENT_TYPE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "PAYLOAD_BYTES_MAX",
    "PERMANENT_STATUSES",
    "EventEnvelope",
    "OutboxRelay",
    "PayloadTooLargeError",
    "RelayLimits",
    "RelayStatistics",
    "Verdict",
    "backlog",
    "dlq_list",
    "dlq_replay",
    "enqueue",
    "event_ctes",
    "event_payload",
    "set_subscribers",
    "sign",
    "verdict_of",
    "verify",
]

log = logging.getLogger("txproc.outbox")

HEADER_EVENT_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"
HEADER_EVENT_TYPE = "txproc-event-type"
HEADER_ATTEMPT = "txproc-delivery-attempt"

# An event is a notification, not a document: the consumer fetches details it needs.
PAYLOAD_BYTES_MAX = 64 * 1024
SUBSCRIBERS_MAX = 100
# Tenants' webhook endpoints are subscribers named by their ids (actors/payments/
# webhook_endpoints.py); operators' names may not start so.
ENDPOINT_NAME_PREFIX = "we_"
SIGNING_SECRET_BYTES_MIN = 16
DLQ_LIST_MAX = 1000
ERROR_CHARS_MAX = 200
SIGNATURE_TOLERANCE_S = 300
STATEMENT_TIMEOUT_S = 10.0
# Replaying every dead letter is one statement over possibly many rows.
REPLAY_TIMEOUT_S = 120.0
POOL_CONNECT_TIMEOUT_S = 10.0

# Statuses after which retrying cannot help; see the module docstring.
PERMANENT_STATUSES = frozenset({410, 413})
# Statuses whose Retry-After header the relay honours.
RETRY_AFTER_STATUSES = frozenset({429, 503})

# What a relay survives in its loop: the database or the network to it being away for a
# while. Anything else is a bug and ends the loop.
DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PayloadTooLargeError(ValueError):
    """An event payload encodes to more than ``PAYLOAD_BYTES_MAX`` bytes."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(f"event payload is {size_bytes} bytes; at most {PAYLOAD_BYTES_MAX}")
        self.size_bytes = size_bytes


class EventEnvelope(msgspec.Struct, frozen=True):
    """The body of every delivery. ``data`` is the payload given to ``enqueue``, as stored."""

    id: int
    type: str
    aggregate_id: str
    created_at: datetime
    data: msgspec.Raw


_JSON_ENCODER = msgspec.json.Encoder()


class RelayLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The relay's limits; the defaults suit production, tests pass small ones.

    Raises ``ValueError`` naming the broken rule when the limits contradict each other.
    """

    batch_max: int = 100
    in_flight_max: int = 16
    attempts_max: int = 8
    backoff_base_s: float = 5.0
    backoff_cap_s: float = 900.0
    delivery_deadline_s: float = 86_400.0
    request_timeout_s: float = 10.0
    # Covers the claim, every request of a batch (ceil(batch_max / in_flight_max) rounds of
    # request_timeout_s) and the write of the results.
    lease_s: float = 300.0
    poll_interval_s: float = 1.0
    statement_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        # In order: the lease rule divides by in_flight_max, checked first.
        rules: list[tuple[Callable[[], bool], str]] = [
            (lambda: 0 < self.in_flight_max <= self.batch_max <= 10_000,
             "0 < in_flight_max <= batch_max <= 10000"),
            (lambda: 1 <= self.attempts_max <= 100, "1 <= attempts_max <= 100"),
            (lambda: 0 < self.backoff_base_s <= self.backoff_cap_s,
             "0 < backoff_base_s <= backoff_cap_s"),
            (lambda: self.delivery_deadline_s > 0, "delivery_deadline_s > 0"),
            (lambda: self.request_timeout_s > 0, "request_timeout_s > 0"),
            (lambda: self.poll_interval_s > 0, "poll_interval_s > 0"),
            (lambda: self.statement_timeout_s > 0, "statement_timeout_s > 0"),
            (lambda: self.lease_s > (self.rounds * self.request_timeout_s
                                     + 2 * self.statement_timeout_s),
             "lease_s > ceil(batch_max / in_flight_max) * request_timeout_s"
             " + 2 * statement_timeout_s"),
        ]
        for holds, rule in rules:
            if not holds():
                raise ValueError(f"relay limits break the rule {rule}")

    @property
    def rounds(self) -> int:
        """How many waves of requests a full batch takes at most."""
        return math.ceil(self.batch_max / self.in_flight_max)


class RelayStatistics(msgspec.Struct, frozen=True):
    """Counts since the relay was built, for metrics."""

    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    database_errors: int = 0


class Verdict(enum.Enum):
    delivered = "delivered"
    retry = "retry"
    dead = "dead"


def verdict_of(status: int) -> Verdict:
    """What an HTTP status from a subscriber means for its delivery."""
    if 200 <= status <= 299:
        return Verdict.delivered
    if status in PERMANENT_STATUSES:
        return Verdict.dead
    return Verdict.retry


def sign(secret: bytes, event_id: int, timestamp_s: int, body: bytes) -> str:
    """The ``webhook-signature`` value of ``body`` sent as event ``event_id`` at ``timestamp_s``."""
    signed = f"{event_id}.{timestamp_s}.".encode("ascii") + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify(
    secret: bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now_s: float,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
) -> bool:
    """Tell whether a delivery's headers carry a valid, fresh signature of ``body``.

    For consumers and tests. ``headers`` must look names up case-insensitively (as httpx and
    Starlette headers do) or use the lower-case names.
    """
    try:
        event_id = int(headers[HEADER_EVENT_ID])
        timestamp_s = int(headers[HEADER_TIMESTAMP])
        offered = headers[HEADER_SIGNATURE].split()
    except (KeyError, ValueError):
        return False
    if abs(now_s - timestamp_s) > tolerance_s:
        return False
    expected = sign(secret, event_id, timestamp_s, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in offered)


# -- writing --------------------------------------------------------------------------------

# One delivery per active subscriber that wants the event: every operator subscriber
# (tenant NULL), and the endpoints of the tenant whose payment, payout or dispute the event is about
# (the slot in front of its principal, as GET /v1/events decides it) that take its type.
_ENQUEUE_SQL = """
WITH event AS (
    INSERT INTO events (event_type, aggregate_id, payload)
    VALUES ($1, $2, $3::jsonb)
    RETURNING id
), owner AS (
    SELECT split_part(principal, '/', 1) AS tenant FROM payments WHERE id = $2
    UNION ALL
    SELECT split_part(principal, '/', 1) FROM payouts WHERE id = $2
    UNION ALL
    SELECT split_part(principal, '/', 1) FROM disputes WHERE id = $2
    LIMIT 1
), deliveries AS (
    INSERT INTO outbox_deliveries (event_id, subscriber)
    SELECT event.id, s.name FROM event, event_subscribers s
    WHERE s.active
      AND (s.tenant IS NULL OR s.tenant = (SELECT tenant FROM owner))
      AND (s.event_types IS NULL OR $1 = ANY (s.event_types))
)
SELECT id FROM event
"""


def event_ctes(*, event_type: str, aggregate_id: str, payload: str, tenant: str,
               gate: str) -> str:
    """Two CTEs, for a caller's one-statement write, that add an event and its deliveries
    as ``enqueue`` does: written once if the CTE named ``gate`` yields a row, not at all
    otherwise. The arguments name the statement's parameters (``"$7"``); ``tenant`` is
    the tenant of the object the event is about, given rather than looked up because a
    row the same statement inserts is not visible to its other parts. The payload comes
    from ``event_payload``, which keeps the size limit."""
    # The arguments are SQL the caller writes (parameter names, a CTE name), never data.
    return (
        f"event AS (INSERT INTO events (event_type, aggregate_id, payload) "  # noqa: S608
        f"SELECT {event_type}::text, {aggregate_id}::text, {payload}::jsonb "
        f"FROM (SELECT 1 FROM {gate} LIMIT 1) AS gated RETURNING id), "
        f"deliveries AS (INSERT INTO outbox_deliveries (event_id, subscriber) "
        f"SELECT event.id, s.name FROM event, event_subscribers s WHERE s.active "
        f"AND (s.tenant IS NULL OR s.tenant = {tenant}::text) "
        f"AND (s.event_types IS NULL OR {event_type}::text = ANY (s.event_types)))")


def event_payload(payload: dict[str, Any]) -> str:
    """An event's payload as ``event_ctes`` takes it; ``PayloadTooLargeError`` beyond
    ``PAYLOAD_BYTES_MAX``."""
    encoded = _JSON_ENCODER.encode(payload)
    if len(encoded) > PAYLOAD_BYTES_MAX:
        raise PayloadTooLargeError(len(encoded))
    return encoded.decode("utf-8")


async def enqueue(
    conn: asyncpg.Connection,
    *,
    event_type: str,
    aggregate_id: str,
    payload: dict[str, Any] | bytes,
) -> int:
    """Write an event and its deliveries in the caller's open transaction; return the event id.

    ``payload`` is a JSON object: a dict, or its UTF-8 JSON encoding. Raises
    ``PayloadTooLargeError`` beyond ``PAYLOAD_BYTES_MAX``, ``processor.ledger.rules.InvariantError``
    if ``conn`` has no open transaction (the event would not be atomic with the change it
    reports), and ``asyncpg.CheckViolationError`` for an event type not shaped like
    ``payment.captured``, an empty or over-long aggregate id, or a payload that is not a
    JSON object (``asyncpg.DataError`` if it is no JSON at all).
    """
    require(conn.is_in_transaction(), "enqueue runs in the transaction of the state change")
    encoded = payload if isinstance(payload, bytes) else _JSON_ENCODER.encode(payload)
    if len(encoded) > PAYLOAD_BYTES_MAX:
        raise PayloadTooLargeError(len(encoded))
    event_id = await conn.fetchval(
        _ENQUEUE_SQL, event_type, aggregate_id, encoded.decode("utf-8"),
        timeout=STATEMENT_TIMEOUT_S,
    )
    return int(event_id)


def _check_subscriber(name: str, url: str) -> None:
    if name.startswith(ENDPOINT_NAME_PREFIX):
        raise ValueError(f"subscriber {name!r}: names starting with {ENDPOINT_NAME_PREFIX!r} "
                         "are the ids of tenants' webhook endpoints")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = httpx.URL("")
    if parsed.scheme not in ("http", "https") or not parsed.host:
        # The URL itself stays out of the message: it may carry a token.
        raise ValueError(f"subscriber {name!r}: the URL must be http:// or https:// with a host")


@contextlib.asynccontextmanager
async def _connection(db: asyncpg.Pool | asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db


async def set_subscribers(
    db: asyncpg.Pool | asyncpg.Connection, subscribers: dict[str, str]
) -> None:
    """Make ``subscribers`` (name -> URL) the active operator subscribers: upsert them,
    deactivate the other operator subscribers. Tenants' webhook endpoints are not touched.

    Deactivated subscribers keep their rows (deliveries refer to them) and get no new events.
    Raises ``ValueError`` for more than ``SUBSCRIBERS_MAX`` subscribers, a name that is a
    webhook endpoint's (``we_...``) or a URL that is not http(s) with a host, and
    ``asyncpg.CheckViolationError`` for a name not matching ``[a-z0-9][a-z0-9_.-]{0,62}``.
    """
    if len(subscribers) > SUBSCRIBERS_MAX:
        raise ValueError(f"{len(subscribers)} subscribers; at most {SUBSCRIBERS_MAX}")
    for name, url in subscribers.items():
        _check_subscriber(name, url)
    names = sorted(subscribers)
    async with _connection(db) as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO event_subscribers (name, url) "
            "SELECT * FROM unnest($1::text[], $2::text[]) "
            "ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url, active = true, "
            "updated_at = now() WHERE event_subscribers.tenant IS NULL "
            "AND (event_subscribers.url <> EXCLUDED.url OR NOT event_subscribers.active)",
            names, [subscribers[n] for n in names],
            timeout=STATEMENT_TIMEOUT_S,
        )
        await conn.execute(
            "UPDATE event_subscribers SET active = false, updated_at = now() "
            "WHERE active AND tenant IS NULL AND NOT (name = ANY($1::text[]))",
            names,
            timeout=STATEMENT_TIMEOUT_S,
        )


# -- operating ------------------------------------------------------------------------------

_BACKLOG_SQL = """
SELECT count(*) FILTER (WHERE s.active) AS undelivered,
       count(*) FILTER (WHERE NOT s.active) AS parked,
       coalesce(extract(epoch FROM clock_timestamp() - min(e.created_at) FILTER (WHERE s.active)),
                0)::float8 AS oldest_undelivered_age_s
FROM outbox_deliveries d
JOIN event_subscribers s ON s.name = d.subscriber
JOIN events e ON e.id = d.event_id
WHERE d.delivered_at IS NULL
"""


async def backlog(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, int | float]:
    """Counts for metrics.

    ``undelivered``: deliveries to active subscribers not delivered yet (in flight included);
    ``parked``: the same for deactivated subscribers; ``oldest_undelivered_age_s``: seconds
    since the oldest event with an undelivered delivery to an active subscriber was written
    (0 without one); ``dead_letters``: dead letters not replayed.
    """
    row = await conn.fetchrow(_BACKLOG_SQL, timeout=STATEMENT_TIMEOUT_S)
    dead = await conn.fetchval(
        "SELECT count(*) FROM dead_letters l JOIN event_subscribers s ON s.name = l.subscriber "
        "WHERE l.replayed_at IS NULL AND s.removed_at IS NULL", timeout=STATEMENT_TIMEOUT_S
    )
    return {
        "undelivered": int(row["undelivered"]),
        "parked": int(row["parked"]),
        "oldest_undelivered_age_s": max(0.0, float(row["oldest_undelivered_age_s"])),
        "dead_letters": int(dead),
    }


async def dlq_list(conn: asyncpg.Connection | asyncpg.Pool, limit: int) -> list[dict[str, Any]]:
    """The oldest ``limit`` dead letters not replayed, oldest first (those of a removed
    webhook endpoint are history: not listed, counted or replayed).

    Each has ``id``, ``event_id``, ``subscriber``, ``event_type``, ``aggregate_id``,
    ``attempts``, ``last_error`` and ``dead_at`` (an aware datetime). Raises ``ValueError``
    unless ``1 <= limit <= DLQ_LIST_MAX``.
    """
    if not 1 <= limit <= DLQ_LIST_MAX:
        raise ValueError(f"limit must be between 1 and {DLQ_LIST_MAX}, not {limit}")
    rows = await conn.fetch(
        "SELECT l.id, l.event_id, l.subscriber, e.event_type, e.aggregate_id, l.attempts, "
        "l.last_error, l.dead_at FROM dead_letters l JOIN events e ON e.id = l.event_id "
        "JOIN event_subscribers s ON s.name = l.subscriber "
        "WHERE l.replayed_at IS NULL AND s.removed_at IS NULL ORDER BY l.id LIMIT $1",
        limit,
        timeout=STATEMENT_TIMEOUT_S,
    )
    return [dict(row) for row in rows]


_REPLAY_SQL = """
WITH replayed AS (
    UPDATE dead_letters SET replayed_at = clock_timestamp()
    WHERE replayed_at IS NULL AND ($1::bigint[] IS NULL OR event_id = ANY($1::bigint[]))
      AND subscriber NOT IN (SELECT name FROM event_subscribers WHERE removed_at IS NOT NULL)
    RETURNING event_id, subscriber
), requeued AS (
    INSERT INTO outbox_deliveries (event_id, subscriber)
    SELECT event_id, subscriber FROM replayed
    ON CONFLICT (event_id, subscriber) DO NOTHING
)
SELECT count(*) FROM replayed
"""


async def dlq_replay(conn: asyncpg.Connection | asyncpg.Pool, event_ids: list[int] | None) -> int:
    """Put dead letters back as due now, attempts and deadline reset; return how many.

    ``event_ids`` selects the dead letters of those events (every subscriber's); None selects
    all not yet replayed. Each is marked replayed in the same statement, so replaying twice
    sends once. A replay to a deactivated subscriber is parked until it is active again.
    """
    replayed = await conn.fetchval(_REPLAY_SQL, event_ids, timeout=REPLAY_TIMEOUT_S)
    return int(replayed)


# -- sending --------------------------------------------------------------------------------

# Claims the due deliveries of active subscribers, counts the attempt and leases them until
# $3 seconds from now, in one statement. Rows another relay is claiming are skipped; rows it
# claimed are re-checked after its commit and are no longer due.
_CLAIM_SQL = """
WITH due AS (
    SELECT d.event_id, d.subscriber
    FROM outbox_deliveries d
    JOIN event_subscribers s ON s.name = d.subscriber
    WHERE d.delivered_at IS NULL AND d.next_attempt_at <= to_timestamp($1::float8) AND s.active
    ORDER BY d.next_attempt_at
    LIMIT $2
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE outbox_deliveries d
SET attempts = d.attempts + 1,
    last_attempt_at = to_timestamp($1::float8),
    next_attempt_at = to_timestamp($1::float8 + $3::float8)
FROM due, events e, event_subscribers s
WHERE d.event_id = due.event_id AND d.subscriber = due.subscriber
  AND e.id = d.event_id AND s.name = d.subscriber
RETURNING d.event_id, d.subscriber, d.attempts, extract(epoch FROM d.enqueued_at)::float8
          AS enqueued_s, s.url, s.secret, e.event_type, e.aggregate_id,
          e.payload::text AS payload, e.created_at
"""

_DELIVERED_SQL = """
UPDATE outbox_deliveries d SET delivered_at = to_timestamp($3::float8)
FROM unnest($1::bigint[], $2::text[]) AS r(event_id, subscriber)
WHERE d.event_id = r.event_id AND d.subscriber = r.subscriber AND d.delivered_at IS NULL
"""

_RETRY_SQL = """
UPDATE outbox_deliveries d SET next_attempt_at = to_timestamp(r.due_s), last_error = r.error
FROM unnest($1::bigint[], $2::text[], $3::int[], $4::float8[], $5::text[])
     AS r(event_id, subscriber, attempts, due_s, error)
WHERE d.event_id = r.event_id AND d.subscriber = r.subscriber AND d.attempts = r.attempts
  AND d.delivered_at IS NULL
"""

_DEAD_SQL = """
WITH moved AS (
    DELETE FROM outbox_deliveries d
    USING unnest($1::bigint[], $2::text[], $3::int[], $4::text[])
          AS r(event_id, subscriber, attempts, error)
    WHERE d.event_id = r.event_id AND d.subscriber = r.subscriber AND d.attempts = r.attempts
      AND d.delivered_at IS NULL
    RETURNING d.event_id, d.subscriber, d.attempts, r.error
)
INSERT INTO dead_letters (event_id, subscriber, attempts, last_error, dead_at)
SELECT event_id, subscriber, attempts, error, to_timestamp($5::float8) FROM moved
"""


class _Attempt(msgspec.Struct, frozen=True):
    """What one request came to."""

    verdict: Verdict
    error: str | None = None
    retry_after_s: float = 0.0


def _retry_after_s(response: httpx.Response) -> float:
    """The Retry-After header in seconds, 0 when absent or an HTTP date (not honoured)."""
    value = response.headers.get("retry-after", "").strip()
    # ASCII digits only: str.isdigit() also accepts "²", which float() refuses.
    return float(value) if value.isascii() and value.isdigit() else 0.0


class OutboxRelay:
    """Sends due deliveries; see the module docstring for the protocol and the policy.

    ``db`` is a pool (not closed by the relay) or a DSN (the relay opens a small pool and
    closes it in ``close``); ``client`` likewise (a client the relay creates reads no
    environment and follows no redirects). ``clock`` returns Unix seconds; ``rng`` draws
    the jitter. Usable as ``async with``.
    """

    def __init__(
        self,
        db: asyncpg.Pool | str,
        *,
        signing_secret: bytes,
        limits: RelayLimits,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if len(signing_secret) < SIGNING_SECRET_BYTES_MIN:
            raise ValueError(f"the signing secret needs {SIGNING_SECRET_BYTES_MIN}+ bytes")
        self._limits = limits
        self._secret = signing_secret
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not a secret
        self._dsn = db if isinstance(db, str) else None
        self._pool: asyncpg.Pool | None = None if isinstance(db, str) else db
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(
            timeout=httpx.Timeout(limits.request_timeout_s),
            limits=httpx.Limits(max_connections=limits.in_flight_max),
            follow_redirects=False,
            trust_env=False,
        )
        self._in_flight = asyncio.Semaphore(limits.in_flight_max)
        self._statistics = RelayStatistics()

    @property
    def limits(self) -> RelayLimits:
        return self._limits

    def statistics(self) -> RelayStatistics:
        return self._statistics

    async def __aenter__(self) -> OutboxRelay:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pool and the client if the relay made them."""
        if self._owns_client:
            await self._client.aclose()
        if self._dsn is not None and self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _ready_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            require(self._dsn is not None, "a relay has a pool or a DSN")
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=2, timeout=POOL_CONNECT_TIMEOUT_S,
                command_timeout=self._limits.statement_timeout_s,
            )
        return self._pool

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``stop`` is set, pausing ``poll_interval_s`` whenever a batch is short.

        A database or network error is logged and the loop goes on after the pause; any other
        exception is a bug and ends it. A batch in progress when ``stop`` is set finishes.
        """
        while not stop.is_set():
            try:
                claimed = await self.run_once()
            except DATABASE_ERRORS as exc:
                self._count(database_errors=1)
                log.warning("outbox relay: database unavailable (%s)", type(exc).__name__)
                claimed = 0
            if claimed < self._limits.batch_max:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._limits.poll_interval_s)

    async def run_once(self) -> int:
        """Claim up to ``batch_max`` due deliveries, send them, record the outcomes.

        Returns how many were claimed (each one attempt). Raises the ``asyncpg`` or ``OSError``
        of an unavailable database; deliveries claimed before such an error are sent again
        when their lease ends.
        """
        limits = self._limits
        pool = await self._ready_pool()
        claims = await pool.fetch(
            _CLAIM_SQL, self._clock(), limits.batch_max, limits.lease_s,
            timeout=limits.statement_timeout_s,
        )
        if not claims:
            return 0
        self._count(claimed=len(claims))
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._send(claim)) for claim in claims]
        attempts = [task.result() for task in tasks]
        await self._record(pool, claims, attempts)
        return len(claims)

    async def _send(self, claim: asyncpg.Record) -> _Attempt:
        timeout_s = self._limits.request_timeout_s
        body = _JSON_ENCODER.encode(EventEnvelope(
            id=claim["event_id"], type=claim["event_type"], aggregate_id=claim["aggregate_id"],
            created_at=claim["created_at"], data=msgspec.Raw(claim["payload"].encode("utf-8")),
        ))
        # A tenant's endpoint has a key of its own; an operator's subscriber the relay's.
        secret = self._secret if claim["secret"] is None else bytes(claim["secret"])
        async with self._in_flight:
            timestamp_s = int(self._clock())
            headers = {
                "content-type": "application/json",
                HEADER_EVENT_ID: str(claim["event_id"]),
                HEADER_TIMESTAMP: str(timestamp_s),
                HEADER_SIGNATURE: sign(secret, claim["event_id"], timestamp_s, body),
                HEADER_EVENT_TYPE: claim["event_type"],
                HEADER_ATTEMPT: str(claim["attempts"]),
            }
            try:
                # httpx's timeout bounds each phase; this bounds the whole exchange.
                async with asyncio.timeout(timeout_s):
                    response = await self._client.post(
                        claim["url"], content=body, headers=headers,
                        timeout=httpx.Timeout(timeout_s), follow_redirects=False,
                    )
            except (TimeoutError, httpx.TimeoutException):
                return _Attempt(Verdict.retry, f"timed out after {timeout_s:g} s")
            except httpx.HTTPError as exc:
                # The class only: messages can carry host names or URLs.
                return _Attempt(Verdict.retry, f"transport error {type(exc).__name__}")
        verdict = verdict_of(response.status_code)
        if verdict is Verdict.delivered:
            return _Attempt(verdict)
        retry_after_s = (
            _retry_after_s(response) if response.status_code in RETRY_AFTER_STATUSES else 0.0
        )
        return _Attempt(verdict, f"HTTP {response.status_code}", retry_after_s)

    async def _record(
        self, pool: asyncpg.Pool, claims: list[asyncpg.Record], attempts: list[_Attempt]
    ) -> None:
        require(len(claims) == len(attempts), "every claimed delivery has one outcome")
        limits = self._limits
        now_s = self._clock()
        delivered: list[asyncpg.Record] = []
        retries: list[tuple[asyncpg.Record, float, str]] = []
        dead: list[tuple[asyncpg.Record, str]] = []
        for claim, attempt in zip(claims, attempts, strict=True):
            if attempt.verdict is Verdict.delivered:
                delivered.append(claim)
                continue
            error = (attempt.error or "failed")[:ERROR_CHARS_MAX]
            past_deadline = now_s - claim["enqueued_s"] >= limits.delivery_deadline_s
            if (attempt.verdict is Verdict.dead or claim["attempts"] >= limits.attempts_max
                    or past_deadline):
                dead.append((claim, error))
                continue
            # The one backoff policy of payments: capped exponential, full jitter.
            delay_s = backoff_s(
                claim["attempts"], base_s=limits.backoff_base_s, cap_s=limits.backoff_cap_s,
                rng=self._rng,
            )
            delay_s = max(delay_s, min(attempt.retry_after_s, limits.backoff_cap_s))
            retries.append((claim, now_s + delay_s, error))
        timeout_s = limits.statement_timeout_s
        async with pool.acquire() as conn, conn.transaction():
            if delivered:
                await conn.execute(
                    _DELIVERED_SQL, [c["event_id"] for c in delivered],
                    [c["subscriber"] for c in delivered], now_s, timeout=timeout_s,
                )
            if retries:
                await conn.execute(
                    _RETRY_SQL, [c["event_id"] for c, _, _ in retries],
                    [c["subscriber"] for c, _, _ in retries],
                    [c["attempts"] for c, _, _ in retries], [due for _, due, _ in retries],
                    [e for _, _, e in retries], timeout=timeout_s,
                )
            if dead:
                await conn.execute(
                    _DEAD_SQL, [c["event_id"] for c, _ in dead], [c["subscriber"] for c, _ in dead],
                    [c["attempts"] for c, _ in dead], [e for _, e in dead], now_s,
                    timeout=timeout_s,
                )
        for claim, error in dead:
            log.warning(
                "outbox: event %d to %s dead-lettered after %d attempts (%s)",
                claim["event_id"], claim["subscriber"], claim["attempts"], error,
            )
        self._count(delivered=len(delivered), retried=len(retries), dead_lettered=len(dead))

    def _count(self, **increments: int) -> None:
        current = self._statistics
        self._statistics = msgspec.structs.replace(
            current, **{k: getattr(current, k) + v for k, v in increments.items()}
        )
