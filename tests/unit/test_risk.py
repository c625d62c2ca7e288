"""processor.risk: rule precedence, the fallback policy and the bounded velocity window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.risk import (
    EVENTS_PER_TOKEN_MAX,
    FallbackCause,
    RiskConfig,
    RiskDecision,
    RiskReason,
    VelocityWindow,
    evaluate,
    fallback,
)
from processor.types import AMOUNT_MAX, InvariantError

R = RiskReason
CONFIG = RiskConfig(blocked_tokens=frozenset({"pm_blocked"}))


def test_default_config_is_valid_and_matches_the_documented_values() -> None:
    """The defaults pass check() and hold the documented limits."""
    config = RiskConfig()
    config.check()
    assert config.amount_max == {
        "USD": 1_000_000, "EUR": 1_000_000, "GBP": 1_000_000, "JPY": 100_000_000
    }
    assert config.fallback_allow_below == {
        "USD": 10_000, "EUR": 10_000, "GBP": 10_000, "JPY": 1_000_000
    }
    assert (config.velocity_max, config.velocity_window_s, config.timeout_s) == (5, 60.0, 0.05)
    assert config.blocked_tokens == frozenset()


def test_default_dicts_are_not_shared_between_configs() -> None:
    """Each config gets its own default dicts, so one cannot change another's limits."""
    assert RiskConfig().amount_max is not RiskConfig().amount_max


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"velocity_max": 0}, "velocity_max >= 1"),
        ({"velocity_max": EVENTS_PER_TOKEN_MAX + 1}, "velocity_max <= 64"),
        ({"velocity_window_s": 0.0}, "velocity_window_s > 0"),
        ({"velocity_tokens_max": 0}, "velocity_tokens_max >= 1"),
        ({"timeout_s": 0.0}, "timeout_s > 0"),
        ({"amount_max": {"XXY": 5}, "fallback_allow_below": {}}, r"amount_max\[XXY\] is ISO"),
        ({"amount_max": {"USD": 0}, "fallback_allow_below": {}}, r"amount_max\[USD\]"),
        ({"amount_max": {"USD": AMOUNT_MAX + 1}, "fallback_allow_below": {}},
         r"amount_max\[USD\]"),
        ({"amount_max": {"USD": 100}, "fallback_allow_below": {"EUR": 1}},
         r"fallback_allow_below\[EUR\] has amount_max"),
        ({"amount_max": {"USD": 100}, "fallback_allow_below": {"USD": 102}},
         r"fallback_allow_below\[USD\] <= amount_max\[USD\] \+ 1"),
        ({"amount_max": {"USD": 100}, "fallback_allow_below": {"USD": -1}},
         r"0 <= fallback_allow_below\[USD\]"),
    ],
)
def test_config_check_names_the_limit(changes: dict[str, object], named: str) -> None:
    """Each out-of-range limit is refused with a ValueError that names it."""
    with pytest.raises(ValueError, match=named):
        RiskConfig(**changes).check()  # type: ignore[arg-type]


def test_config_check_accepts_the_edges() -> None:
    """A threshold of amount_max + 1 (allows every amount the rules allow) and 0 are valid,
    and so is the largest velocity_max a window can count to."""
    RiskConfig(velocity_max=EVENTS_PER_TOKEN_MAX).check()
    RiskConfig(amount_max={"USD": 100}, fallback_allow_below={"USD": 101}).check()
    RiskConfig(amount_max={"USD": AMOUNT_MAX}, fallback_allow_below={"USD": 0}).check()


