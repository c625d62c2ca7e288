"""Tests of processor.identity: issuing, verifying and scoping HS256 bearer tokens."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import stat

import jwt
import pytest

from processor.identity import (
    KEY_FILE_NAME,
    PROCESSOR_TENANT,
    SCOPES,
    TOKEN_TTL_S_DEFAULT,
    TOKEN_TTL_S_MAX,
    AuthError,
    Claims,
    ScopeError,
    bearer_token,
    issue_token,
    key_id,
    load_or_create_key,
    require_scope,
    tenant_slot,
    verify_token,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW_S = 1_700_000_000
# Every claim a valid token carries, for tests that forge tokens by hand.
VALID = {"sub": "local", "ten": "default", "jti": "j1", "aud": "txproc",
         "scope": "accounts:read", "iat": NOW_S, "exp": NOW_S + 60}


def _signed(claims: dict[str, object], key: bytes = KEY, **kw: object) -> str:
    """A token over ``claims`` signed as the issuer signs (HS256, its key's kid)."""
    return jwt.encode(claims, key, algorithm="HS256", headers={"kid": key_id(key), **kw})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _auth_code(key: bytes, token: str, now_s: int = NOW_S) -> str:
    with pytest.raises(AuthError) as info:
        verify_token(key, token, now_s=now_s)
    return info.value.code


def test_round_trip_returns_the_issued_claims() -> None:
    """A token issued with some scopes verifies to exactly those scopes, subject and expiry."""
    token = issue_token(
        KEY, ["accounts:read", "transfers:write"], ttl_s=60, now_s=NOW_S, subject="gateway-1"
    )
    claims = verify_token(KEY, token, now_s=NOW_S + 59)
    assert claims == Claims(
        subject="gateway-1",
        scopes=frozenset({"accounts:read", "transfers:write"}),
        expires_at_s=NOW_S + 60,
        tenant="default",
        token_id=claims.token_id,
        key_id=key_id(KEY),
        issued_at_s=NOW_S,
    )
    assert len(claims.token_id) == 32


def test_tenant_and_token_id_travel_in_the_token() -> None:
    """The tenant, subject and jti given at issue come back; two tokens differ in jti."""
    first = verify_token(KEY, issue_token(KEY, SCOPES, ttl_s=60, now_s=NOW_S, tenant="acme",
                                          subject="ops", token_id="t-1"), now_s=NOW_S)
    assert (first.tenant, first.subject, first.token_id) == ("acme", "ops", "t-1")
    assert first.tenant_slot == tenant_slot("acme") != tenant_slot("default")
    a = verify_token(KEY, issue_token(KEY, SCOPES, ttl_s=60, now_s=NOW_S), now_s=NOW_S)
    b = verify_token(KEY, issue_token(KEY, SCOPES, ttl_s=60, now_s=NOW_S), now_s=NOW_S)
    assert a.token_id != b.token_id


def test_tenant_slot_is_stable_and_never_the_processors() -> None:
    """Slots are fixed numbers (stored with every row), 63-bit, never 0; a system token
    acts as the processor whatever tenant it names."""
    assert tenant_slot("default") == 538834666855030335  # migration 0009 relies on it
    slots = {tenant_slot(f"tenant-{i}") for i in range(2000)}
    assert len(slots) == 2000 and all(0 < s < 2**63 for s in slots)
    system = verify_token(KEY, issue_token(KEY, ["ledger:system"], ttl_s=60, now_s=NOW_S,
                                           tenant="acme"), now_s=NOW_S)
    assert system.tenant_slot == PROCESSOR_TENANT


@pytest.mark.parametrize("name", ["", "a b", "x" * 129, "tab\t", "nl\n"])
def test_bad_tenant_or_subject_refused_at_issue(name: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        issue_token(KEY, SCOPES, ttl_s=60, now_s=NOW_S, tenant=name)
    with pytest.raises(ValueError, match="subject"):
        issue_token(KEY, SCOPES, ttl_s=60, now_s=NOW_S, subject=name)


def test_kid_and_audience_are_checked() -> None:
    """A token naming another key id, or meant for another audience, is refused even when
    its signature is right; a hand-signed token with every claim verifies."""
    assert verify_token(KEY, _signed(VALID), now_s=NOW_S).tenant == "default"
    assert _auth_code(KEY, _signed(VALID, kid="0" * 16)) == "token_invalid"
    assert _auth_code(KEY, jwt.encode(VALID, KEY, algorithm="HS256")) == "token_invalid"
    assert _auth_code(KEY, _signed({**VALID, "aud": "other"})) == "token_invalid"


def test_expired_from_the_exp_second_on() -> None:
    """A token is valid up to the second before exp and expired at exp and after, per now_s."""
    token = issue_token(KEY, SCOPES, ttl_s=TOKEN_TTL_S_DEFAULT, now_s=NOW_S)
    verify_token(KEY, token, now_s=NOW_S + TOKEN_TTL_S_DEFAULT - 1)
    assert _auth_code(KEY, token, NOW_S + TOKEN_TTL_S_DEFAULT) == "token_expired"
    assert _auth_code(KEY, token, NOW_S + 10 * TOKEN_TTL_S_DEFAULT) == "token_expired"


def test_forged_signature_is_invalid() -> None:
    """A token whose signature bytes were replaced is refused as token_invalid."""
    token = issue_token(KEY, SCOPES, ttl_s=60, now_s=NOW_S)
    header, payload, _signature = token.split(".")
    forged = f"{header}.{payload}.{_b64(b'x' * 32)}"
    assert _auth_code(KEY, forged) == "token_invalid"


def test_token_signed_with_another_key_is_invalid() -> None:
    """A well-formed token signed with another key is refused as token_invalid."""
    token = issue_token(OTHER_KEY, SCOPES, ttl_s=60, now_s=NOW_S)
    assert _auth_code(KEY, token) == "token_invalid"


def test_tampered_payload_is_invalid() -> None:
    """Widening the scopes in the payload while keeping the signature is refused."""
    token = issue_token(KEY, ["accounts:read"], ttl_s=60, now_s=NOW_S)
    header, payload, signature = token.split(".")
    claims = json.loads(_unb64(payload))
    claims["scope"] = " ".join(SCOPES)
    tampered = f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
    assert _auth_code(KEY, tampered) == "token_invalid"


def test_alg_none_is_invalid() -> None:
    """An unsigned token (alg none) with otherwise valid claims is refused."""
    claims = {**VALID, "scope": " ".join(SCOPES)}
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": key_id(KEY)})
    assert _auth_code(KEY, unsigned) == "token_invalid"
    header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": key_id(KEY)}).encode())
    handmade = f"{header}.{_b64(json.dumps(claims).encode())}."
    assert _auth_code(KEY, handmade) == "token_invalid"


def test_other_hmac_algorithm_is_invalid() -> None:
    """A token correctly signed with the right key but HS512 is refused: HS256 is pinned."""
    claims = {**VALID, "scope": " ".join(SCOPES)}
    token = jwt.encode(claims, KEY + KEY, algorithm="HS512",
                       headers={"kid": key_id(KEY + KEY)})
    assert _auth_code(KEY + KEY, token) == "token_invalid"


@pytest.mark.parametrize(
    "claims",
    [
        {k: v for k, v in VALID.items() if k != "exp"},
        {k: v for k, v in VALID.items() if k != "iat"},
        {k: v for k, v in VALID.items() if k != "sub"},
        {k: v for k, v in VALID.items() if k != "scope"},
        {k: v for k, v in VALID.items() if k != "ten"},
        {k: v for k, v in VALID.items() if k != "jti"},
        {k: v for k, v in VALID.items() if k != "aud"},
        {**VALID, "ten": ""},
        {**VALID, "exp": "later"},
        {**VALID, "exp": True},
        {**VALID, "iat": NOW_S + 60},
    ],
    ids=["no_exp", "no_iat", "no_sub", "no_scope", "no_ten", "no_jti", "no_aud", "empty_ten",
         "exp_text", "exp_bool", "exp_not_after_iat"],
)
def test_missing_or_malformed_claims_are_invalid(claims: dict[str, object]) -> None:
    """A correctly signed token without exp, iat, sub, scope, ten, jti or aud, or with bad
    types, is refused."""
    token = _signed(claims)
    assert _auth_code(KEY, token) == "token_invalid"


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "...", "eyJ.eyJ.x"])
def test_garbage_is_invalid(token: str) -> None:
    """Strings that are not JWTs at all are refused as token_invalid, not crashes."""
    assert _auth_code(KEY, token) == "token_invalid"


