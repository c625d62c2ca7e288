"""Bearer tokens for the HTTP API and the RPC protocol: HS256 JWTs signed with a local key.

A token carries a tenant (``ten``: the client platform whose accounts it may move), a
subject (``sub``: the principal within that tenant), a token id (``jti``), an audience
(``aud``, always ``txproc``), a set of scopes and an expiry; its header names the signing
key (``kid``: a fingerprint of the key, so a token signed with another key is refused before
its signature is computed). A verifier holds several keys by kid (a key ring,
processor/identity/keyring.py: the active key signs, older ones still verify until they are
retired). The clock is always injected
(``now_s``, whole seconds since the Unix epoch), so expiry is evaluated against the caller's
clock and never against the wall clock that pyjwt would otherwise read.

The algorithm is pinned to HS256 on both sides: a token whose header names another algorithm
(including ``none``) is refused as ``token_invalid`` before its payload is looked at.

Neither the key nor a token is ever logged or put into an exception message.
"""

from __future__ import annotations

import contextlib
import hashlib
import pathlib
import secrets
from collections.abc import Iterable, Mapping

import jwt
import msgspec

from processor.errors import TxprocError, register
from processor.identity.keyfile import KeyFileError, read_private_file, write_private_file

__all__ = [
    "ALGORITHM",
    "AUDIENCE",
    "AUTH_CODES",
    "DEFAULT_TENANT",
    "KEY_BYTES",
    "KEY_FILE_NAME",
    "PROCESSOR_TENANT",
    "SCOPES",
    "SYSTEM_SCOPES",
    "TOKEN_TTL_S_DEFAULT",
    "TOKEN_TTL_S_MAX",
    "AuthError",
    "Claims",
    "ScopeError",
    "bearer_token",
    "issue_token",
    "key_id",
    "load_or_create_key",
    "principal_of",
    "read_key",
    "require_scope",
    "tenant_of_principal",
    "tenant_slot",
    "verify_token",
]

SCOPES = (
    "accounts:read", "accounts:write", "transfers:read", "transfers:write",
    "payments:read", "payments:write", "payouts:write", "events:read",
    "webhooks:read", "webhooks:write", "disputes:write", "audit:read",
    # Settlement reconciliation: operators' scopes (every provider's report, all tenants).
    "reconciliation:read", "reconciliation:write",
)
# Known, but granted only when asked for by name: ids in the processor's own range
# (processor/reserved.py); the payments actor's token holds it.
SYSTEM_SCOPES = ("ledger:system",)
TOKEN_TTL_S_DEFAULT = 900
# A revocation (processor/identity/revocation.py) is kept this long by default, so no
# token lives longer than this unless the issuer is configured higher: 24 hours.
TOKEN_TTL_S_MAX = 24 * 3600
AUDIENCE = "txproc"
DEFAULT_TENANT = "default"
# The tenant slot of the processor itself: its own accounts (clearing, fees) carry it, and
# a token holding ``ledger:system`` acts as it, which may touch any tenant's account.
PROCESSOR_TENANT = 0
_SLOT_MASK = 2**63 - 1
_NAME_CHARS_MAX = 128
KEY_FILE_NAME = "jwt.key"
ALGORITHM = "HS256"
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
KEY_BYTES = 32

_SCOPES_KNOWN = frozenset(SCOPES) | frozenset(SYSTEM_SCOPES)
_SYSTEM = frozenset(SYSTEM_SCOPES)

# pyjwt checks only the signature and the presence of the claims; exp and iat are checked
# below against the injected clock, because pyjwt would compare them to the wall clock.
_JWT = jwt.PyJWT(
    options={
        "verify_signature": True,
        "verify_exp": False,
        "verify_iat": False,
        "verify_nbf": False,
        "verify_aud": False,
        "verify_iss": False,
        "require": ["exp", "iat", "sub", "ten", "jti", "aud"],
        "enforce_minimum_key_length": True,
    }
)


class _Payload(msgspec.Struct, frozen=True):
    """The claims this module writes; other claims in a token are ignored."""

    sub: str
    ten: str
    jti: str
    aud: str
    scope: str
    iat: int
    exp: int


AUTH_CODES = register(401, {
    "token_missing": "no Authorization header, another scheme than Bearer, or no token",
    "token_invalid": "the token's signature, algorithm, claims or signing key are not valid",
    "token_expired": "the token's expiry has passed",
    "token_revoked": "the token was revoked; get a new one",
})
register(403, {"scope_missing": "the token is valid but lacks the operation's scope"})


