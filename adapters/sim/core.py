"""What every simulated provider shares: idempotency, the charge ledger, test cards, reports.

The simulated providers (``acme``, ``globex``) are real HTTP servers that behave like payment
providers, so the processor and its tests meet the failures real ones produce. This module
holds the parts that do not depend on a provider's wire format (with ``faults.py``, what
the admin API injects, and ``webhooks.py``, signed event delivery):

- ``IdempotencyStore``: the stored answer per idempotency key, replayed for a repeated key,
  refused for the same key with another payload or while the first request is in flight.
- ``Book``: the provider's own ledger of operations and their business rules (never capture
  above the authorized amount, never refund above the captured amount, ...), in neutral words;
  each provider renders it in its own vocabulary.
- ``ReportWriter``: the daily settlement reports kept up to date in a directory.
- Test cards and tokens: the behaviour of a payment method or bank destination is encoded in
  its token (``pm_<last4>_<random>``, ``ba_<4 digits>...``), so tokens are portable between the
  two providers like network tokens are; no card number is ever stored.

The simulators are deliberately written without importing the adapters' translation code
(only the processor's vocabulary), so a bug shared by an adapter and its simulator cannot
hide.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import os
import re
import secrets
import string
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from adapters.base import Operation
from adapters.decoding import decimal_to_minor, minor_to_decimal
from processor.currency import CURRENCY_EXPONENTS
from processor.types import AMOUNT_MAX

__all__ = [
    "BANK_BEHAVIOUR",
    "CARD_BEHAVIOUR",
    "DISPUTE_EVIDENCE_DAYS",
    "PROVIDER_SECRET_FIELDS",
    "Book",
    "Dispute",
    "FeeSchedule",
    "IdempotencyStore",
    "KeyState",
    "Op",
    "Refusal",
    "Refused",
    "ReportWriter",
    "SecretsError",
    "Stored",
    "card_brand",
    "fingerprint",
    "generate_secrets",
    "load_secrets",
    "luhn_valid",
    "minor_to_text",
    "mint_bank_token",
    "mint_card_token",
    "text_to_minor",
    "utc_date",
]

# --- secrets ----------------------------------------------------------------------------------

PROVIDER_SECRET_FIELDS: dict[str, tuple[str, ...]] = {
    "acme": ("api_key", "webhook_secret", "admin_token"),
    "globex": ("key_id", "signing_secret", "webhook_secret", "admin_token"),
}
SECRET_CHARS_MAX = 256


class SecretsError(ValueError):
    """A secrets file that is missing, unreadable or not for this provider (no value shown)."""


def generate_secrets(provider: str) -> dict[str, str]:
    """Fresh random secrets for ``provider``, in the secrets-file layout."""
    if provider not in PROVIDER_SECRET_FIELDS:
        raise SecretsError(f"unknown provider {provider!r}")
    values = {"provider": provider, "admin_token": secrets.token_urlsafe(32),
              "webhook_secret": f"whsec_{secrets.token_urlsafe(32)}"}
    if provider == "acme":
        values["api_key"] = f"acme_sk_{secrets.token_urlsafe(32)}"
    else:
        values["key_id"] = f"gxk_{secrets.token_hex(8)}"
        values["signing_secret"] = secrets.token_urlsafe(48)
    return values


def load_secrets(path: Path, provider: str) -> dict[str, str]:
    """The secrets of ``provider`` from its JSON file; raises ``SecretsError``."""
    try:
        raw = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise SecretsError(f"cannot read secrets file {path}: {type(exc).__name__}") from None
    if not isinstance(raw, dict) or raw.get("provider") != provider:
        raise SecretsError(f"secrets file {path} is not for provider {provider!r}")
    values: dict[str, str] = {}
    for name in PROVIDER_SECRET_FIELDS[provider]:
        value = raw.get(name)
        if not isinstance(value, str) or not 8 <= len(value) <= SECRET_CHARS_MAX:
            raise SecretsError(f"secrets file {path}: field {name!r} missing or malformed")
        values[name] = value
    return values


# --- money and time ---------------------------------------------------------------------------

def minor_to_text(amount: int, currency: str) -> str:
    """``amount`` minor units as the decimal text of major units (``1050, EUR -> "10.50"``)."""
    return minor_to_decimal(amount, CURRENCY_EXPONENTS[currency])


def text_to_minor(text: str, currency: str) -> int | None:
    """Decimal text of major units as minor units, or None when it is not exact or not sane."""
    exponent = CURRENCY_EXPONENTS.get(currency)
    if exponent is None:
        return None
    try:
        return decimal_to_minor(text, exponent)
    except ValueError:
        return None


def utc_date(at_s: float) -> str:
    """The ISO date (UTC) of a Unix time in seconds."""
    return datetime.fromtimestamp(at_s, UTC).date().isoformat()


# --- cards and bank destinations ---------------------------------------------------------------


class Refusal(enum.StrEnum):
    """Why the simulated provider refused an operation, before its wire format names it."""

    # Declines: the operation is recorded (declined) and its answer replayed.
    INSUFFICIENT_FUNDS = "insufficient_funds"
    CARD_EXPIRED = "card_expired"
    PROCESSING_ERROR = "processing_error"
    DO_NOT_HONOR = "do_not_honor"
    SUSPECTED_FRAUD = "suspected_fraud"
    ACCOUNT_CLOSED = "account_closed"  # payout destination refused at once
    PAYOUT_RETURNED = "payout_returned"  # payout destination refused after the fact
    # Rule refusals: nothing is recorded in the ledger.
    INVALID_PAYMENT_METHOD = "invalid_payment_method"
    INVALID_DESTINATION = "invalid_destination"
    CURRENCY_NOT_SUPPORTED = "currency_not_supported"
    CURRENCY_MISMATCH = "currency_mismatch"
    AMOUNT_EXCEEDS_AUTHORIZED = "amount_exceeds_authorized"
    AMOUNT_EXCEEDS_CAPTURED = "amount_exceeds_captured"
    ALREADY_VOIDED = "already_voided"
    ALREADY_CAPTURED = "already_captured"
    AUTHORIZATION_DECLINED = "authorization_declined"
    NOT_FOUND = "not_found"
    DISPUTE_NOT_OPEN = "dispute_not_open"  # evidence for a dispute under review or decided


class Refused(Exception):
    """A rule refusal: the operation did not take effect and is not recorded."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.value)
        self.refusal = refusal