# Each row: amount, currency, token, recent_count -> reason. Several rows break more than one
# rule, to pin the precedence blocked -> currency -> amount -> velocity.
RULES = [
    (1, "USD", "pm_1", 0, R.passed),
    (1_000_000, "USD", "pm_1", 4, R.passed),  # at the amount limit, one under velocity
    (100_000_000, "JPY", "pm_1", 0, R.passed),
    (1_000_001, "USD", "pm_1", 0, R.amount_over_limit),
    (100_000_001, "JPY", "pm_1", 0, R.amount_over_limit),
    (1, "USD", "pm_1", 5, R.velocity_exceeded),
    (1, "USD", "pm_1", 50, R.velocity_exceeded),
    (1, "CHF", "pm_1", 0, R.currency_not_allowed),  # known currency, no limit configured
    (1, "usd", "pm_1", 0, R.currency_not_allowed),
    (1, "USD", "pm_blocked", 0, R.payment_method_blocked),
    # Precedence.
    (1_000_001, "USD", "pm_1", 5, R.amount_over_limit),
    (AMOUNT_MAX, "CHF", "pm_1", 5, R.currency_not_allowed),
    (AMOUNT_MAX, "CHF", "pm_blocked", 5, R.payment_method_blocked),
    (1_000_001, "USD", "pm_blocked", 0, R.payment_method_blocked),
    (1, "USD", "pm_blocked", 9, R.payment_method_blocked),
]


@pytest.mark.parametrize(("amount", "currency", "token", "recent", "reason"), RULES)
def test_rules(amount: int, currency: str, token: str, recent: int, reason: RiskReason) -> None:
    """The first broken rule decides; only passed is allowed; the source is the rules."""
    decision = evaluate(
        CONFIG, amount=amount, currency=currency, payment_method=token, recent_count=recent
    )
    assert decision == RiskDecision(
        allowed=reason is R.passed, reason=reason, source="rules", fallback_cause=""
    )


@pytest.mark.parametrize(("amount", "recent"), [(0, 0), (-5, 0), (AMOUNT_MAX + 1, 0), (1, -1)])
def test_rules_refuse_arguments_the_api_never_passes(amount: int, recent: int) -> None:
    """A non-positive or oversized amount, or a negative count, is a bug: InvariantError."""
    with pytest.raises(InvariantError):
        evaluate(CONFIG, amount=amount, currency="USD", payment_method="pm", recent_count=recent)


# Each row: amount, currency -> allowed by the fallback.
FALLBACK = [
    (1, "USD", True),
    (9_999, "USD", True),
    (10_000, "USD", False),  # at the threshold: declined
    (10_001, "EUR", False),
    (999_999, "JPY", True),
    (1_000_000, "JPY", False),
    (1, "CHF", False),  # no threshold for the currency: declined
    (AMOUNT_MAX, "GBP", False),
]


@pytest.mark.parametrize(("amount", "currency", "allowed"), FALLBACK)
@pytest.mark.parametrize("cause", ["timeout", "unavailable"])
def test_fallback(amount: int, currency: str, allowed: bool, cause: FallbackCause) -> None:
    """Strictly below the currency's threshold is allowed, anything else declined."""
    decision = fallback(CONFIG, amount=amount, currency=currency, cause=cause)
    reason = (
        R.fallback_allowed_below_threshold if allowed
        else R.fallback_declined_at_or_above_threshold
    )
    assert decision == RiskDecision(
        allowed=allowed, reason=reason, source="fallback", fallback_cause=cause
    )


def test_fallback_refuses_an_unknown_cause() -> None:
    """The cause is timeout or unavailable; anything else is a bug."""
    with pytest.raises(InvariantError):
        fallback(CONFIG, amount=1, currency="USD", cause="slow")  # type: ignore[arg-type]


def test_reasons_are_a_closed_set() -> None:
    """The reasons are exactly the documented ones, with stable string values."""
    assert [reason.value for reason in RiskReason] == [
        "passed",
        "payment_method_blocked",
        "currency_not_allowed",
        "amount_over_limit",
        "velocity_exceeded",
        "fallback_allowed_below_threshold",
        "fallback_declined_at_or_above_threshold",
    ]


# --- velocity window ----------------------------------------------------------------------


