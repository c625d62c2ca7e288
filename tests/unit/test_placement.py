"""Where fronts go (processor.placement): one per node by default, this node's first, each on
its node's address, consecutive ports where nodes share a host."""

from __future__ import annotations

import pytest

from processor.placement import (
    FrontPlacement,
    NodeView,
    fronts_document,
    place_fronts,
    place_shards,
)

HERE = NodeView("n-here", "10.0.0.1")
SAME_HOST = NodeView("n-b", "10.0.0.1")  # a second raylet on this machine
OTHER = NodeView("n-a", "10.0.0.2")


def _summary(placements: list[FrontPlacement]) -> list[tuple[str, str, str, int, int]]:
    return [(p.node_id, p.bind_host, p.address, p.http_port, p.rpc_port) for p in placements]


def test_one_front_per_node_this_one_first() -> None:
    """Three nodes, two on this machine: three fronts; the second on this machine takes the
    next ports, the one on another machine the configured ports on its own address."""
    placements = place_fronts([OTHER, SAME_HOST, HERE], here="n-here", host="0.0.0.0",
                              http_port=8080, rpc_port=7070)
    assert [p.index for p in placements] == [0, 1, 2]
    assert _summary(placements) == [
        ("n-here", "0.0.0.0", "10.0.0.1", 8080, 7070),
        ("n-a", "10.0.0.2", "10.0.0.2", 8080, 7070),
        ("n-b", "10.0.0.1", "10.0.0.1", 8081, 7071),
    ]


def test_count_puts_n_fronts_on_this_node() -> None:
    """--fronts N: N fronts on this node only, on consecutive ports, bound to the configured
    host; ports of 0 stay 0 (each binds a free one)."""
    assert _summary(place_fronts([HERE, OTHER], here="n-here", host="127.0.0.1",
                                 http_port=8080, rpc_port=7070, count=3)) == [
        ("n-here", "127.0.0.1", "127.0.0.1", 8080, 7070),
        ("n-here", "127.0.0.1", "127.0.0.1", 8081, 7071),
        ("n-here", "127.0.0.1", "127.0.0.1", 8082, 7072),
    ]
    assert {(p.http_port, p.rpc_port) for p in place_fronts(
        [HERE], here="n-here", host="127.0.0.1", http_port=0, rpc_port=0, count=2)} == {(0, 0)}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"count": -1}, "fronts is 0"),
    ({"count": 65}, "fronts is 0"),
    ({"here": "n-gone"}, "not among the alive nodes"),
    ({"count": 3, "http_port": 65534}, "port 65536"),
])
def test_refused(kwargs: dict[str, object], match: str) -> None:
    """A count out of range, this node missing from the alive ones, or a port past 65535
    are refused before anything starts."""
    arguments: dict[str, object] = {"here": "n-here", "host": "127.0.0.1", "http_port": 8080,
                                    "rpc_port": 7070, **kwargs}
    with pytest.raises(ValueError, match=match):
        place_fronts([HERE], **arguments)  # type: ignore[arg-type]


def test_fronts_document() -> None:
    """fronts.json lists each front's node, HTTP URL and RPC address with the bound ports;
    an IPv6 address is bracketed."""
    placements = [FrontPlacement(index=0, node_id="n1", bind_host="::1", address="::1",
                                 http_port=0, rpc_port=0),
                  FrontPlacement(index=1, node_id="n2", bind_host="10.0.0.2",
                                 address="10.0.0.2", http_port=8080, rpc_port=7070)]
    assert fronts_document(placements, [(40001, 40002), (8080, 7070)], tls=True) == [
        {"node": "n1", "http": "https://[::1]:40001", "rpc": "[::1]:40002"},
        {"node": "n2", "http": "https://10.0.0.2:8080", "rpc": "10.0.0.2:7070"},
    ]


def test_shards_dealt_round_the_nodes_this_one_first() -> None:
    """Shards go round the nodes in the fronts' order: this node, then the others by id."""
    nodes = [OTHER, SAME_HOST, HERE]
    order = ["n-here", *sorted(n.node_id for n in (OTHER, SAME_HOST))]
    assert place_shards(nodes, here="n-here", shards=7) == [order[i % 3] for i in range(7)]
    assert place_shards(nodes, here="n-here", shards=2) == order[:2]
    assert place_shards([HERE], here="n-here", shards=3) == ["n-here"] * 3


@pytest.mark.parametrize(("nodes", "here", "shards", "match"), [
    ([], "n-here", 1, "not among"),
    ([OTHER], "n-here", 1, "not among"),
    ([HERE], "n-here", 0, "at least one shard"),
])
def test_shards_refused(nodes: list[NodeView], here: str, shards: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        place_shards(nodes, here=here, shards=shards)