# Like real sandboxes, the last four digits of the card decide what happens.
CARD_BEHAVIOUR: dict[str, Refusal] = {
    "0002": Refusal.INSUFFICIENT_FUNDS,
    "0069": Refusal.CARD_EXPIRED,
    "0119": Refusal.PROCESSING_ERROR,
    "0005": Refusal.DO_NOT_HONOR,
    "9979": Refusal.SUSPECTED_FRAUD,
}
# The first four characters after ``ba_`` decide what becomes of a payout.
BANK_BEHAVIOUR: dict[str, Refusal] = {
    "0002": Refusal.ACCOUNT_CLOSED,
    "0003": Refusal.PAYOUT_RETURNED,
}
CARD_TOKEN = re.compile(r"pm_(\d{4})_[A-Za-z0-9]{8,64}")
BANK_TOKEN = re.compile(r"ba_([A-Za-z0-9]{4})[A-Za-z0-9_]{0,60}")
CARD_NUMBER = re.compile(r"\d{12,19}")


def luhn_valid(number: str) -> bool:
    """True for a 12-19 digit number whose Luhn check digit holds."""
    if not CARD_NUMBER.fullmatch(number):
        return False
    total = 0
    for index, char in enumerate(reversed(number)):
        digit = int(char)
        if index % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def card_brand(number: str) -> str:
    if number.startswith("4"):
        return "visa"
    if number[:2] in {"34", "37"}:
        return "amex"
    if number[:2] in {"51", "52", "53", "54", "55"} or "2221" <= number[:4] <= "2720":
        return "mastercard"
    return "unknown"


