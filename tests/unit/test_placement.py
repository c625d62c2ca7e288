"""Where fronts go (processor.placement): one per node by default, this node's first, each on
its node's address, consecutive ports where nodes share a host."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.placement import (
    FrontPlacement,
    NodeView,
    follow_nodes,
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


def _follow(current: list[FrontPlacement], nodes: list[NodeView],
            **ports: int) -> list[FrontPlacement]:
    """The fronts after one round of follow_nodes, by index."""
    kw = {"http_port": 8080, "rpc_port": 7070, **ports}
    change = follow_nodes(current, nodes, here="n-here", host="127.0.0.1", **kw)
    kept = [p for p in current if p.index not in change.retire]
    return sorted([*kept, *change.add], key=lambda p: p.index)


def test_a_lost_node_s_front_is_retired_and_a_new_node_gets_one_on_its_ports() -> None:
    """A raylet on this machine is lost: its front is retired; another joins: it gets a front
    on the lost one's ports and index (both free again), and fronts.json then names it."""
    start = place_fronts([HERE, SAME_HOST, OTHER], here="n-here", host="127.0.0.1",
                         http_port=8080, rpc_port=7070)
    change = follow_nodes(start, [HERE, OTHER], here="n-here", host="127.0.0.1",
                          http_port=8080, rpc_port=7070)
    assert change.retire == (2,) and change.add == ()
    after_loss = _follow(start, [HERE, OTHER])
    joined = NodeView("n-c", "10.0.0.1")
    after_join = _follow(after_loss, [HERE, OTHER, joined])
    assert _summary(after_join) == [
        ("n-here", "127.0.0.1", "127.0.0.1", 8080, 7070),
        ("n-a", "10.0.0.2", "10.0.0.2", 8080, 7070),
        ("n-c", "10.0.0.1", "10.0.0.1", 8081, 7071),
    ]
    assert [p.index for p in after_join] == [0, 1, 2]
    # Nothing changes while the nodes stay.
    assert follow_nodes(after_join, [HERE, OTHER, joined], here="n-here", host="127.0.0.1",
                        http_port=8080, rpc_port=7070) == follow_nodes(
        after_join, [joined, OTHER, HERE], here="n-here", host="x", http_port=8080,
        rpc_port=7070)
    assert _follow(after_join, [HERE, OTHER, joined]) == after_join


def test_this_node_s_front_is_never_retired() -> None:
    start = place_fronts([HERE, OTHER], here="n-here", host="127.0.0.1", http_port=0,
                         rpc_port=0)
    change = follow_nodes(start, [OTHER], here="n-here", host="127.0.0.1", http_port=0,
                          rpc_port=0)
    assert change.retire == ()


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 2)), max_size=30),
       st.sampled_from([(8080, 7070), (0, 0), (0, 7070)]))
def test_fronts_follow_any_history_of_joins_and_losses(
        events: list[tuple[bool, int, int]], ports: tuple[int, int]) -> None:
    """Whatever nodes join (on one of three machines) and leave, after each round: one
    front per alive node, this node's unchanged, indexes distinct, and no two fronts on one
    address share a configured port."""
    http_port, rpc_port = ports
    alive = {"n-here": HERE}
    fronts = place_fronts([HERE], here="n-here", host="127.0.0.1", http_port=http_port,
                          rpc_port=rpc_port)
    first = fronts[0]
    for join, name, machine in events:
        node_id = f"n-{name}"
        if join:
            alive.setdefault(node_id, NodeView(node_id, f"10.0.0.{machine + 1}"))
        else:
            alive.pop(node_id, None)
        fronts = _follow(fronts, list(alive.values()), http_port=http_port, rpc_port=rpc_port)
        assert sorted(p.node_id for p in fronts) == sorted(alive)
        assert fronts[0] == first
        assert len({p.index for p in fronts}) == len(fronts)
        for port in ("http_port", "rpc_port"):
            taken = [(alive[p.node_id].address, getattr(p, port)) for p in fronts
                     if getattr(p, port)]
            assert len(set(taken)) == len(taken), fronts
