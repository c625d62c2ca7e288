"""processor.ratelimit: token buckets per principal on an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.ratelimit import RateLimiter


def test_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(10, 20)
    assert all(limiter.take("t/a", 1, 0.0).allowed for _ in range(20))
    refused = limiter.take("t/a", 1, 0.0)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(0.1)
    assert limiter.take("t/a", 1, 0.1).allowed
    assert not limiter.take("t/a", 1, 0.1).allowed
    # Other principals have their own buckets.
    assert limiter.take("t/b", 20, 0.1).allowed


def test_a_batch_takes_all_its_operations_or_none() -> None:
    limiter = RateLimiter(100, 1_000)
    assert limiter.take("p", 800, 0.0).allowed
    refused = limiter.take("p", 300, 0.0)
    assert not refused.allowed and refused.remaining == 200
    assert refused.retry_after_s == pytest.approx(1.0)
    assert limiter.take("p", 200, 0.0).allowed  # the refused batch took nothing
    too_big = limiter.take("p", 5_000, 0.0)
    assert not too_big.allowed and too_big.retry_after_s == pytest.approx(10.0)


def test_disabled_allows_everything_and_clock_steps_back_refill_nothing() -> None:
    assert RateLimiter(0, 0).take("p", 10**9, 0.0).allowed
    limiter = RateLimiter(1, 2)
    assert limiter.take("p", 2, 100.0).allowed
    assert not limiter.take("p", 1, 50.0).allowed
    assert limiter.take("p", 1, 101.0).allowed


def test_forgetting_the_idlest_principal_only_hands_it_a_full_bucket() -> None:
    limiter = RateLimiter(1, 5, principals_max=2)
    assert limiter.take("a", 5, 0.0).allowed
    limiter.take("b", 1, 0.0)
    limiter.take("c", 1, 0.0)  # "a" is forgotten
    assert limiter.take("a", 5, 0.0).allowed


def test_policy_names_quota_and_window() -> None:
    assert RateLimiter(1_000, 2_000).policy() == '"principal";q=2000;w=2'


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 1_000), burst=st.integers(1, 5_000),
       steps=st.lists(st.tuples(st.floats(0, 2), st.integers(1, 3_000)), max_size=40))
def test_never_more_than_burst_plus_rate_times_elapsed(
        rate: int, burst: int, steps: list[tuple[float, int]]) -> None:
    """Over any run, what was allowed is at most the burst plus what the rate refilled."""
    limiter = RateLimiter(rate, burst)
    now, allowed = 0.0, 0
    for dt, operations in steps:
        now += dt
        if limiter.take("p", operations, now).allowed:
            allowed += operations
        assert allowed <= burst + rate * now + 1e-6
