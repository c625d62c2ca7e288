"""processor.payments (idempotency): key validation, request fingerprints and the decision table."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.payments import (
    KEY_CHARS_MAX,
    Decision,
    IdempotencyError,
    IdempotencyErrorCode,
    KeyState,
    StoredKey,
    check_key,
    decide,
    fingerprint,
)
from processor.types import InvariantError

# --- check_key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "8e03978e-40d5-43e8-bc93-6894a57f9324",
        '"8e03978e-40d5-43e8-bc93-6894a57f9324"',  # the draft's sf-string form, kept as is
        "!" + "~" * (KEY_CHARS_MAX - 1),  # both ends of the range, at the length limit
        "".join(chr(code) for code in range(0x21, 0x7F)),
    ],
)
def test_valid_keys_are_returned_unchanged(key: str) -> None:
    """1 to 255 visible ASCII characters are accepted and returned as they are."""
    assert check_key(key) == key


# Each row: header -> error code.
BAD_KEYS = [
    (None, "idempotency_key_missing"),
    ("", "idempotency_key_invalid"),
    ("a" * (KEY_CHARS_MAX + 1), "idempotency_key_invalid"),
    ("a" * 1_000_000, "idempotency_key_invalid"),
    ("has space", "idempotency_key_invalid"),
    (" leading", "idempotency_key_invalid"),
    ("trailing\n", "idempotency_key_invalid"),
    ("tab\tinside", "idempotency_key_invalid"),
    ("nul\x00", "idempotency_key_invalid"),
    ("del\x7f", "idempotency_key_invalid"),
    ("caf\u00e9", "idempotency_key_invalid"),
    ("\uff41", "idempotency_key_invalid"),  # full-width a
]


@pytest.mark.parametrize(("header", "code"), BAD_KEYS)
def test_bad_keys_are_refused_with_a_stable_code(header: str | None, code: str) -> None:
    """A missing header and each kind of malformed key get their own stable code."""
    with pytest.raises(IdempotencyError) as caught:
        check_key(header)
    assert caught.value.code == code
    assert isinstance(caught.value.code, IdempotencyErrorCode)
    if header:
        assert header not in caught.value.message


def test_error_codes_are_a_closed_set() -> None:
    """The codes are exactly the two documented ones."""
    assert [code.value for code in IdempotencyErrorCode] == [
        "idempotency_key_missing",
        "idempotency_key_invalid",
    ]


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_check_key_accepts_exactly_visible_ascii(header: str) -> None:
    """A key is accepted if and only if it is 1..255 characters of 0x21..0x7E."""
    expected = 1 <= len(header) <= KEY_CHARS_MAX and all("!" <= c <= "~" for c in header)
    try:
        assert check_key(header) == header
        accepted = True
    except IdempotencyError as error:
        assert error.code == "idempotency_key_invalid"
        accepted = False
    assert accepted is expected


# --- fingerprint --------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_the_documented_framing() -> None:
    """The fingerprint is SHA-256 over length-prefixed method, path, kind and canonical body."""

    def framed(*parts: bytes) -> bytes:
        return b"".join(len(part).to_bytes(8, "big") + part for part in parts)

    expected = hashlib.sha256(
        b"txproc idempotency fingerprint v1\x00"
        + framed(b"POST", b"/v1/payments", b"json", b'{"a":1,"b":[true,null]}')
    ).digest()
    assert fingerprint("POST", "/v1/payments", b'{ "b": [true, null], "a": 1 }') == expected
    assert len(expected) == 32


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (b'{"a":1,"b":2}', b'{"b":2,"a":1}'),
        (b'{"a":{"x":1,"y":2}}', b'{"a":{"y":2,"x":1}}'),
        (b'{"a": 1}', b'\n\t{ "a" :1 }  '),
        (b'{"s":"\\u00e9"}', '{"s":"\u00e9"}'.encode()),
        (b'{"a":1,"a":2}', b'{"a":2}'),  # a repeated key: the last one wins on decode
    ],
)
def test_fingerprint_ignores_key_order_and_formatting(first: bytes, second: bytes) -> None:
    """Bodies that decode to the same JSON value have the same fingerprint."""
    assert fingerprint("POST", "/p", first) == fingerprint("POST", "/p", second)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("POST", "/p", b'{"a":1}'), ("POST", "/p", b'{"a":2}')),
        (("POST", "/p", b'{"a":1}'), ("POST", "/p", b'{"a":1.0}')),  # int and float differ
        (("POST", "/p", b'[1,2]'), ("POST", "/p", b'[2,1]')),  # arrays keep their order
        (("POST", "/p", b'{"a":1}'), ("PUT", "/p", b'{"a":1}')),
        (("POST", "/p", b'{"a":1}'), ("POST", "/q", b'{"a":1}')),
        (("POST", "/ab", b"c"), ("POST", "/a", b"bc")),  # framing keeps the parts apart
        (("POST", "/p", b"not json"), ("POST", "/p", b"not  json")),
        (("POST", "/p", b""), ("POST", "/p", b" ")),
        (("POST", "/p", b"null"), ("POST", "/p", b"")),
    ],
)
def test_fingerprint_tells_different_requests_apart(
    first: tuple[str, str, bytes], second: tuple[str, str, bytes]
) -> None:
    """A different method, path or body value gives a different fingerprint."""
    assert fingerprint(*first) != fingerprint(*second)


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe", b"{", b"[1e400]", b"[" * 100_000 + b"]" * 100_000, b"{'a': 1}"],
)
def test_fingerprint_takes_a_body_that_is_not_json_byte_for_byte(body: bytes) -> None:
    """Invalid UTF-8, broken or too-deep JSON and out-of-range numbers are raw bytes."""
    value = fingerprint("POST", "/p", body)
    assert value == fingerprint("POST", "/p", body)
    assert len(value) == 32


def test_fingerprint_of_a_lone_surrogate_path_does_not_raise() -> None:
    """A path with a lone surrogate is fingerprinted rather than refused."""
    assert fingerprint("POST", "/p\udc80", b"{}") != fingerprint("POST", "/p", b"{}")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=25,
)


def shuffled(value: object, seed: int) -> object:
    """``value`` with the keys of every object in a seed-dependent order."""
    if isinstance(value, dict):
        items = list(value.items())
        items = items[seed % (len(items) or 1) :] + items[: seed % (len(items) or 1)]
        return {key: shuffled(member, seed // 3) for key, member in reversed(items)}
    if isinstance(value, list):
        return [shuffled(member, seed) for member in value]
    return value


@settings(max_examples=75, deadline=None)
@given(value=json_values, seed=st.integers(0, 10_000), indent=st.sampled_from([0, 2]))
def test_fingerprint_is_invariant_under_key_order(value: object, seed: int, indent: int) -> None:
    """Re-ordering object keys and re-formatting the body never changes the fingerprint."""
    body = msgspec.json.encode(value)
    other = msgspec.json.format(msgspec.json.encode(shuffled(value, seed)), indent=indent)
    assert fingerprint("POST", "/v1/payments", body) == fingerprint(
        "POST", "/v1/payments", other
    )


# --- decide -------------------------------------------------------------------------------

FP = fingerprint("POST", "/v1/payments", b'{"amount":100}')
OTHER = fingerprint("POST", "/v1/payments", b'{"amount":101}')
TTL_S = 30.0


def stored(state: KeyState, claimed_at_s: float = 100.0, fp: bytes = FP) -> StoredKey:
    if state is KeyState.completed:
        return StoredKey(fingerprint=fp, state=state, claimed_at_s=claimed_at_s, status=201,
                         body=b'{"id":"pay_1"}')
    return StoredKey(fingerprint=fp, state=state, claimed_at_s=claimed_at_s)


IN_FLIGHT, COMPLETED = KeyState.in_flight, KeyState.completed

# Each row: what is stored, the request's fingerprint, now_s -> decision.
DECISIONS = [
    (None, FP, 100.0, Decision.execute),
    (stored(IN_FLIGHT), FP, 100.0, Decision.conflict_in_flight),
    (stored(IN_FLIGHT), FP, 129.999, Decision.conflict_in_flight),
    (stored(IN_FLIGHT), FP, 130.0, Decision.take_over),  # exactly the TTL old: stale
    (stored(IN_FLIGHT), FP, 10_000.0, Decision.take_over),
    (stored(COMPLETED), FP, 100.0, Decision.replay),
    (stored(COMPLETED), FP, 10_000.0, Decision.replay),  # completed never goes stale here
    (stored(IN_FLIGHT), OTHER, 100.0, Decision.mismatch),
    (stored(IN_FLIGHT), OTHER, 10_000.0, Decision.mismatch),  # even when stale
    (stored(COMPLETED), OTHER, 100.0, Decision.mismatch),
    (stored(IN_FLIGHT, claimed_at_s=200.0), FP, 100.0, Decision.conflict_in_flight),
]


@pytest.mark.parametrize(("stored_key", "request_fp", "now_s", "decision"), DECISIONS)
def test_decide(
    stored_key: StoredKey | None, request_fp: bytes, now_s: float, decision: Decision
) -> None:
    """Each stored state and fingerprint leads to the decision the table says."""
    assert decide(stored_key, request_fp, now_s, TTL_S) is decision


@pytest.mark.parametrize("ttl_s", [0.0, -1.0])
def test_decide_requires_a_positive_ttl(ttl_s: float) -> None:
    """A TTL of zero would let every in-flight claim be taken over: a bug."""
    with pytest.raises(InvariantError):
        decide(None, FP, 0.0, ttl_s)


def test_decisions_are_a_closed_set() -> None:
    """The decisions are exactly the documented ones, with stable string values."""
    assert {decision.value for decision in Decision} == {
        "execute", "replay", "conflict_in_flight", "mismatch", "take_over"
    }


def test_stored_key_survives_a_round_trip() -> None:
    """A StoredKey encodes and decodes with msgspec, and the decoded one decides the same."""
    key = stored(COMPLETED)
    raw = msgspec.msgpack.encode(key)
    back = msgspec.msgpack.decode(raw, type=StoredKey)
    assert back == key
    assert back.state is KeyState.completed
    assert decide(back, FP, 100.0, TTL_S) is Decision.replay
