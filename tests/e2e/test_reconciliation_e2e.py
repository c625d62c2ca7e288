"""Settlement reconciliation end to end: payments through both simulated providers (real
HTTP servers), every kind of report discrepancy injected through their admin API, runs
over the real report endpoints, fees posted to the real ledger, records in PostgreSQL
(docs/reconciliation.md)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from actors.app.runtime import Processor
from processor.client import Client
from processor.identity import SCOPES, SYSTEM_SCOPES, load_or_create_ring, verify_token
from processor.payments import (
    PaymentsConfig,
    clearing_account_for,
    fee_account_id,
    fee_transfer_id,
)
from tests.payments_support import Sims, authorize, bank_token, key, merchant, settled
from tests.running import IdSource, token_for

pytestmark = pytest.mark.timeout(300)

CURRENCY = "USD"  # served by both providers


def _today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def _tomorrow() -> str:
    return (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)).isoformat()


async def _admin(sims: Sims, provider: str, method: str, path: str,
                 body: Any = None) -> Any:
    async with httpx.AsyncClient() as http:
        r = await http.request(method, f"{sims.urls[provider]}{path}", json=body,
                               headers={"authorization": f"Bearer {sims.admin[provider]}"})
        assert r.status_code == 200, r.text
        return r.json()


async def _captured(http: httpx.AsyncClient, processor: Processor, account: int,
                    provider: str, amount: int) -> tuple[str, int]:
    """A payment captured at ``provider``: its id and its capture step's id."""
    r = await authorize(http, account, amount=amount, provider=provider, capture=True)
    assert r.status_code in (201, 202), r.text
    view = await settled(http, processor, f"/v1/payments/{r.json()['id']}")
    assert view["status"] == "captured", view
    [capture] = [op for op in view["operations"] if op["kind"] == "capture"]
    return view["id"], int(capture["id"].removeprefix("op_"))


async def _fee_balances(client: Client, provider: str) -> tuple[int, int]:
    """Debits posted on the provider's USD fee account, credits posted... of its clearing."""
    config = PaymentsConfig()
    fees = fee_account_id(config, provider, CURRENCY)
    fee, clearing = await client.lookup_accounts([
        fees, clearing_account_for(config, provider, CURRENCY, fees)])
    assert fee is not None and clearing is not None
    return fee.debits_posted, clearing.credits_posted


def _mine(exceptions: list[dict[str, Any]], subjects: set[str]) -> set[tuple[str, str, int]]:
    return {(e["kind"], e["subject_id"], e["amount"]) for e in exceptions
            if e["subject_id"] in subjects}


