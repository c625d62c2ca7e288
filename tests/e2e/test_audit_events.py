"""Audit events over real HTTP against the session's processor: a webhook endpoint created
and removed through the API writes one event each, naming the token (tenant, subject, id)
and the request id; ``GET /v1/audit-events`` pages with cursors, shows a tenant only its
own events (the processor's token every one), needs ``audit:read``, and answers bad input
with 4xx codes; the chain over every event the session wrote holds."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from actors.app.runtime import Processor
from actors.ops.audit_events import check_audit_log
from processor.identity import load_or_create_ring, tenant_slot, verify_token
from tests.payments_support import key
from tests.running import token_for

WRITE = ("webhooks:write", "webhooks:read")


def _http(processor: Processor, token: str | None) -> httpx.AsyncClient:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                             headers=headers, timeout=60)


def _jti(processor: Processor, token: str) -> str:
    ring = load_or_create_ring(Path(processor.config.data_dir), now_s=int(time.time()))
    return verify_token(ring.verifying(), token, now_s=int(time.time())).token_id


async def _rows(processor: Processor, target_id: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(processor.config.shard.database_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT * FROM audit_events WHERE target_id = $1 ORDER BY id",
                                target_id)
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def _endpoint_made_and_removed(processor: Processor, tenant: str) -> tuple[str, str]:
    """Create (twice with one Idempotency-Key) and remove an endpoint of ``tenant`` as
    subject ops-9; the endpoint's id and the writing token."""
    writer = token_for(processor, WRITE, tenant=tenant, subject="ops-9")
    idem = key()
    async with _http(processor, writer) as http:
        for _ in range(2):
            made = await http.post("/v1/webhook_endpoints",
                                   json={"url": "https://hooks.example.test/audit"},
                                   headers={"idempotency-key": idem,
                                            "x-request-id": "req-audit-create"})
            assert made.status_code == 201, made.text
        endpoint_id = made.json()["id"]
        removed = await http.delete(f"/v1/webhook_endpoints/{endpoint_id}",
                                    headers={"x-request-id": "req-audit-delete"})
        assert removed.status_code == 200, removed.text
    return endpoint_id, writer


async def test_api_changes_are_recorded_once_with_their_token(processor: Processor) -> None:
    """The endpoint's creation (its key replayed once) and removal write one event each,
    of the writing token's tenant, subject and id and each request's id; the secret is not
    in them; the tenant lists both, in order, with the same fields."""
    tenant = f"audit-{uuid.uuid4().hex[:8]}"
    endpoint_id, writer = await _endpoint_made_and_removed(processor, tenant)
    rows = await _rows(processor, endpoint_id)
    assert [(r["action"], r["request_id"]) for r in rows] == [
        ("webhook_endpoint.created", "req-audit-create"),
        ("webhook_endpoint.deleted", "req-audit-delete")]
    jti = _jti(processor, writer)
    for row in rows:
        assert (row["actor_kind"], row["actor_tenant"], row["actor_subject"],
                row["actor_token_id"], row["tenant_slot"]) == \
            ("token", tenant, "ops-9", jti, tenant_slot(tenant))
        assert "whsec_" not in row["details"]
    reader = token_for(processor, ("audit:read",), tenant=tenant, subject="auditor")
    async with _http(processor, reader) as http:
        listed = await http.get("/v1/audit-events")
    assert listed.status_code == 200, listed.text
    page = listed.json()
    assert page["next_cursor"] is None
    assert [(e["action"], e["target"]["id"], e["actor"]["token_id"], e["request_id"])
            for e in page["data"]] == [
        ("webhook_endpoint.created", endpoint_id, jti, "req-audit-create"),
        ("webhook_endpoint.deleted", endpoint_id, jti, "req-audit-delete")]
    assert page["data"][0]["digest"] == rows[0]["digest"].hex()


async def test_listing_pages_and_keeps_tenants_apart(processor: Processor) -> None:
    """A page of one has a cursor that leads to the next, the last page has none;
    another tenant sees none of these events; the processor's own token sees them among
    every tenant's; an action filter keeps that action only."""
    tenant = f"audit-{uuid.uuid4().hex[:8]}"
    endpoint_id, _ = await _endpoint_made_and_removed(processor, tenant)
    reader = token_for(processor, ("audit:read",), tenant=tenant, subject="auditor")
    async with _http(processor, reader) as http:
        first = (await http.get("/v1/audit-events", params={"limit": 1})).json()
        second = (await http.get("/v1/audit-events",
                                 params={"limit": 1, "cursor": first["next_cursor"]})).json()
        deleted = (await http.get("/v1/audit-events",
                                  params={"action": "webhook_endpoint.deleted"})).json()
    assert [e["action"] for e in first["data"] + second["data"]] == [
        "webhook_endpoint.created", "webhook_endpoint.deleted"]
    assert first["next_cursor"] is not None and second["next_cursor"] is None
    assert [e["action"] for e in deleted["data"]] == ["webhook_endpoint.deleted"]
    stranger = token_for(processor, ("audit:read",), tenant=f"other-{uuid.uuid4().hex[:8]}")
    system = token_for(processor, ("audit:read", "ledger:system"), subject="auditor")
    async with _http(processor, stranger) as http:
        assert (await http.get("/v1/audit-events")).json()["data"] == []
    seen: list[str] = []
    async with _http(processor, system) as http:
        after = first["data"][0]["id"] - 1
        while True:
            page = (await http.get("/v1/audit-events",
                                   params={"after": after, "limit": 1000})).json()
            seen += [e["target"]["id"] for e in page["data"]]
            if page["next_cursor"] is None:
                break
            after = page["data"][-1]["id"]
    assert seen.count(endpoint_id) == 2


@pytest.mark.parametrize(("token_scopes", "params", "status", "code"), [
    (None, {}, 401, "token_missing"),
    (("webhooks:read",), {}, 403, "scope_missing"),
    (("audit:read",), {"limit": "0"}, 400, "invalid_query"),
    (("audit:read",), {"limit": "1001"}, 400, "invalid_query"),
    (("audit:read",), {"after": "-1"}, 400, "invalid_query"),
    (("audit:read",), {"after": "1", "cursor": "YWJj"}, 400, "invalid_query"),
    (("audit:read",), {"tenant": "x"}, 400, "invalid_query"),
    (("audit:read",), {"action": "keys.stolen"}, 400, "invalid_query"),
    (("audit:read",), {"cursor": "YWJj"}, 400, "invalid_cursor"),
])
async def test_bad_requests_are_refused_with_a_code(
        processor: Processor, token_scopes: tuple[str, ...] | None, params: dict[str, str],
        status: int, code: str) -> None:
    """One row per bad request: no token, a token without audit:read, and each malformed
    query get their 4xx status and code."""
    token = None if token_scopes is None else token_for(processor, token_scopes)
    async with _http(processor, token) as http:
        answer = await http.get("/v1/audit-events", params=params)
    assert (answer.status_code, answer.json()["error"]["code"]) == (status, code)


async def test_the_sessions_chain_holds(processor: Processor) -> None:
    """Every event the session wrote so far, by any writer, forms one unbroken chain."""
    await _endpoint_made_and_removed(processor, f"audit-{uuid.uuid4().hex[:8]}")
    conn = await asyncpg.connect(processor.config.shard.database_url, timeout=10)
    try:
        checked, problems = await check_audit_log(conn)
    finally:
        await conn.close()
    assert checked >= 2 and problems == []
