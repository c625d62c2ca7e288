"""Traces (OpenTelemetry) and structured logs (JSON lines), set up once per process.

Every actor calls ``setup`` in its constructor with the run's ``ObservabilityConfig``:

* Logs become JSON lines (time, level, logger, message, and the current trace and span ids
  when there is a span), and every message passes ``redact`` first, so a bearer token, a
  JWT, a secret-looking key or a card number that slipped into a message is never written.
* Traces are off by default. Then ``TRACER`` is None and every instrumented place tests it
  before doing anything, so the hot path pays one attribute check, not a span. With
  ``console`` or ``otlp`` a tracer provider with a batch span processor is installed,
  sampling at ``trace_sample_ratio`` (parent-based: a request sampled at the front is
  sampled everywhere it goes).

Trace context crosses Ray actor calls as a small dict (W3C ``traceparent``), passed as an
extra argument: ``carrier()`` on the calling side, ``context_of(carrier)`` on the other.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from processor.cardscan import contains_card_number
from processor.ops_config import ObservabilityConfig

__all__ = [
    "TRACER",
    "JsonFormatter",
    "carrier",
    "context_of",
    "event",
    "redact",
    "setup",
    "span",
]

TRACER: trace.Tracer | None = None
_CONFIGURED: tuple[str, str] | None = None

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_SECRET_WORDS = re.compile(
    r"(?i)((?:api[_-]?key|secret|password|token|authorization)\W{0,3}[=:]\s*)[^\s\"',;]+")
_DIGIT_RUNS = re.compile(r"\d(?:[ -]?\d){12,18}")


def redact(text: str) -> str:
    """``text`` with tokens, secrets and card numbers replaced by ``[redacted]``."""
    text = _JWT.sub("[redacted]", text)
    text = _BEARER.sub(r"\1[redacted]", text)
    text = _SECRET_WORDS.sub(r"\1[redacted]", text)
    if contains_card_number(text):
        text = _DIGIT_RUNS.sub(
            lambda m: "[redacted]" if contains_card_number(m.group(0)) else m.group(0), text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line; messages redacted; the current trace id when there is one."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "service": self._service,
            "message": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                entry.setdefault(key, redact(value) if isinstance(value, str) else value)
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = f"{context.trace_id:032x}"
            entry["span_id"] = f"{context.span_id:016x}"
        if record.exc_info:
            entry["error"] = redact(self.formatException(record.exc_info))[-4000:]
        return json.dumps(entry, ensure_ascii=False)


def setup(config: ObservabilityConfig, service: str, *, level: int = logging.INFO) -> None:
    """JSON logs and (when configured) a tracer for this process; repeated calls are no-ops."""
    global TRACER, _CONFIGURED
    if _CONFIGURED == (service, config.trace_exporter):
        return
    _CONFIGURED = (service, config.trace_exporter)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if config.trace_exporter == "off":
        TRACER = None
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"txproc-{service}"}),
        sampler=ParentBased(TraceIdRatioBased(config.trace_sample_ratio)))
    if config.trace_exporter == "console":
        exporter: Any = ConsoleSpanExporter(out=sys.stderr)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint or None)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    TRACER = provider.get_tracer("txproc")


def carrier() -> dict[str, str] | None:
    """The current trace context for an actor call, or None when tracing is off."""
    if TRACER is None:
        return None
    out: dict[str, str] = {}
    propagate.inject(out)
    return out or None


def context_of(values: dict[str, str] | None) -> otel_context.Context | None:
    return None if not values else propagate.extract(values)


@contextmanager
def span(name: str, *, parent: dict[str, str] | None = None,
         links: list[dict[str, str]] | None = None,
         attributes: dict[str, Any] | None = None) -> Iterator[trace.Span | None]:
    """A span when tracing is on (else nothing at all), child of ``parent`` if given."""
    if TRACER is None:
        yield None
        return
    link_objects = []
    for values in links or ():
        linked = trace.get_current_span(context_of(values)).get_span_context()
        if linked.is_valid:
            link_objects.append(trace.Link(linked))
    with TRACER.start_as_current_span(name, context=context_of(parent), links=link_objects,
                                      attributes=attributes) as current:
        yield current


def event(logger: logging.Logger, message: str, level: int = logging.INFO,
          **fields: Any) -> None:
    """Log ``message`` with ``fields`` as top-level keys of its JSON line."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": fields})
