"""``python -m bench.chaos``: a bank workload under injected faults, then an audit.

A processor on embedded defaults (embedded PostgreSQL, both simulated providers) on a Ray
cluster of ``--nodes`` raylets on this machine (three by default, ``bench/cluster.py``; one
front per node; ``--nodes 1``: a local Ray with ``--fronts`` fronts) takes, for
``--duration`` (``60s``, ``10m``), a bank workload:

* ledger gateways over RPC, given every front's address, each
  sending batches of plain transfers, holds (pending), posts
  and voids of its own holds, and linked chains, between customer accounts that may not go
  below zero (so some transfers are refused, and their ids burned);
* payment gateways over HTTP, authorizing through both providers and capturing half.

Every request whose outcome is unknown (an error, a dropped connection, no answer in time)
is sent again, unchanged: a transfer by its id, a payment by its ``Idempotency-Key``. While
it runs, faults are injected on a schedule printed at the start: SIGKILL of a shard, of
the front, of the payments actor and of a provider actor, PostgreSQL stopped with SIGSTOP
(``--pg-stop-s``) and continued, a provider outage and slow provider answers, and, with
several nodes, the removal of a worker node (its raylet and every process on it).

At the end it checks, and prints as a table, what a bank auditor would (anomalies, each
counted): every acknowledged transfer stored exactly once and as sent; no transfer answered
as refused stored; every customer's four balances equal to what the acknowledged transfers
make of them (the gateways' own model, independent of the server's arithmetic); every
balance equal to the sum of its postings and every currency summing to zero (the ledger's
audit); every payment in a final state, with the provider's record agreeing; and ``txproc
verify`` of the whole deployment. Per fault it prints what clients saw: errors, and the p99
of answered requests during the fault and in the ten seconds after. It samples every server
process's RSS; on runs of five minutes or more, a process group whose RSS keeps growing is an
anomaly. The last line is ``anomalies=N``, and the exit status is 0 only when N is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import random
import re
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Fault", "Model", "main", "parse_args", "parse_duration", "rss_growth", "schedule"]

log = logging.getLogger("txproc.bench.chaos")
RESULTS_DIR = Path(__file__).parent / "results"
CUSTOMERS = 64
FUNDING = 100_000
# How long one request is retried before its outcome is called unknown (and looked up).
RETRY_DEADLINE_S = 240.0
AFTER_S = 10.0  # the "after" window of each fault
SOAK_S = 300.0  # from this duration on, RSS growth is judged


# -- the schedule (pure) ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    """One fault: ``kind`` at ``at_s`` from the start, held ``hold_s`` (0: instantaneous)."""

    at_s: float
    kind: str
    target: str
    hold_s: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.kind} {self.target}".strip()


def parse_duration(text: str) -> float:
    """``60s``, ``10m``, ``1h`` or plain seconds, as seconds; raises ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise ValueError(f"a duration is like 60s, 10m or 1h, not {text!r}")
    value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if value < 10:
        raise ValueError("a chaos run lasts at least 10 s")
    return value


def schedule(duration_s: float, *, pg_stop_s: float, shards: int, nodes: int = 1) -> list[Fault]:
    """The faults of a run of ``duration_s``, in order, all within its first three quarters
    (the last quarter shows the recovery under load). ``pg_stop_s`` is capped at a fifth of
    the run so that short profiles keep their shape."""
    d = duration_s
    hold = min(pg_stop_s, d / 5)
    faults = [
        Fault(0.08 * d, "sigkill", "shard 0"),
        Fault(0.15 * d, "sigkill", "provider acme"),
        Fault(0.22 * d, "sigkill", "front"),
        Fault(0.29 * d, "sigkill", "payments"),
        Fault(0.36 * d, "sigstop", "postgres", hold),
        Fault(0.36 * d + hold + 0.04 * d, "outage", "provider acme", 0.07 * d),
        Fault(0.36 * d + hold + 0.12 * d, "slow", "provider globex", 0.07 * d),
        Fault(min(0.72 * d, 0.36 * d + hold + 0.2 * d), "sigkill", f"shard {min(1, shards - 1)}"),
    ]
    if nodes > 1:
        faults.append(Fault(0.74 * d, "remove", "worker node"))
    return sorted(faults, key=lambda f: f.at_s)


# -- the gateways' model of the ledger (pure) -------------------------------------------------


