"""The pure rules of the ``Idempotency-Key`` request header.

They follow the IETF httpapi draft "The Idempotency-Key HTTP Header Field" and Stripe's
semantics. A client sends a unique key with a request that is not idempotent by itself. The
first request with a key claims it (``in_flight``) and executes; when it finishes, its
response is stored with the key (``completed``). A later request with the same key and the
same method, path and body gets the stored response replayed; one while the first is still
executing is told to retry later (409); one with a different request under the same key is
refused (422). A claim whose holder died is taken over once it is older than a TTL.

The key is opaque: a value in the draft's Structured Field form (``"abc"``, quotes
included) is stored as sent. Scoping keys to their client is the caller's business.
Storage and the clock live in the caller; ``now_s`` and ``claimed_at_s`` are seconds of
one clock.
"""

from __future__ import annotations

import enum
import hashlib
import re

import msgspec

from processor.errors import TxprocError, register
from processor.types import require

__all__ = [
    "FINGERPRINT_BYTES",
    "KEY_CHARS_MAX",
    "Decision",
    "IdempotencyError",
    "IdempotencyErrorCode",
    "KeyState",
    "StoredKey",
    "check_key",
    "decide",
    "fingerprint",
]

KEY_CHARS_MAX = 255
FINGERPRINT_BYTES = 32

# Visible ASCII, 0x21 to 0x7E: no spaces, no control characters, nothing beyond ASCII.
_KEY = re.compile(rf"[\x21-\x7e]{{1,{KEY_CHARS_MAX}}}")
# Distinguishes these fingerprints from any other SHA-256 the service computes, and lets a
# later change of the canonical form start a new version instead of colliding with this one.
_DOMAIN = b"txproc idempotency fingerprint v1\x00"

_JSON_DECODER = msgspec.json.Decoder()
_CANONICAL_ENCODER = msgspec.json.Encoder(order="sorted")


class IdempotencyErrorCode(enum.StrEnum):
    idempotency_key_missing = "idempotency_key_missing"
    idempotency_key_invalid = "idempotency_key_invalid"


register(400, {
    "idempotency_key_missing": "the request needs an Idempotency-Key header",
    "idempotency_key_invalid": "the Idempotency-Key is not 1 to 255 visible ASCII characters",
})
register(409, {
    "idempotency_key_in_use": "a request with this Idempotency-Key is still being answered",
})
register(422, {
    "idempotency_key_reused": "this Idempotency-Key was used with another request",
})


class IdempotencyError(TxprocError):
    """The request's ``Idempotency-Key`` is missing or malformed (HTTP 400).

    ``code`` is stable and appears in API error bodies; ``message`` never repeats the key.
    """

    def __init__(self, code: IdempotencyErrorCode, message: str) -> None:
        super().__init__(message, code=code)


def check_key(header: str | None) -> str:
    """Return the ``Idempotency-Key`` header value if it is 1 to 255 visible ASCII characters.

    Raises ``IdempotencyError`` with ``idempotency_key_missing`` when there is no header
    (None) and ``idempotency_key_invalid`` when the value is empty, too long, or holds a
    character outside 0x21..0x7E.
    """
    if header is None:
        raise IdempotencyError(
            IdempotencyErrorCode.idempotency_key_missing,
            "the request needs an Idempotency-Key header",
        )
    # The length is checked first so that a huge header costs nothing to refuse.
    if not 1 <= len(header) <= KEY_CHARS_MAX or not _KEY.fullmatch(header):
        raise IdempotencyError(
            IdempotencyErrorCode.idempotency_key_invalid,
            f"the Idempotency-Key must be 1 to {KEY_CHARS_MAX} visible ASCII characters",
        )
    return header


def _canonical_body(body: bytes) -> tuple[bytes, bytes]:
    """The body as (kind, bytes): JSON re-encoded with sorted keys, else the raw bytes."""
    try:
        return b"json", _CANONICAL_ENCODER.encode(_JSON_DECODER.decode(body))
    except (msgspec.DecodeError, msgspec.EncodeError, RecursionError):
        # Not JSON (or too deep or too large a number for msgspec): the bytes as they came.
        return b"raw", body


def fingerprint(method: str, path: str, body: bytes) -> bytes:
    """SHA-256 (32 bytes) identifying a request: its method, path and body.

    A JSON body is decoded and re-encoded with sorted object keys and no whitespace, so key
    order and formatting do not change the fingerprint; values do (``1`` and ``1.0`` are
    different). A body that is not JSON is taken byte for byte. Every part is prefixed with
    its length, so no two different requests run together into the same input.
    """
    kind, canonical = _canonical_body(body)
    digest = hashlib.sha256(_DOMAIN)
    # surrogatepass: a path with a lone surrogate is fingerprinted, not refused here.
    texts = (method.encode("utf-8", "surrogatepass"), path.encode("utf-8", "surrogatepass"))
    for part in (*texts, kind, canonical):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    result = digest.digest()
    require(len(result) == FINGERPRINT_BYTES, "fingerprint is 32 bytes")
    return result


class KeyState(enum.StrEnum):
    in_flight = "in_flight"
    completed = "completed"


class StoredKey(msgspec.Struct, frozen=True, kw_only=True):
    """What is stored under a key: the claim, and once completed the response to replay.

    ``claimed_at_s`` is when the current holder claimed the key; ``status`` and ``body``
    are the HTTP response, set when ``state`` is completed.
    """

    fingerprint: bytes
    state: KeyState
    claimed_at_s: float
    status: int = 0
    body: bytes = b""


class Decision(enum.StrEnum):
    """What to do with a request carrying a key, given what is stored under it."""

    execute = "execute"  # nothing stored: claim the key and run the request
    replay = "replay"  # completed: answer with the stored status and body
    conflict_in_flight = "conflict_in_flight"  # the first request still runs: 409, retry
    mismatch = "mismatch"  # the key was used for a different request: 422
    take_over = "take_over"  # a claim older than the TTL: its holder died, claim it again


def decide(
    stored: StoredKey | None, fingerprint: bytes, now_s: float, claim_ttl_s: float
) -> Decision:
    """Decide what a request with ``fingerprint`` does, given what its key holds.

    In order: nothing stored, ``execute``; another fingerprint, ``mismatch`` whatever the
    state; completed, ``replay``; in flight for less than ``claim_ttl_s`` seconds,
    ``conflict_in_flight``; otherwise ``take_over``. Raises ``InvariantError`` if
    ``claim_ttl_s`` is not positive.
    """
    require(claim_ttl_s > 0, "idempotency claim_ttl_s > 0")
    if stored is None:
        return Decision.execute
    if stored.fingerprint != fingerprint:
        return Decision.mismatch
    if stored.state == KeyState.completed:
        return Decision.replay
    if now_s - stored.claimed_at_s < claim_ttl_s:
        return Decision.conflict_in_flight
    return Decision.take_over
