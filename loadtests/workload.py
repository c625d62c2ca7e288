"""What the load-test users send, without Locust: settings, account setup and request flows.

Pure (a seeded ``random.Random`` and id sources are passed in), so the runner and the tests
use it without importing Locust, which monkey-patches the standard library with gevent.
``loadtests/locustfile.py`` wires these flows to Locust users; see loadtests/README.md.

Scenarios and the flows behind them:

=============  ====================  ===========================================================
scenario       Locust user class     requests
=============  ====================  ===========================================================
holds          AuthorizingClient     HTTP ledger holds, then their capture or void
                                     (``AuthorizationFlow``)
partners       PartnerUser           HTTP: plain transfers, payment authorizations, captures and
                                     refunds, weighted (``PartnerFlow``)
gateways       GatewayUser           batched ``create_transfers`` over the binary RPC
                                     (``gateway_batch``)
hot-account    HotAccountUser        HTTP transfers, half of them to or from one hot account
                                     (``HotAccountFlow``)
=============  ====================  ===========================================================
"""

from __future__ import annotations

import collections
import itertools
import json
import random
import re
import secrets
import string
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PARTNER_MIX_DEFAULT",
    "SCENARIOS",
    "AuthorizationFlow",
    "Budget",
    "HotAccountFlow",
    "HttpCall",
    "KeySource",
    "PartnerFlow",
    "Request",
    "Settings",
    "card_token",
    "error_code",
    "funding_id",
    "gateway_batch",
    "load_ids",
    "parse_mix",
    "post_setup_batch",
    "scenario_setup_requests",
    "setup_requests",
]

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
# Payments: amounts stay below the risk check's fallback threshold (10,000 minor units in
# USD/EUR/GBP), so a slow risk actor does not turn into declines.
PAYMENT_AMOUNT_MIN = 100
PAYMENT_AMOUNT_MAX = 9_999
TRANSFER_AMOUNT_MAX = 1_000
# Payments a partner keeps to capture or refund later; older ones are forgotten.
OPEN_PAYMENTS_MAX = 64

# scenario -> Locust user class (locustfile.py)
SCENARIOS: dict[str, str] = {
    "partners": "PartnerUser",
    "gateways": "GatewayUser",
    "hot-account": "HotAccountUser",
    "holds": "AuthorizingClient",
}
PARTNER_MIX_DEFAULT: dict[str, float] = {"transfer": 3, "authorize": 3, "capture": 2,
                                         "refund": 1}
_DIGIT_RUN = re.compile(r"\d{13,}")

