"""Both simulated providers as real processes, driven over real HTTP through their adapters.

Every test runs against acme and against globex (the ``driver`` fixture), from a reset sim.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import httpx
import msgspec
import pytest

from adapters.acme import AcmeAdapter
from adapters.base import DeclineCode, Operation, Outcome, ProviderReply, ProviderRequest
from adapters.globex import GlobexAdapter
from adapters.sim.launch import SimProcess
from tests.sim.conftest import Driver, authorize, follow_up, new_key, payout

pytestmark = pytest.mark.timeout(60)


def partial(request: ProviderRequest) -> ProviderRequest:
    """The capture ``request`` with the rest of the authorization left capturable."""
    return msgspec.structs.replace(request, final=False)


async def settled(driver: Driver, request: ProviderRequest, reply: ProviderReply
                  ) -> ProviderReply:
    """The final reply: acme answers at once; globex answers PENDING and completes later,
    which its status endpoint reports."""
    if reply.outcome is not Outcome.PENDING:
        return reply
    assert driver.name == "globex", "only globex settles asynchronously"
    deadline = time.monotonic() + 5
    while reply.outcome is Outcome.PENDING and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        reply = await driver.status(request)
    return reply


async def approved_authorization(driver: Driver, amount: int = 1_000) -> str:
    token = await driver.tokenize()
    reply = await driver.send(authorize(token, amount))
    assert reply.outcome is Outcome.APPROVED, reply
    return reply.provider_ref


async def test_payment_lifecycle_partial_capture_and_refunds(driver: Driver) -> None:
    """Authorize, capture part (not final), refund twice in part, void the rest, and every
    rule about amounts holds."""
    ref = await approved_authorization(driver, 1_000)
    capture = partial(follow_up(Operation.CAPTURE, ref, 600))
    reply = await settled(driver, capture, await driver.send(capture))
    assert (reply.outcome, reply.amount, reply.provider_ref) == (Outcome.APPROVED, 600, ref)

    too_much = await driver.send(partial(follow_up(Operation.CAPTURE, ref, 401)))
    assert too_much.outcome is Outcome.FAILED
    assert too_much.decline_code is DeclineCode.AMOUNT_EXCEEDS_AUTHORIZED

    for amount in (250, 350):
        refund = follow_up(Operation.REFUND, ref, amount)
        reply = await settled(driver, refund, await driver.send(refund))
        assert (reply.outcome, reply.amount) == (Outcome.APPROVED, amount)
        assert reply.provider_ref and reply.provider_ref != ref
    over = await driver.send(follow_up(Operation.REFUND, ref, 1))
    assert over.outcome is Outcome.FAILED
    assert over.decline_code is DeclineCode.AMOUNT_EXCEEDS_AUTHORIZED

    # A void after a capture that was not final releases the rest.
    void = await driver.send(follow_up(Operation.VOID, ref, 400))
    assert void.outcome is Outcome.APPROVED
    late = await driver.send(partial(follow_up(Operation.CAPTURE, ref, 1)))
    assert (late.outcome, late.decline_code) == (Outcome.FAILED, DeclineCode.ALREADY_VOIDED)

    ledger = await driver.charges()
    assert sorted((op["operation"], op["amount"]) for op in ledger) == [
        ("authorize", 1_000), ("capture", 600), ("refund", 250), ("refund", 350),
        ("void", 400)]


async def test_partial_captures_by_reference_then_a_final_one_closes(driver: Driver) -> None:
    """Several captures of one authorization by its reference, with an amount and a final
    flag: they add up, the final one closes it, and nothing more is captured or voided."""
    ref = await approved_authorization(driver, 1_000)
    for amount, final in ((300, False), (200, False), (100, True)):
        capture = msgspec.structs.replace(follow_up(Operation.CAPTURE, ref, amount),
                                          final=final)
        reply = await settled(driver, capture, await driver.send(capture))
        assert (reply.outcome, reply.amount) == (Outcome.APPROVED, amount)
        # The same key replays the answer and captures nothing more.
        again = await settled(driver, capture, await driver.send(capture))
        assert (again.outcome, again.amount) == (Outcome.APPROVED, amount)
    more = await driver.send(partial(follow_up(Operation.CAPTURE, ref, 1)))
    assert more.outcome is Outcome.FAILED
    void = await driver.send(follow_up(Operation.VOID, ref, 400))
    assert void.outcome is Outcome.FAILED, "a closed authorization has nothing to release"
    [auth] = [op for op in await driver.charges() if op["operation"] == "authorize"]
    assert (auth["captured"], auth["capturable"], auth["closed"]) == (600, 0, True)
    assert sorted(op["amount"] for op in await driver.charges()
                  if op["operation"] == "capture") == [100, 200, 300]


async def test_void_then_capture_is_refused(driver: Driver) -> None:
    """A voided authorization releases its amount and cannot be captured or voided again."""
    ref = await approved_authorization(driver, 700)
    void = await driver.send(follow_up(Operation.VOID, ref, 700))
    assert (void.outcome, void.provider_ref, void.amount) == (Outcome.APPROVED, ref, 700)
    capture = await driver.send(follow_up(Operation.CAPTURE, ref, 100))
    assert (capture.outcome, capture.decline_code) == (Outcome.FAILED,
                                                       DeclineCode.ALREADY_VOIDED)
    again = await driver.send(follow_up(Operation.VOID, ref, 700))
    assert (again.outcome, again.decline_code) == (Outcome.FAILED, DeclineCode.ALREADY_VOIDED)


async def test_capture_of_unknown_authorization_is_not_found(driver: Driver) -> None:
    """A reference the provider never issued is a final failure, not a retry."""
    reply = await driver.send(follow_up(Operation.CAPTURE, "auth_doesnotexist", 100))
    assert (reply.outcome, reply.decline_code) == (Outcome.FAILED, DeclineCode.NOT_FOUND)


@pytest.mark.parametrize(("card", "code"), [
    ("4000000000000002", DeclineCode.INSUFFICIENT_FUNDS),
    ("4000000000000069", DeclineCode.CARD_EXPIRED),
    ("4000000000000119", DeclineCode.OTHER),
])
async def test_test_cards_decline_and_status_agrees(driver: Driver, card: str,
                                                    code: DeclineCode) -> None:
    """Test cards decline by their last four digits, and a status query repeats it."""
    request = authorize(await driver.tokenize(card))
    reply = await driver.send(request)
    assert (reply.outcome, reply.decline_code) == (Outcome.DECLINED, code)
    status = await driver.status(request)
    assert (status.outcome, status.decline_code) == (Outcome.DECLINED, code)
    [op] = await driver.charges()
    assert (op["state"], op["idempotency_key"]) == ("declined", request.idempotency_key)


async def test_tokens_are_portable_and_hold_no_card_number(
        driver: Driver, acme_sim: SimProcess, globex_sim: SimProcess) -> None:
    """A token from either sim pays at the other; neither the token nor the sim's ledger
    carries the card number."""
    other_name, other_sim = (("globex", globex_sim) if driver.name == "acme"
                             else ("acme", acme_sim))
    other = Driver(other_name, other_sim, driver.adapter, driver.receiver, driver.client)
    token = await other.tokenize("5555555555554444")
    assert token.startswith("pm_4444_") and "5555555555554444" not in token
    reply = await driver.send(authorize(token))
    assert reply.outcome is Outcome.APPROVED
    assert "5555555555554444" not in str(await driver.charges())


async def test_currency_sets_differ(driver: Driver) -> None:
    """EUR is served by both; GBP only by acme and JPY only by globex."""
    token = await driver.tokenize()
    foreign = "JPY" if driver.name == "acme" else "GBP"
    own = "GBP" if driver.name == "acme" else "JPY"
    assert foreign not in driver.adapter.currencies and own in driver.adapter.currencies
    refused = await driver.send(authorize(token, 1_000, foreign))
    assert (refused.outcome, refused.decline_code) == (Outcome.FAILED,
                                                       DeclineCode.CURRENCY_NOT_SUPPORTED)
    accepted = await driver.send(authorize(token, 1_000, own))
    assert (accepted.outcome, accepted.amount) == (Outcome.APPROVED, 1_000)


async def test_idempotent_replay_and_key_reuse(driver: Driver) -> None:
    """A repeated key replays the stored answer and records nothing new; the same key with
    another payload is refused."""
    request = authorize(await driver.tokenize(), 1_234)
    first = await driver.send(request)
    second = await driver.send(request)
    assert first.outcome is Outcome.APPROVED
    assert (second.outcome, second.provider_ref, second.amount) == (
        first.outcome, first.provider_ref, first.amount)
    assert len(await driver.charges()) == 1
    changed = ProviderRequest(operation=request.operation,
                              idempotency_key=request.idempotency_key, amount=999,
                              currency=request.currency, reference=request.reference,
                              payment_method=request.payment_method)
    misuse = await driver.send(changed)
    assert (misuse.outcome, misuse.decline_code) == (Outcome.FAILED,
                                                     DeclineCode.INVALID_REQUEST)


async def test_status_of_unknown_key_is_not_found(driver: Driver) -> None:
    """A key the provider never saw is a NOT_FOUND decline: safe to send with that key."""
    reply = await driver.status(authorize("pm_4242_0123456789abcdef"))
    assert (reply.outcome, reply.decline_code) == (Outcome.DECLINED, DeclineCode.NOT_FOUND)


async def test_payouts_paid_and_refused(driver: Driver) -> None:
    """A good account is paid; 0002 is refused at once; 0003 fails (globex: later)."""
    paid = payout(await driver.bank_token("000123456789"))
    reply = await settled(driver, paid, await driver.send(paid))
    assert (reply.outcome, reply.amount) == (Outcome.APPROVED, 2_500)

    closed = await driver.send(payout("ba_0002_closedaccount"))
    assert (closed.outcome, closed.decline_code) == (Outcome.DECLINED,
                                                     DeclineCode.INVALID_DESTINATION)

    returned = payout("ba_0003_returned")
    first = await driver.send(returned)
    expected_first = Outcome.PENDING if driver.name == "globex" else Outcome.DECLINED
    assert first.outcome is expected_first
    final = await settled(driver, returned, first)
    assert (final.outcome, final.decline_code) == (Outcome.DECLINED,
                                                   DeclineCode.INVALID_DESTINATION)

    malformed = await driver.send(payout("acct-123"))
    assert (malformed.outcome, malformed.decline_code) == (Outcome.FAILED,
                                                           DeclineCode.INVALID_DESTINATION)


async def test_wrong_credentials_fail_for_authentication(driver: Driver) -> None:
    """A bad key (acme) or signature (globex), or a stale signed timestamp, is refused."""
    wrong: AcmeAdapter | GlobexAdapter = (
        AcmeAdapter(api_key="acme_sk_wrong", webhook_secret="whsec_x") if driver.name == "acme"
        else GlobexAdapter(key_id="gxk_wrong", signing_secret="x" * 16, webhook_secret="whsec_x"))
    bad = Driver(driver.name, driver.sim, wrong, driver.receiver, driver.client)
    reply = await bad.send(authorize("pm_4242_0123456789abcdef"))
    assert (reply.outcome, reply.decline_code) == (Outcome.FAILED,
                                                   DeclineCode.AUTHENTICATION_FAILED)
    if driver.name == "globex":
        stale = await driver.send(authorize("pm_4242_0123456789abcdef"),
                                  now_s=time.time() - 600)
        assert (stale.outcome, stale.decline_code) == (Outcome.FAILED,
                                                       DeclineCode.AUTHENTICATION_FAILED)
    assert await driver.charges() == []


async def test_admin_api_needs_the_admin_token(driver: Driver) -> None:
    """The fault and ledger endpoints refuse a caller without the admin token."""
    for method, path in (("GET", "/_sim/charges"), ("PUT", "/_sim/faults"),
                         ("POST", "/_sim/reset"), ("GET", "/_sim/stats")):
        answer = await driver.client.request(method, f"{driver.sim.url}{path}",
                                             headers={"authorization": "Bearer nope"})
        assert answer.status_code == 401, path
    bad = await driver.client.put(f"{driver.sim.url}/_sim/faults", json={"error_rate": 2},
                                  headers=driver.sim.admin_headers())
    assert bad.status_code == 400


# --- faults ------------------------------------------------------------------------------------


async def test_injected_error_is_retryable_or_unknown_and_never_takes_effect(
        driver: Driver) -> None:
    """acme's 500 promises nothing (UNKNOWN); globex's says nothing committed (RETRYABLE).
    Either way the status query finds nothing, and the retry with the same key succeeds."""
    request = authorize(await driver.tokenize())
    await driver.set_faults(error_rate=1.0)
    reply = await driver.send(request)
    expected = Outcome.UNKNOWN if driver.name == "acme" else Outcome.RETRYABLE
    assert (reply.outcome, reply.http_status) == (expected, 500)
    await driver.set_faults()
    status = await driver.status(request)
    assert (status.outcome, status.decline_code) == (Outcome.DECLINED, DeclineCode.NOT_FOUND)
    assert (await driver.send(request)).outcome is Outcome.APPROVED
    assert len(await driver.charges()) == 1


async def test_burst_of_503_then_recovery(driver: Driver) -> None:
    """A burst of N 503s is N retryable answers with a wait, then service resumes."""
    request = authorize(await driver.tokenize())
    await driver.set_faults(burst_503=2, retry_after_s=2)
    for _ in range(2):
        reply = await driver.send(request)
        assert (reply.outcome, reply.http_status) == (Outcome.RETRYABLE, 503)
        assert reply.retry_after_s == 2.0
    assert (await driver.send(request)).outcome is Outcome.APPROVED


async def test_rate_limit_answers_retry_after(driver: Driver) -> None:
    """Over the rate limit, acme answers 429 and globex 503, both with a wait to honour."""
    token = await driver.tokenize()
    await driver.set_faults(rate_limit_rps=2.0, rate_limit_burst=1)
    assert (await driver.send(authorize(token))).outcome is Outcome.APPROVED
    limited = await driver.send(authorize(token))
    assert limited.outcome is Outcome.RETRYABLE
    assert limited.http_status == (429 if driver.name == "acme" else 503)
    assert 0.0 < limited.retry_after_s <= 1.0
    await asyncio.sleep(limited.retry_after_s)
    assert (await driver.send(authorize(token))).outcome is Outcome.APPROVED


async def eventually(driver: Driver, request: ProviderRequest, outcome: Outcome,
                     *, status: bool = False, timeout_s: float = 5.0) -> ProviderReply:
    """Send (or query) until the answer has ``outcome``; the last answer otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await (driver.status(request) if status else driver.send_fresh(request))
        if reply.outcome is outcome or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.1)


