"""What the payments tests share: the simulated providers' admin API, merchants, tokens,
an HTTP client of the session's processor (fixtures ``sims`` and ``http``), and webhooks
signed as each provider signs them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.app.runtime import Processor
from processor.client import Client
from processor.codes import AccountResult
from processor.types import Account, AccountFlags, Transfer
from tests.running import IdSource, token_for

LIMITED = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
ALL_FAULTS_OFF: dict[str, Any] = {}


def _letters(count: int = 16) -> str:
    """A token's random part, as the providers mint it: letters only, so it never holds a
    digit run the card-number scan would refuse."""
    return "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(count))


def card_token(last4: str = "4242") -> str:
    """A payment-method token as the providers' hosted fields issue them."""
    return f"pm_{last4}_{_letters()}"


def bank_token() -> str:
    return f"ba_6789_{_letters()}"


def luhn_number(prefix: str, length: int = 16) -> str:
    """A Luhn-valid number made up at run time (no card number is written in the tests)."""
    body = prefix + "".join(str(secrets.randbelow(10)) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def key() -> str:
    return uuid.uuid4().hex


class Sims:
    """The processor's simulated providers, driven through their admin API."""

    def __init__(self, processor: Processor) -> None:
        self.urls = processor.provider_urls
        data = Path(processor.config.data_dir) / "providers"
        self.admin = {name: json.loads((data / f"{name}.json").read_text())["admin_token"]
                      for name in self.urls}

    async def faults(self, name: str, **faults: Any) -> None:
        async with httpx.AsyncClient() as http:
            r = await http.put(f"{self.urls[name]}/_sim/faults", json=faults,
                               headers={"authorization": f"Bearer {self.admin[name]}"})
            assert r.status_code == 200, r.text

    async def stats(self, name: str) -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{self.urls[name]}/_sim/stats",
                               headers={"authorization": f"Bearer {self.admin[name]}"})
            assert r.status_code == 200, r.text
            return dict(r.json())

    async def charges(self, name: str, reference: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{self.urls[name]}/_sim/charges",
                               headers={"authorization": f"Bearer {self.admin[name]}"})
            assert r.status_code == 200, r.text
            return [op for op in r.json()["operations"] if op["reference"] == reference]

    async def open_dispute(self, name: str, authorization_id: str, amount: int, *,
                           fee: int = 1500, reason: str = "fraudulent") -> dict[str, Any]:
        """Open a dispute on a charge, as the payer's bank would (the sim sends its webhook)."""
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{self.urls[name]}/_sim/disputes",
                                json={"authorization_id": authorization_id, "amount": amount,
                                      "fee": fee, "reason": reason},
                                headers={"authorization": f"Bearer {self.admin[name]}"})
            assert r.status_code == 201, r.text
            return dict(r.json())

    async def decide_dispute(self, name: str, dispute_id: str, outcome: str) -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{self.urls[name]}/_sim/disputes/{dispute_id}/decision",
                                json={"outcome": outcome},
                                headers={"authorization": f"Bearer {self.admin[name]}"})
            assert r.status_code == 200, r.text
            return dict(r.json())

    async def disputes(self, name: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{self.urls[name]}/_sim/disputes",
                               headers={"authorization": f"Bearer {self.admin[name]}"})
            assert r.status_code == 200, r.text
            return list(r.json()["disputes"])


@pytest.fixture
async def sims(processor: Processor) -> AsyncIterator[Sims]:
    s = Sims(processor)
    yield s
    for name in s.urls:
        await s.faults(name)


@pytest.fixture
async def http(processor: Processor) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {token_for(processor)}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 headers=headers, timeout=60) as c:
        yield c


async def merchant(client: Client, ids: IdSource, currency: str = "USD",
                   funded: int = 0) -> int:
    """A merchant account (it may not go below zero), optionally with posted funds."""
    account, bank = ids.take(2)
    assert await client.create_accounts([
        Account(id=account, currency=currency, flags=LIMITED),
        Account(id=bank, currency=currency)]) == [AccountResult.ok] * 2
    if funded:
        await client.create_transfers([Transfer(
            id=ids.one(), debit_account_id=bank, credit_account_id=account, amount=funded,
            currency=currency)])
    return account


async def balances(client: Client, account_id: int) -> tuple[int, int, int, int]:
    [a] = await client.lookup_accounts([account_id])
    assert a is not None
    return a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted


async def authorize(http: httpx.AsyncClient, account: int, *, amount: int = 1_000,
                    currency: str = "USD", token: str | None = None, capture: bool = False,
                    provider: str | None = None, idem: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {"amount": amount, "currency": currency,
                            "payment_method": token or card_token(),
                            "merchant_account_id": account, "capture": capture}
    if provider:
        body["provider"] = provider
    return await http.post("/v1/payments", json=body, headers={"idempotency-key": idem or key()})


async def settled(http: httpx.AsyncClient, processor: Processor, path: str,
                  *, timeout_s: float = 30.0) -> dict[str, Any]:
    """GET ``path`` until neither it nor any of its operations is ``processing`` (the
    recovery worker or a webhook finishes them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = (await http.get(path)).json()
        busy = body["status"] == "processing" or any(
            op["status"] == "processing" for op in body.get("operations", ()))
        if not busy or time.monotonic() > deadline:
            return body
        await processor.payments.recover_once.remote()
        await asyncio.sleep(0.2)


def webhook_secret(processor: Processor, provider: str) -> bytes:
    path = Path(processor.config.data_dir) / "providers" / f"{provider}.json"
    return str(json.loads(path.read_text())["webhook_secret"]).encode()


def signed(provider: str, secret: bytes, body: bytes, at_s: float) -> dict[str, str]:
    """The headers ``provider`` signs a webhook with, as it documents them: acme
    ``Acme-Signature: t=<s>,v1=<hex HMAC-SHA256 of "<t>." + body>``, globex a timestamp in
    ms and ``hmac-sha256=<base64 HMAC-SHA256 of "<ms>\\n" + body>``."""
    if provider == "acme":
        stamp = int(at_s)
        mac = hmac.new(secret, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
        return {"acme-signature": f"t={stamp},v1={mac}", "content-type": "application/json"}
    stamp_ms = str(int(at_s * 1000))
    digest = hmac.new(secret, f"{stamp_ms}\n".encode() + body, hashlib.sha256).digest()
    return {"x-globex-webhook-timestamp": stamp_ms,
            "x-globex-webhook-signature": f"hmac-sha256={base64.b64encode(digest).decode()}",
            "content-type": "application/json"}