@pytest.mark.parametrize("provider", ["acme", "globex"])
async def test_every_discrepancy_is_found_fees_post_and_runs_repeat_harmlessly(
        processor: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims, provider: str) -> None:
    """Seven captures, a refund and a payout; the report leaves one capture out, changes
    one's amount and another's currency, doubles one, settles one a day late, and adds an
    unknown transaction and a fee of its own. The run finds exactly those seven exceptions
    with their amounts, posts the fees of the lines that match (fee account -> clearing), a
    repeated run adds nothing, and the next day's run matches the late capture and closes
    its exception while the missing one stays open."""
    system = token_for(processor, (*SCOPES, *SYSTEM_SCOPES))
    account = await merchant(client, ids)
    base = 10_000 if provider == "acme" else 20_000
    captures = [await _captured(http, processor, account, provider, base + 100 * n)
                for n in range(7)]
    refund = await http.post(f"/v1/payments/{captures[0][0]}/refunds", json={"amount": 2_000},
                             headers={"idempotency-key": key()})
    assert refund.status_code in (200, 202), refund.text
    await settled(http, processor, f"/v1/payments/{captures[0][0]}")
    payout = await http.post("/v1/payouts", headers={"idempotency-key": key()}, json={
        "amount": 3_000, "currency": CURRENCY, "merchant_account_id": account,
        "destination": bank_token(), "provider": provider})
    assert payout.status_code in (201, 202), payout.text
    payout_view = await settled(http, processor, f"/v1/payouts/{payout.json()['id']}")
    assert payout_view["status"] == "paid", payout_view

    def target(n: int) -> str:
        return f"txp-{captures[n][1]}-{provider}"

    unknown_amount, fee_amount = base + 4_321, 77 + (provider == "globex")
    await _admin(sims, provider, "POST", "/_sim/reports/discrepancies", {"discrepancies": [
        {"kind": "missing", "target": target(1)},
        {"kind": "amount_changed", "target": target(2), "amount_delta": 250},
        {"kind": "currency_changed", "target": target(3), "currency": "EUR"},
        {"kind": "duplicate", "target": target(4)},
        {"kind": "late", "target": target(5)},
        {"kind": "unknown", "amount": unknown_amount, "currency": CURRENCY},
        {"kind": "unexpected_fee", "amount": fee_amount, "currency": CURRENCY}]})

    async with Client("127.0.0.1", processor.rpc_port, system) as admin:
        fees_before = await _fee_balances(admin, provider)
        run = await processor.payments.reconcile.remote(provider, _today(), "test")
        assert run.status == "succeeded", run.error
        exceptions = [msgspec_builtins(e) for e in run.exceptions or []]
        pay = [pid for pid, _ in captures]
        assert _mine(exceptions, set(pay) | {payout_view["id"]}) == {
            ("missing", pay[1], base + 100), ("amount_mismatch", pay[2], 250),
            ("currency_mismatch", pay[3], base + 300), ("duplicate", pay[4], base + 400),
            ("missing", pay[5], base + 500)}
        unknown = [e for e in exceptions if e["kind"] == "unknown"
                   and e["found"]["amount"] == unknown_amount]
        fee = [e for e in exceptions if e["kind"] == "unexpected_fee"
               and e["amount"] == fee_amount]
        assert len(unknown) == 1 and unknown[0]["amount"] == unknown_amount
        assert len(fee) == 1 and fee[0]["found"]["currency"] == CURRENCY
        assert all(e["status"] == "open" for e in exceptions if e["subject_id"] in pay)
        by_kind = {e["kind"]: e for e in exceptions if e["subject_id"] in pay}
        assert by_kind["amount_mismatch"]["expected"]["amount"] == base + 200
        assert by_kind["amount_mismatch"]["found"]["amount"] == base + 450
        assert by_kind["amount_mismatch"]["transfer_id"] > 0
        assert not [e for e in exceptions if e["kind"] == "batch_mismatch"]

        # Fees of the lines that name a step of ours in its currency, once each: captures
        # 0, 2 (the amount differs, the fee was still kept), 4 (once, not twice) and 6,
        # the refund and the payout; never the changed currency's, the missing or the late.
        charged = {op["idempotency_key"]: op["fee"] for op in await _sim_ops(sims, provider)}
        steps = await _step_keys(processor, [pay[0], payout_view["id"]])
        expected_fees = sum(charged[target(n)] for n in (0, 2, 4, 6)) + sum(
            charged[k] for k in steps)
        assert expected_fees > 0
        # The fee transfers of this test's steps (ids derive from the step): exactly the
        # expected ones. The fee account's own balance may also hold the fees of earlier
        # tests' payments of the day, first matched by this run.
        mine = await _fees_of(admin, provider, [captures[n][1] for n in range(7)]
                              + [int(k.split("-")[1]) for k in steps])
        assert sum(mine.values()) == expected_fees
        assert not {captures[n][1] for n in (1, 3, 5)} & set(mine)
        after = await _fee_balances(admin, provider)
        assert after[0] - fees_before[0] >= expected_fees
        assert after[0] - fees_before[0] == after[1] - fees_before[1]

        again = await processor.payments.reconcile.remote(provider, _today(), "test")
        assert (again.status, again.attempt) == ("succeeded", run.attempt + 1)
        repeated = [msgspec_builtins(e) for e in again.exceptions or []]
        assert {e["id"] for e in repeated} == {e["id"] for e in exceptions}
        assert await _fee_balances(admin, provider) == after
        assert again.matched_count == run.matched_count

        late = await processor.payments.reconcile.remote(provider, _tomorrow(), "test")
        assert late.status == "succeeded", late.error
        assert not _mine([msgspec_builtins(e) for e in late.exceptions or []], set(pay))
        assert late.closed_count >= 1
        today = await processor.payments.reconcile.remote(provider, _today(), "test")
        status = {(e["kind"], e["subject_id"]): (e["status"], e["resolution"])
                  for e in map(msgspec_builtins, today.exceptions or [])
                  if e["subject_id"] in pay}
        assert status[("missing", pay[5])][0] == "resolved"
        assert status[("missing", pay[5])][1]["resolution"] == "settled_late"
        assert status[("missing", pay[1])] == ("open", None)
        assert sum(1 for s in status.values() if s[0] == "open") == 4
        assert await _fee_balances(admin, provider) == (
            after[0] + charged[target(5)], after[1] + charged[target(5)])
        again_late = await processor.payments.reconcile.remote(provider, _tomorrow(), "test")
        assert again_late.status == "succeeded"
        assert await _fee_balances(admin, provider) == (
            after[0] + charged[target(5)], after[1] + charged[target(5)])


