"""Audit events: operator and configuration actions, recorded as a hash chain.

Every action that changes how txproc runs rather than what it books (a signing key
rotated, a token revoked, a webhook endpoint created, dead letters replayed, a payment
step in review handed back) appends one *audit event* (migration 0025, ``audit_events``):
who did it (a token's tenant, subject and id, or the operating-system user of a ``txproc``
command), what (a stable dotted ``action`` and its target), when, and the request id.

The events form one chain: each row's digest is ``SHA-256(previous digest || canonical
encoding of the row)``, the first row's previous digest 32 zero bytes, and ids run 1, 2,
3, ... without gaps (the writer takes the next id and the previous digest under one lock,
actors/ops/audit_events.py). Editing a row breaks its digest; removing or inserting one
breaks the id sequence and the next row's digest; rewriting the chain from some row to its
end is only visible against a digest kept elsewhere: every ledger anchor records the
chain's head (migration 0026), and ``check_audit_anchors`` holds the table to it.

This module is the pure part: the encoding, the digests, the checks that ``txproc verify``
runs (``check_audit_chain``, ``check_audit_anchors``), and the checks of the API's query.
It does no I/O and reads no clock: the writer passes the time in.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict

import msgspec

from processor.errors import TxprocError

__all__ = [
    "ACTIONS",
    "AUDIT_EVENTS_TABLE",
    "AUDIT_PAGE_LIMIT_DEFAULT",
    "AUDIT_PAGE_LIMIT_MAX",
    "DETAILS_BYTES_MAX",
    "DIGEST_BYTES",
    "GENESIS_DIGEST",
    "ActorKind",
    "AuditActor",
    "AuditActorView",
    "AuditEvent",
    "AuditEventError",
    "AuditEventView",
    "AuditEventsPage",
    "AuditHead",
    "AuditQuery",
    "AuditQueryError",
    "AuditRecord",
    "AuditTargetView",
    "ChainProblem",
    "at_us_of",
    "audit_query_of",
    "canonical_event",
    "chain_digest",
    "check_audit_anchors",
    "check_audit_chain",
    "decode_audit_cursor",
    "encode_audit_cursor",
    "event_view",
    "next_record",
    "record_of_row",
]

AUDIT_EVENTS_TABLE = "audit_events"
DIGEST_BYTES = 32
GENESIS_DIGEST = bytes(DIGEST_BYTES)
# Names the encoding inside every digest, so a later encoding can never collide with it.
_ENCODING = "txproc.audit_events.v1"

# The stable names of the actions recorded, ``<target kind>.<what happened>``. A writer
# refuses any other, so a misspelt name fails its test instead of splitting a history.
ACTIONS = frozenset({
    "keys.rotated",                       # txproc keys rotate
    "keys.retired",                       # txproc keys retire
    "token.revoked",                      # txproc token revoke (--jti, or --tenant --subject)
    "client_key.created",                 # txproc keys create-client
    "client_key.revoked",                 # txproc keys revoke-client
    "webhook_endpoint.created",           # POST /v1/webhook_endpoints, txproc webhooks add
    "webhook_endpoint.deleted",           # DELETE /v1/webhook_endpoints/{id}, webhooks remove
    "dlq.replayed",                       # txproc dlq replay
    "payment_step.review_resolved",       # txproc payments review retry
    "schema.migrated",                    # txproc migrate (when it applied something)
    "reconciliation_exception.resolved",  # POST /v1/reconciliation/exceptions/{id}/resolve
    "subject.erased",                     # txproc erase
    "tenant.personal_user_data",          # txproc tenants personal-user-data
    "ledger.shard_moved",                 # txproc move-shard
})
ActorKind = Literal["token", "operator", "service"]
_ACTOR_KINDS = ("token", "operator", "service")

# Limits of what one event holds.
TEXT_CHARS_MAX = 200                  # subject, tenant, token id, target kind and id
REQUEST_ID_CHARS_MAX = 128            # as actors/edge/audit.py records X-Request-Id
DETAILS_BYTES_MAX = 4096              # the canonical JSON of ``details``
DETAILS_DEPTH_MAX = 4
_INT_MAX = 2**63 - 1
_ID_MAX = 2**63 - 1
_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")

AUDIT_PAGE_LIMIT_DEFAULT = 100
AUDIT_PAGE_LIMIT_MAX = 1000
_CURSOR_PREFIX = "audit_events:"
_CURSOR_CHARS_MAX = 64
_QUERY_NAMES = frozenset({"after", "cursor", "limit", "action"})
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


class AuditEventError(ValueError):
    """An audit event that may not be written (the message names the field)."""


class AuditActor(msgspec.Struct, frozen=True, kw_only=True):
    """Who acted: a token (``tenant``, ``subject``, ``token_id`` of its claims), an
    operator (``subject`` is the operating-system user running ``txproc``), or the service
    itself (``subject`` names the part of it, e.g. ``reconciliation``)."""

    kind: ActorKind
    subject: str
    tenant: str = ""
    token_id: str = ""


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One audit event as the chain encodes it. ``at_us``: microseconds since the Unix
    epoch (the database's clock at the write). ``tenant_slot``: the tenant the action
    concerns (processor.identity.tenant_slot), whose ``audit:read`` tokens see it; 0 for
    an action on the whole processor, seen only by the processor's own token."""

    id: int
    at_us: int
    actor: AuditActor
    tenant_slot: int
    action: str
    target_kind: str
    target_id: str
    details: dict[str, Any]
    request_id: str


