"""Tenants' webhook endpoints, stored as outbox subscribers (migration 0019), and the
API operations on them (``/v1/webhook_endpoints``, docs/payments.md "Webhook endpoints").

An endpoint is a row of ``event_subscribers`` named by its id, with its tenant, the event
types it wants and its own signing secret, so the outbox relay delivers to it exactly as
to an operator's subscriber: same retries, backoff, dead letters and replay
(actors/payments/outbox.py). Removing one deactivates it for good and drops its deliveries
not yet made (nobody will take them); what was delivered or dead-lettered stays as history.

The operations answer (status, JSON body, headers) like every payments route. Creating
runs under the Idempotency-Key discipline (``Idempotent.run``), and the endpoint's id
derives from the request's identity: a request executed again after its key's claim
lapsed finds the endpoint it made. Its answer, with the secret, is what the key replays.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

import asyncpg
import msgspec
from msgspec import Meta

from actors.ops.audit_events import actor_of_origin, record_audit_event
from actors.payments.outbox import STATEMENT_TIMEOUT_S
from processor.audit import AuditActor
from processor.errors import TxprocError
from processor.identity import tenant_of_principal
from processor.payments import (
    ENDPOINT_ID_PATTERN,
    ENDPOINTS_PER_TENANT_MAX,
    SECRET_BYTES,
    ListCode,
    ListError,
    Position,
    WebhookEndpointError,
    WebhookEndpointRequest,
    WebhookEndpointView,
    check_endpoint,
    decode_cursor,
    encode_cursor,
    endpoint_id_of,
    secret_text,
)

__all__ = [
    "ENDPOINTS_PAGE_MAX",
    "ENDPOINT_OPERATIONS",
    "EndpointRefused",
    "EndpointsPage",
    "EndpointsQuery",
    "create_endpoint",
    "decode_endpoint_request",
    "endpoint_of",
    "endpoints_of",
    "remove_endpoint",
    "serve_endpoint_operation",
]

ENDPOINTS_PAGE_MAX = 100
_CURSOR_KIND = "webhook_endpoints"
_COLUMNS = ("name, url, coalesce(event_types, '{}') AS event_types, created_at, "
            "(extract(epoch FROM created_at) * 1000000)::bigint AS created_us")
ENDPOINT_OPERATIONS = frozenset({"create_webhook_endpoint", "list_webhook_endpoints",
                                 "get_webhook_endpoint", "delete_webhook_endpoint"})


class EndpointRefused(TxprocError):
    """An endpoint operation refused with a stable code (its status: PAYMENT_ERROR_STATUS)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class EndpointsQuery(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``GET /v1/webhook_endpoints``: newest first, ``limit`` at a time, from a cursor."""

    limit: Annotated[int, Meta(ge=1, le=ENDPOINTS_PAGE_MAX)] = 10
    cursor: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


class EndpointsPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[WebhookEndpointView]
    next_cursor: str | None


def _view(row: asyncpg.Record, secret: bytes | None = None) -> WebhookEndpointView:
    return WebhookEndpointView(
        id=row["name"], url=row["url"], events=list(row["event_types"]),
        created_at=row["created_at"].isoformat(),
        secret="" if secret is None else secret_text(secret))


def _tenant(principal_or_tenant: str) -> str:
    """A tenant slot in decimal, from a principal (``<slot>/<subject>``) or a slot."""
    if "/" in principal_or_tenant:
        return str(tenant_of_principal(principal_or_tenant))
    if not principal_or_tenant.isdigit():
        raise ValueError("a tenant is its slot in decimal")
    return principal_or_tenant


# -- storage -----------------------------------------------------------------------------


async def create_endpoint(conn: asyncpg.Connection, *, endpoint_id: str, tenant: str,
                          url: str, events: tuple[str, ...], secret: bytes,
                          actor: AuditActor | None = None, request_id: str = ""
                          ) -> tuple[WebhookEndpointView, bool]:
    """Store an endpoint of ``tenant`` (a slot in decimal) and answer it with its secret, and
    whether it is new. An endpoint with this id (the same request, executed again) is
    answered as it is. Raises ``EndpointRefused`` (``webhook_endpoint_limit_reached``) when
    the tenant already has ``ENDPOINTS_PER_TENANT_MAX`` endpoints. With ``actor``, a new
    endpoint is recorded as a ``webhook_endpoint.created`` audit event in the same
    transaction (the secret is not)."""
    async with conn.transaction():
        # One creation per tenant at a time, so two at once cannot both pass the limit.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 19))",
                           f"webhook_endpoints/{tenant}", timeout=STATEMENT_TIMEOUT_S)
        existing = await conn.fetchrow(
            f"SELECT {_COLUMNS}, secret FROM event_subscribers WHERE name = $1 AND tenant = $2",
            endpoint_id, tenant, timeout=STATEMENT_TIMEOUT_S)
        if existing is not None:
            return _view(existing, bytes(existing["secret"])), False
        count = await conn.fetchval(
            "SELECT count(*) FROM event_subscribers WHERE tenant = $1 AND removed_at IS NULL",
            tenant, timeout=STATEMENT_TIMEOUT_S)
        if count >= ENDPOINTS_PER_TENANT_MAX:
            raise EndpointRefused("webhook_endpoint_limit_reached",
                                  f"a tenant has at most {ENDPOINTS_PER_TENANT_MAX} webhook "
                                  "endpoints; remove one first")
        row = await conn.fetchrow(
            f"INSERT INTO event_subscribers (name, url, tenant, event_types, secret) "
            f"VALUES ($1, $2, $3, $4, $5) RETURNING {_COLUMNS}",
            endpoint_id, url, tenant, list(events) or None, secret,
            timeout=STATEMENT_TIMEOUT_S)
        if actor is not None:
            await record_audit_event(
                conn, actor=actor, action="webhook_endpoint.created",
                target_kind="webhook_endpoint", target_id=endpoint_id,
                tenant_slot=int(tenant), details={"url": url, "events": list(events)},
                request_id=request_id)
    return _view(row, secret), True


async def endpoints_of(conn: asyncpg.Connection | asyncpg.Pool, tenant: str, *, limit: int,
                       after: Position | None = None) -> tuple[list[WebhookEndpointView],
                                                               Position | None]:
    """The tenant's endpoints (no secrets), newest first, at most ``limit`` after the
    position ``after``; and the position to read on from, None after the last."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM event_subscribers WHERE tenant = $1 AND removed_at IS NULL "
        "AND ($2::bigint IS NULL OR ((extract(epoch FROM created_at) * 1000000)::bigint, name)"
        " < ($2::bigint, $3::text)) "
        "ORDER BY created_at DESC, name DESC LIMIT $4",
        tenant, None if after is None else after.created_us,
        None if after is None else after.id, limit + 1, timeout=STATEMENT_TIMEOUT_S)
    page = rows[:limit]
    more = len(rows) > limit
    last = Position(page[-1]["created_us"], page[-1]["name"]) if more else None
    return [_view(r) for r in page], last