class Model:
    """What the acknowledged transfers make of each account's four balances: the auditor's
    own arithmetic, kept apart from the server's."""

    def __init__(self) -> None:
        self.balances: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.pending: dict[int, tuple[int, int, int]] = {}  # id -> debit, credit, amount

    def apply(self, t: Any) -> None:
        """Apply one acknowledged transfer (in the order it was acknowledged by its own
        gateway: a post or void always after its hold)."""
        from processor.types import TransferFlags as F

        d, c = self.balances[t.debit_account_id], self.balances[t.credit_account_id]
        if t.flags & F.PENDING:
            d[0] += t.amount
            c[2] += t.amount
            self.pending[t.id] = (t.debit_account_id, t.credit_account_id, t.amount)
        elif t.flags & (F.POST_PENDING | F.VOID_PENDING):
            _, _, held = self.pending.pop(t.pending_id)
            d[0] -= held
            c[2] -= held
            if t.flags & F.POST_PENDING:
                d[1] += t.amount
                c[3] += t.amount
        else:
            d[1] += t.amount
            c[3] += t.amount


def rss_growth(samples: Sequence[tuple[float, float]]) -> float | None:
    """How much a series of (seconds, MiB) grew from its second fifth to its last fifth,
    as a ratio of the means; None with fewer than ten samples. The first fifth is warm-up
    (imports, caches, pools filling)."""
    if len(samples) < 10:
        return None
    values = [v for _, v in samples]
    fifth = len(values) // 5
    early = values[fifth:2 * fifth]
    late = values[-fifth:]
    base = sum(early) / len(early)
    return (sum(late) / len(late)) / base if base > 0 else None


# -- the run ----------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Call:
    """One answered or failed request: when it ended, how long it took, what it was."""

    done_s: float
    latency_ms: float
    kind: str  # "ledger" or "payments"
    error: str = ""


