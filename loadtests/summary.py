"""The figures of a load-test run, from the per-request records the locustfile writes.

Pure apart from reading the record files and writing the PNGs (matplotlib, imported only by
``render_pngs``): percentiles, per-operation statistics, error rates by code, cost per
transaction from server CPU seconds, latency per second and its CDF, and the markdown.

A record is one line ``start_s,kind,name,latency_ms,ok,code,count``: ``kind`` is ``http``
(an HTTP request, also one operation), ``batch`` (an RPC call) or ``item`` (``count``
operations of one RPC call that got the same result ``code``; their latency is the call's).
Requests are http + batch records; operations are http + item records.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CATEGORIES",
    "HEADLINE",
    "VCPU_HOUR_PRICE_USD",
    "Record",
    "cdf_points",
    "cost_figures",
    "error_rates_by_code",
    "latency_over_time",
    "operation_stats",
    "parse_record",
    "percentile",
    "read_records",
    "render_markdown",
    "render_pngs",
    "summarize",
    "weighted_percentile",
]

VCPU_HOUR_PRICE_USD = 0.04
PERCENTILES = (50, 95, 99)

# Per scenario: which operations are transfers and which are authorizations (for
# transfers/s and the cost per transaction); operations not named are neither (captures and
# refunds of payments, whose cost is in the CPU but not in the count).
CATEGORIES: dict[str, dict[str, str]] = {
    "partners": {"transfer": "transfer", "authorize": "authorization"},
    "gateways": {"transfer": "transfer"},
    "hot-account": {"transfer": "transfer", "transfer hot": "transfer"},
    "holds": {"authorize": "authorization", "capture": "transfer", "void": "transfer"},
}
# Per scenario: the operation whose latency is the headline (and the latency-over-time
# picture): the authorization where there is one.
HEADLINE: dict[str, str] = {
    "partners": "authorize",
    "gateways": "create_transfers batch",
    "hot-account": "transfer hot",
    "holds": "authorize",
}


@dataclass(frozen=True, slots=True)
class Record:
    start_s: float
    kind: str
    name: str
    latency_ms: float
    ok: bool
    code: str
    count: int = 1

    @property
    def is_request(self) -> bool:
        return self.kind in ("http", "batch")

    @property
    def is_operation(self) -> bool:
        return self.kind in ("http", "item")


def parse_record(line: str) -> Record | None:
    """One record line, or None for a blank or torn line (the last one of a killed run)."""
    parts = line.rstrip("\n").split(",")
    if len(parts) != 7:
        return None
    try:
        return Record(float(parts[0]), parts[1], parts[2], float(parts[3]), parts[4] == "1",
                      parts[5], int(parts[6]))
    except ValueError:
        return None


def read_records(paths: Iterable[Path]) -> list[Record]:
    """The records of every file, sorted by start time."""
    out: list[Record] = []
    for path in paths:
        with path.open() as file:
            out.extend(r for r in map(parse_record, file) if r is not None)
    out.sort(key=lambda r: r.start_s)
    return out


# -- percentiles ------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile ``p`` (0..100] of already sorted values; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(len(sorted_values) * p / 100))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def weighted_percentile(sorted_pairs: Sequence[tuple[float, int]], p: float) -> float:
    """Nearest-rank percentile of (value, count) pairs sorted by value: as if each value
    appeared ``count`` times. 0.0 when there is nothing."""
    total = sum(c for _, c in sorted_pairs)
    if total <= 0:
        return 0.0
    rank = max(1, math.ceil(total * p / 100))
    seen = 0
    for value, count in sorted_pairs:
        seen += count
        if seen >= rank:
            return float(value)
    return float(sorted_pairs[-1][0])


def _latency_figures(records: Sequence[Record]) -> dict[str, float]:
    pairs = sorted((r.latency_ms, r.count) for r in records)
    total = sum(c for _, c in pairs)
    out = {f"p{p}": round(weighted_percentile(pairs, p), 2) for p in PERCENTILES}
    out["max"] = round(pairs[-1][0], 2) if pairs else 0.0
    out["mean"] = round(sum(v * c for v, c in pairs) / total, 2) if total else 0.0
    return out


# -- statistics -------------------------------------------------------------------------------


def window_s(records: Sequence[Record]) -> float:
    """Seconds from the first request's start to the last one's end (at least 1 ms)."""
    if not records:
        return 0.0
    first = min(r.start_s for r in records)
    last = max(r.start_s + r.latency_ms / 1000 for r in records)
    return max(last - first, 0.001)


def operation_stats(records: Sequence[Record], window: float) -> dict[str, dict[str, Any]]:
    """Per name: count, ok, errors, error_rate, per_s (ok per second of ``window``),
    latency (p50/p95/p99/max/mean ms, count-weighted) and the count of every code."""
    by_name: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_name[r.name].append(r)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(by_name):
        rs = by_name[name]
        count = sum(r.count for r in rs)
        ok = sum(r.count for r in rs if r.ok)
        codes: Counter[str] = Counter()
        for r in rs:
            codes[r.code] += r.count
        out[name] = {
            "kind": rs[0].kind,
            "count": count,
            "ok": ok,
            "errors": count - ok,
            "error_rate": round((count - ok) / count, 6) if count else 0.0,
            "ok_per_s": round(ok / window, 2) if window > 0 else 0.0,
            "latency_ms": _latency_figures(rs),
            "codes": dict(codes.most_common()),
        }
    return out


def error_rates_by_code(records: Sequence[Record]) -> dict[str, Any]:
    """Errors of all operations (HTTP requests and RPC items) by code, each with its count
    and its rate (share of all operations); RPC calls that failed as a whole by code too."""
    operations = sum(r.count for r in records if r.is_operation)
    errors: Counter[str] = Counter()
    for r in records:
        if r.is_operation and not r.ok:
            errors[r.code] += r.count
    batches = sum(r.count for r in records if r.kind == "batch")
    batch_errors: Counter[str] = Counter()
    for r in records:
        if r.kind == "batch" and not r.ok:
            batch_errors[r.code] += r.count
    out: dict[str, Any] = {
        "operations": operations,
        "errors": sum(errors.values()),
        "error_rate": round(sum(errors.values()) / operations, 6) if operations else 0.0,
        "by_code": {code: {"count": n, "rate": round(n / operations, 6)}
                    for code, n in errors.most_common()},
    }
    if batches:
        out["rpc_calls"] = batches
        out["rpc_calls_failed_by_code"] = {
            code: {"count": n, "rate": round(n / batches, 6)}
            for code, n in batch_errors.most_common()}
    return out


def cpu_kind(group: str) -> str:
    """The coarse kind of a CPU group: ``ray_workers`` (the processor's actors and Ray's
    idle workers), ``ray_system`` (raylet, GCS, Ray's agents), ``postgres`` or
    ``providers`` (the simulated payment providers)."""
    if group in ("postgres", "providers"):
        return group
    if group.startswith("ray::") and not group.endswith("Agent") \
            and group != "ray::NodeMetrics":
        return "ray_workers"
    return "ray_system"


def cpu_at(samples: Sequence[tuple[float, Mapping[str, float]]],
           t: float) -> dict[str, float]:
    """Cumulative CPU seconds per group at time ``t``, linearly interpolated between the
    two samples around it (clamped to the first and last sample); a group missing from a
    sample had spent nothing yet."""
    if not samples:
        return {}
    if t <= samples[0][0]:
        return dict(samples[0][1])
    if t >= samples[-1][0]:
        return dict(samples[-1][1])
    for (ta, a), (tb, b) in itertools.pairwise(samples):
        if ta <= t <= tb:
            share = (t - ta) / (tb - ta) if tb > ta else 1.0
            return {g: a.get(g, 0.0) + (b.get(g, 0.0) - a.get(g, 0.0)) * share
                    for g in set(a) | set(b)}
    return dict(samples[-1][1])  # unreachable: samples are sorted


def cpu_between(samples: Sequence[tuple[float, Mapping[str, float]]], t0: float,
                t1: float) -> dict[str, float]:
    """CPU seconds per group spent between ``t0`` and ``t1`` (see ``cpu_at``)."""
    a, b = cpu_at(samples, t0), cpu_at(samples, t1)
    return {g: round(b.get(g, 0.0) - a.get(g, 0.0), 4) for g in sorted(set(a) | set(b))}


def cpu_cores_over_time(samples: Sequence[tuple[float, Mapping[str, float]]], t0: float,
                        t1: float | None = None) -> list[dict[str, float]]:
    """Server CPU in cores (CPU-seconds per second) between consecutive samples, at the
    midpoint's time since ``t0``; only intervals that overlap ``t0``..``t1``."""
    out = []
    for (ta, a), (tb, b) in itertools.pairwise(samples):
        if tb <= t0 or (t1 is not None and ta >= t1):
            continue
        if tb > ta:
            out.append({"t_s": round((ta + tb) / 2 - t0, 3),
                        "cores": round((sum(b.values()) - sum(a.values())) / (tb - ta), 3)})
    return out


def cost_figures(cpu_s: Mapping[str, float] | None, transactions: int, operations_ok: int,
                 vcpu_hour_price_usd: float = VCPU_HOUR_PRICE_USD) -> dict[str, Any]:
    """Cost per transaction from the server's CPU seconds by process group.

    ``transactions`` are completed transfers plus authorizations; ``operations_ok`` every
    successful operation (captures and refunds too). A vCPU-hour at
    ``vcpu_hour_price_usd`` costs ``price / 3600`` per CPU-second. ``cpu_s`` None: the
    server's processes were not measured (a ``--target`` run without ``--server-pid``).
    """
    if cpu_s is None:
        return {"measured": False, "vcpu_hour_price_usd": vcpu_hour_price_usd}
    total = sum(cpu_s.values())
    per_cpu_s = vcpu_hour_price_usd / 3600
    kinds: Counter[str] = Counter()
    for g, v in cpu_s.items():
        kinds[cpu_kind(g)] += v
    out: dict[str, Any] = {
        "measured": True,
        "cpu_s_by_group": {g: round(v, 3) for g, v in sorted(cpu_s.items())},
        "cpu_s_by_kind": {k: round(v, 3) for k, v in sorted(kinds.items())},
        "cpu_s_total": round(total, 3),
        "transactions": transactions,
        "vcpu_hour_price_usd": vcpu_hour_price_usd,
    }
    if transactions > 0:
        out["cpu_ms_per_transaction"] = round(total * 1000 / transactions, 4)
        out["usd_per_transaction"] = total / transactions * per_cpu_s
        out["usd_per_million_transactions"] = round(total / transactions * per_cpu_s * 1e6, 4)
    if operations_ok > 0:
        out["operations_ok"] = operations_ok
        out["cpu_ms_per_operation"] = round(total * 1000 / operations_ok, 4)
    return out


def latency_over_time(records: Sequence[Record], name: str, t0: float,
                      bucket_s: float = 1.0) -> list[dict[str, float]]:
    """Per ``bucket_s`` (by start time, from ``t0``): requests of ``name`` and their
    p50/p95/p99 latency (ms); buckets without any are left out."""
    buckets: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for r in records:
        if r.name == name:
            buckets[int((r.start_s - t0) // bucket_s)].append((r.latency_ms, r.count))
    out = []
    for b in sorted(buckets):
        pairs = sorted(buckets[b])
        row: dict[str, float] = {"t_s": round(b * bucket_s, 3),
                                 "count": sum(c for _, c in pairs)}
        row.update({f"p{p}": round(weighted_percentile(pairs, p), 2) for p in PERCENTILES})
        out.append(row)
    return out


def cdf_points(records: Sequence[Record], name: str,
               points_max: int = 500) -> list[tuple[float, float]]:
    """(latency ms, share of requests at or below it) of ``name``, at most ``points_max``
    points (evenly spread over the ranks, always ending at the maximum)."""
    pairs = sorted((r.latency_ms, r.count) for r in records if r.name == name)
    total = sum(c for _, c in pairs)
    if total == 0:
        return []
    step = max(1, math.ceil(total / points_max))
    out: list[tuple[float, float]] = []
    seen = 0
    next_mark = step
    for value, count in pairs:
        seen += count
        if seen >= next_mark or seen == total:
            out.append((value, seen / total))
            next_mark = (seen // step + 1) * step
    return out


# -- the summary ------------------------------------------------------------------------------


def summarize(records: Sequence[Record], *, scenario: str,
              cpu_samples: Sequence[tuple[float, Mapping[str, float]]] | None = None,
              vcpu_hour_price_usd: float = VCPU_HOUR_PRICE_USD,
              run: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary of a run: ``run`` (command, settings, machine) is copied in as it is.

    ``cpu_samples`` are (Unix time, cumulative server CPU seconds per group) readings taken
    during the run; the cost counts the CPU spent within the measured window (first
    request sent to last answer received). None: not measured.
    """
    window = window_s(records)
    t0 = min((r.start_s for r in records), default=0.0)
    cpu_s = cpu_between(cpu_samples, t0, t0 + window) if cpu_samples else None
    ops = operation_stats([r for r in records if r.is_operation], window)
    requests = operation_stats([r for r in records if r.kind == "batch"], window)
    categories = CATEGORIES.get(scenario, {})
    completed: Counter[str] = Counter()
    for name, figures in ops.items():
        if name in categories:
            completed[categories[name]] += figures["ok"]
    transfers, authorizations = completed["transfer"], completed["authorization"]
    operations_ok = sum(f["ok"] for f in ops.values())
    headline = HEADLINE.get(scenario, "")
    by_name = {**ops, **requests}
    summary: dict[str, Any] = {
        "scenario": scenario,
        **dict(run or {}),
        "window_s": round(window, 3),
        "requests": sum(r.count for r in records if r.is_request),
        "requests_per_s": round(sum(r.count for r in records if r.is_request) / window, 2)
        if window else 0.0,
        "transfers": transfers,
        "transfers_per_s": round(transfers / window, 2) if window else 0.0,
        "authorizations": authorizations,
        "authorizations_per_s": round(authorizations / window, 2) if window else 0.0,
        "headline_operation": headline,
        "headline_latency_ms": by_name.get(headline, {}).get("latency_ms", {}),
        "operations": ops,
        "rpc_calls": requests,
        "errors": error_rates_by_code(records),
        "cost": cost_figures(cpu_s, transfers + authorizations, operations_ok,
                             vcpu_hour_price_usd),
        "latency_over_time": latency_over_time(records, headline, t0) if headline else [],
        "cpu_cores_over_time": cpu_cores_over_time(cpu_samples, t0, t0 + window)
        if cpu_samples else [],
    }
    if headline == "authorize":
        summary["authorization_latency_ms"] = summary["headline_latency_ms"]
    return summary


def _fmt(value: Any, spec: str = ",.1f") -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def render_markdown(summary: Mapping[str, Any], pictures: Sequence[str] = ()) -> str:
    """The summary as markdown: headline figures, per-operation table, errors, cost."""
    s = summary
    lines = [f"# txproc load test: {s['scenario']}", ""]
    if s.get("command"):
        lines += [f"`{s['command']}`", ""]
    facts = [("started (UTC)", s.get("started_utc")), ("target", s.get("target")),
             ("duration asked, s", s.get("duration_s")), ("measured window, s",
                                                          s.get("window_s")),
             ("offered rate, requests/s", s.get("offered_rate")), ("users", s.get("users")),
             ("request bound", s.get("max_requests")), ("stopped by", s.get("stopped_by")),
             ("machine", s.get("machine_text"))]
    lines += ["| | |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v, ',')} |" for k, v in facts if v not in (None, "")]
    lines.append("")
    headline = s.get("headline_operation", "")
    lat = s.get("headline_latency_ms") or {}
    what = "authorization" if headline == "authorize" else f"`{headline}`"
    lines += [
        "## Headline",
        "",
        f"- {what} latency: p50 {_fmt(lat.get('p50'))} ms, p95 {_fmt(lat.get('p95'))} ms, "
        f"p99 {_fmt(lat.get('p99'))} ms",
        f"- transfers/s: {_fmt(s.get('transfers_per_s'))} ({_fmt(s.get('transfers'), ',')} "
        f"transfers); authorizations/s: {_fmt(s.get('authorizations_per_s'))} "
        f"({_fmt(s.get('authorizations'), ',')})",
        f"- requests/s: {_fmt(s.get('requests_per_s'))} ({_fmt(s.get('requests'), ',')} "
        "requests)",
    ]
    errors = s.get("errors") or {}
    lines.append(f"- error rate: {_fmt(100 * errors.get('error_rate', 0), '.2f')} % of "
                 f"{_fmt(errors.get('operations', 0), ',')} operations")
    cost = s.get("cost") or {}
    if cost.get("measured") and "cpu_ms_per_transaction" in cost:
        lines.append(
            f"- cost: {_fmt(cost['cpu_ms_per_transaction'], ',.3f')} server CPU-ms per "
            f"transaction, {cost['usd_per_million_transactions']:,.4f} USD per million at "
            f"{cost['vcpu_hour_price_usd']:g} USD per vCPU-hour")
    elif not cost.get("measured"):
        lines.append("- cost: not measured (the server's processes were not given)")
    lines += ["", "## Operations", "",
              "| operation | count | ok | errors | error % | ok/s | p50 ms | p95 ms | p99 ms "
              "| max ms |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = {**(s.get("operations") or {}), **(s.get("rpc_calls") or {})}
    for name, f in rows.items():
        la = f["latency_ms"]
        lines.append(
            f"| {name} | {f['count']:,} | {f['ok']:,} | {f['errors']:,} | "
            f"{100 * f['error_rate']:.2f} | {f['ok_per_s']:,.1f} | {la['p50']:,.1f} | "
            f"{la['p95']:,.1f} | {la['p99']:,.1f} | {la['max']:,.1f} |")
    lines += ["", "## Result codes", "", "| operation | code | count |", "| --- | --- | ---: |"]
    for name, f in rows.items():
        for code, n in f["codes"].items():
            lines.append(f"| {name} | {code} | {n:,} |")
    lines += ["", "## Errors by code", ""]
    by_code = errors.get("by_code") or {}
    if by_code:
        lines += ["| code | count | rate % |", "| --- | ---: | ---: |"]
        lines += [f"| {c} | {v['count']:,} | {100 * v['rate']:.3f} |"
                  for c, v in by_code.items()]
    else:
        lines.append("none")
    if cost.get("measured"):
        lines += ["", "## Server CPU", "", "| process group | CPU-s |", "| --- | ---: |"]
        lines += [f"| {g} | {v:,.2f} |" for g, v in cost["cpu_s_by_group"].items()]
        lines.append(f"| **total** | **{cost['cpu_s_total']:,.2f}** |")
        kinds = ", ".join(f"{k} {v:,.2f}" for k, v in cost["cpu_s_by_kind"].items())
        lines += ["", f"By kind (CPU-s): {kinds}. Measured over the window from the first "
                  "request sent to the last answer received."]
        if "cpu_ms_per_operation" in cost:
            lines += ["", f"Per successful operation of any kind: "
                      f"{cost['cpu_ms_per_operation']:,.3f} CPU-ms "
                      f"({cost['operations_ok']:,} operations)."]
    if pictures:
        lines += ["", "## Pictures", ""]
        lines += [f"![{p}]({p})" for p in pictures]
    notes = s.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def render_pngs(summary: Mapping[str, Any], records: Sequence[Record],
                out_dir: Path) -> list[str]:
    """Write ``latency_over_time.png`` (p50/p95/p99 per second of the headline operation,
    and the operations completed per second) and ``latency_cdf.png`` (one curve per
    operation); returns the file names. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    out_dir.mkdir(parents=True, exist_ok=True)
    headline = summary.get("headline_operation", "")
    title = f"txproc {summary.get('scenario', '')}"
    series = summary.get("latency_over_time") or []
    t0 = min((r.start_s for r in records), default=0.0)

    cores = summary.get("cpu_cores_over_time") or []
    panels = 3 if cores else 2
    fig, axes = plt.subplots(panels, 1, figsize=(10, 6.5 + 1.8 * (panels - 2)), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.3, 1.3][:panels]})
    top, bottom = axes[0], axes[1]
    xs = [row["t_s"] for row in series]
    for p, style in zip(PERCENTILES, ("-", "--", ":"), strict=True):
        top.plot(xs, [row[f"p{p}"] for row in series], style, marker=".", label=f"p{p}")
    top.set_ylabel("latency, ms")
    top.set_title(f"{title}: {headline} latency per second")
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left")
    top.set_ylim(bottom=0)
    per_second: dict[str, Counter[int]] = defaultdict(Counter)
    for r in records:
        if r.is_operation and r.ok:
            per_second[r.name][int(r.start_s - t0)] += r.count
    for name, counts in sorted(per_second.items()):
        secs = sorted(counts)
        bottom.plot(secs, [counts[s] for s in secs], marker=".", label=name)
    bottom.set_ylabel("ok per s")
    bottom.grid(True, alpha=0.3)
    if per_second:
        bottom.legend(loc="upper left", fontsize="small", ncol=4)
    if cores:
        axes[2].plot([c["t_s"] for c in cores], [c["cores"] for c in cores], marker=".",
                     color="black")
        axes[2].set_ylabel("server CPU, cores")
        axes[2].set_ylim(bottom=0)
        axes[2].grid(True, alpha=0.3)
    axes[-1].set_xlabel("seconds since the first request")
    fig.tight_layout()
    fig.savefig(out_dir / "latency_over_time.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 5.5))
    # Requests only: the transfers of an RPC call share its latency.
    names = sorted({r.name for r in records if r.is_request})
    for name in names:
        points = cdf_points(records, name)
        if points:
            ax.step([max(x, 0.01) for x, _ in points], [y for _, y in points], where="post",
                    label=name)
    for p in PERCENTILES:
        ax.axhline(p / 100, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_ylabel("share of requests at or below")
    ax.set_ylim(0, 1.01)
    ax.set_title(f"{title}: latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    if names:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=100)
    plt.close(fig)
    return ["latency_over_time.png", "latency_cdf.png"]
