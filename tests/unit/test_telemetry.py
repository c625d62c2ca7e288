"""Traces across a (simulated) actor boundary, JSON logs with trace ids, and redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.ops import telemetry


def card_like() -> str:
    """A Luhn-valid 16-digit number made at run time (none is written in the repository)."""
    body = "4" + "0" * 14
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return body + str((10 - total % 10) % 10)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    saved = telemetry.TRACER
    telemetry.TRACER = provider.get_tracer("test")
    try:
        yield exporter
    finally:
        telemetry.TRACER = saved


def test_tracing_off_makes_no_spans_and_no_carrier() -> None:
    saved = telemetry.TRACER
    telemetry.TRACER = None
    try:
        assert telemetry.carrier() is None
        with telemetry.span("anything") as current:
            assert current is None
    finally:
        telemetry.TRACER = saved


def test_context_crosses_an_actor_call_and_batches_link_their_requests(
        spans: InMemorySpanExporter) -> None:
    requests = []
    for name in ("request-a", "request-b"):
        with telemetry.span(name):
            requests.append(telemetry.carrier())
    assert all(c and "traceparent" in c for c in requests)
    # The shard side: a batch span linking the requests it carries...
    with telemetry.span("shard.batch", links=[c for c in requests if c]):
        commit_link = telemetry.carrier()
    # ...and a commit span linking the batch.
    with telemetry.span("postgres.commit", links=[commit_link] if commit_link else []):
        pass
    # The provider side: a child of the caller's span, received as a carrier.
    with telemetry.span("saga.step"):
        parent = telemetry.carrier()
    with telemetry.span("provider.call", parent=parent):
        pass
    finished = {s.name: s for s in spans.get_finished_spans()}
    batch = finished["shard.batch"]
    assert {link.context.trace_id for link in batch.links} == {
        finished["request-a"].context.trace_id, finished["request-b"].context.trace_id}
    assert finished["postgres.commit"].links[0].context.span_id == batch.context.span_id
    call = finished["provider.call"]
    assert call.parent is not None
    assert call.parent.span_id == finished["saga.step"].context.span_id
    assert call.context.trace_id == finished["saga.step"].context.trace_id


def test_json_lines_carry_the_trace_id(spans: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(telemetry.JsonFormatter("test"))
    logger = logging.getLogger("txproc.test.telemetry")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with telemetry.span("request") as current:
            telemetry.event(logger, "provider call", provider="acme", attempt=2)
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert current is not None
    assert inside["trace_id"] == f"{current.get_span_context().trace_id:032x}"
    assert (inside["provider"], inside["attempt"], inside["message"]) == (
        "acme", 2, "provider call")
    assert "trace_id" not in outside


def test_tokens_secrets_and_card_numbers_never_reach_a_log_line() -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJsb2NhbCJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    card = card_like()
    spaced = " ".join(card[i:i + 4] for i in range(0, 16, 4))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(telemetry.JsonFormatter("test"))
    logger = logging.getLogger("txproc.test.redaction")
    logger.addHandler(handler)
    try:
        logger.warning("got Authorization: Bearer %s and token %s", jwt, jwt)
        logger.warning("api_key=acme_sk_abcdef123456 secret: hunter22 for %s", "x")
        logger.warning("card %s and %s and order 1234567", card, spaced)
        telemetry.event(logger, "call", logging.WARNING, note=f"pan {card}")
        try:
            raise ValueError(f"bad card {card}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    for secret in (jwt, card, spaced, "acme_sk_abcdef123456", "hunter22"):
        assert secret not in text
    assert "order 1234567" in text  # short numbers are left alone
    assert text.count("[redacted]") >= 6
