"""Fixtures for the simulated providers: the two sims as real processes, a webhook receiver,
and a driver that speaks to a sim through its adapter over real HTTP.

The sims are started once per session (a process start costs ~0.7 s) and reset before each
test that uses them, so every test starts from an empty ledger and no faults.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import uvicorn
import yarl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.acme import AcmeAdapter
from adapters.base import (
    HttpCall,
    Operation,
    ProviderReply,
    ProviderRequest,
    error_from_transport,
)
from adapters.globex import GlobexAdapter
from adapters.sim.launch import SimProcess, start_sim

APPROVED_CARD = "4242424242424242"
SETTLE_DELAY_MS = 100
WEBHOOK_BACKOFF_MS = 100


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    received_at_s: float


@dataclass
class WebhookReceiver:
    """A real HTTP endpoint (Starlette on uvicorn, in its own thread and loop) that records
    what the sims deliver; ``fail_next[path]`` answers 500 to that many deliveries first."""

    url: str = ""
    deliveries: list[Delivery] = field(default_factory=list)
    failed: list[Delivery] = field(default_factory=list)
    fail_next: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def endpoint(self, request: Request) -> Response:
        delivery = Delivery(request.url.path, dict(request.headers), await request.body(),
                            time.time())
        with self._lock:
            if self.fail_next.get(delivery.path, 0) > 0:
                self.fail_next[delivery.path] -= 1
                self.failed.append(delivery)
                return Response(status_code=500)
            self.deliveries.append(delivery)
        return Response(status_code=204)

    def clear(self, path: str) -> None:
        with self._lock:
            self.deliveries = [d for d in self.deliveries if d.path != path]
            self.failed = [d for d in self.failed if d.path != path]
            self.fail_next.pop(path, None)

    def received(self, path: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.path == path]

    async def wait_for(self, path: str, count: int, timeout_s: float = 5.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.received(path)
            if len(got) >= count or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    app = Starlette(routes=[Route("/{provider}", receiver.endpoint, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off",
                                           log_level="warning", access_log=False))
    # In a thread of its own: uvicorn leaves the process's signal handlers alone there, and
    # it keeps answering while a test blocks its own loop.
    thread = threading.Thread(target=server.run, name="webhook-receiver", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "webhook receiver did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    receiver.url = f"http://127.0.0.1:{port}"
    yield receiver
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sims")


async def _start(name: str, sim_dir: Path, receiver: WebhookReceiver) -> SimProcess:
    return await asyncio.to_thread(
        start_sim, name, secrets_file=sim_dir / f"{name}.secrets.json",
        webhook_url=f"{receiver.url}/{name}", report_dir=sim_dir / f"{name}-reports",
        seed=7, settle_delay_ms=SETTLE_DELAY_MS, webhook_backoff_ms=WEBHOOK_BACKOFF_MS)


@pytest.fixture(scope="session")
async def acme_sim(sim_dir: Path, webhook_receiver: WebhookReceiver
                   ) -> AsyncIterator[SimProcess]:
    sim = await _start("acme", sim_dir, webhook_receiver)
    yield sim
    assert sim.stop() == 0


@pytest.fixture(scope="session")
async def globex_sim(sim_dir: Path, webhook_receiver: WebhookReceiver
                     ) -> AsyncIterator[SimProcess]:
    sim = await _start("globex", sim_dir, webhook_receiver)
    yield sim
    assert sim.stop() == 0


class Driver:
    """Sends requests to one sim the way the processor will: adapter.build -> HTTP ->
    adapter.parse, with the transport's exceptions translated by ``error_from_transport``."""

    def __init__(self, name: str, sim: SimProcess, adapter: AcmeAdapter | GlobexAdapter,
                 receiver: WebhookReceiver, client: httpx.AsyncClient) -> None:
        self.name = name
        self.sim = sim
        self.adapter = adapter
        self.receiver = receiver
        self.client = client
        self.hook_path = f"/{name}"
        self.session: aiohttp.ClientSession | None = None

    async def send(self, request: ProviderRequest, *, timeout_s: float | None = None,
                   now_s: float | None = None) -> ProviderReply:
        call = self.adapter.build(request, time.time() if now_s is None else now_s)
        return await self._exchange(call, timeout_s, lambda status, headers, body:
                                    self.adapter.parse(request, status, headers, body))

    async def status(self, request: ProviderRequest) -> ProviderReply:
        call = self.adapter.build_status(request, time.time())
        return await self._exchange(call, None, lambda status, headers, body:
                                    self.adapter.parse_status(request, status, headers, body))

    async def _exchange(self, call: HttpCall, timeout_s: float | None,
                        parse: Callable[[int, dict[str, str], bytes], ProviderReply],
                        fresh: bool = False) -> ProviderReply:
        """One exchange through aiohttp, the payments actor's client, so the transport's
        exceptions are the ones ``error_from_transport`` translates in production."""
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.adapter.timeout_s)
        try:
            if fresh:
                async with aiohttp.ClientSession() as session:
                    return await self._over(session, call, timeout, parse)
            return await self._over(self.session, call, timeout, parse)
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = error_from_transport(exc)
            return ProviderReply(outcome=error.outcome, retry_after_s=error.retry_after_s,
                                 message=str(error))

    async def _over(self, session: aiohttp.ClientSession, call: HttpCall,
                    limit: aiohttp.ClientTimeout,
                    parse: Callable[[int, dict[str, str], bytes], ProviderReply]
                    ) -> ProviderReply:
        async with session.request(call.method, yarl.URL(self.sim.url + call.path, encoded=True),
                                   headers=call.headers, data=call.body or None,
                                   timeout=limit) as answer:
            body = await answer.read()
            return parse(answer.status, dict(answer.headers), body)

    async def send_fresh(self, request: ProviderRequest) -> ProviderReply:
        """``send`` on a new connection (no pooled keep-alive connection is reused)."""
        call = self.adapter.build(request, time.time())
        return await self._exchange(call, None, lambda status, headers, body:
                                    self.adapter.parse(request, status, headers, body),
                                    fresh=True)

    async def tokenize(self, number: str = APPROVED_CARD) -> str:
        """A payment-method token from this sim's hosted-fields endpoint."""
        if self.name == "acme":
            answer = await self.client.post(f"{self.sim.url}/v1/tokens", json={"card": {
                "number": number, "exp_month": 12, "exp_year": 2031, "cvc": "123"}})
            answer.raise_for_status()
            token: str = answer.json()["id"]
        else:
            answer = await self.client.post(f"{self.sim.url}/api/v2/tokens", json={"card": {
                "pan": number, "expiryMonth": 12, "expiryYear": 2031, "cvv": "123"}})
            answer.raise_for_status()
            token = answer.json()["token"]["id"]
        return token

    async def bank_token(self, account_number: str) -> str:
        if self.name == "acme":
            answer = await self.client.post(f"{self.sim.url}/v1/tokens", json={"bank_account": {
                "account_number": account_number, "routing_number": "110000000"}})
            answer.raise_for_status()
            token: str = answer.json()["id"]
        else:
            answer = await self.client.post(f"{self.sim.url}/api/v2/tokens", json={
                "bankAccount": {"accountNumber": account_number, "sortCode": "400000"}})
            answer.raise_for_status()
            token = answer.json()["token"]["id"]
        return token

    async def settlement_report(self, date: str) -> bytes:
        call = self.adapter.build_settlement(date, time.time())
        answer = await self.client.request(call.method, self.sim.url + call.path,
                                           headers=call.headers)
        answer.raise_for_status()
        return answer.content

    async def charges(self) -> list[dict[str, Any]]:
        return await self.sim.charges()

    async def set_faults(self, **faults: Any) -> None:
        await self.sim.set_faults(faults)

    def currency(self) -> str:
        return "EUR"  # served by both


