"""Revoked tokens, and the check every request's claims pass on an edge.

An operator revokes one token by its id (``jti``), or every token of a subject of a tenant
issued up to the revocation: a token of that subject whose ``iat`` is at or before the
revocation's second is refused, one issued in a later second is not (``iat`` has whole
seconds, so a token issued in the same second as the revocation is refused too: the
holder gets a new one a second later). The revocations themselves are stored in the
database (migration 0013) and read by each front (actors/edge/credentials.py); this module
holds only what the front decides with them.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

import msgspec

from processor.identity.tokens import AuthError, Claims

__all__ = ["Revocations", "require_current", "revocations_of"]


class Revocations(msgspec.Struct, frozen=True, kw_only=True):
    """Revoked token ids, and per (tenant, subject) the second up to which its tokens are
    revoked (seconds since the Unix epoch, compared with ``iat``)."""

    token_ids: frozenset[str] = frozenset()
    subjects: dict[tuple[str, str], int] = msgspec.field(default_factory=dict)

    def revokes(self, claims: Claims) -> bool:
        """Whether the token of ``claims`` is revoked."""
        if claims.token_id in self.token_ids:
            return True
        if not self.subjects:
            return False
        revoked_at_s = self.subjects.get((claims.tenant, claims.subject))
        return revoked_at_s is not None and claims.issued_at_s <= revoked_at_s


def revocations_of(rows: Iterable[tuple[str | None, str | None, str | None, int]]
                   ) -> Revocations:
    """The revocations of stored rows ``(jti, tenant, subject, revoked_at_s)``: a row names
    either a token id or a tenant and subject; of several revocations of one subject the
    latest counts."""
    token_ids: set[str] = set()
    subjects: dict[tuple[str, str], int] = {}
    for token_id, tenant, subject, revoked_at_s in rows:
        if token_id is not None:
            token_ids.add(token_id)
        elif tenant is not None and subject is not None:
            key = (tenant, subject)
            subjects[key] = max(revoked_at_s, subjects.get(key, revoked_at_s))
    return Revocations(token_ids=frozenset(token_ids), subjects=subjects)


def require_current(claims: Claims, *, key_ids: Container[str],
                    revocations: Revocations) -> None:
    """Raise ``AuthError`` unless the token of ``claims`` is still good: its key is among
    ``key_ids`` (those that verify now; a retired key's tokens are ``token_invalid``) and
    it is not revoked (``token_revoked``).

    Called on every request, also for a token verified earlier (a cached one, or an RPC
    connection's), so that a retirement or revocation reaches tokens already in use.
    """
    if claims.key_id not in key_ids:
        raise AuthError("token_invalid", "the token's signing key has been retired")
    if revocations.revokes(claims):
        raise AuthError("token_revoked", "the token has been revoked")
