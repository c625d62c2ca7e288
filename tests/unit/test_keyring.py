"""Tests of the key ring, its files and revocations (processor/identity): rotation, retirement,
the checks on key files, and which claims a revocation or a retirement refuses."""

from __future__ import annotations

import json
import os
import pathlib
import stat

import msgspec
import pytest

from processor.identity import (
    KEY_FILE_NAME,
    KEYS_FILE_NAME,
    SCOPES,
    AuthError,
    Claims,
    KeyFileError,
    KeyRing,
    KeyRingError,
    KeyRingFile,
    Revocations,
    issue_token,
    key_id,
    load_or_create_key,
    load_or_create_ring,
    load_ring,
    require_current,
    retire_key,
    revocations_of,
    rotate_key,
    verify_token,
)
from processor.identity.keyfile import file_problem
from processor.identity.keyring import VERIFYING_KEYS_MAX

NOW_S = 1_700_000_000
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
KEY_C = bytes(range(2, 34))


def _code(keys: dict[str, bytes], token: str) -> str:
    with pytest.raises(AuthError) as info:
        verify_token(keys, token, now_s=NOW_S)
    return info.value.code


def _token(secret: bytes) -> str:
    return issue_token(secret, SCOPES, ttl_s=600, now_s=NOW_S)


# -- the ring, pure --------------------------------------------------------------------------


def test_rotation_keeps_old_tokens_and_signs_with_the_new_key() -> None:
    """After a rotation a token of the old key still verifies, and the active key is the new
    one, whose tokens name it in their header."""
    ring = KeyRing.first(KEY_A, now_s=NOW_S)
    old = _token(ring.active.secret)
    rotated = ring.rotated(KEY_B, now_s=NOW_S + 1)
    assert rotated.active.kid == key_id(KEY_B)
    assert [k.state for k in rotated.keys] == ["verify_only", "active"]
    new = _token(rotated.active.secret)
    assert verify_token(rotated.verifying(), old, now_s=NOW_S).key_id == key_id(KEY_A)
    assert verify_token(rotated.verifying(), new, now_s=NOW_S).key_id == key_id(KEY_B)


def test_retired_key_tokens_are_invalid_and_its_secret_is_dropped() -> None:
    """A retired key verifies nothing (token_invalid) and the ring forgets its secret; the
    other keys go on verifying."""
    ring = KeyRing.first(KEY_A, now_s=NOW_S).rotated(KEY_B, now_s=NOW_S)
    retired = ring.retired(key_id(KEY_A), now_s=NOW_S + 5)
    assert _code(retired.verifying(), _token(KEY_A)) == "token_invalid"
    verify_token(retired.verifying(), _token(KEY_B), now_s=NOW_S)
    [gone] = [k for k in retired.keys if k.kid == key_id(KEY_A)]
    assert (gone.state, gone.secret, gone.retired_at_s) == ("retired", b"", NOW_S + 5)
    assert retired.retired(key_id(KEY_A), now_s=NOW_S + 9) is retired  # twice: no change


@pytest.mark.parametrize(("kid", "message"), [
    (key_id(KEY_B), "is active"),
    ("0123456789abcdef", "no key"),
])
def test_retire_refuses_the_active_and_unknown_keys(kid: str, message: str) -> None:
    """Retiring the active key (nothing would sign) or an unknown id is refused."""
    ring = KeyRing.first(KEY_A, now_s=NOW_S).rotated(KEY_B, now_s=NOW_S)
    with pytest.raises(KeyRingError, match=message):
        ring.retired(kid, now_s=NOW_S)


def test_unknown_kid_is_invalid() -> None:
    """A token whose kid names no key of the ring, or no kid at all, is token_invalid."""
    ring = KeyRing.first(KEY_A, now_s=NOW_S)
    assert _code(ring.verifying(), _token(KEY_C)) == "token_invalid"
    assert _code({}, _token(KEY_A)) == "token_invalid"


def test_ring_bounds_and_invariants() -> None:
    """At most VERIFYING_KEYS_MAX keys verify (rotation asks to retire first); a ring with
    two active keys or a kid that is not its key's fingerprint cannot be built."""
    ring = KeyRing.first(bytes([0]) * 32, now_s=NOW_S)
    for i in range(1, VERIFYING_KEYS_MAX):
        ring = ring.rotated(bytes([i]) * 32, now_s=NOW_S)
    with pytest.raises(KeyRingError, match="retire one"):
        ring.rotated(bytes([99]) * 32, now_s=NOW_S)
    first = ring.keys[0]
    assert first.state == "verify_only"
    with pytest.raises(KeyRingError, match="one key must be active"):
        KeyRing(keys=(msgspec.structs.replace(first, state="active"), ring.active))
    with pytest.raises(KeyRingError, match="not its key"):
        KeyRing(keys=(msgspec.structs.replace(ring.active, kid="0" * 16),))


