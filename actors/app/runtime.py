"""Starting and stopping a whole processor: database, Ray, shards and fronts.

Used by ``txproc serve``, the demo, the benchmark and the tests, so that all of them run
the same real parts the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import ray

from actors.app.databases import app_password_file, ensure_database
from actors.database import EmbeddedPostgres, app_role_url
from actors.edge import ListenError
from actors.ledger import LedgerStore, make_front, make_shard, shard_actor_name
from actors.ledger.front import front_actor_name
from actors.ledger.relocation import recorded_layout
from actors.migrate import migrate
from actors.names import NAMESPACE
from actors.ops import make_node_metrics, node_metrics_name
from actors.payments import (
    PAYMENTS_ACTOR_NAME,
    ProviderConfig,
    make_payments,
    make_provider,
    provider_actor_name,
)
from actors.risk import RISK_ACTOR_NAME, make_risk
from processor.config import Config
from processor.identity import (
    KEYS_FILE_NAME,
    KeyFileError,
    load_or_create_ring,
    load_ring,
    read_key,
)
from processor.ledger import MAIN_DATABASE
from processor.placement import (
    FrontPlacement,
    NodeView,
    follow_nodes,
    fronts_document,
    place_fronts,
    place_shards,
)
from processor.privacy import MASTER_KEY_FILE_NAME

__all__ = ["FRONTS_FILE", "ListenError", "Processor", "RunningFront", "app_password_file",
           "ensure_database", "start_processor"]

# Every front's URLs, written by start_processor into the data directory.
FRONTS_FILE = "fronts.json"
# How often the supervisor compares the fronts with the alive nodes, and how long a front
# it starts on a node that joined may take to listen.
NODES_EVERY_S = 1.0
FRONT_START_S = 60.0

log = logging.getLogger("txproc.runtime")
# The simulated providers this starts send their events in batches (docs/providers.md,
# "Webhooks"): up to this many per request, gathered for up to this long after the first.
# A request per event cost the front, the payments actor and PostgreSQL about a sixth of
# the authorization the event repeats.
SIM_WEBHOOK_BATCH_MAX = 32
SIM_WEBHOOK_BATCH_LINGER_MS = 50.0


@dataclass
class RunningFront:
    """One front: its actor, where it was placed and the ports it bound."""

    actor: Any
    placement: FrontPlacement
    http_port: int
    rpc_port: int
    event_loop: str = ""  # the event loop's module (uvloop where installed)

    @property
    def rpc_address(self) -> str:
        return f"{self.placement.address}:{self.rpc_port}"


@dataclass
class Processor:
    """A running processor and what it started (so it stops exactly that).

    ``front``, ``http_port`` and ``rpc_port`` are the first front's (the one on this node);
    ``fronts`` lists every front, that one first.
    """

    config: Config
    front: Any
    shards: list[Any]
    http_port: int
    rpc_port: int
    embedded: EmbeddedPostgres | None = None
    started_ray: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    providers: list[Any] = field(default_factory=list)  # provider actors
    provider_configs: list[ProviderConfig] = field(default_factory=list)
    provider_urls: dict[str, str] = field(default_factory=dict)
    sims: list[Any] = field(default_factory=list)  # simulated providers this process runs
    risk: Any = None
    payments: Any = None  # the payments actor (actors.payments.actor), when configured
    # The data-plane key (actors.channel); in memory only, never printed.
    channel_key: bytes = field(default=b"", repr=False)
    metrics: list[Any] = field(default_factory=list)  # one metrics server per node
    metrics_port: int = 0  # this node's
    # The administrative URL (migrations, operator commands); config.shard.database_url is
    # the service's, as the application role (actors.database.app_role_url).
    admin_database_url: str = field(default="", repr=False)
    # Every database's administrative URL by key (main's is admin_database_url): what
    # `txproc verify` and the tests read, database by database.
    admin_database_urls: dict[str, str] = field(default_factory=dict, repr=False)
    fronts: list[RunningFront] = field(default_factory=list)

    @property
    def rpc_addresses(self) -> list[str]:
        """Every front's RPC address (``host:port``), for ``Client(addresses=...)``."""
        return [f.rpc_address for f in self.fronts]

    async def supervise(self, interval_s: float = 0.5) -> None:
        """Run until cancelled: start a front again whenever Ray has restarted it, and
        wake a restarted payments actor (whose recovery worker then finishes what its
        predecessor left).

        A restarted actor runs its constructor only; listening is ``start``, so the new
        front is started here on the ports its predecessor bound.
        """
        nodes_seen_s = 0.0
        while True:
            await asyncio.sleep(interval_s)
            if self.config.fronts == 0 and time.monotonic() - nodes_seen_s >= NODES_EVERY_S:
                nodes_seen_s = time.monotonic()
                await self.follow_nodes()
            # Side by side: a payments actor that cannot start while a front is down (its
            # start posts through a front) must not hold up that front's restart.
            await asyncio.gather(self._wake_payments(),
                                 *[_restart_if_needed(f) for f in self.fronts])

    async def _wake_payments(self) -> None:
        if self.payments is None:
            return
        try:
            await asyncio.wait_for(self.payments.start.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - restarting, or the ledger or database away
            log.warning("payments not started: %r", exc)

    async def follow_nodes(self) -> None:
        """One front per alive node (processor.placement.follow_nodes): retire the fronts
        of nodes Ray has declared dead, start one on each node that joined, and rewrite
        ``fronts.json`` when that changed anything. A front that fails to start is
        killed and tried again next time."""
        nodes = await asyncio.to_thread(_alive_nodes)
        front = self.config.front
        change = follow_nodes([f.placement for f in self.fronts], nodes,
                              here=self.fronts[0].placement.node_id, host=front.host,
                              http_port=front.http_port, rpc_port=front.rpc_port)
        if not change.retire and not change.add:
            return
        for gone in [f for f in self.fronts if f.placement.index in change.retire]:
            log.warning("front %d retired: its node %s is gone", gone.placement.index,
                        gone.placement.node_id)
            ray.kill(gone.actor, no_restart=True)
            self.fronts.remove(gone)
        for placement in change.add:
            try:
                [started] = await _launch_fronts(self.config, self.channel_key, [placement],
                                                 timeout_s=FRONT_START_S)
            except Exception as exc:  # noqa: BLE001 - a node that has only just joined: next round
                log.warning("front %d on node %s not started: %r", placement.index,
                            placement.node_id, exc)
                continue
            self.fronts.append(started)
            log.info("front %d started on node %s: http %d, rpc %s", placement.index,
                     placement.node_id, started.http_port, started.rpc_address)
        self.fronts.sort(key=lambda f: f.placement.index)
        _write_fronts_file(self)

    async def stop(self) -> None:
        """Flush and close the front and shards, then stop what this process started."""
        if self.payments is not None:
            try:
                await asyncio.wait_for(self.payments.stop.remote(), timeout=15)
            except Exception as exc:  # noqa: BLE001 - every failure is logged or answered, never lost
                log.warning("payments stop: %r", exc)
        for front in self.fronts:
            try:
                await asyncio.wait_for(front.actor.stop.remote(), timeout=15)
            except Exception as exc:  # noqa: BLE001 - a dead front has nothing left to flush
                log.warning("front %d stop: %r", front.placement.index, exc)
        for shard in self.shards:
            try:
                await asyncio.wait_for(shard.stop.remote(), timeout=15)
            except Exception as exc:  # noqa: BLE001 - every failure is logged or answered, never lost
                log.warning("shard stop: %r", exc)
        for provider in self.providers:
            try:
                await asyncio.wait_for(provider.close.remote(), timeout=5)
            except Exception as exc:  # noqa: BLE001 - every failure is logged or answered, never lost
                log.warning("provider stop: %r", exc)
        for server in self.metrics:
            try:
                await asyncio.wait_for(server.stop.remote(), timeout=5)
            except Exception as exc:  # noqa: BLE001 - every failure is logged or answered, never lost
                log.warning("metrics server stop: %r", exc)
        for actor in [*(f.actor for f in self.fronts), *self.shards, *self.providers,
                      *self.metrics,
                      *([self.risk] if self.risk is not None else []),
                      *([self.payments] if self.payments is not None else [])]:
            ray.kill(actor, no_restart=True)
        for sim in self.sims:
            sim.stop()
        if self.started_ray:
            ray.shutdown()
        if self.embedded is not None:
            self.embedded.stop()
        metrics_dir = self.extra.get("metrics_dir")
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


async def _restart_if_needed(front: RunningFront) -> None:
    """Start ``front`` on its ports again if Ray restarted it (its new incarnation does not
    listen yet)."""
    index = front.placement.index
    try:
        listening = await asyncio.wait_for(front.actor.is_listening.remote(), timeout=10)
    except Exception as exc:  # noqa: BLE001 - dead or restarting: try again next round
        log.warning("front %d not answering: %r", index, exc)
        return
    if listening:
        return
    try:
        await asyncio.wait_for(
            front.actor.start.remote(front.http_port, front.rpc_port), timeout=60)
        log.info("front %d restarted on http %d, rpc %d", index, front.http_port,
                 front.rpc_port)
    except Exception as exc:  # noqa: BLE001 - every failure is logged or answered, never lost
        log.warning("front %d restart failed: %r", index, exc)


def init_ray(address: str | None, metrics_dir: str = "") -> bool:
    """Join the cluster at ``address`` or start a local Ray; True if this call started it.

    ``metrics_dir`` becomes every worker's ``PROMETHEUS_MULTIPROC_DIR`` (actors/ops/metrics.py).
    """
    if ray.is_initialized():
        return False
    # Keep the worker processes' logs out of the operator's terminal; they stay in Ray's
    # session directory for debugging.
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False}
    if metrics_dir:
        kwargs["runtime_env"] = {"env_vars": {"PROMETHEUS_MULTIPROC_DIR": metrics_dir}}
    # ray.init installs a SIGTERM handler that exits at once; a process that was told to
    # stop while the processor starts (``txproc serve``) must still flush and close, so
    # the handlers in place before are put back.
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)
                } if main_thread else {}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": a Ray of its own, never one that `ray start` left on this machine (which
        # ray.init would otherwise join, with other programs' actors on it).
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
                 **kwargs)
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)
    return True