async def test_outage_unavailable_then_over(driver: Driver) -> None:
    """During an outage every call is a retryable 503; it ends by itself after outage_s."""
    request = authorize(await driver.tokenize())
    await driver.set_faults(outage="unavailable", outage_s=1.0)
    reply = await driver.send(request)
    assert (reply.outcome, reply.http_status) == (Outcome.RETRYABLE, 503)
    assert 0.0 < reply.retry_after_s <= 1.0
    assert (await eventually(driver, request, Outcome.APPROVED)).outcome is Outcome.APPROVED
    assert len(await driver.charges()) == 1


async def test_outage_refusing_connections(driver: Driver) -> None:
    """A refusing outage closes the port: a call is certainly not sent (RETRYABLE); then
    the sim listens again on the same port, its ledger intact."""
    request = authorize(await driver.tokenize())
    assert (await driver.send(request)).outcome is Outcome.APPROVED
    await driver.set_faults(outage="refuse", outage_s=1.0)
    await asyncio.sleep(0.2)
    refused = await driver.send_fresh(authorize(request.payment_method))
    assert refused.outcome is Outcome.RETRYABLE, refused
    again = await eventually(driver, authorize(request.payment_method), Outcome.APPROVED)
    assert again.outcome is Outcome.APPROVED
    assert len(await driver.charges()) == 2


