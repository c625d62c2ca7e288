"""Data subjects' keys in PostgreSQL (migration 0029), shared by the domains that keep
personal data: the payments store (a payment's or payout's ``customer_ref``) and the
edge (user_data of a tenant that marks it personal, actors/edge/personal.py).

``SubjectKeys`` gives the data key of a (tenant, subject reference): from a bounded cache,
or from one upsert that creates the key the first time the subject is seen (so a
subject's second write costs no extra round trip). Erasing a subject is
actors/payments/subjects.py's ``erase_subject`` (``txproc erase``). The pure part
(digests, wrapping, sealing) is processor/privacy.py; the design is docs/design.md §17.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from processor.identity import load_or_create_key, read_key
from processor.privacy import (
    DATA_KEY_BYTES,
    DIGEST_BYTES,
    NONCE_BYTES,
    MasterKey,
    Personal,
    open_personal,
    seal_personal,
)

__all__ = [
    "STATEMENT_TIMEOUT_S",
    "SUBJECT_KEYS_CACHED_MAX",
    "SUBJECT_KEY_CACHE_TTL_S",
    "SubjectKeys",
    "master_key_of",
]

# A key cached for writing is trusted this long: an erasure run by another process is
# seen by this one's new writes within it (a payment written in between is sealed with
# the destroyed key, and reads as erased). Reads never use the cache: they fetch the
# wrapped key in their own statement, so an erased key is seen at once.
SUBJECT_KEY_CACHE_TTL_S = 30.0
SUBJECT_KEYS_CACHED_MAX = 10_000
STATEMENT_TIMEOUT_S = 30.0

_UPSERT = (
    "INSERT INTO subject_keys (tenant_slot, subject_digest, wrapped_key) VALUES ($1, $2, $3) "
    "ON CONFLICT (tenant_slot, subject_digest) WHERE erased_at IS NULL "
    "DO UPDATE SET tenant_slot = EXCLUDED.tenant_slot RETURNING id, wrapped_key")


class SubjectKeys:
    """The data keys of subjects, for one store's pool; see the module docstring."""

    def __init__(self, pool: asyncpg.Pool, master: MasterKey, *,
                 clock_s: Callable[[], float] = time.monotonic,
                 cache_ttl_s: float = SUBJECT_KEY_CACHE_TTL_S,
                 cached_max: int = SUBJECT_KEYS_CACHED_MAX) -> None:
        if cache_ttl_s < 0 or cached_max < 1:
            raise ValueError("cache_ttl_s >= 0 and cached_max >= 1")
        self._pool = pool
        self._master = master
        self._clock_s = clock_s
        self._ttl_s = cache_ttl_s
        self._cached_max = cached_max
        # (tenant slot, digest) -> (key id, data key, when fetched), oldest first.
        self._cache: collections.OrderedDict[tuple[int, bytes], tuple[int, bytes, float]] = (
            collections.OrderedDict())

    @property
    def master(self) -> MasterKey:
        return self._master

    async def key_for(self, tenant_slot: int, customer_ref: str) -> tuple[int, bytes]:
        """The live key of the subject (its id and the data key), created if it has none."""
        digest = self._master.subject_digest(tenant_slot, customer_ref)
        now_s = self._clock_s()
        cached = self._cache.get((tenant_slot, digest))
        if cached is not None and now_s - cached[2] < self._ttl_s:
            return cached[0], cached[1]
        fresh = secrets.token_bytes(DATA_KEY_BYTES)
        wrapped = self._master.wrap(fresh, digest=digest, nonce=secrets.token_bytes(NONCE_BYTES))
        row = await self._pool.fetchrow(_UPSERT, tenant_slot, digest, wrapped,
                                        timeout=STATEMENT_TIMEOUT_S)
        # Ours, or the one another writer created first: open what was stored either way.
        key = self._master.unwrap(bytes(row["wrapped_key"]), digest=digest)
        self._cache[(tenant_slot, digest)] = (int(row["id"]), key, now_s)
        self._cache.move_to_end((tenant_slot, digest))
        while len(self._cache) > self._cached_max:
            self._cache.popitem(last=False)
        return int(row["id"]), key

    def seal(self, key: bytes, personal: Personal, *, row_id: str) -> bytes:
        return seal_personal(key, personal, row_id=row_id,
                             nonce=secrets.token_bytes(NONCE_BYTES))

    def opened(self, row_id: str, values: dict[str, Any]) -> dict[str, Any]:
        """The fields a row read with ``subject_read`` gives its Payment or Payout, the
        three columns removed from ``values``: nothing for a row without a subject; the
        personal fields opened; or ``erased`` when its key or its sealed fields are gone."""
        sealed = values.pop("personal")
        key_id = values.pop("subject_key_id")
        key_blob = values.pop("subject_key")
        if key_id is None:
            return {}
        if sealed is None or key_blob is None:
            return {"erased": True, "reference": "", "metadata": {}, "customer_ref": ""}
        blob = bytes(key_blob)
        key = self._master.unwrap(blob[DIGEST_BYTES:], digest=blob[:DIGEST_BYTES])
        personal = open_personal(key, bytes(sealed), row_id=row_id)
        return {"customer_ref": personal.customer_ref, "reference": personal.reference,
                "metadata": personal.metadata}


def master_key_of(keys_path: Path, *, shared: bool) -> MasterKey:
    """The erasure master key of a key directory. A directory shared by every node
    (``--key-file``: ``shared``) has its key made by an operator (`txproc keys rotate
    --key-file`) and only read here, where a node making its own would leave every
    subject's data unreadable to the others."""
    from processor.privacy import MASTER_KEY_FILE_NAME

    path = keys_path / MASTER_KEY_FILE_NAME
    return MasterKey(read_key(path) if shared else load_or_create_key(path))