async def start_processor(config: Config, *, payments_node: str | None = None) -> Processor:
    """Start everything ``config`` describes and return once /readyz would answer 200.

    ``payments_node``: the Ray node to start the payments actor on (softly: it moves to a
    surviving node if that one is lost); None, Ray's default placement."""
    config.check()
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start-up, before any work
    # Before anything starts: a refused key file (KeyFileError: a symbolic link, another
    # owner, readable by others) is reported here, by name, rather than by a failed actor.
    if config.front.key_path:
        # A ring named by --key-file is shared by every node: made by an operator
        # (`txproc keys rotate --key-file`), never here, where each node would make its own.
        if Path(config.front.key_path).name != KEYS_FILE_NAME:
            raise KeyFileError(f"--key-file {config.front.key_path}: a key ring's file is "
                               f"named {KEYS_FILE_NAME}")
        try:
            load_ring(config.keys_path)
            if config.payments.enabled:
                read_key(config.keys_path / MASTER_KEY_FILE_NAME)  # actors/payments/actor.py
        except FileNotFoundError as missing:
            raise KeyFileError(f"the key file {missing.filename} does not exist; make it "
                               "with `txproc keys rotate --key-file`") from None
    else:
        load_or_create_ring(config.keys_path, now_s=int(time.time()))
    admin_url, embedded = ensure_database(config)
    config_admin_databases = dict(config.shard.databases)
    try:
        service_urls, layout = await _prepare_databases(config, admin_url, embedded)
        # Every actor connects as the application role from here on, and finds each shard
        # in the database that holds its rows.
        config = msgspec.structs.replace(config, shard=msgspec.structs.replace(
            config.shard, database_url=service_urls[MAIN_DATABASE],
            databases={k: service_urls[k] for k in config.shard.databases}, layout=layout))
        config.check()
        metrics_dir = _fresh_metrics_dir()
        started_ray = init_ray(config.ray_address, metrics_dir)
        for s in range(config.shard.shards):
            _kill_stale(shard_actor_name(s))
        _kill_stale_fronts()
        # Authenticates the fronts' and the shards' data-plane channel (actors.channel);
        # lives only in those actors' arguments, never in a file or a log.
        channel_key = secrets.token_bytes(32)
        nodes = _alive_nodes()
        here = ray.get_runtime_context().get_node_id()
        shard_nodes = place_shards(nodes, here=here, shards=config.shard.shards)
        shards = [make_shard(s, config.shard, channel_key, config.observability, node_id=n)
                  for s, n in enumerate(shard_nodes)]
        fronts = await _start_fronts(config, channel_key, nodes, here)
        processor = Processor(
            config=config, front=fronts[0].actor, shards=shards,
            http_port=fronts[0].http_port, rpc_port=fronts[0].rpc_port, embedded=embedded,
            started_ray=started_ray,
            extra={"front_event_loop": fronts[0].event_loop, "metrics_dir": metrics_dir},
            channel_key=channel_key, admin_database_url=admin_url, fronts=fronts,
            admin_database_urls={MAIN_DATABASE: admin_url, **config_admin_databases},
        )
        _write_fronts_file(processor)
        await _start_metrics(processor, embedded)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    if config.payments.enabled and config.payments.providers:
        try:
            await _start_payments(processor, payments_node)
        except BaseException:
            await processor.stop()
            raise
    return processor