class AuditRecord(msgspec.Struct, frozen=True):
    """An event and its digest: ``chain_digest(previous record's digest, event)``."""

    event: AuditEvent
    digest: bytes


class ChainProblem(TypedDict):
    """One broken thing, as ``txproc verify`` reports it."""

    table: str
    id: int
    kind: str
    expected: str
    found: str


def _check_text(field: str, value: object, chars_max: int, *, empty: bool = True) -> None:
    if not isinstance(value, str):
        raise AuditEventError(f"{field} must be text, got {type(value).__name__}")
    if not empty and not value:
        raise AuditEventError(f"{field} must not be empty")
    if len(value) > chars_max or not value.isprintable():
        raise AuditEventError(f"{field} must be at most {chars_max} printable characters")


def _check_value(path: str, value: object, depth: int) -> None:
    """JSON made of objects, arrays, text, whole numbers, booleans and null: what
    PostgreSQL's jsonb gives back exactly as it was given (no floats, no U+0000)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -_INT_MAX <= value <= _INT_MAX:
            raise AuditEventError(f"{path} is beyond a 64-bit integer")
        return
    if isinstance(value, str):
        if "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise AuditEventError(f"{path} holds U+0000 or a lone surrogate")
        return
    if depth >= DETAILS_DEPTH_MAX:
        raise AuditEventError(f"{path} nests deeper than {DETAILS_DEPTH_MAX} levels")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(f"{path}[{i}]", item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditEventError(f"{path} has a key that is not text")
            _check_value(f"{path}.{key}", key, depth + 1)
            _check_value(f"{path}.{key}", item, depth + 1)
        return
    raise AuditEventError(f"{path} is a {type(value).__name__}; details hold JSON without "
                          "floats")


def _check_event(event: AuditEvent) -> None:
    """Raise ``AuditEventError`` unless ``event`` may be written as it is."""
    if not 1 <= event.id <= _ID_MAX:
        raise AuditEventError(f"id must be from 1 to {_ID_MAX}")
    if not 0 <= event.at_us <= _INT_MAX:
        raise AuditEventError("at_us must be microseconds since the Unix epoch")
    actor = event.actor
    if actor.kind not in _ACTOR_KINDS:
        raise AuditEventError(f"actor.kind must be one of {', '.join(_ACTOR_KINDS)}")
    _check_text("actor.subject", actor.subject, TEXT_CHARS_MAX, empty=False)
    _check_text("actor.tenant", actor.tenant, TEXT_CHARS_MAX)
    _check_text("actor.token_id", actor.token_id, TEXT_CHARS_MAX)
    if not 0 <= event.tenant_slot <= _ID_MAX:
        raise AuditEventError("tenant_slot must be a tenant's slot, or 0")
    if event.action not in ACTIONS:
        raise AuditEventError(f"action {event.action!r} is not one of ACTIONS")
    if _KIND.fullmatch(event.target_kind) is None:
        raise AuditEventError("target_kind must be a lower-case name")
    _check_text("target_id", event.target_id, TEXT_CHARS_MAX)
    _check_text("request_id", event.request_id, REQUEST_ID_CHARS_MAX)
    if not isinstance(event.details, dict):
        raise AuditEventError("details must be a JSON object")
    _check_value("details", event.details, 0)
    if len(_json(event.details)) > DETAILS_BYTES_MAX:
        raise AuditEventError(f"details must encode to at most {DETAILS_BYTES_MAX} bytes")


def _json(value: object) -> bytes:
    """Canonical JSON: keys sorted, no spaces, UTF-8 as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def canonical_event(event: AuditEvent) -> bytes:
    """The bytes an event's digest covers: a JSON array of every column but the digest,
    in a fixed order, as canonical JSON (``details`` with its keys sorted)."""
    actor = event.actor
    return _json([_ENCODING, event.id, event.at_us, actor.kind, actor.tenant, actor.subject,
                  actor.token_id, event.tenant_slot, event.action, event.target_kind,
                  event.target_id, event.details, event.request_id])


