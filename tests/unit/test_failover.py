"""The choices of a client with several fronts (processor.failover): parsing addresses,
spreading clients, the connect order, and what is sent again after which failure."""

from __future__ import annotations

import collections
import random

import pytest

from processor.client import Client
from processor.failover import (
    Step,
    call_is_safe,
    connect_order,
    first_index,
    next_step,
    parse_address,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:7070", ("127.0.0.1", 7070)),
    ("front-2.internal:1", ("front-2.internal", 1)),
    ("[::1]:65535", ("::1", 65535)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    """host:port, with an IPv6 literal in brackets, gives the host and the port."""
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", ":7070", "host:", "host:0", "host:65536",
                                  "host:70x0", "[]:7070", ""])
def test_parse_address_refuses(text: str) -> None:
    """An address without a host or a valid port is refused, naming it."""
    with pytest.raises(ValueError, match="host:port"):
        parse_address(text)


def test_clients_spread_over_the_fronts() -> None:
    """Many clients drawing their first front at random start on every front, about
    evenly; a seeded generator gives the same choice again."""
    rng = random.Random(7)
    counts = collections.Counter(first_index(3, rng) for _ in range(3000))
    assert set(counts) == {0, 1, 2}
    assert min(counts.values()) > 800
    assert first_index(3, random.Random(1)) == first_index(3, random.Random(1))
    with pytest.raises(ValueError, match="at least one"):
        first_index(0, rng)


@pytest.mark.parametrize(("count", "start", "attempts", "expected"), [
    (1, 0, 3, [0, 0, 0]),
    (3, 1, 1, [1, 2, 0]),
    (2, 1, 2, [1, 0, 1, 0]),
])
def test_connect_order_goes_round_the_list(count: int, start: int, attempts: int,
                                           expected: list[int]) -> None:
    """Connecting starts at the current front and goes round, each front tried as often as a
    single-address client tries its one."""
    assert connect_order(count, start, attempts) == expected


@pytest.mark.parametrize(("operation", "key", "safe"), [
    ("ledger", "", True),  # creates idempotent by id, lookups and reads
    ("get_payment", "", True),
    ("list_payments", "", True),
    ("authorize", "k-1", True),  # the second attempt replays the first's answer
    ("authorize", "", False),
    ("capture", "", False),
    ("delete_webhook_endpoint", "", False),
])
def test_call_is_safe(operation: str, key: str, safe: bool) -> None:
    """Only what is harmless to do twice is ever sent twice."""
    assert call_is_safe(operation, key) is safe


BASE = {"safe": True, "broken": True, "failovers": 0, "failovers_max": 2, "retries": 0,
        "retries_max": 0, "elapsed_s": 1.0, "deadline_s": 30.0}


@pytest.mark.parametrize(("changes", "expected"), [
    ({}, Step.FAIL_OVER),  # a broken connection, a safe call: to the next front at once
    ({"safe": False}, Step.RAISE),  # never sent twice, whatever the limits say
    ({"safe": False, "retries_max": 5}, Step.RAISE),
    ({"failovers": 2}, Step.RAISE),  # every front had its try
    ({"failovers": 2, "retries_max": 1}, Step.RETRY),  # then the caller's own retries
    ({"elapsed_s": 30.0}, Step.RAISE),  # too old to send again
    ({"broken": False}, Step.RAISE),  # the front answered unavailable: not a failover
    ({"broken": False, "retries_max": 1}, Step.RETRY),
    ({"broken": False, "retries": 1, "retries_max": 1}, Step.RAISE),
    ({"failovers_max": 0}, Step.RAISE),  # one address: as before
])
def test_next_step(changes: dict[str, object], expected: Step) -> None:
    """After overloaded or unavailable: fail over, retry, or raise, one row per case."""
    assert next_step(**{**BASE, **changes}) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"token": "t"}, "either"),
    ({"host": "h", "port": 1, "addresses": ["h:1"], "token": "t"}, "either"),
    ({"addresses": "h:1", "token": "t"}, "list"),
    ({"addresses": ["h"], "token": "t"}, "host:port"),
    ({"addresses": ["h:1"], "token": "t", "failovers_max": -1}, "failovers_max"),
])
def test_client_refuses_bad_addresses(kwargs: dict[str, object], match: str) -> None:
    """A client is built with one address or a list of them, never neither or both."""
    with pytest.raises(ValueError, match=match):
        Client(**kwargs)  # type: ignore[arg-type]


def test_client_keeps_the_single_address_form() -> None:
    """Client(host, port, token) still builds, and never fails over by default."""
    client = Client("127.0.0.1", 7070, "token")
    assert client._failovers_max == 0
    several = Client(addresses=["127.0.0.1:7070", "127.0.0.1:7071"], token="t",
                     rng=random.Random(3))
    assert several._failovers_max == 2