async def _prepare_databases(config: Config, admin_url: str,
                             embedded: EmbeddedPostgres | None
                             ) -> tuple[dict[str, str], tuple[str, ...]]:
    """Migrate every database, find the layout (the one the databases recorded, else, at
    a ledger's first start, shards dealt round-robin), record in each its part of the
    partition map (refusing a layout other than the recorded one), and return each one's
    service URL (as the application role), by key, with the database key of each shard.
    One database, the default, is what it always was."""
    admin_urls = {MAIN_DATABASE: admin_url, **config.shard.databases}
    for key, url in admin_urls.items():
        applied = await migrate(url)
        if applied:
            log.info("database %s: applied migrations %s", key, applied)
    # The databases' own record, once there is one; else (a first start) dealt.
    dealt = config.shard.partition_map()
    partitions = await recorded_layout(admin_urls, dealt) or dealt
    if partitions.shards != config.shard.shards:
        raise ValueError(
            f"this ledger was created with {partitions.shards} shards; start it with "
            f"--shards {partitions.shards} (re-sharding a live ledger is not supported)")
    password_file = app_password_file(config, embedded)
    urls: dict[str, str] = {}
    for key, url in admin_urls.items():
        # As the administrative role: it locks the table, which the service may not.
        store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                          command_timeout_s=30)
        try:
            await store.ensure_partition_map(partitions, key)
        finally:
            await store.close()
        # One password file for the role on every server: the processor keeps one.
        urls[key] = await app_role_url(url, password_file)
    if len(partitions.databases) > 1 and config.payments.enabled and config.payments.providers:
        await _require_placed_clearing(admin_url)
    return urls, partitions.database_of_shard


