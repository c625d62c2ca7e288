"""Where the fronts and the shards go: one front per Ray node by default, each on its node's
address, and on ports that do not collide where several nodes share a host; the shards
dealt round the nodes (docs/design.md §12).

``place_fronts`` and ``place_shards`` are pure: the runtime gives them the alive nodes
(``ray.nodes()``) and which one is its own; ``place_fronts`` also the configured host and
ports, and answers one ``FrontPlacement`` per front.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

__all__ = ["FRONTS_MAX", "FrontPlacement", "NodeView", "fronts_document", "place_fronts",
           "place_shards"]

FRONTS_MAX = 64
PORT_MAX = 65535
_WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104 - names of a wildcard bind, compared only


class NodeView(msgspec.Struct, frozen=True):
    """A Ray node as placement sees it: its id and its machine's address."""

    node_id: str
    address: str


class FrontPlacement(msgspec.Struct, frozen=True, kw_only=True):
    """One front: its index (its actor's name), node, bind host, the address clients use,
    and its ports (0: any free one)."""

    index: int
    node_id: str
    bind_host: str
    address: str
    http_port: int
    rpc_port: int


def place_fronts(nodes: Sequence[NodeView], *, here: str, host: str, http_port: int,
                 rpc_port: int, count: int = 0) -> list[FrontPlacement]:
    """The fronts to start, this node's first.

    ``count`` 0: one front per node in ``nodes``; ``count`` N > 0: N fronts, all on node
    ``here`` (tests and development on one machine). The front on node ``here`` binds the
    configured ``host``; a front on another node binds that node's address. Fronts on nodes
    that share an address take consecutive ports (``port + i``); a port of 0 stays 0 (each
    binds a free one). Raises ``ValueError`` for no nodes, ``here`` not among them, a count
    out of 0..``FRONTS_MAX``, or a port that would pass 65535.
    """
    if not 0 <= count <= FRONTS_MAX:
        raise ValueError(f"fronts is 0 (one per node) to {FRONTS_MAX}, not {count}")
    by_id = {node.node_id: node for node in nodes}
    if here not in by_id:
        raise ValueError(f"this node {here!r} is not among the alive nodes")
    others = sorted((n for n in nodes if n.node_id != here), key=lambda n: n.node_id)
    chosen = [by_id[here]] * count if count else [by_id[here], *others]
    if len(chosen) > FRONTS_MAX:
        chosen = chosen[:FRONTS_MAX]
    on_address: dict[str, int] = {}
    placements = []
    for index, node in enumerate(chosen):
        i = on_address.get(node.address, 0)
        on_address[node.address] = i + 1
        bind = host if node.node_id == here else node.address
        placements.append(FrontPlacement(
            index=index, node_id=node.node_id, bind_host=bind,
            address=node.address if bind in _WILDCARDS else bind,
            http_port=_shifted(http_port, i), rpc_port=_shifted(rpc_port, i)))
    return placements


def place_shards(nodes: Sequence[NodeView], *, here: str, shards: int) -> list[str]:
    """The node each shard starts on: dealt round the nodes, node ``here`` first and then
    the others by id (the fronts' order), so ``shards`` over N nodes puts
    ``ceil(shards / N)`` at most on any one.

    It is where a shard starts, not where it must stay: the runtime pins it softly, and
    Ray restarts a shard whose node was lost on a surviving one. Raises ``ValueError`` for
    no nodes, ``here`` not among them, or fewer than one shard.
    """
    if shards < 1:
        raise ValueError(f"at least one shard, not {shards}")
    ids = sorted(n.node_id for n in nodes)
    if here not in ids:
        raise ValueError(f"this node {here!r} is not among the alive nodes")
    order = [here, *(i for i in ids if i != here)]
    return [order[s % len(order)] for s in range(shards)]


def _shifted(port: int, by: int) -> int:
    if port == 0:
        return 0
    if port + by > PORT_MAX:
        raise ValueError(f"front {by} on one host would need port {port + by}")
    return port + by


def fronts_document(placements: Sequence[FrontPlacement], ports: Sequence[tuple[int, int]],
                    *, tls: bool) -> list[dict[str, str]]:
    """``fronts.json``'s content: per front its node, HTTP base URL and RPC address, with
    the ports each front bound (``ports``: (http, rpc) in placement order)."""
    scheme = "https" if tls else "http"
    return [{"node": p.node_id, "http": f"{scheme}://{_host(p.address)}:{http}",
             "rpc": f"{_host(p.address)}:{rpc}"}
            for p, (http, rpc) in zip(placements, ports, strict=True)]


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
