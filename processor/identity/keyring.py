"""The key ring: every signing key of a data directory, by id, with its state.

One key is ``active``: tokens are issued with it. Keys that were active before are
``verify_only`` after a rotation: tokens they signed still verify until the operator retires
them. A ``retired`` key verifies nothing; the ring keeps its id (not its secret) so that
``txproc keys list`` can show it. A key's id is its fingerprint (``key_id``), which is what
a token's header names.

The ring lives in ``jwt.keys`` (``KEYS_FILE_NAME``) beside the single key of earlier
versions (``jwt.key``), JSON with the secrets in base64, mode 0600, replaced atomically
under a lock (processor/identity/keyfile.py). The first time a ring is needed it is made
from ``jwt.key`` (created first if missing), so the first key of every ring is that file's
key and tokens issued before keep verifying. Retiring that key deletes ``jwt.key``.

The changes (``KeyRing.rotated``, ``KeyRing.retired``) are pure and take the clock as an
argument; the file functions below them only read, lock and write.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
from typing import Literal

import msgspec

from processor.identity.keyfile import (
    KeyFileError,
    key_files_locked,
    read_private_file,
    write_private_file,
)
from processor.identity.tokens import KEY_BYTES, KEY_FILE_NAME, key_id, load_or_create_key

__all__ = [
    "KEYS_FILE_NAME",
    "RETIRED_KEPT_MAX",
    "VERIFYING_KEYS_MAX",
    "KeyRing",
    "KeyRingError",
    "KeyRingFile",
    "KeyState",
    "SigningKey",
    "load_or_create_ring",
    "load_ring",
    "retire_key",
    "rotate_key",
    "signing_key",
]

KEYS_FILE_NAME = "jwt.keys"
# The active key and those still verifying: each is tried by kid, never in turn, so the
# bound is about what an operator can keep track of, not about cost.
VERIFYING_KEYS_MAX = 8
# Retired keys are kept (id and dates, no secret) for `keys list`; the oldest go first.
RETIRED_KEPT_MAX = 32
_RING_VERSION = 1

KeyState = Literal["active", "verify_only", "retired"]


class KeyRingError(ValueError):
    """A change the ring refuses: an unknown key id, retiring the active key, or more
    verifying keys than ``VERIFYING_KEYS_MAX``."""


class SigningKey(msgspec.Struct, frozen=True, kw_only=True):
    """One key of the ring; ``secret`` is empty once it is retired. Times are seconds
    since the Unix epoch."""

    kid: str
    state: KeyState
    created_at_s: int
    secret: bytes = b""
    retired_at_s: int = 0

    def __repr__(self) -> str:
        # Never the secret, whatever prints the key.
        return f"SigningKey(kid={self.kid!r}, state={self.state!r})"


class KeyRing(msgspec.Struct, frozen=True, kw_only=True):
    """The keys of one data directory, oldest first; exactly one is active.

    Checked when built and when decoded: raises ``KeyRingError`` (inside msgspec's
    ``ValidationError`` when decoding) for no or several active keys, a repeated kid, a
    kid that is not its secret's fingerprint, a secret shorter than 32 bytes, a retired
    key that still holds its secret, or more keys than the limits.
    """

    keys: tuple[SigningKey, ...]
    version: int = _RING_VERSION

    def __post_init__(self) -> None:
        _require(len(self.keys) <= VERIFYING_KEYS_MAX + RETIRED_KEPT_MAX, "too many keys")
        _require(len({k.kid for k in self.keys}) == len(self.keys), "a kid appears twice")
        _require(sum(k.state == "active" for k in self.keys) == 1,
                 "exactly one key must be active")
        _require(sum(k.state != "retired" for k in self.keys) <= VERIFYING_KEYS_MAX,
                 f"at most {VERIFYING_KEYS_MAX} keys may verify")
        for k in self.keys:
            if k.state == "retired":
                _require(k.secret == b"", f"the retired key {k.kid} still holds its secret")
            else:
                _require(len(k.secret) >= KEY_BYTES, f"the key {k.kid} is too short")
                _require(k.kid == key_id(k.secret), f"the kid {k.kid} is not its key's")

    @classmethod
    def first(cls, secret: bytes, *, now_s: int) -> KeyRing:
        """A ring of one active key."""
        return cls(keys=(SigningKey(kid=key_id(secret), state="active", created_at_s=now_s,
                                    secret=secret),))

    @property
    def active(self) -> SigningKey:
        """The key tokens are issued with."""
        return next(k for k in self.keys if k.state == "active")

    def verifying(self) -> dict[str, bytes]:
        """Key id -> key, for every key that verifies (``verify_token``'s ``keys``)."""
        return {k.kid: k.secret for k in self.keys if k.state != "retired"}

    def rotated(self, secret: bytes, *, now_s: int) -> KeyRing:
        """This ring with ``secret`` as the active key and the active one verify-only.

        Raises ``KeyRingError`` if ``VERIFYING_KEYS_MAX`` keys verify already (retire one
        first) or the secret is already in the ring.
        """
        kid = key_id(secret)
        if any(k.kid == kid for k in self.keys):
            raise KeyRingError(f"the key {kid} is already in the ring")
        if len(self.verifying()) >= VERIFYING_KEYS_MAX:
            raise KeyRingError(f"{VERIFYING_KEYS_MAX} keys verify already; retire one "
                               "(txproc keys retire KID) before rotating again")
        keys = [msgspec.structs.replace(k, state="verify_only") if k.state == "active" else k
                for k in self.keys]
        keys.append(SigningKey(kid=kid, state="active", created_at_s=now_s, secret=secret))
        return KeyRing(keys=tuple(keys))

    def retired(self, kid: str, *, now_s: int) -> KeyRing:
        """This ring with ``kid`` retired: its tokens no longer verify and its secret is
        dropped. Retiring a retired key changes nothing. Raises ``KeyRingError`` for an
        unknown kid or the active key (rotate first)."""
        found = [k for k in self.keys if k.kid == kid]
        if not found:
            raise KeyRingError(f"no key {kid!r} in the ring; `txproc keys list` shows them")
        if found[0].state == "retired":
            return self
        if found[0].state == "active":
            raise KeyRingError(f"the key {kid} is active: rotate first (txproc keys rotate), "
                               "then retire it")
        keys = [SigningKey(kid=k.kid, state="retired", created_at_s=k.created_at_s,
                           retired_at_s=now_s) if k.kid == kid else k for k in self.keys]
        # Forget the oldest retired records beyond the bound; the order is kept.
        retired = [k.kid for k in keys if k.state == "retired"]
        forget = set(retired[:max(0, len(retired) - RETIRED_KEPT_MAX)])
        return KeyRing(keys=tuple(k for k in keys if k.kid not in forget))


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise KeyRingError(f"the key ring is not valid: {what}")


_DECODER = msgspec.json.Decoder(KeyRing)
_ENCODER = msgspec.json.Encoder()


def load_ring(directory: pathlib.Path) -> KeyRing:
    """The ring stored in ``directory``.

    Raises ``FileNotFoundError`` if there is none, and ``KeyFileError`` if its file is
    refused (processor/identity/keyfile.py) or is not a valid ring.
    """
    path = directory / KEYS_FILE_NAME
    raw = read_private_file(path)
    try:
        return _DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        # msgspec's text names the field, never a value of it: no secret is quoted.
        raise KeyFileError(f"the key file {path} is not a key ring: {exc}") from exc


def load_or_create_ring(directory: pathlib.Path, *, now_s: int) -> KeyRing:
    """The ring of ``directory``, made from its ``jwt.key`` (created if missing) the first
    time. ``jwt.key``, when present, is held to the same checks as the ring's file.

    Raises ``KeyFileError`` for a refused file and ``OSError`` if one cannot be read or
    written.
    """
    legacy = directory / KEY_FILE_NAME
    try:
        ring = load_ring(directory)
    except FileNotFoundError:
        pass
    else:
        with contextlib.suppress(FileNotFoundError):
            read_private_file(legacy)  # only to refuse it if it is exposed
        return ring
    first = KeyRing.first(load_or_create_key(legacy), now_s=now_s)
    # Linked, not renamed, into place: a ring another process made meanwhile is kept.
    write_private_file(directory / KEYS_FILE_NAME, _ENCODER.encode(first), replace=False)
    return load_ring(directory)


def signing_key(directory: pathlib.Path, *, now_s: int) -> bytes:
    """The secret of ``directory``'s active key: what tools that issue their own tokens
    (benchmarks, load tests) sign with, so their tokens outlive a rotation and retirement
    of older keys. Creates the ring as ``load_or_create_ring`` does."""
    return load_or_create_ring(directory, now_s=now_s).active.secret


def rotate_key(directory: pathlib.Path, *, now_s: int) -> KeyRing:
    """Add a new random active key to the ring of ``directory``; the previous active key
    verifies until retired. Returns the new ring. Raises ``KeyRingError`` as
    ``KeyRing.rotated`` does, and as ``load_or_create_ring``."""
    with key_files_locked(directory):
        ring = load_or_create_ring(directory, now_s=now_s)
        rotated = ring.rotated(secrets.token_bytes(KEY_BYTES), now_s=now_s)
        write_private_file(directory / KEYS_FILE_NAME, _ENCODER.encode(rotated), replace=True)
        return rotated


def retire_key(directory: pathlib.Path, kid: str, *, now_s: int) -> KeyRing:
    """Retire ``kid`` in the ring of ``directory``: tokens it signed stop verifying on every
    front within a second. If ``jwt.key`` holds it, that file is deleted, so the secret is
    gone from the disk. Returns the new ring. Raises ``KeyRingError`` as
    ``KeyRing.retired`` does, and as ``load_or_create_ring``."""
    with key_files_locked(directory):
        ring = load_or_create_ring(directory, now_s=now_s)
        retired = ring.retired(kid, now_s=now_s)
        if retired is not ring:
            write_private_file(directory / KEYS_FILE_NAME, _ENCODER.encode(retired),
                               replace=True)
        legacy = directory / KEY_FILE_NAME
        with contextlib.suppress(FileNotFoundError):
            if key_id(read_private_file(legacy)) == kid:
                legacy.unlink()
        return retired


class KeyRingFile:
    """The ring of a directory as its file holds it now, for a process that serves while
    an operator rotates and retires keys.

    ``refresh`` looks at the file at most every ``interval_s`` (a ``stat``) and reads it
    again only when it changed. A file that became unreadable or invalid raises
    ``KeyFileError`` once per change and leaves the last good ring in place.
    """

    def __init__(self, directory: pathlib.Path, *, now_s: int, interval_s: float) -> None:
        """Load (or make) the ring of ``directory``; raises as ``load_or_create_ring``."""
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.directory = directory
        self.path = directory / KEYS_FILE_NAME
        self._interval_s = interval_s
        self._next_look_s = float("-inf")
        self._signature = self._stat()
        self._ring = load_or_create_ring(directory, now_s=now_s)
        if self._signature is None:  # made just now
            self._signature = self._stat()

    @property
    def ring(self) -> KeyRing:
        return self._ring

    def refresh(self, *, monotonic_s: float, force: bool = False) -> bool:
        """Read the file again if it changed; whether the ring changed. ``monotonic_s`` is
        the caller's monotonic clock; unless ``force``, a call within ``interval_s`` of the
        last look does nothing. Raises ``KeyFileError`` if the changed file is refused."""
        if not force and monotonic_s < self._next_look_s:
            return False
        self._next_look_s = monotonic_s + self._interval_s
        # Looked at before it is read: a change after the look is seen by the next one.
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        if signature is None:
            raise KeyFileError(f"the key file {self.path} is gone; the keys read before "
                               "stay in use")
        ring = load_ring(self.directory)
        changed = ring != self._ring
        self._ring = ring
        return changed

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            status = os.lstat(self.path)
        except FileNotFoundError:
            return None
        # A replacement is a new inode (rename), so even a same-size write within the
        # clock's resolution is seen.
        return (status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size)
