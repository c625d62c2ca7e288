"""The provider-adapter actor: one per payment provider, owning that connection's resilience.

The adapter (``adapters/<provider>.py``) translates; this actor sends. It bounds every call
by the provider's SLA timeout, retries only calls that carry an idempotency key (all of
them do: the saga sets one per step) with capped exponential backoff and full jitter,
within both ``attempts_max`` and a deadline, keeps a circuit breaker over the provider's
failure rate (one probe when half open) and a bulkhead on calls in flight (beyond it, fail
fast). It never raises for what a provider did: every call ends in a ``ProviderReply``
whose ``outcome`` the saga acts on, and every attempt is logged as one JSON line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import ray

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

__all__ = ["ProviderActor", "ProviderConfig", "make_provider", "provider_actor_name"]

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


def _is_failure(outcome: Outcome) -> bool:
    """What counts against the provider's health: it was unavailable or did not answer.

    A decline or a refused request is a healthy provider saying no.
    """
    return outcome in (Outcome.RETRYABLE, Outcome.UNKNOWN)


class ProviderActor:
    def __init__(self, config: ProviderConfig, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 observability: ObservabilityConfig | None = None) -> None:
        if observability is not None:
            telemetry.setup(observability, f"provider-{config.name}")
        from adapters.registry import ADAPTERS

        config.retry.check()
        self.config = config
        lower_priority(config.cpu_nice)
        adapter_class: Any = ADAPTERS[config.name]
        self.adapter: Adapter = adapter_class.from_secrets_file(config.secrets_file)
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self.breaker = CircuitBreaker(config.breaker, clock, on_transition=self._transition)
        metrics.BREAKER_STATE.labels(config.name).set(0)
        self._watch: asyncio.Task[None] | None = None
        self.bulkhead = Bulkhead(config.calls_in_flight_max)
        self._client = httpx.AsyncClient(
            base_url=config.base_url,
            timeout=httpx.Timeout(self.adapter.timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=config.connections_max,
                                max_keepalive_connections=config.connections_max),
        )
        self.stats: dict[str, int] = {"calls": 0, "attempts": 0, "retries": 0,
                                      "rejected_open": 0, "rejected_bulkhead": 0}

    def _transition(self, old: BreakerState, new: BreakerState) -> None:
        metrics.BREAKER_STATE.labels(self.config.name).set(_BREAKER_LEVEL[new])
        telemetry.event(log, "circuit breaker changed state", logging.WARNING,
                        event="breaker", provider=self.config.name, **{"from": old.value},
                        to=new.value)

    async def call(self, request: ProviderRequest,
                   trace: dict[str, str] | None = None) -> ProviderReply:
        """Perform ``request`` at the provider (``trace``: the caller's span context)."""
        with telemetry.span("provider.call", parent=trace, attributes={
                "txproc.provider": self.config.name,
                "txproc.operation": request.operation.value}):
            return await self._run(request, self.adapter.build, self.adapter.parse, "call")

    async def status(self, request: ProviderRequest,
                     trace: dict[str, str] | None = None) -> ProviderReply:
        """Ask what became of ``request``, by its idempotency key."""
        with telemetry.span("provider.status", parent=trace, attributes={
                "txproc.provider": self.config.name,
                "txproc.operation": request.operation.value}):
            return await self._run(request, self.adapter.build_status,
                                   self.adapter.parse_status, "status")

    def pid(self) -> int:
        return os.getpid()

    async def _watch_breaker(self) -> None:
        """Keep the breaker gauge true while no calls come: open turns half open by time."""
        while True:
            metrics.BREAKER_STATE.labels(self.config.name).set(
                _BREAKER_LEVEL[self.breaker.state])
            await asyncio.sleep(1.0)

    def breaker_state(self) -> str:
        return self.breaker.state.value

    def info(self) -> dict[str, Any]:
        return {"name": self.config.name, "currencies": sorted(self.adapter.currencies),
                "breaker": self.breaker.state.value, "in_flight": self.bulkhead.in_flight,
                **self.stats}

    async def close(self) -> None:
        await self._client.aclose()

    def _ensure_watch(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_breaker())

    async def _run(self, request: ProviderRequest,
                   build: Callable[[ProviderRequest, float], HttpCall],
                   parse: Callable[[ProviderRequest, int, dict[str, str], bytes], ProviderReply],
                   kind: str) -> ProviderReply:
        self.stats["calls"] += 1
        self._ensure_watch()
        if not self.bulkhead.try_acquire():
            self.stats["rejected_bulkhead"] += 1
            metrics.OVERLOAD_REJECTIONS.labels(f"provider_{self.config.name}").inc()
            return ProviderReply(outcome=Outcome.RETRYABLE, message="bulkhead_full",
                                 retry_after_s=0.1)
        try:
            started_s = self._clock()
            attempt = 0
            while True:
                attempt += 1
                if not self.breaker.allow():
                    self.stats["rejected_open"] += 1
                    return ProviderReply(outcome=Outcome.RETRYABLE, message="circuit_open",
                                         retry_after_s=self.breaker.retry_in_s())
                reply = await self._attempt(request, build, parse, kind, attempt)
                if reply.outcome != Outcome.RETRYABLE or not request.idempotency_key:
                    return reply
                delay_s = next_delay_s(self.config.retry, attempt, self._clock() - started_s,
                                       reply.retry_after_s or None, self._rng)
                if delay_s is None:
                    return reply
                self.stats["retries"] += 1
                metrics.PROVIDER_RETRIES.labels(self.config.name).inc()
                await asyncio.sleep(delay_s)
        finally:
            self.bulkhead.release()

    async def _attempt(self, request: ProviderRequest,
                       build: Callable[[ProviderRequest, float], HttpCall],
                       parse: Callable[[ProviderRequest, int, dict[str, str], bytes],
                                       ProviderReply],
                       kind: str, attempt: int) -> ProviderReply:
        with telemetry.span("provider.http", attributes={"txproc.attempt": attempt}) as current:
            reply, status, elapsed_s = await self._send(request, build, parse)
            if current is not None:
                current.set_attribute("http.response.status_code", status)
                current.set_attribute("txproc.latency_ms", round(elapsed_s * 1000, 2))
                current.set_attribute("txproc.outcome", reply.outcome.value)
        operation = request.operation.value if kind == "call" else f"{request.operation}_status"
        metrics.PROVIDER_CALLS.labels(self.config.name, operation, reply.outcome.value).inc()
        metrics.PROVIDER_CALL_SECONDS.labels(self.config.name, operation).observe(elapsed_s)
        telemetry.event(
            log, "provider call", event="provider_call", provider=self.config.name,
            kind=kind, operation=request.operation.value, attempt=attempt,
            latency_ms=round(elapsed_s * 1000, 2), http_status=status,
            outcome=reply.outcome.value,
            decline_code=reply.decline_code.value if reply.decline_code else "",
            reference=request.reference)
        return reply

    async def _send(self, request: ProviderRequest,
                    build: Callable[[ProviderRequest, float], HttpCall],
                    parse: Callable[[ProviderRequest, int, dict[str, str], bytes],
                                    ProviderReply]) -> tuple[ProviderReply, int, float]:
        self.stats["attempts"] += 1
        call = build(request, time.time())
        started_s = self._clock()
        status = 0
        try:
            response = await self._client.request(
                call.method, call.path, headers=call.headers, content=call.body)
            status = response.status_code
            reply = parse(request, status, dict(response.headers), response.content)
        except httpx.HTTPError as exc:
            error: ProviderError = error_from_transport(exc)
            reply = ProviderReply(outcome=error.outcome, message=str(error))
        except BaseException:
            # Cancelled, or a bug in the adapter: no verdict on the provider's health.
            self.breaker.abandon()
            raise
        self.breaker.record(not _is_failure(reply.outcome))
        return reply, status, self._clock() - started_s


def make_provider(config: ProviderConfig,
                  observability: ObservabilityConfig | None = None) -> Any:
    """Start a provider actor (the one place it is made remote). Restarted if it dies; it
    keeps nothing durable (an interrupted call is resolved by the saga's status query)."""
    actor_class = ray.remote(  # type: ignore[call-overload]
        num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=10_000
    )(ProviderActor)
    return actor_class.options(name=provider_actor_name(config.name),
                               namespace=NAMESPACE).remote(config,
                                                           observability=observability)
