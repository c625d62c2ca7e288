"""Resilience primitives for calls to a payment provider: breaker, backoff, retries, bulkhead.

Everything here is pure policy over an injected clock (a ``Callable[[], float]`` returning
monotonic seconds) and an injected ``random.Random``; the provider-adapter actor owns the
instances and does the I/O. None of these types is thread-safe; an actor uses them from one
event loop.

How a caller uses them for one provider call: through the context managers, so that a
slot or a breaker call is never lost (an exception or a cancellation ends it too)::

    with bulkhead.slot() as admitted:
        if not admitted:
            return overloaded(...)                 # never queue behind a slow provider
        with breaker.attempt() as call:
            if not call.admitted:
                return unavailable(retry_after_s=breaker.retry_in_s())
            reply = await send()                   # raising or cancelled: abandoned
            call.record(ok=reply_is_healthy)       # a decline is a healthy reply too

``try_acquire``/``release`` and ``allow``/``record``/``abandon`` stay the primitives the
context managers are made of (and what the property tests drive).
"""

from __future__ import annotations

import contextlib
import enum
import math
import random
from collections.abc import Callable, Iterator

import msgspec

from processor.backoff import backoff_s
from processor.types import require

__all__ = [
    "BUCKETS_MAX",
    "BreakerCall",
    "BreakerConfig",
    "BreakerState",
    "Bulkhead",
    "CircuitBreaker",
    "RetryPolicy",
    "TransitionHook",
    "backoff_s",
    "next_delay_s",
]

# The ring of time buckets is the breaker's whole memory; its size is a limit like any other.
BUCKETS_MAX = 1_000