def test_wrong_scope_raises_scope_error() -> None:
    """A valid token lacking the operation's scope raises ScopeError naming that scope."""
    claims = verify_token(
        KEY, issue_token(KEY, ["accounts:read"], ttl_s=60, now_s=NOW_S), now_s=NOW_S
    )
    require_scope(claims, "accounts:read")
    with pytest.raises(ScopeError) as info:
        require_scope(claims, "transfers:write")
    assert info.value.code == "scope_missing"
    assert info.value.scope == "transfers:write"


def test_unknown_scope_refused_at_issue() -> None:
    """Issuing a token with a scope this version does not know raises ValueError."""
    with pytest.raises(ValueError, match="unknown scopes"):
        issue_token(KEY, ["accounts:read", "admin"], ttl_s=60, now_s=NOW_S)


@pytest.mark.parametrize("ttl_s", [0, -1, 24 * 3600 + 1, 10**12])
def test_non_positive_or_unbounded_ttl_refused_at_issue(ttl_s: int) -> None:
    """A token that would be born expired, or outlive 24 hours (it cannot be revoked before
    it expires), is refused at issue, unless the issuer is configured for longer."""
    assert TOKEN_TTL_S_MAX == 24 * 3600
    with pytest.raises(ValueError, match="ttl_s"):
        issue_token(KEY, SCOPES, ttl_s=ttl_s, now_s=NOW_S)
    if ttl_s > 0:
        issue_token(KEY, SCOPES, ttl_s=ttl_s, now_s=NOW_S, ttl_s_max=ttl_s)