async def _require_placed_clearing(main_url: str) -> None:
    """Payments over several databases need each payment's postings in its merchant
    account's database: clearing accounts per placement (migration 0034). A ledger that
    held payments before keeps one clearing account per currency, whose holds would join
    two databases: refused before anything starts, naming the way out."""
    connection = await asyncpg.connect(main_url, timeout=10)
    try:
        placed = await connection.fetchval("SELECT clearing_per_partition FROM payments_layout")
    finally:
        await connection.close(timeout=10)
    if not placed:
        raise ValueError(
            "several databases with payments need clearing accounts per placement, and this "
            "ledger posts payments against one clearing account per currency (it held "
            "payments before migration 0034): switch it first (docs/operations.md, "
            "\"Payments' clearing accounts per placement\") or start with --no-payments")


def _alive_nodes() -> list[NodeView]:
    return [NodeView(n["NodeID"], n["NodeManagerAddress"])
            for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]


async def _start_fronts(config: Config, channel_key: bytes, nodes: list[NodeView],
                        here: str) -> list[RunningFront]:
    """One front per alive node (or ``config.fronts`` on this node ``here``), each pinned
    to its node and listening on its address (processor/placement.py)."""
    front = config.front
    placements = place_fronts(nodes, here=here, host=front.host, http_port=front.http_port,
                              rpc_port=front.rpc_port, count=config.fronts)
    return await _launch_fronts(config, channel_key, placements)