def chain_digest(previous: bytes, event: AuditEvent) -> bytes:
    """``SHA-256(previous || canonical_event(event))``: 32 bytes. Raises ``ValueError``
    unless ``previous`` is 32 bytes."""
    if len(previous) != DIGEST_BYTES:
        raise ValueError(f"a previous digest is {DIGEST_BYTES} bytes, got {len(previous)}")
    return hashlib.sha256(previous + canonical_event(event)).digest()


def next_record(*, previous_id: int = 0, previous_digest: bytes = GENESIS_DIGEST,
                at_us: int, actor: AuditActor, action: str, target_kind: str,
                target_id: str, tenant_slot: int = 0,
                details: Mapping[str, Any] | None = None, request_id: str = "",
                ) -> AuditRecord:
    """The record that follows the chain's last row (its id and digest; 0 and
    ``GENESIS_DIGEST`` for an empty chain): the next id, and its digest. Raises
    ``AuditEventError`` for an event that may not be written."""
    event = AuditEvent(
        id=previous_id + 1, at_us=at_us, actor=actor, tenant_slot=tenant_slot,
        action=action, target_kind=target_kind, target_id=target_id,
        details=dict(details or {}), request_id=request_id)
    _check_event(event)
    return AuditRecord(event, chain_digest(previous_digest, event))