def msgspec_builtins(value: Any) -> dict[str, Any]:
    import msgspec

    return dict(msgspec.to_builtins(value))


async def _sim_ops(sims: Sims, provider: str) -> list[dict[str, Any]]:
    body = await _admin(sims, provider, "GET", "/_sim/charges")
    return list(body["operations"])


async def _fees_of(client: Client, provider: str, step_ids: list[int]) -> dict[int, int]:
    """The fees posted for these steps' records, by step id (fee transfer ids derive from
    the record, which is the step)."""
    config = PaymentsConfig()
    by_id = {fee_transfer_id(config, provider, str(step)): step for step in step_ids}
    found = await client.lookup_transfers(list(by_id))
    return {by_id[t.id]: t.amount for t in found if t is not None}


async def _step_keys(processor: Processor, subjects: list[str]) -> list[str]:
    """The provider keys of the refund and payout steps of these payments and payouts."""
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        rows = await conn.fetch(
            "SELECT provider_key FROM payment_steps WHERE subject_id = ANY($1::text[])"
            " AND kind IN ('refund', 'payout') AND phase = 'succeeded'", subjects)
    finally:
        await conn.close()
    return [row["provider_key"] for row in rows]


async def _audit_events(processor: Processor, target_id: str) -> list[dict[str, Any]]:
    """The reconciliation exception's audit events, oldest first."""
    conn = await asyncpg.connect(processor.config.shard.database_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT *, details::text AS details FROM audit_events WHERE target_kind ="
            " 'reconciliation_exception' AND target_id = $1 ORDER BY id", target_id)
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def test_the_api_runs_lists_and_resolves(processor: Processor, http: httpx.AsyncClient,
                                               client: Client, ids: IdSource,
                                               sims: Sims) -> None:
    """Over HTTP: a run is asked for and answered with its exceptions; runs and open
    exceptions are listed a page at a time; a resolution is recorded once with who made it,
    and written as one audit event of the caller's token and request;
    bad requests are 4xx with stable codes, and the scopes are required."""
    account = await merchant(client, ids)
    pid, step = await _captured(http, processor, account, "acme", 12_345)
    await _admin(sims, "acme", "POST", "/_sim/reports/discrepancies", {"discrepancies": [
        {"kind": "missing", "target": f"txp-{step}-acme"}]})
    operator = token_for(processor, ("reconciliation:read", "reconciliation:write"),
                         subject="ops-ana")
    headers = {"authorization": f"Bearer {operator}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 headers=headers, timeout=120) as ops:
        # Runs of the day before this one, so the day's list has a second page whatever
        # else ran (the server's start-up catch-up runs earlier days).
        earlier = await ops.post("/v1/reconciliation/runs",
                                 json={"provider": "acme", "date": _today()})
        assert earlier.status_code == 200, earlier.text
        r = await ops.post("/v1/reconciliation/runs",
                           json={"provider": "acme", "date": _today()})
        assert r.status_code == 200, r.text
        run = r.json()
        assert (run["provider"], run["date"], run["status"]) == ("acme", _today(), "succeeded")
        [missing] = [e for e in run["exceptions"] if e["subject_id"] == pid]
        assert (missing["kind"], missing["amount"], missing["status"]) == (
            "missing", 12_345, "open")
        assert run["requested_by"].endswith("/ops-ana")

        got = await ops.get(f"/v1/reconciliation/runs/{run['id']}")
        assert got.status_code == 200 and got.json()["id"] == run["id"]
        day = {"provider": "acme", "date": _today()}
        page = (await ops.get("/v1/reconciliation/runs", params={**day, "limit": 1})).json()
        assert page["data"][0]["id"] == run["id"] and page["data"][0]["exceptions"] is None
        assert page["next_cursor"] is not None
        after = (await ops.get("/v1/reconciliation/runs",
                               params={**day, "limit": 1, "cursor": page["next_cursor"]})
                 ).json()
        assert after["data"][0]["id"] < run["id"]
        listed = (await ops.get("/v1/reconciliation/exceptions",
                                params={"status": "open", "provider": "acme",
                                        "kind": "missing", "limit": 500})).json()
        assert missing["id"] in {e["id"] for e in listed["data"]}

        r = await ops.post(f"/v1/reconciliation/exceptions/{missing['id']}/resolve",
                           json={"resolution": "written_off", "note": "refunded by phone"},
                           headers={"x-request-id": "req-recon-resolve"})
        assert r.status_code == 200, r.text
        resolved = r.json()
        assert resolved["status"] == "resolved"
        assert resolved["resolution"]["resolution"] == "written_off"
        assert resolved["resolution"]["resolved_by"].endswith("/ops-ana")
        again = await ops.post(f"/v1/reconciliation/exceptions/{missing['id']}/resolve",
                               json={"resolution": "accepted"})
        assert (again.status_code, again.json()["error"]["code"]) == (
            409, "exception_already_resolved")
        # The resolution is an audit event of the caller's token, written once.
        [event] = await _audit_events(processor, str(missing["id"]))
        assert (event["action"], event["target_kind"], event["actor_kind"],
                event["actor_subject"], event["request_id"], event["tenant_slot"]) == (
            "reconciliation_exception.resolved", "reconciliation_exception", "token",
            "ops-ana", "req-recon-resolve", 0)
        ring = load_or_create_ring(Path(processor.config.data_dir), now_s=int(time.time()))
        claims = verify_token(ring.verifying(), operator, now_s=int(time.time()))
        assert event["actor_token_id"] == claims.token_id
        assert json.loads(event["details"]) == {
            "provider": "acme", "date": _today(), "kind": "missing", "amount": 12_345,
            "currency": CURRENCY, "resolution": "written_off", "note": "refunded by phone"}
        still_open = (await ops.get("/v1/reconciliation/exceptions",
                                    params={"status": "open", "limit": 500})).json()
        assert missing["id"] not in {e["id"] for e in still_open["data"]}

        for method, path, body, status, code in [
            ("POST", "/v1/reconciliation/runs", {"provider": "nope", "date": _today()}, 422,
             "provider_unknown"),
            ("POST", "/v1/reconciliation/runs", {"provider": "acme", "date": "2999-01-01"},
             422, "date_in_future"),
            ("POST", "/v1/reconciliation/runs", {"provider": "acme"}, 400, "invalid_body"),
            ("GET", "/v1/reconciliation/runs/999999999", None, 404,
             "reconciliation_run_not_found"),
            ("GET", "/v1/reconciliation/runs/abc", None, 404, "reconciliation_run_not_found"),
            ("POST", "/v1/reconciliation/exceptions/999999999/resolve",
             {"resolution": "accepted"}, 404, "reconciliation_exception_not_found"),
            ("POST", f"/v1/reconciliation/exceptions/{missing['id']}/resolve",
             {"resolution": "Not A Word"}, 400, "invalid_body"),
            ("GET", "/v1/reconciliation/exceptions?status=closed", None, 400, "invalid_query"),
            ("GET", "/v1/reconciliation/exceptions?colour=red", None, 400, "invalid_query"),
            ("GET", "/v1/reconciliation/runs?limit=0", None, 400, "invalid_query"),
        ]:
            r = await ops.request(method, path, json=body)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, r.text)
    r = await http.get("/v1/reconciliation/runs", headers={
        "authorization": f"Bearer {token_for(processor, ('payments:read',))}"})
    assert (r.status_code, r.json()["error"]["code"]) == (403, "scope_missing")


