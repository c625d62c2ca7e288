"""Data subjects' keys in PostgreSQL (migration 0029), and their erasure.

``SubjectKeys`` (actors/subjects.py, shared with the edge's personal user_data) gives the
payments store the data key of a (tenant, customer_ref), and opens sealed fields with the
wrapped key a read fetched in its own statement (``subject_read``). ``erase_subject`` is what
``txproc erase`` runs: it destroys the subject's keys, clears what was sealed with them,
scrubs what was never sealed (event payloads, stored answers, refund metadata) and
writes a ``subject.erased`` audit event, in one transaction. The pure part (digests,
wrapping, sealing) is processor/privacy.py; the design is docs/design.md §17.
"""

from __future__ import annotations

import dataclasses
import json

import asyncpg

from actors.ops.audit_events import record_audit_event
from actors.subjects import (
    STATEMENT_TIMEOUT_S,
    SUBJECT_KEY_CACHE_TTL_S,
    SUBJECT_KEYS_CACHED_MAX,
    SubjectKeys,
)
from processor.audit import AuditActor
from processor.privacy import (
    MasterKey,
    erased_object,
)

__all__ = [
    "SUBJECT_KEYS_CACHED_MAX",
    "SUBJECT_KEY_CACHE_TTL_S",
    "Erasure",
    "SubjectKeys",
    "erase_subject",
    "subject_read",
]

# Stored answers rewritten per statement while scrubbing.
ANSWERS_PAGE_ROWS = 500


def subject_read(table: str) -> str:
    """The columns a read of ``table`` (a payments or payouts row, or its alias) adds so
    that its personal fields can be opened: the sealed fields, the key's id, and the
    subject's digest followed by its wrapped key (NULL once erased), in the same
    statement. ``table`` is this package's constant, never input."""
    return (f"{table}.personal, {table}.subject_key_id, (SELECT k.subject_digest || "  # noqa: S608
            f"k.wrapped_key FROM subject_keys k WHERE k.id = {table}.subject_key_id) "
            "AS subject_key")


@dataclasses.dataclass(frozen=True, slots=True)
class Erasure:
    """What ``erase_subject`` found and did. ``known``: the tenant has (or had) this
    subject; ``keys_destroyed`` 0 with ``known``: it was erased before."""

    known: bool
    digest_hex: str
    keys_destroyed: int = 0
    payments: int = 0
    payouts: int = 0
    events_scrubbed: int = 0
    answers_scrubbed: int = 0
    refunds_scrubbed: int = 0
    # Sealed user_data values deleted (a tenant's personal user_data, migration 0036).
    user_data_values: int = 0

    @property
    def changed(self) -> int:
        return (self.keys_destroyed + self.events_scrubbed + self.answers_scrubbed
                + self.refunds_scrubbed + self.user_data_values)


async def erase_subject(conn: asyncpg.Connection, master: MasterKey, *, tenant_slot: int,
                        customer_ref: str, actor: AuditActor,
                        request_id: str = "") -> Erasure:
    """Erase one data subject of one tenant everywhere this database holds it, in one
    transaction (``conn`` must not be in one): see the module docstring. Running it again
    clears whatever was written since (a payment sealed with a cached, destroyed key) and
    records nothing when nothing changed. Raises asyncpg's errors when the database refuses
    or is away (nothing is then erased)."""
    digest = master.subject_digest(tenant_slot, customer_ref)
    async with conn.transaction():
        key_ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM subject_keys WHERE tenant_slot = $1 AND subject_digest = $2 "
            "FOR UPDATE", tenant_slot, digest, timeout=STATEMENT_TIMEOUT_S)]
        if not key_ids:
            return Erasure(known=False, digest_hex=digest.hex())
        destroyed = await conn.fetchval(
            "WITH d AS (UPDATE subject_keys SET wrapped_key = NULL, erased_at = now() "
            "WHERE id = ANY($1::bigint[]) AND erased_at IS NULL RETURNING 1) "
            "SELECT count(*) FROM d", key_ids, timeout=STATEMENT_TIMEOUT_S)
        payments = await _clear_sealed(conn, "payments", key_ids)
        payouts = await _clear_sealed(conn, "payouts", key_ids)
        owned = payments + payouts
        refunds = await conn.fetchval(
            "WITH s AS (UPDATE payment_steps SET metadata = '{}' WHERE subject_id = "
            "ANY($1::text[]) AND metadata <> '{}' RETURNING 1) SELECT count(*) FROM s",
            owned, timeout=STATEMENT_TIMEOUT_S)
        # The value behind the subject's user_data pseudonym: noise once the key is gone,
        # deleted all the same (the ledger's rows keep the pseudonym, which names no one).
        values = await conn.fetchval(
            "WITH d AS (DELETE FROM personal_values WHERE subject_key_id = ANY($1::bigint[]) "
            "RETURNING 1) SELECT count(*) FROM d", key_ids, timeout=STATEMENT_TIMEOUT_S)
        events = await _scrub_events(conn, owned)
        answers = await _scrub_answers(conn, tenant_slot, set(owned))
        erasure = Erasure(known=True, digest_hex=digest.hex(), keys_destroyed=int(destroyed),
                          payments=len(payments), payouts=len(payouts),
                          events_scrubbed=events, answers_scrubbed=answers,
                          refunds_scrubbed=int(refunds), user_data_values=int(values))
        if erasure.changed:
            await record_audit_event(
                conn, actor=actor, action="subject.erased", target_kind="data_subject",
                target_id=erasure.digest_hex, tenant_slot=tenant_slot,
                details={"keys_destroyed": erasure.keys_destroyed,
                         "payments": erasure.payments, "payouts": erasure.payouts,
                         "events_scrubbed": events, "answers_scrubbed": answers,
                         "refunds_scrubbed": erasure.refunds_scrubbed,
                         "user_data_values": erasure.user_data_values},
                request_id=request_id)
    return erasure


