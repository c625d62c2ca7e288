"""Every operator command that changes configuration writes exactly one audit event, of the
operating-system user running it, in a real database; `txproc audit list` prints them, and
`txproc audit --transfer` still reads who made an object."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from actors.ops.audit_events import check_audit_log
from actors.payments import outbox
from actors.payments.store import PaymentStore
from processor.identity import Claims, load_or_create_ring, principal_of, tenant_slot
from processor.payments import Kind, Payment, PaymentStatus, new_step

USER = getpass.getuser()
LIMITS = outbox.RelayLimits(batch_max=4, in_flight_max=2, attempts_max=1, backoff_base_s=0.01,
                            backoff_cap_s=0.05, request_timeout_s=1.0, lease_s=10.0,
                            poll_interval_s=0.05, statement_timeout_s=2.0)


def txproc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "actors.app.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


async def _events(db_url: str, after: int = 0) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT *, details::text AS details FROM audit_events "
                                "WHERE id > $1 ORDER BY id", after)
    finally:
        await conn.close()
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]


async def _one_new(db_url: str, after: int, action: str) -> dict[str, Any]:
    """The one event written since ``after``, checked to be this command's: the action,
    the operator and a request id of the command line."""
    [event] = await _events(db_url, after)
    assert (event["action"], event["actor_kind"], event["actor_subject"],
            event["actor_token_id"]) == (action, "operator", USER, "")
    assert event["request_id"].startswith("cli-")
    return event


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_credentials_commands_write_one_event_each(db_url: str, tmp_path: Path) -> None:
    """token revoke (by id and by principal), keys create-client and revoke-client, and keys
    rotate and retire with --database-url each write one event naming their target and
    tenant, and never the client key's secret; a revoke-client of an unknown key writes
    none; rotate without a database says it is not recorded."""
    _ok(txproc("token", "revoke", "--jti", "jti-audit-1", "--database-url", db_url))
    event = await _one_new(db_url, 0, "token.revoked")
    assert (event["target_kind"], event["target_id"], event["tenant_slot"]) == \
        ("token", "jti-audit-1", 0)

    _ok(txproc("token", "revoke", "--tenant", "acme", "--subject", "ops-7",
               "--database-url", db_url))
    event = await _one_new(db_url, 1, "token.revoked")
    assert (event["target_id"], event["tenant_slot"]) == ("acme/ops-7", tenant_slot("acme"))

    created = json.loads(_ok(txproc("keys", "create-client", "--tenant", "acme", "--subject",
                                    "gw", "--database-url", db_url)))
    event = await _one_new(db_url, 2, "client_key.created")
    assert (event["target_id"], event["details"]) == \
        (created["key_id"], {"tenant": "acme", "subject": "gw"})
    assert created["secret"] not in json.dumps(await _events(db_url), default=str)

    _ok(txproc("keys", "revoke-client", created["key_id"], "--database-url", db_url))
    event = await _one_new(db_url, 3, "client_key.revoked")
    assert event["tenant_slot"] == tenant_slot("acme")
    assert txproc("keys", "revoke-client", created["key_id"], "--database-url",
                  db_url).returncode == 1
    assert len(await _events(db_url)) == 4

    assert _ok(txproc("keys", "list", "--data-dir", str(tmp_path)))
    old_kid = load_or_create_ring(tmp_path, now_s=int(time.time())).active.kid
    new_kid = _ok(txproc("keys", "rotate", "--data-dir", str(tmp_path), "--database-url",
                         db_url)).strip()
    event = await _one_new(db_url, 4, "keys.rotated")
    assert (event["target_kind"], event["target_id"]) == ("signing_key", new_kid)
    _ok(txproc("keys", "retire", old_kid, "--data-dir", str(tmp_path), "--database-url",
               db_url))
    assert (await _one_new(db_url, 5, "keys.retired"))["target_id"] == old_kid
    unrecorded = txproc("keys", "rotate", "--data-dir", str(tmp_path))
    assert unrecorded.returncode == 0 and "not recorded as an audit event" in unrecorded.stderr
    assert len(await _events(db_url)) == 6
    assert await _checked(db_url) == (6, [])


async def _checked(db_url: str) -> tuple[int, list[Any]]:
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        return await check_audit_log(conn)
    finally:
        await conn.close()


async def test_webhook_commands_write_one_event_each(db_url: str) -> None:
    """webhooks add and remove each write one event of the endpoint's tenant (its URL, not
    its secret); list writes none, and removing an endpoint gone writes none."""
    added = json.loads(_ok(txproc("webhooks", "add", "--tenant", "acme", "--url",
                                  "https://hooks.example.test/a", "--database-url",
                                  db_url)).splitlines()[0])
    event = await _one_new(db_url, 0, "webhook_endpoint.created")
    assert (event["target_id"], event["tenant_slot"], event["details"]["url"]) == \
        (added["id"], tenant_slot("acme"), "https://hooks.example.test/a")
    assert added["secret"] not in json.dumps(event, default=str)
    _ok(txproc("webhooks", "list", "--tenant", "acme", "--database-url", db_url))
    _ok(txproc("webhooks", "remove", added["id"], "--database-url", db_url))
    event = await _one_new(db_url, 1, "webhook_endpoint.deleted")
    assert (event["target_id"], event["tenant_slot"]) == (added["id"], tenant_slot("acme"))
    assert txproc("webhooks", "remove", added["id"], "--database-url", db_url).returncode == 1
    assert len(await _events(db_url)) == 2


async def test_dlq_replay_and_review_retry_write_one_event_each(db_url: str) -> None:
    """dlq replay writes one event saying what it replayed (none when nothing was), and
    payments review retry one of the payment's tenant with the operator's reason."""
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    store = await PaymentStore.connect(db_url, pool_size_max=2, connect_timeout_s=10,
                                       command_timeout_s=30)
    try:
        # Port 9 on loopback refuses connections: the one allowed attempt fails.
        await outbox.set_subscribers(pool, {"nowhere": "http://127.0.0.1:9/events"})
        async with pool.acquire() as conn, conn.transaction():
            event_id = await outbox.enqueue(conn, event_type="payment.authorized",
                                            aggregate_id="pay_x", payload={"amount": 1})
        async with outbox.OutboxRelay(pool, signing_secret=b"s" * 32, limits=LIMITS) as relay:
            assert await relay.run_once() == 1
        assert _ok(txproc("dlq", "replay", "--event-id", str(event_id), "--database-url",
                          db_url)).strip() == "replayed: 1"
        event = await _one_new(db_url, 0, "dlq.replayed")
        assert event["details"] == {"replayed": 1, "event_ids": [event_id],
                                    "event_ids_named": 1}
        assert _ok(txproc("dlq", "replay", "--all", "--database-url", db_url)).strip() == \
            "replayed: 0"
        assert len(await _events(db_url)) == 1

        principal = principal_of(Claims(scopes=frozenset(), expires_at_s=0, subject="merch",
                                        tenant="acme"))
        payment_id = "pay_" + "d" * 24
        step_id, base = await store.new_step_ids()
        step = new_step(step_id=step_id, transfer_base=base, kind=Kind.AUTHORIZE,
                        subject_id=payment_id, amount=500, currency="USD", provider="acme",
                        merchant_account_id=7)
        now_s = time.time()
        assert await store.create_payment(
            Payment(id=payment_id, merchant_account_id=7, amount=500, currency="USD",
                    payment_method="pm_4242_abcdefgh", status=PaymentStatus.PROCESSING,
                    provider="acme"), step, principal=principal, due_at_s=now_s)
        [aside] = await store.flag_for_review(now_s=now_s + 7_200, review_after_s=3_600,
                                              limit=10)
        _ok(txproc("payments", "review", "retry", str(aside.id), "--operator", "ops-jane",
                   "--reason", "provider shows no charge", "--database-url", db_url))
        event = await _one_new(db_url, 1, "payment_step.review_resolved")
        assert (event["target_kind"], event["target_id"], event["tenant_slot"]) == \
            ("payment_step", str(aside.id), tenant_slot("acme"))
        assert event["details"]["operator"] == "ops-jane"
        assert event["details"]["subject_id"] == payment_id
        assert txproc("payments", "review", "retry", str(aside.id), "--operator", "ops-jane",
                      "--reason", "twice", "--database-url", db_url).returncode == 1
        assert len(await _events(db_url)) == 2
    finally:
        await store.close()
        await pool.close()


async def test_migrate_and_audit_list(empty_db_url: str) -> None:
    """migrate of a fresh database writes one schema.migrated event (and none when up to
    date); `audit list` prints events as JSON lines, filtered by --action, cut by --limit
    and --after, and refuses an unknown action; `audit` alone names its two uses."""
    _ok(txproc("migrate", "--database-url", empty_db_url))
    event = await _one_new(empty_db_url, 0, "schema.migrated")
    assert event["details"]["applied"][0] == 1
    _ok(txproc("migrate", "--database-url", empty_db_url))
    for n in range(3):
        _ok(txproc("token", "revoke", "--jti", f"jti-{n}", "--database-url", empty_db_url))

    listed = [json.loads(line) for line in
              _ok(txproc("audit", "list", "--database-url", empty_db_url)).splitlines()]
    assert [e["id"] for e in listed] == [1, 2, 3, 4]
    assert listed[1]["actor"] == {"kind": "operator", "subject": USER, "tenant": "",
                                  "token_id": ""}
    assert listed[1]["target"] == {"kind": "token", "id": "jti-0"}
    revoked = _ok(txproc("audit", "list", "--action", "token.revoked", "--after", "2",
                         "--limit", "1", "--database-url", empty_db_url)).splitlines()
    assert [json.loads(line)["target"]["id"] for line in revoked] == ["jti-1"]
    unknown = txproc("audit", "list", "--action", "keys.stolen", "--database-url",
                     empty_db_url)
    assert unknown.returncode == 2 and "action" in unknown.stderr
    bare = txproc("audit", "--database-url", empty_db_url)
    assert bare.returncode == 2 and "audit list" in bare.stderr
    mixed = txproc("audit", "list", "--transfer", "5", "--database-url", empty_db_url)
    assert mixed.returncode == 2
    # The object lookup of before still answers (no record names transfer 5: status 1).
    assert txproc("audit", "--transfer", "5", "--database-url", empty_db_url).returncode == 1
