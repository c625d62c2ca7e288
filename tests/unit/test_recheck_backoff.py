"""How soon a parked payment step is asked again (processor.payments.recheck_delay_s)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.payments import PaymentsConfig, recheck_delay_s

RULES = PaymentsConfig(recheck_s=1.0, recheck_max_s=60.0)


def test_the_first_recheck_comes_after_recheck_s() -> None:
    assert recheck_delay_s(0, RULES, random.Random(1)) == 1.0


@given(checks=st.integers(min_value=0, max_value=10_000), seed=st.integers())
def test_every_delay_lies_between_recheck_s_and_recheck_max_s(checks: int, seed: int) -> None:
    delay_s = recheck_delay_s(checks, RULES, random.Random(seed))
    assert RULES.recheck_s <= delay_s <= RULES.recheck_max_s


def test_the_ceiling_doubles_per_look_until_the_cap() -> None:
    """The largest delay seen over many draws grows like 1 + 2^(checks-1), capped."""
    for checks, ceiling_s in ((1, 2.0), (3, 5.0), (5, 17.0), (8, 60.0), (40, 60.0)):
        rng = random.Random(checks)
        largest = max(recheck_delay_s(checks, RULES, rng) for _ in range(2_000))
        assert ceiling_s * 0.9 <= largest <= ceiling_s


def test_jitter_spreads_steps_parked_together() -> None:
    rng = random.Random(7)
    delays = {round(recheck_delay_s(6, RULES, rng), 3) for _ in range(100)}
    assert len(delays) > 50


def test_review_comes_no_sooner_than_the_backoff_cap() -> None:
    with pytest.raises(ValueError, match="review_after_s"):
        PaymentsConfig(recheck_max_s=60.0, review_after_s=30.0).check()
    PaymentsConfig(recheck_max_s=60.0, review_after_s=60.0).check()