def _random_letters(count: int) -> str:
    """Random lowercase letters: a token's random part never holds a run of digits that a
    card-number scan could mistake for a card."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(count))


def mint_card_token(number: str) -> str:
    """A payment-method token that carries the card's last four digits and nothing else."""
    return f"pm_{number[-4:]}_{_random_letters(16)}"


def mint_bank_token(account_number: str) -> str:
    return f"ba_{account_number[-4:]}_{_random_letters(16)}"


# --- idempotency ------------------------------------------------------------------------------


def fingerprint(method: str, path: str, body: bytes) -> str:
    """What must match for a repeated idempotency key to be a replay, not a misuse.

    JSON bodies are compared by meaning (key order and spacing do not matter).
    """
    try:
        canonical = json.dumps(json.loads(body or b"null"), sort_keys=True,
                               separators=(",", ":")).encode()
    except ValueError:
        canonical = body
    return f"{method} {path} {hashlib.sha256(canonical).hexdigest()}"


class KeyState(enum.Enum):
    NEW = "new"  # first sight: the caller must ``finish`` or ``abandon`` it
    REPLAY = "replay"  # answered before: replay the stored answer
    MISMATCH = "mismatch"  # the key was used with another payload
    IN_PROGRESS = "in_progress"  # the first request with this key has not answered yet
    FULL = "full"  # the store is at its limit: refuse, retryable


@dataclass(frozen=True, slots=True)
class Stored:
    """The answer given for an idempotency key; ``op_id`` names what it did, if anything."""

    fingerprint: str
    operation: Operation
    status: int
    body: bytes
    op_id: str = ""
    media_type: str = "application/json"


class IdempotencyStore:
    """Answers per idempotency key, kept for the life of the process (bounded by keys_max)."""

    def __init__(self, *, keys_max: int) -> None:
        if keys_max < 1:
            raise ValueError("keys_max must be positive")
        self._keys_max = keys_max
        self._done: dict[str, Stored] = {}
        self._in_flight: dict[str, str] = {}  # key -> fingerprint

    def __len__(self) -> int:
        return len(self._done) + len(self._in_flight)

    def begin(self, key: str, fp: str) -> tuple[KeyState, Stored | None]:
        stored = self._done.get(key)
        if stored is not None:
            return (KeyState.REPLAY if stored.fingerprint == fp else KeyState.MISMATCH), stored
        flying = self._in_flight.get(key)
        if flying is not None:
            return (KeyState.IN_PROGRESS if flying == fp else KeyState.MISMATCH), None
        if len(self) >= self._keys_max:
            return KeyState.FULL, None
        self._in_flight[key] = fp
        return KeyState.NEW, None

    def finish(self, key: str, stored: Stored) -> None:
        # The key is normally in flight; after an admin reset during a hang it is not, and
        # the answer of the operation that ran on the fresh book is still the key's answer.
        self._in_flight.pop(key, None)
        self._done[key] = stored

    def abandon(self, key: str) -> None:
        """Forget a key whose request did not take effect; the key may be used again."""
        self._in_flight.pop(key, None)

    def lookup(self, key: str) -> Stored | Literal["in_progress"] | None:
        if key in self._in_flight:
            return "in_progress"
        return self._done.get(key)

    def clear(self) -> None:
        self._done.clear()
        self._in_flight.clear()


# --- the ledger ---------------------------------------------------------------------------------

OpState = Literal["authorized", "pending", "settled", "voided", "declined", "failed"]


