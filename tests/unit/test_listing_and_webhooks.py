"""The pure rules of lists, cursors, metadata (processor/payments/listing.py) and webhook
endpoints (processor/payments/webhooks.py)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.payments import (
    EVENT_TYPES,
    ListError,
    ListQuery,
    Position,
    WebhookEndpointError,
    WebhookEndpointRequest,
    check_endpoint,
    check_list_query,
    check_metadata,
    decode_cursor,
    encode_cursor,
    endpoint_id_of,
    query_of_params,
    secret_text,
)


def _endpoint(url: str, events: list[str] | None = None) -> WebhookEndpointRequest:
    return msgspec.convert({"url": url, "events": events}, WebhookEndpointRequest)


@pytest.mark.parametrize(("url", "ok"), [
    ("https://example.com/hook", True),
    ("http://127.0.0.1:8080/hook?x=1", True),
    ("https://[::1]:443/h", True),
    ("HTTPS://example.com/", False),  # the scheme as written, lower case, like the outbox's
    ("ftp://example.com/", False),
    ("//example.com/hook", False),
    ("https://", False),
    ("https://user@example.com/", False),
    ("https://:pw@example.com/", False),
    ("https://example.com/#frag", False),
    ("https://example.com/#", False),
    ("https://example.com:0/", False),
    ("https://example.com:70000/", False),
    ("https://exa mple.com/", False),
    ("https://exämple.com/", False),
    ("https://example.com/\x7f", False),
    ("https://example.com/" + "a" * (2048 - 20), True),
    ("https://example.com/" + "a" * (2049 - 20), False),
])
def test_endpoint_urls(url: str, ok: bool) -> None:
    """Only absolute http(s) URLs with a host, printable ASCII, no credentials, no fragment,
    a real port, and at most 2048 characters pass; the rest are webhook_url_invalid."""
    if ok:
        assert check_endpoint(_endpoint(url)) == (url, ())
    else:
        with pytest.raises(WebhookEndpointError) as refused:
            check_endpoint(_endpoint(url))
        assert refused.value.code == "webhook_url_invalid"
        assert url not in str(refused.value)  # the URL may carry a token: never echoed


def test_event_types_are_sorted_deduplicated_and_known() -> None:
    """Event types come back sorted without repeats; an unknown one is refused by name."""
    url = "https://example.com/h"
    assert check_endpoint(_endpoint(url, ["payout.paid", "payment.captured", "payout.paid"])
                          ) == (url, ("payment.captured", "payout.paid"))
    assert set(check_endpoint(_endpoint(url, list(EVENT_TYPES)))[1]) == set(EVENT_TYPES)
    with pytest.raises(WebhookEndpointError) as refused:
        check_endpoint(_endpoint(url, ["payment.captured", "payment.exploded"]))
    assert refused.value.code == "webhook_event_type_unknown"
    assert "payment.requires_review" in EVENT_TYPES and "payout.failed" in EVENT_TYPES


def test_endpoint_ids_and_secrets() -> None:
    """Ids derive from the request's identity; secrets show in the Standard Webhooks form."""
    assert endpoint_id_of("ab" * 32) == "we_" + "ab" * 12
    with pytest.raises(ValueError):
        endpoint_id_of("not hex at all, but long enough")
    assert secret_text(bytes(32)) == "whsec_" + "A" * 43 + "="
    with pytest.raises(ValueError):
        secret_text(bytes(16))


@pytest.mark.parametrize(("metadata", "ok"), [
    ({}, True),
    ({f"k{i}": "v" for i in range(20)}, True),
    ({f"k{i}": "v" for i in range(21)}, False),
    ({"k" * 40: "v" * 500}, True),
    ({"k" * 41: "v"}, False),
    ({"": "v"}, False),
    ({"k": "v" * 501}, False),
    ({"k": ""}, True),
    ({"k": 1}, False),
    ({"k": None}, False),
    ({"k\x00": "v"}, False),
    ({"k": "\x00"}, False),
    (["k", "v"], False),
])
def test_metadata_limits(metadata: Any, ok: bool) -> None:
    """At most 20 pairs, keys 1-40 characters, string values up to 500, no U+0000."""
    if ok:
        assert check_metadata(metadata) == metadata
    else:
        with pytest.raises(ListError) as refused:
            check_metadata(metadata)
        assert refused.value.code == "invalid_metadata"