async def _clear_sealed(conn: asyncpg.Connection, table: str, key_ids: list[int]) -> list[str]:
    """Clear the sealed fields of ``table``'s rows of the subject (noise already, once the
    key is gone, but noise need not be kept); every such row's id. ``table`` is
    ``payments`` or ``payouts``, never input."""
    await conn.execute(
        f"UPDATE {table} SET personal = NULL, reference = '', metadata = '{{}}' "  # noqa: S608
        "WHERE subject_key_id = ANY($1::bigint[]) AND personal IS NOT NULL",
        key_ids, timeout=STATEMENT_TIMEOUT_S)
    rows = await conn.fetch(
        f"SELECT id FROM {table} WHERE subject_key_id = ANY($1::bigint[])",  # noqa: S608
        key_ids, timeout=STATEMENT_TIMEOUT_S)
    return [r["id"] for r in rows]


_ERASED_FIELDS = json.dumps(erased_object({"customer_ref": None, "reference": None,
                                           "metadata": None}))


async def _scrub_events(conn: asyncpg.Connection, aggregate_ids: list[str]) -> int:
    """The payloads of the subject's payment and payout events with their personal fields
    nulled and ``erased`` set (migration 0029 lets exactly this update through); events
    already scrubbed are left. Deliveries still queued send the scrubbed payload."""
    await conn.execute("SET LOCAL txproc.erasure = 'on'")
    scrubbed = await conn.fetchval(
        "WITH e AS (UPDATE events SET payload = payload || $2::jsonb "
        "WHERE aggregate_id = ANY($1::text[]) "
        "AND payload ?| ARRAY['customer_ref', 'reference', 'metadata'] "
        "AND NOT payload @> '{\"erased\": true}' RETURNING 1) SELECT count(*) FROM e",
        aggregate_ids, _ERASED_FIELDS, timeout=STATEMENT_TIMEOUT_S)
    await conn.execute("SET LOCAL txproc.erasure = 'off'")
    return int(scrubbed)


async def _scrub_answers(conn: asyncpg.Connection, tenant_slot: int, ids: set[str]) -> int:
    """Answers stored under the tenant's Idempotency-Keys (replayed to a retry) that show
    one of the subject's payments or payouts, rewritten as erased. The keys expire after
    their retention, so this reads at most a day's keys of one tenant."""
    if not ids:
        return 0
    scrubbed = 0
    after = ("", "")
    while True:
        rows = await conn.fetch(
            "SELECT principal, key, body FROM idempotency_keys "
            "WHERE split_part(principal, '/', 1) = $1 AND state = 'completed' "
            "AND (principal, key) > ($2, $3) ORDER BY principal, key LIMIT $4",
            str(tenant_slot), after[0], after[1], ANSWERS_PAGE_ROWS,
            timeout=STATEMENT_TIMEOUT_S)
        for row in rows:
            body = _erased_answer(bytes(row["body"]), ids)
            if body is not None:
                await conn.execute(
                    "UPDATE idempotency_keys SET body = $3 WHERE principal = $1 AND key = $2",
                    row["principal"], row["key"], body, timeout=STATEMENT_TIMEOUT_S)
                scrubbed += 1
        if len(rows) < ANSWERS_PAGE_ROWS:
            return scrubbed
        after = (rows[-1]["principal"], rows[-1]["key"])


def _erased_answer(body: bytes, ids: set[str]) -> bytes | None:
    """A stored answer rewritten as erased when it shows one of ``ids`` (None otherwise,
    and for an answer already erased or not a JSON object)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    if not isinstance(answer, dict) or answer.get("id") not in ids or answer.get("erased"):
        return None
    return json.dumps(erased_object(answer), separators=(",", ":")).encode("utf-8")
