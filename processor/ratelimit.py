"""Per-principal rate limits: a token bucket per caller, on an injected clock.

Each principal (``processor.identity.principal_of``: tenant slot and subject) has a bucket
holding up to ``burst`` operations that refills at ``rate_per_s``. A request takes as many
operations as it carries (a batch of 8,000 transfers takes 8,000), all or none: a request
the bucket cannot cover is refused whole and takes nothing, with the seconds after which it
would fit. The global ``overloaded`` answer stays for back-pressure; this one is fairness
between callers.

The answer carries what the IETF RateLimit header fields draft
(draft-ietf-httpapi-ratelimit-headers) asks a server to announce: the policy (quota and
window) and the current remaining quota with the seconds until it is whole again.

Buckets are kept for the principals seen recently, at most ``principals_max``; the one
idle longest is forgotten first, which can only hand a forgotten principal a full bucket
(never fewer operations than it had).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["Decision", "RateLimiter"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What one ``take`` decided."""

    allowed: bool
    remaining: int  # operations left in the bucket after this request
    retry_after_s: float  # 0 if allowed; else when the request would fit
    reset_s: float  # seconds until the bucket is full again


class _Bucket:
    __slots__ = ("at_s", "level")

    def __init__(self, level: float, at_s: float) -> None:
        self.level = level
        self.at_s = at_s


class RateLimiter:
    """Token buckets by principal. ``rate_per_s <= 0`` disables the limit."""

    def __init__(self, rate_per_s: float, burst: int, *, principals_max: int = 100_000) -> None:
        if rate_per_s > 0 and burst < 1:
            raise ValueError("burst must be at least 1 when a rate is set")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._principals_max = principals_max
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def policy(self) -> str:
        """The ``RateLimit-Policy`` field value: the burst per the seconds it takes to refill."""
        window = max(1, math.ceil(self.burst / self.rate_per_s)) if self.enabled else 1
        return f'"principal";q={self.burst};w={window}'

    def take(self, principal: str, operations: int, now_s: float) -> Decision:
        """Take ``operations`` from ``principal``'s bucket at ``now_s``, or refuse them all."""
        if not self.enabled:
            return Decision(True, self.burst, 0.0, 0.0)
        bucket = self._buckets.get(principal)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now_s)
            self._buckets[principal] = bucket
            if len(self._buckets) > self._principals_max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(principal)
            # A clock that steps back refills nothing (and takes nothing back).
            elapsed = max(0.0, now_s - bucket.at_s)
            bucket.level = min(float(self.burst), bucket.level + elapsed * self.rate_per_s)
            bucket.at_s = max(bucket.at_s, now_s)
        if operations <= bucket.level:
            bucket.level -= operations
            return Decision(True, int(bucket.level), 0.0, self._reset_s(bucket))
        # A request larger than the whole bucket can never fit; it is told the time to a
        # full bucket, and refused again then (the caller must split it).
        missing = min(float(operations), float(self.burst)) - bucket.level
        return Decision(False, int(bucket.level), max(missing / self.rate_per_s, 0.001),
                        self._reset_s(bucket))

    def _reset_s(self, bucket: _Bucket) -> float:
        return (self.burst - bucket.level) / self.rate_per_s