class Run:
    def __init__(self, processor: Any, *, seed: int, started: float) -> None:
        self.processor = processor
        self.seed = seed
        self.started = started
        self.calls: list[Call] = []
        self.acknowledged: dict[int, Any] = {}
        self.ack_order: list[Any] = []
        self.refused: dict[int, str] = {}
        self.unknown: dict[int, Any] = {}
        self.payments: dict[str, str] = {}  # payment id -> idempotency key of its creation
        self.payment_unknown: list[str] = []
        self.fatal: list[str] = []  # a non-retryable answer where none may come
        self.stop = asyncio.Event()
        self.next_id = int(time.time()) * 1_000_000
        self.customers: list[int] = []
        self.merchants: dict[str, list[int]] = {}
        self.rss: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def now(self) -> float:
        return time.monotonic() - self.started

    def take_ids(self, n: int) -> list[int]:
        out = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        return out

    def token(self, scopes: Sequence[str] | None = None) -> str:
        from processor.identity import SCOPES, issue_token, load_or_create_ring

        ring = load_or_create_ring(Path(self.processor.config.data_dir), now_s=int(time.time()))
        return issue_token(ring.active.secret, list(scopes or SCOPES), ttl_s=6 * 3600,
                           now_s=int(time.time()))

    # -- ledger gateways

    async def setup_ledger(self) -> None:
        from processor.client import Client
        from processor.types import Account, AccountFlags, Transfer

        operator, *customers = self.take_ids(CUSTOMERS + 1)
        limited = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
        async with Client("127.0.0.1", self.processor.rpc_port, self.token(),
                          timeout_s=60) as client:
            codes = await client.create_accounts(
                [Account(id=operator, currency="EUR")]
                + [Account(id=c, currency="EUR", flags=limited) for c in customers])
            if any(int(c) for c in codes):
                raise RuntimeError(f"accounts refused: {Counter(c.name for c in codes)}")
            funding = [Transfer(id=i, debit_account_id=operator, credit_account_id=c,
                                amount=FUNDING, currency="EUR")
                       for i, c in zip(self.take_ids(len(customers)), customers, strict=True)]
            results = await client.create_transfers(funding)
            if any(int(c) for c in results):
                raise RuntimeError(f"funding refused: {Counter(c.name for c in results)}")
        self.customers = customers
        for t in funding:
            self.acknowledged[t.id] = t
            self.ack_order.append(t)

    def ledger_batch(self, rng: random.Random, holds: list[Any]) -> list[Any]:
        from processor.types import Transfer
        from processor.types import TransferFlags as F

        batch: list[Any] = []
        for _ in range(rng.randint(1, 24)):
            roll = rng.random()
            a, b = rng.sample(self.customers, 2)
            amount = rng.randint(1, 4_000)
            if roll < 0.12 and holds:
                hold = holds.pop(rng.randrange(len(holds)))
                post = rng.random() < 0.6
                batch.append(Transfer(
                    id=self.take_ids(1)[0], debit_account_id=hold.debit_account_id,
                    credit_account_id=hold.credit_account_id, currency="EUR",
                    amount=rng.randint(1, hold.amount) if post else hold.amount,
                    pending_id=hold.id, flags=int(F.POST_PENDING if post else F.VOID_PENDING)))
            elif roll < 0.27:
                batch.append(Transfer(id=self.take_ids(1)[0], debit_account_id=a,
                                      credit_account_id=b, amount=amount, currency="EUR",
                                      flags=int(F.PENDING)))
            elif roll < 0.37:
                chain = rng.randint(2, 3)
                for i, tid in enumerate(self.take_ids(chain)):
                    x, y = rng.sample(self.customers, 2)
                    batch.append(Transfer(id=tid, debit_account_id=x, credit_account_id=y,
                                          amount=rng.randint(1, 4_000), currency="EUR",
                                          flags=int(F.LINKED) if i < chain - 1 else 0))
            else:
                batch.append(Transfer(id=self.take_ids(1)[0], debit_account_id=a,
                                      credit_account_id=b, amount=amount, currency="EUR"))
        return batch

    async def ledger_gateway(self, index: int) -> None:
        from processor.client import Client, ClientError
        from processor.codes import TransferResult
        from processor.errors import LedgerError
        from processor.types import TransferFlags as F

        rng = random.Random(self.seed * 1000 + index)
        holds: list[Any] = []
        client: Client | None = None
        try:
            while not self.stop.is_set():
                batch = self.ledger_batch(rng, holds)
                deadline = time.monotonic() + RETRY_DEADLINE_S
                codes = None
                while codes is None and time.monotonic() < deadline:
                    began = time.monotonic()
                    try:
                        if client is None:
                            # Every front's address: a gateway fails over when one goes.
                            client = Client(addresses=[f.rpc_address
                                                       for f in self.processor.fronts],
                                            token=self.token(), timeout_s=20)
                            await client.connect()
                        codes = await client.create_transfers(batch)
                        self.calls.append(Call(self.now(), (time.monotonic() - began) * 1e3,
                                               "ledger"))
                    except (LedgerError, ClientError, OSError, TimeoutError) as exc:
                        code = getattr(exc, "code", "")
                        retryable = (isinstance(exc, (OSError, TimeoutError))
                                     or bool(getattr(exc, "retryable", False)))
                        self.calls.append(Call(self.now(), (time.monotonic() - began) * 1e3,
                                               "ledger", f"{type(exc).__name__}:{code}"))
                        if not retryable:
                            self.fatal.append(f"ledger gateway {index}: {exc!r}")
                        if client is not None:
                            with contextlib.suppress(Exception):
                                await client.close()
                            client = None
                        await asyncio.sleep(0.25)
                if codes is None:
                    for t in batch:
                        self.unknown[t.id] = t
                    continue
                for t, code in zip(batch, codes, strict=True):
                    if code in (TransferResult.ok, TransferResult.exists):
                        self.acknowledged[t.id] = t
                        self.ack_order.append(t)
                        if t.flags & F.PENDING:
                            holds.append(t)
                    else:
                        self.refused[t.id] = code.name
                        if t.pending_id:
                            # A refused post or void leaves its hold open: resolved later.
                            holds.append(self.acknowledged[t.pending_id])
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()

    # -- payment gateways

    async def payment_gateway(self, index: int, http: Any) -> None:
        from bench.authorization import payment_body

        rng = random.Random(self.seed * 7919 + index)
        while not self.stop.is_set():
            key = f"chaos-{uuid.UUID(int=rng.getrandbits(128)).hex}"
            body = payment_body(rng, self.merchants)
            answer = await self._until_final(http, "/v1/payments", body, key)
            if answer is None:
                self.payment_unknown.append(key)
                continue
            payment_id = answer.get("id")
            if not isinstance(payment_id, str):
                continue
            self.payments[payment_id] = key
            if answer.get("status") == "authorized" and rng.random() < 0.5:
                await self._until_final(http, f"/v1/payments/{payment_id}/capture", b"{}",
                                        f"{key}-capture")
            await asyncio.sleep(rng.uniform(0.05, 0.2))

    async def _until_final(self, http: Any, path: str, body: bytes,
                           key: str) -> dict[str, Any] | None:
        """POST until an answer that is not retryable (2xx, or a 4xx other than 409
        ``operation_in_progress`` and 429); its JSON body, or None if none came in time."""
        deadline = time.monotonic() + RETRY_DEADLINE_S
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                r = await http.post(path, content=body, headers={
                    "idempotency-key": key, "content-type": "application/json"})
            except Exception as exc:
                self.calls.append(Call(self.now(), (time.monotonic() - began) * 1e3,
                                       "payments", type(exc).__name__))
                await asyncio.sleep(0.5)
                continue
            latency = (time.monotonic() - began) * 1e3
            if r.status_code >= 500 or r.status_code in (409, 429):
                self.calls.append(Call(self.now(), latency, "payments", str(r.status_code)))
                await asyncio.sleep(0.5)
                continue
            self.calls.append(Call(self.now(), latency, "payments"))
            with contextlib.suppress(ValueError):
                answer = r.json()
                if isinstance(answer, dict):
                    return answer
            return {}
        return None

    # -- RSS

    async def sample_rss(self, every_s: float) -> None:
        """Sample the RSS of this run's own server processes only (the machine may run
        others): what this process started (Ray's daemons and workers descend from the
        driver) and the embedded PostgreSQL, by group."""
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            groups: dict[str, float] = defaultdict(float)
            trees: list[tuple[str | None, psutil.Process]] = []
            if self.processor.embedded is not None:
                with contextlib.suppress(psutil.Error):
                    trees.append(("postgres", psutil.Process(self.processor.embedded.pid)))
            trees.append((None, me))
            seen: set[int] = set()  # PostgreSQL may descend from this process too: once
            for fixed, root in trees:
                with contextlib.suppress(psutil.Error):
                    members = root.children(recursive=True)
                    if fixed:
                        members.append(root)
                    for member in members:
                        if member.pid in seen:
                            continue
                        seen.add(member.pid)
                        with contextlib.suppress(psutil.Error):
                            group = fixed or _rss_group(member.cmdline())
                            groups[group] += _resident_mib(member)
            for group, mib in groups.items():
                self.rss[group].append((self.now(), mib))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=every_s)


