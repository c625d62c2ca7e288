"""Batched webhooks: a simulator started with ``--webhook-batch-max`` sends the events that
gather within its linger time in one signed request, which the adapter reads back into the
same events, in order; a batch that fails is delivered again whole.

Each test starts its own simulator process (the session's send one event per request)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from adapters.acme import AcmeAdapter
from adapters.base import WebhookRejected
from adapters.decoding import WEBHOOK_BATCH_MAX
from adapters.globex import GlobexAdapter
from adapters.sim.launch import SimProcess, start_sim
from tests.sim.conftest import Driver, WebhookReceiver, authorize

LINGER_MS = 400.0


@pytest.fixture(params=["acme", "globex"])
async def batching(request: pytest.FixtureRequest, tmp_path: Path,
                   webhook_receiver: WebhookReceiver) -> AsyncIterator[Driver]:
    name = request.param
    path = f"/{name}-batches"
    webhook_receiver.clear(path)
    secrets = tmp_path / f"{name}.secrets.json"
    sim: SimProcess = await asyncio.to_thread(
        start_sim, name, secrets_file=secrets, webhook_url=f"{webhook_receiver.url}{path}",
        seed=3, webhook_backoff_ms=100, webhook_batch_max=4,
        webhook_batch_linger_ms=LINGER_MS)
    adapter = (AcmeAdapter.from_secrets_file(secrets) if name == "acme"
               else GlobexAdapter.from_secrets_file(secrets))
    async with httpx.AsyncClient(timeout=10) as client:
        driver = Driver(name, sim, adapter, webhook_receiver, client)
        driver.hook_path = path
        try:
            yield driver
        finally:
            if driver.session is not None:
                await driver.session.close()
            webhook_receiver.clear(path)
            assert sim.stop() == 0


async def test_events_gathered_within_the_linger_go_in_one_request(batching: Driver) -> None:
    """Five authorizations in quick succession: the first four events in one request, in
    the order of the calls, the fifth alone in the single-event form; every one reads back
    with its key, and the batch is refused by the single-event reader."""
    driver = batching
    token = await driver.tokenize()
    requests = [authorize(token) for _ in range(5)]
    for request in requests:
        await driver.send(request)
    deliveries = await driver.receiver.wait_for(driver.hook_path, 2,
                                                timeout_s=5 + 2 * LINGER_MS / 1000)
    assert len(deliveries) == 2
    events = [driver.adapter.verify_webhooks(d.headers, d.body, time.time())
              for d in deliveries]
    assert [len(e) for e in events] == [4, 1]
    assert [e.idempotency_key for batch in events for e in batch] == [
        r.idempotency_key for r in requests]
    single = driver.adapter.verify_webhook(deliveries[1].headers, deliveries[1].body,
                                           time.time())
    assert single == events[1][0]
    with pytest.raises(WebhookRejected):
        driver.adapter.verify_webhook(deliveries[0].headers, deliveries[0].body, time.time())
    stats = (await driver.sim.stats())["webhooks"]
    assert (stats["emitted"], stats["delivered"], stats["batches"]) == (5, 5, 1)


async def test_a_failed_batch_is_delivered_again_whole(batching: Driver) -> None:
    driver = batching
    driver.receiver.fail_next[driver.hook_path] = 1
    token = await driver.tokenize()
    requests = [authorize(token) for _ in range(2)]
    for request in requests:
        await driver.send(request)
    [delivery] = await driver.receiver.wait_for(driver.hook_path, 1,
                                                timeout_s=5 + 2 * LINGER_MS / 1000)
    events = driver.adapter.verify_webhooks(delivery.headers, delivery.body, time.time())
    assert [e.idempotency_key for e in events] == [r.idempotency_key for r in requests]
    stats = (await driver.sim.stats())["webhooks"]
    assert (stats["attempts_failed"], stats["delivered"], stats["dead"]) == (1, 2, 0)


def test_a_batch_signed_for_one_body_is_refused_for_another() -> None:
    """The signature covers the whole batch: an event added to a signed batch, or a batch
    beyond the limit, is refused whole."""
    adapter = AcmeAdapter(api_key="k", webhook_secret="whsec_test", timeout_s=1.0)
    one = b'{"id":"evt_1","object":"event","type":"authorization.approved","created":1,' \
          b'"request":{"idempotency_key":"k1"},"data":{"object":{"id":"au_1","amount":5,' \
          b'"currency":"eur","status":"approved"}}}'
    body = b'{"object":"list","data":[' + one + b"]}"
    now = int(time.time())
    signature = hmac.new(b"whsec_test", f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    headers = {"acme-signature": f"t={now},v1={signature}"}
    tampered = body.replace(b"]}", b"," + one + b"]}")
    with pytest.raises(WebhookRejected) as refused:
        adapter.verify_webhooks(headers, tampered, float(now))
    assert refused.value.code == "webhook_signature_invalid"
    too_many = b'{"object":"list","data":[' + b",".join([one] * (WEBHOOK_BATCH_MAX + 1)) \
        + b"]}"
    signature = hmac.new(b"whsec_test", f"{now}.".encode() + too_many,
                         hashlib.sha256).hexdigest()
    with pytest.raises(WebhookRejected) as refused:
        adapter.verify_webhooks({"acme-signature": f"t={now},v1={signature}"}, too_many,
                                float(now))
    assert refused.value.code == "webhook_malformed"
