"""Personal data beside money, stored so that it can be erased (docs/design.md §17).

A payment or payout may name its data subject: ``customer_ref``, the client's reference
for the person it concerns. Its personal fields (``customer_ref``, ``reference``,
``metadata``) are then not stored in clear but sealed (AES-256-GCM) with a data key of
that subject alone; the data key is stored wrapped (AES-256-GCM again) by a key derived
from the deployment's master key (``MASTER_KEY_FILE_NAME`` in the key directory).
Erasure destroys the wrapped data key: every sealed copy of the subject's fields is then
noise, wherever it lies, while amounts, ids and timestamps, which were never sealed, stay.

A tenant may also mark its accounts' and transfers' ``user_data`` personal: each value is
then a subject's reference, and the ledger stores its *pseudonym* (``pseudonym_of``: a
fixed prefix and the subject key's id) in its place, the value itself sealed beside the
key (``user_data_row_id``). The ledger's rows and hash chain cover only the pseudonym, so
an erasure changes nothing they cover.

The subject is found by a keyed digest of (tenant slot, customer_ref), never by the
reference in clear, so the table of keys and the audit event of an erasure name no one.

Everything here is pure: nonces and data keys are passed in by the caller, so the tests
are exact. Errors: ``PrivacyError`` when something sealed does not open (the wrong key,
or bytes changed): a bug or tampering, never an outcome a client causes.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "CUSTOMER_REF_CHARS_MAX",
    "CUSTOMER_REF_PATTERN",
    "DATA_KEY_BYTES",
    "DIGEST_BYTES",
    "MASTER_KEY_BYTES_MIN",
    "MASTER_KEY_FILE_NAME",
    "NONCE_BYTES",
    "PERSONAL_FIELDS",
    "PSEUDONYM_PREFIX",
    "MasterKey",
    "Personal",
    "PrivacyError",
    "erased_object",
    "key_id_of",
    "open_personal",
    "pseudonym_of",
    "seal_personal",
    "user_data_row_id",
]

MASTER_KEY_FILE_NAME = "erasure.key"
MASTER_KEY_BYTES_MIN = 32
DATA_KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # AES-GCM's standard nonce; random per seal, never reused under one key
DIGEST_BYTES = 32  # HMAC-SHA-256
CUSTOMER_REF_CHARS_MAX = 100
# Letters, digits and a few separators (an email address fits): no spaces, no controls.
CUSTOMER_REF_PATTERN = "^[A-Za-z0-9_.:@+-]*$"
# The fields an erased payment or payout shows as null (with "erased": true).
PERSONAL_FIELDS = ("customer_ref", "reference", "metadata")
# What the ledger stores in place of a personal user_data value: this and the decimal id
# of the subject's key (at most 21 characters, well within user_data's 128).
PSEUDONYM_PREFIX = "~s"
_KEY_ID_MAX = 2**63 - 1

_ENVELOPE_VERSION = b"\x01"
_DIGEST_LABEL = b"txproc.privacy.subject-digest.v1"
_WRAP_LABEL = b"txproc.privacy.key-wrap.v1"
_WRAP_AAD = b"txproc.privacy.data-key.v1:"
_SEAL_AAD = b"txproc.privacy.personal.v1:"


class PrivacyError(ValueError):
    """A wrapped key or sealed fields that do not open: the wrong master key, another
    row's ciphertext, or bytes changed since they were written."""


class Personal(msgspec.Struct, frozen=True, kw_only=True):
    """The personal fields of one payment or payout, as they are sealed."""

    customer_ref: str
    reference: str = ""
    metadata: dict[str, str] = {}


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Personal)


def _derive(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, label, hashlib.sha256).digest()