async def test_hang_then_status_query_resolves(driver: Driver) -> None:
    """A hung call times out on our side (UNKNOWN); while it hangs, the status query says
    it is in progress (UNKNOWN); once it is done, the status query says it was approved."""
    request = authorize(await driver.tokenize())
    await driver.set_faults(hang_rate=1.0, hang_s=1.5)
    reply = await driver.send(request, timeout_s=0.2)
    assert reply.outcome is Outcome.UNKNOWN
    await driver.set_faults()
    during = await driver.status(request)
    assert during.outcome is Outcome.UNKNOWN and during.http_status == 409
    retry = await driver.send(request)
    assert retry.outcome is Outcome.RETRYABLE, "a concurrent duplicate is refused, not run"
    after = await eventually(driver, request, Outcome.APPROVED, status=True)
    assert after.outcome is Outcome.APPROVED
    assert len(await driver.charges()) == 1


async def test_a_slow_call_is_in_progress_never_missing(driver: Driver) -> None:
    """A call slowed past our timeout has already claimed its key: the status query says it
    is in progress, never "not found", so it is never sent again elsewhere."""
    request = authorize(await driver.tokenize())
    await driver.set_faults(latency={"median_ms": 900, "p99_ms": 1_000})
    reply = await driver.send(request, timeout_s=0.2)
    assert reply.outcome is Outcome.UNKNOWN
    await driver.set_faults()
    during = await driver.status(request)
    assert (during.outcome, during.http_status) == (Outcome.UNKNOWN, 409)
    after = await eventually(driver, request, Outcome.APPROVED, status=True)
    assert after.outcome is Outcome.APPROVED