def at_us_of(moment: dt.datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime, exactly."""
    return (moment - _EPOCH) // _MICROSECOND


def _at_of(at_us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=at_us)


def record_of_row(row: Mapping[str, Any]) -> AuditRecord:
    """The record of a row of ``audit_events`` as the database answers it (an asyncpg
    Record or a dict with the table's column names; ``details`` as JSON text or a dict,
    ``at`` as an aware datetime)."""
    details = row["details"]
    if isinstance(details, str | bytes):
        details = json.loads(details)
    at = row["at"]
    event = AuditEvent(
        id=int(row["id"]), at_us=at if isinstance(at, int) else at_us_of(at),
        actor=AuditActor(kind=row["actor_kind"], subject=row["actor_subject"],
                         tenant=row["actor_tenant"], token_id=row["actor_token_id"]),
        tenant_slot=int(row["tenant_slot"]), action=row["action"],
        target_kind=row["target_kind"], target_id=row["target_id"], details=details,
        request_id=row["request_id"])
    return AuditRecord(event, bytes(row["digest"]))


def check_audit_chain(rows: Iterable[AuditRecord | Mapping[str, Any]], *,
                      previous_digest: bytes = GENESIS_DIGEST,
                      first_id: int = 1) -> list[ChainProblem]:
    """Every break in a run of ``audit_events`` rows given in id order: an id that is not
    the one after the row before (``id_gap``: a row removed or inserted; the first row's
    id must be ``first_id``) and a digest that is not ``SHA-256(the row before's stored
    digest || this row)`` (``digest_mismatch``: this row edited, or the one before it
    removed or edited along with its digest). Empty when the chain holds.

    Each row is checked against the stored digest of the row before it, so one edited row
    is named alone. ``previous_digest`` and ``first_id`` continue a check from a row
    already checked (by default the chain is checked from its start). Digests are
    reported in hex."""
    problems: list[ChainProblem] = []
    expected_id = first_id
    previous = previous_digest
    for row in rows:
        record = row if isinstance(row, AuditRecord) else record_of_row(row)
        event = record.event
        if event.id != expected_id:
            problems.append(ChainProblem(table=AUDIT_EVENTS_TABLE, id=event.id,
                                         kind="id_gap", expected=str(expected_id),
                                         found=str(event.id)))
        expected = chain_digest(previous, event)
        if expected != record.digest:
            problems.append(ChainProblem(table=AUDIT_EVENTS_TABLE, id=event.id,
                                         kind="digest_mismatch", expected=expected.hex(),
                                         found=record.digest.hex()))
        expected_id = event.id + 1
        previous = record.digest if len(record.digest) == DIGEST_BYTES else expected
    return problems


class AuditHead(msgspec.Struct, frozen=True):
    """The chain's head as a ledger anchor recorded it (migration 0026): the last event's
    ``id`` and ``digest`` when anchor ``anchor_id`` was written (0 and
    ``GENESIS_DIGEST``: the log was empty)."""

    anchor_id: int
    id: int
    digest: bytes


def check_audit_anchors(heads: Iterable[AuditHead], stored: Mapping[int, bytes], *,
                        last_id: int) -> list[ChainProblem]:
    """Every anchored head the table no longer holds as it was: an event the anchor named
    that is gone (``anchored_event_missing``: the log's tail truncated, or the row removed)
    or whose digest is not the one anchored (``anchored_digest_mismatch``: the chain
    rewritten from that event back). ``stored`` is the stored digest of each event a head
    names that the table holds; ``last_id`` the table's last id (0: empty). Each distinct
    head is reported once, with the first anchor that named it."""
    problems: list[ChainProblem] = []
    seen: set[tuple[int, bytes]] = set()
    for head in heads:
        if (head.id, head.digest) in seen:
            continue
        seen.add((head.id, head.digest))
        if head.id == 0:  # the log was empty; an anchor saying otherwise was forged
            if head.digest != GENESIS_DIGEST:
                problems.append(ChainProblem(
                    table="ledger_anchors", id=head.anchor_id, kind="anchored_digest_mismatch",
                    expected=GENESIS_DIGEST.hex(), found=head.digest.hex()))
            continue
        digest = stored.get(head.id)
        if digest is None:
            problems.append(ChainProblem(
                table=AUDIT_EVENTS_TABLE, id=head.id, kind="anchored_event_missing",
                expected=f"event {head.id} (anchor {head.anchor_id})",
                found=f"last event {last_id}" if head.id > last_id else "no such event"))
        elif digest != head.digest:
            problems.append(ChainProblem(
                table=AUDIT_EVENTS_TABLE, id=head.id, kind="anchored_digest_mismatch",
                expected=f"{head.digest.hex()} (anchor {head.anchor_id})",
                found=digest.hex()))
    return problems


# -- reading: the API's and the CLI's view -------------------------------------------------


class AuditActorView(msgspec.Struct, frozen=True, kw_only=True):
    kind: ActorKind
    subject: str
    tenant: str
    token_id: str


class AuditTargetView(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    id: str


class AuditEventView(msgspec.Struct, frozen=True, kw_only=True):
    """An audit event as ``GET /v1/audit-events`` and ``txproc audit list`` show it."""

    id: int
    at: str
    actor: AuditActorView
    action: str
    target: AuditTargetView
    tenant_slot: int
    details: dict[str, Any]
    request_id: str
    digest: str


class AuditEventsPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[AuditEventView]
    next_cursor: str | None


def event_view(record: AuditRecord) -> AuditEventView:
    event = record.event
    actor = event.actor
    return AuditEventView(
        id=event.id, at=_at_of(event.at_us).isoformat(),
        actor=AuditActorView(kind=actor.kind, subject=actor.subject, tenant=actor.tenant,
                             token_id=actor.token_id),
        action=event.action, target=AuditTargetView(kind=event.target_kind,
                                                    id=event.target_id),
        tenant_slot=event.tenant_slot, details=event.details, request_id=event.request_id,
        digest=record.digest.hex())


class AuditQueryError(TxprocError, ValueError):
    """A query of the audit events that cannot be answered: ``code`` is
    ``invalid_query`` or ``invalid_cursor`` (HTTP 400)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class AuditQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Events with ids above ``after``, oldest first, at most ``limit``, of ``action``
    only when given."""

    after: int = 0
    limit: int = AUDIT_PAGE_LIMIT_DEFAULT
    action: str | None = None


def encode_audit_cursor(last_id: int) -> str:
    """The opaque cursor of the page after the event ``last_id``."""
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{last_id}".encode()).decode()


def decode_audit_cursor(cursor: str) -> int:
    """The id a cursor of ``encode_audit_cursor`` continues after. Raises
    ``AuditQueryError`` (``invalid_cursor``) for anything else."""
    refused = AuditQueryError("invalid_cursor", "the cursor is not one this list gave")
    if not cursor.isascii() or len(cursor) > _CURSOR_CHARS_MAX:
        raise refused
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise refused from exc
    number = text.removeprefix(_CURSOR_PREFIX)
    if number == text or not (number.isascii() and number.isdigit()) or len(number) > 19:
        raise refused
    if not 0 <= int(number) <= _ID_MAX:
        raise refused
    return int(number)


def _whole(name: str, text: str, low: int, high: int) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 19) or not (
            low <= int(text) <= high):
        raise AuditQueryError("invalid_query", f"{name} is a whole number from {low} to {high}")
    return int(text)


def audit_query_of(items: Iterable[tuple[str, str]]) -> AuditQuery:
    """The query of ``GET /v1/audit-events`` from its parameters: ``after`` (an event id)
    or ``cursor`` (a page's ``next_cursor``), ``limit`` (1 to 1000, 100 by default) and
    ``action`` (one of ``ACTIONS``), each at most once. Raises ``AuditQueryError``."""
    pairs = list(items)
    names = [name for name, _ in pairs]
    if set(names) - _QUERY_NAMES or len(names) != len(set(names)):
        raise AuditQueryError("invalid_query",
                              "the query takes after or cursor, limit and action, once each")
    values = dict(pairs)
    if "after" in values and "cursor" in values:
        raise AuditQueryError("invalid_query", "give after or cursor, not both")
    after = 0
    if "after" in values:
        after = _whole("after", values["after"], 0, _ID_MAX)
    elif "cursor" in values:
        after = decode_audit_cursor(values["cursor"])
    limit = AUDIT_PAGE_LIMIT_DEFAULT
    if "limit" in values:
        limit = _whole("limit", values["limit"], 1, AUDIT_PAGE_LIMIT_MAX)
    action = values.get("action")
    if action is not None and action not in ACTIONS:
        raise AuditQueryError("invalid_query", "action is an audit action such as "
                                               "keys.rotated")
    return AuditQuery(after=after, limit=limit, action=action)
