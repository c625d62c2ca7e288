"""A provider's adapter actor: one per payment provider, owning that connection's resilience.

The adapter (``adapters/<provider>.py``) translates; ``ProviderClient`` sends. It bounds
every call by the provider's SLA timeout, retries only calls that carry an idempotency key
(all of them do: the saga sets one per step) with capped exponential backoff and full
jitter, within both ``attempts_max`` and a deadline, keeps a circuit breaker over the
provider's failure rate (one probe when half open) and a bulkhead on calls in flight
(beyond it, fail fast). It never raises for what a provider did: every call ends in a
``ProviderReply`` whose ``outcome`` the saga acts on.

Each provider's client runs in an actor of its own (``ProviderActor``), so adapter code
that crashes or a provider that hangs touches only that provider, and one breaker per
provider is shared by every caller. The payments engine reaches it over the data-plane
channel (``ProviderLink``, ``actors.channel``), not by a Ray call: a Ray call cost about a
millisecond of CPU on each side, more than the HTTP exchange itself; Ray stays the control
plane (placement, restarts, ``endpoint``, ``info``).

HTTP goes through aiohttp: measured on this machine at about a tenth of httpx's CPU per
call (110 against 1,500 µs), which had been most of what a provider call cost
(docs/design.md §14, "Where an authorization's CPU goes").
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import ray
import yarl

from actors.channel import ChannelClient, ChannelServer
from actors.names import NAMESPACE
from actors.ops import metrics, telemetry
from actors.priority import lower_priority
from adapters.base import Adapter, HttpCall, ProviderError, error_from_transport
from processor.config import ObservabilityConfig
from processor.payments import (
    BreakerConfig,
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    Outcome,
    ProviderReply,
    ProviderRequest,
    RetryPolicy,
    next_delay_s,
)

__all__ = ["ProviderActor", "ProviderClient", "ProviderConfig", "ProviderLink",
           "make_provider", "provider_actor_name"]

log = logging.getLogger("txproc.provider")


class ProviderConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    base_url: str
    secrets_file: str
    calls_in_flight_max: int = 64
    connect_timeout_s: float = 0.5
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerConfig = BreakerConfig()
    # Pooled HTTP connections to the provider (keep-alive), at least the calls in flight.
    connections_max: int = 64
    # Yield the CPU to the ledger on a shared node (actors/priority.py); 0: no.
    cpu_nice: int = 0


def provider_actor_name(name: str) -> str:
    return f"txproc-provider-{name}"


_BREAKER_LEVEL = {BreakerState.closed: 0, BreakerState.half_open: 1, BreakerState.open: 2}

Parse = Callable[[ProviderRequest, int, dict[str, str], bytes], ProviderReply]
Build = Callable[[ProviderRequest, float], HttpCall]


def _is_failure(outcome: Outcome) -> bool:
    """What counts against the provider's health: it was unavailable or did not answer.

    A decline or a refused request is a healthy provider saying no.
    """
    return outcome in (Outcome.RETRYABLE, Outcome.UNKNOWN)


class ProviderClient:
    """Calls one provider; built and closed inside the event loop that uses it (the
    provider actor's)."""

    def __init__(self, config: ProviderConfig, adapter: Adapter, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        config.retry.check()
        self.config = config
        self.adapter = adapter
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self.breaker = CircuitBreaker(config.breaker, clock, on_transition=self._transition)
        metrics.BREAKER_STATE.labels(config.name).set(0)
        self._watch: asyncio.Task[None] | None = None
        self.bulkhead = Bulkhead(config.calls_in_flight_max)
        # The adapter's SLA bounds one attempt from sending to the last byte; waiting for a
        # pooled connection and connecting are bounded apart (a connection never made sent
        # nothing, so that failure may be retried).
        self._base_url = config.base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=config.connect_timeout_s,
                                          sock_read=adapter.timeout_s),
            connector=aiohttp.TCPConnector(limit=config.connections_max,
                                           ssl=tls if tls is not None else True),
            auto_decompress=False, skip_auto_headers=("User-Agent",))
        self._attempt_timeout_s = adapter.timeout_s + config.connect_timeout_s
        self.stats: dict[str, int] = {"calls": 0, "attempts": 0, "retries": 0,
                                      "rejected_open": 0, "rejected_bulkhead": 0}

    def _transition(self, old: BreakerState, new: BreakerState) -> None:
        metrics.BREAKER_STATE.labels(self.config.name).set(_BREAKER_LEVEL[new])
        telemetry.event(log, "circuit breaker changed state", logging.WARNING,
                        event="breaker", provider=self.config.name, **{"from": old.value},
                        to=new.value)

    async def call(self, request: ProviderRequest) -> ProviderReply:
        """Perform ``request`` at the provider."""
        with telemetry.span("provider.call", attributes={
                "txproc.provider": self.config.name,
                "txproc.operation": request.operation.value}):
            return await self._run(request, self.adapter.build, self.adapter.parse, "call")

    async def status(self, request: ProviderRequest) -> ProviderReply:
        """Ask what became of ``request``, by its idempotency key."""
        with telemetry.span("provider.status", attributes={
                "txproc.provider": self.config.name,
                "txproc.operation": request.operation.value}):
            return await self._run(request, self.adapter.build_status,
                                   self.adapter.parse_status, "status")

    async def _watch_breaker(self) -> None:
        """Keep the breaker gauge true while no calls come: open turns half open by time."""
        while True:
            metrics.BREAKER_STATE.labels(self.config.name).set(
                _BREAKER_LEVEL[self.breaker.state])
            await asyncio.sleep(1.0)

    def info(self) -> dict[str, Any]:
        return {"name": self.config.name, "currencies": sorted(self.adapter.currencies),
                "breaker": self.breaker.state.value, "in_flight": self.bulkhead.in_flight,
                **self.stats}

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self._session.close()

    def _ensure_watch(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_breaker())

    async def _run(self, request: ProviderRequest, build: Build, parse: Parse,
                   kind: str) -> ProviderReply:
        self.stats["calls"] += 1
        self._ensure_watch()
        with self.bulkhead.slot() as admitted:
            if not admitted:
                self.stats["rejected_bulkhead"] += 1
                metrics.OVERLOAD_REJECTIONS.labels(f"provider_{self.config.name}").inc()
                return ProviderReply(outcome=Outcome.RETRYABLE, message="bulkhead_full",
                                     retry_after_s=0.1)
            started_s = self._clock()
            attempt = 0
            while True:
                attempt += 1
                # A cancelled or failing attempt is abandoned: no verdict on the provider.
                with self.breaker.attempt() as call:
                    if not call.admitted:
                        self.stats["rejected_open"] += 1
                        return ProviderReply(outcome=Outcome.RETRYABLE,
                                             message="circuit_open",
                                             retry_after_s=self.breaker.retry_in_s())
                    reply = await self._attempt(request, build, parse, kind, attempt)
                    call.record(not _is_failure(reply.outcome))
                if reply.outcome != Outcome.RETRYABLE or not request.idempotency_key:
                    return reply
                delay_s = next_delay_s(self.config.retry, attempt, self._clock() - started_s,
                                       reply.retry_after_s or None, self._rng)
                if delay_s is None:
                    return reply
                self.stats["retries"] += 1
                metrics.PROVIDER_RETRIES.labels(self.config.name).inc()
                await asyncio.sleep(delay_s)

    async def _attempt(self, request: ProviderRequest, build: Build, parse: Parse, kind: str,
                       attempt: int) -> ProviderReply:
        with telemetry.span("provider.http", attributes={"txproc.attempt": attempt}) as current:
            reply, status, elapsed_s = await self._send(request, build, parse)
            if current is not None:
                current.set_attribute("http.response.status_code", status)
                current.set_attribute("txproc.latency_ms", round(elapsed_s * 1000, 2))
                current.set_attribute("txproc.outcome", reply.outcome.value)
        operation = request.operation.value if kind == "call" else f"{request.operation}_status"
        metrics.PROVIDER_CALLS.labels(self.config.name, operation, reply.outcome.value).inc()
        metrics.PROVIDER_CALL_SECONDS.labels(self.config.name, operation).observe(elapsed_s)
        # Every attempt is counted and timed above; a healthy one is logged only at DEBUG
        # (a JSON line per call was a large share of its CPU), a failed one always.
        level = logging.WARNING if _is_failure(reply.outcome) else logging.DEBUG
        if log.isEnabledFor(level):
            telemetry.event(
                log, "provider call", level, event="provider_call",
                provider=self.config.name, kind=kind, operation=request.operation.value,
                attempt=attempt, latency_ms=round(elapsed_s * 1000, 2), http_status=status,
                outcome=reply.outcome.value, message_detail=reply.message,
                decline_code=reply.decline_code.value if reply.decline_code else "",
                reference=request.reference)
        return reply

    async def _send(self, request: ProviderRequest, build: Build,
                    parse: Parse) -> tuple[ProviderReply, int, float]:
        self.stats["attempts"] += 1
        call = build(request, time.time())
        started_s = self._clock()
        status = 0
        try:
            async with asyncio.timeout(self._attempt_timeout_s):
                # The adapter escaped the path and query already (keys with "/" or "&"
                # in them); taken as is, not quoted again.
                url = yarl.URL(self._base_url + call.path, encoded=True)
                async with self._session.request(call.method, url, headers=call.headers,
                                                 data=call.body or None) as response:
                    status = response.status
                    body = await response.read()
                    headers = dict(response.headers)
            reply = parse(request, status, headers, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            error: ProviderError = error_from_transport(exc)
            reply = ProviderReply(outcome=error.outcome, message=str(error))
        return reply, status, self._clock() - started_s


class ProviderActor:
    """One provider's client in a process of its own; see the module docstring.

    The client is made on first use, inside the actor's event loop (aiohttp's session
    belongs to the loop that made it). ``call`` and ``status`` answer both the channel
    (``ProviderLink``, the engine's path) and Ray (tests and drills).
    """

    def __init__(self, config: ProviderConfig, *,
                 observability: ObservabilityConfig | None = None,
                 channel_key: bytes = b"") -> None:
        if observability is not None:
            telemetry.setup(observability, f"provider-{config.name}")
        from adapters.registry import ADAPTERS

        config.retry.check()
        self.config = config
        lower_priority(config.cpu_nice)
        adapter_class: Any = ADAPTERS[config.name]
        self.adapter: Adapter = adapter_class.from_secrets_file(config.secrets_file)
        self._channel_key = channel_key
        self._client: ProviderClient | None = None
        self._address: tuple[str, int] | None = None
        self._starting: asyncio.Lock | None = None

    def _now(self) -> ProviderClient:
        if self._client is None:
            self._client = ProviderClient(self.config, self.adapter)
        return self._client

    async def call(self, request: ProviderRequest | dict[str, Any],
                   trace: dict[str, str] | None = None) -> ProviderReply:
        """Perform ``request`` at the provider (``trace``: the caller's span context)."""
        with telemetry.span("provider.remote", parent=trace):
            return await self._now().call(_request(request))

    async def status(self, request: ProviderRequest | dict[str, Any],
                     trace: dict[str, str] | None = None) -> ProviderReply:
        """Ask what became of ``request``, by its idempotency key."""
        with telemetry.span("provider.remote", parent=trace):
            return await self._now().status(_request(request))

    async def endpoint(self) -> tuple[str, int]:
        """Where the channel serving ``call`` and ``status`` listens (started on the first
        call, so anew in every incarnation)."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._address is None:
                server = ChannelServer(self, ("call", "status"), self._channel_key,
                                       name=f"provider-{self.config.name}")
                self._address = await server.start(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        return self._address

    def pid(self) -> int:
        return os.getpid()

    def breaker_state(self) -> str:
        return self._now().breaker.state.value

    def info(self) -> dict[str, Any]:
        return self._now().info()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def _request(value: ProviderRequest | dict[str, Any]) -> ProviderRequest:
    """The request as sent: a struct over Ray, its msgpack map over the channel."""
    if isinstance(value, ProviderRequest):
        return value
    return msgspec.convert(value, ProviderRequest)


class ProviderLink:
    """The engine's side of a provider actor: ``call`` and ``status`` over the channel.

    The actor's address is asked of Ray (by name) on the first call and after a lost
    connection. A call whose connection breaks raises ``ChannelBroken``: whether the
    provider saw it is unknown, and the engine records it so (a status query settles it).
    """

    def __init__(self, name: str, channel_key: bytes) -> None:
        self.name = name
        self._channel = ChannelClient(self._resolve, channel_key)

    async def _resolve(self) -> tuple[str, int]:
        handle = ray.get_actor(provider_actor_name(self.name), namespace=NAMESPACE)
        host, port = await handle.endpoint.remote()
        return str(host), int(port)

    async def call(self, request: ProviderRequest) -> ProviderReply:
        answer = await self._channel.call("call", request, telemetry.carrier())
        return msgspec.convert(answer, ProviderReply)

    async def status(self, request: ProviderRequest) -> ProviderReply:
        answer = await self._channel.call("status", request, telemetry.carrier())
        return msgspec.convert(answer, ProviderReply)

    def close(self) -> None:
        self._channel.close()


def make_provider(config: ProviderConfig, observability: ObservabilityConfig | None = None,
                  *, channel_key: bytes = b"") -> Any:
    """Start a provider actor (the one place it is made remote). Restarted if it dies; it
    keeps nothing durable (an interrupted call is resolved by the saga's status query).
    ``channel_key`` authenticates the payments engine's calls (``actors.channel``)."""
    actor_class = ray.remote(  # type: ignore[call-overload]
        num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=10_000
    )(ProviderActor)
    return actor_class.options(name=provider_actor_name(config.name),
                               namespace=NAMESPACE).remote(
        config, observability=observability, channel_key=channel_key)