async def _launch_fronts(config: Config, channel_key: bytes,
                         placements: list[FrontPlacement],
                         timeout_s: float | None = None) -> list[RunningFront]:
    """Start a front actor per placement and wait until each listens; on any failure
    every one of them is killed and the failure raised."""
    front = config.front
    actors = [make_front(msgspec.structs.replace(config, front=msgspec.structs.replace(
                  front, host=p.bind_host, http_port=p.http_port, rpc_port=p.rpc_port)),
                         channel_key, index=p.index, node_id=p.node_id)
              for p in placements]
    try:
        ports = await asyncio.wait_for(
            asyncio.gather(*[a.start.remote() for a in actors]), timeout=timeout_s)
    except BaseException as exc:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, ListenError):
            # A port taken or an address not this machine's: said in one line, not as the
            # actor's traceback.
            raise ListenError(f"a front could not listen: {exc.cause}") from None
        raise
    return [RunningFront(actor=a, placement=p, http_port=port["http_port"],
                         rpc_port=port["rpc_port"], event_loop=port["loop"])
            for a, p, port in zip(actors, placements, ports, strict=True)]


def _write_fronts_file(processor: Processor) -> Path:
    """``fronts.json`` in the data directory: every front's node, HTTP URL and RPC address,
    replaced whole (docs/operations.md, "Several fronts")."""
    document = fronts_document([f.placement for f in processor.fronts],
                               [(f.http_port, f.rpc_port) for f in processor.fronts],
                               tls=processor.config.front.tls)
    target = Path(processor.config.data_dir) / FRONTS_FILE
    partial = target.with_name(f".{FRONTS_FILE}.partial")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.replace(target)
    return target


def _kill_stale_fronts() -> None:
    """Fronts left by an earlier run in the same cluster, however many it had."""
    for index in itertools.count():
        try:
            ray.get_actor(front_actor_name(index), namespace=NAMESPACE)
        except ValueError:
            return
        _kill_stale(front_actor_name(index))


def _fresh_metrics_dir() -> str:
    """An empty directory for this run's multiprocess metric files (one per process)."""
    path = Path(tempfile.gettempdir()) / "txproc-metrics" / uuid.uuid4().hex[:12]
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


