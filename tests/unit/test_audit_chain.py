"""The audit events' pure part (processor/audit.py): the canonical encoding, the hash chain
and its check, the limits of what an event holds, and the checks of the API's query."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.audit import (
    ACTIONS,
    AUDIT_PAGE_LIMIT_MAX,
    DETAILS_BYTES_MAX,
    GENESIS_DIGEST,
    AuditActor,
    AuditEventError,
    AuditQuery,
    AuditQueryError,
    AuditRecord,
    at_us_of,
    audit_query_of,
    canonical_event,
    chain_digest,
    check_audit_chain,
    decode_audit_cursor,
    encode_audit_cursor,
    event_view,
    next_record,
    record_of_row,
)

OPERATOR = AuditActor(kind="operator", subject="alice")
TOKEN = AuditActor(kind="token", subject="ops-7", tenant="acme", token_id="j" * 32)
AT_US = 1_800_000_000_000_000

# Printable text (letters, digits, punctuation, symbols); details' strings may be any text.
texts = st.text(st.characters(categories=("L", "N", "P", "S")), max_size=12)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63 - 1), 2**63 - 1),
                      st.text(st.characters(blacklist_categories=("Cs",),
                                            blacklist_characters="\x00"), max_size=8))
details = st.dictionaries(texts, st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner,
                                                                             max_size=3),
    max_leaves=6), max_size=4)
event_args = st.fixed_dictionaries({
    "actor": st.sampled_from((OPERATOR, TOKEN)),
    "action": st.sampled_from(sorted(ACTIONS)),
    "target_kind": st.sampled_from(("webhook_endpoint", "signing_key", "token")),
    "target_id": texts,
    "tenant_slot": st.integers(0, 2**63 - 1),
    "details": details,
    "request_id": st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=16),
})


def chain_of(args: list[dict[str, Any]]) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    for i, kwargs in enumerate(args):
        last = records[-1] if records else None
        records.append(next_record(
            previous_id=last.event.id if last else 0,
            previous_digest=last.digest if last else GENESIS_DIGEST,
            at_us=AT_US + i, **kwargs))
    return records


def as_row(record: AuditRecord) -> dict[str, Any]:
    """The record as the database answers it (details as jsonb text, at as a datetime)."""
    e = record.event
    return {"id": e.id, "at": dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
            + dt.timedelta(microseconds=e.at_us), "actor_kind": e.actor.kind,
            "actor_tenant": e.actor.tenant, "actor_subject": e.actor.subject,
            "actor_token_id": e.actor.token_id, "tenant_slot": e.tenant_slot,
            "action": e.action, "target_kind": e.target_kind, "target_id": e.target_id,
            "details": json.dumps(e.details, indent=1), "request_id": e.request_id,
            "digest": record.digest}


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(event_args, min_size=1, max_size=6))
def test_a_chain_as_written_holds_and_survives_the_database(args: list[dict[str, Any]]) -> None:
    """A chain built by next_record checks clean, both as records and as rows read back
    (details re-encoded by jsonb, at as a timestamp), with ids 1..n."""
    records = chain_of(args)
    assert [r.event.id for r in records] == list(range(1, len(records) + 1))
    assert check_audit_chain(records) == []
    assert check_audit_chain([as_row(r) for r in records]) == []
    assert [record_of_row(as_row(r)) for r in records] == [
        msgspec.structs.replace(r, event=msgspec.structs.replace(
            r.event, details=json.loads(json.dumps(r.event.details)))) for r in records]


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(st.lists(event_args, min_size=2, max_size=6), st.data())
def test_an_edited_row_is_named_alone(args: list[dict[str, Any]], data: st.DataObject) -> None:
    """Changing any one column of any one row (digest kept) breaks that row's digest and
    no other's."""
    rows = [as_row(r) for r in chain_of(args)]
    victim = data.draw(st.integers(0, len(rows) - 1))
    column = data.draw(st.sampled_from(("at", "actor_subject", "actor_tenant", "tenant_slot",
                                        "action", "target_id", "details", "request_id")))
    row = rows[victim]
    row[column] = {
        "at": row["at"] + dt.timedelta(microseconds=1),
        "actor_subject": row["actor_subject"] + "x",
        "actor_tenant": row["actor_tenant"] + "x",
        "tenant_slot": row["tenant_slot"] ^ 1,
        "action": next(a for a in sorted(ACTIONS) if a != row["action"]),
        "target_id": row["target_id"] + "x",
        "details": json.dumps({**json.loads(row["details"]), "added": 1}),
        "request_id": row["request_id"] + "x",
    }[column]
    problems = check_audit_chain(rows)
    assert [(p["id"], p["kind"], p["table"]) for p in problems] == [
        (victim + 1, "digest_mismatch", "audit_events")]
    assert problems[0]["found"] == row["digest"].hex() != problems[0]["expected"]


