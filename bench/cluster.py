"""A Ray cluster of several nodes on this one machine, for runs that lose a node.

Each node is a raylet of its own (``ray.cluster_utils.Cluster``): a head and workers, one
CPU each, so that placement spreads actors over them. Removing a worker kills its raylet
and everything on it, as losing a machine would. Used by ``bench.chaos --nodes`` and the
node-loss test (``tests/nodeloss.py``).
"""

from __future__ import annotations

import time

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["HEALTH_CHECK", "local_cluster", "until_schedulable"]

# The GCS declares a raylet dead after this many missed health checks this far apart (Ray's
# defaults, 3 s and 5, take some 15 s; docs/design.md §12 "Losing a node"): shorter here so
# that a run waits less for what it shows.
HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
SCHEDULABLE_ROUNDS_MAX = 2400  # 0.1 s each


def local_cluster(workers: int) -> tuple[Cluster, list[object]]:
    """A started head and ``workers`` worker nodes, every one schedulable; the cluster and
    its worker nodes (for ``cluster.remove_node``). The caller shuts the cluster down."""
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "_system_config": HEALTH_CHECK})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
        cluster.wait_for_nodes()
        until_schedulable(cluster.address, [n.node_id for n in nodes])
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, nodes


@ray.remote(num_cpus=0)
def _where() -> str:
    return str(ray.get_runtime_context().get_node_id())


def until_schedulable(address: str, node_ids: list[str]) -> None:
    """Wait until a soft pin to each node lands there: a node the GCS lists may not yet be
    in the head raylet's view of the cluster, and a soft pin to it then goes elsewhere."""
    ray.init(address=address, log_to_driver=False)
    try:
        for node_id in node_ids:
            strategy = NodeAffinitySchedulingStrategy(node_id, soft=True)
            for _ in range(SCHEDULABLE_ROUNDS_MAX):
                if ray.get(_where.options(scheduling_strategy=strategy).remote()) == node_id:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"node {node_id} never schedulable")
    finally:
        ray.shutdown()
