"""Signed requests at the HTTP edge: client keys and nonces in PostgreSQL, checked per request.

The rules are processor/identity/signatures.py's; this module gives them what they need
on a front and keeps what they leave to it (docs/security.md, "Signed requests"):

* ``RequestSignatures`` is what the HTTP API asks about each state-changing request, after
  its token: ``check`` reads the signature's header fields and verifies the signature
  with its client key, which must be the token's principal's; ``admit``, once the body is
  read, checks its ``Content-Digest`` and claims the nonce. An unsigned request costs one
  pass over its header names when signatures are not required, and nothing else.
* The client keys not revoked (``client_keys``, migration 0014) are read by every front
  every ``REFRESH_INTERVAL_S`` on its own pool, so a key created or revoked by ``txproc
  keys create-client`` / ``revoke-client`` takes effect on every front within a second.
  If the database cannot be read, the keys read last stay in use (a warning is logged
  once per outage).
* Nonces are claimed in ``request_nonces`` with ``INSERT ... ON CONFLICT DO NOTHING``: of
  two copies of a request, on one front or two sharing the database, exactly one inserts
  its row. Claims arriving together (one event-loop pass) are one statement. The pool's
  sessions run with ``synchronous_commit = off``, as the audit writer's do
  (actors/edge/audit.py): a claim's commit precedes in the WAL that of everything the
  request then writes, so a crash that loses the claim loses the request's effects too.
  A claim that cannot be written fails the request ``unavailable`` before anything of it
  is applied. Rows older than ``NONCE_KEEP_S`` are pruned every ``NONCE_PRUNE_INTERVAL_S``.

The SQL that writes keys (``create_client_key``, ``revoke_client_key``; the CLI) sits here
too, beside the query that reads them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import asyncpg
import msgspec

from actors.database import keep_session, keeping_pool
from processor.errors import Unavailable
from processor.identity import (
    CREATED_AGE_S_MAX,
    CREATED_AHEAD_S_MAX,
    SIGNED_FIELDS,
    Claims,
    ClientKey,
    SignatureError,
    new_client_key,
    read_signature,
    require_content_digest,
    tenant_slot,
    verify_signature,
)

__all__ = [
    "CLIENT_KEYS_MAX",
    "NONCE_KEEP_S",
    "NONCE_PRUNE_INTERVAL_S",
    "REFRESH_INTERVAL_S",
    "NonceStore",
    "RequestSignatures",
    "SignatureStore",
    "Verified",
    "create_client_key",
    "revoke_client_key",
]

log = logging.getLogger(__name__)

# How often a front reads the client keys: a key created or revoked reaches every front
# within about this.
REFRESH_INTERVAL_S = 0.5
# Client keys held by each front (one per signing service, not per end user). Beyond it
# the newest are used and an error is logged.
CLIENT_KEYS_MAX = 10_000
# A nonce is kept this long after it was first seen (the database's clock). It must
# outlast the acceptance window (a signature 5 s ahead is accepted until 30 s after its
# created: 35 s) plus the clock skew between fronts and the database; beyond it a copy is
# refused by its age alone.
NONCE_KEEP_S = 120
NONCE_PRUNE_INTERVAL_S = 10.0
if NONCE_KEEP_S < CREATED_AGE_S_MAX + CREATED_AHEAD_S_MAX + 30:
    raise AssertionError("nonces must outlast the acceptance window with room for skew")
_NAME_CHARS_MAX = 128
_DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
_SIGNED_FIELDS = frozenset(name.encode() for name in SIGNED_FIELDS)
_SIGNATURE_FIELDS = (b"signature", b"signature-input")

_READ_KEYS = """
SELECT key_id, tenant, subject, secret FROM client_keys
WHERE revoked_at IS NULL
ORDER BY created_at DESC
LIMIT $1
"""
_CLAIM = """
INSERT INTO request_nonces (key_id, nonce)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT DO NOTHING
RETURNING key_id, nonce
"""
_PRUNE = "DELETE FROM request_nonces WHERE seen_at < now() - make_interval(secs => $1)"
_INSERT_KEY = """
INSERT INTO client_keys (key_id, tenant, tenant_slot, subject, secret)
VALUES ($1, $2, $3, $4, $5)
"""
_REVOKE_KEY = """
UPDATE client_keys SET revoked_at = now()
WHERE key_id = $1 AND revoked_at IS NULL
RETURNING revoked_at
"""


class Verified(msgspec.Struct, frozen=True):
    """A signature that held: what ``admit`` still checks once the body is read."""

    key_id: str
    nonce: str
    content_digest: str | None


class NonceStore(Protocol):
    async def claim(self, key_id: str, nonce: str) -> bool:
        """Record ``nonce`` of ``key_id``; whether it was new. Raises ``Unavailable``."""
        ...


class RequestSignatures:
    """The signature checks of one front's HTTP API (the module docstring says what).

    ``required`` refuses unsigned state-changing requests (``txproc serve
    --require-signed-requests``); without it, only the requests that carry a signature are
    checked. ``nonces`` records the nonces accepted; without it no key is known, so every
    signature is refused (an API built without a database). ``clock_s`` gives seconds
    since the Unix epoch.
    """

    def __init__(self, *, required: bool, nonces: NonceStore | None,
                 clock_s: Callable[[], float] = time.time,
                 keys: Mapping[str, ClientKey] | None = None) -> None:
        self._required = required
        self._nonces = nonces
        self._clock_s = clock_s
        self._keys: Mapping[str, ClientKey] = {}
        self._store: SignatureStore | None = None
        self._watch: asyncio.Task[None] | None = None
        self.set_keys(keys or {})

    @classmethod
    async def connect(cls, url: str, *, required: bool, connect_timeout_s: float,
                      command_timeout_s: float,
                      clock_s: Callable[[], float] = time.time) -> RequestSignatures:
        """Checks over the database at ``url``: the keys are read once before this returns
        (a database that cannot be read fails the start), then kept current by a task of
        their own until ``close``."""
        store = await SignatureStore.connect(url, connect_timeout_s=connect_timeout_s,
                                             command_timeout_s=command_timeout_s)
        try:
            keys = await store.read_keys()
        except BaseException:
            await store.close()
            raise
        signatures = cls(required=required, nonces=store, clock_s=clock_s, keys=keys)
        signatures._store = store
        signatures._watch = asyncio.get_running_loop().create_task(store.watch(signatures))
        return signatures

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._store is not None:
            await self._store.close()

    @property
    def required(self) -> bool:
        return self._required

    def set_keys(self, keys: Mapping[str, ClientKey]) -> None:
        """Use ``keys`` (by key id: those not revoked) from now on."""
        if keys and self._nonces is None:
            raise ValueError("client keys need a nonce store: without one, replays pass")
        self._keys = keys

    def check(self, claims: Claims, scope: Mapping[str, Any]) -> Verified | None:
        """Verify the signature of the ASGI request ``scope`` made with the token of
        ``claims``; ``None`` if it carries none and none is required. Raises
        ``SignatureError``: ``signature_required``, ``signature_invalid`` or
        ``signature_expired`` (processor/identity/signatures.py, ``verify_signature``)."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if not self._required and not any(name in _SIGNATURE_FIELDS for name, _ in headers):
            return None
        fields = _signed_fields(headers)
        if "signature" not in fields and "signature-input" not in fields:
            raise SignatureError("signature_required", "this server accepts state-changing "
                                 "requests only when signed with a client key (RFC 9421)")
        signature = read_signature(fields)
        verify_signature(signature, method=scope["method"], target_uri=_target_uri(scope),
                         fields=fields, keys=self._keys, tenant=claims.tenant,
                         subject=claims.subject, now_s=self._clock_s())
        return Verified(signature.key_id, signature.nonce, fields.get("content-digest"))

    async def admit(self, verified: Verified, body: bytes) -> None:
        """Check the body against its signed ``Content-Digest`` and claim the nonce.
        Raises ``SignatureError`` (``signature_invalid``, ``request_replayed``) or
        ``Unavailable`` when the nonce cannot be recorded."""
        require_content_digest(verified.content_digest, body)
        if self._nonces is None:  # set_keys let no key in without a store
            raise AssertionError("a signature verified without a nonce store")
        if not await self._nonces.claim(verified.key_id, verified.nonce):
            raise SignatureError("request_replayed", "this key's nonce was used before: "
                                 "sign every request, and every retry, anew")