@given(created_us=st.integers(0, 2**62), row_id=st.text(min_size=1, max_size=64),
       kind=st.sampled_from(["payments", "payouts"]))
def test_cursors_round_trip_and_stay_in_their_list(created_us: int, row_id: str,
                                                   kind: str) -> None:
    """A cursor names its position exactly, in URL-safe characters, and no other list
    takes it."""
    cursor = encode_cursor(kind, Position(created_us, row_id))
    assert cursor.isascii() and all(c.isalnum() or c in "-_" for c in cursor)
    if len(cursor) <= 200:
        assert decode_cursor(kind, cursor) == Position(created_us, row_id)
    other = "payouts" if kind == "payments" else "payments"
    with pytest.raises(ListError):
        decode_cursor(other, cursor)


@pytest.mark.parametrize("cursor", ["", "!!!", "W10", "e30", "x" * 201, "é",
                                    encode_cursor("refunds", Position(1, "pay_x")),
                                    encode_cursor("payments", Position(-1, "pay_x"))])
def test_bad_cursors(cursor: str) -> None:
    """Damaged or foreign cursors, and refund cursors not naming a step id, are refused."""
    kind = "refunds" if "cmVmdW5kcy" in cursor else "payments"
    with pytest.raises(ListError) as refused:
        decode_cursor(kind, cursor)
    assert refused.value.code == "invalid_cursor"


def test_query_parameters_become_the_json_form() -> None:
    """Brackets gather into objects and whole numbers become integers; anything unknown or
    repeated is invalid_query."""
    assert query_of_params([("metadata[a]", "1"), ("metadata[b]", "x"), ("limit", "5"),
                            ("created[gte]", "1700000000"), ("created[lt]", "2026-01-01T00:00:00Z"),
                            ("status", "captured"), ("merchant_account_id", "12")]) == {
        "metadata": {"a": "1", "b": "x"}, "limit": 5, "status": "captured",
        "created": {"gte": 1700000000, "lt": "2026-01-01T00:00:00Z"},
        "merchant_account_id": 12}
    for bad in ([("limit", "1"), ("limit", "2")], [("order", "asc")], [("metadata[]", "x")],
                [("created[gt]", "1")], [(f"metadata[{i}]", "v") for i in range(41)]):
        with pytest.raises(ListError) as refused:
            query_of_params(bad)
        assert refused.value.code == "invalid_query"


def _query(**fields: Any) -> ListQuery:
    return msgspec.convert(fields, ListQuery)


@pytest.mark.parametrize(("kind", "fields", "code"), [
    ("payments", {"status": "refunded"}, None),
    ("payments", {"status": "succeeded"}, "invalid_query"),
    ("refunds", {"status": "succeeded"}, None),
    ("payouts", {"status": "paid", "reference": "r-1"}, None),
    ("refunds", {"reference": "r-1"}, "invalid_query"),
    ("payments", {"payment_id": "pay_" + "0" * 24}, "invalid_query"),
    ("payments", {"created": {"gte": "2026-12-01T00:00:00Z"}}, None),
    ("payments", {"created": {"gte": "2026-12-01T00:00:00.5+01:00"}}, None),
    ("payments", {"created": {"gte": "2026-12-01T00:00:00"}}, "invalid_query"),
    ("payments", {"created": {"gte": "2026-12-01"}}, "invalid_query"),
    ("payments", {"created": {"lt": "2026-W48-1T00:00:00Z"}}, "invalid_query"),
    ("payments", {"created": {"lt": 253_402_300_800}}, "invalid_query"),
    ("payments", {"created": {"lt": "0001-01-01T00:00:00+01:00"}}, "invalid_query"),
    ("payments", {"created": {"lt": "1969-12-31T23:59:59Z"}}, "invalid_query"),
    ("payments", {"created": {"lt": "9999-12-31T23:59:59-01:00"}}, "invalid_query"),
    ("payments", {"created": {"lt": "2026-02-30T00:00:00Z"}}, "invalid_query"),
    ("payments", {"metadata": {"k" * 41: "v"}}, "invalid_query"),
    ("payments", {"cursor": encode_cursor("payouts", Position(1, "po_x"))}, "invalid_cursor"),
])
def test_list_queries(kind: str, fields: dict[str, Any], code: str | None) -> None:
    """Each list takes its own statuses and filters; times are RFC 3339 with an offset or
    Unix seconds; a cursor is its list's."""
    if code is None:
        check_list_query(kind, _query(**fields))
    else:
        with pytest.raises(ListError) as refused:
            check_list_query(kind, _query(**fields))
        assert refused.value.code == code