@dataclass(frozen=True, slots=True)
class FeeSchedule:
    """What a provider keeps, in minor units: basis points of a capture plus fixed parts."""

    capture_bps: int
    capture_fixed: int
    refund_fixed: int
    payout_fixed: int

    def fee(self, operation: Operation, amount: int) -> int:
        if operation in (Operation.CAPTURE, Operation.AUTHORIZE):
            return (amount * self.capture_bps + 5_000) // 10_000 + self.capture_fixed
        if operation is Operation.REFUND:
            return self.refund_fixed
        if operation is Operation.PAYOUT:
            return self.payout_fixed
        return 0


@dataclass(slots=True)
class Op:
    """One operation the provider recorded; authorizations also carry their running totals."""

    id: str
    operation: Operation
    idempotency_key: str
    reference: str
    amount: int
    currency: str
    state: OpState
    created_at_s: float
    authorization_id: str = ""  # the authorization a capture, void or refund belongs to
    card_last4: str = ""
    destination_last4: str = ""
    refusal: Refusal | None = None
    fee: int = 0
    settled_at_s: float | None = None
    fails_later: bool = False  # a payout that will be returned instead of paid
    # Running totals of an authorization:
    captured: int = 0
    refunded: int = 0
    voided: bool = False  # a void released what it held (after partial captures, the rest)
    captured_at_authorization: bool = False
    closed: bool = False  # a final capture took its last capture; the rest was released

    @property
    def capturable(self) -> int:
        """What an authorization still holds for captures."""
        if self.operation is not Operation.AUTHORIZE or self.voided or self.closed or (
                self.state == "declined"):
            return 0
        return self.amount - self.captured

    @property
    def settled_on(self) -> str:
        return "" if self.settled_at_s is None else utc_date(self.settled_at_s)

    def to_admin(self) -> dict[str, Any]:
        """The operation as ``GET /_sim/charges`` shows it (neutral words, no tokens)."""
        return {
            "id": self.id, "operation": self.operation.value,
            "idempotency_key": self.idempotency_key, "reference": self.reference,
            "amount": self.amount, "currency": self.currency, "state": self.state,
            "authorization_id": self.authorization_id,
            "decline_code": None if self.refusal is None else self.refusal.value,
            "fee": self.fee, "created_at_s": self.created_at_s,
            "settled_at_s": self.settled_at_s, "settled_on": self.settled_on or None,
            "captured": self.captured, "refunded": self.refunded, "voided": self.voided,
            "closed": self.closed, "capturable": self.capturable,
        }


DisputeState = Literal["needs_response", "under_review", "won", "lost"]
# How long a dispute takes evidence after it opened (card networks give a few weeks).
DISPUTE_EVIDENCE_DAYS = 21


@dataclass(slots=True)
class Dispute:
    """A chargeback the payer's bank raised against an authorization (opened and decided
    through the admin API, ``/_sim/disputes``: no real bank drives the simulator)."""

    id: str
    authorization_id: str
    amount: int
    fee: int
    currency: str
    reason: str
    state: DisputeState
    created_at_s: float
    evidence_due_by_s: float
    evidence_text: str = ""
    evidence_files: tuple[str, ...] = ()

    def to_admin(self) -> dict[str, Any]:
        return {"id": self.id, "authorization_id": self.authorization_id,
                "amount": self.amount, "fee": self.fee, "currency": self.currency,
                "reason": self.reason, "state": self.state,
                "created_at_s": self.created_at_s, "evidence_due_by_s": self.evidence_due_by_s,
                "evidence_text": self.evidence_text, "evidence_files": list(self.evidence_files)}