async def test_lost_response_then_status_query_resolves(driver: Driver) -> None:
    """The call takes effect but its answer is lost (UNKNOWN); the status query and a replay
    with the same key both find the one operation that happened."""
    request = authorize(await driver.tokenize())
    await driver.set_faults(lost_response_rate=1.0)
    reply = await driver.send(request)
    assert (reply.outcome, reply.http_status) == (Outcome.UNKNOWN, 0)
    await driver.set_faults()
    status = await driver.status(request)
    assert status.outcome is Outcome.APPROVED
    replay = await driver.send(request)
    assert (replay.outcome, replay.provider_ref) == (Outcome.APPROVED, status.provider_ref)
    [op] = await driver.charges()
    assert op["idempotency_key"] == request.idempotency_key


async def test_latency_is_injected(driver: Driver) -> None:
    """A lognormal latency (median 80 ms, p99 120 ms) slows every call."""
    token = await driver.tokenize()
    await driver.set_faults(latency={"median_ms": 80, "p99_ms": 120})
    spans = {}
    for _ in range(3):
        request = authorize(token)
        started = time.monotonic()
        assert (await driver.send(request)).outcome is Outcome.APPROVED
        spans[request.reference] = (time.monotonic() - started) * 1000
        assert spans[request.reference] >= 30
    # Each operation says how long the provider took, latency included: what a caller's
    # benchmark subtracts; never more than the caller measured around it.
    served = {c["reference"]: c["served_ms"] for c in await driver.charges()}
    for reference, caller_ms in spans.items():
        assert 30 <= served[reference] <= caller_ms, (served, spans)