def _signed_fields(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The header fields the signature checks read, each field's lines trimmed and joined
    by ``", "`` (RFC 9421, section 2.1)."""
    lines: dict[str, list[str]] = {}
    for name, value in headers:
        if name in _SIGNED_FIELDS:
            lines.setdefault(name.decode(), []).append(value.decode("latin-1").strip(" \t"))
    return {name: ", ".join(values) for name, values in lines.items()}


def _target_uri(scope: Mapping[str, Any]) -> str:
    """The request's absolute target URI as the client addressed it: the connection's
    scheme, the Host header, and the path and query as they arrived (not decoded)."""
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    if host is None:
        raise SignatureError("signature_invalid", "a signed request carries a Host header")
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    # ASGI's raw_path has no query; some servers and test transports leave it on.
    path = raw_path.split(b"?", 1)[0].decode("latin-1")
    query = scope.get("query_string", b"").decode("latin-1")
    target = f"{scope['scheme']}://{host.decode('latin-1')}{path}"
    return f"{target}?{query}" if query else target


class SignatureStore:
    """The client keys and the nonces in PostgreSQL, for one front (a small pool)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._pending: list[tuple[tuple[str, str], asyncio.Future[bool]]] = []
        self._flushing: set[asyncio.Task[None]] = set()
        self._failing = False

    @classmethod
    async def connect(cls, url: str, *, connect_timeout_s: float,
                      command_timeout_s: float) -> SignatureStore:
        pool = await keeping_pool(
            url, min_size=1, max_size=2, timeout=connect_timeout_s,
            command_timeout=command_timeout_s,
            # Ordered by the WAL before the rows of the request (the module docstring).
            server_settings={"synchronous_commit": "off",
                             "application_name": "txproc-signatures"},
            reset=keep_session)
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def read_keys(self) -> dict[str, ClientKey]:
        """The client keys not revoked, the newest ``CLIENT_KEYS_MAX`` of them."""
        rows = await self._pool.fetch(_READ_KEYS, CLIENT_KEYS_MAX + 1)
        if len(rows) > CLIENT_KEYS_MAX:
            log.error("more than %d client keys are in use; the oldest are not accepted",
                      CLIENT_KEYS_MAX)
            rows = rows[:CLIENT_KEYS_MAX]
        return {r["key_id"]: ClientKey(key_id=r["key_id"], tenant=r["tenant"],
                                       subject=r["subject"], secret=bytes(r["secret"]))
                for r in rows}

    async def claim(self, key_id: str, nonce: str) -> bool:
        """Record ``nonce`` of ``key_id``; whether it was new (of two equal claims, the
        first). Raises ``Unavailable`` if it cannot be recorded."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._pending.append(((key_id, nonce), done))
        if len(self._pending) == 1:
            loop.call_soon(self._start_flush)
        return await done

    def _start_flush(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        pairs = list(dict.fromkeys(pair for pair, _ in batch))
        try:
            rows = await self._pool.fetch(_CLAIM, [k for k, _ in pairs], [n for _, n in pairs])
        except _DATABASE_ERRORS as exc:
            log.warning("nonces not recorded (%d signed requests refused): %r", len(batch), exc)
            error = Unavailable("the request's nonce could not be recorded; nothing was "
                                "applied", retry_after_s=1.0)
            for _, done in batch:
                if not done.done():
                    done.set_exception(error)
            return
        new = {(r["key_id"], r["nonce"]) for r in rows}
        for pair, done in batch:
            first = pair in new
            new.discard(pair)
            if not done.done():
                done.set_result(first)

    async def prune(self) -> None:
        """Delete the nonces older than ``NONCE_KEEP_S``."""
        await self._pool.execute(_PRUNE, float(NONCE_KEEP_S))

    async def watch(self, signatures: RequestSignatures, *,
                    interval_s: float = REFRESH_INTERVAL_S) -> None:
        """Until cancelled: hand ``signatures`` the keys every ``interval_s`` and prune the
        nonces every ``NONCE_PRUNE_INTERVAL_S``. Failures are logged once per outage; the
        keys read before stay in use."""
        pruned_at = time.monotonic()
        while True:
            await asyncio.sleep(interval_s)
            try:
                signatures.set_keys(await self.read_keys())
                if time.monotonic() - pruned_at >= NONCE_PRUNE_INTERVAL_S:
                    pruned_at = time.monotonic()
                    await self.prune()
            except _DATABASE_ERRORS as exc:
                if not self._failing:
                    log.warning("client keys could not be read; those read before stay in "
                                "use: %r", exc)
                self._failing = True
                continue
            if self._failing:
                log.info("client keys are read again")
            self._failing = False


async def create_client_key(conn: asyncpg.Connection, tenant: str, subject: str, *,
                            random_bytes: Callable[[int], bytes] = secrets.token_bytes
                            ) -> ClientKey:
    """A new client key of ``subject`` of ``tenant``, stored; every front accepts it within
    ``REFRESH_INTERVAL_S``. Raises ``ValueError`` for an empty, overlong or unprintable
    tenant or subject."""
    _check_name("tenant", tenant)
    _check_name("subject", subject)
    key = new_client_key(tenant, subject, random_bytes=random_bytes)
    await conn.execute(_INSERT_KEY, key.key_id, tenant, tenant_slot(tenant), subject,
                       key.secret)
    return key


async def revoke_client_key(conn: asyncpg.Connection, key_id: str) -> dt.datetime | None:
    """Revoke the client key ``key_id``: every front refuses its signatures within
    ``REFRESH_INTERVAL_S``. When it was revoked (the database's clock), or ``None`` if no
    such key is in use."""
    revoked_at: dt.datetime | None = await conn.fetchval(_REVOKE_KEY, key_id)
    return revoked_at


def _check_name(what: str, value: str) -> None:
    if not value or len(value) > _NAME_CHARS_MAX or not value.isprintable():
        raise ValueError(f"the {what} must be 1..{_NAME_CHARS_MAX} printable characters")