def test_signing_key_repr_never_shows_the_secret() -> None:
    """Printing a key or a ring (a log line, a traceback) never shows a secret."""
    ring = KeyRing.first(KEY_A, now_s=NOW_S)
    assert KEY_A.hex() not in repr(ring) and str(list(KEY_A)) not in repr(ring)
    assert repr(KEY_A) not in repr(ring)


# -- the files -------------------------------------------------------------------------------


def test_first_ring_is_made_from_jwt_key(tmp_path: pathlib.Path) -> None:
    """A data directory with only jwt.key gets a ring whose one active key is that key (same
    kid), so tokens issued before the upgrade still verify; the ring file is 0600."""
    legacy = load_or_create_key(tmp_path / KEY_FILE_NAME)
    before = _token(legacy)
    ring = load_or_create_ring(tmp_path, now_s=NOW_S)
    assert ring.active.kid == key_id(legacy) and len(ring.keys) == 1
    verify_token(ring.verifying(), before, now_s=NOW_S)
    assert stat.S_IMODE(os.stat(tmp_path / KEYS_FILE_NAME).st_mode) == 0o600
    assert load_or_create_ring(tmp_path, now_s=NOW_S + 60) == ring


def test_rotate_and_retire_files(tmp_path: pathlib.Path) -> None:
    """rotate_key writes a new active key; retire_key of the first key refuses its tokens,
    removes its secret from the ring file and deletes jwt.key, which held it."""
    first = load_or_create_ring(tmp_path, now_s=NOW_S)
    old = _token(first.active.secret)
    rotated = rotate_key(tmp_path, now_s=NOW_S + 1)
    assert load_ring(tmp_path) == rotated != first
    new = _token(rotated.active.secret)
    for token in (old, new):
        verify_token(load_ring(tmp_path).verifying(), token, now_s=NOW_S)
    retire_key(tmp_path, first.active.kid, now_s=NOW_S + 2)
    ring = load_ring(tmp_path)
    assert _code(ring.verifying(), old) == "token_invalid"
    verify_token(ring.verifying(), new, now_s=NOW_S)
    assert first.active.secret.hex() not in (tmp_path / KEYS_FILE_NAME).read_text()
    assert not (tmp_path / KEY_FILE_NAME).exists()
    with pytest.raises(KeyRingError, match="is active"):
        retire_key(tmp_path, rotated.active.kid, now_s=NOW_S + 3)


def test_symlinked_key_files_are_refused(tmp_path: pathlib.Path) -> None:
    """A ring file or a jwt.key that is a symbolic link is refused, naming the file, even
    when it points at a good key file."""
    real = tmp_path / "real"
    real.mkdir()
    load_or_create_ring(real, now_s=NOW_S)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / KEYS_FILE_NAME).symlink_to(real / KEYS_FILE_NAME)
    with pytest.raises(KeyFileError, match=f"{linked / KEYS_FILE_NAME} is a symbolic link"):
        load_or_create_ring(linked, now_s=NOW_S)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / KEY_FILE_NAME).symlink_to(real / KEY_FILE_NAME)
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_or_create_ring(legacy, now_s=NOW_S)


@pytest.mark.parametrize("name", [KEYS_FILE_NAME, KEY_FILE_NAME])
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_key_files_readable_by_others_are_refused(tmp_path: pathlib.Path, name: str,
                                                  mode: int) -> None:
    """Either key file readable by group or others is refused at load, naming it."""
    load_or_create_ring(tmp_path, now_s=NOW_S)
    os.chmod(tmp_path / name, mode)
    with pytest.raises(KeyFileError, match=f"{tmp_path / name} must not be readable"):
        load_or_create_ring(tmp_path, now_s=NOW_S)


