"""The risk check that gates an authorization without owning it.

``evaluate`` applies the rules to one authorization; ``fallback`` decides instead when the
check did not answer within ``RiskConfig.timeout_s`` or could not be reached. The velocity
rule needs the number of recent authorizations made with the same payment-method token,
which ``VelocityWindow`` counts in bounded memory with timestamps passed in by the caller.

Amounts are integer minor units of the currency beside them; payment methods are tokens,
never card numbers.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from typing import Literal

import msgspec

from processor.currency import is_known_currency
from processor.types import AMOUNT_MAX, require

__all__ = [
    "EVENTS_PER_TOKEN_MAX",
    "FallbackCause",
    "RiskConfig",
    "RiskDecision",
    "RiskReason",
    "RiskSource",
    "VelocityWindow",
    "evaluate",
    "fallback",
]

# Timestamps a VelocityWindow keeps per token by default; velocity_max may not exceed it, or
# the count would saturate below the limit and the rule could never fire.
EVENTS_PER_TOKEN_MAX = 64

FallbackCause = Literal["timeout", "unavailable"]
RiskSource = Literal["rules", "fallback"]


def _amount_max_default() -> dict[str, int]:
    return {"USD": 1_000_000, "EUR": 1_000_000, "GBP": 1_000_000, "JPY": 100_000_000}


def _fallback_allow_below_default() -> dict[str, int]:
    return {"USD": 10_000, "EUR": 10_000, "GBP": 10_000, "JPY": 1_000_000}


class RiskConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Limits of the risk check; amounts are minor units per ISO 4217 currency.

    A currency without an ``amount_max`` is not allowed at all. When the check times out
    after ``timeout_s`` or is unavailable, an amount strictly below the currency's
    ``fallback_allow_below`` is allowed and any other declined; a currency missing from
    ``fallback_allow_below`` is always declined by the fallback. ``velocity_tokens_max``
    bounds how many payment-method tokens the velocity window tracks at once.
    """

    amount_max: dict[str, int] = msgspec.field(default_factory=_amount_max_default)
    velocity_max: int = 5
    velocity_window_s: float = 60.0
    blocked_tokens: frozenset[str] = frozenset()
    timeout_s: float = 0.05
    fallback_allow_below: dict[str, int] = msgspec.field(
        default_factory=_fallback_allow_below_default
    )
    velocity_tokens_max: int = 100_000

    def check(self) -> None:
        """Raise ValueError naming the first limit that is out of range."""
        checks = [
            (self.velocity_max >= 1, "velocity_max >= 1"),
            (self.velocity_max <= EVENTS_PER_TOKEN_MAX,
             f"velocity_max <= {EVENTS_PER_TOKEN_MAX} (EVENTS_PER_TOKEN_MAX)"),
            (self.velocity_window_s > 0, "velocity_window_s > 0"),
            (self.velocity_tokens_max >= 1, "velocity_tokens_max >= 1"),
            (self.timeout_s > 0, "timeout_s > 0"),
        ]
        for currency, limit in sorted(self.amount_max.items()):
            checks.append((is_known_currency(currency), f"amount_max[{currency}] is ISO 4217"))
            checks.append((1 <= limit <= AMOUNT_MAX, f"1 <= amount_max[{currency}] <= AMOUNT_MAX"))
        for currency, below in sorted(self.fallback_allow_below.items()):
            # The fallback is a weaker check than the rules: it may never allow an amount
            # that the rules would refuse, nor a currency they do not allow.
            checks.append((
                currency in self.amount_max, f"fallback_allow_below[{currency}] has amount_max"
            ))
            checks.append((
                0 <= below <= self.amount_max.get(currency, 0) + 1,
                f"0 <= fallback_allow_below[{currency}] <= amount_max[{currency}] + 1",
            ))
        for ok, what in checks:
            if not ok:
                raise ValueError(f"risk configuration: {what}")


