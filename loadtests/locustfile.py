"""Locust harness: card-authorization-like traffic against the HTTP API (POST /v1/transfers).

Each simulated client places holds (``pending`` transfers) from a customer account to a
merchant account and resolves them: most are captured (``post_pending``, sometimes for less
than the hold), the rest released (``void_pending``). A client keeps a few holds open and
settles the oldest before placing another, so at steady state it sends one settlement per
authorization. Locust's statistics are kept per request name (``authorize``, ``capture``,
``void``); read p95/p99 from its console summary, web UI or ``--csv`` files.

Before the load starts (Locust's ``test_start`` event) the accounts are created through
``POST /v1/accounts/batch`` and funded from an operator account; both are idempotent, so a
second run over the same ledger reuses them ("exists").

Environment (read by this file only; see loadtests/README.md):

========================  ===================================================================
TXPROC_TOKEN              bearer token with transfers:write and accounts:write (required)
TXPROC_ACCOUNT_FIRST      first customer account id (default 1000000)
TXPROC_ACCOUNTS           number of customer accounts (default 1000); the operator account
                          that funds them is TXPROC_ACCOUNT_FIRST + TXPROC_ACCOUNTS
TXPROC_CAPTURE_SHARE      share of holds captured rather than voided (default 0.8)
TXPROC_HOLDS_OPEN_MAX     holds one client keeps open before settling the oldest (default 4)
TXPROC_HOLD_TIMEOUT_S     seconds until an unsettled hold expires (default 300)
TXPROC_USER_RPS           requests per second per client, 0 for as fast as answered (default 0)
TXPROC_CURRENCY           ISO 4217 code of every account (default EUR)
========================  ===================================================================

Run headless so it stops by itself::

    TXPROC_TOKEN=... locust -f loadtests/locustfile.py --headless -u 50 -r 50 \\
        --run-time 20s --host http://127.0.0.1:8080 --csv /tmp/txproc
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import random
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from locust import FastHttpUser, constant, constant_throughput, events, task
from locust.runners import WorkerRunner

__all__ = [
    "AuthorizationFlow",
    "AuthorizingClient",
    "Request",
    "Settings",
    "funding_id",
    "setup_requests",
]

log = logging.getLogger("txproc.locust")

BATCH_ITEMS_MAX = 8189  # processor.service.BATCH_ITEMS_MAX, kept here so Locust needs no txproc
# Funding transfers have ids 2**62 + account id, so they are the same on every run and every
# Locust process (creating them twice answers "exists"); load ids stay below 2**61.
FUNDING_ID_BASE = 2**62
LOAD_ID_MAX = 2**61
ACCOUNT_ID_MAX = 2**61
FUNDING_AMOUNT = 10**15  # minor units per customer: far more than any run can spend
HOLD_AMOUNT_MIN = 100
HOLD_AMOUNT_MAX = 50_000
PARTIAL_CAPTURE_SHARE = 0.2
SETUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Settings:
    """What the harness is told by the environment; see the module docstring."""

    token: str
    account_first: int
    accounts: int
    capture_share: float = 0.8
    holds_open_max: int = 4
    hold_timeout_s: int = 300
    user_rps: float = 0.0
    currency: str = "EUR"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Settings from ``env``; raises ValueError naming a missing or invalid variable."""
        token = env.get("TXPROC_TOKEN", "")
        if not token:
            raise ValueError("TXPROC_TOKEN must hold a bearer token (txproc token issue ...)")
        settings = cls(
            token=token,
            account_first=int(env.get("TXPROC_ACCOUNT_FIRST", "1000000")),
            accounts=int(env.get("TXPROC_ACCOUNTS", "1000")),
            capture_share=float(env.get("TXPROC_CAPTURE_SHARE", "0.8")),
            holds_open_max=int(env.get("TXPROC_HOLDS_OPEN_MAX", "4")),
            hold_timeout_s=int(env.get("TXPROC_HOLD_TIMEOUT_S", "300")),
            user_rps=float(env.get("TXPROC_USER_RPS", "0")),
            currency=env.get("TXPROC_CURRENCY", "EUR"),
        )
        settings.check()
        return settings

    def check(self) -> None:
        checks = [
            (self.account_first >= 1, "TXPROC_ACCOUNT_FIRST >= 1"),
            (self.accounts >= 2, "TXPROC_ACCOUNTS >= 2"),
            (self.account_first + self.accounts < ACCOUNT_ID_MAX,
             "TXPROC_ACCOUNT_FIRST + TXPROC_ACCOUNTS < 2**61"),
            (0.0 <= self.capture_share <= 1.0, "0 <= TXPROC_CAPTURE_SHARE <= 1"),
            (self.holds_open_max >= 0, "TXPROC_HOLDS_OPEN_MAX >= 0"),
            (self.hold_timeout_s >= 1, "TXPROC_HOLD_TIMEOUT_S >= 1"),
            (self.user_rps >= 0, "TXPROC_USER_RPS >= 0"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"locustfile settings: {what}")

    @property
    def operator_id(self) -> int:
        return self.account_first + self.accounts

    @property
    def customer_ids(self) -> range:
        return range(self.account_first, self.account_first + self.accounts)


def funding_id(account_id: int) -> int:
    """The id of the transfer that funds ``account_id``: the same on every run."""
    return FUNDING_ID_BASE + account_id


def setup_requests(settings: Settings) -> Iterator[tuple[str, dict[str, object]]]:
    """(path, JSON body) of the batches that create and fund the accounts, in order."""
    accounts: list[dict[str, object]] = [
        {"id": i, "currency": settings.currency, "flags": ["debits_must_not_exceed_credits"]}
        for i in settings.customer_ids
    ]
    accounts.append({"id": settings.operator_id, "currency": settings.currency})
    for start in range(0, len(accounts), BATCH_ITEMS_MAX):
        yield "/v1/accounts/batch", {"accounts": accounts[start:start + BATCH_ITEMS_MAX]}
    funding = [
        {"id": funding_id(i), "debit_account_id": settings.operator_id, "credit_account_id": i,
         "amount": FUNDING_AMOUNT, "currency": settings.currency}
        for i in settings.customer_ids
    ]
    for start in range(0, len(funding), BATCH_ITEMS_MAX):
        yield "/v1/transfers/batch", {"transfers": funding[start:start + BATCH_ITEMS_MAX]}


@dataclass(frozen=True)
class Request:
    """One POST /v1/transfers: its Locust name, its body, and the hold it places or settles."""

    name: str
    body: bytes
    hold: dict[str, int] | None = None


class AuthorizationFlow:
    """The requests of one simulated client: holds, then their capture or void.

    Pure (a seeded ``rng`` and an id source passed in), so it is tested without Locust
    running. Call ``next_request`` for what to send and ``answered`` with its outcome: a hold
    is only settled once its creation was acknowledged.
    """

    def __init__(self, settings: Settings, rng: random.Random, ids: Iterator[int]) -> None:
        self._settings = settings
        self._rng = rng
        self._ids = ids
        self._open: collections.deque[dict[str, int]] = collections.deque()

    @property
    def holds_open(self) -> int:
        return len(self._open)

    def next_request(self) -> Request:
        s = self._settings
        if self._open and len(self._open) >= s.holds_open_max:
            return self._settle(self._open.popleft())
        customers = s.customer_ids
        debit, credit = self._rng.sample(customers, 2)
        hold = {"id": next(self._ids), "debit_account_id": debit, "credit_account_id": credit,
                "amount": self._rng.randint(HOLD_AMOUNT_MIN, HOLD_AMOUNT_MAX)}
        body = {**hold, "currency": s.currency, "flags": ["pending"],
                "timeout_s": s.hold_timeout_s}
        return Request("authorize", _encode(body), hold)

    def answered(self, request: Request, ok: bool) -> None:
        """Record the outcome of ``request``; an acknowledged hold joins the open ones."""
        if request.name == "authorize" and ok and request.hold is not None:
            self._open.append(request.hold)

    def _settle(self, hold: dict[str, int]) -> Request:
        s = self._settings
        capture = self._rng.random() < s.capture_share
        amount = hold["amount"]
        if capture and self._rng.random() < PARTIAL_CAPTURE_SHARE:
            amount = self._rng.randint(1, amount)
        body = {"id": next(self._ids), "debit_account_id": hold["debit_account_id"],
                "credit_account_id": hold["credit_account_id"], "amount": amount,
                "currency": s.currency, "flags": ["post_pending" if capture else "void_pending"],
                "pending_id": hold["id"]}
        return Request("capture" if capture else "void", _encode(body), hold)


def _encode(body: dict[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _load_ids() -> Iterator[int]:
    """Transfer ids for this process: a random start, so Locust processes and runs sharing
    a ledger do not collide (ranges of 2**61 / millions of ids rarely overlap)."""
    return itertools.count(secrets.randbelow(LOAD_ID_MAX - 2**40) + 1)


_IDS = _load_ids()


# -- Locust wiring ------------------------------------------------------------------------


def _wait_time() -> object:
    rps = float(os.environ.get("TXPROC_USER_RPS", "0") or 0)
    return constant_throughput(rps) if rps > 0 else constant(0)


class AuthorizingClient(FastHttpUser):
    """One payment gateway connection placing and settling holds."""

    wait_time = _wait_time()  # type: ignore[assignment]

    def on_start(self) -> None:
        self.settings = Settings.from_env(os.environ)
        self.flow = AuthorizationFlow(self.settings, random.Random(), _IDS)
        self.headers = {"Authorization": f"Bearer {self.settings.token}",
                        "Content-Type": "application/json"}

    @task
    def step(self) -> None:
        request = self.flow.next_request()
        with self.client.post("/v1/transfers", data=request.body, headers=self.headers,
                              name=request.name, catch_response=True) as response:
            ok = response.status_code in (200, 201)
            if ok:
                response.success()
            else:
                response.failure(f"{response.status_code} {_error_code(response.text)}")
        self.flow.answered(request, ok)


def _error_code(text: str | None) -> str:
    try:
        return str(json.loads(text or "")["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "no error code"


@events.test_start.add_listener
def _create_accounts(environment: object, **_kwargs: object) -> None:
    """Create and fund the accounts once, before any user starts (not on workers)."""
    runner = getattr(environment, "runner", None)
    if isinstance(runner, WorkerRunner):
        return
    host = getattr(environment, "host", None)
    try:
        if not host:
            raise ValueError("--host is required (the txproc HTTP address)")
        settings = Settings.from_env(os.environ)
        for path, body in setup_requests(settings):
            _post_batch(host.rstrip("/") + path, settings.token, body)
    except Exception as exc:
        log.error("txproc setup failed, stopping: %s", exc)
        if runner is not None:
            runner.environment.process_exit_code = 2
            runner.quit()
        raise
    log.info("txproc: %d accounts ready (operator %d)", settings.accounts, settings.operator_id)


def _post_batch(url: str, token: str, body: dict[str, object]) -> None:
    request = urllib.request.Request(
        url, data=_encode(body), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=SETUP_TIMEOUT_S) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: {exc.code} {exc.read()[:300]!r}") from exc
    refused = collections.Counter(r["status"] for r in answer["results"]
                                  if r["status"] not in ("created", "exists"))
    if refused:
        raise RuntimeError(f"{url}: items refused: {dict(refused)}")