def test_times_become_exact_microseconds() -> None:
    """An offset is applied, fractions kept to the microsecond, seconds taken as they are."""
    flt = check_list_query("payments", _query(created={
        "gte": "1970-01-01T01:00:00.000001+01:00", "lt": 1_700_000_000}))
    assert (flt.created_gte_us, flt.created_lt_us) == (1, 1_700_000_000_000_000)


def _event(key: str, n: int) -> Any:
    from processor.payments.provider import Operation, Outcome, WebhookEvent

    return WebhookEvent(event_id=f"evt_{n}", operation=Operation.CAPTURE, idempotency_key=key,
                        provider_ref="ref", outcome=Outcome.APPROVED, amount=1,
                        occurred_at_s=0.0)


async def test_a_batch_applies_one_steps_events_in_order_and_others_beside_them() -> None:
    """``_apply_events``: the events of one step (its key, "-undo" included) in the order
    they came, each after the one before it finished; another step's meanwhile; results in
    the batch's order; a failure of any is raised."""
    import asyncio

    from actors.payments.endpoints import _apply_events

    log: list[str] = []
    release = asyncio.Event()

    class _Engine:
        settled: dict[str, str] = {}

        async def settle_inert_events(self, provider: str, events: list[Any]
                                      ) -> list[str | None]:
            return [self.settled.get(e.event_id) for e in events]

        async def apply_webhook(self, provider: str, event: Any) -> str:
            log.append(f"start {event.event_id}")
            if event.event_id == "evt_0":
                await release.wait()  # the first of step a waits; step b goes on
            log.append(f"end {event.event_id}")
            if event.event_id == "evt_9":
                raise OSError("database away")
            return f"done {event.event_id}"

    events = [_event("a", 0), _event("b", 1), _event("a-undo", 2), _event("b", 3)]
    task = asyncio.ensure_future(_apply_events(_Engine(), "acme", events))  # type: ignore[arg-type]
    for _ in range(5):
        await asyncio.sleep(0)
    assert log == ["start evt_0", "start evt_1", "end evt_1", "start evt_3", "end evt_3"]
    release.set()
    assert await task == ["done evt_0", "done evt_1", "done evt_2", "done evt_3"]
    assert log[5:] == ["end evt_0", "start evt_2", "end evt_2"]
    with pytest.raises(OSError):
        await _apply_events(_Engine(), "acme", [_event("a", 9), _event("b", 1)])  # type: ignore[arg-type]
    # Events the engine settled together (their steps cannot move) are not applied again.
    log.clear()
    engine = _Engine()
    engine.settled = {"evt_1": "ignored", "evt_3": "duplicate"}
    release.set()
    assert await _apply_events(engine, "acme", events) == [  # type: ignore[arg-type]
        "done evt_0", "ignored", "done evt_2", "duplicate"]
    assert log == ["start evt_0", "end evt_0", "start evt_2", "end evt_2"]
