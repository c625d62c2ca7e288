"""The simulators' shared machinery, with a fake clock and a seeded generator."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from adapters.base import Operation
from adapters.sim.core import (
    Book,
    FeeSchedule,
    IdempotencyStore,
    KeyState,
    Refusal,
    Refused,
    SecretsError,
    Stored,
    fingerprint,
    generate_secrets,
    load_secrets,
    luhn_valid,
    minor_to_text,
    text_to_minor,
)
from adapters.sim.faults import FAULTS_DECODER, FaultModel, Faults, Latency


class Clock:
    def __init__(self, now_s: float = 1_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def model(faults: Faults, seed: int = 1) -> tuple[FaultModel, Clock]:
    clock = Clock()
    fault_model = FaultModel(rng=random.Random(seed), monotonic_s=clock)
    fault_model.configure(faults)
    return fault_model, clock


# --- faults -----------------------------------------------------------------------------------


def test_no_faults_means_nothing_strikes() -> None:
    """The default configuration lets every call through untouched."""
    faults, _ = model(Faults())
    for _ in range(100):
        assert faults.edge() is None
        assert (faults.latency_s(), faults.error(), faults.hang_s(), faults.lost()) == (
            0.0, False, 0.0, False)


def test_burst_of_503() -> None:
    """burst_503=N answers exactly the next N calls with 503."""
    faults, _ = model(Faults(burst_503=3, retry_after_s=2))
    assert [faults.edge() for _ in range(4)] == [("unavailable", 2.0)] * 3 + [None]


def test_rate_limit_is_a_token_bucket() -> None:
    """At 2 requests/s with a burst of 2, the third call waits half a second."""
    faults, clock = model(Faults(rate_limit_rps=2.0, rate_limit_burst=2))
    assert faults.edge() is None and faults.edge() is None
    assert faults.edge() == ("throttled", 0.5)
    clock.now_s += 0.5
    assert faults.edge() is None
    assert faults.counts.throttled == 1


def test_outage_ends_by_itself() -> None:
    """An outage with outage_s answers 503 (with the time left) until it is over."""
    faults, clock = model(Faults(outage="unavailable", outage_s=10.0, retry_after_s=1))
    assert faults.edge() == ("unavailable", 10.0)
    clock.now_s += 9.5
    kind, wait_s = faults.edge() or ("", 0.0)
    assert kind == "unavailable" and wait_s == pytest.approx(1.0)
    clock.now_s += 0.5
    assert faults.edge() is None
    assert faults.snapshot()["outage"] == "none"


def test_lognormal_latency_has_the_asked_median_and_p99() -> None:
    """Sampled latencies sit at the configured median and 99th percentile."""
    faults, _ = model(Faults(latency=Latency(median_ms=50.0, p99_ms=200.0)), seed=3)
    samples = sorted(faults.latency_s() * 1000 for _ in range(20_000))
    assert samples[10_000] == pytest.approx(50.0, rel=0.05)
    assert samples[19_800] == pytest.approx(200.0, rel=0.15)


def test_seeded_faults_repeat_exactly() -> None:
    """Two providers with the same seed make the same decisions, call for call."""
    config = Faults(error_rate=0.3, hang_rate=0.2, lost_response_rate=0.1, hang_s=1.0)
    first, _ = model(config, seed=42)
    second, _ = model(config, seed=42)
    decisions = [(m.error(), m.hang_s(), m.lost()) for m in (first, second) for _ in range(50)]
    assert decisions[:50] == decisions[50:]
    assert any(d[0] for d in decisions) and not all(d[0] for d in decisions)


@pytest.mark.parametrize(("payload", "valid"), [
    ({}, True),
    ({"error_rate": 1.0, "latency": {"median_ms": 10, "p99_ms": 10}}, True),
    ({"outage": "refuse", "outage_s": 1.5}, True),
    ({"error_rate": 1.5}, False),
    ({"latency": {"median_ms": 100, "p99_ms": 50}}, False),
    ({"outage": "refuse"}, False),
    ({"outage": "sometimes"}, False),
    ({"hang_s": 0}, False),
    ({"rate_limit_rps": 0}, False),
    ({"burst_503": -1}, False),
    ({"no_such_fault": 1}, False),
])
def test_fault_configuration_is_validated(payload: dict[str, object], valid: bool) -> None:
    """Out-of-range rates, impossible latencies and unknown fields are refused."""
    body = json.dumps(payload).encode()
    if valid:
        FAULTS_DECODER.decode(body)
    else:
        with pytest.raises(msgspec.ValidationError):
            FAULTS_DECODER.decode(body)


# --- idempotency --------------------------------------------------------------------------------


def test_idempotency_store_states() -> None:
    """New, in progress, replay, mismatch, abandon and full, each where it belongs."""
    store = IdempotencyStore(keys_max=2)
    assert store.begin("a", "fp1") == (KeyState.NEW, None)
    assert store.begin("a", "fp1") == (KeyState.IN_PROGRESS, None)
    assert store.begin("a", "fp2") == (KeyState.MISMATCH, None)
    assert store.lookup("a") == "in_progress"
    stored = Stored("fp1", Operation.AUTHORIZE, 200, b"{}", "auth_1")
    store.finish("a", stored)
    assert store.begin("a", "fp1") == (KeyState.REPLAY, stored)
    assert store.begin("a", "fp2") == (KeyState.MISMATCH, stored)
    assert store.begin("b", "fp") == (KeyState.NEW, None)
    store.abandon("b")
    assert store.lookup("b") is None
    assert store.begin("b", "fp")[0] is KeyState.NEW
    assert store.begin("c", "fp") == (KeyState.FULL, None)


def test_fingerprint_compares_json_by_meaning() -> None:
    """Key order and spacing do not make a different request; values and paths do."""
    base = fingerprint("POST", "/v1/x", b'{"a": 1, "b": 2}')
    assert fingerprint("POST", "/v1/x", b'{"b":2,"a":1}') == base
    assert fingerprint("POST", "/v1/x", b'{"a": 1, "b": 3}') != base
    assert fingerprint("POST", "/v1/y", b'{"a": 1, "b": 2}') != base


# --- the book -----------------------------------------------------------------------------------

FEES = FeeSchedule(capture_bps=290, capture_fixed=30, refund_fixed=0, payout_fixed=25)
PREFIXES = {Operation.AUTHORIZE: "auth_", Operation.CAPTURE: "cap_", Operation.VOID: "vd_",
            Operation.REFUND: "re_", Operation.PAYOUT: "po_"}
TOKEN = "pm_4242_0123456789abcdef"


def book(clock: Clock | None = None) -> Book:
    return Book(currencies=frozenset({"USD", "EUR"}), fees=FEES, id_prefixes=PREFIXES,
                clock_s=clock or Clock(1_790_000_000.0), ops_max=100)


def authorized(ledger: Book, amount: int = 1_000, token: str = TOKEN) -> str:
    op = ledger.authorize(key="a", reference="r", amount=amount, currency="USD",
                          payment_method=token, capture=False, settle_now=True)
    return op.id


@pytest.mark.parametrize(("action", "refusal"), [
    ("capture_over", Refusal.AMOUNT_EXCEEDS_AUTHORIZED),
    ("capture_twice_over", Refusal.AMOUNT_EXCEEDS_AUTHORIZED),
    ("capture_after_final", Refusal.ALREADY_CAPTURED),
    ("refund_uncaptured", Refusal.AMOUNT_EXCEEDS_CAPTURED),
    ("refund_over", Refusal.AMOUNT_EXCEEDS_CAPTURED),
    ("void_captured", Refusal.ALREADY_CAPTURED),
    ("capture_voided", Refusal.ALREADY_VOIDED),
    ("void_twice", Refusal.ALREADY_VOIDED),
    ("capture_unknown", Refusal.NOT_FOUND),
    ("capture_other_currency", Refusal.CURRENCY_MISMATCH),
    ("authorize_currency", Refusal.CURRENCY_NOT_SUPPORTED),
    ("authorize_bad_token", Refusal.INVALID_PAYMENT_METHOD),
    ("capture_declined", Refusal.AUTHORIZATION_DECLINED),
    ("payout_bad_destination", Refusal.INVALID_DESTINATION),
])
def test_book_rules(action: str, refusal: Refusal) -> None:
    """Each rule refuses with its own reason, and a refusal changes nothing."""
    ledger = book()
    auth = authorized(ledger)

    def capture(amount: int, auth_id: str = auth, currency: str = "USD",
                final: bool = True) -> None:
        ledger.capture(key="c", reference="r", authorization_id=auth_id, amount=amount,
                       currency=currency, settle_now=True, final=final)

    def refund(amount: int) -> None:
        ledger.refund(key="f", reference="r", authorization_id=auth, amount=amount,
                      currency="USD", settle_now=True)

    def void() -> None:
        ledger.void(key="v", reference="r", authorization_id=auth)

    setup: dict[str, Callable[[], object]] = {
        "capture_twice_over": lambda: capture(600, final=False),
        "capture_after_final": lambda: capture(600), "refund_over": lambda: capture(500),
        "void_captured": lambda: capture(1), "capture_voided": void, "void_twice": void}
    attempt: dict[str, Callable[[], object]] = {
        "capture_over": lambda: capture(1_001), "capture_twice_over": lambda: capture(401),
        "capture_after_final": lambda: capture(1, final=False),
        "refund_uncaptured": lambda: refund(1), "refund_over": lambda: refund(501),
        "void_captured": void, "capture_voided": lambda: capture(1), "void_twice": void,
        "capture_unknown": lambda: capture(1, auth_id="auth_nope"),
        "capture_other_currency": lambda: capture(1, currency="EUR"),
        "authorize_currency": lambda: ledger.authorize(
            key="x", reference="r", amount=1, currency="JPY", payment_method=TOKEN,
            capture=False, settle_now=True),
        "authorize_bad_token": lambda: ledger.authorize(
            key="x", reference="r", amount=1, currency="USD", payment_method="4242424242424242",
            capture=False, settle_now=True),
        "capture_declined": lambda: capture(1, auth_id=authorized(ledger, 5,
                                                                  "pm_0002_0123456789ab")),
        "payout_bad_destination": lambda: ledger.payout(
            key="p", reference="r", amount=1, currency="USD", destination="iban:DE00",
            settle_now=True),
    }
    if action in setup:
        setup[action]()
    before = [op.to_admin() for op in ledger.ops()]
    with pytest.raises(Refused) as caught:
        attempt[action]()
    assert caught.value.refusal is refusal
    after = [op.to_admin() for op in ledger.ops()]
    if action != "capture_declined":
        assert after == before


def test_partial_captures_sum_to_the_authorization_and_a_void_releases_the_rest() -> None:
    """Captures that are not final leave the rest capturable; a final one or a void closes
    the authorization, and nothing is ever captured beyond it."""
    ledger = book()
    auth = authorized(ledger, 1_000)
    for amount in (300, 200):
        ledger.capture(key=f"c{amount}", reference="r", authorization_id=auth, amount=amount,
                       currency="USD", settle_now=True, final=False)
    op = ledger.get(auth)
    assert op is not None
    assert (op.captured, op.capturable, op.closed) == (500, 500, False)
    ledger.capture(key="c-last", reference="r", authorization_id=auth, amount=100,
                   currency="USD", settle_now=True, final=True)
    assert (op.captured, op.capturable, op.closed) == (600, 0, True)
    with pytest.raises(Refused):
        ledger.void(key="v", reference="r", authorization_id=auth)

    other = authorized(ledger, 1_000)
    ledger.capture(key="p", reference="r", authorization_id=other, amount=400,
                   currency="USD", settle_now=True, final=False)
    void = ledger.void(key="v2", reference="r", authorization_id=other)
    released = ledger.get(other)
    assert released is not None
    assert (void.amount, released.captured, released.capturable) == (600, 400, 0)
    with pytest.raises(Refused) as caught:
        ledger.capture(key="late", reference="r", authorization_id=other, amount=1,
                       currency="USD", settle_now=True, final=False)
    assert caught.value.refusal is Refusal.ALREADY_VOIDED
    # What was captured stays refundable.
    ledger.refund(key="f", reference="r", authorization_id=other, amount=400, currency="USD",
                  settle_now=True)


@pytest.mark.parametrize(("last4", "refusal"), [
    ("0002", Refusal.INSUFFICIENT_FUNDS), ("0069", Refusal.CARD_EXPIRED),
    ("0119", Refusal.PROCESSING_ERROR), ("0005", Refusal.DO_NOT_HONOR),
    ("9979", Refusal.SUSPECTED_FRAUD), ("4242", None),
])
def test_test_cards(last4: str, refusal: Refusal | None) -> None:
    """The last four digits in the token decide the authorization, as in real sandboxes."""
    ledger = book()
    op = ledger.get(authorized(ledger, token=f"pm_{last4}_0123456789abcdef"))
    assert op is not None
    assert op.refusal is refusal
    assert op.state == ("authorized" if refusal is None else "declined")


def test_asynchronous_settlement_and_fees() -> None:
    """Pending operations settle on request with their fee; a returned payout fails; a
    settled operation does not settle twice; the day's report holds what settled."""
    clock = Clock(1_790_000_000.0)
    ledger = book(clock)
    auth = authorized(ledger)
    capture = ledger.capture(key="c", reference="r", authorization_id=auth, amount=1_000,
                             currency="USD", settle_now=False)
    returned = ledger.payout(key="p", reference="r", amount=500, currency="USD",
                             destination="ba_0003_x", settle_now=False)
    closed = ledger.payout(key="q", reference="r", amount=500, currency="USD",
                           destination="ba_0002_x", settle_now=False)
    assert (capture.state, returned.state, closed.state) == ("pending", "pending", "declined")
    date = capture.settled_on
    assert ledger.settled_on("2026-09-21") == [] and date == ""
    clock.now_s += 60
    settled = ledger.settle(capture.id)
    assert settled is not None and (settled.state, settled.fee) == ("settled", 59)
    assert ledger.settle(capture.id) is None
    failed = ledger.settle(returned.id)
    assert failed is not None
    assert (failed.state, failed.refusal, failed.fee) == ("failed", Refusal.PAYOUT_RETURNED, 0)
    assert ledger.settled_on(capture.settled_on) == [capture]


