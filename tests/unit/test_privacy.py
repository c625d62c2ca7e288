"""processor/privacy.py: digests name a subject per tenant, wrapped keys and sealed fields
open only with their key and where they were written, and erased objects show nulls."""

from __future__ import annotations

import pytest

from processor.privacy import (
    DATA_KEY_BYTES,
    MasterKey,
    Personal,
    PrivacyError,
    erased_object,
    open_personal,
    seal_personal,
)

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