def new_key(label: str = "k") -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def authorize(payment_method: str, amount: int = 1_000, currency: str = "EUR",
              key: str | None = None) -> ProviderRequest:
    return ProviderRequest(operation=Operation.AUTHORIZE, idempotency_key=key or new_key("auth"),
                           amount=amount, currency=currency, reference=new_key("pay"),
                           payment_method=payment_method)


def follow_up(operation: Operation, provider_ref: str, amount: int, currency: str = "EUR",
              key: str | None = None) -> ProviderRequest:
    return ProviderRequest(operation=operation, idempotency_key=key or new_key(operation.value),
                           amount=amount, currency=currency, reference=new_key("pay"),
                           provider_ref=provider_ref)


def payout(destination: str, amount: int = 2_500, currency: str = "EUR") -> ProviderRequest:
    return ProviderRequest(operation=Operation.PAYOUT, idempotency_key=new_key("payout"),
                           amount=amount, currency=currency, reference=new_key("po"),
                           destination=destination)


@pytest.fixture(params=["acme", "globex"])
async def driver(request: pytest.FixtureRequest, acme_sim: SimProcess, globex_sim: SimProcess,
                 webhook_receiver: WebhookReceiver) -> AsyncIterator[Driver]:
    """A reset sim of each provider, with its adapter and an HTTP client."""
    name: str = request.param
    sim = acme_sim if name == "acme" else globex_sim
    adapter: AcmeAdapter | GlobexAdapter = (
        AcmeAdapter.from_secrets_file(sim.secrets_file) if name == "acme"
        else GlobexAdapter.from_secrets_file(sim.secrets_file))
    await sim.reset()
    webhook_receiver.clear(f"/{name}")
    async with httpx.AsyncClient(verify=False) as client:  # plain HTTP; no TLS context
        driver = Driver(name, sim, adapter, webhook_receiver, client)
        try:
            yield driver
        finally:
            if driver.session is not None:
                await driver.session.close()
    await sim.reset()
