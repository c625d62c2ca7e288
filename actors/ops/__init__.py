"""Operations: metrics, traces and logs for every actor, the per-node metrics server, and
the audit events of operator and configuration actions.

Public interface: ``metrics`` (the Prometheus metrics every process records),
``telemetry`` (structured, redacted logs and OpenTelemetry traces),
``make_node_metrics`` / ``node_metrics_name`` (one ``/metrics`` endpoint per Ray node),
and ``audit_events`` (``record_audit_event``, the one writer of ``audit_events``, with the
listing and the chain check; docs/security.md "Audit events").

Its names are imported when first read (``processor.lazy``): a command that records an
audit event does not load the metrics server, which brings Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from processor.lazy import lazy_exports

if TYPE_CHECKING:
    from actors.ops import audit_events, metrics, telemetry
    from actors.ops.audit_events import operator_actor, record_audit_event
    from actors.ops.metrics_server import make_node_metrics, node_metrics_name

__all__ = [
    "audit_events",
    "make_node_metrics",
    "metrics",
    "node_metrics_name",
    "operator_actor",
    "record_audit_event",
    "telemetry",
]

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(__name__, {
        "actors.ops": ("audit_events", "metrics", "telemetry"),
        "actors.ops.audit_events": ("operator_actor", "record_audit_event"),
        "actors.ops.metrics_server": ("make_node_metrics", "node_metrics_name"),
    })
