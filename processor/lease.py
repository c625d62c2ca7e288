"""Leases: who runs a piece of work that must run in exactly one place, and since when.

Several fronts (or several incarnations of one actor) may each be able to run the payments
recovery worker, the outbox relay or the reconciliation scheduler; each of those runs under
a *lease*, one row per job (``leases``, migration 0030; the SQL is ``actors/lease.py``). A
row names its ``holder``, a ``fence`` and the instant the lease ends, ``expires_at``, always
on the database's clock, so contenders on machines whose clocks disagree still agree on it.

This module decides, from a row read with the database's clock, what a contender does
(``decide``), and how long a holder may go on trusting a lease it last renewed at a given
moment of its own monotonic clock (``Holding``). The actor applies the decision with a
compare-and-set on ``(holder, fence)``, so two contenders that read the same row cannot both
win: the loser's update matches no row.

The fence increases by one on every change of holder and never otherwise. Work whose write a
stale holder could spoil checks, in the write's own transaction, that the fence it was given
is still the row's (``actors.lease.check_fence``); a successor's takeover has raised it.
"""

from __future__ import annotations

import enum

import msgspec

__all__ = ["Action", "Decision", "Holding", "LeaseConfig", "LeaseRow", "decide"]


class LeaseConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A lease's timing, in seconds.

    ``ttl_s``: how long a lease lasts after its last renewal; a successor may take it over
    once that has passed on the database's clock. ``renew_interval_s``: how often the holder
    renews (and a contender looks). ``margin_s``: how long before the end the holder stops
    trusting an unrenewed lease, for its clock's drift against the database's and the
    renewal's own time on the way there.
    """

    ttl_s: float = 4.0
    renew_interval_s: float = 1.0
    margin_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.renew_interval_s:
            raise ValueError(f"renew_interval_s must be positive, not {self.renew_interval_s}")
        if not 0 < self.margin_s:
            raise ValueError(f"margin_s must be positive, not {self.margin_s}")
        # Two renewals fit in what the holder trusts: one lost renewal costs no lease.
        if not 2 * self.renew_interval_s + self.margin_s <= self.ttl_s:
            raise ValueError(
                "need 2 * renew_interval_s + margin_s <= ttl_s, not "
                f"2 * {self.renew_interval_s} + {self.margin_s} > {self.ttl_s}")


class LeaseRow(msgspec.Struct, frozen=True):
    """A lease as read: its holder, its fence and when it ends (seconds, database clock)."""

    holder: str
    fence: int
    expires_at_s: float


class Action(enum.Enum):
    CREATE = "create"  # no row yet: insert one, fence 1
    RENEW = "renew"  # ours: extend it, the fence unchanged
    TAKE_OVER = "take_over"  # another's, expired: become the holder, the fence plus one
    WAIT = "wait"  # another's, in force: look again later


class Decision(msgspec.Struct, frozen=True):
    """What to do, and the fence the lease has if it succeeds (0 for ``WAIT``)."""

    action: Action
    fence: int


def decide(row: LeaseRow | None, me: str, now_s: float) -> Decision:
    """What contender ``me`` does about ``row`` (None: no row) at ``now_s`` (the database's
    clock, seconds).

    A holder renews its own lease even past its end: nobody took it over (that would have
    changed the holder), so its fence still stands and no one else did the work meanwhile.
    """
    if row is None:
        return Decision(Action.CREATE, 1)
    if row.holder == me:
        return Decision(Action.RENEW, row.fence)
    if now_s >= row.expires_at_s:
        return Decision(Action.TAKE_OVER, row.fence + 1)
    return Decision(Action.WAIT, 0)


class Holding:
    """A holder's own view of its lease, on its monotonic clock (seconds).

    A renewal that succeeded is counted from the moment it was *sent* (``sent_s``): the
    database extended the lease after that, so the lease lasts at least ``ttl_s`` from then
    on the database's clock. The holder trusts it until ``margin_s`` before that end.
    """

    def __init__(self, config: LeaseConfig, fence: int, sent_s: float) -> None:
        self._config = config
        self.fence = fence
        self._trusted_until_s = sent_s + config.ttl_s - config.margin_s

    def renewed(self, sent_s: float) -> None:
        """A renewal sent at ``sent_s`` succeeded."""
        self._trusted_until_s = max(self._trusted_until_s,
                                    sent_s + self._config.ttl_s - self._config.margin_s)

    def valid(self, now_s: float) -> bool:
        """Whether the lease may still be trusted at ``now_s``: past this, a successor may
        hold it (or soon will), and the work must stop."""
        return now_s < self._trusted_until_s

    def remaining_s(self, now_s: float) -> float:
        return max(0.0, self._trusted_until_s - now_s)