async def _start_metrics(processor: Processor, embedded: EmbeddedPostgres | None) -> None:
    """A metrics server on every alive node; the one on this node also reads the database
    gauges. Other nodes bind their own address; this one the configured host."""
    config = processor.config
    obs = config.observability
    here = ray.get_runtime_context().get_node_id()
    url = config.shard.database_url
    local_db = embedded is None and ("@/" in url or "127.0.0.1" in url or "localhost" in url)
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        if not node.get("Alive"):
            continue
        node_id = node["NodeID"]
        _kill_stale(node_metrics_name(node_id))
        local = node_id == here
        server = make_node_metrics(
            node_id, multiproc_dir=processor.extra["metrics_dir"],
            host=config.front.host if local else node["NodeManagerAddress"],
            port=obs.metrics_port, database_url=url, database_gauges=local,
            vcpu_hour_price=obs.vcpu_hour_price, price_currency=obs.price_currency,
            postgres_pid=embedded.pid if (embedded is not None and local) else None,
            local_postgres=local_db and local, data_dir=config.data_dir,
            window_s=obs.cost_window_s,
            observability=obs)
        port = await server.start.remote()
        processor.metrics.append(server)
        if local:
            processor.metrics_port = port


async def _start_payments(processor: Processor, node_id: str | None = None) -> None:
    """Simulated providers (where no URL is configured), provider actors, the risk actor,
    then the payments actor, to which the front forwards the payments API."""
    from adapters.registry import ADAPTERS
    from adapters.sim.launch import start_sim, write_secrets

    config = processor.config
    unknown = [e.name for e in config.payments.providers if e.name not in ADAPTERS]
    if unknown:
        raise ValueError(f"no adapter for providers {unknown}; known: {sorted(ADAPTERS)}")
    data = Path(config.data_dir)
    (data / "providers").mkdir(parents=True, exist_ok=True)
    host = config.front.host if config.front.host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104 - a comparison, not a bind
    for endpoint in config.payments.providers:
        secrets = Path(endpoint.secrets_file or data / "providers" / f"{endpoint.name}.json")
        url = endpoint.base_url
        if not url:
            write_secrets(secrets, endpoint.name)
            front = config.front
            scheme = "https" if front.tls else "http"
            webhook = (f"{scheme}://{host}:{processor.http_port}"
                       f"/v1/providers/{endpoint.name}/webhooks")
            sim = start_sim(endpoint.name, secrets_file=secrets, webhook_url=webhook,
                            report_dir=data / "providers" / "reports" / endpoint.name,
                            webhook_tls=(front.tls_server_ca_path, front.tls_internal_cert_path,
                                         front.tls_internal_key_path),
                            webhook_batch_max=SIM_WEBHOOK_BATCH_MAX,
                            webhook_batch_linger_ms=SIM_WEBHOOK_BATCH_LINGER_MS)
            processor.sims.append(sim)
            url = sim.url
        _kill_stale(provider_actor_name(endpoint.name))
        provider = ProviderConfig(name=endpoint.name, base_url=url,
                                  secrets_file=str(secrets), cpu_nice=config.payments.cpu_nice)
        processor.providers.append(make_provider(provider, config.observability,
                                                 channel_key=processor.channel_key))
        processor.provider_configs.append(provider)
        processor.provider_urls[endpoint.name] = url
    await asyncio.gather(*[p.info.remote() for p in processor.providers])
    _kill_stale(RISK_ACTOR_NAME)
    processor.risk = make_risk(config.payments.risk, config.observability,
                               cpu_nice=config.payments.cpu_nice,
                               channel_key=processor.channel_key)
    await processor.risk.ready.remote()
    _kill_stale(PAYMENTS_ACTOR_NAME)
    processor.payments = make_payments(
        config, processor.channel_key, providers=processor.provider_configs,
        outbox_secret=_outbox_secret(data / "providers" / "outbox.key"),
        front_rpc=[(host, processor.rpc_port),
                   *((f.placement.address, f.rpc_port) for f in processor.fronts[1:])],
        node_id=node_id)
    await processor.payments.start.remote()


def _outbox_secret(path: Path) -> bytes:
    """The key signing event deliveries to subscribers: made once, kept 0600, never logged."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


def _kill_stale(name: str) -> None:
    """A named actor left by an earlier run in the same cluster would block the name."""
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        return
    for _ in range(100):  # the name is released once the kill has gone through
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