async def endpoint_of(conn: asyncpg.Connection | asyncpg.Pool, tenant: str,
                      endpoint_id: str) -> WebhookEndpointView | None:
    """The tenant's endpoint (no secret); None for another tenant's or a removed one."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM event_subscribers WHERE name = $1 AND tenant = $2 "
        "AND removed_at IS NULL", endpoint_id, tenant, timeout=STATEMENT_TIMEOUT_S)
    return None if row is None else _view(row)


async def remove_endpoint(conn: asyncpg.Connection, endpoint_id: str,
                          tenant: str | None, *, actor: AuditActor | None = None,
                          request_id: str = "") -> WebhookEndpointView | None:
    """Remove an endpoint (of ``tenant``; any tenant's for None, the operator's CLI): no
    event is sent to it any more, and its deliveries not yet made are dropped. None when
    no such endpoint is in use. With ``actor``, the removal is recorded as a
    ``webhook_endpoint.deleted`` audit event in the same transaction."""
    async with conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE event_subscribers SET active = false, removed_at = now(), "
            f"updated_at = now() WHERE name = $1 AND tenant IS NOT NULL "
            f"AND ($2::text IS NULL OR tenant = $2) AND removed_at IS NULL "
            f"RETURNING {_COLUMNS}, tenant", endpoint_id, tenant,
            timeout=STATEMENT_TIMEOUT_S)
        if row is None:
            return None
        dropped = await conn.fetchval(
            "WITH dropped AS (DELETE FROM outbox_deliveries WHERE subscriber = $1 "
            "AND delivered_at IS NULL RETURNING 1) SELECT count(*) FROM dropped",
            endpoint_id, timeout=STATEMENT_TIMEOUT_S)
        if actor is not None:
            await record_audit_event(
                conn, actor=actor, action="webhook_endpoint.deleted",
                target_kind="webhook_endpoint", target_id=endpoint_id,
                tenant_slot=int(row["tenant"]),
                details={"url": row["url"], "deliveries_dropped": int(dropped)},
                request_id=request_id)
    return _view(row)


# -- the API's operations ------------------------------------------------------------------

_ENCODER = msgspec.json.Encoder()
_REQUEST = msgspec.json.Decoder(WebhookEndpointRequest)
_QUERY = msgspec.json.Decoder(EndpointsQuery)
_ENDPOINT_ID = re.compile(ENDPOINT_ID_PATTERN)
_NOT_FOUND = EndpointRefused("webhook_endpoint_not_found", "no webhook endpoint has this id")


def _not_found_unless_id(endpoint_id: str) -> None:
    if _ENDPOINT_ID.fullmatch(endpoint_id) is None:
        raise _NOT_FOUND


def decode_endpoint_request(body: bytes) -> WebhookEndpointRequest:
    """The body of a creation, or ``EndpointRefused`` (malformed_json, invalid_body,
    webhook_url_invalid, webhook_event_type_unknown)."""
    try:
        request = _REQUEST.decode(body)
    except msgspec.ValidationError as exc:
        raise EndpointRefused("invalid_body", str(exc)[:300]) from exc
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise EndpointRefused("malformed_json", "the body is not JSON") from exc
    try:
        check_endpoint(request)
    except WebhookEndpointError as exc:
        raise EndpointRefused(exc.code, str(exc)) from exc
    return request


async def serve_endpoint_operation(
        pool: asyncpg.Pool, *, principal: str, operation: str, subject_id: str, body: bytes,
        request_key: str,
        idempotent: Callable[[Callable[[], Awaitable[tuple[int, bytes]]]],
                             Awaitable[tuple[int, bytes, dict[str, str]]]] | None,
        origin: int = 0,
) -> tuple[int, bytes, dict[str, str]]:
    """One ``/v1/webhook_endpoints`` operation of ``principal``'s tenant. A creation's body
    must already be checked (``decode_endpoint_request``); it runs inside ``idempotent``.
    A creation or removal is recorded as an audit event of the caller named by ``origin``
    (the request's audit record, actors/edge/audit.py). Raises ``EndpointRefused`` for a
    refusal."""
    tenant = _tenant(principal)
    subject = principal.partition("/")[2]
    if operation == "create_webhook_endpoint":
        if idempotent is None:
            raise ValueError("a creation runs under its Idempotency-Key")
        request = decode_endpoint_request(body)
        url, events = check_endpoint(request)

        async def execute() -> tuple[int, bytes]:
            async with pool.acquire() as conn:
                actor, request_id = await actor_of_origin(conn, origin, subject=subject)
                view, _ = await create_endpoint(
                    conn, endpoint_id=endpoint_id_of(request_key), tenant=tenant, url=url,
                    events=events, secret=secrets.token_bytes(SECRET_BYTES), actor=actor,
                    request_id=request_id)
            return 201, _ENCODER.encode(view)

        return await idempotent(execute)
    if operation == "list_webhook_endpoints":
        query = _decode_query(body)
        after = None if query.cursor is None else decode_cursor(_CURSOR_KIND, query.cursor)
        views, last = await endpoints_of(pool, tenant, limit=query.limit, after=after)
        cursor = None if last is None else encode_cursor(_CURSOR_KIND, last)
        return 200, _ENCODER.encode(EndpointsPage(data=views, next_cursor=cursor)), {}
    _not_found_unless_id(subject_id)
    if operation == "get_webhook_endpoint":
        found = await endpoint_of(pool, tenant, subject_id)
    else:
        async with pool.acquire() as conn:
            actor, request_id = await actor_of_origin(conn, origin, subject=subject)
            found = await remove_endpoint(conn, subject_id, tenant, actor=actor,
                                          request_id=request_id)
    if found is None:
        raise _NOT_FOUND
    return 200, _ENCODER.encode(found), {}


def _decode_query(body: bytes) -> EndpointsQuery:
    try:
        return _QUERY.decode(body or b"{}")
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ListError(ListCode.invalid_query, str(exc)[:300]) from exc
