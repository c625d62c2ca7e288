"""Payments and the ledger are separate failure domains at run time (docs/architecture.md).

Payments run in their own actor; the front forwards their routes to it. These tests SIGKILL
one side while both carry traffic, over real HTTP, and check that the other side does not
notice (the ledger) or loses nothing (payments).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from actors.app.runtime import Processor
from processor.client import Client
from processor.codes import AccountResult
from processor.types import Account
from tests.payments_support import Sims, authorize, balances, card_token, key, merchant
from tests.running import IdSource, token_for

# Each payment waits this long on the provider, so a kill finds them in flight.
PROVIDER_LATENCY = {"median_ms": 900, "p99_ms": 1_000}
IN_FLIGHT = 6


class LedgerTraffic:
    """Single transfers over HTTP, one after another, until stopped; every answer kept."""

    def __init__(self, processor: Processor, ids: IdSource, debit: int, credit: int) -> None:
        self._processor = processor
        self._ids = ids
        self._accounts = (debit, credit)
        self.answers: list[int | str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[int | str]:
        self._stop.set()
        assert self._task is not None
        await self._task
        return self.answers

    async def _run(self) -> None:
        debit, credit = self._accounts
        headers = {"authorization": f"Bearer {token_for(self._processor)}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self._processor.http_port}",
                                     headers=headers, timeout=10) as http:
            while not self._stop.is_set():
                body = {"id": self._ids.one(), "debit_account_id": debit,
                        "credit_account_id": credit, "amount": 1, "currency": "USD"}
                try:
                    self.answers.append((await http.post("/v1/transfers", json=body)).status_code)
                except httpx.HTTPError as exc:
                    self.answers.append(type(exc).__name__)
                await asyncio.sleep(0.01)


@pytest.fixture
async def supervised(processor: Processor) -> AsyncIterator[Processor]:
    """The processor with its supervisor running (it restarts a killed front), and the
    payments actor started again afterwards whatever the test did."""
    supervisor = asyncio.create_task(processor.supervise(interval_s=0.2))
    try:
        yield processor
    finally:
        supervisor.cancel()
        await asyncio.wait_for(processor.payments.start.remote(), timeout=60)


async def _ledger_pair(client: Client, ids: IdSource) -> tuple[int, int]:
    debit, credit = ids.take(2)
    assert await client.create_accounts([Account(id=debit, currency="USD"),
                                         Account(id=credit, currency="USD")]) == [
        AccountResult.ok] * 2
    return debit, credit


async def _payments_of(processor: Processor, merchant_id: int) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        rows = await conn.fetch("SELECT id, status, amount FROM payments "
                                "WHERE merchant_account_id = $1", merchant_id)
    finally:
        await conn.close()
    return [dict(row) for row in rows]


async def _all_final(processor: Processor, merchant_id: int, *, timeout_s: float = 60.0
                     ) -> list[dict[str, Any]]:
    """The merchant's payments once none is ``processing`` (the recovery worker's job)."""
    deadline = time.monotonic() + timeout_s
    while True:
        payments = await _payments_of(processor, merchant_id)
        if all(p["status"] != "processing" for p in payments) or time.monotonic() > deadline:
            return payments
        try:
            await asyncio.wait_for(processor.payments.recover_once.remote(), timeout=10)
        except Exception:  # restarting, or the ledger still away: the next round tries
            pass
        await asyncio.sleep(0.5)


async def _check_exact(client: Client, sims: Sims, merchant_id: int,
                       payments: list[dict[str, Any]]) -> None:
    """Each payment final, held in the ledger exactly once, charged by the provider once."""
    assert payments and all(p["status"] in ("authorized", "failed", "declined")
                            for p in payments), payments
    held = sum(p["amount"] for p in payments if p["status"] == "authorized")
    assert await balances(client, merchant_id) == (0, 0, held, 0)
    for p in payments:
        ops = [op for op in await sims.charges("acme", p["id"])
               if op["operation"] == "authorize"]
        assert len(ops) == (1 if p["status"] == "authorized" else len(ops)), (p, ops)
        assert len(ops) <= 1, (p, ops)


async def test_a_killed_payments_actor_costs_ledger_traffic_nothing(
        supervised: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    processor = supervised
    merchant_id = await merchant(client, ids)
    traffic = LedgerTraffic(processor, ids, *await _ledger_pair(client, ids))
    traffic.start()
    await sims.faults("acme", latency=PROVIDER_LATENCY)
    in_flight = [asyncio.create_task(authorize(http, merchant_id, provider="acme"))
                 for _ in range(IN_FLIGHT)]
    await asyncio.sleep(0.4)  # every request is past the front, waiting on the provider
    os.kill(await processor.payments.pid.remote(), signal.SIGKILL)

    # Requests whose payments actor died answer a retryable 503, never a 500.
    for answer in await asyncio.gather(*in_flight):
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "unavailable"
        assert answer.headers["retry-after"]
    # Until the actor is back, a new payment is a retryable 503; then it succeeds.
    await sims.faults("acme")
    statuses = []
    for _ in range(200):
        answer = await authorize(http, merchant_id, provider="acme", token=card_token())
        statuses.append(answer.status_code)
        if answer.status_code == 201:
            break
        assert answer.status_code == 503 and answer.headers["retry-after"], answer.text
        await asyncio.sleep(0.1)
    assert statuses[-1] == 201, statuses

    answers = await traffic.stop()
    assert len(answers) > 20
    assert set(answers) == {201}, [a for a in answers if a != 201][:5]
    # Every payment the dead actor left in flight reaches a final state, exactly once.
    await _check_exact(client, sims, merchant_id, await _all_final(processor, merchant_id))


async def test_a_killed_front_loses_no_payment_in_flight(
        supervised: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    processor = supervised
    merchant_id = await merchant(client, ids)
    await sims.faults("acme", latency=PROVIDER_LATENCY)
    requests, in_flight = await _authorizations_in_flight(processor, http, merchant_id)
    front_pid = await processor.front.pid.remote()
    os.kill(front_pid, signal.SIGKILL)
    # The edge is gone, so the gateways' connections break; the payments go on: their
    # ledger postings wait for the front (parked, then finished by the recovery worker).
    for answer in await asyncio.gather(*in_flight, return_exceptions=True):
        assert isinstance(answer, httpx.HTTPError) or answer.status_code in (201, 503), answer
    await sims.faults("acme")
    await _wait_ready(processor)
    assert await processor.front.pid.remote() != front_pid

    payments = await _all_final(processor, merchant_id)
    assert len(payments) == IN_FLIGHT, payments
    async with Client("127.0.0.1", processor.rpc_port, token_for(processor)) as fresh:
        await _check_exact(fresh, sims, merchant_id, payments)
    assert all(p["status"] == "authorized" for p in payments), payments
    # A gateway's retry with the same key finds the payment its lost request made.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 headers=dict(http.headers), timeout=60) as again:
        for idem, token in requests:
            # 201, or the 202 the lost request stored when its posting found the front
            # down (the payment itself is final: GET shows it).
            answer = await _until_not_in_use(again, merchant_id, idem, token)
            assert answer.status_code in (201, 202), answer.text
            assert answer.json()["id"] in {p["id"] for p in payments}


async def _authorizations_in_flight(
        processor: Processor, http: httpx.AsyncClient, merchant_id: int, *, already: int = 0,
) -> tuple[list[tuple[str, str]], list[asyncio.Task[httpx.Response]]]:
    """IN_FLIGHT authorizations sent through acme, each with its own key and card, once
    every one is in the payments actor (its payment stored, the provider call under way),
    however long the loaded machine takes to get them there: their (key, card) pairs and
    the requests' tasks. ``already``: the merchant's payments made before."""
    requests = [(key(), card_token()) for _ in range(IN_FLIGHT)]
    in_flight = [asyncio.create_task(authorize(http, merchant_id, provider="acme", idem=idem,
                                               token=token))
                 for idem, token in requests]
    deadline = time.monotonic() + 30
    while len(await _payments_of(processor, merchant_id)) < IN_FLIGHT + already:
        assert time.monotonic() < deadline, "the payments never reached the payments actor"
        await asyncio.sleep(0.05)
    return requests, in_flight


async def _wait_ready(processor: Processor, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}") as h:
        while time.monotonic() < deadline:
            try:
                if (await h.get("/readyz", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    raise AssertionError("the front never came back")


async def _until_not_in_use(http: httpx.AsyncClient, merchant_id: int, idem: str,
                            token: str, timeout_s: float = 90.0) -> httpx.Response:
    """Send the same request until its key is no longer held by the lost request (its claim
    lapses after the claim TTL)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await authorize(http, merchant_id, provider="acme", idem=idem, token=token)
        if answer.status_code not in (409, 503) or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.5)