def test_the_same_destination_fails_at_once_at_a_synchronous_provider() -> None:
    """A provider that pays out at once learns of a returned account at once."""
    op = book().payout(key="p", reference="r", amount=500, currency="USD",
                       destination="ba_0003_x", settle_now=True)
    assert (op.state, op.refusal) == ("declined", Refusal.ACCOUNT_CLOSED)


# --- money, cards, secrets ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "currency", "minor"), [
    ("10.50", "EUR", 1_050), ("10.5", "EUR", 1_050), ("10", "EUR", 1_000), ("1000", "JPY", 1_000),
    ("0.001", "KWD", 1), ("10.505", "EUR", None), ("10.5", "JPY", None), ("1e3", "EUR", None),
    ("NaN", "EUR", None), ("", "EUR", None), ("1.00", "XXX", None),
])
def test_text_to_minor_is_exact_or_nothing(text: str, currency: str, minor: int | None) -> None:
    """Decimal text converts exactly, or not at all."""
    assert text_to_minor(text, currency) == minor


def test_minor_to_text() -> None:
    """Minor units are written with the currency's exponent and a sign when negative."""
    assert [minor_to_text(a, c) for a, c in ((1_050, "EUR"), (-5, "EUR"), (1_000, "JPY"),
                                             (1, "KWD"))] == ["10.50", "-0.05", "1000", "0.001"]