# A token's random part is letters, as the providers mint it: no digit run in it can
# look like a card number to the API's card-data scan.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Settings:
    """What the harness is told by the environment; see loadtests/README.md."""

    token: str
    account_first: int
    accounts: int
    capture_share: float = 0.8
    holds_open_max: int = 4
    hold_timeout_s: int = 300
    user_rps: float = 0.0
    currency: str = "EUR"
    merchants: int = 10
    hot_share: float = 0.5
    batch_size: int = 50
    rpc_address: str = ""
    max_requests: int = 0
    partner_mix: Mapping[str, float] = field(
        default_factory=lambda: dict(PARTNER_MIX_DEFAULT))

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
            merchants=int(env.get("TXPROC_MERCHANTS", "10")),
            hot_share=float(env.get("TXPROC_HOT_SHARE", "0.5")),
            batch_size=int(env.get("TXPROC_BATCH_SIZE", "50")),
            rpc_address=env.get("TXPROC_RPC_ADDRESS", ""),
            max_requests=int(env.get("TXPROC_MAX_REQUESTS", "0")),
            partner_mix=parse_mix(env.get("TXPROC_PARTNER_MIX", "")),
        )
        settings.check()
        return settings

    def check(self) -> None:
        checks = [
            (self.account_first >= 1, "TXPROC_ACCOUNT_FIRST >= 1"),
            (self.accounts >= 2, "TXPROC_ACCOUNTS >= 2"),
            (self.merchants >= 1, "TXPROC_MERCHANTS >= 1"),
            (self.account_first + self.accounts + 2 + self.merchants < ACCOUNT_ID_MAX,
             "TXPROC_ACCOUNT_FIRST + TXPROC_ACCOUNTS + TXPROC_MERCHANTS < 2**61"),
            (0.0 <= self.capture_share <= 1.0, "0 <= TXPROC_CAPTURE_SHARE <= 1"),
            (self.holds_open_max >= 0, "TXPROC_HOLDS_OPEN_MAX >= 0"),
            (self.hold_timeout_s >= 1, "TXPROC_HOLD_TIMEOUT_S >= 1"),
            (self.user_rps >= 0, "TXPROC_USER_RPS >= 0"),
            (0.0 <= self.hot_share <= 1.0, "0 <= TXPROC_HOT_SHARE <= 1"),
            (1 <= self.batch_size <= BATCH_ITEMS_MAX, "1 <= TXPROC_BATCH_SIZE <= 8189"),
            (self.max_requests >= 0, "TXPROC_MAX_REQUESTS >= 0"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"locustfile settings: {what}")

    @property
    def operator_id(self) -> int:
        return self.account_first + self.accounts

    @property
    def hot_account_id(self) -> int:
        return self.operator_id + 1

    @property
    def customer_ids(self) -> range:
        return range(self.account_first, self.account_first + self.accounts)

    @property
    def merchant_ids(self) -> range:
        return range(self.operator_id + 2, self.operator_id + 2 + self.merchants)


def parse_mix(text: str) -> dict[str, float]:
    """``"transfer=3,authorize=3,capture=2,refund=1"`` as weights; empty text: the default.

    Raises ValueError for an unknown operation, a negative weight or all weights zero.
    """
    if not text.strip():
        return dict(PARTNER_MIX_DEFAULT)
    mix = dict.fromkeys(PARTNER_MIX_DEFAULT, 0.0)
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in mix:
            raise ValueError(f"TXPROC_PARTNER_MIX: unknown operation {name!r}; "
                             f"expected some of {sorted(mix)}")
        mix[name] = float(weight)
        if mix[name] < 0:
            raise ValueError(f"TXPROC_PARTNER_MIX: negative weight for {name}")
    if not any(mix.values()):
        raise ValueError("TXPROC_PARTNER_MIX: every weight is zero")
    return mix


def funding_id(account_id: int) -> int:
    """The id of the transfer that funds ``account_id``: the same on every run."""
    return FUNDING_ID_BASE + account_id


def setup_requests(settings: Settings) -> Iterator[tuple[str, dict[str, object]]]:
    """(path, JSON body) of the batches that create and fund the customer accounts."""
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


def scenario_setup_requests(settings: Settings) -> Iterator[tuple[str, dict[str, object]]]:
    """``setup_requests`` and then the hot account (no balance limit, so it may go below
    zero) and the merchant accounts of the payments (which may not)."""
    yield from setup_requests(settings)
    extra: list[dict[str, object]] = [{"id": settings.hot_account_id,
                                       "currency": settings.currency}]
    extra += [{"id": i, "currency": settings.currency,
               "flags": ["debits_must_not_exceed_credits"]} for i in settings.merchant_ids]
    for start in range(0, len(extra), BATCH_ITEMS_MAX):
        yield "/v1/accounts/batch", {"accounts": extra[start:start + BATCH_ITEMS_MAX]}


def post_setup_batch(url: str, token: str, body: dict[str, object]) -> None:
    """POST one setup batch; raises RuntimeError unless every item is created or exists."""
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


# -- identifiers ------------------------------------------------------------------------------


def load_ids() -> Iterator[int]:
    """Transfer ids for this process: a random start, so Locust processes and runs sharing
    a ledger do not collide (ranges of 2**61 / millions of ids rarely overlap)."""
    return itertools.count(secrets.randbelow(LOAD_ID_MAX - 2**40) + 1)


def card_token(rng: random.Random) -> str:
    """A fresh approving test-card token, ``pm_4242_<16 letters>``, as the providers' hosted
    fields issue them. A fresh token per payment keeps the risk check's per-token velocity
    limit out of the way; a draw holding 13 or more digits in a row is skipped, because the
    API refuses anything that could be a card number (``card_data_not_allowed``)."""
    while True:
        token = "pm_4242_" + "".join(rng.choice(_LETTERS) for _ in range(16))
        if not _DIGIT_RUN.search(token):
            return token


class KeySource:
    """Idempotency-Keys unique to this process: ``lt_<12 letters>_<counter>``. Letters and
    underscores only around the counter, so no key reads as a card number."""

    def __init__(self, rng: random.Random | None = None) -> None:
        letters = string.ascii_lowercase
        pick = rng.choice if rng is not None else secrets.choice
        self._prefix = "lt_" + "".join(pick(letters) for _ in range(12))
        self._counter = itertools.count(1)

    def __next__(self) -> str:
        return f"{self._prefix}_{next(self._counter)}"

    def __iter__(self) -> KeySource:
        return self


# -- holds: the original HTTP scenario --------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One POST /v1/transfers: its Locust name, its body, and the hold it places or settles."""

    name: str
    body: bytes
    hold: dict[str, int] | None = None


class AuthorizationFlow:
    """The requests of one simulated client: holds, then their capture or void.

    Call ``next_request`` for what to send and ``answered`` with its outcome: a hold is only
    settled once its creation was acknowledged.
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


# -- partners: transfers and payments over HTTP -----------------------------------------------


@dataclass(frozen=True)
class HttpCall:
    """One POST: its Locust name (the operation), path, body, Idempotency-Key (payments
    only) and, for captures and refunds, the payment it acts on and the amount asked."""

    name: str
    path: str
    body: bytes
    idempotency_key: str | None = None
    payment_id: str = ""
    amount: int = 0


class PartnerFlow:
    """A partner's mix of ``transfer`` (POST /v1/transfers between two customers),
    ``authorize`` (POST /v1/payments), ``capture`` and ``refund`` (of its own earlier
    payments), drawn by the weights of ``settings.partner_mix``.

    A capture needs an authorized payment and a refund a captured one; when there is none
    yet, the flow authorizes (or captures) instead, so the asked mix holds at steady state
    as long as authorizations outweigh captures and captures outweigh refunds. Every
    payments POST carries a fresh Idempotency-Key.
    """

    def __init__(self, settings: Settings, rng: random.Random, ids: Iterator[int],
                 keys: Iterator[str]) -> None:
        self._settings = settings
        self._rng = rng
        self._ids = ids
        self._keys = keys
        names = [n for n, w in settings.partner_mix.items() if w > 0]
        self._names = names
        self._weights = [settings.partner_mix[n] for n in names]
        self.authorized: collections.deque[tuple[str, int]] = collections.deque(
            maxlen=OPEN_PAYMENTS_MAX)
        self.captured: collections.deque[tuple[str, int]] = collections.deque(
            maxlen=OPEN_PAYMENTS_MAX)

    def next_call(self) -> HttpCall:
        name = self._rng.choices(self._names, self._weights)[0]
        if name == "refund" and not self.captured:
            name = "capture"
        if name == "capture" and not self.authorized:
            name = "authorize"
        if name == "transfer":
            return self._transfer()
        if name == "authorize":
            return self._authorize()
        if name == "capture":
            return self._capture()
        return self._refund()

    def answered(self, call: HttpCall, status: int, body: Any) -> None:
        """Remember an authorized payment (to capture) or a captured one (to refund)."""
        view = body.get("payment", body) if isinstance(body, dict) else None
        if not isinstance(view, dict):
            return
        if call.name == "authorize" and status == 201 and view.get("status") == "authorized":
            self.authorized.append((str(view["id"]), int(view.get("amount", 0))))
        elif call.name == "capture" and status == 200 and view.get("status") == "captured":
            captured = int(view.get("captured_amount", call.amount) or 0)
            if captured > 0:
                self.captured.append((call.payment_id, captured))

    def _transfer(self) -> HttpCall:
        s = self._settings
        debit, credit = self._rng.sample(s.customer_ids, 2)
        body = {"id": next(self._ids), "debit_account_id": debit, "credit_account_id": credit,
                "amount": self._rng.randint(1, TRANSFER_AMOUNT_MAX), "currency": s.currency}
        return HttpCall("transfer", "/v1/transfers", _encode(body))

    def _authorize(self) -> HttpCall:
        s = self._settings
        amount = self._rng.randint(PAYMENT_AMOUNT_MIN, PAYMENT_AMOUNT_MAX)
        body = {"amount": amount, "currency": s.currency,
                "payment_method": card_token(self._rng),
                "merchant_account_id": self._rng.choice(s.merchant_ids), "capture": False}
        return HttpCall("authorize", "/v1/payments", _encode(body), next(self._keys),
                        amount=amount)

    def _capture(self) -> HttpCall:
        payment_id, authorized = self.authorized.popleft()
        amount = authorized
        if self._rng.random() < PARTIAL_CAPTURE_SHARE:
            amount = self._rng.randint(1, authorized)
        return HttpCall("capture", f"/v1/payments/{payment_id}/capture",
                        _encode({"amount": amount}), next(self._keys), payment_id, amount)

    def _refund(self) -> HttpCall:
        payment_id, captured = self.captured.popleft()
        amount = captured if self._rng.random() < 0.5 else self._rng.randint(1, captured)
        return HttpCall("refund", f"/v1/payments/{payment_id}/refunds",
                        _encode({"amount": amount}), next(self._keys), payment_id, amount)


# -- hot account and gateways -----------------------------------------------------------------


class HotAccountFlow:
    """Plain transfers between customers, of which ``settings.hot_share`` (half by default)
    move money to or from the one hot account (each direction equally often): the
    contention of a merchant's settlement account or a fee account. Names: ``transfer hot``
    and ``transfer``."""

    def __init__(self, settings: Settings, rng: random.Random, ids: Iterator[int]) -> None:
        self._settings = settings
        self._rng = rng
        self._ids = ids

    def next_call(self) -> HttpCall:
        s = self._settings
        if self._rng.random() < s.hot_share:
            customer = self._rng.choice(s.customer_ids)
            debit, credit = ((customer, s.hot_account_id) if self._rng.random() < 0.5
                             else (s.hot_account_id, customer))
            name = "transfer hot"
        else:
            debit, credit = self._rng.sample(s.customer_ids, 2)
            name = "transfer"
        body = {"id": next(self._ids), "debit_account_id": debit, "credit_account_id": credit,
                "amount": self._rng.randint(1, TRANSFER_AMOUNT_MAX), "currency": s.currency}
        return HttpCall(name, "/v1/transfers", _encode(body))


def gateway_batch(settings: Settings, rng: random.Random,
                  ids: Iterator[int]) -> list[dict[str, Any]]:
    """``settings.batch_size`` plain transfers between random customers, as the keyword
    arguments of ``processor.types.Transfer``."""
    out = []
    for _ in range(settings.batch_size):
        debit, credit = rng.sample(settings.customer_ids, 2)
        out.append({"id": next(ids), "debit_account_id": debit, "credit_account_id": credit,
                    "amount": rng.randint(1, TRANSFER_AMOUNT_MAX),
                    "currency": settings.currency})
    return out


# -- answers and bounds -----------------------------------------------------------------------


def error_code(status: int, text: str | bytes | None) -> str:
    """The JSON ``error.code`` of an HTTP answer, else ``http_<status>`` (``no_answer`` for
    status 0, a request that got no answer)."""
    try:
        code = json.loads(text or "")["error"]["code"]
        if isinstance(code, str) and code:
            return code
    except (ValueError, KeyError, TypeError):
        pass
    return "no_answer" if status == 0 else f"http_{status}"


class Budget:
    """At most ``limit`` requests (0: no limit); ``take`` says whether one more may go."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must not be negative")
        self.limit = limit
        self.taken = 0

    def take(self) -> bool:
        if self.limit and self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    @property
    def exhausted(self) -> bool:
        return bool(self.limit) and self.taken >= self.limit


def _encode(body: Mapping[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
