"""Capped exponential backoff with full jitter: the one retry pace of txproc.

Shared by the payments domain (provider retries, rechecks, the outbox) and the ledger's
shards (cancelling a reservation a peer did not answer), which may not import each other.
"""

from __future__ import annotations

import random

from processor.types import require

__all__ = ["backoff_s"]

# 2.0 ** 1000 is still a finite float, and any larger exponent would exceed every cap anyway.
_BACKOFF_EXPONENT_MAX = 1_000


def backoff_s(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): capped exponential backoff
    with full jitter, uniform over ``[0, min(cap_s, base_s * 2 ** (attempt - 1))]``.

    Raises ``InvariantError`` if ``attempt < 1`` or a duration is negative.
    """
    require(attempt >= 1, "backoff attempt >= 1")
    require(base_s >= 0, "backoff base_s >= 0")
    require(cap_s >= 0, "backoff cap_s >= 0")
    # Float multiplication overflows to inf rather than raising, and min() then picks cap_s.
    ceiling_s = min(cap_s, base_s * 2.0 ** min(attempt - 1, _BACKOFF_EXPONENT_MAX))
    return rng.uniform(0.0, ceiling_s)
