"""The faults a simulated provider injects, and the model that decides when they strike.

``Faults`` is what ``PUT /_sim/faults`` sets (every field off by default); ``FaultModel``
decides per call, with an injected clock and one seeded ``random.Random``, so a test that
needs determinism gets it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = ["FAULTS_DECODER", "FaultCounts", "FaultModel", "Faults", "Latency"]

Rate = Annotated[float, Meta(ge=0.0, le=1.0)]
_Z99 = 2.3263478740408408  # the standard normal's 99th percentile
LATENCY_S_MAX = 120.0


class Latency(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A lognormal latency with this median and 99th percentile, in milliseconds."""

    median_ms: Annotated[float, Meta(gt=0.0, le=60_000.0)]
    p99_ms: Annotated[float, Meta(gt=0.0, le=120_000.0)]

    def __post_init__(self) -> None:
        if self.p99_ms < self.median_ms:
            raise ValueError("latency.p99_ms must not be below latency.median_ms")


class Faults(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The faults a simulated provider injects; ``PUT /_sim/faults`` replaces them whole.

    Every field defaults to "off". Rates are probabilities per request (0..1).
    """

    latency: Latency | None = None
    error_rate: Rate = 0.0  # a 5xx answered before anything happens
    burst_503: Annotated[int, Meta(ge=0, le=1_000_000)] = 0  # the next N calls get 503
    burst_rate: Rate = 0.0  # chance per call that a burst of ``burst_length`` 503s starts
    burst_length: Annotated[int, Meta(ge=1, le=100_000)] = 5
    hang_rate: Rate = 0.0  # the call sleeps ``hang_s`` before it takes effect and answers
    hang_s: Annotated[float, Meta(gt=0.0, le=600.0)] = 30.0
    rate_limit_rps: Annotated[float, Meta(gt=0.0, le=1_000_000.0)] | None = None
    rate_limit_burst: Annotated[int, Meta(ge=1, le=1_000_000)] = 1
    lost_response_rate: Rate = 0.0  # takes effect, then the connection is aborted
    # A call that takes effect is answered this much later; its webhook goes at once, so
    # the event overtakes the answer it repeats (a slow path back to the caller).
    answer_delay_ms: Annotated[float, Meta(ge=0.0, le=60_000.0)] = 0.0
    outage: Literal["none", "unavailable", "refuse"] = "none"
    outage_s: Annotated[float, Meta(gt=0.0, le=86_400.0)] | None = None  # then it ends
    retry_after_s: Annotated[int, Meta(ge=0, le=3_600)] = 1  # said with 503 bursts/outages
    webhook_duplicate_rate: Rate = 0.0
    webhook_reorder_window: Annotated[int, Meta(ge=0, le=1_000)] = 0  # 0/1: in order
    webhook_reorder_hold_ms: Annotated[float, Meta(ge=0.0, le=60_000.0)] = 1_000.0
    settle_delay_ms: Annotated[float, Meta(ge=0.0, le=86_400_000.0)] | None = None
    seed: int | None = None  # reseeds the provider's random generator when given

    def __post_init__(self) -> None:
        if self.outage == "refuse" and self.outage_s is None:
            # While it refuses connections the admin API is unreachable too.
            raise ValueError("outage 'refuse' needs outage_s")


FAULTS_DECODER = msgspec.json.Decoder(Faults)


@dataclass(slots=True)
class FaultCounts:
    requests: int = 0
    unavailable: int = 0
    throttled: int = 0
    errors: int = 0
    hangs: int = 0
    lost: int = 0
    refused_connections: int = 0


class FaultModel:
    """Decides, per request, which of the configured faults strike.

    The clock is monotonic seconds and the generator is injected, so a unit test drives it
    exactly. One instance serves one event loop; nothing here is thread-safe.
    """

    def __init__(self, *, rng: random.Random, monotonic_s: Callable[[], float]) -> None:
        self._rng = rng
        self._now = monotonic_s
        self.counts = FaultCounts()
        self.faults = Faults()
        self._burst_left = 0
        self._tokens = 0.0
        self._refilled_at = 0.0
        self._outage_until = math.inf

    def configure(self, faults: Faults) -> None:
        self.faults = faults
        if faults.seed is not None:
            self._rng.seed(faults.seed)
        self._burst_left = faults.burst_503
        self._tokens = float(faults.rate_limit_burst)
        self._refilled_at = self._now()
        self._outage_until = (math.inf if faults.outage_s is None
                              else self._now() + faults.outage_s)

    def outage(self) -> Literal["none", "unavailable", "refuse"]:
        """The outage in force now; an outage with ``outage_s`` ends by itself."""
        if self.faults.outage != "none" and self._now() >= self._outage_until:
            self.faults = msgspec.structs.replace(self.faults, outage="none", outage_s=None)
            self._outage_until = math.inf
        return self.faults.outage

    def outage_left_s(self) -> float:
        return max(0.0, self._outage_until - self._now())

    def edge(self) -> tuple[Literal["unavailable", "throttled"], float] | None:
        """What the provider's front door answers before looking at the request, if anything:
        503 for an outage or a burst, a throttle when the rate limit is exceeded; with the
        seconds the client should wait."""
        self.counts.requests += 1
        retry_s = float(self.faults.retry_after_s)
        if self.outage() == "unavailable":
            self.counts.unavailable += 1
            left = self.outage_left_s()
            return "unavailable", (retry_s if math.isinf(left) else max(retry_s, left))
        if self._burst_left == 0 and self._draw(self.faults.burst_rate):
            self._burst_left = self.faults.burst_length
        if self._burst_left > 0:
            self._burst_left -= 1
            self.counts.unavailable += 1
            return "unavailable", retry_s
        wait_s = self._take_token()
        if wait_s > 0.0:
            self.counts.throttled += 1
            return "throttled", wait_s
        return None

    def _take_token(self) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        rps = self.faults.rate_limit_rps
        if rps is None:
            return 0.0
        now = self._now()
        burst = float(self.faults.rate_limit_burst)
        self._tokens = min(burst, self._tokens + (now - self._refilled_at) * rps)
        self._refilled_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / rps

    def latency_s(self) -> float:
        latency = self.faults.latency
        if latency is None:
            return 0.0
        mu = math.log(latency.median_ms)
        sigma = (math.log(latency.p99_ms) - mu) / _Z99
        return min(LATENCY_S_MAX, self._rng.lognormvariate(mu, sigma) / 1000.0)

    def error(self) -> bool:
        if self._draw(self.faults.error_rate):
            self.counts.errors += 1
            return True
        return False

    def hang_s(self) -> float:
        if self._draw(self.faults.hang_rate):
            self.counts.hangs += 1
            return self.faults.hang_s
        return 0.0

    def lost(self) -> bool:
        if self._draw(self.faults.lost_response_rate):
            self.counts.lost += 1
            return True
        return False

    def duplicate_webhook(self) -> bool:
        return self._draw(self.faults.webhook_duplicate_rate)

    def snapshot(self) -> dict[str, Any]:
        """The configured faults plus the state they left (burst left, outage left)."""
        outage = self.outage()
        return {"faults": msgspec.to_builtins(self.faults), "burst_503_left": self._burst_left,
                "outage": outage,
                "outage_left_s": None if math.isinf(self._outage_until)
                else round(self.outage_left_s(), 3)}

    def _draw(self, rate: float) -> bool:
        # No draw at all for a rate of zero keeps the sequence of a seeded run stable when
        # an unrelated fault is switched on or off.
        return rate > 0.0 and self._rng.random() < rate