async def test_the_command_line_asks_the_running_server(
        processor: Processor, capsys: pytest.CaptureFixture[str]) -> None:
    """`txproc recon run` finds the server by the address serve records in its data
    directory, signs its token with the directory's key, prints the run as tables and exits
    0; an unknown provider exits 2 naming the code; no address and no --url exits 2."""
    import asyncio

    from actors.app.cli import _write_api_address, main

    data_dir = processor.config.data_dir
    written = _write_api_address(processor.config, processor.http_port)
    try:
        status = await asyncio.to_thread(main, ["recon", "run", "--provider", "globex",
                                                "--date", _today(), "--data-dir", data_dir])
        out = capsys.readouterr().out
        assert status == 0, out
        assert f"globex {_today()} attempt" in out and "succeeded" in out
        assert out.splitlines()[1].startswith("lines ") and "fees posted" in out
        status = await asyncio.to_thread(main, ["recon", "run", "--provider", "nope",
                                                "--date", _today(), "--data-dir", data_dir])
        assert status == 2
        assert "provider_unknown" in capsys.readouterr().err
    finally:
        written.unlink()
    status = await asyncio.to_thread(main, ["recon", "run", "--provider", "acme", "--date",
                                            _today(), "--data-dir", data_dir])
    assert status == 2
    assert "no server address" in capsys.readouterr().err
    status = await asyncio.to_thread(main, [
        "recon", "run", "--provider", "acme", "--date", _today(), "--data-dir", data_dir,
        "--url", f"http://127.0.0.1:{processor.http_port}"])
    assert status == 0
