"""Both simulators serve their settlement report over their API, and their report
discrepancies (``POST /_sim/reports/discrepancies``) strike exactly what they say."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from adapters.base import Operation, ProviderRequest
from tests.sim.conftest import Driver, follow_up, payout
from tests.sim.test_sims import approved_authorization, settled

pytestmark = pytest.mark.timeout(60)


def _today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def _tomorrow() -> str:
    return (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)).isoformat()


async def _settle(driver: Driver, *requests: ProviderRequest) -> None:
    for request in requests:
        await settled(driver, request, await driver.send(request))


async def _captures(driver: Driver, count: int, amount: int = 10_000) -> list[ProviderRequest]:
    captures = []
    for _ in range(count):
        ref = await approved_authorization(driver, amount)
        captures.append(follow_up(Operation.CAPTURE, ref, amount))
    return captures


async def test_report_over_the_api_holds_fees_and_a_payout_batch(driver: Driver) -> None:
    """A day's report read over the provider's API parses into its transactions with their
    fees and one payout batch whose net is gross less refunds, payouts and fees."""
    ref = await approved_authorization(driver, 10_000)
    await _settle(driver, follow_up(Operation.CAPTURE, ref, 10_000),
                  follow_up(Operation.REFUND, ref, 2_500), payout("ba_7777_good", 5_000))
    report = driver.adapter.parse_report(await driver.settlement_report(_today()))
    assert [line.operation for line in report.lines] == [
        Operation.CAPTURE, Operation.REFUND, Operation.PAYOUT]
    fees = sum(line.fee for line in report.lines)
    assert fees > 0 and report.fees == []
    [batch] = report.batches
    assert (batch.currency, batch.entries) == ("EUR", 3)
    assert batch.net == 10_000 - 2_500 - 5_000 - fees
    assert all(line.line_ref for line in report.lines)


async def test_report_needs_the_providers_credentials(driver: Driver) -> None:
    """A report asked for without the provider's credentials is refused (401)."""
    call = driver.adapter.build_settlement(_today(), time.time())
    headers = {k: v for k, v in call.headers.items()
               if k.lower() in ("accept", "content-type")}
    answer = await driver.client.get(driver.sim.url + call.path, headers=headers)
    assert answer.status_code == 401


async def test_each_discrepancy_strikes_the_next_transactions(driver: Driver) -> None:
    """Missing, changed amount, changed currency, duplicate and late each strike the next
    transaction to settle, in order; unknown and unexpected fee add lines to today."""
    await driver.sim.add_discrepancies(
        {"kind": "missing"}, {"kind": "amount_changed", "amount_delta": 250},
        {"kind": "currency_changed", "currency": "USD"}, {"kind": "duplicate"},
        {"kind": "late"}, {"kind": "unknown", "amount": 777, "currency": "EUR"},
        {"kind": "unexpected_fee", "amount": 99, "currency": "EUR"})
    captures = await _captures(driver, 6)
    await _settle(driver, *captures)
    report = driver.adapter.parse_report(await driver.settlement_report(_today()))
    by_key: dict[str, list[tuple[int, str]]] = {}
    for line in report.lines:
        by_key.setdefault(line.idempotency_key, []).append((line.amount, line.currency))
    keys = [c.idempotency_key for c in captures]
    assert keys[0] not in by_key  # missing
    assert by_key[keys[1]] == [(10_250, "EUR")]  # amount changed
    assert by_key[keys[2]] == [(10_000, "USD")]  # currency changed
    assert by_key[keys[3]] == [(10_000, "EUR"), (10_000, "EUR")]  # duplicate
    assert keys[4] not in by_key  # late: tomorrow's report
    assert by_key[keys[5]] == [(10_000, "EUR")]  # untouched
    unknown = [k for k in by_key if k not in keys]
    assert len(unknown) == 1 and by_key[unknown[0]] == [(777, "EUR")]
    assert [(f.amount, f.currency) for f in report.fees] == [(99, "EUR")]
    tomorrow = driver.adapter.parse_report(await driver.settlement_report(_tomorrow()))
    assert [(line.idempotency_key, line.settled_on) for line in tomorrow.lines] == [
        (keys[4], _tomorrow())]
    again = driver.adapter.parse_report(await driver.settlement_report(_today()))
    assert again == report, "a report asked for twice is the same report"


async def test_a_discrepancy_may_name_its_transaction(driver: Driver) -> None:
    """A discrepancy naming a transaction's key strikes that one, settled already or not,
    and not the next to settle."""
    first, second = await _captures(driver, 2)
    await _settle(driver, first)
    await driver.sim.add_discrepancies({"kind": "missing", "target": first.idempotency_key},
                                       {"kind": "amount_changed", "amount_delta": -1,
                                        "target": second.idempotency_key})
    await _settle(driver, second)
    lines = driver.adapter.parse_settlement(await driver.settlement_report(_today()))
    assert [(line.idempotency_key, line.amount) for line in lines] == [
        (second.idempotency_key, 9_999)]


async def test_bad_discrepancies_are_refused(driver: Driver) -> None:
    """An unknown kind or a currency the provider does not serve is 400, and nothing waits."""
    for body in ({"discrepancies": [{"kind": "vanished"}]},
                 {"discrepancies": [{"kind": "unknown", "currency": "CHF"}]},
                 {"discrepancies": []}):
        answer = await driver.client.post(f"{driver.sim.url}/_sim/reports/discrepancies",
                                          json=body, headers=driver.sim.admin_headers())
        assert answer.status_code == 400, body
        assert answer.json()["error"] == "discrepancies_invalid"
    answer = await driver.client.get(f"{driver.sim.url}/_sim/reports/discrepancies",
                                     headers=driver.sim.admin_headers())
    assert answer.json()["waiting"] == []
