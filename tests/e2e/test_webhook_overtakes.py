"""A provider's event that overtakes the answer it repeats (real processor, real simulated
provider over HTTP).

acme sends its ``authorization.approved`` event as it answers; here every answer is held
back 300 ms (the simulator's ``answer_delay_ms``), so each event reaches the processor
while the call that caused it is still waiting. The event waits in the payments actor
until the call's answer is stored, and is then accepted once: no event is answered "send
it again", so the provider delivers each exactly once.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from actors.app.runtime import Processor
from processor.client import Client
from tests.payments_support import Sims, authorize, merchant
from tests.running import IdSource

PAYMENTS = 6


async def _webhooks(sims: Sims, name: str) -> dict[str, int]:
    stats = await sims.stats(name)
    counts = stats["webhooks"]
    assert isinstance(counts, dict)
    return {k: int(v) for k, v in counts.items()}


async def _settled(sims: Sims, name: str, before: dict[str, int], timeout_s: float = 30.0
                   ) -> dict[str, int]:
    """The provider's webhook counts since ``before``, once every event emitted since was
    delivered or failed an attempt (or ``timeout_s`` passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = await _webhooks(sims, name)
        since = {k: now[k] - before.get(k, 0) for k in now}
        if since["delivered"] + since["attempts_failed"] >= since["emitted"] or (
                time.monotonic() > deadline):
            return since
        await asyncio.sleep(0.1)


async def test_an_event_ahead_of_its_answer_is_delivered_once(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    account = await merchant(client, ids)
    before = await _webhooks(sims, "acme")
    await sims.faults("acme", answer_delay_ms=300)
    answers = await asyncio.gather(*(authorize(http, account, provider="acme")
                                     for _ in range(PAYMENTS)))
    assert [r.status_code for r in answers] == [201] * PAYMENTS, [r.text for r in answers]
    assert {r.json()["status"] for r in answers} == {"authorized"}
    since = await _settled(sims, "acme", before)
    assert since["emitted"] == PAYMENTS, since
    # Each event was accepted on its first delivery: none was sent back to be retried.
    assert since["delivered"] == PAYMENTS and since["attempts_failed"] == 0, since
