"""A processor on a Ray cluster of three nodes on this machine (``ray.cluster_utils.Cluster``:
a head and two workers, three raylets) that loses a worker node under load, run as its own
process so that its Ray is not the test session's:

    python -m tests.nodeloss DATA_DIR HTTP_PORT RPC_PORT

It starts the cluster and the processor (embedded PostgreSQL, three shards spread over the
nodes, payments with both simulated providers, the payments actor placed on the worker that
will be lost), records where each front runs and what ``fronts.json`` says of it (one front
per node, each pinned to its node, the driver's on the configured host and ports, the others
on ports + 1, + 2 of the shared address), creates accounts through the first front and reads
them through each of the others, drives ledger load through all three fronts (gateways with
``Client(addresses=[...every front...])``, each batch sent again unchanged after a retryable
error), removes that worker's raylet and its processes mid-load, keeps the load on until it
has done as much again, then checks the ledger and prints a JSON report on its last line:
where the shards and the payments actor ran before and after, the leases' holders and
fences, every error the gateways saw (by class and code), what was acknowledged before and
after the loss, the ledger checks, and the takeover times it measured (reported, never
asserted). Then it waits for the lost node's front to leave ``fronts.json``, adds a node,
and reads the accounts through the front the supervisor starts there. It stops everything
it started (its own raylets only). Used by tests/e2e/test_nodeloss.py.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import ray
from ray.cluster_utils import Cluster

from actors.app.runtime import FRONTS_FILE, Processor, start_processor
from actors.ledger.store import LedgerStore
from actors.payments.actor import LEASE_RECOVERY, LEASE_RELAY
from bench.cluster import local_cluster
from processor.client import Client, ClientError
from processor.codes import AccountResult, TransferResult
from processor.config import Config, FrontConfig, ObservabilityConfig, ShardConfig
from processor.errors import LedgerError
from processor.identity import SCOPES, issue_token, load_or_create_ring
from processor.placement import NodeView, place_shards
from processor.types import Account, AccountFlags, Transfer, TransferFlags

OK = {TransferResult.ok, TransferResult.exists}
SHARDS = 3
GATEWAYS = 6
BATCH = 50
CUSTOMERS = 60
# Work, not time: acknowledged transfers before the loss, and after it.
BEFORE_LOSS = 400
AFTER_LOSS = 600
UNTIL_S = 240.0  # for every wait below
ROUND_S = 10.0  # for each look of a wait
WAITING_SAY_S = 10.0
READY_ROUNDS_MAX = 240  # 0.25 s each
LEASES = (LEASE_RECOVERY, LEASE_RELAY)


async def _ready(url: str) -> bool:
    async with httpx.AsyncClient(timeout=2) as http:
        for _ in range(READY_ROUNDS_MAX):
            try:
                if (await http.get(f"{url}/readyz")).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    return False


def _retryable(exc: BaseException) -> bool:
    """What a gateway may send again: the server's retryable codes (``Overloaded``,
    ``Unavailable``: their class says so) and a call that got no answer in time or lost its
    connection (tests/actors/test_crash.py)."""
    if isinstance(exc, LedgerError):
        return exc.retryable
    return isinstance(exc, (ConnectionError, TimeoutError))


def _seed_starting_at(front: int, count: int, after: int) -> int:
    """A seed whose client starts at front ``front`` (processor.failover.first_index draws
    it first from the client's generator), so that every front gets gateways."""
    seed = after
    while random.Random(seed).randrange(count) != front:
        seed += 1
    return seed


class Load:
    """Gateways that send batches of transfers through every front, each batch again
    unchanged until it is answered; what they saw is kept for the report."""

    def __init__(self, addresses: list[str], token: str, customers: list[int],
                 next_id: collections.abc.Iterator[int]) -> None:
        self.addresses = addresses
        self.token = token
        self.customers = customers
        self.next_id = next_id
        self.acknowledged: dict[int, Transfer] = {}
        self.refused: dict[int, TransferResult] = {}
        self.errors: collections.Counter[str] = collections.Counter()
        self.not_retryable: list[str] = []
        self.failovers = 0
        self.last_ack_s = 0.0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def batch(self, rng: random.Random) -> list[Transfer]:
        out = []
        for _ in range(BATCH):
            a, b = rng.sample(self.customers, 2)
            pending = rng.random() < 0.1
            out.append(Transfer(id=next(self.next_id), debit_account_id=a,
                                credit_account_id=b, amount=rng.randint(1, 900),
                                currency="EUR",
                                flags=int(TransferFlags.PENDING) if pending else 0))
        return out

    async def gateway(self, seed: int) -> None:
        rng = random.Random(seed)
        async with Client(addresses=self.addresses, token=self.token, timeout_s=30,
                          rng=random.Random(seed)) as client:
            try:
                while not self.stop.is_set():
                    batch = self.batch(rng)
                    codes = await self._until_answered(client, batch)
                    for t, code in zip(batch, codes, strict=True):
                        if code in OK:
                            self.acknowledged[t.id] = t
                        else:
                            self.refused[t.id] = code
                    self.last_ack_s = time.monotonic()
            finally:
                self.failovers += client.failovers

    def run(self, seeds: list[int]) -> threading.Thread:
        """The gateways, on an event loop of their own in a thread of their own: what the
        driver's loop waits on (Ray calls to actors that are restarting) never holds them
        up."""

        async def gateways() -> None:
            await asyncio.gather(*[self.gateway(s) for s in seeds])

        def main() -> None:
            try:
                asyncio.run(gateways())
            except BaseException as exc:
                self.error = exc

        thread = threading.Thread(target=main, name="gateways", daemon=True)
        thread.start()
        return thread

    async def _until_answered(self, client: Client,
                              batch: list[Transfer]) -> list[TransferResult]:
        while True:
            try:
                return await client.create_transfers(batch)
            except (LedgerError, ClientError, ConnectionError, TimeoutError) as exc:
                self.errors[f"{type(exc).__name__}:{getattr(exc, 'code', '')}"] += 1
                if not _retryable(exc):
                    self.not_retryable.append(repr(exc))
                    raise
                await asyncio.sleep(0.25)  # the same batch again: ids make it safe


async def _until(what: str, check: Any) -> Any:
    """Poll ``check()`` (an awaitable factory) until it answers something true, for at
    most ``UNTIL_S`` seconds (a round that hangs counts: each is bounded too), saying on
    stderr every ``WAITING_SAY_S`` what it still waits for and what it last saw."""
    started = time.monotonic()
    said = started
    last: Any = None
    while time.monotonic() - started < UNTIL_S:
        try:
            answer = await asyncio.wait_for(check(), timeout=ROUND_S)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.GetTimeoutError, TimeoutError, asyncpg.PostgresError,
                OSError) as exc:
            answer, last = None, exc
        else:
            last = answer
        if answer:
            return answer
        if time.monotonic() - said > WAITING_SAY_S:
            said = time.monotonic()
            print(f"waiting {said - started:.0f} s for {what}; last: {last!r}"[:500],
                  file=sys.stderr, flush=True)
        await asyncio.sleep(0.1)
    raise AssertionError(f"never, in {UNTIL_S} s: {what}; last: {last!r}"[:1000])