def _resident_mib(process: Any) -> float:
    """A process's share of resident memory (PSS: each shared page divided among the
    processes that map it), so that a group's sum is memory really used; RSS where PSS
    cannot be read. Summing RSS would count PostgreSQL's shared buffers once per backend
    that touched them, and grow with the backends, not with any leak."""
    import psutil

    try:
        return float(process.memory_full_info().pss) / 2**20
    except (psutil.AccessDenied, AttributeError):
        return float(process.memory_info().rss) / 2**20


def _rss_group(cmdline: list[str]) -> str:
    """A process's group from its command line: a Ray worker by its actor class
    (``ray::LedgerShard.method`` → ``LedgerShard``), anything else by its program."""
    head = cmdline[0] if cmdline else "?"
    if head.startswith("ray::"):
        return head[5:].split(".")[0].split(" ")[0] or "ray"
    program = Path(head).name
    if program.startswith("python"):
        # python [-u] [-m module | script.py] ...: the module or the script names it.
        rest = [a for a in cmdline[1:] if a != "-u"]
        target = rest[1] if rest[:1] == ["-m"] and len(rest) > 1 else (rest[:1] or ["?"])[0]
        return Path(target).name.removesuffix(".py")
    return program


# -- faults -----------------------------------------------------------------------------------


async def _pid(actor: Any) -> int:
    return int(await asyncio.wait_for(actor.pid.remote(), timeout=30))


async def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def inject(fault: Fault, processor: Any, sims: Any, http: Any, *,
                 cluster: Any = None, workers: Any = None) -> str:
    """Inject ``fault`` (holding it ``hold_s`` where it has one); what was done.
    ``cluster`` and ``workers``: the local cluster (bench/cluster.py) and its worker nodes,
    of which the last is removed; None on one node."""
    import psutil

    if fault.kind == "remove":
        if cluster is None or not workers:
            return "not run: one Ray node"
        victim = workers[-1]
        fronts = [f for f in processor.fronts if f.placement.node_id == victim.node_id]
        pids = [await _pid(f.actor) for f in fronts]
        await asyncio.to_thread(cluster.remove_node, victim, False)
        # A worker whose raylet is gone exits by itself; a front that lingers would keep
        # answering on its port, which a lost machine's front would not.
        await asyncio.sleep(5.0)
        for pid in pids:
            await _kill(pid)
        return (f"node {victim.node_id[:12]} removed (its fronts: "
                f"{', '.join(f.rpc_address for f in fronts) or 'none'})")

    if fault.kind == "sigkill":
        if fault.target.startswith("shard"):
            shard = processor.shards[int(fault.target.split()[1])]
            stats = await asyncio.wait_for(shard.stats.remote(), timeout=60)
            await _kill(int(stats["pid"]))
            return f"pid {int(stats['pid'])}"
        actor = {"front": processor.fronts[0].actor,
                 "payments": processor.payments}.get(fault.target)
        if fault.target.startswith("provider"):
            name = fault.target.split()[1]
            infos = await asyncio.gather(*[p.info.remote() for p in processor.providers])
            actor = next(p for p, i in zip(processor.providers, infos, strict=True)
                         if i["name"] == name)
        pid = await _pid(actor)
        await _kill(pid)
        return f"pid {pid}"
    if fault.kind == "sigstop":
        postmaster = psutil.Process(processor.embedded.pid)
        stopped = [postmaster, *postmaster.children(recursive=True)]
        for p in stopped:
            with contextlib.suppress(psutil.Error):
                p.suspend()
        try:
            await asyncio.sleep(fault.hold_s)
        finally:
            for p in stopped:
                with contextlib.suppress(psutil.Error):
                    p.resume()
        return f"{len(stopped)} processes stopped {fault.hold_s:.0f} s"
    if fault.kind in ("outage", "slow"):
        name = fault.target.split()[1]
        body = ({"outage": "unavailable"} if fault.kind == "outage"
                else {"latency": {"median_ms": 800.0, "p99_ms": 3000.0}})
        await sims.set_faults_of(http, name, body)
        try:
            await asyncio.sleep(fault.hold_s)
        finally:
            await sims.set_faults_of(http, name, {})
        return f"{fault.hold_s:.0f} s"
    raise ValueError(f"unknown fault {fault.kind!r}")


