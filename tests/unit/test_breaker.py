"""processor.payments (breaker): circuit breaker transitions, backoff, retry policy and bulkhead."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.payments import (
    BUCKETS_MAX,
    BreakerConfig,
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    RetryPolicy,
    backoff_s,
    next_delay_s,
)
from processor.types import InvariantError

CLOSED, OPEN, HALF_OPEN = BreakerState.closed, BreakerState.open, BreakerState.half_open


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now_s: float = 1_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def make(config: BreakerConfig | None = None, now_s: float = 1_000.0) -> tuple[
    CircuitBreaker, FakeClock, list[tuple[BreakerState, BreakerState]]
]:
    clock = FakeClock(now_s)
    seen: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        config or BreakerConfig(), clock, on_transition=lambda old, new: seen.append((old, new))
    )
    return breaker, clock, seen


def calls(breaker: CircuitBreaker, oks: int, failures: int) -> None:
    """Run ``oks`` good then ``failures`` failed calls through the breaker."""
    for ok in [True] * oks + [False] * failures:
        assert breaker.allow()
        breaker.record(ok)


def trip(breaker: CircuitBreaker) -> None:
    calls(breaker, 0, breaker.config.calls_min)
    assert breaker.state is OPEN


# --- configuration ------------------------------------------------------------------------


def test_default_config_is_valid_and_matches_the_documented_values() -> None:
    """The defaults pass check() and are the values the provider adapter relies on."""
    config = BreakerConfig()
    config.check()
    assert (config.window_s, config.buckets, config.calls_min) == (30.0, 10, 20)
    assert (config.failure_rate_max, config.open_s, config.probe_timeout_s) == (0.5, 10.0, 30.0)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("window_s", 0.0, "window_s > 0"),
        ("window_s", -1.0, "window_s > 0"),
        ("buckets", 0, "buckets"),
        ("buckets", BUCKETS_MAX + 1, "buckets"),
        ("calls_min", 0, "calls_min >= 1"),
        ("failure_rate_max", 0.0, "failure_rate_max"),
        ("failure_rate_max", 1.01, "failure_rate_max"),
        ("open_s", 0.0, "open_s > 0"),
        ("probe_timeout_s", 0.0, "probe_timeout_s > 0"),
    ],
)
def test_breaker_config_check_names_the_limit(field: str, value: float, named: str) -> None:
    """Each out-of-range limit is refused with a ValueError that names it."""
    config = BreakerConfig(**{field: value})
    with pytest.raises(ValueError, match=named):
        config.check()
    with pytest.raises(ValueError, match=named):
        CircuitBreaker(config, FakeClock())


def test_breaker_config_accepts_the_edges() -> None:
    """One bucket, BUCKETS_MAX buckets and a failure rate of exactly 1 are valid."""
    BreakerConfig(buckets=1).check()
    BreakerConfig(buckets=BUCKETS_MAX).check()
    BreakerConfig(failure_rate_max=1.0, calls_min=1).check()


# --- closed -------------------------------------------------------------------------------


def test_below_calls_min_the_breaker_never_opens() -> None:
    """calls_min - 1 failures in a row leave the breaker closed, however bad the rate."""
    breaker, _, seen = make()
    calls(breaker, 0, 19)
    assert breaker.state is CLOSED
    assert breaker.window_counts() == (19, 19)
    assert seen == []


@pytest.mark.parametrize(
    ("oks", "failures", "state"),
    [
        (10, 10, OPEN),  # 0.5 >= 0.5 at exactly calls_min
        (11, 9, CLOSED),  # 0.45
        (0, 20, OPEN),
        (20, 0, CLOSED),
        (30, 29, CLOSED),  # 29 / 59 < 0.5
        (30, 30, OPEN),  # the 60th call makes it 0.5
    ],
)
def test_opens_when_the_failure_rate_reaches_the_max(
    oks: int, failures: int, state: BreakerState
) -> None:
    """With calls_min calls in the window, a failure rate >= failure_rate_max opens."""
    breaker, _, _ = make()
    calls(breaker, oks, failures)
    assert breaker.state is state


def test_a_good_call_completing_calls_min_can_open() -> None:
    """The rate is judged on every outcome: 10 failures then 10 oks still reads 0.5."""
    breaker, _, _ = make()
    calls(breaker, 0, 10)
    calls(breaker, 9, 0)
    assert breaker.state is CLOSED
    calls(breaker, 1, 0)
    assert breaker.state is OPEN


def test_a_configured_rate_is_compared_exactly() -> None:
    """3 failures in 10 calls reach a failure_rate_max of 0.3 (0.3 * 10 would not)."""
    breaker, _, _ = make(BreakerConfig(calls_min=10, failure_rate_max=0.3))
    calls(breaker, 7, 3)
    assert breaker.state is OPEN


def test_outcomes_leave_the_window_bucket_by_bucket() -> None:
    """Failures older than the window stop counting; the window moves in 3 s buckets."""
    breaker, clock, _ = make()
    calls(breaker, 0, 19)  # at 1000.0: slice 333, the bucket [999, 1002)
    clock.advance(26.9)  # 1026.9: slice 342, nine buckets on: still inside the window
    assert breaker.window_counts() == (19, 19)
    clock.advance(3.1)  # 1030.0: slice 343, the failures' bucket has left
    assert breaker.window_counts() == (0, 0)
    calls(breaker, 0, 1)
    assert breaker.state is CLOSED
    assert breaker.window_counts() == (1, 1)


def test_a_reused_bucket_is_reset_before_it_counts_again() -> None:
    """A bucket slot holding an old slice is emptied when the ring comes round to it."""
    breaker, clock, _ = make(BreakerConfig(window_s=10.0, buckets=2, calls_min=3))
    calls(breaker, 2, 0)  # slice 200, slot 0
    clock.advance(10.0)  # slice 202, slot 0 again
    calls(breaker, 0, 2)
    assert breaker.window_counts() == (2, 2)
    assert breaker.state is CLOSED


def test_clock_going_backwards_does_not_unwind_the_window() -> None:
    """An injected clock that steps back is treated as standing still."""
    breaker, clock, _ = make()
    calls(breaker, 0, 5)
    clock.now_s -= 500.0
    assert breaker.window_counts() == (5, 5)


# --- open and half open -------------------------------------------------------------------


def test_open_refuses_and_counts_down_to_the_probe() -> None:
    """Open refuses every call and retry_in_s counts down open_s to zero, then half open."""
    breaker, clock, seen = make()
    assert breaker.retry_in_s() == 0.0
    trip(breaker)
    assert seen == [(CLOSED, OPEN)]
    assert not breaker.allow()
    assert breaker.retry_in_s() == 10.0
    clock.advance(4.0)
    assert not breaker.allow()
    assert breaker.retry_in_s() == pytest.approx(6.0)
    clock.advance(5.999)
    assert breaker.state is OPEN
    clock.advance(0.001)
    assert breaker.retry_in_s() == 0.0
    assert breaker.state is HALF_OPEN
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    assert breaker.transitions_total == 2


def test_half_open_allows_exactly_one_probe() -> None:
    """Half open grants one probe and refuses everything else while it is out."""
    breaker, clock, _ = make()
    trip(breaker)
    clock.advance(10.0)
    assert breaker.allow()
    assert breaker.probe_in_flight
    assert [breaker.allow() for _ in range(5)] == [False] * 5
    assert breaker.retry_in_s() == 10.0
    assert breaker.state is HALF_OPEN


def test_a_good_probe_closes_with_a_fresh_window() -> None:
    """A probe recorded ok closes the breaker and forgets the failures that opened it."""
    breaker, clock, seen = make()
    trip(breaker)
    clock.advance(10.0)
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state is CLOSED
    assert breaker.window_counts() == (0, 0)
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    calls(breaker, 0, 19)  # a fresh window needs calls_min calls again
    assert breaker.state is CLOSED


def test_a_failed_probe_opens_again_for_open_s() -> None:
    """A probe recorded as failed opens the breaker for a full open_s from that moment."""
    breaker, clock, seen = make()
    trip(breaker)
    clock.advance(12.0)
    assert breaker.allow()
    clock.advance(1.5)
    breaker.record(False)
    assert breaker.state is OPEN
    assert breaker.retry_in_s() == 10.0
    assert not breaker.allow()
    clock.advance(10.0)
    assert breaker.state is HALF_OPEN
    assert seen == [
        (CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN)
    ]


def test_an_abandoned_probe_frees_the_slot() -> None:
    """A cancelled probe given back with abandon() lets the next allow() send a new probe."""
    breaker, clock, seen = make()
    trip(breaker)
    clock.advance(10.0)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.abandon()
    assert breaker.state is HALF_OPEN
    assert not breaker.probe_in_flight
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state is CLOSED
    assert len(seen) == 3


def test_abandon_while_closed_counts_nothing() -> None:
    """An abandoned call while closed ends the call without touching the window."""
    breaker, _, seen = make()
    assert breaker.allow()
    assert breaker.in_flight == 1
    breaker.abandon()
    assert breaker.in_flight == 0
    assert breaker.window_counts() == (0, 0)
    assert seen == []


@pytest.mark.parametrize("end", ["record", "abandon"])
def test_ending_a_call_that_was_never_allowed_is_a_bug(end: str) -> None:
    """record() or abandon() with no call out raises InvariantError."""
    breaker, _, _ = make()
    end_call = breaker.abandon if end == "abandon" else lambda: breaker.record(True)
    with pytest.raises(InvariantError):
        end_call()


def test_late_outcomes_while_open_are_ignored() -> None:
    """Outcomes of calls allowed before the breaker opened neither count nor reopen it."""
    breaker, clock, seen = make()
    for _ in range(3):
        assert breaker.allow()  # three slow calls still out
    trip(breaker)
    assert breaker.in_flight == 3
    breaker.record(True)
    breaker.record(False)
    assert breaker.state is OPEN
    assert breaker.retry_in_s() == 10.0
    clock.advance(10.0)
    assert breaker.state is HALF_OPEN
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    assert breaker.in_flight == 1


def test_a_stale_call_outliving_open_s_cannot_make_room_for_a_second_probe() -> None:
    """A stale call's outcome is taken before the probe's, so one probe is out at a time."""
    breaker, clock, _ = make()
    assert breaker.allow()  # a slow call from before the breaker opened
    trip(breaker)
    clock.advance(10.0)
    assert breaker.allow()  # the probe
    breaker.record(True)  # one of the two ended: taken for the stale call
    assert breaker.state is HALF_OPEN
    assert not breaker.allow()  # the other one is still out
    breaker.record(True)
    assert breaker.state is CLOSED
    assert breaker.in_flight == 0


# Each row: the events after the breaker is built, and the state after each of them.
# "trip" = calls_min failures; "+N" = advance the clock N seconds; "allow" expects True,
# "deny" expects False.
TRANSITIONS = [
    (["trip"], [OPEN]),
    (["trip", "deny", "+9.9", "deny"], [OPEN, OPEN, OPEN, OPEN]),
    (["trip", "+10", "allow", "ok"], [OPEN, HALF_OPEN, HALF_OPEN, CLOSED]),
    (["trip", "+10", "allow", "fail"], [OPEN, HALF_OPEN, HALF_OPEN, OPEN]),
    (["trip", "+10", "allow", "deny", "abandon", "allow", "fail", "+10"],
     [OPEN, HALF_OPEN, HALF_OPEN, HALF_OPEN, HALF_OPEN, HALF_OPEN, OPEN, HALF_OPEN]),
    (["trip", "+100", "allow", "ok", "allow", "ok"],
     [OPEN, HALF_OPEN, HALF_OPEN, CLOSED, CLOSED, CLOSED]),
]


@pytest.mark.parametrize(("events", "states"), TRANSITIONS)
def test_transition_table(events: list[str], states: list[BreakerState]) -> None:
    """Every state transition happens on the event the table says, and no other."""
    breaker, clock, _ = make()
    observed = []
    for event in events:
        if event == "trip":
            trip(breaker)
        elif event.startswith("+"):
            clock.advance(float(event[1:]))
        elif event in ("allow", "deny"):
            assert breaker.allow() is (event == "allow")
        elif event in ("ok", "fail"):
            breaker.record(event == "ok")
        else:
            breaker.abandon()
        observed.append(breaker.state)
    assert observed == states


operations = st.lists(
    st.tuples(
        st.sampled_from(["start", "start", "finish", "finish", "cancel", "advance"]),
        st.integers(0, 50),
        st.floats(0.0, 3.0),
        st.booleans(),
    ),
    min_size=10,
    max_size=100,
)


@settings(max_examples=100, deadline=None)
@given(operations)
def test_never_two_half_open_probes_out_at_once(
    ops: list[tuple[str, int, float, bool]],
) -> None:
    """Under any interleaving of calls, outcomes, cancels and time, no two calls allowed in
    half open are out together, open allows nothing, and the breaker counts the calls out.
    A probe out for probe_timeout_s is presumed lost: the calls out then are never ended."""
    config = BreakerConfig(calls_min=2, window_s=10.0, buckets=5, open_s=2.0,
                           probe_timeout_s=4.0)
    breaker, clock, _ = make(config)
    out: list[BreakerState] = []  # the state each call still out was allowed in
    expired = 0

    def sync() -> BreakerState:
        nonlocal expired
        state = breaker.state  # looking is what expires a lost probe
        if breaker.probes_expired_total != expired:
            expired = breaker.probes_expired_total
            assert HALF_OPEN in out
            out.clear()
        return state

    for kind, pick, seconds, ok in ops:
        state = sync()
        if kind == "start":
            allowed = breaker.allow()
            assert allowed or state is not CLOSED
            assert not (allowed and state is OPEN)
            if allowed:
                out.append(state)
        elif kind == "advance":
            clock.advance(seconds)
        elif out:
            # record and abandon carry no call identity: the breaker gives an ending to a
            # stale call (one out when it opened) before its probe (the Breaker
            # docstring). Calls out beside a probe are exactly the stale ones, so the
            # model ends one of those first; a random one otherwise.
            stale = [i for i, s in enumerate(out) if s is not HALF_OPEN]
            out.pop(stale[pick % len(stale)] if stale and HALF_OPEN in out
                    else pick % len(out))
            if kind == "finish":
                breaker.record(ok)
            else:
                breaker.abandon()
        state = sync()
        assert out.count(HALF_OPEN) <= 1
        assert breaker.in_flight == len(out)
        if state is not HALF_OPEN:
            assert HALF_OPEN not in out
            assert not breaker.probe_in_flight


def test_a_lost_probe_expires_after_probe_timeout_s() -> None:
    """A probe never ended holds the slot for probe_timeout_s, then a new probe may go, and
    the lost probe's late end is ignored."""
    breaker, clock, seen = make(BreakerConfig(probe_timeout_s=30.0))
    trip(breaker)
    clock.advance(10.0)
    assert breaker.allow()  # the probe, which its caller then loses
    clock.advance(29.9)
    assert not breaker.allow()
    assert breaker.probes_expired_total == 0
    clock.advance(0.1)
    assert breaker.state is HALF_OPEN
    assert breaker.probes_expired_total == 1
    assert breaker.in_flight == 0
    assert not breaker.probe_in_flight
    breaker.record(True)  # the lost probe turns up after all: ignored
    assert breaker.state is HALF_OPEN
    assert breaker.allow()
    breaker.record(False)
    assert breaker.state is OPEN
    assert seen[-1] == (HALF_OPEN, OPEN)
    with pytest.raises(InvariantError):
        breaker.record(True)  # nothing out and nothing forgotten left: a bug