class AuthError(TxprocError):
    """The request carries no usable token (HTTP 401).

    ``code`` is one of ``AUTH_CODES``: ``token_missing``, ``token_invalid``,
    ``token_expired`` and ``token_revoked``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class ScopeError(TxprocError):
    """The token is valid but lacks the scope the operation needs (HTTP 403)."""

    code = "scope_missing"

    def __init__(self, scope: str) -> None:
        super().__init__(f"the token lacks the scope {scope!r}")
        self.scope = scope


class Claims(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified token grants: ``expires_at_s`` is seconds since the Unix epoch.

    ``tenant_slot`` is the number the ledger stores with each account and transfer of the
    tenant (``tenant_slot``), or ``PROCESSOR_TENANT`` for a token holding a system scope.
    ``key_id`` names the key that signed the token and ``issued_at_s`` is its ``iat``: an
    edge checks both on every request, against retired keys and revocations.
    """

    subject: str
    scopes: frozenset[str]
    expires_at_s: int
    tenant: str = DEFAULT_TENANT
    token_id: str = ""
    key_id: str = ""
    issued_at_s: int = 0

    @property
    def tenant_slot(self) -> int:
        if self.scopes & _SYSTEM:
            return PROCESSOR_TENANT
        return tenant_slot(self.tenant)


def tenant_slot(name: str) -> int:
    """The ledger's number for tenant ``name``: the first 63 bits of its BLAKE2b digest,
    never 0 (``PROCESSOR_TENANT``).

    Deterministic, so every front and node agrees without a registry; two tenant names
    share a slot with probability about n^2 / 2^64 for n tenants (docs/security.md).
    """
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8, person=b"txproc.tenant")
    return (int.from_bytes(digest.digest(), "big") & _SLOT_MASK) or 1


def principal_of(claims: Claims) -> str:
    """The caller as the payments domain records it: ``<tenant slot>/<subject>``. Keys are
    scoped by it (two principals never share an Idempotency-Key); payments are visible to
    every principal with the same slot (``tenant_of_principal``)."""
    return f"{claims.tenant_slot}/{claims.subject}"


def tenant_of_principal(principal: str) -> int:
    """The tenant slot of a ``principal_of`` string. Raises ValueError for another form."""
    slot, separator, subject = principal.partition("/")
    if not separator or not subject or not slot.isdigit():
        raise ValueError("a principal is <tenant slot>/<subject>")
    return int(slot)


def key_id(key: bytes) -> str:
    """The id a token's header names its signing key by: a fingerprint, not the key."""
    return hashlib.sha256(b"txproc.kid" + key).hexdigest()[:16]


def _check_name(what: str, value: str) -> None:
    if not value or len(value) > _NAME_CHARS_MAX or not value.isprintable() \
            or any(c.isspace() for c in value):
        raise ValueError(f"{what} must be 1..{_NAME_CHARS_MAX} printable characters "
                         "without spaces")


def load_or_create_key(path: pathlib.Path) -> bytes:
    """Return the signing key stored at ``path``, creating it with mode 0600 if absent.

    The key is 32 random bytes from ``secrets``. Creation is atomic: the key is written and
    synced to a private temporary file that is then hard-linked into place, so a concurrent
    reader sees either no file or the whole key, and two racing creators agree on one key.

    Raises ``KeyFileError`` (a ``ValueError``) if an existing file is shorter than 32 bytes,
    a symbolic link, owned by another user or readable by the group or others
    (processor/identity/keyfile.py), and ``OSError`` if the file cannot be read or created.
    """
    for _attempt in range(2):
        with contextlib.suppress(FileNotFoundError):
            return _read_key(path)
        _create_key(path)
    # The file was created and then removed between our create and read: someone else is
    # managing it, which is not a race to settle by looping.
    raise OSError(f"the key file {path} vanished while it was being created")


def read_key(path: pathlib.Path) -> bytes:
    """The key stored at ``path``, never created: for keys an operator makes once and every
    node shares. Raises ``FileNotFoundError`` if there is none, and ``KeyFileError`` as
    ``load_or_create_key`` does."""
    return _read_key(path)


def _read_key(path: pathlib.Path) -> bytes:
    key = read_private_file(path)
    if len(key) < KEY_BYTES:
        raise KeyFileError(f"the key file {path} holds fewer than {KEY_BYTES} bytes")
    return key


def _create_key(path: pathlib.Path) -> None:
    # Linked into place, never renamed over: a key created by a racing process is kept.
    write_private_file(path, secrets.token_bytes(KEY_BYTES), replace=False)