async def _leases(url: str) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT name, holder, fence FROM leases WHERE name = ANY($1)",
                                list(LEASES))
    finally:
        await conn.close()
    return {r["name"]: {"holder": r["holder"], "fence": int(r["fence"])} for r in rows}


async def _shard_nodes(processor: Processor) -> list[str]:
    return list(await asyncio.gather(*[
        asyncio.wait_for(s.node_id.remote(), timeout=5) for s in processor.shards]))


async def _on_dealt_nodes(processor: Processor, nodes: list[str]) -> list[str]:
    """Where the shards run, once each runs on the node it was dealt (place_shards). A soft
    pin is a preference: Ray has put a shard dealt to a worker that had only just joined
    on the head instead (in CI, all three once, so no worker held one). Such a shard is
    killed, and Ray restarts it under the same pin, on its node (a few tries at most)."""
    here = ray.get_runtime_context().get_node_id()
    dealt = place_shards([NodeView(n, "") for n in nodes], here=here, shards=SHARDS)
    for _ in range(8):
        where = await _until("every shard answers", lambda: _shard_nodes(processor))
        misplaced = [s for s, (at, want) in enumerate(zip(where, dealt, strict=True))
                     if at != want]
        if not misplaced:
            return list(where)
        for s in misplaced:
            pid = await asyncio.wait_for(processor.shards[s].pid.remote(), timeout=5)
            os.kill(int(pid), signal.SIGKILL)
        await asyncio.sleep(1.0)
    return list(await _until("every shard answers", lambda: _shard_nodes(processor)))


