"""A processor on a Ray cluster of two nodes (two raylets on this machine): one front per
node, each pinned to its node, the second on the next ports, both in fronts.json and both
serving one ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.test_cli import _free_port_pair


def test_one_front_per_node_on_a_two_node_cluster(tmp_path: Path) -> None:
    """Two nodes give two fronts on two nodes; the driver's node binds the configured host
    and ports, the other its node address on ports + 1; an account created through one
    front is read through the other."""
    http_port = _free_port_pair()
    rpc_port = next(p for p in iter(_free_port_pair, None) if abs(p - http_port) > 1)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TXPROC_DATABASE_URL")}
    done = subprocess.run(
        [sys.executable, "-m", "tests.multinode", str(tmp_path / "data"), str(http_port),
         str(rpc_port)], capture_output=True, text=True, timeout=300, env=env, check=False,
        cwd=Path(__file__).parents[2])
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    report = json.loads(done.stdout.strip().splitlines()[-1])
    fronts = report["fronts"]
    assert len(report["nodes"]) == 2 and len(fronts) == 2, report
    assert sorted(f["node"] for f in fronts) == report["nodes"]
    assert report["actor_nodes"] == [f["node"] for f in fronts]  # each front on its node
    assert fronts[0]["http"] == f"http://127.0.0.1:{http_port}"
    assert fronts[0]["rpc"] == f"127.0.0.1:{rpc_port}"
    # The second raylet shares this machine's address: the next ports on that address.
    assert fronts[1]["http"].endswith(f":{http_port + 1}"), fronts
    assert fronts[1]["rpc"].endswith(f":{rpc_port + 1}"), fronts
    assert report["ready"] == [True, True]
    assert report["ok"] and report["found"] == [True, True], report
