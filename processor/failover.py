"""Choosing a front, and what to send again after a failure: the pure part of a client with
several front addresses (``processor.client.Client(addresses=[...])``).

A client keeps one connection at a time, to one front. Clients start at a front drawn at
random (an injected generator), which spreads many clients over the fronts; after a lost
connection the next one is opened to the following front in the list, and connecting goes
round the list (``connect_order``).

A call whose connection broke may or may not have been applied. It is sent again, to
another front, only when sending it twice is harmless (``call_is_safe``, ``next_step``):

* creates of accounts and transfers are idempotent by id (docs/design.md §8): a create the
  lost attempt applied answers ``exists`` the second time (identical fields), and a transfer
  it refused by a rule on the ledger's state answers ``id_already_failed``;
* lookups, history reads and queries change nothing;
* a payments operation only if it reads (``get_*``, ``list_*``) or carries an
  Idempotency-Key (the second attempt replays the first's answer or finds it in progress).
"""

from __future__ import annotations

import enum
import random

__all__ = ["Step", "call_is_safe", "connect_order", "first_index", "next_step",
           "parse_address"]

PORT_MAX = 65535


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:7070"`` for an IPv6 literal) as (host, port).

    Raises ``ValueError`` naming the address when it has no port, an empty host, or a port
    outside 1..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"a front address is host:port, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 1 <= port <= PORT_MAX or not host:
        raise ValueError(f"a front address is host:port with a port 1..{PORT_MAX}, "
                         f"not {text!r}")
    return host, port


def first_index(count: int, rng: random.Random) -> int:
    """The front a new client tries first: one at random, so clients spread over them."""
    if count <= 0:
        raise ValueError("a client needs at least one address")
    return rng.randrange(count)


def connect_order(count: int, start: int, attempts_max: int) -> list[int]:
    """The address indexes to try, in order, when opening a connection: round the list
    from ``start``, ``attempts_max`` times round (every front gets as many attempts as a
    single-address client gives its one)."""
    if count <= 0 or attempts_max <= 0:
        raise ValueError("count and attempts_max must be positive")
    return [(start + i) % count for i in range(count * attempts_max)]


def call_is_safe(operation: str, idempotency_key: str = "") -> bool:
    """Whether a call may be sent twice: every ledger operation (idempotent by id, or a
    read), and a payments ``operation`` that reads or carries an idempotency key.
    Ledger calls pass the operation ``"ledger"``."""
    if operation == "ledger":
        return True
    return operation.startswith(("get_", "list_")) or bool(idempotency_key)


class Step(enum.Enum):
    FAIL_OVER = "fail_over"  # send it again at once, on a new connection (another front)
    RETRY = "retry"  # send it again after the server's retry_after_s
    RAISE = "raise"  # give the error to the caller


def next_step(*, safe: bool, broken: bool, failovers: int, failovers_max: int,
              retries: int, retries_max: int, elapsed_s: float, deadline_s: float) -> Step:
    """What a call does after ``overloaded`` or ``unavailable``.

    ``broken``: the connection it was sent on is gone (the front died or closed it), as
    opposed to a front that answered the error. A broken connection is failed over while
    ``failovers < failovers_max`` and the call is younger than ``deadline_s``; otherwise
    the caller's ``retries_max`` applies, as for a single address. Nothing unsafe is ever
    sent again.
    """
    if not safe:
        return Step.RAISE
    if broken and failovers < failovers_max and elapsed_s < deadline_s:
        return Step.FAIL_OVER
    if retries < retries_max:
        return Step.RETRY
    return Step.RAISE