# --- webhooks ----------------------------------------------------------------------------------


async def test_webhooks_are_signed_and_describe_each_operation(driver: Driver) -> None:
    """Every settled state change is delivered, verifies with the adapter, and names the
    call it is about by idempotency key."""
    ref = await approved_authorization(driver, 1_000)
    capture = follow_up(Operation.CAPTURE, ref, 1_000)
    await settled(driver, capture, await driver.send(capture))
    refund = follow_up(Operation.REFUND, ref, 400)
    await settled(driver, refund, await driver.send(refund))
    deliveries = await driver.receiver.wait_for(driver.hook_path, 3)
    events = [driver.adapter.verify_webhook(d.headers, d.body, time.time())
              for d in deliveries]
    assert [(e.operation, e.outcome, e.amount) for e in events] == [
        (Operation.AUTHORIZE, Outcome.APPROVED, 1_000),
        (Operation.CAPTURE, Outcome.APPROVED, 1_000),
        (Operation.REFUND, Outcome.APPROVED, 400)]
    assert [e.idempotency_key for e in events[1:]] == [capture.idempotency_key,
                                                       refund.idempotency_key]
    assert events[1].provider_ref == ref
    assert len({e.event_id for e in events}) == 3


async def test_webhook_for_a_decline_and_a_failed_payout(driver: Driver) -> None:
    """Declines are announced too, with the normalised decline code."""
    await driver.send(authorize(await driver.tokenize("4000000000000002")))
    await driver.send(payout("ba_0002_closed"))
    deliveries = await driver.receiver.wait_for(driver.hook_path, 2)
    events = [driver.adapter.verify_webhook(d.headers, d.body, time.time())
              for d in deliveries]
    assert [(e.operation, e.outcome, e.decline_code) for e in events] == [
        (Operation.AUTHORIZE, Outcome.DECLINED, DeclineCode.INSUFFICIENT_FUNDS),
        (Operation.PAYOUT, Outcome.DECLINED, DeclineCode.INVALID_DESTINATION)]