def test_short_key_refused_at_issue() -> None:
    """A key shorter than the HS256 hash output is refused at issue."""
    with pytest.raises(ValueError, match="32 bytes"):
        issue_token(b"short", SCOPES, ttl_s=60, now_s=NOW_S)


def test_key_file_is_private_and_stable(tmp_path: pathlib.Path) -> None:
    """The key file is created with mode 0600, holds 32 bytes and is reused on later calls."""
    path = tmp_path / "state" / KEY_FILE_NAME
    first = load_or_create_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) == 32
    assert load_or_create_key(path) == first
    # No temporary file is left beside the key.
    assert sorted(p.name for p in path.parent.iterdir()) == [KEY_FILE_NAME]
    other = load_or_create_key(tmp_path / "elsewhere" / KEY_FILE_NAME)
    assert other != first


def test_key_file_readable_by_others_is_refused(tmp_path: pathlib.Path) -> None:
    """An existing key file readable by group or others is refused rather than used."""
    path = tmp_path / KEY_FILE_NAME
    load_or_create_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="readable"):
        load_or_create_key(path)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc.def.ghi", "abc.def.ghi"),
        ("  Bearer   abc.def.ghi  ", "abc.def.ghi"),
    ],
)
def test_bearer_token_parses(header: str, expected: str) -> None:
    """The token is taken from a Bearer header whatever the scheme's case and padding."""
    assert bearer_token(header) == expected


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "token_missing"),
        ("", "token_missing"),
        ("Bearer", "token_missing"),
        ("Bearer   ", "token_missing"),
        ("Basic dXNlcjpwYXNz", "token_missing"),
        ("Bearer a b", "token_invalid"),
    ],
)
def test_bearer_token_refuses(header: str | None, code: str) -> None:
    """Absent, empty or non-Bearer headers raise token_missing; a split token token_invalid."""
    with pytest.raises(AuthError) as info:
        bearer_token(header)
    assert info.value.code == code