class Book:
    """The provider's ledger and its business rules, in neutral words.

    Every method that refuses by rule raises ``Refused`` and changes nothing. Declines (by
    test card or bank destination) are recorded as ``declined`` operations. ``settle_now``
    says whether money-moving operations settle at once or stay ``pending`` until ``settle``.
    """

    def __init__(self, *, currencies: frozenset[str], fees: FeeSchedule,
                 id_prefixes: Mapping[Operation, str], clock_s: Callable[[], float],
                 ops_max: int) -> None:
        if ops_max < 1:
            raise ValueError("ops_max must be positive")
        self.currencies = currencies
        self._fees = fees
        self._prefixes = dict(id_prefixes)
        self._clock_s = clock_s
        self._ops_max = ops_max
        self._ops: dict[str, Op] = {}
        self._disputes: dict[str, Dispute] = {}

    def __len__(self) -> int:
        return len(self._ops)

    @property
    def full(self) -> bool:
        return len(self._ops) >= self._ops_max

    def get(self, op_id: str) -> Op | None:
        return self._ops.get(op_id)

    def ops(self) -> list[Op]:
        return list(self._ops.values())

    def clear(self) -> None:
        self._ops.clear()
        self._disputes.clear()

    # -- disputes ----------------------------------------------------------------------------

    def dispute(self, dispute_id: str) -> Dispute | None:
        return self._disputes.get(dispute_id)

    def disputes(self) -> list[Dispute]:
        return list(self._disputes.values())

    def open_dispute(self, *, authorization_id: str, amount: int, fee: int, reason: str,
                     prefix: str) -> Dispute:
        """A dispute on an existing authorization. The admin API is fault injection: any
        amount in range is taken, even beyond what was captured or on an authorization
        never captured, so the processor's own rules can be tested."""
        auth = self._ops.get(authorization_id)
        if auth is None or auth.operation is not Operation.AUTHORIZE:
            raise Refused(Refusal.NOT_FOUND)
        _check_amount(amount)
        if not 0 <= fee <= AMOUNT_MAX:
            raise ValueError("fee out of range")
        if len(self._disputes) >= self._ops_max:
            raise RuntimeError("too many disputes")
        now_s = self._clock_s()
        dispute = Dispute(id=f"{prefix}{uuid.uuid4().hex[:20]}", authorization_id=auth.id,
                          amount=amount, fee=fee, currency=auth.currency, reason=reason,
                          state="needs_response", created_at_s=now_s,
                          evidence_due_by_s=now_s + DISPUTE_EVIDENCE_DAYS * 86_400)
        self._disputes[dispute.id] = dispute
        return dispute

    def submit_evidence(self, dispute_id: str, *, text: str,
                        files: tuple[str, ...]) -> Dispute:
        """Evidence moves a dispute that needs a response to review; once."""
        dispute = self._disputes.get(dispute_id)
        if dispute is None:
            raise Refused(Refusal.NOT_FOUND)
        if dispute.state != "needs_response":
            raise Refused(Refusal.DISPUTE_NOT_OPEN)
        dispute.state, dispute.evidence_text, dispute.evidence_files = (
            "under_review", text, files)
        return dispute

    def decide_dispute(self, dispute_id: str, *, won: bool) -> Dispute:
        """The bank's decision, with or without evidence; a decided dispute stays so."""
        dispute = self._disputes.get(dispute_id)
        if dispute is None:
            raise Refused(Refusal.NOT_FOUND)
        if dispute.state in ("won", "lost"):
            raise Refused(Refusal.DISPUTE_NOT_OPEN)
        dispute.state = "won" if won else "lost"
        return dispute

    def authorize(self, *, key: str, reference: str, amount: int, currency: str,
                  payment_method: str, capture: bool, settle_now: bool) -> Op:
        self._check_currency(currency)
        _check_amount(amount)
        token = CARD_TOKEN.fullmatch(payment_method)
        if token is None:
            raise Refused(Refusal.INVALID_PAYMENT_METHOD)
        last4 = token.group(1)
        op = self._new(Operation.AUTHORIZE, key, reference, amount, currency, "authorized",
                       card_last4=last4)
        decline = CARD_BEHAVIOUR.get(last4)
        if decline is not None:
            op.state, op.refusal = "declined", decline
        elif capture:
            op.captured, op.captured_at_authorization, op.closed = amount, True, True
            self._start_settlement(op, settle_now)
        op.authorization_id = op.id
        return op

    def capture(self, *, key: str, reference: str, authorization_id: str, amount: int,
                currency: str, settle_now: bool, final: bool = True) -> Op:
        """Capture ``amount`` of what the authorization still holds. A ``final`` capture
        (the default, as with most acquirers) closes it and releases the rest; otherwise
        the rest stays capturable by later captures, a void releasing it."""
        auth = self._authorization(authorization_id, currency)
        _check_amount(amount)
        if auth.voided:
            raise Refused(Refusal.ALREADY_VOIDED)
        if auth.closed:
            raise Refused(Refusal.ALREADY_CAPTURED)
        if amount > auth.capturable:
            raise Refused(Refusal.AMOUNT_EXCEEDS_AUTHORIZED)
        op = self._new(Operation.CAPTURE, key, reference, amount, currency, "pending",
                       authorization_id=auth.id, card_last4=auth.card_last4)
        auth.captured += amount
        auth.closed = final or auth.capturable == 0
        self._start_settlement(op, settle_now)
        return op

    def increment(self, *, key: str, reference: str, authorization_id: str, amount: int,
                  currency: str) -> Op:
        """Raise an open authorization by ``amount`` (incremental authorization): it holds,
        and may capture, that much more."""
        auth = self._authorization(authorization_id, currency)
        _check_amount(amount)
        if auth.voided:
            raise Refused(Refusal.ALREADY_VOIDED)
        if auth.closed:
            raise Refused(Refusal.ALREADY_CAPTURED)
        if auth.amount + amount > AMOUNT_MAX:
            raise Refused(Refusal.AMOUNT_EXCEEDS_AUTHORIZED)
        op = self._new(Operation.INCREMENT, key, reference, amount, currency, "authorized",
                       authorization_id=auth.id, card_last4=auth.card_last4)
        auth.amount += amount
        return op

    def void(self, *, key: str, reference: str, authorization_id: str) -> Op:
        """Release what the authorization holds: all of it, or after captures that were
        not final, the rest (the void's amount)."""
        auth = self._authorization(authorization_id, None)
        if auth.voided:
            raise Refused(Refusal.ALREADY_VOIDED)
        if auth.closed:
            raise Refused(Refusal.ALREADY_CAPTURED)
        op = self._new(Operation.VOID, key, reference, auth.capturable, auth.currency,
                       "voided", authorization_id=auth.id, card_last4=auth.card_last4)
        op.settled_at_s = op.created_at_s
        auth.voided = True
        return op

    def refund(self, *, key: str, reference: str, authorization_id: str, amount: int,
               currency: str, settle_now: bool) -> Op:
        auth = self._authorization(authorization_id, currency)
        _check_amount(amount)
        if amount > auth.captured - auth.refunded:
            raise Refused(Refusal.AMOUNT_EXCEEDS_CAPTURED)
        op = self._new(Operation.REFUND, key, reference, amount, currency, "pending",
                       authorization_id=auth.id, card_last4=auth.card_last4)
        auth.refunded += amount
        self._start_settlement(op, settle_now)
        return op

    def payout(self, *, key: str, reference: str, amount: int, currency: str,
               destination: str, settle_now: bool) -> Op:
        self._check_currency(currency)
        _check_amount(amount)
        match = BANK_TOKEN.fullmatch(destination)
        if match is None:
            raise Refused(Refusal.INVALID_DESTINATION)
        op = self._new(Operation.PAYOUT, key, reference, amount, currency, "pending",
                       destination_last4=destination[-4:])
        behaviour = BANK_BEHAVIOUR.get(match.group(1))
        if behaviour is Refusal.ACCOUNT_CLOSED or (behaviour is not None and settle_now):
            # A provider that pays out at once learns of a bad account at once.
            op.state, op.refusal = "declined", Refusal.ACCOUNT_CLOSED
            return op
        op.fails_later = behaviour is Refusal.PAYOUT_RETURNED
        self._start_settlement(op, settle_now)
        return op

    def settle(self, op_id: str) -> Op | None:
        """Settle a pending operation (or fail a payout that is returned); None if it was
        not pending (already settled, or gone after a reset)."""
        op = self._ops.get(op_id)
        if op is None or op.state != "pending":
            return None
        op.settled_at_s = self._clock_s()
        if op.fails_later:
            op.state, op.refusal = "failed", Refusal.PAYOUT_RETURNED
        else:
            op.state = "authorized" if op.operation is Operation.AUTHORIZE else "settled"
            op.fee = self._fees.fee(op.operation, op.amount)
        return op

    def settled_on(self, date: str) -> list[Op]:
        """Operations that moved money and settled on ``date`` (UTC), oldest first."""
        return [op for op in self._ops.values() if op.settled_on == date and self.reportable(op)]

    @staticmethod
    def reportable(op: Op) -> bool:
        """Whether ``op`` moved money and settled: a line of a settlement report."""
        return bool(op.settled_on) and op.state in ("settled", "authorized") and (
            op.operation in (Operation.CAPTURE, Operation.REFUND, Operation.PAYOUT)
            or op.captured_at_authorization)

    def _start_settlement(self, op: Op, settle_now: bool) -> None:
        op.state = "pending"
        if settle_now:
            self.settle(op.id)

    def _authorization(self, authorization_id: str, currency: str | None) -> Op:
        auth = self._ops.get(authorization_id)
        if auth is None or auth.operation is not Operation.AUTHORIZE:
            raise Refused(Refusal.NOT_FOUND)
        if auth.state == "declined":
            raise Refused(Refusal.AUTHORIZATION_DECLINED)
        if currency is not None and currency != auth.currency:
            raise Refused(Refusal.CURRENCY_MISMATCH)
        return auth

    def _check_currency(self, currency: str) -> None:
        if currency not in self.currencies:
            raise Refused(Refusal.CURRENCY_NOT_SUPPORTED)

    def _new(self, operation: Operation, key: str, reference: str, amount: int,
             currency: str, state: OpState, **extra: Any) -> Op:
        op = Op(id=f"{self._prefixes[operation]}{uuid.uuid4().hex[:20]}", operation=operation,
                idempotency_key=key, reference=reference, amount=amount, currency=currency,
                state=state, created_at_s=self._clock_s(), **extra)
        self._ops[op.id] = op
        return op


def _check_amount(amount: int) -> None:
    # The wire formats validate amounts before the book sees them; this is the last line.
    if not 1 <= amount <= AMOUNT_MAX:
        raise ValueError("amount out of range")


# --- settlement reports -----------------------------------------------------------------------


class ReportWriter:
    """Keeps ``<dir>/<file name of date>`` up to date for every date that saw a settlement.

    Reports are rewritten whole (to a temporary file, then renamed) at most every
    ``interval_s`` and once more at shutdown.
    """

    def __init__(self, directory: Path | None, render: Callable[[str], bytes],
                 file_name: Callable[[str], str], *, interval_s: float = 0.5) -> None:
        self._dir = directory
        self._render = render
        self._file_name = file_name
        self._interval_s = interval_s
        self._dirty: set[str] = set()

    def touch(self, date: str) -> None:
        if self._dir is not None and date:
            self._dirty.add(date)

    def flush(self) -> None:
        if self._dir is None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        dates, self._dirty = self._dirty, set()
        for date in sorted(dates):
            target = self._dir / self._file_name(date)
            partial = target.with_name(f".{target.name}.partial")
            partial.write_bytes(self._render(date))
            os.replace(partial, target)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            with contextlib.suppress(OSError):
                self.flush()