def test_a_leaked_call_cannot_wedge_the_breaker_half_open() -> None:
    """A call never ended while closed is stale after opening; it swallows the probe's end,
    and the slot comes free again when the probe times out."""
    breaker, clock, _ = make(BreakerConfig(probe_timeout_s=30.0))
    assert breaker.allow()  # leaked: never recorded nor abandoned
    trip(breaker)
    clock.advance(10.0)
    assert breaker.allow()
    breaker.record(True)  # taken for the stale (leaked) call
    assert not breaker.allow()
    clock.advance(30.0)
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state is CLOSED


def test_an_expired_probe_forgets_the_stale_calls_too() -> None:
    """When a probe expires with stale calls still out, they are forgotten with it, so the
    next probe's outcome is its own verdict."""
    breaker, clock, _ = make(BreakerConfig(probe_timeout_s=30.0))
    assert breaker.allow()  # leaked while closed
    trip(breaker)
    clock.advance(10.0)
    assert breaker.allow()  # the probe, lost too
    clock.advance(30.0)
    assert breaker.allow()
    assert breaker.in_flight == 1
    breaker.record(True)
    assert breaker.state is CLOSED
    assert breaker.probes_expired_total == 1


# --- backoff and retries ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling_s"),
    [(1, 0.05), (2, 0.1), (3, 0.2), (5, 0.8), (6, 1.0), (60, 1.0), (10_000, 1.0)],
)
def test_backoff_ceiling_doubles_up_to_the_cap(attempt: int, ceiling_s: float) -> None:
    """With random() at its top the delay is the ceiling min(cap, base * 2**(attempt-1))."""

    class Top(random.Random):
        def random(self) -> float:
            return 1.0

    assert backoff_s(attempt, base_s=0.05, cap_s=1.0, rng=Top()) == pytest.approx(ceiling_s)