class _SimAdmin:
    def __init__(self, processor: Any) -> None:
        from bench.authorization import _Sims

        self.sims = _Sims(processor)

    async def set_faults_of(self, http: Any, name: str, body: dict[str, Any]) -> None:
        r = await http.put(f"{self.sims.urls[name]}/_sim/faults", json=body,
                           headers={"authorization": f"Bearer {self.sims.admin[name]}"})
        r.raise_for_status()

    async def operations(self, http: Any) -> list[dict[str, Any]]:
        out = []
        for name, url in self.sims.urls.items():
            r = await http.get(f"{url}/_sim/charges",
                               headers={"authorization": f"Bearer {self.sims.admin[name]}"})
            r.raise_for_status()
            out += [{**op, "provider": name} for op in r.json()["operations"]]
        return out


# -- the audit --------------------------------------------------------------------------------


def _p99(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1)


def availability(calls: Sequence[Call], done: Sequence[tuple[Fault, float, float, str]],
                 ) -> list[dict[str, Any]]:
    """Per fault: the errors clients met and the p99 of answered calls while it lasted
    (from its start to its end, at least two seconds) and in the ``AFTER_S`` after."""
    rows = []
    for fault, began, ended, what in done:
        end = max(ended, began + 2.0)
        during = [c for c in calls if began <= c.done_s < end]
        after = [c for c in calls if end <= c.done_s < end + AFTER_S]
        rows.append({
            "fault": fault.label, "at_s": round(began, 1), "held_s": round(ended - began, 1),
            "done": what,
            "errors": dict(Counter(c.error for c in [*during, *after] if c.error)),
            "p99_ms_during": _p99([c.latency_ms for c in during if not c.error]),
            "p99_ms_after": _p99([c.latency_ms for c in after if not c.error]),
            "answered_during": sum(1 for c in during if not c.error),
        })
    return rows