def test_velocity_counts_within_the_window_only() -> None:
    """An event counts while now - t < window_s and stops counting at exactly window_s."""
    window = VelocityWindow(60.0, tokens_max=10)
    assert window.add("pm_1", 100.0) == 1
    assert window.add("pm_1", 130.0) == 2
    assert window.count("pm_1", 159.999) == 2
    assert window.count("pm_1", 160.0) == 1
    assert window.count("pm_1", 190.0) == 0
    assert len(window) == 0  # an empty token is forgotten
    assert window.count("pm_other", 190.0) == 0


def test_velocity_is_per_token() -> None:
    """Events of one token do not count for another."""
    window = VelocityWindow(60.0, tokens_max=10)
    for _ in range(3):
        window.add("pm_1", 0.0)
    window.add("pm_2", 0.0)
    assert (window.count("pm_1", 1.0), window.count("pm_2", 1.0)) == (3, 1)


def test_velocity_forgets_the_least_recently_used_token() -> None:
    """Beyond tokens_max tokens, the one used longest ago is evicted and counted."""
    window = VelocityWindow(60.0, tokens_max=2)
    window.add("a", 0.0)
    window.add("b", 1.0)
    assert window.count("a", 2.0) == 1  # "a" is now the most recently used
    window.add("c", 3.0)  # evicts "b"
    assert len(window) == 2
    assert window.evicted_total == 1
    assert (window.count("a", 4.0), window.count("b", 4.0), window.count("c", 4.0)) == (1, 0, 1)


def test_velocity_count_saturates_at_the_per_token_cap() -> None:
    """A token keeps at most events_per_token_max timestamps: its count stops there."""
    window = VelocityWindow(60.0, tokens_max=2, events_per_token_max=3)
    counts = [window.add("a", float(second)) for second in range(6)]
    assert counts == [1, 2, 3, 3, 3, 3]
    assert window.count("a", 62.5) == 3  # the newest three: 3, 4 and 5 s


def test_velocity_keeps_a_token_in_order_when_time_steps_back() -> None:
    """An event older than the token's newest is stored as the newest."""
    window = VelocityWindow(10.0, tokens_max=2)
    window.add("a", 100.0)
    window.add("a", 50.0)  # taken as 100.0
    assert window.count("a", 109.0) == 2
    assert window.count("a", 110.0) == 0


@pytest.mark.parametrize(
    ("window_s", "tokens_max", "events_max"), [(0.0, 1, 1), (1.0, 0, 1), (1.0, 1, 0)]
)
def test_velocity_limits_must_be_positive(
    window_s: float, tokens_max: int, events_max: int
) -> None:
    """Zero never means unbounded: each limit must be positive."""
    with pytest.raises(InvariantError):
        VelocityWindow(window_s, tokens_max, events_per_token_max=events_max)


def test_velocity_window_and_rules_together() -> None:
    """Five authorizations of one token in a minute pass, the sixth is refused."""
    window = VelocityWindow(CONFIG.velocity_window_s, CONFIG.velocity_tokens_max)
    reasons = []
    for second in range(7):
        recent = window.count("pm_1", float(second))
        decision = evaluate(
            CONFIG, amount=100, currency="USD", payment_method="pm_1", recent_count=recent
        )
        reasons.append(decision.reason)
        if decision.allowed:
            window.add("pm_1", float(second))
    assert reasons == [R.passed] * 5 + [R.velocity_exceeded] * 2
    assert window.count("pm_1", 60.0) == 4  # the event at 0 s has left the window


