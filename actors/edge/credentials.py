"""What the edges check a token against while they serve: the key ring and the revocations.

``Credentials`` holds the keys that verify (re-read from the data directory's ``jwt.keys``
when it changes, processor/identity/keyring.py) and the revoked tokens (read from the
database's ``revoked_tokens``, migration 0013). Both listeners of a front share one: a
token is verified once (HTTP remembers it, an RPC connection holds its claims) and its
claims are checked against the current keys and revocations on every request
(``Credentials.check``), so a retirement or a revocation reaches tokens already in use.

``CredentialsWatch`` keeps them current: every ``REFRESH_INTERVAL_S`` it looks at the key
file and reads the revocations, so ``txproc keys retire`` and ``txproc token revoke`` take
effect on every front within a second, without a restart. If the database cannot be read,
the revocations read last stay in force (and a warning is logged once); if the key file
becomes unreadable or invalid, the keys read last stay in use (an error is logged).

The SQL that writes revocations (``revoke_token_id``, ``revoke_subject``; ``txproc token
revoke``) sits here too, beside the one query that reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

from processor.identity import (
    TOKEN_TTL_S_MAX,
    AuthError,
    Claims,
    KeyFileError,
    KeyRingFile,
    Revocations,
    key_id,
    require_current,
    revocations_of,
    verify_token,
)

__all__ = [
    "REFRESH_INTERVAL_S",
    "REVOCATIONS_MAX",
    "Credentials",
    "CredentialsWatch",
    "as_credentials",
    "read_revocations",
    "revoke_subject",
    "revoke_token_id",
]

log = logging.getLogger(__name__)

# How often a front looks at the key file and reads the revocations: a change reaches
# every front within about this, and a token signed with a key added since is looked up
# again at most this often.
REFRESH_INTERVAL_S = 0.5
# Revocations in force at once (each held in memory by every front). Beyond it the newest
# are kept and an error is logged; revocations expire with the tokens they cover.
REVOCATIONS_MAX = 100_000
_NAME_CHARS_MAX = 128
# A read of the revocations that takes longer than this is given up and started again on a
# new connection; the key file is looked at meanwhile all the same.
READ_BOUND_S = 5.0
_DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

_READ = f"""
SELECT jti, tenant, subject, floor(extract(epoch FROM revoked_at))::bigint AS revoked_at_s
FROM revoked_tokens
WHERE expires_at > now()
ORDER BY revoked_at DESC
LIMIT {REVOCATIONS_MAX + 1}
"""
_INSERT = """
INSERT INTO revoked_tokens (jti, tenant, subject, revoked_at, expires_at)
VALUES ($1, $2, $3, now(), now() + make_interval(secs => $4))
RETURNING revoked_at
"""
# Expired revocations cover only tokens that have expired too; removed when a new one is
# written, so the table stays as small as what is in force.
_PRUNE = "DELETE FROM revoked_tokens WHERE expires_at <= now()"


class Credentials:
    """The keys that verify and the revocations in force, as one front knows them now.

    Made from a data directory's ring (``of_directory``) or, for tests and tools, from one
    fixed key (``of_key``: a ring of one that never changes).
    """

    def __init__(self, ring_file: KeyRingFile | None, fixed_key: bytes | None = None, *,
                 monotonic_s: Callable[[], float] = time.monotonic) -> None:
        self._ring_file = ring_file
        self._monotonic_s = monotonic_s
        if ring_file is not None:
            self._verifying = ring_file.ring.verifying()
        elif fixed_key is not None:
            self._verifying = {key_id(fixed_key): fixed_key}
        else:
            raise ValueError("credentials need a key ring or a key")
        self._revocations = Revocations()

    @classmethod
    def of_key(cls, key: bytes) -> Credentials:
        return cls(None, key)

    @classmethod
    def of_directory(cls, directory: Path, *, now_s: int,
                     monotonic_s: Callable[[], float] = time.monotonic) -> Credentials:
        """The ring of ``directory`` (made from its ``jwt.key`` the first time); its file is
        looked at again at most every ``REFRESH_INTERVAL_S`` of ``monotonic_s``. Raises
        ``KeyFileError`` naming a refused key file (a symbolic link, another owner, readable
        by others), ``OSError`` if one cannot be read or written."""
        return cls(KeyRingFile(directory, now_s=now_s, interval_s=REFRESH_INTERVAL_S),
                   monotonic_s=monotonic_s)

    @property
    def revocations(self) -> Revocations:
        return self._revocations

    def verify(self, token: str, *, now_s: int) -> Claims:
        """The claims of ``token``, verified with the keys that verify now and checked
        against the revocations. A token signed with an unknown key makes the key file be
        looked at again (at most every ``REFRESH_INTERVAL_S``, so that tokens of made-up
        keys cannot make every request read the file), so a key just rotated in verifies
        at once, or within that interval of the last look. Raises ``AuthError``."""
        try:
            claims = verify_token(self._verifying, token, now_s=now_s)
        except AuthError as exc:
            if exc.code != "token_invalid" or not self.refresh_keys():
                raise
            claims = verify_token(self._verifying, token, now_s=now_s)
        self.check(claims)
        return claims

    def check(self, claims: Claims) -> None:
        """Raise ``AuthError`` if the key of ``claims`` was retired (``token_invalid``) or
        its token revoked (``token_revoked``) since it was verified."""
        require_current(claims, key_ids=self._verifying, revocations=self._revocations)

    def refresh_keys(self, *, force: bool = False) -> bool:
        """Read the key file again if it changed (at most every ``REFRESH_INTERVAL_S``
        unless ``force``); whether the keys changed. A file refused after a change is
        logged and the keys read before stay in use."""
        if self._ring_file is None:
            return False
        try:
            changed = self._ring_file.refresh(monotonic_s=self._monotonic_s(), force=force)
        except (KeyFileError, OSError) as exc:
            log.error("the key file changed but is refused; the keys read before stay in "
                      "use: %s", exc)
            return False
        if changed:
            ring = self._ring_file.ring
            self._verifying = ring.verifying()
            log.info("key ring reloaded: active %s, verifying %s", ring.active.kid,
                     sorted(self._verifying))
        return changed

    def set_revocations(self, revocations: Revocations) -> None:
        self._revocations = revocations


def as_credentials(key: bytes | Credentials) -> Credentials:
    """``key`` as credentials: a single key is a ring of one with no revocations."""
    return key if isinstance(key, Credentials) else Credentials.of_key(key)


async def read_revocations(conn: asyncpg.Connection) -> Revocations:
    """The revocations in force (not expired), the newest ``REVOCATIONS_MAX`` of them."""
    rows = await conn.fetch(_READ)
    if len(rows) > REVOCATIONS_MAX:
        log.error("more than %d revocations are in force; the oldest are not applied",
                  REVOCATIONS_MAX)
        rows = rows[:REVOCATIONS_MAX]
    return revocations_of((r["jti"], r["tenant"], r["subject"], r["revoked_at_s"])
                          for r in rows)


async def revoke_token_id(conn: asyncpg.Connection, token_id: str, *,
                          keep_s: int = TOKEN_TTL_S_MAX) -> dt.datetime:
    """Revoke the token whose ``jti`` is ``token_id``, for ``keep_s`` seconds (at least the
    longest lifetime a token is issued with). Returns when it was revoked (the database's
    clock). Raises ``ValueError`` for an empty or overlong id or a non-positive ``keep_s``."""
    _check_name("token id", token_id)
    return await _insert(conn, token_id, None, None, keep_s)


async def revoke_subject(conn: asyncpg.Connection, tenant: str, subject: str, *,
                         keep_s: int = TOKEN_TTL_S_MAX) -> dt.datetime:
    """Revoke every token of ``subject`` of ``tenant`` issued up to now (to the second), for
    ``keep_s`` seconds; tokens issued in a later second are good. Returns when it was
    revoked. Raises ``ValueError`` as ``revoke_token_id``."""
    _check_name("tenant", tenant)
    _check_name("subject", subject)
    return await _insert(conn, None, tenant, subject, keep_s)


async def _insert(conn: asyncpg.Connection, token_id: str | None, tenant: str | None,
                  subject: str | None, keep_s: int) -> dt.datetime:
    if not keep_s > 0:
        raise ValueError(f"keep_s must be positive, got {keep_s}")
    async with conn.transaction():
        await conn.execute(_PRUNE)
        revoked_at: dt.datetime = await conn.fetchval(_INSERT, token_id, tenant, subject,
                                                      float(keep_s))
    return revoked_at


def _check_name(what: str, value: str) -> None:
    if not value or len(value) > _NAME_CHARS_MAX or not value.isprintable():
        raise ValueError(f"the {what} must be 1..{_NAME_CHARS_MAX} printable characters")


class CredentialsWatch:
    """Keeps one front's ``Credentials`` current: the key file and the revocations, every
    ``interval_s``, on a database connection of its own.

    The two are looked at apart: the key file every round whatever the database does, the
    revocations by one read at a time in a task of its own. A read that takes longer than
    ``read_bound_s`` (a hung connection, a lock on the table) is cancelled and its
    connection dropped; the next round starts a new one. No failure of either stops the
    watch: it is what makes a retired key or a revoked token stop working, so its loss
    would leave them working in silence."""

    def __init__(self, credentials: Credentials, database_url: str, *,
                 connect_timeout_s: float, command_timeout_s: float,
                 interval_s: float = REFRESH_INTERVAL_S,
                 read_bound_s: float = READ_BOUND_S,
                 monotonic_s: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if not read_bound_s > 0:
            raise ValueError(f"read_bound_s must be positive, got {read_bound_s}")
        self._credentials = credentials
        self._url = database_url
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._interval_s = interval_s
        self._read_bound_s = read_bound_s
        self._monotonic_s = monotonic_s
        self._conn: asyncpg.Connection | None = None
        self._failing = False

    async def poll(self) -> None:
        """Look at the key file and read the revocations once. Raises the database's
        errors (the revocations known before stay in force)."""
        self._credentials.refresh_keys(force=True)
        await self._read_revocations()

    async def run(self) -> None:
        """Every ``interval_s`` until cancelled: look at the key file, and start a read of
        the revocations unless one is under way (one running past ``read_bound_s`` is
        cancelled). Failures are logged once per outage; the next round tries again on a
        new connection."""
        read: asyncio.Task[None] | None = None
        read_started_s = 0.0
        try:
            while True:
                await asyncio.sleep(self._interval_s)
                self._refresh_keys()
                if read is not None and read.done():
                    self._settle(read)
                    read = None
                if read is None:
                    read = asyncio.get_running_loop().create_task(self._read_revocations())
                    read_started_s = self._monotonic_s()
                elif self._monotonic_s() - read_started_s > self._read_bound_s:
                    read.cancel()
                    with contextlib.suppress(asyncio.CancelledError, *_DATABASE_ERRORS):
                        await read
                    read = None
                    self._failed(TimeoutError(
                        f"the revocations were not read within {self._read_bound_s} s"))
                    self._abandon_connection()
        finally:
            if read is not None:
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read

    def _refresh_keys(self) -> None:
        try:
            self._credentials.refresh_keys(force=True)
        except Exception:  # a fault here must not stop the revocations being read
            log.exception("the key file could not be looked at; the keys read before stay "
                          "in use")

    async def _read_revocations(self) -> None:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self._url, timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s,
                server_settings={"application_name": "txproc-credentials"})
        self._credentials.set_revocations(await read_revocations(self._conn))

    def _settle(self, read: asyncio.Task[None]) -> None:
        """Log the outcome of a finished read; after a failure, drop its connection."""
        exc = read.exception()
        if exc is None:
            if self._failing:
                log.info("revocations are read again")
            self._failing = False
            return
        self._failed(exc)
        self._abandon_connection()

    def _failed(self, exc: BaseException) -> None:
        if not self._failing:
            if isinstance(exc, _DATABASE_ERRORS):
                log.warning("revocations could not be read; those read before stay in "
                            "force: %r", exc)
            else:
                log.error("revocations could not be read; those read before stay in "
                          "force", exc_info=exc)
        self._failing = True

    async def close(self) -> None:
        await self._drop_connection()

    def _abandon_connection(self) -> None:
        """Drop the connection at once, without the close handshake a hung server would
        not answer."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), timeout=self._command_timeout_s)
            except _DATABASE_ERRORS:
                conn.terminate()