def test_removed_inserted_and_rewritten_rows_are_named() -> None:
    """A row removed from the middle or the start shows as an id gap and a broken link at
    the next row; a row whose digest is recomputed after an edit breaks the next row's
    link; a row appended with a digest that does not link is named."""
    records = chain_of([{"actor": OPERATOR, "action": "dlq.replayed", "target_kind": "dlq",
                         "target_id": str(i)} for i in range(5)])
    middle = records[:2] + records[3:]
    assert [(p["id"], p["kind"]) for p in check_audit_chain(middle)] == [
        (4, "id_gap"), (4, "digest_mismatch")]
    assert check_audit_chain(middle)[0]["expected"] == "3"
    assert [(p["id"], p["kind"]) for p in check_audit_chain(records[1:])] == [
        (2, "id_gap"), (2, "digest_mismatch")]
    edited = msgspec.structs.replace(records[1].event, target_id="forged")
    rewritten = [records[0], AuditRecord(edited, chain_digest(records[0].digest, edited)),
                 *records[2:]]
    assert [(p["id"], p["kind"]) for p in check_audit_chain(rewritten)] == [
        (3, "digest_mismatch")]
    stray = AuditRecord(msgspec.structs.replace(records[4].event, id=6), b"\x01" * 32)
    assert [(p["id"], p["kind"]) for p in check_audit_chain([*records, stray])] == [
        (6, "digest_mismatch")]
    # A check continued from a row already checked needs only the rows after it.
    assert check_audit_chain(records[3:], previous_digest=records[2].digest, first_id=4) == []


def test_the_encoding_is_fixed() -> None:
    """The digest of a given first event is the SHA-256 of zero bytes and the documented
    canonical JSON array: changing the encoding would orphan every stored chain."""
    record = next_record(at_us=AT_US, actor=TOKEN, action="webhook_endpoint.created",
                         target_kind="webhook_endpoint", target_id="we_1", tenant_slot=7,
                         details={"url": "https://example.test/h", "events": ["a", "b"]},
                         request_id="req-1")
    expected = ('["txproc.audit_events.v1",1,1800000000000000,"token","acme","ops-7",'
                f'"{"j" * 32}",7,"webhook_endpoint.created","webhook_endpoint","we_1",'
                '{"events":["a","b"],"url":"https://example.test/h"},"req-1"]').encode()
    assert canonical_event(record.event) == expected
    assert record.digest == hashlib.sha256(GENESIS_DIGEST + expected).digest()


@pytest.mark.parametrize(("change", "says"), [
    ({"action": "keys.rotate"}, "not one of ACTIONS"),
    ({"details": {"amount": 1.5}}, "float"),
    ({"details": {"note": "a\x00b"}}, r"U\+0000"),
    ({"details": {"n": 2**63}}, "64-bit"),
    ({"details": {"a": {"b": {"c": {"d": {"e": 1}}}}}}, "deeper"),
    ({"details": {"big": "x" * DETAILS_BYTES_MAX}}, "at most 4096 bytes"),
    ({"actor": AuditActor(kind="operator", subject="")}, "actor.subject"),
    ({"actor": AuditActor(kind="operator", subject="a\nb")}, "actor.subject"),
    ({"target_kind": "Webhook Endpoint"}, "target_kind"),
    ({"target_id": "x" * 201}, "target_id"),
    ({"request_id": "r" * 129}, "request_id"),
    ({"tenant_slot": -1}, "tenant_slot"),
])
def test_an_event_outside_its_limits_is_refused(change: dict[str, Any], says: str) -> None:
    """One row per limit: the writer refuses the event with a message naming the field."""
    kwargs: dict[str, Any] = {"at_us": AT_US, "actor": OPERATOR, "action": "keys.rotated",
                              "target_kind": "signing_key", "target_id": "k1", **change}
    with pytest.raises(AuditEventError, match=says):
        next_record(**kwargs)


@pytest.mark.parametrize(("params", "expected"), [
    ([], AuditQuery()),
    ([("after", "41"), ("limit", "2")], AuditQuery(after=41, limit=2)),
    ([("cursor", encode_audit_cursor(9)), ("action", "keys.rotated")],
     AuditQuery(after=9, action="keys.rotated")),
    ([("limit", str(AUDIT_PAGE_LIMIT_MAX))], AuditQuery(limit=AUDIT_PAGE_LIMIT_MAX)),
    ([("limit", "0")], "invalid_query"),
    ([("limit", str(AUDIT_PAGE_LIMIT_MAX + 1))], "invalid_query"),
    ([("after", "-1")], "invalid_query"),
    ([("after", "1.5")], "invalid_query"),
    ([("after", str(2**63))], "invalid_query"),
    ([("after", "1"), ("after", "2")], "invalid_query"),
    ([("after", "1"), ("cursor", encode_audit_cursor(1))], "invalid_query"),
    ([("tenant", "x")], "invalid_query"),
    ([("action", "keys.stolen")], "invalid_query"),
    ([("cursor", "not-a-cursor")], "invalid_cursor"),
    ([("cursor", "YWJj")], "invalid_cursor"),
    ([("cursor", encode_audit_cursor(1) + "é")], "invalid_cursor"),
])
def test_the_query_is_checked(params: list[tuple[str, str]], expected: object) -> None:
    """One row per query: a good one becomes its AuditQuery, a bad one its 400 code."""
    if isinstance(expected, AuditQuery):
        assert audit_query_of(params) == expected
        return
    with pytest.raises(AuditQueryError) as caught:
        audit_query_of(params)
    assert caught.value.code == expected


def test_a_view_shows_the_time_and_digest_exactly() -> None:
    """The API's view of an event: its time to the microsecond, the digest in hex, and
    the cursor of a page names the last id."""
    moment = dt.datetime(2026, 12, 1, 8, 30, 15, 123456, tzinfo=dt.UTC)
    record = next_record(at_us=at_us_of(moment), actor=OPERATOR, action="keys.retired",
                         target_kind="signing_key", target_id="k0")
    view = event_view(record)
    assert dt.datetime.fromisoformat(view.at) == moment
    assert (view.digest, view.id, view.actor.kind) == (record.digest.hex(), 1, "operator")
    assert decode_audit_cursor(encode_audit_cursor(2**63 - 1)) == 2**63 - 1
