"""The lease's decisions (processor.lease): who creates, renews, takes over or waits, and how
long a holder trusts a lease it renewed."""

from __future__ import annotations

import pytest

from processor.lease import Action, Decision, Holding, LeaseConfig, LeaseRow, decide

CONFIG = LeaseConfig(ttl_s=4.0, renew_interval_s=1.0, margin_s=1.0)


@pytest.mark.parametrize(("row", "now_s", "expected"), [
    # No row yet: the first contender creates it with fence 1.
    (None, 100.0, Decision(Action.CREATE, 1)),
    # Its own lease, in force or past its end (nobody took it): renewed, same fence.
    (LeaseRow("me", 7, 110.0), 100.0, Decision(Action.RENEW, 7)),
    (LeaseRow("me", 7, 90.0), 100.0, Decision(Action.RENEW, 7)),
    # Another's, in force: wait, even one instant before its end.
    (LeaseRow("other", 7, 110.0), 100.0, Decision(Action.WAIT, 0)),
    (LeaseRow("other", 7, 100.000001), 100.0, Decision(Action.WAIT, 0)),
    # Another's, ended (at its end exactly, too): taken over with the next fence.
    (LeaseRow("other", 7, 100.0), 100.0, Decision(Action.TAKE_OVER, 8)),
    (LeaseRow("other", 1, 50.0), 100.0, Decision(Action.TAKE_OVER, 2)),
])
def test_decide(row: LeaseRow | None, now_s: float, expected: Decision) -> None:
    """Each row state gives one action, and a takeover always raises the fence by one."""
    assert decide(row, "me", now_s) == expected


def test_holder_trusts_its_lease_until_the_margin_before_its_end() -> None:
    """A holder counts from when it sent the renewal, and stops trusting margin_s before the
    database could let a successor in."""
    holding = Holding(CONFIG, fence=3, sent_s=10.0)
    assert holding.valid(12.9)
    assert not holding.valid(13.0)  # 10 + ttl 4 - margin 1
    holding.renewed(sent_s=12.0)
    assert holding.valid(14.9)
    assert not holding.valid(15.0)
    assert holding.remaining_s(14.0) == pytest.approx(1.0)
    assert holding.remaining_s(20.0) == 0.0


def test_an_older_renewal_answered_late_does_not_shorten_the_lease() -> None:
    """Renewals are counted by when they were sent; a late answer to an earlier one never
    moves the end back."""
    holding = Holding(CONFIG, fence=1, sent_s=10.0)
    holding.renewed(sent_s=12.0)
    holding.renewed(sent_s=11.0)
    assert holding.valid(14.5)


@pytest.mark.parametrize(("ttl_s", "renew_interval_s", "margin_s"), [
    (4.0, 0.0, 1.0),  # never renewed
    (4.0, 1.0, 0.0),  # no margin for clock drift
    (2.0, 1.0, 0.5),  # one lost renewal would lose the lease
])
def test_config_refuses_timings_that_cannot_hold(ttl_s: float, renew_interval_s: float,
                                                  margin_s: float) -> None:
    """A lease configuration that cannot survive one lost renewal is refused when built."""
    with pytest.raises(ValueError, match=r"renew_interval_s|margin_s"):
        LeaseConfig(ttl_s=ttl_s, renew_interval_s=renew_interval_s, margin_s=margin_s)