class MasterKey:
    """The deployment's master key, held only as the two keys derived from it: one that
    digests subject references, one that wraps data keys."""

    __slots__ = ("_digest_key", "_wrap")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MASTER_KEY_BYTES_MIN:
            raise PrivacyError(f"a master key has at least {MASTER_KEY_BYTES_MIN} bytes")
        self._digest_key = _derive(secret, _DIGEST_LABEL)
        self._wrap = AESGCM(_derive(secret, _WRAP_LABEL))

    def __repr__(self) -> str:
        return "MasterKey(<secret>)"  # never the secret, whatever prints it

    def subject_digest(self, tenant_slot: int, customer_ref: str) -> bytes:
        """The subject's name in storage: HMAC-SHA-256 of the tenant slot and the
        reference. Two tenants' equal references are two subjects."""
        message = tenant_slot.to_bytes(8, "big") + customer_ref.encode("utf-8")
        return hmac.new(self._digest_key, message, hashlib.sha256).digest()

    def wrap(self, data_key: bytes, *, digest: bytes, nonce: bytes) -> bytes:
        """``data_key`` sealed for storage beside ``digest`` (bound to it: a wrapped key
        moved to another subject's row does not open)."""
        if len(data_key) != DATA_KEY_BYTES or len(nonce) != NONCE_BYTES:
            raise PrivacyError("a data key has 32 bytes and a nonce 12")
        return _ENVELOPE_VERSION + nonce + self._wrap.encrypt(nonce, data_key,
                                                              _WRAP_AAD + digest)

    def unwrap(self, wrapped: bytes, *, digest: bytes) -> bytes:
        """The data key of ``wrap``; ``PrivacyError`` if it does not open."""
        return _open(self._wrap, wrapped, _WRAP_AAD + digest)


def _open(cipher: AESGCM, sealed: bytes, aad: bytes) -> bytes:
    if len(sealed) < 1 + NONCE_BYTES + 16 or sealed[:1] != _ENVELOPE_VERSION:
        raise PrivacyError("not a sealed value of this version")
    try:
        return cipher.decrypt(sealed[1:1 + NONCE_BYTES], sealed[1 + NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise PrivacyError("a sealed value does not open with this key") from exc


def seal_personal(data_key: bytes, personal: Personal, *, row_id: str, nonce: bytes) -> bytes:
    """The personal fields of row ``row_id`` sealed with the subject's data key: version
    byte, nonce, ciphertext and tag. Bound to ``row_id``: copied onto another row, they
    do not open."""
    if len(nonce) != NONCE_BYTES:
        raise PrivacyError("a nonce has 12 bytes")
    plain = _ENCODER.encode(personal)
    return _ENVELOPE_VERSION + nonce + AESGCM(data_key).encrypt(
        nonce, plain, _SEAL_AAD + row_id.encode("utf-8"))


def open_personal(data_key: bytes, sealed: bytes, *, row_id: str) -> Personal:
    """What ``seal_personal`` sealed; ``PrivacyError`` if it does not open."""
    plain = _open(AESGCM(data_key), sealed, _SEAL_AAD + row_id.encode("utf-8"))
    return _DECODER.decode(plain)


def erased_object(obj: dict[str, Any]) -> dict[str, Any]:
    """A payment's or payout's JSON (an event's payload, a stored answer) as an erased one
    shows: each personal field it has set to null, and ``"erased": true``. A new dict."""
    erased = dict(obj)
    for name in PERSONAL_FIELDS:
        if name in erased:
            erased[name] = None
    erased["erased"] = True
    return erased


def pseudonym_of(key_id: int) -> str:
    """The user_data the ledger stores for a personal value whose subject key is
    ``key_id``."""
    if not 1 <= key_id <= _KEY_ID_MAX:
        raise PrivacyError("a subject key's id is from 1 to 2^63-1")
    return f"{PSEUDONYM_PREFIX}{key_id}"


def key_id_of(user_data: str) -> int | None:
    """The subject key id of a pseudonym (``pseudonym_of``), None for any other text."""
    digits = user_data[len(PSEUDONYM_PREFIX):]
    if (not user_data.startswith(PSEUDONYM_PREFIX) or not 1 <= len(digits) <= 19
            or not digits.isascii() or not digits.isdigit() or digits[0] == "0"):
        return None
    key_id = int(digits)
    return key_id if key_id <= _KEY_ID_MAX else None


def user_data_row_id(key_id: int) -> str:
    """What a personal user_data value's seal is bound to: its key's row."""
    return f"user_data:{key_id}"
