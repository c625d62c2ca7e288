"""Audit records over real HTTP and RPC: every account and transfer names the request that
made it, and the record says who sent it (tenant, subject, token id, request id)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import numpy as np

from actors.app.runtime import Processor
from processor.batch import TransferBatch
from processor.client import Client
from processor.codes import AccountResult, TransferResult
from processor.identity import SYSTEM_SCOPES, load_or_create_ring, verify_token
from processor.types import Account, Transfer
from tests.payments_support import card_token
from tests.running import IdSource, token_for

_WHO = """
SELECT a.tenant_name, a.subject, a.token_id, a.request_id, a.operation, a.items
FROM {table} x JOIN audit_requests a ON a.id = x.origin WHERE x.id = $1
"""


async def _who(processor: Processor, table: str, row_id: int) -> tuple[object, ...] | None:
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        row = await conn.fetchrow(_WHO.format(table=table), row_id)
    finally:
        await conn.close()
    return None if row is None else tuple(row)


async def _origin_of(processor: Processor, transfer_id: int) -> int:
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        return int(await conn.fetchval("SELECT origin FROM transfers WHERE id = $1",
                                       transfer_id))
    finally:
        await conn.close()


def _jti(processor: Processor, token: str) -> str:
    # The ring, not jwt.key: tests/e2e/test_key_rotation.py rotates the session's keys.
    ring = load_or_create_ring(Path(processor.config.data_dir), now_s=int(time.time()))
    return verify_token(ring.verifying(), token, now_s=int(time.time())).token_id


async def test_http_changes_name_their_request(processor: Processor, ids: IdSource) -> None:
    token = token_for(processor, tenant="ledgerco", subject="ops-7")
    jti = _jti(processor, token)
    a, b, t1 = ids.take(3)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 headers={"authorization": f"Bearer {token}"}) as http:
        r = await http.post("/v1/accounts/batch", headers={"x-request-id": "req-accounts-1"},
                            json={"accounts": [{"id": a, "currency": "EUR"},
                                               {"id": b, "currency": "EUR"}]})
        assert r.status_code == 200, r.text
        r = await http.post("/v1/transfers", headers={"x-request-id": "req-transfer-1"},
                            json={"id": t1, "debit_account_id": a, "credit_account_id": b,
                                  "amount": 5, "currency": "EUR"})
        assert r.status_code == 201, r.text
        # Without an X-Request-Id the record gets a fresh one.
        t2 = ids.one()
        r = await http.post("/v1/transfers", json={
            "id": t2, "debit_account_id": a, "credit_account_id": b, "amount": 1,
            "currency": "EUR"})
        assert r.status_code == 201, r.text
    assert await _who(processor, "accounts", b) == \
        ("ledgerco", "ops-7", jti, "req-accounts-1", "create_accounts", 2)
    assert await _who(processor, "transfers", t1) == \
        ("ledgerco", "ops-7", jti, "req-transfer-1", "create_transfers", 1)
    fresh = await _who(processor, "transfers", t2)
    assert fresh is not None and len(str(fresh[3])) == 32
    # The operator's view of the same record.
    done = subprocess.run(
        [sys.executable, "-m", "actors.app.cli", "audit", "--transfer", str(t1),
         "--database-url", processor.config.shard.database_url],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    [record] = [json.loads(line) for line in done.stdout.splitlines()]
    assert (record["subject"], record["request_id"], record["object"]) == \
        ("ops-7", "req-transfer-1", str(t1))
    missing = subprocess.run(
        [sys.executable, "-m", "actors.app.cli", "audit", "--transfer", "1",
         "--database-url", processor.config.shard.database_url],
        capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 1 and "no audit record" in missing.stderr


async def test_rpc_changes_name_their_request(processor: Processor, ids: IdSource) -> None:
    token = token_for(processor, tenant="ledgerco", subject="gw-2")
    jti = _jti(processor, token)
    a, b = ids.take(2)
    listed, columns = ids.one(), ids.take(3)
    async with Client("127.0.0.1", processor.rpc_port, token) as client:
        assert await client.create_accounts([Account(id=a, currency="EUR"),
                                             Account(id=b, currency="EUR")]) == \
            [AccountResult.ok] * 2
        assert await client.create_transfers([Transfer(
            id=listed, debit_account_id=a, credit_account_id=b, amount=2, currency="EUR",
            origin=12345)]) == [TransferResult.ok]  # a client's origin is ignored
        codes = await client.create_transfers(TransferBatch.from_arrays(
            id=columns, debit_account_id=[a] * 3, credit_account_id=[b] * 3,
            amount=[1, 1, 1], currency="EUR"))
        assert np.array_equal(codes, np.zeros(3, dtype=np.uint8))
        [stored] = await client.lookup_transfers([listed])
        assert stored is not None and stored.origin not in (0, 12345)
    who = await _who(processor, "accounts", a)
    assert who is not None and who[:3] == ("ledgerco", "gw-2", jti) and who[4:] == \
        ("create_accounts", 2)
    assert str(who[3]).startswith("rpc ")
    assert (await _who(processor, "transfers", listed))[4:] == ("create_transfers", 1)
    batch_who = [await _who(processor, "transfers", i) for i in columns]
    assert all(w is not None and w[:3] == ("ledgerco", "gw-2", jti) and w[5] == 3
               for w in batch_who)


async def test_payment_steps_name_their_request(processor: Processor, ids: IdSource) -> None:
    """The step an authorization starts, and the capture after it, each name the request
    (over HTTP and RPC) that started them; a client cannot forge the forwarded record."""
    token = token_for(processor, tenant="ledgerco", subject="shop-1")
    jti = _jti(processor, token)
    merchant = ids.one()
    async with Client("127.0.0.1", processor.rpc_port, token) as client:
        assert await client.create_accounts([Account(id=merchant, currency="USD")]) == \
            [AccountResult.ok]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                     headers={"authorization": f"Bearer {token}"},
                                     timeout=60) as http:
            r = await http.post("/v1/payments", json={
                "amount": 900, "currency": "USD", "payment_method": card_token(),
                "merchant_account_id": merchant}, headers={
                "idempotency-key": str(uuid.uuid4()), "x-request-id": "pay-req-1",
                "txproc-origin": "42"})
            assert r.status_code == 201, r.text
        payment_id = r.json()["id"]
        captured = await client.capture_payment(payment_id, idempotency_key=str(uuid.uuid4()))
        assert captured.status == 200, captured.body
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        rows = await conn.fetch(
            "SELECT s.kind, a.subject, a.token_id, a.request_id, a.operation "
            "FROM payment_steps s JOIN audit_requests a ON a.id = s.origin "
            "WHERE s.subject_id = $1 ORDER BY s.id", payment_id)
    finally:
        await conn.close()
    assert tuple(rows[0])[:4] == ("authorize", "shop-1", jti, "pay-req-1")
    assert [(r["kind"], r["operation"]) for r in rows] == [
        ("authorize", "payments.authorize"), ("capture", "payments.capture")]
    assert str(rows[1]["request_id"]).startswith("rpc ")
    # The ledger postings of each step name the same request as the step: the hold the
    # shop's authorization, the capture's posting its capture (no record of the engine's).
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        postings = await conn.fetch(
            "SELECT s.kind, a.subject, a.operation, a.request_id FROM payment_steps s "
            "JOIN transfers t ON t.id BETWEEN s.transfer_id AND s.transfer_id + 3 "
            "JOIN audit_requests a ON a.id = t.origin WHERE s.subject_id = $1 "
            "ORDER BY t.id", payment_id)
    finally:
        await conn.close()
    assert [(r["kind"], r["subject"], r["operation"]) for r in postings] == [
        ("authorize", "shop-1", "payments.authorize"),
        ("capture", "shop-1", "payments.capture")], postings
    assert postings[0]["request_id"] == "pay-req-1"


async def test_only_the_processor_may_name_an_origin_it_wrote(processor: Processor,
                                                              ids: IdSource) -> None:
    """An RPC posting may name a record as its origin instead of getting its own only when
    the processor's own token sends it and this front wrote that record: a tenant's token
    naming a real record, and the processor's token naming one no front wrote, each get a
    record of their own."""
    token = token_for(processor, tenant="ledgerco", subject="gw-9")
    system = token_for(processor, tenant="ledgerco", subject="sys-test",
                       scopes=(*SYSTEM_SCOPES, "accounts:write", "transfers:write",
                               "transfers:read"))
    a, b, first, borrowed, forged, vouched = ids.take(6)
    async with Client("127.0.0.1", processor.rpc_port, token) as client:
        assert await client.create_accounts([Account(id=a, currency="EUR"),
                                             Account(id=b, currency="EUR")]) == \
            [AccountResult.ok] * 2
        assert await client.create_transfers([Transfer(
            id=first, debit_account_id=a, credit_account_id=b, amount=1,
            currency="EUR")]) == [TransferResult.ok]
        [stored] = await client.lookup_transfers([first])
        assert stored is not None and stored.origin != 0
        written = stored.origin  # a record this front wrote
        assert await client.create_transfers([Transfer(
            id=borrowed, debit_account_id=a, credit_account_id=b, amount=1, currency="EUR",
            origin=written)]) == [TransferResult.ok]
    async with Client("127.0.0.1", processor.rpc_port, system) as client:
        assert await client.create_transfers([Transfer(
            id=forged, debit_account_id=a, credit_account_id=b, amount=1, currency="EUR",
            origin=written + 1)]) == [TransferResult.ok]
        assert await client.create_transfers([Transfer(
            id=vouched, debit_account_id=a, credit_account_id=b, amount=1, currency="EUR",
            origin=written)]) == [TransferResult.ok]
    borrowed_who = await _who(processor, "transfers", borrowed)
    assert borrowed_who is not None and borrowed_who[1] == "gw-9"
    assert await _origin_of(processor, borrowed) not in (0, written)
    forged_who = await _who(processor, "transfers", forged)
    assert forged_who is not None and forged_who[1] == "sys-test"
    assert await _origin_of(processor, vouched) == written


async def test_every_authorization_request_has_one_record_written_by_payments(
        processor: Processor, ids: IdSource) -> None:
    """The edge hands an authorization's record to the payments actor (processor/
    request_audit.py): the first request's record names its step, a replay and a refusal
    each have theirs, and a record a client puts in the header is never written."""
    token = token_for(processor, tenant="ledgerco", subject="shop-4")
    jti = _jti(processor, token)
    merchant, never_created = ids.take(2)
    tag = uuid.uuid4().hex[:12]
    forged = 4_000_000_000_000 + int(tag[:8], 16)
    forged_header = json.dumps({
        "id": forged, "tenant": 1, "tenant_name": "evil", "subject": "mallory",
        "token_id": "none", "request_id": "forged", "operation": "payments.authorize",
        "items": 1, "at_s": 0.0})
    async with Client("127.0.0.1", processor.rpc_port, token) as client:
        assert await client.create_accounts([Account(id=merchant, currency="USD")]) == \
            [AccountResult.ok]
    key = str(uuid.uuid4())
    body = {"amount": 700, "currency": "USD", "payment_method": card_token(),
            "merchant_account_id": merchant}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 headers={"authorization": f"Bearer {token}"},
                                 timeout=60) as http:
        first = await http.post("/v1/payments", json=body, headers={
            "idempotency-key": key, "x-request-id": f"{tag}-1",
            "txproc-audit": forged_header, "txproc-origin": str(forged)})
        assert first.status_code == 201, first.text
        replay = await http.post("/v1/payments", json=body, headers={
            "idempotency-key": key, "x-request-id": f"{tag}-2"})
        assert replay.status_code == 201 and replay.headers.get("idempotent-replayed")
        refused = await http.post(
            "/v1/payments", json={**body, "merchant_account_id": never_created},
            headers={"idempotency-key": str(uuid.uuid4()), "x-request-id": f"{tag}-3"})
        assert refused.status_code == 422, refused.text
        # Nor on a request whose record the edge writes itself.
        captured = await http.post(f"/v1/payments/{first.json()['id']}/capture", json={},
                                   headers={"idempotency-key": str(uuid.uuid4()),
                                            "txproc-audit": forged_header})
        assert captured.status_code == 200, captured.text
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        records = await conn.fetch(
            "SELECT id, request_id, subject, token_id, operation FROM audit_requests "
            "WHERE request_id LIKE $1 ORDER BY request_id", f"{tag}-%")
        step_origin = await conn.fetchval(
            "SELECT origin FROM payment_steps WHERE subject_id = $1 AND kind = 'authorize'",
            first.json()["id"])
        assert await conn.fetchval("SELECT count(*) FROM audit_requests WHERE id = $1 "
                                   "OR subject = 'mallory'", forged) == 0
    finally:
        await conn.close()
    assert [(r["request_id"], r["subject"], r["token_id"], r["operation"]) for r in records] \
        == [(f"{tag}-{n}", "shop-4", jti, "payments.authorize") for n in (1, 2, 3)]
    assert step_origin == records[0]["id"]
