"""A request's audit record, handed by the edge to the payments actor to write.

The edge writes an audit record (``audit_requests``, migration 0012) for every
state-changing request before it applies anything of it (actors/edge/audit.py); its id is
the request's *origin*, stamped on what the request creates. For an authorization, the
request on the path of every payment, that INSERT was a statement, a commit and a round trip
of its own, waited on before the request could go on, and so for every payments request
that claims an Idempotency-Key. The edge now hands the record to the payments actor
instead, in a header of its own (``AUDIT_HEADER``; one a client sent is dropped), and the
payments actor writes it in the request's first statement: the one that creates the
payment and claims its key (``PaymentStore.create_payment``), the key's claim for the
other operations (``claim_key``), or, when the request writes nothing (a replay, a refusal
before the claim), alone before it answers. Nothing that names the record can be durable
before it: a request's steps are written by or after that statement, their ledger postings
follow them, and a stored refusal or a replay names no origin. docs/security.md, "Audit",
has the rule.

This module is the pure part: the record, its encoding in the header and its row. It does
no I/O and reads no clock: the edge passes the time in.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import msgspec

__all__ = ["AUDIT_COLUMNS", "AUDIT_HEADER", "AuditSlot", "RequestRecord", "decode_header",
           "encode_header", "row_of"]

# The forwarded header that carries a record for the payments actor to write.
AUDIT_HEADER = "txproc-audit"
# The columns of ``audit_requests`` a record fills, in ``row_of``'s order.
AUDIT_COLUMNS = ("id", "tenant", "tenant_name", "subject", "token_id", "request_id",
                 "operation", "items", "at")


class RequestRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Who sent a request, what it was and when (``at_s``: seconds since the epoch)."""

    id: int
    tenant: int
    tenant_name: str
    subject: str
    token_id: str
    request_id: str
    operation: str
    items: int
    at_s: float


@dataclass(slots=True)
class AuditSlot:
    """A record handed over with a request, and whether it is written yet."""

    record: RequestRecord
    written: bool = False


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(RequestRecord)


def encode_header(record: RequestRecord) -> str:
    return _ENCODER.encode(record).decode()


def decode_header(value: str) -> RequestRecord:
    """The record in ``value``; raises ``msgspec.ValidationError`` (or ``DecodeError``) for
    anything else. Only the edge sets the header, so a failure here is a bug."""
    record = _DECODER.decode(value)
    if not 0 < record.id < 2**63 or record.items < 0:
        raise msgspec.ValidationError("an audit record's id is 1..2**63-1, its items >= 0")
    return record


def row_of(record: RequestRecord) -> tuple[object, ...]:
    """The record's values in ``AUDIT_COLUMNS`` order, as the database takes them."""
    return (record.id, record.tenant, record.tenant_name, record.subject, record.token_id,
            record.request_id, record.operation, record.items,
            dt.datetime.fromtimestamp(record.at_s, tz=dt.UTC))
