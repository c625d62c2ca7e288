"""A processor on a Ray cluster of two nodes on this machine (``ray.cluster_utils.Cluster``:
two raylets), run as its own process so that its Ray is not the test session's:

    python -m tests.multinode DATA_DIR HTTP_PORT RPC_PORT

It starts the cluster and the processor (embedded PostgreSQL, one shard, no payments),
checks that each node got a front on its own address and ports, creates accounts through
one front and reads them through the other with a client given both addresses, prints a
JSON report on its last line, and stops everything it started (its own raylets only).
Used by tests/e2e/test_multinode.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import ray
from ray.cluster_utils import Cluster

from actors.app.runtime import FRONTS_FILE, start_processor
from processor.client import Client
from processor.codes import AccountResult
from processor.config import (
    Config,
    FrontConfig,
    ObservabilityConfig,
    PaymentsSection,
    ShardConfig,
)
from processor.identity import SCOPES, issue_token, load_or_create_ring
from processor.types import Account

READY_ROUNDS_MAX = 240  # 0.25 s each


async def _ready(url: str) -> bool:
    async with httpx.AsyncClient(timeout=2) as http:
        for _ in range(READY_ROUNDS_MAX):
            try:
                if (await http.get(f"{url}/readyz")).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    return False


async def run(data_dir: Path, http_port: int, rpc_port: int, address: str) -> dict[str, object]:
    config = Config(
        shard=ShardConfig(database_url="", shards=1),
        front=FrontConfig(host="127.0.0.1", http_port=http_port, rpc_port=rpc_port),
        data_dir=str(data_dir), ray_address=address,
        payments=PaymentsSection(enabled=False),
        observability=ObservabilityConfig(metrics_port=0))
    processor = await start_processor(config)
    try:
        fronts = json.loads((data_dir / FRONTS_FILE).read_text())
        ready = [await _ready(f["http"]) for f in fronts]
        actor_nodes = [await f.actor.node_id.remote() for f in processor.fronts]
        now_s = int(time.time())
        ring = load_or_create_ring(data_dir, now_s=now_s)
        token = issue_token(ring.active.secret, SCOPES, ttl_s=600, now_s=now_s)
        ids = [7_000_001, 7_000_002]
        first, second = (f["rpc"] for f in fronts[:2])
        async with Client(addresses=[first], token=token) as one:
            created = await one.create_accounts([Account(id=i, currency="EUR") for i in ids])
        async with Client(addresses=[second], token=token) as other:
            found = await other.lookup_accounts(ids)
        return {"fronts": fronts, "ready": ready, "actor_nodes": actor_nodes,
                "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
                "created": [int(c) for c in created],
                "found": [a is not None for a in found],
                "ok": created == [AccountResult.ok] * 2}
    finally:
        await processor.stop()


def main() -> int:
    data_dir, http_port, rpc_port = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    data_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        report = asyncio.run(run(data_dir, http_port, rpc_port, cluster.address))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