class RiskReason(enum.StrEnum):
    """Why the risk check allowed or declined, in the order the rules are applied."""

    passed = "passed"
    payment_method_blocked = "payment_method_blocked"
    currency_not_allowed = "currency_not_allowed"
    amount_over_limit = "amount_over_limit"
    velocity_exceeded = "velocity_exceeded"
    fallback_allowed_below_threshold = "fallback_allowed_below_threshold"
    fallback_declined_at_or_above_threshold = "fallback_declined_at_or_above_threshold"


class RiskDecision(msgspec.Struct, frozen=True, kw_only=True):
    """The risk check's answer. ``fallback_cause`` is set exactly when ``source`` is fallback.

    ``counted``: this check added its request to the velocity window (it was not there
    yet). A caller that then finds the request is a repeat of one already answered takes
    the count back (``VelocityWindow.discard``), so a repeat leaves no trace.
    """

    allowed: bool
    reason: RiskReason
    source: RiskSource
    fallback_cause: Literal["", "timeout", "unavailable"] = ""
    counted: bool = False


_RULES_REASONS = frozenset({
    RiskReason.passed,
    RiskReason.payment_method_blocked,
    RiskReason.currency_not_allowed,
    RiskReason.amount_over_limit,
    RiskReason.velocity_exceeded,
})


def _rules(reason: RiskReason) -> RiskDecision:
    require(reason in _RULES_REASONS, "a rules decision carries a rules reason")
    return RiskDecision(allowed=reason is RiskReason.passed, reason=reason, source="rules")


def evaluate(
    config: RiskConfig,
    *,
    amount: int,
    currency: str,
    payment_method: str,
    recent_count: int,
) -> RiskDecision:
    """Apply the rules to one authorization of ``amount`` minor units of ``currency``.

    ``recent_count`` is the number of authorizations already made with the token
    ``payment_method`` within ``velocity_window_s``, this one excluded. The first rule
    broken decides, in this order:

    1. ``payment_method_blocked``: the token is in ``blocked_tokens``.
    2. ``currency_not_allowed``: the currency has no ``amount_max``.
    3. ``amount_over_limit``: ``amount > amount_max[currency]``.
    4. ``velocity_exceeded``: ``recent_count >= velocity_max``, so this authorization would
       be one more than ``velocity_max`` in the window.

    Otherwise ``passed``. Raises ``InvariantError`` if ``amount`` is not in
    ``1..AMOUNT_MAX`` or ``recent_count`` is negative; the API validates both before.
    """
    require(1 <= amount <= AMOUNT_MAX, "risk amount in 1..AMOUNT_MAX")
    require(recent_count >= 0, "risk recent_count >= 0")
    if payment_method in config.blocked_tokens:
        return _rules(RiskReason.payment_method_blocked)
    limit = config.amount_max.get(currency)
    if limit is None:
        return _rules(RiskReason.currency_not_allowed)
    if amount > limit:
        return _rules(RiskReason.amount_over_limit)
    if recent_count >= config.velocity_max:
        return _rules(RiskReason.velocity_exceeded)
    return _rules(RiskReason.passed)


def fallback(
    config: RiskConfig, *, amount: int, currency: str, cause: FallbackCause
) -> RiskDecision:
    """Decide without the rules because the check timed out or was unavailable.

    Allows an amount strictly below ``fallback_allow_below[currency]`` and declines any
    other, including every amount in a currency that has no threshold. Raises
    ``InvariantError`` if ``amount`` is not in ``1..AMOUNT_MAX`` or ``cause`` is unknown.
    """
    require(1 <= amount <= AMOUNT_MAX, "risk amount in 1..AMOUNT_MAX")
    require(cause in ("timeout", "unavailable"), "fallback cause is timeout or unavailable")
    below = config.fallback_allow_below.get(currency, 0)
    if amount < below:
        reason = RiskReason.fallback_allowed_below_threshold
    else:
        reason = RiskReason.fallback_declined_at_or_above_threshold
    return RiskDecision(
        allowed=reason is RiskReason.fallback_allowed_below_threshold,
        reason=reason,
        source="fallback",
        fallback_cause=cause,
    )