def test_key_file_of_another_user_is_refused(tmp_path: pathlib.Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A key file owned by another user than the process's is refused, naming both uids."""
    load_or_create_ring(tmp_path, now_s=NOW_S)
    owner = os.stat(tmp_path / KEYS_FILE_NAME).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(KeyFileError, match=f"owned by uid {owner}, not by the server's user"):
        load_ring(tmp_path)


@pytest.mark.parametrize(("mode", "owner", "problem"), [
    (stat.S_IFREG | 0o600, 1000, None),
    (stat.S_IFREG | 0o400, 1000, None),
    (stat.S_IFREG | 0o640, 1000, "readable by group or others"),
    (stat.S_IFREG | 0o602, 1000, "readable by group or others"),
    (stat.S_IFREG | 0o600, 0, "owned by uid 0"),
    (stat.S_IFIFO | 0o600, 1000, "not a regular file"),
    (stat.S_IFDIR | 0o700, 1000, "not a regular file"),
])
def test_file_problem_table(mode: int, owner: int, problem: str | None) -> None:
    """One row per kind of key file the server refuses, and two it reads."""
    found = file_problem(mode, owner, 1000)
    assert found is None if problem is None else (found is not None and problem in found)


def test_tampered_ring_file_is_refused(tmp_path: pathlib.Path) -> None:
    """A ring file whose kid does not match its key (edited by hand) is refused."""
    load_or_create_ring(tmp_path, now_s=NOW_S)
    path = tmp_path / KEYS_FILE_NAME
    document = json.loads(path.read_text())
    document["keys"][0]["kid"] = "0" * 16
    path.write_text(json.dumps(document))
    with pytest.raises(KeyFileError, match="not a key ring"):
        load_ring(tmp_path)


def test_ring_file_watch_sees_rotation_and_keeps_the_last_good_ring(
        tmp_path: pathlib.Path) -> None:
    """KeyRingFile reads a rotation on the next look after its interval, not before; a file
    turned unsafe is reported once and the last good ring stays."""
    watch = KeyRingFile(tmp_path, now_s=NOW_S, interval_s=0.5)
    first = watch.ring
    assert watch.refresh(monotonic_s=100.0) is False  # nothing changed
    rotated = rotate_key(tmp_path, now_s=NOW_S + 1)
    assert watch.refresh(monotonic_s=100.2) is False and watch.ring == first  # too soon
    assert watch.refresh(monotonic_s=100.5) is True and watch.ring == rotated
    os.chmod(tmp_path / KEYS_FILE_NAME, 0o644)
    with pytest.raises(KeyFileError, match="readable"):
        watch.refresh(monotonic_s=101.0)
    assert watch.refresh(monotonic_s=102.0) is False and watch.ring == rotated


# -- revocations -----------------------------------------------------------------------------

REVOCATIONS = revocations_of([
    ("jti-1", None, None, NOW_S),
    (None, "acme", "gw-1", NOW_S),
    (None, "acme", "gw-1", NOW_S - 100),  # an earlier revocation of the same subject
])


@pytest.mark.parametrize(("tenant", "subject", "token_id", "issued_at_s", "revoked"), [
    ("acme", "other", "jti-1", NOW_S + 50, True),  # that token id, whoever holds it
    ("acme", "gw-1", "jti-2", NOW_S - 1, True),  # the subject, issued before
    ("acme", "gw-1", "jti-2", NOW_S, True),  # ... and in the revocation's second
    ("acme", "gw-1", "jti-2", NOW_S + 1, False),  # issued after: good
    ("beta", "gw-1", "jti-2", NOW_S - 1, False),  # same subject, another tenant
    ("acme", "gw-2", "jti-2", NOW_S - 1, False),  # another subject
])
def test_revocations_table(tenant: str, subject: str, token_id: str, issued_at_s: int,
                           revoked: bool) -> None:
    """One row per case: a token id revokes that token; a subject revokes its tokens
    issued up to the revocation's second, in its tenant only."""
    claims = Claims(subject=subject, scopes=frozenset(), expires_at_s=NOW_S + 600,
                    tenant=tenant, token_id=token_id, key_id=key_id(KEY_A),
                    issued_at_s=issued_at_s)
    assert REVOCATIONS.revokes(claims) is revoked
    if revoked:
        with pytest.raises(AuthError) as info:
            require_current(claims, key_ids={key_id(KEY_A)}, revocations=REVOCATIONS)
        assert info.value.code == "token_revoked"
    else:
        require_current(claims, key_ids={key_id(KEY_A)}, revocations=REVOCATIONS)


def test_require_current_refuses_a_retired_key() -> None:
    """Claims verified earlier whose key no longer verifies are token_invalid."""
    claims = verify_token(KEY_A, _token(KEY_A), now_s=NOW_S)
    require_current(claims, key_ids={key_id(KEY_A)}, revocations=Revocations())
    with pytest.raises(AuthError) as info:
        require_current(claims, key_ids={key_id(KEY_B)}, revocations=Revocations())
    assert info.value.code == "token_invalid"