async def test_webhooks_duplicated_when_asked(driver: Driver) -> None:
    """With duplicates on, each event arrives twice under the same event id."""
    await driver.set_faults(webhook_duplicate_rate=1.0)
    await driver.send(authorize(await driver.tokenize()))
    deliveries = await driver.receiver.wait_for(driver.hook_path, 2)
    ids = [driver.adapter.verify_webhook(d.headers, d.body, time.time()).event_id
           for d in deliveries]
    assert len(ids) == 2 and ids[0] == ids[1]


async def test_webhooks_out_of_order_when_asked(driver: Driver) -> None:
    """With a reorder window of 3, three events arrive newest first."""
    await driver.set_faults(webhook_reorder_window=3, webhook_reorder_hold_ms=3_000)
    token = await driver.tokenize()
    requests = [authorize(token) for _ in range(3)]
    for request in requests:
        await driver.send(request)
    deliveries = await driver.receiver.wait_for(driver.hook_path, 3)
    keys = [driver.adapter.verify_webhook(d.headers, d.body, time.time()).idempotency_key
            for d in deliveries]
    assert keys == [r.idempotency_key for r in reversed(requests)]


async def test_webhook_delivery_is_retried(driver: Driver) -> None:
    """A receiver that fails twice still gets the event, on the third attempt."""
    driver.receiver.fail_next[driver.hook_path] = 2
    request = authorize(await driver.tokenize())
    await driver.send(request)
    [delivery] = await driver.receiver.wait_for(driver.hook_path, 1)
    event = driver.adapter.verify_webhook(delivery.headers, delivery.body, time.time())
    assert event.idempotency_key == request.idempotency_key
    stats = await driver.sim.stats()
    assert stats["webhooks"]["attempts_failed"] == 2


# --- settlement ----------------------------------------------------------------------------------


