"""One Prometheus scrape endpoint per node: every actor's metrics, money-path gauges, cost.

``NodeMetrics`` runs on each node of the cluster (pinned there by the runtime) and serves
``GET /metrics`` on ``--metrics-port`` (9464 by default). A scrape returns:

* the samples every actor process of the node wrote to ``PROMETHEUS_MULTIPROC_DIR``
  (``actors/ops/metrics.py``), added up across processes;
* on the node that hosts the database gauges (the first one): the outbox backlog and its
  oldest event's age, dead letters not yet replayed, and the payment steps that are open,
  waiting on a provider's answer, or overdue for the recovery worker;
* the cost of a transfer: CPU-seconds used by the node's server processes (Ray's workers,
  raylet and GCS, the embedded PostgreSQL, the simulated providers) per committed transfer
  over a sliding window, and the same priced at ``vcpu_hour_price`` per vCPU-hour.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterator
from typing import Any

import psutil
import ray
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from actors.names import NAMESPACE

__all__ = ["NodeMetrics", "make_node_metrics", "node_metrics_name"]

log = logging.getLogger("txproc.metrics")
# Ray's own processes of this cluster carry its session directory on their command line;
# its workers (every actor) are the raylet's children.
_RAY_DAEMONS = ("raylet", "gcs_server")


def node_metrics_name(node_id: str) -> str:
    return f"txproc-metrics-{node_id[:12]}"


class _CpuMeter:
    """CPU-seconds the node's server processes have used, never going down when one exits.

    Counted: this Ray cluster's raylet and GCS (by its session directory) and every process
    under the raylet (the actors), the embedded PostgreSQL's postmaster and its children (or
    local ``postgres`` processes when the database is an external one on this host), and
    the simulated providers of this data directory. Other Ray clusters on the same host are
    not. Each process's own total is remembered; a process that is gone keeps its last
    total, so the sum only grows.
    """

    def __init__(self, *, session_dir: str, data_dir: str, postgres_pid: int | None,
                 local_postgres: bool) -> None:
        self._seen: dict[tuple[int, float], float] = {}  # (pid, create time) -> cpu s
        self._processes: dict[int, psutil.Process] = {}
        self._session_dir = session_dir
        self._data_dir = data_dir
        self._postgres_pid = postgres_pid
        self._local_postgres = local_postgres

    def _tree(self, pid: int) -> set[int]:
        try:
            root = psutil.Process(pid)
            return {root.pid, *(c.pid for c in root.children(recursive=True))}
        except psutil.Error:
            return set()

    def _server_pids(self) -> set[int]:
        pids: set[int] = set()
        if self._postgres_pid is not None:
            pids |= self._tree(self._postgres_pid)
        for proc in psutil.process_iter(["name", "cmdline"]):
            name = proc.info.get("name") or ""
            cmdline = " ".join(proc.info.get("cmdline") or ())
            if name in _RAY_DAEMONS and self._session_dir and self._session_dir in cmdline:
                pids |= self._tree(proc.pid) if name == "raylet" else {proc.pid}
            elif self._local_postgres and name == "postgres":
                pids.add(proc.pid)
            elif "adapters.sim." in cmdline and self._data_dir and self._data_dir in cmdline:
                pids.add(proc.pid)
        return pids

    def total_s(self) -> float:
        alive: dict[int, psutil.Process] = {}
        for pid in self._server_pids():
            proc = self._processes.get(pid)
            if proc is None:
                try:
                    proc = psutil.Process(pid)
                except psutil.Error:
                    continue
            alive[pid] = proc
        self._processes = alive
        for pid, proc in alive.items():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    key = (pid, proc.create_time())
                self._seen[key] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return sum(self._seen.values())


class _CostCollector:
    """txproc_cost_*: server CPU per committed transfer over a sliding window."""

    def __init__(self, transfers_committed: Any, meter: _CpuMeter, *, window_s: float,
                 price: float, currency: str) -> None:
        self._transfers_committed = transfers_committed  # () -> float
        self._window_s = window_s
        self._price = price
        self._currency = currency
        self._meter = meter
        self._samples: collections.deque[tuple[float, float, float]] = collections.deque()

    def sample(self) -> tuple[float, float]:
        now_s = time.monotonic()
        cpu_s = self._meter.total_s()
        transfers = self._transfers_committed()
        self._samples.append((now_s, cpu_s, transfers))
        while len(self._samples) > 2 and self._samples[1][0] <= now_s - self._window_s:
            self._samples.popleft()
        return cpu_s, transfers

    def collect(self) -> Iterator[Metric]:
        cpu_s, transfers = self.sample()
        _, first_cpu, first_transfers = self._samples[0]
        done = transfers - first_transfers
        per_transfer = (cpu_s - first_cpu) / done if done > 0 else 0.0
        yield GaugeMetricFamily(
            "txproc_server_cpu_seconds_total",
            "CPU-seconds used by this node's server processes since the metrics server "
            "started watching them.", value=cpu_s)
        yield CounterMetricFamily(
            "txproc_transfers_committed", "Transfers stored (ok) on this node's shards.",
            value=transfers)
        yield GaugeMetricFamily(
            "txproc_cost_cpu_seconds_per_transfer",
            f"Server CPU-seconds per committed transfer over the last {self._window_s:.0f} s "
            "(0 when none was committed).", value=per_transfer)
        cost = GaugeMetricFamily(
            "txproc_cost_per_transfer",
            "Server cost of one committed transfer at the configured vCPU-hour price.",
            labels=["currency"])
        cost.add_metric([self._currency], per_transfer * self._price / 3600.0)
        yield cost


class _DatabaseCollector:
    """Money-path gauges read from PostgreSQL every few seconds (cached between scrapes)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        described = {
            "txproc_outbox_undelivered": "Event deliveries not yet made.",
            "txproc_outbox_oldest_undelivered_age_seconds":
                "Age of the oldest event not yet delivered to every subscriber.",
            "txproc_dead_letters": "Event deliveries given up on and not yet replayed.",
            "txproc_payment_steps_open": "Payment saga steps not yet final.",
            "txproc_payment_steps_unknown":
                "Steps whose provider outcome is unknown or awaited (resolve, await).",
            "txproc_payment_steps_stale":
                "Unfinished steps past their due time: the recovery worker is behind.",
        }
        for name, text in described.items():
            if name in self.values:
                yield GaugeMetricFamily(name, text, value=self.values[name])