velocity_events = st.lists(
    st.tuples(
        st.sampled_from(["add", "count"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.floats(0.0, 5.0),  # time passing before the event
    ),
    max_size=80,
)


@settings(max_examples=100, deadline=None)
@given(velocity_events)
def test_velocity_matches_a_naive_model(events: list[tuple[str, str, float]]) -> None:
    """With room for every token and event, counts equal a list of every event kept forever;
    with less room, memory stays within the limits."""
    window_s = 7.0
    exact = VelocityWindow(window_s, tokens_max=4, events_per_token_max=100)
    small = VelocityWindow(window_s, tokens_max=2, events_per_token_max=2)
    history: dict[str, list[float]] = {}
    now_s = 0.0
    for kind, token, step_s in events:
        now_s += step_s
        naive = sum(1 for t_s in history.get(token, []) if now_s - t_s < window_s)
        if kind == "add":
            history.setdefault(token, []).append(now_s)
            assert exact.add(token, now_s) == naive + 1
            assert small.add(token, now_s) <= min(naive + 1, 2)
        else:
            assert exact.count(token, now_s) == naive
            assert small.count(token, now_s) <= min(naive, 2)
        assert len(small) <= 2


def test_a_retried_request_counts_once_and_not_against_itself() -> None:
    """An event carrying an id the window holds for the token is the same request again."""
    window = VelocityWindow(60.0, tokens_max=10)
    assert window.add("pm_1", 0.0, "pay_a") == 1
    assert window.add("pm_1", 1.0, "pay_a") == 1  # the retry: not added again
    assert window.count("pm_1", 2.0, "pay_a") == 0  # the retry is judged without itself
    assert window.count("pm_1", 2.0, "pay_b") == 1  # another request sees it once
    assert window.add("pm_1", 2.0, "pay_b") == 2
    assert window.add("pm_1", 3.0) == 3  # events without an id are never the same
    assert window.add("pm_1", 3.0) == 4
    # Once the first has left the window, its id is forgotten with it.
    assert window.count("pm_1", 60.0, "pay_a") == 3
    assert window.add("pm_1", 60.0, "pay_a") == 4


async def test_the_risk_actor_judges_a_retry_as_the_first_time() -> None:
    """With velocity_max 2, a request retried three times neither uses up the token's
    allowance nor is declined by its own earlier attempts."""
    from actors.risk import RiskActor

    now = [100.0]
    actor = RiskActor(RiskConfig(velocity_max=2), clock_s=lambda: now[0])
    for _ in range(3):
        decision = await actor.check(500, "EUR", "pm_card", "pay_retried")
        assert decision.allowed, decision
        now[0] += 1.0
    assert (await actor.check(500, "EUR", "pm_card", "pay_second")).allowed
    third = await actor.check(500, "EUR", "pm_card", "pay_third")
    assert not third.allowed and third.reason == RiskReason.velocity_exceeded
    # The retried ones are still answered as before, each the same request.
    assert (await actor.check(500, "EUR", "pm_card", "pay_second")).allowed


def test_a_discarded_event_is_as_if_never_added() -> None:
    window = VelocityWindow(60.0, 10)
    window.add("pm_1", 0.0, "pay_a")
    window.add("pm_1", 1.0, "pay_b")
    assert window.holds("pm_1", "pay_a") and not window.holds("pm_1", "")
    assert window.discard("pm_1", "pay_a")
    assert not window.discard("pm_1", "pay_a")  # once
    assert not window.discard("pm_1", "")  # events without an id are never taken back
    assert not window.discard("pm_2", "pay_b")  # another token's
    assert window.count("pm_1", 2.0) == 1
    assert window.discard("pm_1", "pay_b")
    assert len(window) == 0  # the token's slot is given back with its last event
    assert window.add("pm_1", 3.0, "pay_a") == 1


async def test_the_risk_actor_says_what_it_counted_and_takes_it_back() -> None:
    """``counted`` is set only by the check that added the request; ``forget`` takes it
    back, so the token's allowance is as before."""
    from actors.risk import RiskActor

    actor = RiskActor(RiskConfig(velocity_max=1), clock_s=lambda: 100.0)
    first = await actor.check(500, "EUR", "pm_card", "pay_repeat")
    assert first.allowed and first.counted
    again = await actor.check(500, "EUR", "pm_card", "pay_repeat")
    assert again.allowed and not again.counted
    assert await actor.forget("pm_card", "pay_repeat")
    assert not await actor.forget("pm_card", "pay_repeat")
    assert (await actor.check(500, "EUR", "pm_card", "pay_other")).allowed
