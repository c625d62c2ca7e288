"""Disputes at the simulated providers, through their adapters over real HTTP: the admin
API opens and decides them, each sim sends its own signed webhook, the adapter reads it
into a ``DisputeNotice``, and evidence goes through the adapter's call, idempotent by key.

Every test runs against acme and against globex (the ``driver`` fixture), from a reset sim.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from adapters.base import DeclineCode, Operation, Outcome, ProviderRequest, WebhookEvent
from tests.sim.conftest import Driver, follow_up, new_key
from tests.sim.test_sims import approved_authorization, settled

pytestmark = pytest.mark.timeout(60)


def evidence(dispute_id: str, text: str = "signed delivery receipt",
             key: str | None = None) -> ProviderRequest:
    return ProviderRequest(operation=Operation.DISPUTE_EVIDENCE,
                           idempotency_key=key or new_key("ev"), amount=600, currency="EUR",
                           reference="dp_ours", provider_ref=dispute_id, evidence_text=text,
                           evidence_files=("https://m.example/r.pdf",))


async def dispute_events(driver: Driver, count: int) -> list[WebhookEvent]:
    """The first ``count`` dispute events delivered (other events of the charge may arrive
    in between), verified and read by the adapter."""
    deadline = time.monotonic() + 5
    while True:
        events = [driver.adapter.verify_webhook(d.headers, d.body, time.time())
                  for d in driver.receiver.received(driver.hook_path)]
        found = [e for e in events if e.dispute is not None]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def captured(driver: Driver, amount: int = 1_000) -> str:
    ref = await approved_authorization(driver, amount)
    capture = follow_up(Operation.CAPTURE, ref, amount)
    assert (await settled(driver, capture, await driver.send(capture))).outcome is (
        Outcome.APPROVED)
    driver.receiver.clear(driver.hook_path)
    return str(ref)


async def test_open_evidence_decide_and_each_webhook_reads_as_a_dispute_notice(
        driver: Driver) -> None:
    """Opened, evidence taken (replayed for its key, refused a second time), won: three
    signed webhooks in the provider's format, each read by the adapter as the same
    dispute with its status, amount, fee and deadline."""
    ref = await captured(driver)
    opened = await driver.sim.open_dispute(ref, 600, fee=1_500, reason="product_not_received")
    assert (opened["state"], opened["amount"], opened["currency"]) == (
        "needs_response", 600, "EUR")
    request = evidence(opened["id"])
    reply = await driver.send(request)
    assert (reply.outcome, reply.provider_ref, reply.amount) == (
        Outcome.APPROVED, opened["id"], 600), reply
    assert (await driver.send(request)).outcome is Outcome.APPROVED  # replayed by key
    assert (await driver.status(request)).outcome is Outcome.APPROVED
    second = await driver.send(evidence(opened["id"], "again"))
    assert (second.outcome, second.decline_code) == (Outcome.FAILED,
                                                     DeclineCode.INVALID_REQUEST)
    [at_sim] = await driver.sim.disputes()
    assert (at_sim["state"], at_sim["evidence_text"], at_sim["evidence_files"]) == (
        "under_review", "signed delivery receipt", ["https://m.example/r.pdf"])
    await driver.sim.decide_dispute(opened["id"], "won")
    events = await dispute_events(driver, 2)
    notices = [e.dispute for e in events]
    assert [(n.status, n.dispute_ref, n.authorization_ref, n.amount, n.fee, n.currency)
            for n in notices if n is not None] == [
        ("needs_response", opened["id"], ref, 600, 1_500, "EUR"),
        ("won", opened["id"], ref, 600, 1_500, "EUR")]
    first = notices[0]
    assert first is not None
    assert first.reason == "product_not_received"
    assert abs(first.evidence_due_by_s - opened["evidence_due_by_s"]) < 1
    assert {e.operation for e in events} == {Operation.DISPUTE_EVIDENCE}
    assert len({e.event_id for e in events}) == 2


async def test_lost_without_evidence_and_a_decision_stays(driver: Driver) -> None:
    ref = await captured(driver)
    opened = await driver.sim.open_dispute(ref, 1_000, fee=0)
    await driver.sim.decide_dispute(opened["id"], "lost")
    notice = (await dispute_events(driver, 2))[-1].dispute
    assert notice is not None and (notice.status, notice.fee) == ("lost", 0)
    async with httpx.AsyncClient() as http:
        again = await http.post(f"{driver.sim.url}/_sim/disputes/{opened['id']}/decision",
                                json={"outcome": "won"}, headers=driver.sim.admin_headers())
        assert again.status_code == 409
    late = await driver.send(evidence(opened["id"]))
    assert late.outcome is Outcome.FAILED


async def test_the_admin_api_needs_its_token_and_a_known_charge(driver: Driver) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{driver.sim.url}/_sim/disputes",
                            json={"authorization_id": "x", "amount": 1})
        assert r.status_code == 401
        r = await http.post(f"{driver.sim.url}/_sim/disputes",
                            json={"authorization_id": "nope", "amount": 1},
                            headers=driver.sim.admin_headers())
        assert r.status_code == 404
        r = await http.post(f"{driver.sim.url}/_sim/disputes",
                            json={"authorization_id": "x", "amount": 0},
                            headers=driver.sim.admin_headers())
        assert r.status_code == 400
    unknown = await driver.send(evidence("dp_unknown"))
    assert (unknown.outcome, unknown.decline_code) == (Outcome.FAILED, DeclineCode.NOT_FOUND)
    never = await driver.status(evidence("dp_unknown", key=new_key("never")))
    assert never.decline_code is DeclineCode.NOT_FOUND