async def _check_ledger(load: Load, url: str) -> dict[str, Any]:
    """Every acknowledged transfer stored once with its fields, no refused one stored,
    balances audited."""
    store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=120)
    try:
        stored = await store.lookup_transfers(sorted(load.acknowledged))
        missing = set(load.acknowledged) - set(stored)
        differing = [tid for tid, t in load.acknowledged.items() if tid in stored and (
            stored[tid].debit_account_id, stored[tid].credit_account_id, stored[tid].amount,
            stored[tid].flags) != (t.debit_account_id, t.credit_account_id, t.amount,
                                   t.flags)]
        refused_stored = set(load.refused) & set(
            await store.lookup_transfers(sorted(load.refused)))
        audit = await store.audit()
    finally:
        await store.close()
    # Stored once: the primary key on the id already says so; count the rows anyway.
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM transfers WHERE id = ANY($1::bigint[])",
                                   list(load.acknowledged))
    finally:
        await conn.close()
    return {"missing": len(missing), "differing": len(differing),
            "refused_stored": len(refused_stored), "rows": int(rows),
            "audit_passed": bool(audit.passed), "audit": repr(audit)[:500]}


# What the scenario is doing, said on stderr every HEARTBEAT_S: a run that hangs (once,
# inside a full suite, with nothing printed for 600 s) then says where.
PHASE = ["starting the processor"]
HEARTBEAT_S = 20.0


async def _heartbeat(started_s: float) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        print(f"nodeloss: {time.monotonic() - started_s:.0f} s in, {PHASE[0]}",
              file=sys.stderr, flush=True)


def _phase(what: str) -> None:
    PHASE[0] = what
    print(f"nodeloss: {what}", file=sys.stderr, flush=True)