async def test_a_payments_actor_killed_between_an_approval_and_its_save_loses_nothing(
        supervised: Processor, http: httpx.AsyncClient, client: Client, ids: IdSource,
        sims: Sims) -> None:
    """An authorization's hold is posted while its provider is asked, and the approval is
    stored only once the hold is applied: one save records both (docs/design.md §14). The
    payments actor is SIGKILLed in that window: every provider call answered, every hold
    sent but not applied (the shards are stopped, so the postings wait in the front),
    nothing stored beyond PROVIDER. Once it is back, each payment ends authorized, held in
    the ledger once and charged by the provider once."""
    processor = supervised
    merchant_id = await merchant(client, ids)
    # One authorization first, so that the merchant account is known to the engine: its
    # check would otherwise wait on the stopped shards too.
    first = await authorize(http, merchant_id, provider="acme")
    assert first.status_code == 201, first.text
    first_id = first.json()["id"]
    shard_pids = await asyncio.gather(*[s.pid.remote() for s in processor.shards])
    payments_pid = await processor.payments.pid.remote()
    await sims.faults("acme", latency={"median_ms": 400, "p99_ms": 500})
    for pid in shard_pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        _, in_flight = await _authorizations_in_flight(processor, http, merchant_id,
                                                       already=1)
        ids_now = [p["id"] for p in await _payments_of(processor, merchant_id)
                   if p["id"] != first_id]
        deadline = time.monotonic() + 20
        while sum([len([op for op in await sims.charges("acme", p)
                        if op["operation"] == "authorize"]) for p in ids_now]) < IN_FLIGHT:
            assert time.monotonic() < deadline, "the provider never answered them all"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the answers reach the engine, which waits on the holds
        assert set(await _phases(processor, ids_now)) == {"provider"}
        os.kill(payments_pid, signal.SIGKILL)
    finally:
        for pid in shard_pids:
            os.kill(pid, signal.SIGCONT)
    await sims.faults("acme")
    for answer in await asyncio.gather(*in_flight, return_exceptions=True):
        assert isinstance(answer, httpx.HTTPError) or answer.status_code in (201, 503), answer
    payments = await _all_final(processor, merchant_id)
    assert len(payments) == IN_FLIGHT + 1, payments
    async with Client("127.0.0.1", processor.rpc_port, token_for(processor)) as fresh:
        await _check_exact(fresh, sims, merchant_id, payments)
    assert all(p["status"] == "authorized" for p in payments), payments


async def _phases(processor: Processor, payment_ids: list[str]) -> list[str]:
    conn = await asyncpg.connect(processor.config.shard.database_url)
    try:
        rows = await conn.fetch("SELECT phase FROM payment_steps WHERE subject_id = ANY($1)",
                                payment_ids)
    finally:
        await conn.close()
    return [row["phase"] for row in rows]