@pytest.mark.parametrize(("number", "valid"), [
    ("4242424242424242", True), ("4000000000000002", True), ("4000000000000069", True),
    ("4000000000000119", True), ("5555555555554444", True), ("4242424242424241", False),
    ("42424242", False), ("4242-4242-4242-4242", False),
])
def test_luhn(number: str, valid: bool) -> None:
    """Test cards pass the Luhn check; a mistyped number does not."""
    assert luhn_valid(number) is valid


def test_secrets_round_trip_and_refusals(tmp_path: Path) -> None:
    """Generated secrets load back; a file of the other provider, or a short field, is
    refused without quoting any value."""
    for name in ("acme", "globex"):
        path = tmp_path / f"{name}.json"
        values = generate_secrets(name)
        path.write_text(json.dumps(values))
        assert load_secrets(path, name).items() <= values.items()
    with pytest.raises(SecretsError, match="not for provider"):
        load_secrets(tmp_path / "acme.json", "globex")
    values = generate_secrets("acme")
    values["api_key"] = "short"
    (tmp_path / "bad.json").write_text(json.dumps(values))
    with pytest.raises(SecretsError) as caught:
        load_secrets(tmp_path / "bad.json", "acme")
    assert "short" not in str(caught.value) and values["admin_token"] not in str(caught.value)
    with pytest.raises(SecretsError, match="cannot read"):
        load_secrets(tmp_path / "missing.json", "acme")