class BreakerState(enum.StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


TransitionHook = Callable[[BreakerState, BreakerState], None]


class BreakerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Limits of one circuit breaker.

    The breaker counts calls and failures over the last ``window_s`` seconds, kept as a ring
    of ``buckets`` time buckets so that memory does not grow with the call rate. With at
    least ``calls_min`` calls in the window and a failure rate of at least
    ``failure_rate_max``, it opens for ``open_s`` seconds, then lets one probe through.
    A probe still out after ``probe_timeout_s`` is presumed lost (its caller never ended
    it); keep it above the provider call's own timeout.
    """

    window_s: float = 30.0
    buckets: int = 10
    calls_min: int = 20
    failure_rate_max: float = 0.5
    open_s: float = 10.0
    probe_timeout_s: float = 30.0

    def check(self) -> None:
        """Raise ValueError naming the first limit that is out of range."""
        checks = [
            (self.window_s > 0, "window_s > 0"),
            (1 <= self.buckets <= BUCKETS_MAX, f"1 <= buckets <= {BUCKETS_MAX}"),
            (self.calls_min >= 1, "calls_min >= 1"),
            (0 < self.failure_rate_max <= 1, "0 < failure_rate_max <= 1"),
            (self.open_s > 0, "open_s > 0"),
            (self.probe_timeout_s > 0, "probe_timeout_s > 0"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"breaker configuration: {what}")


class CircuitBreaker:
    """A failure-rate circuit breaker: closed, open, half open.

    - closed: every call is allowed and its outcome counted in the window. When the window
      holds at least ``calls_min`` calls and ``failures / calls >= failure_rate_max``, the
      breaker opens.
    - open: no call is allowed. Once ``open_s`` seconds have passed the breaker becomes half
      open; this happens lazily, when ``state``, ``allow`` or ``retry_in_s`` next looks.
    - half open: ``allow`` grants exactly one probe and refuses everything else until the
      probe has ended. A good probe closes the breaker with an empty window; a failed one
      opens it for another ``open_s``. A probe that ends without a verdict (the call was
      cancelled) is given back with ``abandon``, and then another probe may go.

    Every call that ``allow`` lets through must end in exactly one ``record`` or ``abandon``:
    the breaker counts the calls out, and ending a call when none is out is a bug
    (``InvariantError``).

    Calls still out when the breaker opens are *stale*. Their outcomes are not counted: the
    breaker has decided on fresher evidence. ``record`` cannot tell which call an outcome
    belongs to, so it assigns outcomes to stale calls first; in half open the probe has
    ended once the stale calls and one more have ended, and the last outcome is the verdict.
    So two probes are never out at once, even when a call allowed before the breaker opened
    outlives ``open_s``. With the provider's call timeout below ``open_s`` no stale call is
    left by the time the breaker half-opens, and the verdict is always the probe's own.

    A caller that loses a call (ends it with neither ``record`` nor ``abandon``) would hold
    the probe slot forever. So a probe out for ``probe_timeout_s`` is presumed lost: the
    breaker forgets it and every stale call, counts ``probes_expired_total`` (nonzero means
    a caller bug), and lets a new probe go. Should a forgotten call end after all, its end
    is ignored when no call is out, and otherwise taken for a current call.

    The window covers the current bucket and the ``buckets - 1`` before it, so it spans
    between ``window_s * (1 - 1 / buckets)`` and ``window_s`` seconds.

    ``on_transition(old, new)`` is called after every change of state (for metrics); it must
    not call back into the breaker. ``transitions_total`` counts the changes as well.
    """

    def __init__(
        self,
        config: BreakerConfig,
        clock: Callable[[], float],
        *,
        on_transition: TransitionHook | None = None,
    ) -> None:
        config.check()
        self._config = config
        self._clock = clock
        self._on_transition = on_transition
        self._bucket_s = config.window_s / config.buckets
        # Ring of buckets: the index of the time slice each bucket currently holds, and its
        # counts. A bucket whose slice has left the window is reset before it is reused.
        self._slices = [-1] * config.buckets
        self._calls = [0] * config.buckets
        self._failures = [0] * config.buckets
        self._state = BreakerState.closed
        self._opened_at_s = 0.0
        self._in_flight = 0  # calls allowed and not yet ended
        self._stale = 0  # of those, the ones allowed before the breaker last opened
        self._probe_out = False
        self._probe_sent_s = 0.0
        self._forgotten = 0  # calls presumed lost whose ends, if they come, are ignored
        self._last_now_s = -math.inf
        self.transitions_total = 0
        self.probes_expired_total = 0

    @property
    def config(self) -> BreakerConfig:
        return self._config

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose ``open_s`` has passed reads half open."""
        self._advance(self._now_s())
        return self._state

    @property
    def in_flight(self) -> int:
        """Calls allowed and not yet ended by ``record`` or ``abandon``."""
        return self._in_flight

    @property
    def probe_in_flight(self) -> bool:
        """True while the half-open probe is out and has not ended."""
        return self._probe_out

    def window_counts(self) -> tuple[int, int]:
        """``(calls, failures)`` counted in the current window."""
        return self._window_counts(self._slice(self._now_s()))

    def allow(self) -> bool:
        """True if a call may go now; in half open, True for one probe at a time."""
        now_s = self._now_s()
        self._advance(now_s)
        if self._state is BreakerState.open:
            return False
        if self._state is BreakerState.half_open:
            if self._probe_out:
                return False
            self._probe_out = True
            self._probe_sent_s = now_s
        self._in_flight += 1
        return True

    def record(self, ok: bool) -> None:
        """End a call that ``allow`` let through, with its outcome.

        Raises ``InvariantError`` if no call is out.
        """
        now_s = self._now_s()
        self._advance(now_s)
        if not self._end_call():
            return
        if self._state is BreakerState.closed:
            self._count(now_s, ok)
            calls, failures = self._window_counts(self._slice(now_s))
            # Dividing keeps a configured rate exact: 3 / 10 >= 0.3, but 0.3 * 10 > 3.
            rate_max = self._config.failure_rate_max
            if calls >= self._config.calls_min and failures / calls >= rate_max:
                self._open(now_s)
        elif ok:
            self._probe_out = False
            self._clear_window()
            self._transition(BreakerState.closed)
        else:
            self._open(now_s)

    def abandon(self) -> None:
        """End a call that ``allow`` let through without an outcome (it was cancelled).

        Nothing is counted. An abandoned probe frees the half-open slot, so the next
        ``allow`` sends another probe. Raises ``InvariantError`` if no call is out.
        """
        self._advance(self._now_s())
        if self._end_call() and self._state is BreakerState.half_open:
            self._probe_out = False

    @contextlib.contextmanager
    def attempt(self) -> Iterator[BreakerCall]:
        """One call through the breaker: ``admitted`` says whether it may go (``allow``);
        an admitted call ends with the verdict given to ``record``, or is abandoned when
        the block raises, is cancelled or ends without one."""
        call = BreakerCall(self.allow())
        if not call.admitted:
            yield call
            return
        try:
            yield call
        except BaseException:
            self.abandon()
            raise
        if call.verdict is None:
            self.abandon()
        else:
            self.record(call.verdict)

    def _end_call(self) -> bool:
        """Count one call as ended; False if it is taken for a stale or forgotten one."""
        if self._in_flight == 0 and self._forgotten > 0:
            self._forgotten -= 1
            return False
        require(self._in_flight > 0, "a breaker call ends only after allow let it through")
        self._in_flight -= 1
        if self._stale > 0:
            self._stale -= 1
            return False
        # Open holds only stale calls; half open, once they ended, only the probe.
        require(self._state is not BreakerState.open, "an open breaker has only stale calls")
        require(
            self._state is BreakerState.closed or self._probe_out,
            "a half-open breaker's current call is its probe",
        )
        return True

    def retry_in_s(self) -> float:
        """Seconds until a call may be allowed again; 0.0 when one may go now.

        Open: the rest of ``open_s``. Half open with the probe out: ``open_s``, the wait if
        the probe fails now (its verdict may come sooner).
        """
        now_s = self._now_s()
        self._advance(now_s)
        if self._state is BreakerState.open:
            return max(0.0, self._opened_at_s + self._config.open_s - now_s)
        if self._state is BreakerState.half_open and self._probe_out:
            return self._config.open_s
        return 0.0

    def _now_s(self) -> float:
        # A monotonic clock never goes back; if an injected one does, time stands still
        # rather than letting buckets or the open period run backwards.
        now_s = max(self._clock(), self._last_now_s)
        self._last_now_s = now_s
        return now_s

    def _advance(self, now_s: float) -> None:
        if self._state is BreakerState.open and now_s >= self._opened_at_s + self._config.open_s:
            self._transition(BreakerState.half_open)
        elif (
            self._probe_out
            and now_s >= self._probe_sent_s + self._config.probe_timeout_s
        ):
            # Half open, and the probe outlived any call's timeout: presumed lost.
            self._forgotten += self._in_flight
            self._in_flight = self._stale = 0
            self._probe_out = False
            self.probes_expired_total += 1

    def _open(self, now_s: float) -> None:
        self._opened_at_s = now_s
        self._probe_out = False
        self._stale = self._in_flight
        self._transition(BreakerState.open)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        require(old is not new, "a breaker transition changes the state")
        self._state = new
        self.transitions_total += 1
        if self._on_transition is not None:
            self._on_transition(old, new)

    def _slice(self, now_s: float) -> int:
        return math.floor(now_s / self._bucket_s)

    def _count(self, now_s: float, ok: bool) -> None:
        current = self._slice(now_s)
        at = current % self._config.buckets
        if self._slices[at] != current:
            self._slices[at] = current
            self._calls[at] = 0
            self._failures[at] = 0
        self._calls[at] += 1
        if not ok:
            self._failures[at] += 1

    def _window_counts(self, current: int) -> tuple[int, int]:
        oldest = current - self._config.buckets + 1
        calls = failures = 0
        for at, held in enumerate(self._slices):
            if oldest <= held <= current:
                calls += self._calls[at]
                failures += self._failures[at]
        return calls, failures

    def _clear_window(self) -> None:
        for at in range(self._config.buckets):
            self._slices[at] = -1
            self._calls[at] = 0
            self._failures[at] = 0


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How often and for how long an idempotent provider call is retried.

    ``attempts_max`` counts every attempt, the first included. ``deadline_s`` bounds the
    time from the first attempt's start to the last attempt's start.
    """

    attempts_max: int = 3
    base_s: float = 0.05
    cap_s: float = 1.0
    deadline_s: float = 5.0

    def check(self) -> None:
        """Raise ValueError naming the first limit that is out of range."""
        checks = [
            (self.attempts_max >= 1, "attempts_max >= 1"),
            (self.base_s > 0, "base_s > 0"),
            (self.cap_s >= self.base_s, "cap_s >= base_s"),
            (self.deadline_s > 0, "deadline_s > 0"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"retry policy: {what}")


def next_delay_s(
    policy: RetryPolicy,
    attempt: int,
    elapsed_s: float,
    retry_after_s: float | None,
    rng: random.Random,
) -> float | None:
    """Seconds to sleep before the next attempt, or None to give up.

    ``attempt`` is the 1-based number of the attempt that just failed and ``elapsed_s`` the
    seconds since the first attempt started. The delay is ``backoff_s``, raised to the
    provider's ``retry_after_s`` when it asked for longer (None or 0.0: it did not ask).
    Gives up when ``attempts_max`` attempts were made, or when the next attempt would start
    at or after ``deadline_s``: an attempt with no time left is not worth sending.

    Raises ``InvariantError`` if ``attempt < 1`` or ``elapsed_s < 0``.
    """
    require(attempt >= 1, "retry attempt >= 1")
    require(elapsed_s >= 0, "retry elapsed_s >= 0")
    if attempt >= policy.attempts_max:
        return None
    delay_s = backoff_s(attempt, base_s=policy.base_s, cap_s=policy.cap_s, rng=rng)
    if retry_after_s is not None and retry_after_s > delay_s:
        delay_s = retry_after_s
    if elapsed_s + delay_s >= policy.deadline_s:
        return None
    return delay_s


class BreakerCall:
    """A call ``CircuitBreaker.attempt`` admitted (or not), and its verdict once known."""

    __slots__ = ("admitted", "verdict")

    def __init__(self, admitted: bool) -> None:
        self.admitted = admitted
        self.verdict: bool | None = None

    def record(self, ok: bool) -> None:
        """The call's outcome: True for a healthy reply (a decline included)."""
        require(self.admitted, "only an admitted call has a verdict")
        self.verdict = ok


class Bulkhead:
    """At most ``limit`` concurrent calls; beyond it, fail fast instead of queueing.

    ``in_flight`` is the number of calls admitted and not yet released, ``rejected_total``
    the number of ``try_acquire`` calls refused since the bulkhead was built.
    """

    def __init__(self, limit: int) -> None:
        require(limit >= 1, "bulkhead limit >= 1")
        self._limit = limit
        self._in_flight = 0
        self.rejected_total = 0
        self.acquired_total = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def try_acquire(self) -> bool:
        """Admit one call and return True, or count a rejection and return False."""
        if self._in_flight >= self._limit:
            self.rejected_total += 1
            return False
        self._in_flight += 1
        self.acquired_total += 1
        return True

    def release(self) -> None:
        """End one admitted call. Raises ``InvariantError`` if none is in flight (a bug)."""
        require(self._in_flight > 0, "bulkhead release matches an acquire")
        self._in_flight -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[bool]:
        """Whether a call is admitted (``try_acquire``); an admitted one is released when
        the block ends, however it ends."""
        if not self.try_acquire():
            yield False
            return
        try:
            yield True
        finally:
            self.release()
