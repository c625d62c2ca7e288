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

__all__ = ["FRONTS_MAX", "FrontPlacement", "FrontsChange", "NodeView", "follow_nodes",
           "fronts_document", "place_fronts", "place_shards"]

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


class FrontsChange(msgspec.Struct, frozen=True):
    """What ``follow_nodes`` decided: the indexes of fronts to retire, the fronts to add."""

    retire: tuple[int, ...] = ()
    add: tuple[FrontPlacement, ...] = ()


def follow_nodes(current: Sequence[FrontPlacement], nodes: Sequence[NodeView], *, here: str,
                 host: str, http_port: int, rpc_port: int) -> FrontsChange:
    """Keep one front per alive node as nodes come and go (``serve`` without ``--fronts``).

    A front whose node is no longer in ``nodes`` is retired (it was pinned there: it cannot
    come back elsewhere, and its address went with its node), except this node's (``here``:
    losing it is losing the process that asks). A node without a front gets one, placed as
    ``place_fronts`` would: binding the node's address, on the lowest port shift that no
    front left on that address uses (a retired front's ports are free again: its process
    died with its node), with the lowest free index (its actor's name). Raises
    ``ValueError`` for a shift past port 65535 or more than ``FRONTS_MAX`` fronts.
    """
    alive = {node.node_id: node for node in nodes}
    retire = tuple(p.index for p in current if p.node_id not in alive and p.node_id != here)
    kept = [p for p in current if p.index not in retire]
    covered = {p.node_id for p in kept}
    indexes = {p.index for p in kept}
    shifts: dict[str, set[int]] = {}
    for p in kept:
        node = alive.get(p.node_id)
        shift = (p.http_port - http_port if http_port
                 else p.rpc_port - rpc_port if rpc_port else 0)
        shifts.setdefault(node.address if node else p.address, set()).add(shift)
    add: list[FrontPlacement] = []
    for node in sorted(alive.values(), key=lambda n: n.node_id):
        if node.node_id in covered:
            continue
        if len(kept) + len(add) >= FRONTS_MAX:
            raise ValueError(f"at most {FRONTS_MAX} fronts")
        index = next(i for i in range(FRONTS_MAX + 1) if i not in indexes)
        indexes.add(index)
        used = shifts.setdefault(node.address, set())
        shift = (next(i for i in range(FRONTS_MAX + 1) if i not in used)
                 if http_port or rpc_port else 0)
        used.add(shift)
        bind = host if node.node_id == here else node.address
        add.append(FrontPlacement(
            index=index, node_id=node.node_id, bind_host=bind,
            address=node.address if bind in _WILDCARDS else bind,
            http_port=_shifted(http_port, shift), rpc_port=_shifted(rpc_port, shift)))
    return FrontsChange(retire=retire, add=tuple(add))


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