def issue_token(
    key: bytes,
    scopes: Iterable[str],
    *,
    ttl_s: int,
    now_s: int,
    subject: str = "local",
    tenant: str = DEFAULT_TENANT,
    token_id: str | None = None,
    ttl_s_max: int = TOKEN_TTL_S_MAX,
) -> str:
    """Return an HS256 JWT for ``subject`` of ``tenant`` granting ``scopes``, valid for
    ``ttl_s`` seconds; ``token_id`` (the ``jti``) is 128 random bits unless given.

    Raises ``ValueError`` for an unknown scope, ``ttl_s`` outside 1..``ttl_s_max``, a
    subject or tenant that is empty, longer than 128 characters or holds spaces, or a key
    shorter than 32 bytes.
    """
    granted = frozenset(scopes)
    unknown = granted - _SCOPES_KNOWN
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known scopes are {list(SCOPES)}")
    if not 0 < ttl_s <= ttl_s_max:
        raise ValueError(f"ttl_s must be within 1..{ttl_s_max}, got {ttl_s}")
    _check_name("subject", subject)
    _check_name("tenant", tenant)
    if len(key) < KEY_BYTES:
        raise ValueError(f"the key must hold at least {KEY_BYTES} bytes")
    payload = _Payload(sub=subject, ten=tenant, jti=token_id or secrets.token_hex(16),
                       aud=AUDIENCE, scope=" ".join(sorted(granted)), iat=now_s,
                       exp=now_s + ttl_s)
    return jwt.encode(msgspec.to_builtins(payload), key, algorithm=ALGORITHM,
                      headers={"kid": key_id(key)})


def verify_token(keys: bytes | Mapping[str, bytes], token: str, *, now_s: int) -> Claims:
    """Return the claims of ``token`` if it is signed with one of ``keys`` and unexpired at
    ``now_s``.

    ``keys`` maps key ids (``key_id``) to the keys that may verify (a key ring's
    ``verifying``); a single key stands for a ring of one. The header's ``kid`` picks the
    key; an unknown kid (a retired key's included) is refused before any signature is
    computed. A token is expired from its ``exp`` second on (RFC 7519 section 4.1.4). Scopes
    unknown to this version are dropped rather than refused, so that a newer issuer's token
    still grants what this version understands.

    Raises ``AuthError`` with code ``token_invalid`` (unknown key, bad signature, other
    algorithm, missing or malformed claims, garbage) or ``token_expired``.
    """
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        if not isinstance(kid, str):
            raise AuthError("token_invalid", "the token names no signing key")
        if isinstance(keys, bytes):
            key = keys if kid == key_id(keys) else None
        else:
            key = keys.get(kid)
        if key is None:
            raise AuthError("token_invalid", "the token is not signed with a known key")
        raw = _JWT.decode(token, key, algorithms=[ALGORITHM])
        payload = msgspec.convert(raw, _Payload)
    except (jwt.InvalidTokenError, msgspec.ValidationError) as exc:
        # The exception text is kept out of the message: it may quote parts of the token.
        raise AuthError("token_invalid", "the token is not a valid token") from exc
    if payload.aud != AUDIENCE:
        raise AuthError("token_invalid", "the token is meant for another audience")
    if not payload.ten or not payload.sub:
        raise AuthError("token_invalid", "the token names no tenant or subject")
    if payload.exp <= payload.iat:
        raise AuthError("token_invalid", "the token expires before it was issued")
    if now_s >= payload.exp:
        raise AuthError("token_expired", "the token has expired")
    scopes = frozenset(payload.scope.split()) & _SCOPES_KNOWN
    return Claims(subject=payload.sub, scopes=scopes, expires_at_s=payload.exp,
                  tenant=payload.ten, token_id=payload.jti, key_id=kid,
                  issued_at_s=payload.iat)


def require_scope(claims: Claims, scope: str) -> None:
    """Raise ``ScopeError`` unless ``claims`` grant ``scope``."""
    if scope not in claims.scopes:
        raise ScopeError(scope)


def bearer_token(header_value: str | None) -> str:
    """Return the token of an ``Authorization: Bearer <token>`` header value.

    The scheme is matched case-insensitively (RFC 7235 section 2.1). Raises ``AuthError``
    with code ``token_missing`` if the header is absent, names another scheme or carries no
    token, and ``token_invalid`` if the token part contains whitespace.
    """
    if header_value is None:
        raise AuthError("token_missing", "the Authorization header is missing")
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("token_missing", "the Authorization header is not a Bearer token")
    token = token.strip()
    if not token:
        raise AuthError("token_missing", "the Authorization header carries no token")
    if any(character.isspace() for character in token):
        raise AuthError("token_invalid", "the token must not contain whitespace")
    return token
