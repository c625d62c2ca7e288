"""PostgreSQL persistence of payments, payouts, saga steps, Idempotency-Keys and webhooks.

Every write of a step names the version it read (``save_step``), so a runner whose claim
expired and was taken over by the recovery worker finds out at its next write and stops;
provider calls carry idempotency keys and ledger transfers have fixed ids, so the calls the
stale runner already made are harmless repeats.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import secrets
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol, TypeVar

import asyncpg
import msgspec

from actors.database import bounded_pool, keep_session
from actors.ops.audit_events import record_audit_event
from actors.payments import outbox
from actors.payments.subjects import SubjectKeys, subject_read
from actors.priority import lower_session_priority
from processor.audit import AuditActor
from processor.identity import tenant_of_principal
from processor.payments import (
    DISPUTE_KINDS,
    EVENT_INERT_PHASES,
    FINAL_PHASES,
    Dispute,
    DisputeError,
    DisputeStatus,
    Evidence,
    KeyState,
    Kind,
    ListFilter,
    Payment,
    PaymentError,
    PaymentStatus,
    Payout,
    PayoutStatus,
    Phase,
    Position,
    Step,
    StoredKey,
)
from processor.privacy import MasterKey, Personal, erased_object
from processor.request_audit import AUDIT_COLUMNS, AuditSlot, row_of
from processor.types import InvariantError, require

__all__ = ["DATABASE_UNREACHABLE", "KeyHold", "PaymentStore", "Where"]

_T = TypeVar("_T", bound="_Listed")

# Step ids (and their transfer ids) a store takes from the sequences at once.
STEP_ID_BLOCK = 32

# What a call meets when PostgreSQL cannot be reached, did not answer in time (the pool's
# acquire, connect or statement timeout) or refused the service's login (its password
# changed under it: an operator's matter, not the request's): the request may be sent
# again. Not a refused statement (a constraint, a permission), which is a bug to see as one.
DATABASE_UNREACHABLE = (OSError, TimeoutError, asyncpg.InterfaceError,
                        asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError,
                        asyncpg.InvalidAuthorizationSpecificationError)

_FINAL = [p.value for p in FINAL_PHASES]
_EVENT_INERT = sorted(p.value for p in EVENT_INERT_PHASES)
_STEP_COLUMNS = (
    "id, subject_id, kind, phase, amount, currency, provider, provider_key, transfer_id, "
    "merchant_account_id, payment_method, destination, hold_transfer_id, auth_ref, "
    "provider_ref, tried, decline_code, error, version, origin, final_capture, capture_id, "
    "hold_amount, hold_timeout_s"
)
# What a read gives a Step: its columns, and how often the recovery worker took it up.
_STEP_READ = _STEP_COLUMNS + ", checks"
# A payment's steps as they were created: its newest operation decides its answer
# (``payment_status``). A payment's steps are serial (one open at a time,
# ``payment_steps_one_open``), so a later one's transaction started after the earlier one
# was stored; ids follow that within one store but not across two (a payments actor and
# its replacement alive for a moment both hand out ids from blocks of their own).
_IN_CREATION_ORDER = "ORDER BY created_at, id"
_PAYMENT_COLUMNS = (
    "id, merchant_account_id, amount, currency, payment_method, status, provider, "
    "provider_ref, hold_transfer_id, captured_amount, refunded_amount, decline_code, error, "
    "risk_reason, risk_source, reference, auto_capture, request_key, capturable_amount, "
    "metadata, created_at"
)
_PAYOUT_COLUMNS = (
    "id, merchant_account_id, amount, currency, destination, status, provider, provider_ref, "
    "decline_code, error, reference, metadata, created_at"
)
# What a read of a payment or payout selects: its columns and what opens its personal
# fields (actors/payments/subjects.py), in the same statement.
_PAYMENT_READ = f"{_PAYMENT_COLUMNS}, {subject_read('payments')}"
_PAYOUT_READ = f"{_PAYOUT_COLUMNS}, {subject_read('payouts')}"
# A row is visible to the principal $2 (``<tenant slot>/<subject>``) when a principal of
# the same tenant wrote it, and to everyone when $2 is NULL (the processor's own reads).
_SAME_TENANT = ("($2::text IS NULL OR split_part(principal, '/', 1) = "
                "split_part($2::text, '/', 1))")


_DISPUTE_COLUMNS = (
    "id, payment_id, provider, provider_dispute_id, merchant_account_id, amount, fee, "
    "currency, status, reason, evidence_due_at, hold_transfer_id, evidence, error, created_at"
)
_EVIDENCE = msgspec.json.Decoder(Evidence)


def _dispute(row: asyncpg.Record) -> Dispute:
    values = dict(row)
    values["status"] = DisputeStatus(values["status"])
    evidence = values["evidence"]
    values["evidence"] = None if evidence is None else _EVIDENCE.decode(evidence)
    return Dispute(**values)


def _dispute_event(dispute: Dispute) -> dict[str, Any]:
    """A dispute event's data: the dispute as it stands, without its evidence (which may be
    long, and which consumers read with GET /v1/disputes/{id} if they need it)."""
    payload: dict[str, Any] = msgspec.to_builtins(dispute)
    payload.pop("evidence", None)
    return payload


def _tenant_slot_of(principal: str | None) -> int:
    """The tenant slot of a stored principal; 0 (the processor's) for none or one written
    before principals named their tenant (migration 0010)."""
    try:
        return tenant_of_principal(principal) if principal else 0
    except ValueError:
        return 0


def _ts(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


def _step(row: asyncpg.Record | dict[str, Any]) -> Step:
    values = dict(row)
    values["kind"] = Kind(values["kind"])
    values["phase"] = Phase(values["phase"])
    values["tried"] = tuple(values["tried"])
    return Step(**values)


def _payment(row: asyncpg.Record, subjects: SubjectKeys | None) -> Payment:
    values = dict(row)
    values["status"] = PaymentStatus(values["status"])
    values["metadata"] = _METADATA.decode(values["metadata"])
    values |= _opened(values, subjects)
    return Payment(**values)


def _payout(row: asyncpg.Record, subjects: SubjectKeys | None) -> Payout:
    values = dict(row)
    values["status"] = PayoutStatus(values["status"])
    values["metadata"] = _METADATA.decode(values["metadata"])
    values |= _opened(values, subjects)
    return Payout(**values)


def _opened(values: dict[str, Any], subjects: SubjectKeys | None) -> dict[str, Any]:
    """The personal fields of a row read with ``_PAYMENT_READ`` or ``_PAYOUT_READ`` (the
    columns that open them removed from ``values``)."""
    if subjects is None:
        require(values.pop("subject_key_id") is None,
                "a store that reads data subjects' rows holds the master key")
        values.pop("personal")
        values.pop("subject_key")
        return {}
    return subjects.opened(values["id"], values)


# jsonb travels as text (no codec is set on the pool): metadata is encoded and decoded here.
_METADATA = msgspec.json.Decoder(dict[str, str])
_JSON = msgspec.json.Encoder()
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _micros(moment: dt.datetime) -> int:
    """Microseconds since the epoch, exactly (a list cursor's position)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _moment(micros: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=micros)


class Where:
    """A list query's conditions, each value a parameter ($n) of its own: a condition is
    SQL with ``{}`` where its values go (the statement's text never holds a value)."""

    def __init__(self, first: str = "TRUE", *values: Any) -> None:
        self.conditions: list[str] = []
        self.args: list[Any] = []
        self.add(first, *values)

    def add(self, condition: str, *values: Any) -> None:
        self.conditions.append(condition.format(*(self.param(v) for v in values)))

    def add_if(self, condition: str, value: Any) -> None:
        """``add`` when ``value`` is given (not None): an optional filter."""
        if value is not None:
            self.add(condition, value)

    def param(self, value: Any) -> str:
        """A further parameter (a LIMIT, say); its placeholder."""
        self.args.append(value)
        return f"${len(self.args)}"

    def sql(self) -> str:
        return " AND ".join(self.conditions)


def _list_where(flt: ListFilter, tenant: str, prefix: str, *, step: bool = False) -> Where:
    """The conditions of a list's filter over the table aliased ``prefix``."""
    where = Where("split_part(p.principal, '/', 1) = {}", tenant)
    if flt.status is not None:
        if not step:
            where.add(f"{prefix}.status = {{}}", flt.status)
        elif flt.status == "processing":
            where.add(f"{prefix}.phase <> ALL({{}}::text[])", _FINAL)
        else:
            where.add(f"{prefix}.phase = {{}}", flt.status)
    if flt.merchant_account_id is not None:
        where.add(f"{prefix}.merchant_account_id = {{}}", flt.merchant_account_id)
    if flt.created_gte_us is not None:
        where.add(f"{prefix}.created_at >= {{}}", _moment(flt.created_gte_us))
    if flt.created_lt_us is not None:
        where.add(f"{prefix}.created_at < {{}}", _moment(flt.created_lt_us))
    if flt.reference is not None:
        where.add(f"{prefix}.reference = {{}}", flt.reference)
    if flt.payment_id is not None:
        column = "subject_id" if step else "payment_id"  # a refund step's, a dispute's
        where.add(f"{prefix}.{column} = {{}}", flt.payment_id)
    if flt.metadata:
        where.add(f"{prefix}.metadata @> {{}}::jsonb", _JSON.encode(flt.metadata).decode())
    if flt.after is not None:
        after_id: Any = int(flt.after.id) if step else flt.after.id
        where.add(f"({prefix}.created_at, {prefix}.id) < ({{}}, {{}})",
                  _moment(flt.after.created_us), after_id)
    return where


def _event(obj: Payment | Payout) -> dict[str, Any]:
    """What downstream consumers are told: the object without its payment-method token and
    request identity (they need neither, and every copy of a token is one more to guard).
    An erased object's personal fields are null; one without a data subject has neither
    ``customer_ref`` nor ``erased``, as before subjects existed."""
    payload: dict[str, Any] = msgspec.to_builtins(obj)
    for private in ("payment_method", "request_key", "destination"):
        payload.pop(private, None)
    if obj.erased:
        return erased_object(payload)
    if not obj.customer_ref:
        payload.pop("customer_ref", None)
        payload.pop("erased", None)
    return payload


class _Listed(Protocol):
    """What a listed object gives its cursor: its id and when it was created."""

    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> dt.datetime | None: ...


def _next(page: Sequence[_Listed], more: bool) -> Position | None:
    """Where the next page starts: after this page's last row, if more rows follow."""
    if not more:
        return None
    last = page[-1]
    if last.created_at is None:
        raise ValueError("a stored row has its creation time")
    return Position(_micros(last.created_at), last.id)


def _review_event(step: Step) -> dict[str, Any]:
    """The ``requires_review`` event: which step of which object, where it stands."""
    return {"step_id": step.id, "subject_id": step.subject_id, "kind": step.kind.value,
            "phase": step.phase.value, "provider": step.provider, "amount": step.amount,
            "currency": step.currency, "checks": step.checks}


def _step_values(step: Step) -> tuple[Any, ...]:
    return (step.id, step.subject_id, step.kind.value, step.phase.value, step.amount,
            step.currency, step.provider, step.provider_key, step.transfer_id,
            step.merchant_account_id, step.payment_method, step.destination,
            step.hold_transfer_id, step.auth_ref, step.provider_ref, list(step.tried),
            step.decline_code, step.error, step.version, step.origin, step.final_capture,
            step.capture_id, step.hold_amount, step.hold_timeout_s)


# The parameters of a new step's row, in the order ``_step_ctes`` names them.
_STEP_INSERT_PARAMS = 27


def _step_insert_values(step: Step, due_at_s: float, request_key: str = "",
                        metadata: dict[str, str] | None = None) -> tuple[Any, ...]:
    values = (*_step_values(step), _ts(due_at_s), request_key,
              _JSON.encode(metadata or {}).decode())
    require(len(values) == _STEP_INSERT_PARAMS, "a new step has all its parameters")
    return values


def _step_ctes(first: int, *, gate: str | None) -> str:
    """CTEs that insert a new step (parameters ``$first`` on, ``_step_insert_values``), its
    provider key and its first log line; with ``gate``, only if the
    CTE of that name yields a row (the payment it belongs to was created)."""
    params = ",".join(f"${n}" for n in range(first, first + _STEP_INSERT_PARAMS - 1))
    source = (f"VALUES ({params},${first + _STEP_INSERT_PARAMS - 1}::jsonb)" if gate is None
              else f"SELECT {params},${first + _STEP_INSERT_PARAMS - 1}::jsonb FROM {gate}")
    return (f"s AS (INSERT INTO payment_steps ({_STEP_COLUMNS}, due_at, request_key, metadata) "
            f"{source} RETURNING id, version, phase, provider, provider_key), "
            "k AS (INSERT INTO payment_step_keys (provider_key, step_id) "
            "SELECT provider_key, id FROM s), "
            "l AS (INSERT INTO payment_step_log (step_id, version, phase, provider, detail) "
            "SELECT id, version, phase, provider, 'created' FROM s)")


def _step_conflict(exc: asyncpg.UniqueViolationError) -> NoReturn:
    """What a refused step insert means to the request: always raises."""
    if exc.constraint_name == "payment_steps_one_open":
        raise PaymentError("operation_in_progress",
                           "another operation on this payment is still running") from exc
    if exc.constraint_name == "payment_steps_request":
        raise PaymentError("step_exists", "this request already started its step") from exc
    raise exc



@dataclasses.dataclass(slots=True)
class KeyHold:
    """The Idempotency-Key a request holds while it runs, filled in by ``Idempotent.run``
    once claimed. ``answered``: the request's last write stored its final answer under the
    key too (``save_step`` with ``answer``), so there is nothing left to complete.

    ``deferred``: the key is not claimed yet; the request's first write claims it in the
    same statement (``create_payment``), which then fills in ``claim``, or writes nothing
    and raises ``KeyTaken`` when the key is held or answered already. ``fingerprint``,
    ``now_s`` and ``retention_s`` are what that claim stores."""

    principal: str = ""
    key: str = ""
    claim: int = 0
    answered: bool = False
    deferred: bool = False
    fingerprint: bytes = b""
    now_s: float = 0.0
    retention_s: float = 0.0


class KeyTaken(Exception):
    """A deferred claim found its Idempotency-Key held by another request, or answered:
    the statement that was to claim it wrote nothing. The caller decides as for any
    claim that failed (``processor.payments.decide``)."""


def _claim_sql(first: int, *, answered: bool = False) -> str:
    """An INSERT that claims an Idempotency-Key as ``claim_key`` does for a free key
    (parameters ``$first`` on: principal, key, fingerprint, claimed at, expires at, claim),
    returning a row if it did. ``answered``: the key is stored completed at once, with the
    answer's status and body (two more parameters)."""
    p = [f"${n}" for n in range(first, first + 8)]
    state = "'completed'" if answered else "'in_flight'"
    answer = f"{p[6]}::integer, {p[7]}::bytea" if answered else "0, ''"
    return ("INSERT INTO idempotency_keys (principal, key, fingerprint, state, claimed_at, "
            f"expires_at, claim, status, body) VALUES ({p[0]}::text, {p[1]}::text, "
            f"{p[2]}::bytea, {state}, {p[3]}::timestamptz, {p[4]}::timestamptz, "
            f"{p[5]}::bigint, {answer}) "
            "ON CONFLICT (principal, key) DO UPDATE SET fingerprint=EXCLUDED.fingerprint, "
            "state=EXCLUDED.state, status=EXCLUDED.status, body=EXCLUDED.body, "
            "claimed_at=EXCLUDED.claimed_at, expires_at=EXCLUDED.expires_at, "
            f"claim=EXCLUDED.claim WHERE idempotency_keys.expires_at <= {p[3]}::timestamptz "
            "RETURNING 1")


def _new_claim() -> int:
    """A claim's fence: random, never 0 (0 means not claimed)."""
    return secrets.randbits(63) | 1


def _claim_values(hold: KeyHold) -> tuple[tuple[Any, ...], int]:
    """The parameters of ``_claim_sql`` for a deferred hold, and the claim they store."""
    claim = _new_claim()
    return ((hold.principal, hold.key, hold.fingerprint, _ts(hold.now_s),
             _ts(hold.now_s + hold.retention_s), claim), claim)


def _audit_cte(audit: AuditSlot | None, first: int) -> tuple[str, tuple[Any, ...]]:
    """A CTE that writes a request's audit record handed over by the edge (processor/
    request_audit.py), with parameters ``$first`` on, and its values; nothing when there is
    none or it is written. A data-modifying CTE runs whatever the statement's other parts
    do, so the record is written whenever the statement is."""
    if audit is None or audit.written:
        return "", ()
    params = ",".join(f"${n}" for n in range(first, first + len(AUDIT_COLUMNS)))
    return (f"audit AS (INSERT INTO audit_requests ({','.join(AUDIT_COLUMNS)}) "
            f"VALUES ({params}) ON CONFLICT (id) DO NOTHING)", row_of(audit.record))


def _with_audit(sql: str, audit: AuditSlot | None, first: int
                ) -> tuple[str, tuple[Any, ...]]:
    """``sql`` (a statement with no WITH of its own) preceded by ``_audit_cte``'s CTE, and
    that CTE's values to append to the statement's."""
    audit_cte, audit_values = _audit_cte(audit, first)
    if not audit_cte:
        return sql, ()
    return f"WITH {audit_cte} {sql}", audit_values


class _Retry(Exception):
    """Roll a dispute's transaction back: it changed since it was read."""


class PaymentStore:
    def __init__(self, pool: asyncpg.Pool, *, master: MasterKey | None = None) -> None:
        """``master``: the deployment's master key (processor/privacy.py), without which
        the store refuses to write or read payments that name a data subject."""
        self._pool = pool
        self._subjects = None if master is None else SubjectKeys(pool, master)
        # Step and transfer ids taken from the sequences a block at a time (STEP_ID_BLOCK):
        # one round trip per block instead of one per step. Unused ones are a harmless gap.
        self._free_ids: collections.deque[tuple[int, int]] = collections.deque()
        self._refilling = asyncio.Lock()

    @classmethod
    async def connect(cls, dsn: str, *, pool_size_max: int, connect_timeout_s: float,
                      command_timeout_s: float, session_nice: int = 0,
                      acquire_timeout_s: float = 2.0,
                      master: MasterKey | None = None) -> PaymentStore:
        """A pool of at most ``pool_size_max`` connections; ``session_nice`` lowers the CPU
        priority of their backends when the server runs on this machine (priority.py).
        Waiting for a free connection ends in ``TimeoutError`` after ``acquire_timeout_s``
        (``DATABASE_UNREACHABLE``: answered 503)."""

        async def init(conn: asyncpg.Connection) -> None:
            lower_session_priority(conn.get_server_pid(), session_nice)

        pool = await bounded_pool(
            dsn, acquire_timeout_s=acquire_timeout_s, min_size=1, max_size=pool_size_max,
            timeout=connect_timeout_s, command_timeout=command_timeout_s,
            init=init if session_nice else None, reset=keep_session)
        return cls(pool, master=master)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def close(self) -> None:
        await self._pool.close()

    # -- data subjects (processor/privacy.py) -------------------------------------------------

    async def _sealed(self, obj: Payment | Payout, principal: str
                      ) -> tuple[str, str, bytes | None, int | None]:
        """What a new row stores of ``obj``'s personal fields: its clear ``reference`` and
        ``metadata`` (JSON), its sealed fields and its subject's key id. Without a data
        subject the fields are stored in clear as they always were; with one, sealed with
        the subject's key (one upsert the first time this store meets the subject)."""
        if not obj.customer_ref:
            return obj.reference, _JSON.encode(obj.metadata).decode(), None, None
        subjects = self._subjects
        if subjects is None:
            raise InvariantError("a store that writes data subjects' rows holds the master key")
        key_id, key = await subjects.key_for(tenant_of_principal(principal), obj.customer_ref)
        personal = Personal(customer_ref=obj.customer_ref, reference=obj.reference,
                            metadata=obj.metadata)
        return "", "{}", subjects.seal(key, personal, row_id=obj.id), key_id

    async def clearing_per_partition(self) -> bool:
        """Whether this ledger's payments post against a clearing account per ledger
        placement (migration 0034, docs/payments.md "Ledger model")."""
        return bool(await self._pool.fetchval(
            "SELECT clearing_per_partition FROM payments_layout"))

    # -- ids ----------------------------------------------------------------------------------

    async def new_step_ids(self) -> tuple[int, int]:
        """A fresh step id and the first of its four ledger transfer ids, each higher than
        any this store handed out before, so that ids follow the order steps are created
        in (which is the order they are read in, ``_IN_CREATION_ORDER``). The block of ids
        is refilled by one request at a time, when it is empty: requests that found it
        empty together used to fetch a block each and append it whenever their answer
        came, and a block given out first but answered last put lower ids after higher
        ones."""
        if not self._free_ids:
            async with self._refilling:
                if not self._free_ids:
                    rows = await self._pool.fetch(
                        "SELECT nextval('payment_step_ids') AS step, "
                        "nextval('payment_transfer_ids') AS transfer "
                        "FROM generate_series(1, $1)", STEP_ID_BLOCK)
                    self._free_ids.extend((int(r["step"]), int(r["transfer"])) for r in rows)
        return self._free_ids.popleft()

    # -- creating -----------------------------------------------------------------------------

    async def create_payment(self, payment: Payment, step: Step | None, *, principal: str,
                             due_at_s: float, hold: KeyHold | None = None,
                             audit: AuditSlot | None = None) -> bool:
        """The payment, its authorization step and its event, in one statement (so one
        round trip and one commit; None: refused by the risk check before any step). False
        if a payment with this id exists: the same request executed before (its id derives
        from the Idempotency-Key).

        With a ``deferred`` hold, the same statement claims the request's Idempotency-Key
        first and writes the rest only if it did: the claim costs no statement or commit of
        its own. The claim is then in ``hold.claim``; ``KeyTaken`` (nothing written) when
        the key was held or answered.

        ``audit``, when not yet written, is written by the same statement, whatever else it
        writes (``KeyTaken`` and an existing payment included), and marked written."""
        reference, metadata, personal, key_id = await self._sealed(payment, principal)
        values = (payment.id, payment.merchant_account_id, payment.amount, payment.currency,
                  payment.payment_method, payment.status.value, payment.provider,
                  payment.provider_ref, payment.hold_transfer_id, payment.captured_amount,
                  payment.refunded_amount, payment.decline_code, payment.error,
                  payment.risk_reason, payment.risk_source, reference,
                  payment.auto_capture, payment.request_key, payment.capturable_amount,
                  metadata, payment.created_at, principal, personal, key_id)
        event = (f"payment.{payment.status.value}", outbox.event_payload(_event(payment)),
                 principal.split("/", 1)[0])
        first = len(values) + len(event) + 1
        steps = "" if step is None else _step_ctes(first, gate="created") + ", "
        step_values = () if step is None else _step_insert_values(step, due_at_s)
        claim_values: tuple[Any, ...] = ()
        claim = 0
        columns = ("$1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,"
                   "$20::jsonb,coalesce($21::timestamptz, now()),$22,$23,$24")
        row = f"VALUES ({columns})"
        claiming = hold if hold is not None and hold.deferred else None
        if claiming is not None:
            claim_values, claim = _claim_values(claiming)
            # The payment's row only if the key was claimed: a SELECT from the claim.
            row = f"SELECT {columns} FROM claimed"
        audit_cte, audit_values = _audit_cte(
            audit, first + len(step_values) + len(claim_values))
        sql = ("WITH " + (f"{audit_cte}, " if audit_cte else "")
               + (f"claimed AS ({_claim_sql(first + len(step_values))}), " if claiming
                  is not None else "")
               + f"created AS (INSERT INTO payments ({_PAYMENT_COLUMNS}, principal, "
               f"personal, subject_key_id) {row} "
               "ON CONFLICT (id) DO NOTHING RETURNING id), "
               + steps
               + outbox.event_ctes(event_type="$25", aggregate_id="$1", payload="$26",
                                   tenant="$27", gate="created")
               + " SELECT (SELECT count(*) FROM created), "
               + ("(SELECT count(*) FROM claimed)" if claiming is not None else "1"))
        try:
            created, claimed = await self._pool.fetchrow(
                sql, *values, *event, *step_values, *claim_values, *audit_values)
        except asyncpg.UniqueViolationError as exc:
            _step_conflict(exc)
        if audit is not None:
            audit.written = True
        if claiming is not None:
            if not claimed:
                raise KeyTaken
            claiming.claim, claiming.deferred = claim, False
        return bool(created)

    async def create_payout(self, payout: Payout, step: Step, *, principal: str,
                            due_at_s: float) -> bool:
        reference, metadata, personal, key_id = await self._sealed(payout, principal)
        async with self._pool.acquire() as conn, conn.transaction():
            created = await conn.fetchval(
                f"INSERT INTO payouts ({_PAYOUT_COLUMNS}, principal, personal, subject_key_id) "
                "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12::jsonb,"
                "coalesce($13::timestamptz, now()),$14,$15,$16) "
                "ON CONFLICT (id) DO NOTHING RETURNING true",
                payout.id, payout.merchant_account_id, payout.amount, payout.currency,
                payout.destination, payout.status.value, payout.provider, payout.provider_ref,
                payout.decline_code, payout.error, reference, metadata, payout.created_at,
                principal, personal, key_id)
            if not created:
                return False
            await self._insert_step(conn, step, due_at_s)
            await outbox.enqueue(conn, event_type="payout.processing", aggregate_id=payout.id,
                                 payload=_event(payout))
        return True

    async def reopen_payment(self, payment_id: str, step: Step, *, due_at_s: float) -> bool:
        """Try an authorization again on a payment whose last one did nothing (every
        provider unavailable): back to processing, with a new authorize step. False if the
        payment is no longer in that state (a concurrent retry got there first)."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE payments SET status='processing', error='', decline_code='', "
                f"provider=$2, updated_at=now() WHERE id=$1 AND status='failed' "
                f"AND error='provider_unavailable' RETURNING {_PAYMENT_READ}",
                payment_id, step.provider)
            if row is None:
                return False
            await self._insert_step(conn, step, due_at_s)
            # Every status change writes its event, this one (failed -> processing) too.
            await outbox.enqueue(conn, event_type="payment.processing", aggregate_id=payment_id,
                                 payload=_event(_payment(row, self._subjects)))
        return True

    async def create_step(self, step: Step, *, due_at_s: float, request_key: str = "",
                          checked: Payment | None = None,
                          metadata: dict[str, str] | None = None) -> None:
        """A further step of an existing payment; refused while another one is open.

        ``checked`` is the payment as the step's rules were checked against it: the step is
        created only if the payment is still exactly that (locked meanwhile), so a step that
        finished between the check and now (a refund, a capture) cannot let this one
        refund or capture more than is left. Otherwise ``operation_in_progress``: the
        request is answered, its key released, and a retry checks again. ``metadata``: the
        client's pairs of a refund (shown in the refunds list).
        """
        async with self._pool.acquire() as conn, conn.transaction():
            if checked is not None:
                row = await conn.fetchrow(
                    f"SELECT {_PAYMENT_READ} FROM payments WHERE id=$1 FOR UPDATE",
                    checked.id)
                if row is None or _payment(row, self._subjects) != checked:
                    raise PaymentError("operation_in_progress",
                                       "the payment changed while this operation was checked")
            await self._insert_step(conn, step, due_at_s, request_key, metadata)

    async def step_by_request(self, subject_id: str, request_key: str) -> Step | None:
        row = await self._pool.fetchrow(
            f"SELECT {_STEP_READ} FROM payment_steps WHERE subject_id=$1 AND request_key=$2",
            subject_id, request_key)
        return None if row is None else _step(row)

    async def _insert_step(self, conn: asyncpg.Connection, step: Step, due_at_s: float,
                           request_key: str = "", metadata: dict[str, str] | None = None
                           ) -> None:
        try:
            # One statement: the step, its provider key and its first log line.
            await conn.execute(
                "WITH " + _step_ctes(1, gate=None) + " SELECT 1",
                *_step_insert_values(step, due_at_s, request_key, metadata))
        except asyncpg.UniqueViolationError as exc:
            _step_conflict(exc)

    async def _log(self, conn: asyncpg.Connection, step: Step, detail: str) -> None:
        await conn.execute(
            "INSERT INTO payment_step_log (step_id, version, phase, provider, detail) "
            "VALUES ($1, $2, $3, $4, $5)",
            step.id, step.version, step.phase.value, step.provider, detail[:200])

    # -- advancing ----------------------------------------------------------------------------

    async def save_step(self, before: Step, after: Step, *, due_at_s: float, detail: str = "",
                        webhook: tuple[str, str] | None = None,
                        payment: Payment | None = None, hold: KeyHold | None = None,
                        answer: Callable[[Step], tuple[int, bytes] | None] | None = None
                        ) -> Step | None:
        """Write ``after`` over ``before`` if nobody else has written the step since.

        Returns the stored step (its version one higher), or None when the step was taken
        over (the caller stops) or, with ``webhook``, when that event was already applied.
        A step reaching a final phase updates its payment or payout, and emits their
        event, in the same transaction. ``payment``: the payment of an authorization as
        its request created it, so that finishing the authorization needs no read of it
        (``_finish_authorization``); with it, ``hold`` and ``answer`` (the request's answer
        given the stored step) store that answer under the request's key in the same
        statement, and mark the hold ``answered`` (``answer`` gives None for an answer that
        is not to be kept: it is not final).
        """
        stored = msgspec.structs.replace(after, version=before.version + 1)
        if (payment is not None and webhook is None and stored.final
                and stored.kind == Kind.AUTHORIZE and payment.id == stored.subject_id
                and payment.status == PaymentStatus.PROCESSING
                and await self._finish_authorization(before, stored, payment, due_at_s,
                                                     detail, hold, answer)):
            return stored
        if webhook is None and not stored.final and stored.provider_key == before.provider_key:
            # The common case, one statement (so one round trip, atomic by itself): the
            # fenced update and its log line.
            done = await self._pool.fetchval(
                "WITH updated AS (UPDATE payment_steps SET phase=$3, provider=$4, "
                "provider_ref=$5, tried=$6, decline_code=$7, error=$8, version=$9, "
                "due_at=$10, updated_at=now(), review_since=NULL WHERE id=$1 AND version=$2 "
                "RETURNING id) "
                "INSERT INTO payment_step_log (step_id, version, phase, provider, detail) "
                "SELECT id, $9, $3, $4, $11 FROM updated RETURNING true",
                before.id, before.version, stored.phase.value, stored.provider,
                stored.provider_ref, list(stored.tried), stored.decline_code, stored.error,
                stored.version, _ts(due_at_s), detail[:200])
            return stored if done else None
        async with self._pool.acquire() as conn, conn.transaction():
            if webhook is not None:
                fresh = await conn.fetchval(
                    "INSERT INTO webhook_events (provider, event_id, step_id) VALUES ($1,$2,$3)"
                    " ON CONFLICT DO NOTHING RETURNING true", webhook[0], webhook[1], before.id)
                if not fresh:
                    return None
            # One statement for the fenced update, the new provider key (failover) and the
            # log line: one round trip where three were, on every final step.
            done = await conn.fetchval(
                "WITH updated AS (UPDATE payment_steps SET phase=$3, provider=$4, "
                "provider_key=$5, provider_ref=$6, tried=$7, decline_code=$8, error=$9, "
                "version=$10, due_at=$11, updated_at=now(), review_since=NULL "
                "WHERE id=$1 AND version=$2 RETURNING id), "
                "keyed AS (INSERT INTO payment_step_keys (provider_key, step_id) "
                "SELECT $5, id FROM updated WHERE $12 ON CONFLICT DO NOTHING) "
                "INSERT INTO payment_step_log (step_id, version, phase, provider, detail) "
                "SELECT id, $10, $3, $4, $13 FROM updated RETURNING true",
                before.id, before.version, stored.phase.value, stored.provider,
                stored.provider_key, stored.provider_ref, list(stored.tried),
                stored.decline_code, stored.error, stored.version, _ts(due_at_s),
                stored.provider_key != before.provider_key, detail[:200])
            if not done:
                return None
            if stored.final:
                await self._finish(conn, stored)
        return stored

    async def _finish_authorization(self, before: Step, stored: Step, payment: Payment,
                                    due_at_s: float, detail: str, hold: KeyHold | None,
                                    answer: Callable[[Step], tuple[int, bytes] | None] | None
                                    ) -> bool:
        """The final save of an authorization in one statement (one round trip where the
        general path takes six): the fenced step update, its log line, the payment's new
        state and its event. While an authorization is open its payment is processing and
        only the authorization changes it, and what the authorization's end writes comes
        from the step alone (``payment_after``), so the payment need not be read; the
        statement locks it and checks it is still processing all the same. False when
        nothing was written (the step moved on, or the payment is not processing): the
        caller takes the general path, which finds out which. The answer is stored only
        under the claim the request holds, as ``complete_key`` would."""
        from processor.payments import payment_after

        done = payment_after(payment, stored)
        values = (before.id, before.version, stored.phase.value, stored.provider,
                  stored.provider_key, stored.provider_ref, list(stored.tried),
                  stored.decline_code, stored.error, stored.version, _ts(due_at_s),
                  stored.provider_key != before.provider_key, detail[:200],
                  payment.id, done.status.value, done.provider_ref, done.hold_transfer_id,
                  done.decline_code, done.capturable_amount,
                  f"payment.{done.status.value}", outbox.event_payload(_event(done)),
                  done.error, done.provider)
        kept = answer(stored) if hold is not None and hold.claim and answer else None
        answering = kept is not None
        status, body = kept if kept is not None else (0, b"")
        keyed = (hold.principal, hold.key, hold.claim) if hold is not None else ("", "", 0)
        written = await self._pool.fetchrow(
            "WITH pay AS (SELECT id, split_part(principal, '/', 1) AS tenant FROM payments "
            "WHERE id=$14 AND status='processing' FOR UPDATE), "
            "updated AS (UPDATE payment_steps SET phase=$3, provider=$4, "
            "provider_key=$5, provider_ref=$6, tried=$7, decline_code=$8, error=$9, "
            "version=$10, due_at=$11, updated_at=now(), review_since=NULL "
            "WHERE id=$1 AND version=$2 AND EXISTS (SELECT 1 FROM pay) RETURNING id), "
            "keyed AS (INSERT INTO payment_step_keys (provider_key, step_id) "
            "SELECT $5, id FROM updated WHERE $12 ON CONFLICT DO NOTHING), "
            "logged AS (INSERT INTO payment_step_log (step_id, version, phase, provider, detail) "
            "SELECT id, $10, $3, $4, $13 FROM updated), "
            "paid AS (UPDATE payments SET status=$15, provider=$23, provider_ref=$16, "
            "hold_transfer_id=$17, decline_code=$18, error=$22, capturable_amount=$19, "
            "updated_at=now() WHERE id IN (SELECT id FROM pay) "
            "AND EXISTS (SELECT 1 FROM updated) RETURNING id), "
            + outbox.event_ctes(event_type="$20", aggregate_id="$14", payload="$21",
                                tenant="(SELECT tenant FROM pay)", gate="paid")
            + ", answered AS (UPDATE idempotency_keys SET state='completed', status=$25, "
            "body=$26 WHERE $24 AND principal=$27 AND key=$28 AND claim=$29 "
            "AND state='in_flight' AND EXISTS (SELECT 1 FROM paid) RETURNING 1) "
            "SELECT (SELECT count(*) FROM paid) AS paid, "
            "(SELECT count(*) FROM answered) AS answered",
            *values, answering, status, body, *keyed)
        if hold is not None and written["answered"]:
            hold.answered = True
        return bool(written["paid"])

    async def _finish(self, conn: asyncpg.Connection, step: Step) -> None:
        from processor.payments import payment_after, payout_after

        if step.kind in DISPUTE_KINDS:
            await self._finish_dispute(conn, step)
            return
        if step.kind == Kind.PAYOUT:
            row = await conn.fetchrow(
                f"SELECT {_PAYOUT_READ} FROM payouts WHERE id=$1 FOR UPDATE", step.subject_id)
            payout = payout_after(_payout(row, self._subjects), step)
            await conn.execute(
                "UPDATE payouts SET status=$2, provider=$3, provider_ref=$4, decline_code=$5, "
                "error=$6, updated_at=now() WHERE id=$1",
                payout.id, payout.status.value, step.provider, payout.provider_ref,
                payout.decline_code, payout.error)
            await outbox.enqueue(conn, event_type=f"payout.{payout.status.value}",
                                 aggregate_id=payout.id, payload=_event(payout))
            return
        row = await conn.fetchrow(
            f"SELECT {_PAYMENT_READ} FROM payments WHERE id=$1 FOR UPDATE", step.subject_id)
        before = _payment(row, self._subjects)
        payment = payment_after(before, step)
        if payment == before:
            return
        await conn.execute(
            "UPDATE payments SET status=$2, provider=$3, provider_ref=$4, hold_transfer_id=$5, "
            "captured_amount=$6, refunded_amount=$7, decline_code=$8, error=$9, amount=$10, "
            "capturable_amount=$11, updated_at=now() WHERE id=$1",
            payment.id, payment.status.value, payment.provider, payment.provider_ref,
            payment.hold_transfer_id, payment.captured_amount, payment.refunded_amount,
            payment.decline_code, payment.error, payment.amount, payment.capturable_amount)
        await outbox.enqueue(conn, event_type=f"payment.{payment.status.value}",
                             aggregate_id=payment.id, payload=_event(payment))

    async def claim_due(self, *, now_s: float, claim_ttl_s: float, limit: int) -> list[Step]:
        """Take over unfinished steps whose time has come (a lapsed claim or a recheck)."""
        rows = await self._pool.fetch(
            f"UPDATE payment_steps SET due_at=$2, version=version+1, checks=checks+1 "
            f"WHERE id IN (SELECT id FROM payment_steps WHERE due_at <= $1 "
            f"AND phase <> ALL($3::text[]) AND review_since IS NULL "
            f"ORDER BY due_at LIMIT $4 FOR UPDATE SKIP LOCKED) "
            f"RETURNING {_STEP_READ}",
            _ts(now_s), _ts(now_s + claim_ttl_s), _FINAL, limit)
        return [_step(r) for r in rows]

    async def claim_step(self, step_id: int, *, now_s: float, claim_ttl_s: float) -> Step | None:
        """Take one unfinished step now (a webhook arrived for it), whatever its due time."""
        row = await self._pool.fetchrow(
            f"UPDATE payment_steps SET due_at=$2, version=version+1 WHERE id=$1 "
            f"AND phase <> ALL($3::text[]) RETURNING {_STEP_READ}",
            step_id, _ts(now_s + claim_ttl_s), _FINAL)
        return None if row is None else _step(row)

    # -- the events stream --------------------------------------------------------------------

    async def events_after(self, principal: str, *, after: int, event_type: str | None,
                           limit: int) -> list[dict[str, Any]]:
        """Events after id ``after``, oldest first, of the payments and payouts a principal
        of ``principal``'s tenant created (processor.identity.principal_of), at most
        ``limit``; of one type when ``event_type`` is given."""
        rows = await self._pool.fetch(
            "SELECT e.id, e.event_type, e.aggregate_id, e.payload::text AS payload, "
            "e.created_at FROM events e WHERE e.id > $1 "
            "AND ($2::text IS NULL OR e.event_type = $2) "
            "AND EXISTS (SELECT 1 FROM payments p WHERE p.id = e.aggregate_id "
            "AND split_part(p.principal, '/', 1) = split_part($3, '/', 1) "
            "UNION ALL SELECT 1 FROM payouts o WHERE o.id = e.aggregate_id "
            "AND split_part(o.principal, '/', 1) = split_part($3, '/', 1) "
            "UNION ALL SELECT 1 FROM disputes d WHERE d.id = e.aggregate_id "
            "AND split_part(d.principal, '/', 1) = split_part($3, '/', 1)) "
            "ORDER BY e.id LIMIT $4", after, event_type, principal, limit)
        return [dict(r) for r in rows]

    # -- lists (GET /v1/payments, /v1/payouts, /v1/refunds) -----------------------------------

    async def list_payments(self, tenant: str, flt: ListFilter
                            ) -> tuple[list[tuple[Payment, list[Step]]], Position | None]:
        """A page of the tenant's payments (slot ``tenant``) with their steps, newest first,
        as one snapshot; and the position of its last row when more follow (else None)."""
        where = _list_where(flt, tenant, "p")
        async with (self._pool.acquire() as conn,
                    conn.transaction(isolation="repeatable_read", readonly=True)):
            rows = await conn.fetch(
                f"SELECT {', '.join('p.' + c for c in _PAYMENT_COLUMNS.split(', '))}, "
                f"{subject_read('p')} FROM payments p WHERE {where.sql()} "
                "ORDER BY p.created_at DESC, p.id DESC "
                f"LIMIT {flt.limit + 1:d}", *where.args)
            page = [_payment(r, self._subjects) for r in rows[:flt.limit]]
            steps = await conn.fetch(
                f"SELECT {_STEP_READ} FROM payment_steps WHERE subject_id = ANY($1::text[]) "
                f"{_IN_CREATION_ORDER}", [p.id for p in page])
        by_payment: dict[str, list[Step]] = {p.id: [] for p in page}
        for row in steps:
            by_payment[row["subject_id"]].append(_step(row))
        return [(p, by_payment[p.id]) for p in page], _next(page, len(rows) > flt.limit)

    async def list_payouts(self, tenant: str, flt: ListFilter
                           ) -> tuple[list[Payout], Position | None]:
        """A page of the tenant's payouts, as ``list_payments``."""
        return await self._list("payouts", _PAYOUT_COLUMNS,
                                lambda row: _payout(row, self._subjects), tenant, flt,
                                extra=subject_read("p"))

    async def _list(self, table: str, columns: str, decode: Callable[[asyncpg.Record], _T],
                    tenant: str, flt: ListFilter, *, extra: str = ""
                    ) -> tuple[list[_T], Position | None]:
        """A page of one table's rows of the tenant, newest first, and where the next page
        starts. ``table``, ``columns`` and ``extra`` (further expressions selected) are this
        module's constants, never input."""
        where = _list_where(flt, tenant, "p")
        selected = ", ".join(["p." + c for c in columns.split(", ")] + ([extra] if extra else []))
        rows = await self._pool.fetch(
            f"SELECT {selected} "
            f"FROM {table} p WHERE {where.sql()} ORDER BY p.created_at DESC, p.id DESC "
            f"LIMIT {flt.limit + 1:d}", *where.args)
        page = [decode(r) for r in rows[:flt.limit]]
        return page, _next(page, len(rows) > flt.limit)

    async def list_refunds(self, tenant: str, flt: ListFilter
                           ) -> tuple[list[dict[str, Any]], Position | None]:
        """A page of the tenant's refunds (refund steps, with their payment's id in
        ``subject_id``), as ``list_payments``."""
        where = _list_where(flt, tenant, "s", step=True)
        rows = await self._pool.fetch(
            "SELECT s.id, s.subject_id, s.phase, s.amount, s.currency, s.merchant_account_id, "
            "s.provider, s.decline_code, s.error, s.metadata, s.created_at "
            "FROM payment_steps s JOIN payments p ON p.id = s.subject_id "
            f"WHERE s.kind = 'refund' AND {where.sql()} "
            f"ORDER BY s.created_at DESC, s.id DESC LIMIT {flt.limit + 1:d}", *where.args)
        page = [dict(r) | {"metadata": _METADATA.decode(r["metadata"])}
                for r in rows[:flt.limit]]
        last = None
        if len(rows) > flt.limit:
            last = Position(_micros(page[-1]["created_at"]), str(page[-1]["id"]))
        return page, last

    async def list_disputes(self, tenant: str, flt: ListFilter
                            ) -> tuple[list[Dispute], Position | None]:
        """A page of the tenant's disputes, as ``list_payments``."""
        return await self._list("disputes", _DISPUTE_COLUMNS, _dispute, tenant, flt)

    # -- disputes (processor/payments/disputes.py) --------------------------------------------

    async def payment_by_provider_ref(self, provider: str, provider_ref: str
                                      ) -> Payment | None:
        """The payment whose authorization ``provider`` knows as ``provider_ref``."""
        row = await self._pool.fetchrow(
            f"SELECT {_PAYMENT_READ} FROM payments WHERE provider=$1 AND provider_ref=$2 "
            "AND provider_ref <> '' ORDER BY created_at LIMIT 1", provider, provider_ref)
        return None if row is None else _payment(row, self._subjects)

    async def dispute(self, dispute_id: str, *, principal: str | None = None
                      ) -> Dispute | None:
        """The dispute; with ``principal``, only if its payment is of the same tenant."""
        row = await self._pool.fetchrow(
            f"SELECT {_DISPUTE_COLUMNS} FROM disputes WHERE id=$1 AND {_SAME_TENANT}",
            dispute_id, principal)
        return None if row is None else _dispute(row)

    async def disputed_amount(self, payment_id: str) -> int:
        """What the payment's disputes took or hold: open and lost ones (won ones gave it
        back)."""
        return int(await self._pool.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM disputes WHERE payment_id=$1 "
            "AND status <> 'won'", payment_id))

    async def open_dispute(self, dispute: Dispute, step: Step, *, webhook: tuple[str, str],
                           due_at_s: float, record_webhook: bool = True) -> str:
        """A provider's new dispute: the webhook seen, the dispute, its hold step and its
        ``dispute.needs_response`` event, in one transaction. Returns ``applied``,
        ``duplicate`` (this event was seen), ``ignored`` (the dispute exists already) or
        ``refused:<code>`` (the rules refuse it: nothing but the webhook is written).
        Without ``record_webhook`` the event is not remembered (it is a decision that must
        be applied when the provider sends it again).

        The payment is locked while the rules are checked, so two disputes (or a dispute
        and a refund's step creation, which locks it too) cannot both take the same money.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            if record_webhook:
                fresh = await conn.fetchval(
                    "INSERT INTO webhook_events (provider, event_id, step_id) "
                    "VALUES ($1,$2,$3) ON CONFLICT DO NOTHING RETURNING true",
                    webhook[0], webhook[1], step.id)
                if not fresh:
                    return "duplicate"
            row = await conn.fetchrow(
                "SELECT captured_amount, refunded_amount, principal FROM payments "
                "WHERE id=$1 FOR UPDATE", dispute.payment_id)
            disputed = await conn.fetchval(
                "SELECT coalesce(sum(amount), 0) FROM disputes WHERE payment_id=$1 "
                "AND status <> 'won' AND id <> $2", dispute.payment_id, dispute.id)
            exists = await conn.fetchval("SELECT true FROM disputes WHERE id=$1", dispute.id)
            if exists:
                return "ignored"
            from processor.payments import check_dispute_opening

            try:
                check_dispute_opening(captured=row["captured_amount"],
                                      refunded=row["refunded_amount"], disputed=int(disputed),
                                      amount=dispute.amount, fee=dispute.fee)
            except DisputeError as exc:
                return f"refused:{exc.code}"
            await conn.execute(
                f"INSERT INTO disputes ({_DISPUTE_COLUMNS}, principal) VALUES "
                "($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,NULL,$13,"
                "coalesce($14::timestamptz, now()),$15)",
                dispute.id, dispute.payment_id, dispute.provider, dispute.provider_dispute_id,
                dispute.merchant_account_id, dispute.amount, dispute.fee, dispute.currency,
                dispute.status.value, dispute.reason, dispute.evidence_due_at,
                dispute.hold_transfer_id, dispute.error, dispute.created_at, row["principal"])
            await self._insert_step(conn, step, due_at_s)
            await outbox.enqueue(conn, event_type=f"dispute.{dispute.status.value}",
                                 aggregate_id=dispute.id, payload=_dispute_event(dispute))
        return "applied"

    async def decide_dispute(self, before: Dispute, status: DisputeStatus,
                             step: Step | None, *, webhook: tuple[str, str],
                             due_at_s: float) -> str:
        """The provider's new word on a dispute (under review, won, lost): the webhook seen,
        the new status (only if the dispute is still as read), its event, and the step that
        posts or releases the holds, in one transaction. Returns ``applied``,
        ``duplicate``, or ``retry`` (the dispute changed meanwhile, or one of its steps is
        still running: the provider sends the event again later)."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                fresh = await conn.fetchval(
                    "INSERT INTO webhook_events (provider, event_id, step_id) "
                    "VALUES ($1,$2,$3) ON CONFLICT DO NOTHING RETURNING true",
                    webhook[0], webhook[1], None if step is None else step.id)
                if not fresh:
                    return "duplicate"
                row = await conn.fetchrow(
                    f"UPDATE disputes SET status=$3, updated_at=now() WHERE id=$1 "
                    f"AND status=$2 RETURNING {_DISPUTE_COLUMNS}",
                    before.id, before.status.value, status.value)
                if row is None:
                    raise _Retry
                if step is not None:
                    await self._insert_step(conn, step, due_at_s)
                await outbox.enqueue(conn, event_type=f"dispute.{status.value}",
                                     aggregate_id=before.id, payload=_dispute_event(
                                         _dispute(row)))
        except _Retry:
            return "retry"
        except PaymentError as exc:  # another step of the dispute is still running
            if exc.code != "operation_in_progress":
                raise
            return "retry"
        return "applied"

    async def start_evidence(self, dispute: Dispute, evidence: Evidence, step: Step, *,
                             due_at_s: float, request_key: str) -> None:
        """Store the evidence and create the step that submits it, if the dispute still
        needs a response (``dispute_not_open`` otherwise) and no other step of it is
        running (``operation_in_progress``)."""
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.fetchval(
                "SELECT status FROM disputes WHERE id=$1 FOR UPDATE", dispute.id)
            if status != DisputeStatus.NEEDS_RESPONSE.value:
                raise DisputeError("dispute_not_open",
                                   f"a dispute in status {status} takes no evidence")
            await conn.execute(
                "UPDATE disputes SET evidence=$2::jsonb, updated_at=now() WHERE id=$1",
                dispute.id, _JSON.encode(evidence).decode())
            await self._insert_step(conn, step, due_at_s, request_key)

    async def dispute_evidence(self, dispute_id: str) -> Evidence:
        raw = await self._pool.fetchval("SELECT evidence FROM disputes WHERE id=$1",
                                        dispute_id)
        return Evidence(text="") if raw is None else _EVIDENCE.decode(raw)

    async def _finish_dispute(self, conn: asyncpg.Connection, step: Step) -> None:
        """A dispute's step ended: evidence accepted moves it to ``under_review`` (with its
        event); a failed step leaves its status and says why (``error``); holds the ledger
        refused leave no hold to resolve (``hold_transfer_id`` 0)."""
        row = await conn.fetchrow(
            f"SELECT {_DISPUTE_COLUMNS} FROM disputes WHERE id=$1 FOR UPDATE", step.subject_id)
        before = _dispute(row)
        after = before
        if step.phase == Phase.SUCCEEDED:
            if step.kind == Kind.DISPUTE_EVIDENCE and (
                    before.status == DisputeStatus.NEEDS_RESPONSE):
                after = msgspec.structs.replace(before, status=DisputeStatus.UNDER_REVIEW,
                                                error="")
        else:
            after = msgspec.structs.replace(before, error=step.error or step.phase.value)
            if step.kind == Kind.DISPUTE_HOLD:
                after = msgspec.structs.replace(after, hold_transfer_id=0)
        if after == before:
            return
        await conn.execute(
            "UPDATE disputes SET status=$2, error=$3, hold_transfer_id=$4, updated_at=now() "
            "WHERE id=$1", after.id, after.status.value, after.error, after.hold_transfer_id)
        if after.status != before.status:
            await outbox.enqueue(conn, event_type=f"dispute.{after.status.value}",
                                 aggregate_id=after.id, payload=_dispute_event(after))

    # -- steps for an operator (requires_review) ---------------------------------------------

    async def flag_for_review(self, *, now_s: float, review_after_s: float,
                              limit: int) -> list[Step]:
        """Set aside steps still unfinished ``review_after_s`` after they started and held by
        no live runner (due for a recheck): the recovery worker stops taking them up. Each
        gets a log line and a ``<payment|payout>.requires_review`` event, in one transaction.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"UPDATE payment_steps SET review_since=$1, version=version+1 "
                f"WHERE id IN (SELECT id FROM payment_steps WHERE due_at <= $1 "
                f"AND phase <> ALL($3::text[]) AND review_since IS NULL AND created_at <= $2 "
                f"ORDER BY due_at LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING {_STEP_READ}",
                _ts(now_s), _ts(now_s - review_after_s), _FINAL, limit)
            steps = [_step(r) for r in rows]
            for step in steps:
                await self._log(conn, step, f"requires review after {step.checks} rechecks")
                owner = ("payout" if step.kind == Kind.PAYOUT
                         else "dispute" if step.kind in DISPUTE_KINDS else "payment")
                await outbox.enqueue(conn, event_type=f"{owner}.requires_review",
                                     aggregate_id=step.subject_id, payload=_review_event(step))
        return steps

    async def steps_in_review(self) -> list[dict[str, Any]]:
        """Every step set aside for an operator, oldest first (no payment-method token)."""
        rows = await self._pool.fetch(
            "SELECT id, subject_id, kind, phase, provider, provider_key, amount, currency, "
            "checks, error, extract(epoch FROM review_since) AS review_since_s, "
            "extract(epoch FROM created_at) AS created_at_s FROM payment_steps "
            "WHERE review_since IS NOT NULL ORDER BY review_since, id")
        return [dict(r) for r in rows]

    async def review_count(self) -> int:
        return int(await self._pool.fetchval(
            "SELECT count(*) FROM payment_steps WHERE review_since IS NOT NULL"))

    async def retry_reviewed(self, step_id: int, *, now_s: float, operator: str,
                             reason: str, actor: AuditActor | None = None,
                             request_id: str = "") -> Step | None:
        """An operator hands a step in review back to the recovery worker, due now and with
        its backoff started over; the step's log records who and why. None if the step is
        not in review. With ``actor``, the resolution is also a
        ``payment_step.review_resolved`` audit event, in the same transaction, of the
        tenant of the step's payment, payout or dispute."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE payment_steps SET review_since=NULL, checks=0, due_at=$2, "
                f"version=version+1, updated_at=now() WHERE id=$1 AND review_since IS NOT NULL "
                f"RETURNING {_STEP_READ}", step_id, _ts(now_s))
            if row is None:
                return None
            step = _step(row)
            await self._log(conn, step, f"review: retried by {operator}: {reason}")
            if actor is not None:
                principal = await conn.fetchval(
                    "SELECT principal FROM payments WHERE id = $1 UNION ALL "
                    "SELECT principal FROM payouts WHERE id = $1 UNION ALL "
                    "SELECT principal FROM disputes WHERE id = $1 LIMIT 1", step.subject_id)
                await record_audit_event(
                    conn, actor=actor, action="payment_step.review_resolved",
                    target_kind="payment_step", target_id=str(step.id),
                    tenant_slot=_tenant_slot_of(principal),
                    details={"resolution": "retry", "operator": operator, "reason": reason,
                             "subject_id": step.subject_id, "kind": step.kind.value},
                    request_id=request_id)
        return step

    # -- reading ------------------------------------------------------------------------------

    async def payment(self, payment_id: str, *, principal: str | None = None
                      ) -> Payment | None:
        """The payment; with ``principal``, only if a principal of the same tenant created
        it (``processor.identity.principal_of``; others are told it does not exist)."""
        row = await self._pool.fetchrow(
            f"SELECT {_PAYMENT_READ} FROM payments WHERE id=$1 AND {_SAME_TENANT}",
            payment_id, principal)
        return None if row is None else _payment(row, self._subjects)

    async def payment_with_steps(self, payment_id: str, *, principal: str | None = None
                                 ) -> tuple[Payment, list[Step]] | None:
        """The payment and its steps as one snapshot, as ``payment`` sees it; read apart, a
        step finishing in between shows a capture succeeded on a payment still authorized."""
        async with (self._pool.acquire() as conn,
                    conn.transaction(isolation="repeatable_read", readonly=True)):
            row = await conn.fetchrow(
                f"SELECT {_PAYMENT_READ} FROM payments WHERE id=$1 AND {_SAME_TENANT}",
                payment_id, principal)
            if row is None:
                return None
            steps = await conn.fetch(
                f"SELECT {_STEP_READ} FROM payment_steps WHERE subject_id=$1 {_IN_CREATION_ORDER}",
                payment_id)
        return _payment(row, self._subjects), [_step(r) for r in steps]

    async def payout(self, payout_id: str, *, principal: str | None = None) -> Payout | None:
        row = await self._pool.fetchrow(
            f"SELECT {_PAYOUT_READ} FROM payouts WHERE id=$1 AND {_SAME_TENANT}",
            payout_id, principal)
        return None if row is None else _payout(row, self._subjects)

    async def record_webhook(self, provider: str, event_id: str) -> bool:
        """Remember an event that changes nothing; False if it was seen before."""
        fresh = await self._pool.fetchval(
            "INSERT INTO webhook_events (provider, event_id) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING RETURNING true", provider, event_id)
        return bool(fresh)

    async def webhook_seen(self, provider: str, event_id: str) -> bool:
        return bool(await self._pool.fetchval(
            "SELECT true FROM webhook_events WHERE provider=$1 AND event_id=$2",
            provider, event_id))

    async def step_for_event(self, provider_key: str, provider: str, event_id: str
                             ) -> tuple[Step | None, bool | None]:
        """The step a provider's event is about (None if none), and in the same statement
        the event remembered when it can change nothing: no such step, one in a phase no
        event moves (``EVENT_INERT_PHASES``: final, or past the provider's answer, which is
        when the provider's own event about it usually arrives), or one another provider
        handles. The second value says whether it was new then (False: a duplicate), None
        when the step may still move (the caller decides, and records the event with the
        step's change)."""
        row = await self._pool.fetchrow(
            f"WITH st AS (SELECT {', '.join('s.' + c for c in _STEP_READ.split(', '))} "
            "FROM payment_step_keys k JOIN payment_steps s ON s.id = k.step_id "
            "WHERE k.provider_key = $1), "
            "inert AS (SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM st "
            "WHERE st.provider = $2 AND NOT st.phase = ANY ($4::text[]))), "
            "recorded AS (INSERT INTO webhook_events (provider, event_id) "
            "SELECT $2, $3 FROM inert ON CONFLICT DO NOTHING RETURNING true) "
            "SELECT EXISTS (SELECT 1 FROM inert) AS inert, "
            "EXISTS (SELECT 1 FROM recorded) AS fresh, st.* "
            "FROM (SELECT 1) AS one LEFT JOIN st ON true",
            provider_key, provider, event_id, _EVENT_INERT)
        values = dict(row)
        inert, fresh = values.pop("inert"), values.pop("fresh")
        step = None if values["id"] is None else _step(values)
        return step, (bool(fresh) if inert else None)

    async def record_inert_events(self, provider: str, events: list[tuple[str, str]]
                                  ) -> list[bool | None]:
        """For each (provider key, event id) of a provider's batch, in one statement, what
        ``step_for_event`` says of it: the event remembered if its step cannot move (none,
        inert, or another provider's) and whether it was new then (False: a duplicate,
        of an earlier batch or of an earlier event in this one); None for an event whose
        step may still move, which is left to ``step_for_event`` and the engine."""
        rows = await self._pool.fetch(
            "WITH ev AS (SELECT e.key, e.event_id, e.n FROM unnest($1::text[], $2::text[]) "
            "WITH ORDINALITY AS e(key, event_id, n)), "
            "movable AS (SELECT ev.n FROM ev JOIN payment_step_keys k "
            "ON k.provider_key = ev.key JOIN payment_steps s ON s.id = k.step_id "
            "WHERE s.provider = $3 AND NOT s.phase = ANY ($4::text[])), "
            "first AS (SELECT DISTINCT ON (ev.event_id) ev.n, ev.event_id FROM ev "
            "WHERE ev.n NOT IN (SELECT n FROM movable) ORDER BY ev.event_id, ev.n), "
            "recorded AS (INSERT INTO webhook_events (provider, event_id) "
            "SELECT $3, event_id FROM first ON CONFLICT DO NOTHING RETURNING event_id) "
            "SELECT ev.n IN (SELECT n FROM movable) AS movable, EXISTS (SELECT 1 FROM first f "
            "JOIN recorded r ON r.event_id = f.event_id WHERE f.n = ev.n) AS fresh "
            "FROM ev ORDER BY ev.n",
            [k for k, _ in events], [e for _, e in events], provider, _EVENT_INERT)
        return [None if r["movable"] else bool(r["fresh"]) for r in rows]

    async def step_by_key(self, provider_key: str) -> Step | None:
        row = await self._pool.fetchrow(
            f"SELECT {', '.join('s.' + c for c in _STEP_READ.split(', '))} "
            "FROM payment_step_keys k JOIN payment_steps s ON s.id = k.step_id "
            "WHERE k.provider_key = $1", provider_key)
        return None if row is None else _step(row)

    async def steps_of(self, subject_id: str) -> list[Step]:
        rows = await self._pool.fetch(
            f"SELECT {_STEP_READ} FROM payment_steps WHERE subject_id=$1 {_IN_CREATION_ORDER}",
            subject_id)
        return [_step(r) for r in rows]

    async def backlog(self, *, now_s: float) -> dict[str, float]:
        row = await self._pool.fetchrow(
            "SELECT count(*) FILTER (WHERE phase IN ('resolve', 'await_provider')) AS unknown, "
            "count(*) FILTER (WHERE due_at <= $1) AS stale, count(*) AS open "
            "FROM payment_steps WHERE phase <> ALL($2::text[])", _ts(now_s), _FINAL)
        return {k: float(v) for k, v in row.items()}

    # -- Idempotency-Key ----------------------------------------------------------------------

    async def load_key(self, principal: str, key: str, *, now_s: float) -> StoredKey | None:
        row = await self._pool.fetchrow(
            "SELECT fingerprint, state, extract(epoch FROM claimed_at) AS claimed, status, body "
            "FROM idempotency_keys WHERE principal=$1 AND key=$2 AND expires_at > $3",
            principal, key, _ts(now_s))
        if row is None:
            return None
        return StoredKey(fingerprint=bytes(row["fingerprint"]), state=KeyState(row["state"]),
                         claimed_at_s=float(row["claimed"]), status=row["status"],
                         body=bytes(row["body"]))

    async def claim_key(self, principal: str, key: str, fingerprint: bytes, *, now_s: float,
                        retention_s: float, stale_before_s: float | None = None,
                        audit: AuditSlot | None = None) -> int:
        """Claim a key atomically; return the claim (a random non-zero fence), 0 if not
        claimed. ``stale_before_s`` takes over an in-flight claim made before that time
        (or an expired key); otherwise only a free key is claimed. Only the holder of the
        current claim can complete or release the key (``complete_key``, ``release_key``).

        ``audit``, when not yet written, is written by the same statement, claimed or not
        (the request's first write: ``processor/request_audit.py``)."""
        claim = _new_claim()
        if stale_before_s is None:
            sql, audit_values = _with_audit(_claim_sql(1), audit, 7)
            claimed = await self._pool.fetchval(
                sql, principal, key, fingerprint, _ts(now_s), _ts(now_s + retention_s),
                claim, *audit_values)
        else:
            sql, audit_values = _with_audit(
                "UPDATE idempotency_keys SET claimed_at=$4, expires_at=$5, claim=$7 "
                "WHERE principal=$1 AND key=$2 AND fingerprint=$3 AND state='in_flight' "
                "AND claimed_at < $6 RETURNING true", audit, 8)
            claimed = await self._pool.fetchval(
                sql, principal, key, fingerprint, _ts(now_s), _ts(now_s + retention_s),
                _ts(stale_before_s), claim, *audit_values)
        if audit is not None:
            audit.written = True
        return claim if claimed else 0

    async def answer_key(self, hold: KeyHold, *, status: int, body: bytes,
                         audit: AuditSlot | None = None) -> bool:
        """Claim a deferred hold's key and store its final answer in one statement, for a
        request refused before it wrote anything; False (nothing written) when the key was
        held or answered. ``audit``, when not yet written, is written by the same
        statement either way."""
        claim_values, _claim = _claim_values(hold)
        sql, audit_values = _with_audit(_claim_sql(1, answered=True), audit,
                                        len(claim_values) + 3)
        done = await self._pool.fetchval(sql, *claim_values, status, body, *audit_values)
        if audit is not None:
            audit.written = True
        return bool(done)

    async def write_audit(self, audit: AuditSlot) -> None:
        """Write a handed-over audit record that no other statement wrote (a request that
        created nothing: a repeat, a refusal), and mark it written."""
        if audit.written:
            return
        sql, audit_values = _with_audit("SELECT 1", audit, 1)
        await self._pool.execute(sql, *audit_values)
        audit.written = True

    async def complete_key(self, principal: str, key: str, *, claim: int, status: int,
                           body: bytes) -> bool:
        """Store the final answer under a key still held by ``claim``; False (nothing
        written) when the claim lapsed and another request took the key over."""
        done = await self._pool.fetchval(
            "UPDATE idempotency_keys SET state='completed', status=$4, body=$5 "
            "WHERE principal=$1 AND key=$2 AND claim=$3 AND state='in_flight' RETURNING true",
            principal, key, claim, status, body)
        return bool(done)

    async def release_key(self, principal: str, key: str, *, claim: int) -> bool:
        """Forget a claim whose request did nothing, so the same key may be tried again;
        False (nothing deleted) when ``claim`` no longer holds the key."""
        done = await self._pool.fetchval(
            "DELETE FROM idempotency_keys WHERE principal=$1 AND key=$2 AND claim=$3 "
            "AND state='in_flight' RETURNING true", principal, key, claim)
        return bool(done)

    async def purge_keys(self, *, now_s: float) -> int:
        result = await self._pool.execute(
            "DELETE FROM idempotency_keys WHERE expires_at <= $1", _ts(now_s))
        return int(result.split()[-1])