async def run(data_dir: Path, http_port: int, rpc_port: int, cluster: Cluster,
              workers: list[Any]) -> dict[str, Any]:
    config = Config(
        shard=ShardConfig(database_url="", shards=SHARDS),
        front=FrontConfig(host="127.0.0.1", http_port=http_port, rpc_port=rpc_port),
        data_dir=str(data_dir), ray_address=cluster.address,
        observability=ObservabilityConfig(metrics_port=0))
    started_s = time.monotonic()
    heartbeat = asyncio.create_task(_heartbeat(started_s))
    _phase("starting the processor")
    try:
        processor = await start_processor(config, payments_node=workers[-1].node_id)
    except BaseException:
        heartbeat.cancel()
        raise
    _phase("placing the payments actor on a worker")
    supervisor = asyncio.create_task(processor.supervise(interval_s=0.2))
    report: dict[str, Any] = {}
    try:
        url = processor.config.shard.database_url
        report["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        report["fronts"] = [{"node": f.placement.node_id, "rpc": f.rpc_address}
                            for f in processor.fronts]
        # Where each front runs, and what fronts.json tells clients of it.
        report["fronts_file"] = fronts_file = json.loads((data_dir / FRONTS_FILE).read_text())
        report["actor_nodes"] = [await f.actor.node_id.remote() for f in processor.fronts]
        report["ready"] = [await _ready(f["http"]) for f in fronts_file]
        report["shard_nodes_before"] = await _on_dealt_nodes(processor, report["nodes"])
        payments = processor.payments
        # The node to lose must be a worker that holds a shard and the payments actor.
        # Placement is only a preference (Ray may put a shard or the payments actor on
        # another node, the head included, which cannot be lost here), so a payments actor
        # elsewhere is killed until Ray restarts it on such a worker (a few tries at most).
        worker_ids = {w.node_id for w in workers} & set(report["shard_nodes_before"])
        if not worker_ids:
            raise AssertionError(f"no worker holds a shard: {report['shard_nodes_before']}")
        for _ in range(8):
            node = await _until("the payments actor answers", payments.node_id.remote)
            if node in worker_ids:
                break
            os.kill(int(await payments.pid.remote()), signal.SIGKILL)
            await asyncio.sleep(1.0)
        report["payments_node_before"] = await _until("the payments actor answers",
                                                      payments.node_id.remote)
        # The node to lose is the worker the payments actor runs on.
        victim = next((w for w in workers if w.node_id == report["payments_node_before"]),
                      None)
        if victim is None:
            raise AssertionError("the payments actor stayed on the head node")
        report["victim"] = victim_id = victim.node_id
        holder_before = await payments.lease_holder.remote()

        async def held_by_first() -> Any:
            leases = await _leases(url)
            return leases if all(leases.get(n, {}).get("holder") == holder_before
                                 for n in LEASES) else None

        report["leases_before"] = await _until("the first payments actor holds the leases",
                                               held_by_first)
        times: dict[str, float] = {"processor_started_s": time.monotonic() - started_s}
        _phase("creating the accounts")
        front_pids = {f.placement.node_id: await f.actor.pid.remote()
                      for f in processor.fronts}

        now_s = int(time.time())
        ring = load_or_create_ring(data_dir, now_s=now_s)
        token = issue_token(ring.active.secret, SCOPES, ttl_s=900, now_s=now_s)
        addresses = processor.rpc_addresses
        ids = iter(range(now_s * 1_000_000, now_s * 1_000_000 + 10_000_000))
        # One ledger behind every front: accounts created through the first front only
        # are found through each of the others only.
        probe = [next(ids) for _ in range(2)]
        first, *others = (f["rpc"] for f in fronts_file)
        async with Client(addresses=[first], token=token) as one:
            report["created"] = [int(c) for c in await one.create_accounts(
                [Account(id=i, currency="EUR") for i in probe])]
        report["created_ok"] = report["created"] == [int(AccountResult.ok)] * len(probe)
        report["found"] = []
        for other in others:
            async with Client(addresses=[other], token=token) as elsewhere:
                report["found"].append([a is not None
                                        for a in await elsewhere.lookup_accounts(probe)])
        async with Client(addresses=addresses, token=token) as client:
            operator, *customers = [next(ids) for _ in range(CUSTOMERS + 1)]
            accounts = [Account(id=operator, currency="EUR")] + [
                Account(id=c, currency="EUR",
                        flags=int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS))
                for c in customers]
            assert set(await client.create_accounts(accounts)) == {0}
            funding = [Transfer(id=next(ids), debit_account_id=operator, credit_account_id=c,
                                amount=50_000, currency="EUR") for c in customers]
            assert set(await client.create_transfers(funding)) == {TransferResult.ok}

        load = Load(addresses, token, customers, ids)
        seeds = []
        for g in range(GATEWAYS):
            seeds.append(_seed_starting_at(g % len(addresses), len(addresses),
                                           seeds[-1] + 1 if seeds else 0))
        thread = load.run(seeds)
        _phase("load before the loss")

        async def acknowledged(count: int) -> bool:
            if not thread.is_alive():
                load.stop.set()
                raise AssertionError(f"a gateway stopped: {load.not_retryable[-3:]}"
                                     f" {dict(load.errors)}") from load.error
            return len(load.acknowledged) >= count

        await _until(f"{BEFORE_LOSS} acknowledged", lambda: acknowledged(BEFORE_LOSS))
        report["acknowledged_before_loss"] = before = len(load.acknowledged)
        errors_before = sum(load.errors.values())

        # The loss: the worker's raylet and every process it ran, killed (SIGKILL).
        lost_s = time.monotonic()
        timeline: list[tuple[float, int, int]] = []

        async def sample() -> None:  # acknowledged and errors, every second after the loss
            while True:
                timeline.append((round(time.monotonic() - lost_s, 1), len(load.acknowledged),
                                 sum(load.errors.values())))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample())
        _phase("removing the node")
        await asyncio.to_thread(cluster.remove_node, victim, False)
        _phase("load through the loss")
        front_pid = front_pids[victim_id]
        for _ in range(50):  # a worker whose raylet is gone exits on its own; make sure
            if not Path(f"/proc/{front_pid}").exists():
                break
            await asyncio.sleep(0.1)
        else:
            os.kill(front_pid, signal.SIGKILL)

        async def first_ack() -> bool:
            return await acknowledged(before + BATCH) and load.last_ack_s > lost_s

        await _until("an acknowledgement after the loss", first_ack)
        times["first_batch_after_loss_s"] = load.last_ack_s - lost_s

        async def shards_elsewhere() -> list[str] | None:
            nodes = await _shard_nodes(processor)
            await asyncio.gather(*[asyncio.wait_for(s.stats.remote(), timeout=5)
                                   for s in processor.shards])
            return nodes if victim_id not in nodes else None

        report["shard_nodes_after"] = await _until("every shard on a surviving node",
                                                   shards_elsewhere)
        times["shards_back_s"] = time.monotonic() - lost_s

        async def payments_moved() -> str | None:
            node = await asyncio.wait_for(payments.node_id.remote(), timeout=5)
            started = await asyncio.wait_for(payments.is_started.remote(), timeout=5)
            return node if node != victim_id and started else None

        report["payments_node_after"] = await _until("the payments actor on a surviving node",
                                                     payments_moved)
        times["payments_restarted_s"] = time.monotonic() - lost_s
        holder_after = await payments.lease_holder.remote()

        async def held_by_second() -> Any:
            leases = await _leases(url)
            return leases if all(leases.get(n, {}).get("holder") == holder_after
                                 for n in LEASES) else None

        report["leases_after"] = await _until("the restarted payments actor holds the leases",
                                              held_by_second)
        times["leases_taken_over_s"] = time.monotonic() - lost_s
        report["holders"] = [holder_before, holder_after]

        await _until(f"{AFTER_LOSS} more acknowledged",
                     lambda: acknowledged(before + AFTER_LOSS))
        load.stop.set()
        sampler.cancel()
        await asyncio.to_thread(thread.join)
        if load.error is not None:
            raise AssertionError("a gateway failed") from load.error
        report["timeline"] = timeline
        report["acknowledged_total"] = len(load.acknowledged)
        report["refused"] = len(load.refused)
        report["errors"] = dict(load.errors)
        report["errors_after_loss"] = sum(load.errors.values()) - errors_before
        report["not_retryable"] = load.not_retryable
        report["failovers"] = load.failovers
        report["gateway_first_fronts"] = [random.Random(s).randrange(len(addresses))
                                          for s in seeds]

        async def settled() -> bool:
            stats = await asyncio.gather(*[s.stats.remote() for s in processor.shards])
            return all(s["holds_granted"] == 0 for s in stats)

        times["load_s"] = time.monotonic() - lost_s
        _phase("checking the ledger")
        await _until("holds settled", settled)
        report["ledger"] = await _check_ledger(load, url)

        # The lost node's front is retired from fronts.json; a node joins, the supervisor
        # starts a front on it (on the ports the lost one freed), and it serves the ledger.
        def fronts_now() -> list[dict[str, str]]:
            return list(json.loads((data_dir / FRONTS_FILE).read_text()))

        async def lost_front_retired() -> list[dict[str, str]] | None:
            now = fronts_now()
            return now if all(f["node"] != victim_id for f in now) else None

        report["fronts_after_loss"] = await _until("the lost front retired",
                                                   lost_front_retired)
        joined = cluster.add_node(num_cpus=1)  # Ray's signal handlers: the main thread only
        joined_s = time.monotonic()
        report["joined"] = joined.node_id

        async def front_on_joined() -> list[dict[str, str]] | None:
            now = fronts_now()
            return now if any(f["node"] == joined.node_id for f in now) else None

        report["fronts_after_join"] = await _until("a front on the node that joined",
                                                   front_on_joined)
        times["front_on_joined_s"] = time.monotonic() - joined_s
        new_rpc = next(f["rpc"] for f in report["fronts_after_join"]
                       if f["node"] == joined.node_id)
        async with Client(addresses=[new_rpc], token=token) as through_joined:
            report["found_through_joined"] = [
                a is not None for a in await through_joined.lookup_accounts(probe)]
        report["times"] = {k: round(v, 2) for k, v in times.items()}
        return report
    finally:
        _phase("stopping")
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)
        await processor.stop()
        heartbeat.cancel()


def main() -> int:
    data_dir, http_port, rpc_port = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    data_dir.mkdir(parents=True, exist_ok=True)
    cluster, workers = local_cluster(2)
    try:
        report = asyncio.run(run(data_dir, http_port, rpc_port, cluster, workers))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