def _session_dir() -> str:
    """This Ray cluster's session directory (on the node this process runs on)."""
    try:
        return str(ray._private.worker._global_node.get_session_dir_path())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not in a Ray worker (a unit test): count no Ray processes
        return ""


class NodeMetrics:
    def __init__(self, *, multiproc_dir: str, host: str, port: int, database_url: str,
                 database_gauges: bool, vcpu_hour_price: float, price_currency: str,
                 postgres_pid: int | None = None, local_postgres: bool = False,
                 data_dir: str = "",
                 window_s: float = 60.0, refresh_s: float = 5.0,
                 observability: Any = None) -> None:
        if observability is not None:
            from actors.ops import telemetry

            telemetry.setup(observability, "metrics")
        self._dir = multiproc_dir
        self._host = host
        self._port = port
        self._database_url = database_url
        self._database_gauges = database_gauges
        self._refresh_s = refresh_s
        self._multiprocess = MultiProcessCollector(CollectorRegistry(), path=multiproc_dir)  # type: ignore[no-untyped-call]
        meter = _CpuMeter(session_dir=_session_dir(), data_dir=data_dir,
                          postgres_pid=postgres_pid, local_postgres=local_postgres)
        self._cost = _CostCollector(self._committed, meter, window_s=window_s,
                                    price=vcpu_hour_price, currency=price_currency)
        self._db = _DatabaseCollector()
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    def _committed(self) -> float:
        total = 0.0
        for family in self._multiprocess.collect():  # type: ignore[no-untyped-call]
            if family.name == "txproc_transfers":
                total += sum(s.value for s in family.samples
                             if s.name == "txproc_transfers_total"
                             and s.labels.get("result") == "ok")
        return total

    async def start(self) -> int:
        """Listen; returns the bound port."""
        registry = CollectorRegistry()
        registry.register(self._multiprocess)
        registry.register(self._cost)
        registry.register(self._db)
        self._server, _thread = start_http_server(self._port, addr=self._host,
                                                  registry=registry)
        self._task = asyncio.get_running_loop().create_task(self._refresh())
        return int(self._server.server_port)

    async def _refresh(self) -> None:
        import asyncpg

        from actors.payments import outbox

        pool = None
        while True:
            try:
                self._cost.sample()
                if self._database_gauges:
                    if pool is None:
                        pool = await asyncpg.create_pool(self._database_url, min_size=1,
                                                         max_size=1, timeout=10,
                                                         command_timeout=10)
                    await self._read_database(pool, outbox)
            except Exception as exc:  # noqa: BLE001 - the database may be away; the gauges keep their values
                log.warning("metrics refresh failed: %r", exc)
            await asyncio.sleep(self._refresh_s)

    async def _read_database(self, pool: Any, outbox: Any) -> None:
        backlog = await outbox.backlog(pool)
        row = await pool.fetchrow(
            "SELECT count(*) AS open, "
            "count(*) FILTER (WHERE phase IN ('resolve', 'await_provider')) AS unknown, "
            "count(*) FILTER (WHERE due_at < now() - interval '5 seconds') AS stale "
            "FROM payment_steps WHERE phase NOT IN ('succeeded', 'failed', 'compensated')")
        self._db.values = {
            "txproc_outbox_undelivered": float(backlog.get("undelivered", 0)),
            "txproc_outbox_oldest_undelivered_age_seconds":
                float(backlog.get("oldest_undelivered_age_s", 0.0) or 0.0),
            "txproc_dead_letters": float(backlog.get("dead_letters", 0)),
            "txproc_payment_steps_open": float(row["open"]),
            "txproc_payment_steps_unknown": float(row["unknown"]),
            "txproc_payment_steps_stale": float(row["stale"]),
        }

    def port(self) -> int:
        return int(self._server.server_port) if self._server is not None else 0

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def make_node_metrics(node_id: str, **kwargs: Any) -> Any:
    """Start the metrics server of one node, pinned to it (the one place it is made remote)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_class = ray.remote(  # type: ignore[call-overload]
        num_cpus=0, max_restarts=-1, max_task_retries=0,
                             max_concurrency=16)(NodeMetrics)
    return actor_class.options(
        name=node_metrics_name(node_id), namespace=NAMESPACE,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(**kwargs)