class VelocityWindow:
    """How many events each token had in the last ``window_s`` seconds, in bounded memory.

    An event at ``t_s`` counts at ``now_s`` while ``now_s - t_s < window_s``. Memory is
    bounded twice:

    - at most ``tokens_max`` tokens are tracked; adding a new token beyond that forgets the
      least recently used one, whose count restarts at zero (so the velocity rule errs
      towards allowing, never towards wrongly declining);
    - at most ``events_per_token_max`` timestamps are kept per token, so a count saturates
      there. Keep it at least ``velocity_max`` and the velocity rule is exact.

    Timestamps are seconds from the caller's monotonic clock. A timestamp older than the
    token's newest is stored as the newest, so that each token's events stay in order.

    An event may carry an id (the payment's, which its Idempotency-Key decides): an event
    whose id the window holds for the token is the same request again, a retry. It is not
    added a second time, and ``count`` leaves it out, so a retried authorization is judged
    as it was the first time and never counts against the next payment with the token.
    """

    def __init__(
        self,
        window_s: float,
        tokens_max: int,
        *,
        events_per_token_max: int = EVENTS_PER_TOKEN_MAX,
    ) -> None:
        require(window_s > 0, "velocity window_s > 0")
        require(tokens_max >= 1, "velocity tokens_max >= 1")
        require(events_per_token_max >= 1, "velocity events_per_token_max >= 1")
        self._window_s = window_s
        self._tokens_max = tokens_max
        self._events_max = events_per_token_max
        # Per token, (timestamp, event id or "") oldest first.
        self._events: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()
        self.evicted_total = 0

    def __len__(self) -> int:
        """The number of tokens tracked now."""
        return len(self._events)

    def count(self, token: str, now_s: float, event_id: str = "") -> int:
        """Events of ``token`` within the window ending at ``now_s`` (at most the cap),
        the one with ``event_id`` left out."""
        events = self._events.get(token)
        if events is None:
            return 0
        self._expire(events, now_s)
        if not events:
            # Nothing left to remember: give the slot back rather than wait for LRU.
            del self._events[token]
            return 0
        self._events.move_to_end(token)
        return len(events) - _holds(events, event_id)

    def add(self, token: str, now_s: float, event_id: str = "") -> int:
        """Record one event of ``token`` at ``now_s``, unless the window holds its
        ``event_id`` already; return the token's count, this one included."""
        events = self._events.get(token)
        if events is None:
            if len(self._events) >= self._tokens_max:
                self._events.popitem(last=False)
                self.evicted_total += 1
            events = deque(maxlen=self._events_max)
            self._events[token] = events
        else:
            self._events.move_to_end(token)
            if now_s < events[-1][0]:
                now_s = events[-1][0]
        if not _holds(events, event_id):
            events.append((now_s, event_id))
        self._expire(events, now_s)
        require(len(self._events) <= self._tokens_max, "velocity tokens within tokens_max")
        return len(events)

    def holds(self, token: str, event_id: str) -> bool:
        """Whether the window holds an event of ``token`` with ``event_id`` (never for "")."""
        events = self._events.get(token)
        return events is not None and _holds(events, event_id)

    def discard(self, token: str, event_id: str) -> bool:
        """Take back the event of ``token`` with ``event_id``, as if it had never been
        added; False when there is none (or ``event_id`` is "")."""
        events = self._events.get(token)
        if events is None or not event_id:
            return False
        for event in events:
            if event[1] == event_id:
                events.remove(event)
                if not events:
                    del self._events[token]
                return True
        return False

    def _expire(self, events: deque[tuple[float, str]], now_s: float) -> None:
        horizon_s = now_s - self._window_s
        while events and events[0][0] <= horizon_s:
            events.popleft()


def _holds(events: deque[tuple[float, str]], event_id: str) -> bool:
    """Whether ``events`` hold one with ``event_id`` (never for ""): at most
    ``events_per_token_max`` to look at."""
    return bool(event_id) and any(e == event_id for _, e in events)