async def audit(run: Run, http: Any, sims: _SimAdmin, *, resolve_wait_s: float,
                ) -> list[dict[str, Any]]:
    """The checks, each with its anomalies (0 is a pass)."""
    from actors.app.verification import verify_all
    from actors.ledger.store import LedgerStore

    checks: list[dict[str, Any]] = []

    def check(name: str, anomalies: int, detail: str) -> None:
        checks.append({"check": name, "anomalies": anomalies, "detail": detail})

    store = await LedgerStore.connect(run.processor.config.shard.database_url, pool_size_max=2,
                                      connect_timeout_s=30, command_timeout_s=600)
    try:
        # Unknown outcomes: looked up, counted as applied if stored (once, by the key).
        found_unknown = await store.lookup_transfers(sorted(run.unknown))
        for tid in found_unknown:
            run.acknowledged[tid] = run.unknown[tid]
        stored = await store.lookup_transfers(sorted(run.acknowledged))
        lost = [tid for tid in run.acknowledged if tid not in stored]
        changed = [tid for tid, t in run.acknowledged.items() if tid in stored and (
            stored[tid].debit_account_id, stored[tid].credit_account_id, stored[tid].amount,
            stored[tid].flags, stored[tid].pending_id) != (
            t.debit_account_id, t.credit_account_id, t.amount, t.flags, t.pending_id)]
        check("acknowledged transfers stored exactly once, as sent", len(lost) + len(changed),
              f"{len(run.acknowledged):,} acknowledged, {len(lost)} lost, "
              f"{len(changed)} stored differently")
        refused_stored = await store.lookup_transfers(sorted(run.refused))
        reasons = dict(Counter(run.refused.values()).most_common(4))
        check("transfers answered as refused are not stored", len(refused_stored),
              f"{len(run.refused):,} refused ({reasons})")
        check("unknown outcomes resolved by id", 0,
              f"{len(run.unknown)} never answered, {len(found_unknown)} of them stored")
        model = Model()
        order = [t for t in run.ack_order if t.id in run.acknowledged]
        order += [run.unknown[t] for t in found_unknown]
        for t in _in_dependency_order(order):
            model.apply(t)
        accounts = await store.lookup_accounts(run.customers)
        wrong = [a for a in run.customers if a not in accounts or [
            accounts[a].debits_pending, accounts[a].debits_posted, accounts[a].credits_pending,
            accounts[a].credits_posted] != model.balances[a]]
        check("every customer's balances equal the acknowledged transfers'", len(wrong),
              f"{len(run.customers)} accounts, the gateways' own arithmetic")
        ledger = await store.audit()
        detail = str(ledger)[:160]
        if ledger.accounts_beyond_limit:
            beyond = await store.accounts_beyond_limit()
            detail += "; beyond their limit: " + "; ".join(
                f"{r['id']}{' (customer)' if r['id'] in run.customers else ''} flags "
                f"{r['flags']} dp {r['debits_pending']} dP {r['debits_posted']} cp "
                f"{r['credits_pending']} cP {r['credits_posted']}" for r in beyond)
        check("balances equal postings, every currency sums to zero",
              0 if ledger.passed else 1, detail)
    finally:
        await store.close()
    statuses, not_final = await _final_payments(http, run.payments, resolve_wait_s)
    check("every payment in a final state", len(not_final) + len(run.payment_unknown),
          f"{len(run.payments)} payments {dict(statuses)}; {len(run.payment_unknown)} "
          "never answered")
    disagreeing = await _provider_agreement(http, sims, run.payments)
    check("provider and ledger agree on each payment", len(disagreeing),
          f"{len(disagreeing)} disagree" + (f": {disagreeing[:3]}" if disagreeing else ""))
    merchant_ids = sorted(m for ids in run.merchants.values() for m in ids)
    # Every payment of each merchant, by the list API: a request never answered may have
    # made one too, and its hold counts in the merchant's balances all the same.
    views = [v for m in merchant_ids for v in await _payments_of(http, m)]
    store = await LedgerStore.connect(run.processor.config.shard.database_url, pool_size_max=2,
                                      connect_timeout_s=30, command_timeout_s=600)
    try:
        merchants = await store.lookup_accounts(merchant_ids)
    finally:
        await store.close()
    off = merchant_disagreements(views, merchants)
    check("each merchant's holds and postings are its payments'", len(off),
          f"{len(merchant_ids)} merchant accounts, {len(views)} payments"
          + (f": {off[:3]}" if off else ""))
    proof = await verify_all(run.processor.admin_database_url)
    check("txproc verify", 0 if proof.report.ok else proof.report.problems_total,
          f"{proof.rows:,} rows in {proof.seconds:.1f} s" + "".join(
              f"; {p.table} {p.id}: {p.kind} (expected {p.expected}, found {p.found})"
              for p in proof.report.problems[:5]))
    if run.fatal:
        check("only retryable errors while faults last", len(run.fatal), run.fatal[0][:160])
    else:
        check("only retryable errors while faults last", 0, "none other")
    return checks


def _in_dependency_order(transfers: Sequence[Any]) -> list[Any]:
    """Holds before the posts and voids that resolve them (each gateway acknowledges them in
    that order already; a hold found only by lookup may come last)."""
    holds = [t for t in transfers if not t.pending_id]
    return holds + [t for t in transfers if t.pending_id]


async def _final_payments(http: Any, payments: dict[str, str],
                          wait_s: float) -> tuple[Counter[str], list[str]]:
    deadline = time.monotonic() + wait_s
    final: dict[str, str] = {}
    pending = list(payments)
    while pending:
        still = []
        for chunk in range(0, len(pending), 32):
            ids = pending[chunk:chunk + 32]
            answers = await asyncio.gather(*[http.get(f"/v1/payments/{p}") for p in ids],
                                           return_exceptions=True)
            for pid, r in zip(ids, answers, strict=True):
                body = (r.json() if not isinstance(r, BaseException) and r.status_code == 200
                        else {})
                ops = body.get("operations") or []
                if body.get("status") in (None, "processing") or any(
                        o.get("status") == "processing" for o in ops):
                    still.append(pid)
                else:
                    final[pid] = body["status"]
        pending = still
        if not pending or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    return Counter(final.values()), pending


def merchant_disagreements(payments: Sequence[dict[str, Any]],
                           accounts: dict[int, Any]) -> list[str]:
    """Each merchant account's ledger balances against its payments (their API views): its
    pending credits are what they still hold (``capturable_amount``), its posted credits
    what they captured, and nothing is debited (the workload neither refunds nor pays out).
    A hold left over by an authorization that ended otherwise, or one posted twice, shows
    here and nowhere else."""
    held: Counter[int] = Counter()
    captured: Counter[int] = Counter()
    for p in payments:
        merchant = int(p["merchant_account_id"])
        held[merchant] += int(p.get("capturable_amount") or 0)
        captured[merchant] += int(p.get("captured_amount") or 0)
    out = []
    for merchant in sorted(set(held) | set(captured)):
        a = accounts.get(merchant)
        found = (None if a is None else
                 (a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted))
        expected = (0, 0, held[merchant], captured[merchant])
        if found != expected:
            out.append(f"merchant {merchant}: balances {found}, its payments make {expected}")
    return out


