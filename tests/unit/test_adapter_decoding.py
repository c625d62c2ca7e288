"""Tests of what the adapters share when reading providers' answers (adapters/decoding.py)."""

from __future__ import annotations

import msgspec
import pytest

from adapters.base import (
    DeclineCode,
    Operation,
    Outcome,
    ProviderReply,
    ProviderRequest,
    WebhookRejected,
)
from adapters.decoding import (
    Replies,
    decimal_to_minor,
    header_seconds,
    minor_to_decimal,
    require_fresh,
)

REQUEST = ProviderRequest(operation=Operation.AUTHORIZE, idempotency_key="k", amount=100,
                          currency="EUR", reference="pay_1")
REPLIES = Replies("acme", frozenset({"card_declined"}))


@pytest.mark.parametrize(("text", "exponent", "signed", "expected"), [
    ("10.50", 2, True, 1_050), ("10.5", 2, True, 1_050), ("0.001", 3, True, 1),
    ("1000", 0, True, 1_000), ("-0.05", 2, True, -5), ("12345678901234567890", 0, True,
                                                       12_345_678_901_234_567_890),
    ("-0.05", 2, False, "is not a decimal"), ("10.505", 2, True, "has more decimals"),
    ("10.5", 0, True, "has more decimals"), ("1e3", 2, True, "is not a decimal"),
    ("NaN", 2, True, "is not a decimal"), ("", 2, True, "is not a decimal"),
    (" 1.00", 2, True, "is not a decimal"), ("1.000000001", 9, True, "is not a decimal"),
    ("123456789012345678901", 0, True, "is not a decimal"),
])
def test_decimal_to_minor(text: str, exponent: int, signed: bool, expected: int | str) -> None:
    """Decimal text converts exactly to minor units, or is refused naming why."""
    if isinstance(expected, int):
        assert decimal_to_minor(text, exponent, signed=signed) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            decimal_to_minor(text, exponent, signed=signed)


@pytest.mark.parametrize(("amount", "exponent", "text"), [
    (1_050, 2, "10.50"), (-5, 2, "-0.05"), (1_000, 0, "1000"), (1, 3, "0.001"), (0, 2, "0.00"),
])
def test_minor_to_decimal_round_trips(amount: int, exponent: int, text: str) -> None:
    """Minor units are written with the currency's exponent, and read back the same."""
    assert minor_to_decimal(amount, exponent) == text
    assert decimal_to_minor(text, exponent) == amount


@pytest.mark.parametrize(("text", "scale", "expected"), [
    ("2", 1.0, 2.0), (" 1.5 ", 1.0, 1.5), ("250", 0.001, 0.25), ("0", 1.0, 0.0),
    ("99999", 1.0, 3_600.0), ("-1", 1.0, None), ("inf", 1.0, None), ("nan", 1.0, None),
    ("", 1.0, None), ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0, None),
])
def test_header_seconds(text: str, scale: float, expected: float | None) -> None:
    """A wait hint is a finite number of at least 0, capped; anything else is None."""
    assert header_seconds(text, cap_s=3_600.0, scale=scale) == expected


@pytest.mark.parametrize(("stamp_s", "fresh"), [
    (1_000.0, True), (700.0, True), (1_300.0, True), (699.0, False), (1_301.0, False),
])
def test_require_fresh(stamp_s: float, fresh: bool) -> None:
    """A webhook's timestamp within the tolerance either way passes; beyond it is refused."""
    if fresh:
        require_fresh("acme", stamp_s, 1_000.0, 300.0)
    else:
        with pytest.raises(WebhookRejected) as caught:
            require_fresh("acme", stamp_s, 1_000.0, 300.0)
        assert caught.value.code == "webhook_timestamp_out_of_tolerance"


def test_replies_repeat_only_known_words() -> None:
    """A reply's message names the provider and repeats only a word it documents."""
    known = REPLIES.reply(Outcome.DECLINED, 402, DeclineCode.OTHER, "card_declined")
    echoed = REPLIES.reply(Outcome.DECLINED, 402, DeclineCode.OTHER, "4242424242424242")
    assert (known.message, echoed.message) == ("acme 402 card_declined", "acme 402 unrecognised")
    assert REPLIES.unknown(500, "why").message == "acme 500: why"


@pytest.mark.parametrize("error", [msgspec.DecodeError, msgspec.ValidationError, ValueError])
def test_read_answers_unknown_for_an_unreadable_answer(error: type[Exception]) -> None:
    """A body that cannot be decoded is an UNKNOWN reply, never an exception."""
    def parse(request: ProviderRequest, status: int, headers: dict[str, str],
              body: bytes) -> ProviderReply:
        raise error("bad")

    reply = REPLIES.read(parse, REQUEST, 200, {}, b"", what="status answer")
    assert (reply.outcome, reply.message) == (Outcome.UNKNOWN, "acme 200: unreadable status answer")
