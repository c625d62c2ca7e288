"""Operations: metrics, traces and logs for every actor, and the per-node metrics server.

Public interface: ``metrics`` (the Prometheus metrics every process records),
``telemetry`` (structured, redacted logs and OpenTelemetry traces), and
``make_node_metrics`` / ``node_metrics_name`` (one ``/metrics`` endpoint per Ray node).
"""

from __future__ import annotations

from actors.ops import metrics, telemetry
from actors.ops.metrics_server import make_node_metrics, node_metrics_name

__all__ = ["make_node_metrics", "metrics", "node_metrics_name", "telemetry"]
