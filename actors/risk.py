"""The risk actor: rules over an in-memory velocity window, as a separate service.

It gates authorizations without owning them: the payments engine asks it with a timeout
(``RiskConfig.timeout_s``) and, when it is slow or down, decides by the fallback policy
(``processor/risk/``). Its velocity window lives in memory, so a restart forgets recent
authorizations; that is a documented limit (docs/payments.md), not a money risk, because
the fallback and the amount limits still apply.

The engine asks over the data-plane channel (``actors.channel``), not by a Ray call: a Ray
call cost about 1.4 ms of CPU per check, most of it Ray's own, for a rule that takes
microseconds (docs/design.md §14). Ray stays the control plane: it places and restarts the
actor, and ``endpoint`` tells the engine where the channel listens, anew after a restart.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec
import ray

from actors.channel import ChannelClient, ChannelServer
from actors.names import NAMESPACE
from actors.ops import telemetry
from actors.priority import lower_priority
from processor.ops_config import ObservabilityConfig
from processor.risk import RiskConfig, RiskDecision, VelocityWindow, evaluate

__all__ = ["RISK_ACTOR_NAME", "RiskActor", "RiskLink", "make_risk"]

RISK_ACTOR_NAME = "txproc-risk"


class RiskActor:
    def __init__(self, config: RiskConfig, *, clock_s: Callable[[], float] = time.monotonic,
                 delay_s: float = 0.0,
                 observability: ObservabilityConfig | None = None, cpu_nice: int = 0,
                 channel_key: bytes = b"") -> None:
        if observability is not None:
            telemetry.setup(observability, "risk")
        lower_priority(cpu_nice)
        config.check()
        self._config = config
        self._clock_s = clock_s
        self._window = VelocityWindow(config.velocity_window_s, config.velocity_tokens_max)
        # An artificial delay before every answer: how tests and drills make it slow.
        self._delay_s = delay_s
        self._channel_key = channel_key
        self._address: tuple[str, int] | None = None
        self._starting: asyncio.Lock | None = None

    async def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    async def endpoint(self) -> tuple[str, int]:
        """Where the channel serving ``check`` listens (started on the first call)."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._address is None:
                server = ChannelServer(self, ("check", "forget"), self._channel_key,
                                       name="risk")
                self._address = await server.start(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        return self._address

    async def set_delay(self, delay_s: float) -> float:
        """Answer every check ``delay_s`` late (drills and tests); returns the delay now."""
        self._delay_s = delay_s
        return self._delay_s

    async def check(self, amount: int, currency: str, payment_method: str,
                    request_id: str = "") -> RiskDecision:
        """Decide one authorization. ``request_id`` (the payment's id) makes a retry of
        the same request count once in the velocity window and not against itself."""
        if self._delay_s > 0:
            await asyncio.sleep(self._delay_s)
        now_s = self._clock_s()
        decision = evaluate(self._config, amount=amount, currency=currency,
                            payment_method=payment_method,
                            recent_count=self._window.count(payment_method, now_s,
                                                            request_id))
        if decision.allowed:
            counted = not self._window.holds(payment_method, request_id)
            self._window.add(payment_method, now_s, request_id)
            if counted and request_id:
                decision = msgspec.structs.replace(decision, counted=True)
        return decision

    async def forget(self, payment_method: str, request_id: str) -> bool:
        """Take back what ``check`` counted for ``request_id``: the request turned out to
        repeat one already answered (its Idempotency-Key was taken), so it must leave no
        trace in the velocity window. False when the window does not hold it."""
        return self._window.discard(payment_method, request_id)


class RiskLink:
    """The engine's side: ``check`` over the channel to the risk actor, whose address is
    asked of the actor (by name) on the first call and after a lost connection. Every
    failure is raised; the caller applies the timeout and the fallback policy."""

    def __init__(self, channel_key: bytes) -> None:
        self._channel = ChannelClient(self._resolve, channel_key)

    async def _resolve(self) -> tuple[str, int]:
        handle = ray.get_actor(RISK_ACTOR_NAME, namespace=NAMESPACE)
        host, port = await handle.endpoint.remote()
        return str(host), int(port)

    async def check(self, amount: int, currency: str, payment_method: str,
                    request_id: str = "") -> RiskDecision:
        answer = await self._channel.call("check", amount, currency, payment_method,
                                          request_id)
        return msgspec.convert(answer, RiskDecision)

    async def forget(self, payment_method: str, request_id: str) -> bool:
        return bool(await self._channel.call("forget", payment_method, request_id))

    def close(self) -> None:
        self._channel.close()


def make_risk(config: RiskConfig, observability: ObservabilityConfig | None = None,
              *, cpu_nice: int = 0, channel_key: bytes = b"") -> Any:
    """Start the risk actor (the one place it is made remote); restarted if it dies.
    ``cpu_nice`` lowers its CPU priority (actors/priority.py); ``channel_key``
    authenticates the engine's checks (``actors.channel``)."""
    actor_class = ray.remote(  # type: ignore[call-overload]
        num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000
    )(RiskActor)
    return actor_class.options(name=RISK_ACTOR_NAME, namespace=NAMESPACE).remote(
        config, observability=observability, cpu_nice=cpu_nice, channel_key=channel_key)
