"""processor/privacy.py: digests name a subject per tenant, wrapped keys and sealed fields
open only with their key and where they were written, and erased objects show nulls."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.privacy import (
    DATA_KEY_BYTES,
    PSEUDONYM_PREFIX,
    MasterKey,
    Personal,
    PrivacyError,
    erased_object,
    key_id_of,
    open_personal,
    pseudonym_of,
    seal_personal,
)
from processor.types import USER_DATA_CHARS_MAX

MASTER = MasterKey(b"m" * 32)
DATA_KEY = bytes(range(DATA_KEY_BYTES))
NONCE = b"n" * 12
PERSONAL = Personal(customer_ref="cus_1", reference="order-9",
                    metadata={"email": "a@example.org"})


def test_a_digest_is_per_tenant_and_per_master_key_and_hides_the_reference() -> None:
    """The same reference is two subjects in two tenants, and another deployment's
    digest of it differs; the digest does not contain the reference."""
    digest = MASTER.subject_digest(7, "cus_1")
    assert len(digest) == 32 and digest == MASTER.subject_digest(7, "cus_1")
    assert digest != MASTER.subject_digest(8, "cus_1")
    assert digest != MasterKey(b"o" * 32).subject_digest(7, "cus_1")
    assert b"cus_1" not in digest


def test_a_wrapped_key_opens_only_for_its_subject_and_master() -> None:
    """Unwrapped with the digest it was wrapped for, the data key comes back; moved to
    another subject, opened by another master key, or changed by one bit, it is refused."""
    digest = MASTER.subject_digest(7, "cus_1")
    wrapped = MASTER.wrap(DATA_KEY, digest=digest, nonce=NONCE)
    assert DATA_KEY not in wrapped
    assert MASTER.unwrap(wrapped, digest=digest) == DATA_KEY
    with pytest.raises(PrivacyError):
        MASTER.unwrap(wrapped, digest=MASTER.subject_digest(7, "cus_2"))
    with pytest.raises(PrivacyError):
        MasterKey(b"o" * 32).unwrap(wrapped, digest=digest)
    flipped = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    with pytest.raises(PrivacyError):
        MASTER.unwrap(flipped, digest=digest)


@pytest.mark.parametrize(("key", "row_id", "sealed_change"), [
    (b"k" * 32, "pay_1", None),        # another subject's key
    (DATA_KEY, "pay_2", None),         # copied onto another row
    (DATA_KEY, "pay_1", "version"),    # an envelope of another version
    (DATA_KEY, "pay_1", "truncated"),  # cut short
])
def test_sealed_fields_open_only_with_their_key_on_their_row(
        key: bytes, row_id: str, sealed_change: str | None) -> None:
    """Each row of the table is one way sealed fields fail to open: PrivacyError."""
    sealed = seal_personal(DATA_KEY, PERSONAL, row_id="pay_1", nonce=NONCE)
    if sealed_change == "version":
        sealed = b"\x02" + sealed[1:]
    elif sealed_change == "truncated":
        sealed = sealed[:20]
    with pytest.raises(PrivacyError):
        open_personal(key, sealed, row_id=row_id)


def test_sealed_fields_round_trip_and_hold_no_clear_text() -> None:
    """What is sealed opens to the same fields; the sealed bytes hold none of them."""
    sealed = seal_personal(DATA_KEY, PERSONAL, row_id="pay_1", nonce=NONCE)
    assert open_personal(DATA_KEY, sealed, row_id="pay_1") == PERSONAL
    for text in (b"cus_1", b"order-9", b"a@example.org"):
        assert text not in sealed


def test_a_short_master_key_is_refused_and_never_printed() -> None:
    """A master key under 32 bytes is refused; a master key's repr shows no secret."""
    with pytest.raises(PrivacyError):
        MasterKey(b"short")
    assert "m" * 8 not in repr(MASTER)


def test_an_erased_object_has_null_personal_fields_and_keeps_the_rest() -> None:
    """Only the personal fields present become null; amounts and ids stay; erased: true."""
    payload = {"id": "pay_1", "amount": 5, "reference": "r", "metadata": {"a": "b"}}
    assert erased_object(payload) == {"id": "pay_1", "amount": 5, "reference": None,
                                      "metadata": None, "erased": True}
    assert payload["reference"] == "r"  # a new dict


@given(st.integers(min_value=1, max_value=2**63 - 1))
def test_a_pseudonym_names_its_key_and_fits_user_data(key_id: int) -> None:
    """Every key id has one pseudonym, short enough for user_data, that gives it back."""
    pseudonym = pseudonym_of(key_id)
    assert len(pseudonym) <= USER_DATA_CHARS_MAX and key_id_of(pseudonym) == key_id


@given(st.text(max_size=40))
def test_only_a_pseudonym_names_a_key(text: str) -> None:
    """Any text that is not exactly a pseudonym (prefix, then an id without a leading
    zero) names no key, so such a value is never looked up."""
    key_id = key_id_of(text)
    assert key_id is None or pseudonym_of(key_id) == text


@pytest.mark.parametrize("text", ["", "~s", "~s0", "~s07", "~s-1", "~s 1", "~s1 ", "x~s1",
                                  "~s9223372036854775808", "~s\u0661", "~S1"])
def test_texts_near_a_pseudonym_name_no_key(text: str) -> None:
    assert key_id_of(text.encode().decode("unicode_escape")) is None


def test_a_key_id_out_of_range_has_no_pseudonym() -> None:
    for key_id in (0, -1, 2**63):
        with pytest.raises(PrivacyError):
            pseudonym_of(key_id)
    assert pseudonym_of(1) == f"{PSEUDONYM_PREFIX}1"
