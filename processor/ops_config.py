"""Settings of what observes the processor: metrics, cost accounting and traces."""

from __future__ import annotations

import msgspec

__all__ = ["ObservabilityConfig"]


class ObservabilityConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Metrics, cost accounting and traces."""

    # One scrape endpoint per node (0: any free port, as the tests and the demo use).
    metrics_port: int = 9464
    # What a vCPU-hour costs, to price a transfer: about an on-demand general-purpose cloud
    # vCPU in 2026 (c. USD 0.04); set your own.
    vcpu_hour_price: float = 0.04
    price_currency: str = "USD"
    cost_window_s: float = 60.0
    # Traces: off (the default, no cost on the hot path), console, or otlp (to the endpoint).
    trace_exporter: str = "off"
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0