def test_backoff_is_full_jitter() -> None:
    """The delay is spread over [0, ceiling], not bunched at the ceiling."""
    rng = random.Random(7)
    delays = [backoff_s(4, base_s=0.1, cap_s=10.0, rng=rng) for _ in range(2_000)]
    assert min(delays) < 0.05
    assert max(delays) > 0.75
    assert 0.3 < sum(delays) / len(delays) < 0.5  # uniform over [0, 0.8]: mean 0.4


@pytest.mark.parametrize("attempt", [0, -1])
def test_backoff_requires_a_1_based_attempt(attempt: int) -> None:
    """Attempts count from 1; anything lower is a bug."""
    with pytest.raises(InvariantError):
        backoff_s(attempt, base_s=0.05, cap_s=1.0, rng=random.Random(1))


@settings(max_examples=100, deadline=None)
@given(
    attempt=st.integers(1, 5_000),
    base_s=st.floats(0.0, 10.0),
    cap_s=st.floats(0.0, 60.0),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_always_within_zero_and_the_cap(
    attempt: int, base_s: float, cap_s: float, seed: int
) -> None:
    """Whatever the attempt, the delay lies in [0, min(cap, base * 2**(attempt-1))]."""
    delay_s = backoff_s(attempt, base_s=base_s, cap_s=cap_s, rng=random.Random(seed))
    assert 0.0 <= delay_s <= cap_s
    if attempt < 60:
        assert delay_s <= base_s * 2 ** (attempt - 1)


def test_retry_policy_defaults_and_check() -> None:
    """The defaults are valid; each bad limit is named."""
    policy = RetryPolicy()
    policy.check()
    assert (policy.attempts_max, policy.base_s, policy.cap_s, policy.deadline_s) == (
        3, 0.05, 1.0, 5.0
    )
    for changes, named in [
        ({"attempts_max": 0}, "attempts_max"),
        ({"base_s": 0.0}, "base_s > 0"),
        ({"cap_s": 0.01}, "cap_s >= base_s"),
        ({"deadline_s": 0.0}, "deadline_s"),
    ]:
        with pytest.raises(ValueError, match=named):
            RetryPolicy(**changes).check()  # type: ignore[arg-type]


class Fixed(random.Random):
    """random() always answers ``value``: the delay is ``value`` times the ceiling."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("attempt", "elapsed_s", "retry_after_s", "expected"),
    [
        (1, 0.0, None, 0.025),  # half of base_s
        (2, 0.0, None, 0.05),  # half of 2 * base_s
        (3, 0.0, None, None),  # attempts_max reached
        (1, 0.0, 0.0, 0.025),  # Retry-After 0 is no request
        (1, 0.0, 2.0, 2.0),  # the provider asked for longer: wait that long
        (1, 0.0, 0.01, 0.025),  # it asked for less: the backoff stands
        (1, 3.0, 1.999, 1.999),
        (1, 3.0, 2.0, None),  # the next attempt would start at the deadline
        (1, 4.99, None, None),  # 4.99 + 0.025 passes the 5 s deadline
        (2, 4.9, None, 0.05),
    ],
)
def test_next_delay(
    attempt: int, elapsed_s: float, retry_after_s: float | None, expected: float | None
) -> None:
    """The delay is the backoff raised to Retry-After, or None past attempts or deadline."""
    delay_s = next_delay_s(RetryPolicy(), attempt, elapsed_s, retry_after_s, Fixed(0.5))
    if expected is None:
        assert delay_s is None
    else:
        assert delay_s == pytest.approx(expected)


@settings(max_examples=100, deadline=None)
@given(
    attempt=st.integers(1, 10),
    elapsed_s=st.floats(0.0, 10.0),
    retry_after_s=st.one_of(st.none(), st.floats(0.0, 10.0)),
    seed=st.integers(0, 2**32),
)
def test_next_delay_never_passes_the_limits(
    attempt: int, elapsed_s: float, retry_after_s: float | None, seed: int
) -> None:
    """A delay is given exactly when attempts and deadline allow the drawn wait, and it is
    the drawn backoff raised to Retry-After."""
    policy = RetryPolicy()
    delay_s = next_delay_s(policy, attempt, elapsed_s, retry_after_s, random.Random(seed))
    drawn_s = backoff_s(
        attempt, base_s=policy.base_s, cap_s=policy.cap_s, rng=random.Random(seed)
    )
    wait_s = max(drawn_s, retry_after_s or 0.0)
    if attempt >= policy.attempts_max or elapsed_s + wait_s >= policy.deadline_s:
        assert delay_s is None
    else:
        assert delay_s == wait_s
        assert elapsed_s + delay_s < policy.deadline_s
        assert delay_s >= (retry_after_s or 0.0)
        assert delay_s <= max(policy.cap_s, retry_after_s or 0.0)


# --- bulkhead -----------------------------------------------------------------------------


def test_bulkhead_fails_fast_beyond_its_limit() -> None:
    """limit calls are admitted, the next is refused and counted, a release makes room."""
    bulkhead = Bulkhead(2)
    assert [bulkhead.try_acquire() for _ in range(4)] == [True, True, False, False]
    assert (bulkhead.in_flight, bulkhead.rejected_total) == (2, 2)
    bulkhead.release()
    assert bulkhead.in_flight == 1
    assert bulkhead.try_acquire()
    assert not bulkhead.try_acquire()
    assert (bulkhead.in_flight, bulkhead.rejected_total, bulkhead.acquired_total) == (2, 3, 3)


def test_bulkhead_release_without_acquire_is_a_bug() -> None:
    """Releasing more than was acquired raises InvariantError and changes nothing."""
    bulkhead = Bulkhead(1)
    with pytest.raises(InvariantError):
        bulkhead.release()
    assert bulkhead.try_acquire()
    bulkhead.release()
    with pytest.raises(InvariantError):
        bulkhead.release()
    assert bulkhead.in_flight == 0


@pytest.mark.parametrize("limit", [0, -3])
def test_bulkhead_limit_must_be_positive(limit: int) -> None:
    """Zero never means unbounded: a limit below 1 is refused."""
    with pytest.raises(InvariantError):
        Bulkhead(limit)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.lists(st.booleans(), max_size=60))
def test_bulkhead_matches_a_counter(limit: int, acquires: list[bool]) -> None:
    """in_flight never exceeds the limit and equals admitted minus released calls."""
    bulkhead = Bulkhead(limit)
    held = rejected = 0
    for acquire in acquires:
        if acquire:
            if bulkhead.try_acquire():
                held += 1
            else:
                rejected += 1
                assert held == limit
        elif held:
            bulkhead.release()
            held -= 1
        assert bulkhead.in_flight == held <= limit
        assert bulkhead.rejected_total == rejected


# --- the context managers: no call or slot is ever lost ------------------------------------


def test_an_attempt_records_its_verdict() -> None:
    breaker, _, _ = make()
    for _ in range(breaker.config.calls_min):
        with breaker.attempt() as call:
            assert call.admitted
            call.record(False)
    assert breaker.state is OPEN
    assert breaker.in_flight == 0
    with breaker.attempt() as call:
        assert not call.admitted
        with pytest.raises(InvariantError):
            call.record(True)
    assert breaker.in_flight == 0


@pytest.mark.parametrize("ending", ["raises", "cancelled", "no verdict"])
def test_a_probe_that_ends_without_a_verdict_is_abandoned(ending: str) -> None:
    """Raising, cancellation or forgetting the verdict frees the half-open probe slot and
    counts nothing: the next attempt sends a new probe."""
    import asyncio

    breaker, clock, _ = make()
    trip(breaker)
    clock.advance(10.0)
    errors = {"raises": RuntimeError, "cancelled": asyncio.CancelledError}
    if ending in errors:
        with pytest.raises(errors[ending]), breaker.attempt() as call:
            assert call.admitted
            raise errors[ending]()
    else:
        with breaker.attempt() as call:
            assert call.admitted
    assert breaker.state is HALF_OPEN
    assert not breaker.probe_in_flight
    assert breaker.in_flight == 0
    with breaker.attempt() as call:
        assert call.admitted
        call.record(True)
    assert breaker.state is CLOSED


def test_a_bulkhead_slot_is_released_however_the_block_ends() -> None:
    bulkhead = Bulkhead(1)
    with pytest.raises(RuntimeError), bulkhead.slot() as admitted:
        assert admitted
        assert bulkhead.in_flight == 1
        with bulkhead.slot() as second:
            assert not second  # full: refused, and nothing to release
        raise RuntimeError
    assert bulkhead.in_flight == 0
    assert bulkhead.rejected_total == 1
    with bulkhead.slot() as admitted:
        assert admitted
    assert bulkhead.in_flight == 0