async def test_settlement_report_matches_the_ledger(driver: Driver) -> None:
    """The day's report, over HTTP and in the report directory, parses into one line per
    capture, refund and payout that settled, with fees, and agrees with the sim's ledger."""
    ref = await approved_authorization(driver, 10_000)
    requests = [follow_up(Operation.CAPTURE, ref, 10_000),
                follow_up(Operation.REFUND, ref, 2_500),
                payout("ba_7777_good", 5_000)]
    for request in requests:
        await settled(driver, request, await driver.send(request))
    today = datetime.now(UTC).date().isoformat()
    report = await driver.settlement_report(today)
    lines = driver.adapter.parse_settlement(report)
    assert [(line.operation, line.amount, line.idempotency_key) for line in lines] == [
        (r.operation, r.amount, r.idempotency_key) for r in requests]
    assert lines[0].provider_ref == ref
    assert lines[0].fee > 0, "captures cost a fee"
    assert all(line.fee >= 0 and line.settled_on == today and line.currency == "EUR"
               for line in lines)
    ledger = {op["idempotency_key"]: op for op in await driver.charges()}
    for line in lines:
        assert ledger[line.idempotency_key]["fee"] == line.fee
        assert ledger[line.idempotency_key]["state"] == "settled"
    suffix = "csv" if driver.name == "acme" else "jsonl"
    written = (driver.sim.secrets_file.parent / f"{driver.name}-reports"
               / f"{driver.name}-settlement-{today}.{suffix}")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if written.exists() and driver.adapter.parse_settlement(written.read_bytes()) == lines:
            break
        await asyncio.sleep(0.1)
    assert driver.adapter.parse_settlement(written.read_bytes()) == lines


async def test_concurrent_calls_with_distinct_keys(driver: Driver) -> None:
    """Many calls at once each take effect exactly once."""
    token = await driver.tokenize()
    requests = [authorize(token, 100 + i) for i in range(20)]
    replies = await asyncio.gather(*(driver.send(r) for r in requests))
    assert all(reply.outcome is Outcome.APPROVED for reply in replies)
    ledger = await driver.charges()
    assert sorted(op["amount"] for op in ledger) == [r.amount for r in requests]


async def test_a_key_with_odd_characters_round_trips(driver: Driver) -> None:
    """Idempotency keys travel in paths and query strings escaped, and still match."""
    request = authorize(await driver.tokenize(), key=f"a/b?c&d=%e#{new_key()}")
    assert (await driver.send(request)).outcome is Outcome.APPROVED
    assert (await driver.status(request)).outcome is Outcome.APPROVED


async def test_http_client_sees_a_reset_for_a_lost_response(driver: Driver) -> None:
    """The lost response is a dropped connection, which the transport classifies as
    'perhaps performed', never as 'not sent'."""
    await driver.set_faults(lost_response_rate=1.0)
    call = driver.adapter.build(authorize(await driver.tokenize()), time.time())
    with pytest.raises(httpx.HTTPError) as caught:
        await driver.client.request(call.method, driver.sim.url + call.path,
                                    headers=call.headers, content=call.body)
    assert not isinstance(caught.value, httpx.ConnectError)


async def test_increments_where_the_provider_offers_them(driver: Driver) -> None:
    """acme raises an open authorization by the amount (which may then be captured) and
    replays a repeated key; globex does not offer it and its adapter refuses to build one."""
    ref = await approved_authorization(driver, 1_000)
    increment = follow_up(Operation.INCREMENT, ref, 250)
    if Operation.INCREMENT not in driver.adapter.capabilities:
        with pytest.raises(ValueError, match="does not offer"):
            driver.adapter.build(increment, time.time())
        return
    reply = await driver.send(increment)
    assert (reply.outcome, reply.provider_ref, reply.amount) == (Outcome.APPROVED, ref, 1_250)
    again = await driver.send(increment)
    assert (again.outcome, again.amount) == (Outcome.APPROVED, 1_250)
    status = await driver.status(increment)
    assert status.outcome is Outcome.APPROVED
    capture = follow_up(Operation.CAPTURE, ref, 1_250)
    assert (await driver.send(capture)).outcome is Outcome.APPROVED
    closed = await driver.send(follow_up(Operation.INCREMENT, ref, 1))
    assert closed.outcome is Outcome.FAILED
    [auth] = [op for op in await driver.charges() if op["operation"] == "authorize"]
    assert (auth["amount"], auth["captured"]) == (1_250, 1_250)
    assert [op["amount"] for op in await driver.charges()
            if op["operation"] == "increment"] == [250]
