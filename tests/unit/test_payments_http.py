"""The card-data scan at the payments API's door (actors/payments/endpoints.py)."""

from __future__ import annotations

import json

import pytest

from actors.payments.endpoints import PaymentsApiError, scan_for_card_data


def luhn(body: str) -> str:
    """``body`` with its Luhn check digit appended (test numbers are made at run time)."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return body + str((10 - total % 10) % 10)


CARD = luhn("4" + "1" * 14)


def test_a_random_key_with_a_card_like_digit_run_passes() -> None:
    key = f"order-{CARD}-retry"  # digits inside a longer key: a UUID or hex key by chance
    scan_for_card_data({"idempotency-key": key}, b"{}")


def test_a_key_that_is_a_card_number_is_refused_without_echoing_it() -> None:
    spaced = " ".join(CARD[i:i + 4] for i in range(0, 16, 4))
    underscored = "_".join(CARD[i:i + 4] for i in range(0, 16, 4))
    for key in (CARD, spaced, underscored):
        with pytest.raises(PaymentsApiError) as err:
            scan_for_card_data({"Idempotency-Key": key}, b"{}")
        assert err.value.code == "card_data_not_allowed"
        assert CARD not in str(err.value)


def test_card_numbers_in_other_headers_and_in_the_body_are_refused() -> None:
    with pytest.raises(PaymentsApiError):
        scan_for_card_data({"x-note": f"card {CARD}"}, b"{}")
    with pytest.raises(PaymentsApiError) as err:
        scan_for_card_data({}, json.dumps({"reference": "x", "meta": {"n": CARD}}).encode())
    assert "$.meta.n" in str(err.value) and CARD not in str(err.value)
    with pytest.raises(PaymentsApiError):
        scan_for_card_data({}, f"not json {CARD}".encode())
    # The bearer token is never scanned (nor logged); integers are ids and amounts.
    scan_for_card_data({"authorization": f"Bearer {CARD}"}, json.dumps({"n": int(CARD)}).encode())


@pytest.mark.parametrize("body", [
    b'{"amount": 1, "currency": "\xff\xfe"}',  # a string that is not UTF-8
    b"[" * 200_000,  # nesting deeper than any recursion limit
    b'{"metadata": ' + b"[" * 200_000,
])
def test_unreadable_bodies_are_refused_with_a_4xx_code(body: bytes) -> None:
    """The card scan passes what it cannot read to the decoder, which refuses it with a
    400 code (never a 500)."""
    from actors.payments.endpoints import _decode

    scan_for_card_data({}, body)
    with pytest.raises(PaymentsApiError) as caught:
        _decode("authorize", body)
    assert caught.value.status == 400
    assert caught.value.code in ("malformed_json", "invalid_body")
