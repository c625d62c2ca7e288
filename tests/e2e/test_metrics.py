"""The node's /metrics during a workload: counters agree with what the workload did."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from actors.app.runtime import Processor
from processor.client import Client
from processor.codes import AccountResult, TransferResult
from processor.types import Account, AccountFlags, Transfer
from tests.running import IdSource, token_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _letters(count: int = 16) -> str:
    """A token's random part, as the providers mint it: letters only, so it never holds a
    digit run the card-number scan would refuse."""
    return "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(count))


async def scrape(processor: Processor) -> Samples:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"http://127.0.0.1:{processor.metrics_port}/metrics", timeout=30)
    assert r.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def test_metrics_agree_with_the_workload(processor: Processor, client: Client,
                                               ids: IdSource) -> None:
    bank, shop = ids.take(2)
    limited = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
    assert await client.create_accounts([
        Account(id=bank, currency="USD"), Account(id=shop, currency="USD", flags=limited),
    ]) == [AccountResult.ok] * 2
    before = await scrape(processor)

    ok_batches, ok_per_batch = 5, 40
    for _ in range(ok_batches):
        codes = await client.create_transfers([
            Transfer(id=ids.one(), debit_account_id=bank, credit_account_id=shop, amount=1,
                     currency="USD") for _ in range(ok_per_batch)])
        assert codes == [TransferResult.ok] * ok_per_batch
    refused = await client.create_transfers([
        Transfer(id=ids.one(), debit_account_id=shop, credit_account_id=bank,
                 amount=10**9, currency="USD") for _ in range(7)])
    assert refused == [TransferResult.exceeds_credits] * 7

    headers = {"authorization": f"Bearer {token_for(processor)}"}
    authorizations = 4
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 headers=headers, timeout=60) as http:
        for _ in range(authorizations):
            r = await http.post("/v1/payments", json={
                "amount": 500, "currency": "USD", "merchant_account_id": shop,
                "payment_method": f"pm_4242_{_letters()}"},
                headers={"idempotency-key": uuid.uuid4().hex})
            assert r.status_code == 201, r.text

    # The cost gauge needs two samples of the sliding window a moment apart.
    await asyncio.sleep(1.0)
    after = await scrape(processor)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # Exact where nothing else runs in the background; the payments' own ledger postings
    # (one hold per authorization) are counted as transfers too.
    assert delta("txproc_transfers_total", result="exceeds_credits") == 7
    assert delta("txproc_transfers_total", result="ok") == (
        ok_batches * ok_per_batch + authorizations)
    # The payments actor posts each hold over the ledger's RPC, as any gateway would.
    assert delta("txproc_transfer_request_duration_seconds_count", api="rpc") == (
        ok_batches + 1 + authorizations)
    assert delta("txproc_authorization_duration_seconds_count",
                 outcome="authorized") == authorizations
    assert delta("txproc_payment_operations_total", kind="authorize",
                 result="succeeded") == authorizations
    assert delta("txproc_provider_calls_total", operation="authorize",
                 outcome="approved") == authorizations
    # Every shard's commits reach the one endpoint (the shards are other processes).
    assert delta("txproc_ledger_commit_duration_seconds_count") >= 1
    shards = {dict(ls).get("shard") for (n, ls), _ in after.items()
              if n == "txproc_ledger_commit_duration_seconds_count"}
    assert shards >= {"0", "1"}
    assert delta("txproc_transfers_committed_total") == ok_batches * ok_per_batch + (
        authorizations)
    assert total(after, "txproc_cost_cpu_seconds_per_transfer") > 0
    assert total(after, "txproc_cost_per_transfer", currency="USD") > 0
    assert ("txproc_provider_breaker_state", (("provider", "acme"),)) in after
    assert total(after, "txproc_provider_breaker_state", provider="acme") == 0
    # Histogram buckets resolve 0.5 ms .. 5 s.
    les = {dict(ls)["le"] for (n, ls), _ in after.items()
           if n == "txproc_authorization_duration_seconds_bucket"}
    assert {"0.0005", "5.0"} <= les


async def test_database_gauges_are_exported(processor: Processor) -> None:
    deadline = time.monotonic() + 20
    while True:
        samples = await scrape(processor)
        if ("txproc_payment_steps_open", ()) in samples or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    for name in ("txproc_payment_steps_open", "txproc_payment_steps_unknown",
                 "txproc_payment_steps_stale", "txproc_outbox_undelivered",
                 "txproc_dead_letters", "txproc_outbox_oldest_undelivered_age_seconds"):
        assert (name, ()) in samples, name


async def test_logs_hold_no_tokens_secrets_or_card_data(processor: Processor, client: Client,
                                                        ids: IdSource) -> None:
    """After requests carrying a bearer token, card numbers and provider calls signed with
    secrets, no log line of any actor holds any of them."""
    import json as jsonlib
    from pathlib import Path

    import ray

    token = token_for(processor)
    body = "4" + "1" * 14
    total = sum((d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 == 0 else d
                for i, d in enumerate(int(c) for c in reversed(body)))
    card = body + str((10 - total % 10) % 10)
    shop = ids.one()
    assert await client.create_accounts([Account(id=shop, currency="USD")]) == [
        AccountResult.ok]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 headers={"authorization": f"Bearer {token}"},
                                 timeout=60) as http:
        r = await http.post("/v1/payments", json={
            "amount": 100, "currency": "USD", "merchant_account_id": shop,
            "payment_method": card}, headers={"idempotency-key": uuid.uuid4().hex})
        assert r.json()["error"]["code"] == "card_data_not_allowed"
        r = await http.post("/v1/payments", json={
            "amount": 100, "currency": "USD", "merchant_account_id": shop,
            "payment_method": f"pm_4242_{_letters()}", "capture": True},
            headers={"idempotency-key": uuid.uuid4().hex})
        assert r.status_code == 201, r.text
        # A token in the wrong place, and a forged one: both refused, neither logged.
        await http.get("/v1/accounts/1", headers={"authorization": f"Bearer {token}x"})
    await asyncio.sleep(1.5)  # let the actors' log lines reach their files
    secrets_seen = [token, card]
    providers = Path(processor.config.data_dir) / "providers"
    for name in processor.provider_urls:
        values = jsonlib.loads((providers / f"{name}.json").read_text())
        secrets_seen += [v for k, v in values.items() if k != "provider"]
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs_dir.glob("worker-*") if p.suffix in (".out", ".err")]
    assert files
    for path in files:
        text = path.read_text(errors="replace")
        for secret in secrets_seen:
            assert secret not in text, f"{path.name} holds a secret"
