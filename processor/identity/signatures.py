"""Signed requests: HTTP Message Signatures (RFC 9421) with a client key, and their checks.

A bearer token says who is calling; it does not bind one request. A token copied from a
log or a proxy can send any request until it expires, and a request captured on the way
can be sent again. A client that holds a **client key** (an HMAC-SHA256 secret of one
tenant and subject, ``txproc keys create-client``) therefore signs each state-changing
request over its method, its target URI, a digest of its body (``Content-Digest``, RFC
9530) and its ``Authorization`` header, with the time it signed (``created``) and a
one-time ``nonce``. The server accepts a signature at most ``CREATED_AGE_S_MAX`` old and
``CREATED_AHEAD_S_MAX`` ahead of its clock, and each nonce of a key once (the edge keeps
the nonces it has seen: actors/edge/signatures.py), so a captured request is useless
after half a minute and cannot be replayed before.

Only what this needs is read, and everything else is refused rather than ignored: one
signature per request, exactly the four components ``COVERED_COMPONENTS`` (in any order,
without component parameters), the parameters ``created``, ``keyid``, ``nonce`` and
optionally ``alg`` (which must then be ``hmac-sha256``), and a ``Content-Digest`` holding
exactly one ``sha-256`` digest. The structured fields (RFC 8941) are parsed by the small
strict reader below, not a general one, so that no construct the checks do not look at
can pass through them.

Pure: the clock (``now_s``) and the randomness are arguments. Neither a secret nor a
signature is ever put into an exception message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import msgspec

from processor.errors import TxprocError, register

__all__ = [
    "CLIENT_SECRET_BYTES",
    "COVERED_COMPONENTS",
    "CREATED_AGE_S_MAX",
    "CREATED_AHEAD_S_MAX",
    "NONCE_CHARS_MAX",
    "NONCE_CHARS_MIN",
    "SIGNATURE_ALGORITHM",
    "SIGNATURE_CODES",
    "SIGNED_FIELDS",
    "ClientKey",
    "MessageSignature",
    "SignatureCode",
    "SignatureError",
    "content_digest",
    "new_client_key",
    "read_signature",
    "require_content_digest",
    "sign_request",
    "signature_base",
    "verify_signature",
]

SIGNATURE_ALGORITHM = "hmac-sha256"
# What a signature must cover, no more and no less: the request line (method and target
# URI), the body (through its digest) and the bearer token the request is sent with.
COVERED_COMPONENTS = ("@method", "@target-uri", "content-digest", "authorization")
# The header fields a verifier reads: the covered ones and the signature's own two.
SIGNED_FIELDS = ("signature-input", "signature", "content-digest", "authorization")
# The acceptance window of ``created`` (seconds since the Unix epoch) around the server's
# clock: a captured request is refused 30 s after it was signed; 5 s ahead allows for a
# client whose clock is a little fast.
CREATED_AGE_S_MAX = 30
CREATED_AHEAD_S_MAX = 5
# A nonce is chosen by the client, unique per key within the window. Short ones would
# collide (and a client's own requests would look like replays), long ones fill the store.
NONCE_CHARS_MIN = 16
NONCE_CHARS_MAX = 128
KEY_ID_CHARS_MAX = 128
CLIENT_SECRET_BYTES = 32
# Longer Signature-Input or Signature values are refused before they are parsed.
SIGNATURE_FIELD_CHARS_MAX = 2048
_KEY_ID_PREFIX = "ck_"
_KEY_ID_RANDOM_BYTES = 16
_DEFAULT_LABEL = "sig1"
_PARAMETERS = ("created", "keyid", "nonce", "alg")

SignatureCode = Literal[
    "signature_required", "signature_invalid", "signature_expired", "request_replayed"]
SIGNATURE_CODES: tuple[SignatureCode, ...] = (
    "signature_required", "signature_invalid", "signature_expired", "request_replayed")
register(401, {
    "signature_required": "this state-changing request needs a signature and carries none",
    "signature_invalid": "the request's signature cannot be read, names another key or "
                         "does not match",
    "signature_expired": "the signature's created is outside the accepted window; sign again",
    "request_replayed": "this client key's nonce was used before; sign every request anew",
})


class SignatureError(TxprocError):
    """A state-changing request whose signature is missing or does not hold (HTTP 401).

    ``code`` is one of ``SIGNATURE_CODES``: ``signature_required`` (the server wants one
    and there is none), ``signature_invalid`` (malformed, another key or principal, a
    component not covered, a wrong signature or body), ``signature_expired`` (``created``
    outside the window) or ``request_replayed`` (the key's nonce was seen before).
    ``message`` names the rule, never a secret or a value the client sent.
    """

    code: SignatureCode

    def __init__(self, code: SignatureCode, message: str) -> None:
        super().__init__(message, code=code)


def _invalid(message: str) -> SignatureError:
    return SignatureError("signature_invalid", message)


class ClientKey(msgspec.Struct, frozen=True, kw_only=True):
    """A client key: ``secret`` signs the requests of ``subject`` of ``tenant``."""

    key_id: str
    tenant: str
    subject: str
    secret: bytes

    def __repr__(self) -> str:
        # The secret stays out of logs and tracebacks.
        return (f"ClientKey(key_id={self.key_id!r}, tenant={self.tenant!r}, "
                f"subject={self.subject!r})")


def new_client_key(tenant: str, subject: str, *,
                   random_bytes: Callable[[int], bytes]) -> ClientKey:
    """A new key of ``subject`` of ``tenant``: an id ``ck_`` + 32 hex digits and a secret
    of ``CLIENT_SECRET_BYTES``, both from ``random_bytes`` (``secrets.token_bytes``)."""
    key_id_bytes = random_bytes(_KEY_ID_RANDOM_BYTES)
    secret = random_bytes(CLIENT_SECRET_BYTES)
    if len(key_id_bytes) != _KEY_ID_RANDOM_BYTES or len(secret) != CLIENT_SECRET_BYTES:
        raise ValueError("random_bytes(n) must return n bytes")
    return ClientKey(key_id=_KEY_ID_PREFIX + key_id_bytes.hex(), tenant=tenant,
                     subject=subject, secret=secret)


class MessageSignature(msgspec.Struct, frozen=True, kw_only=True):
    """One signature of a request as read from ``Signature-Input`` and ``Signature``.

    ``components`` are in the order the signer covered them; ``parameters`` are the
    signature parameters in the signer's order (the signature base repeats them so);
    ``created_s`` is seconds since the Unix epoch.
    """

    label: str
    components: tuple[str, ...]
    parameters: tuple[tuple[str, int | str], ...]
    key_id: str
    created_s: int
    nonce: str
    value: bytes

    def __repr__(self) -> str:
        return (f"MessageSignature(label={self.label!r}, key_id={self.key_id!r}, "
                f"created_s={self.created_s})")


# ---------------------------------------------------------------------------------------
# Signing (the client's side) and the signature base both sides compute.


def content_digest(body: bytes) -> str:
    """The ``Content-Digest`` field value of ``body`` (RFC 9530): its SHA-256, as
    ``sha-256=:<base64>:``."""
    return f"sha-256=:{base64.b64encode(hashlib.sha256(body).digest()).decode()}:"


def signature_base(values: Iterable[tuple[str, str]],
                   parameters: Iterable[tuple[str, int | str]]) -> bytes:
    """The signature base (RFC 9421, section 2.5) of the covered components ``values``
    (each its identifier and value, in the order covered) and the signature
    ``parameters``: one line per component, then the ``@signature-params`` line. Raises
    ``SignatureError`` (``signature_invalid``) for a value that is not ASCII or holds a
    line break (the base would then be ambiguous)."""
    values = list(values)
    lines = []
    for name, value in values:
        if not value.isascii() or "\n" in value or "\r" in value:
            raise _invalid(f"the value of {name} cannot be signed: not ASCII, or a line break")
        lines.append(f"{_string(name)}: {value}")
    lines.append(f'"@signature-params": {_signature_params([n for n, _ in values], parameters)}')
    return "\n".join(lines).encode("ascii")


def sign_request(method: str, url: str, headers: Mapping[str, str], body: bytes, *,
                 key_id: str, secret: bytes, created_s: int, nonce: str,
                 label: str = _DEFAULT_LABEL) -> dict[str, str]:
    """The header fields that sign a request: ``Content-Digest``, ``Signature-Input`` and
    ``Signature``, to be set on it (replacing any of the same names).

    ``url`` is the absolute URL the request is sent to (its ``@target-uri``), ``headers``
    its header fields (looked up without regard to case; they must hold the
    ``Authorization`` it is sent with), ``body`` its exact bytes. ``created_s`` is the
    signing time in seconds since the Unix epoch, ``nonce`` a fresh random string of
    ``NONCE_CHARS_MIN`` to ``NONCE_CHARS_MAX`` characters. Raises ``ValueError`` for a
    missing Authorization, a relative URL, or a key id, nonce or label that cannot be
    sent."""
    authorization = _field(headers, "authorization")
    if authorization is None:
        raise ValueError("a signed request must carry its Authorization header")
    if "://" not in url:
        raise ValueError("the URL must be absolute (scheme and host)")
    _check_key_id(key_id, ValueError)
    _check_nonce(nonce, ValueError)
    if _KEY.fullmatch(label) is None:
        raise ValueError("the label must be a structured-field key (a-z, 0-9, _-.*)")
    digest = content_digest(body)
    parameters: tuple[tuple[str, int | str], ...] = (
        ("created", created_s), ("keyid", key_id), ("nonce", nonce),
        ("alg", SIGNATURE_ALGORITHM))
    values = dict(zip(COVERED_COMPONENTS, (method, url, digest, authorization), strict=True))
    base = signature_base(values.items(), parameters)
    value = hmac.new(secret, base, hashlib.sha256).digest()
    return {
        "Content-Digest": digest,
        "Signature-Input": f"{label}={_signature_params(COVERED_COMPONENTS, parameters)}",
        "Signature": f"{label}=:{base64.b64encode(value).decode()}:",
    }


def _field(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


# ---------------------------------------------------------------------------------------
# Verifying (the server's side), in the order the edge checks: read the signature, verify
# it with its key (the key's principal must be the token's), check its age; once the body
# is read, its digest; last (actors/edge/signatures.py) the nonce.


def read_signature(fields: Mapping[str, str]) -> MessageSignature:
    """The one signature of a request whose header fields are ``fields`` (lower-case
    names, each the field's lines joined by ``", "``). Raises ``SignatureError``
    (``signature_invalid``) for anything but one well-formed signature over exactly
    ``COVERED_COMPONENTS`` with the parameters this module knows."""
    signature_input = fields.get("signature-input")
    signature = fields.get("signature")
    if signature_input is None or signature is None:
        raise _invalid("a signed request carries both Signature-Input and Signature")
    if max(len(signature_input), len(signature)) > SIGNATURE_FIELD_CHARS_MAX:
        raise _invalid(f"Signature-Input and Signature are at most "
                       f"{SIGNATURE_FIELD_CHARS_MAX} characters")
    label, components, parameters = _read_signature_input(signature_input)
    value_label, value = _read_signature_value(signature)
    if value_label != label:
        raise _invalid("Signature and Signature-Input must name the same one signature")
    if sorted(components) != sorted(COVERED_COMPONENTS):
        raise _invalid("the signature must cover exactly " + " ".join(COVERED_COMPONENTS))
    named = dict(parameters)
    if len(named) != len(parameters) or not set(named) <= set(_PARAMETERS):
        raise _invalid("the signature parameters are created, keyid, nonce and alg, each "
                       "at most once")
    created_s, key_id, nonce = named.get("created"), named.get("keyid"), named.get("nonce")
    if not isinstance(created_s, int) or created_s < 0:
        raise _invalid("the signature needs created, a non-negative integer")
    if not isinstance(key_id, str) or not isinstance(nonce, str):
        raise _invalid("the signature needs keyid and nonce, as strings")
    if named.get("alg", SIGNATURE_ALGORITHM) != SIGNATURE_ALGORITHM:
        raise _invalid(f"the only algorithm is {SIGNATURE_ALGORITHM}")
    _check_key_id(key_id, _invalid)
    _check_nonce(nonce, _invalid)
    return MessageSignature(label=label, components=components, parameters=parameters,
                            key_id=key_id, created_s=created_s, nonce=nonce, value=value)


def verify_signature(signature: MessageSignature, *, method: str, target_uri: str,
                     fields: Mapping[str, str], keys: Mapping[str, ClientKey], tenant: str,
                     subject: str, now_s: float) -> ClientKey:
    """The key that made ``signature`` over this request, which must be a key in ``keys``
    (those not revoked) of the caller's ``tenant`` and ``subject`` (the bearer token's),
    signed no more than ``CREATED_AGE_S_MAX`` before ``now_s`` and no more than
    ``CREATED_AHEAD_S_MAX`` after it. ``target_uri`` is the request's absolute URI as the
    server received it. Raises ``SignatureError``: ``signature_invalid``, or
    ``signature_expired`` for an authentic signature outside the window."""
    key = keys.get(signature.key_id)
    if key is None:
        raise _invalid("the keyid names no client key, or a revoked one")
    if (key.tenant, key.subject) != (tenant, subject):
        raise _invalid("the client key belongs to another principal than the bearer token")
    derived = {"@method": method, "@target-uri": target_uri}
    values = []
    for name in signature.components:
        value = derived[name] if name in derived else fields.get(name)
        if value is None:
            raise _invalid(f"the signature covers {name}, which the request does not carry")
        values.append((name, value))
    expected = hmac.new(key.secret, signature_base(values, signature.parameters),
                        hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature.value):
        raise _invalid("the signature does not match the request")
    if now_s - signature.created_s > CREATED_AGE_S_MAX:
        raise SignatureError("signature_expired",
                             f"the signature is more than {CREATED_AGE_S_MAX} s old")
    if signature.created_s - now_s > CREATED_AHEAD_S_MAX:
        raise SignatureError("signature_expired", f"the signature was created more than "
                             f"{CREATED_AHEAD_S_MAX} s ahead of the server's clock")
    return key


def require_content_digest(field: str | None, body: bytes) -> None:
    """Raise ``SignatureError`` (``signature_invalid``) unless the ``Content-Digest``
    value ``field`` holds exactly one digest, ``sha-256``, and it is that of ``body``."""
    if field is None:
        raise _invalid("a signed request carries Content-Digest")
    reader = _Reader(field)
    name = reader.key()
    reader.expect("=")
    digest = reader.byte_sequence()
    reader.end("Content-Digest holds exactly one digest, sha-256")
    if name != "sha-256":
        raise _invalid("Content-Digest holds exactly one digest, sha-256")
    if not hmac.compare_digest(digest, hashlib.sha256(body).digest()):
        raise _invalid("the body does not match its Content-Digest")


def _check_key_id(key_id: str, error: Callable[[str], Exception]) -> None:
    if not 1 <= len(key_id) <= KEY_ID_CHARS_MAX or _STRING_CHARS.fullmatch(key_id) is None:
        raise error(f"a keyid is 1 to {KEY_ID_CHARS_MAX} printable ASCII characters")


def _check_nonce(nonce: str, error: Callable[[str], Exception]) -> None:
    if (not NONCE_CHARS_MIN <= len(nonce) <= NONCE_CHARS_MAX
            or _STRING_CHARS.fullmatch(nonce) is None):
        raise error(f"a nonce is {NONCE_CHARS_MIN} to {NONCE_CHARS_MAX} printable ASCII "
                    "characters")


# ---------------------------------------------------------------------------------------
# Structured fields (RFC 8941): the few shapes read here, strictly, and their serialization.

_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]{0,63}")
_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\\"])*)"')
_STRING_CHARS = re.compile(r"[\x20-\x7e]*")
_INTEGER = re.compile(r"-?[0-9]{1,15}")
_BYTES = re.compile(r":([A-Za-z0-9+/=]*):")
_ESCAPE = re.compile(r"\\(.)")


def _string(text: str) -> str:
    """``text`` serialized as an sf-string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _signature_params(components: Iterable[str],
                      parameters: Iterable[tuple[str, int | str]]) -> str:
    """The inner list of covered components with the signature parameters, serialized
    (the ``@signature-params`` value and a Signature-Input member's value)."""
    inner = " ".join(_string(name) for name in components)
    params = "".join(f";{key}={value if isinstance(value, int) else _string(value)}"
                     for key, value in parameters)
    return f"({inner}){params}"


def _read_signature_input(text: str) -> tuple[str, tuple[str, ...],
                                               tuple[tuple[str, int | str], ...]]:
    """``label=("component" ...);param=value...``: one dictionary member whose value is
    an inner list of sf-strings without parameters, followed by integer or string
    parameters."""
    reader = _Reader(text)
    label = reader.key()
    reader.expect("=")
    reader.expect("(")
    components: list[str] = []
    while True:
        reader.spaces()
        if reader.take(")"):
            break
        if components and not reader.separated:
            raise _invalid("Signature-Input: the components are separated by spaces")
        components.append(reader.string())
        if reader.peek(";"):
            raise _invalid("Signature-Input: components take no parameters here")
    parameters: list[tuple[str, int | str]] = []
    while reader.take(";"):
        reader.spaces()
        name = reader.key()
        reader.expect("=")
        parameters.append((name, reader.bare_item()))
    reader.end("Signature-Input holds exactly one signature")
    return label, tuple(components), tuple(parameters)


def _read_signature_value(text: str) -> tuple[str, bytes]:
    """``label=:base64:``: one dictionary member, a byte sequence without parameters."""
    reader = _Reader(text)
    label = reader.key()
    reader.expect("=")
    value = reader.byte_sequence()
    reader.end("Signature holds exactly one signature, without parameters")
    return label, value


class _Reader:
    """A cursor over one field value. Leading and trailing spaces of the value are
    dropped (RFC 8941, section 4.2); everything else must be where the caller expects
    it, or ``signature_invalid`` is raised."""

    def __init__(self, text: str) -> None:
        self._text = text.strip(" ")
        self._at = 0
        self.separated = False

    def peek(self, char: str) -> bool:
        return self._text.startswith(char, self._at)

    def take(self, char: str) -> bool:
        if self.peek(char):
            self._at += len(char)
            return True
        return False

    def expect(self, char: str) -> None:
        if not self.take(char):
            raise _invalid(f"a structured field is malformed: {char!r} expected")

    def spaces(self) -> None:
        start = self._at
        while self._text.startswith(" ", self._at):
            self._at += 1
        self.separated = self._at > start

    def end(self, rule: str) -> None:
        if self._at != len(self._text):
            raise _invalid(rule)

    def _match(self, pattern: re.Pattern[str], what: str) -> re.Match[str]:
        match = pattern.match(self._text, self._at)
        if match is None:
            raise _invalid(f"a structured field is malformed: {what} expected")
        self._at = match.end()
        return match

    def key(self) -> str:
        return self._match(_KEY, "a key").group(0)

    def string(self) -> str:
        text = self._match(_STRING, "a string").group(1)
        return _ESCAPE.sub(r"\1", text) if "\\" in text else text

    def bare_item(self) -> int | str:
        if self.peek('"'):
            return self.string()
        return int(self._match(_INTEGER, "an integer or a string").group(0))

    def byte_sequence(self) -> bytes:
        encoded = self._match(_BYTES, "a byte sequence").group(1)
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise _invalid("a byte sequence is not base64") from exc