async def _payments_of(http: Any, merchant_id: int) -> list[dict[str, Any]]:
    """Every payment of ``merchant_id``, page by page through ``GET /v1/payments``."""
    out: list[dict[str, Any]] = []
    cursor = ""
    while True:
        params = {"merchant_account_id": str(merchant_id), "limit": "100"}
        if cursor:
            params["cursor"] = cursor
        r = await http.get("/v1/payments", params=params)
        r.raise_for_status()
        page = r.json()
        out += page["data"]
        cursor = page.get("next_cursor") or ""
        if not cursor:
            return out


async def _provider_agreement(http: Any, sims: _SimAdmin, payments: dict[str, str]) -> list[str]:
    """Each final payment against the providers' own records of it (the simulators' book,
    by the payment id each call carried): what is captured, and what is still held."""
    ops = await sims.operations(http)
    held: Counter[str] = Counter()
    captured: Counter[str] = Counter()
    for op in ops:
        if op["operation"] == "authorize":
            held[op["reference"]] += int(op.get("capturable") or 0)
            captured[op["reference"]] += int(op.get("captured") or 0)
    out = []
    for pid in payments:
        r = await http.get(f"/v1/payments/{pid}")
        if r.status_code != 200:
            out.append(f"{pid}: {r.status_code}")
            continue
        p = r.json()
        ours_captured = int(p.get("captured_amount") or 0)
        ours_held = int(p.get("capturable_amount") or 0)
        if (ours_captured, ours_held) != (captured[pid], held[pid]):
            out.append(f"{pid} {p.get('status')}: captured {ours_captured}/{captured[pid]}, "
                       f"held {ours_held}/{held[pid]}")
    return out


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=parse_duration, default=parse_duration("180s"),
                   help="how long the workload runs: 60s, 10m (default 180s)")
    p.add_argument("--pg-stop-s", type=float, default=30.0,
                   help="how long PostgreSQL stays stopped (capped at a fifth of the run)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--fronts", type=int, default=2,
                   help="fronts on this node; the ledger gateways are given every one, the "
                        "first is killed and the payment gateways use it over HTTP")
    p.add_argument("--nodes", type=int, default=3,
                   help="Ray nodes: 1 (this process's local Ray) or more, a head and workers "
                        "as separate raylets on this machine (bench/cluster.py), one front "
                        "per node instead of --fronts; a worker node is then removed")
    p.add_argument("--ledger-gateways", type=int, default=4)
    p.add_argument("--payment-gateways", type=int, default=3)
    p.add_argument("--resolve-wait-s", type=float, default=180.0,
                   help="how long payments may take to reach a final state after the run")
    p.add_argument("--claim-ttl-s", type=float, default=None,
                   help="seconds a live payment step owns its claim; the payments actor's "
                        "SIGKILL leaves its steps to the recovery worker once their claims "
                        "lapse (default: the service's, PaymentsConfig.claim_ttl_s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--database-url", default=os.environ.get("TXPROC_BENCH_DATABASE_URL", ""),
                   help="default: an embedded PostgreSQL (needed for the SIGSTOP fault)")
    p.add_argument("--out", type=Path, default=None, help="where the JSON results go")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.__main__ import machine_info

    if args.nodes < 1:
        raise SystemExit("--nodes must be at least 1")
    faults = schedule(args.duration, pg_stop_s=args.pg_stop_s, shards=args.shards,
                      nodes=args.nodes)
    print(f"chaos: {args.duration:.0f} s of load, then the audit. Schedule:")
    for f in faults:
        print(f"  t={f.at_s:6.1f} s  {f.label}" + (f" for {f.hold_s:.0f} s" if f.hold_s else ""))
    results: dict[str, Any] = {"machine": machine_info(), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    cluster = workers = None
    if args.nodes > 1:
        from bench.cluster import local_cluster

        # Ray starts a raylet with signal handlers: only from the main thread.
        cluster, workers = local_cluster(args.nodes - 1)
    try:
        return await _run_on(args, faults, results, cluster, workers)
    finally:
        if cluster is not None:
            cluster.shutdown()


async def _run_on(args: argparse.Namespace, faults: list[Fault], results: dict[str, Any],
                  cluster: Any, workers: Any) -> dict[str, Any]:
    import httpx

    from bench import ledger
    from bench.authorization import CURRENCIES, create_merchants

    rules = {} if args.claim_ttl_s is None else {"claim_ttl_s": args.claim_ttl_s}
    async with ledger.scratch_processor(
            args.database_url, args.shards, fronts=0 if cluster else args.fronts,
            prefix="txproc-chaos-", payments_rules=rules,
            ray_address=cluster.address if cluster else "") as (processor, startup_s):
        if processor.embedded is None:
            faults = [f for f in faults if f.kind != "sigstop"]
        supervisor = asyncio.create_task(processor.supervise())
        chaos = Run(processor, seed=args.seed, started=time.monotonic())
        await chaos.setup_ledger()
        chaos.merchants = await create_merchants(processor, chaos.token(), 4,
                                                 chaos.take_ids(4 * len(CURRENCIES))[0])
        sims = _SimAdmin(processor)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                     headers={"authorization": f"Bearer {chaos.token()}"},
                                     timeout=30) as http:
            chaos.started = time.monotonic()
            tasks = [asyncio.create_task(chaos.ledger_gateway(i))
                     for i in range(args.ledger_gateways)]
            tasks += [asyncio.create_task(chaos.payment_gateway(i, http))
                      for i in range(args.payment_gateways)]
            rss = asyncio.create_task(chaos.sample_rss(5.0 if args.duration >= SOAK_S else 2.0))
            done: list[tuple[Fault, float, float, str]] = []
            for fault in faults:
                await asyncio.sleep(max(0.0, fault.at_s - chaos.now()))
                began = chaos.now()
                try:
                    what = await inject(fault, processor, sims, http, cluster=cluster,
                                        workers=workers)
                except Exception as exc:
                    what = f"could not inject: {exc!r}"[:200]
                print(f"  t={began:6.1f} s  {fault.label}: {what}", flush=True)
                done.append((fault, began, chaos.now(), what))
            await asyncio.sleep(max(0.0, args.duration - chaos.now()))
            chaos.stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, rss), timeout=RETRY_DEADLINE_S + 60)
            ledger_calls = [c for c in chaos.calls if c.kind == "ledger" and not c.error]
            print(f"load stopped: {len(chaos.acknowledged):,} transfers acknowledged, "
                  f"{len(chaos.payments)} payments; auditing", flush=True)
            checks = await audit(chaos, http, sims, resolve_wait_s=args.resolve_wait_s)
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
    rss_rows = []
    for group, samples in sorted(chaos.rss.items()):
        growth = rss_growth(samples)
        values = [v for _, v in samples]
        unbounded = (args.duration >= SOAK_S and growth is not None and growth > 1.5
                     and values[-1] - values[len(values) // 5] > 200)
        rss_rows.append({"group": group, "start_mib": round(values[0]),
                         "max_mib": round(max(values)), "end_mib": round(values[-1]),
                         "growth": None if growth is None else round(growth, 2),
                         "unbounded": unbounded})
    if args.duration >= SOAK_S:
        grown = [str(r["group"]) for r in rss_rows if r["unbounded"]]
        checks.append({"check": "no process's RSS grows without bound",
                       "anomalies": len(grown), "detail": ", ".join(grown) or "none"})
    results.update({
        "startup_s": startup_s,
        "transfers_acknowledged": len(chaos.acknowledged),
        "ledger_calls_answered": len(ledger_calls),
        "payments": len(chaos.payments),
        "faults": availability(chaos.calls, done),
        "checks": checks,
        "rss": rss_rows,
        "anomalies": sum(c["anomalies"] for c in checks),
    })
    return results


def print_report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160) if not sys.stdout.isatty() else Console()
    faults = Table(title="faults: what clients saw (errors include the 10 s after)")
    for column in ("t s", "fault", "held s", "done", "errors", "answered", "p99 ms during",
                   "p99 ms after"):
        faults.add_column(column)
    for f in results["faults"]:
        faults.add_row(str(f["at_s"]), f["fault"], str(f["held_s"]), f["done"][:40],
                       ", ".join(f"{k} {v}" for k, v in f["errors"].items()) or "none",
                       str(f["answered_during"]), str(f["p99_ms_during"]),
                       str(f["p99_ms_after"]))
    console.print(faults)
    checks = Table(title=f"the audit, {results['machine']['date_utc']}")
    for column in ("check", "anomalies", "detail"):
        checks.add_column(column)
    for c in results["checks"]:
        checks.add_row(c["check"], str(c["anomalies"]), c["detail"])
    console.print(checks)
    rss = Table(title="resident memory by process group (MiB, PSS)")
    for column in ("group", "start", "max", "end", "late/early"):
        rss.add_column(column)
    for r in results["rss"]:
        rss.add_row(r["group"], str(r["start_mib"]), str(r["max_mib"]), str(r["end_mib"]),
                    str(r["growth"]))
    console.print(rss)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    results = asyncio.run(run(args))
    out = args.out or RESULTS_DIR / f"chaos-{dt.datetime.now(dt.UTC):%Y-%m-%dT%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_report(results)
    print(f"results written to {out}")
    print(f"anomalies={results['anomalies']}")
    return 0 if results["anomalies"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

