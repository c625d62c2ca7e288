"""The monitoring files in deploy/ agree with the code, the runbooks and each other.

Parses deploy/prometheus (scrape config, targets, recording and alert rules) and the
Grafana provisioning and dashboard with yaml/json, and checks what promtool cannot: every
metric name exists, every alert has its runbook, the queue limit matches the config. It
also runs promtool's ``check config``, ``check rules`` and ``test rules``, with the promtool
on PATH or else the one in Debian's ``prometheus`` package, fetched once per machine.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from processor.config import FrontConfig

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
RUNBOOKS = ROOT / "docs" / "runbooks"
METRICS_SOURCE = ROOT / "actors" / "ops" / "metrics.py"
METRICS_SERVER_SOURCE = ROOT / "actors" / "ops" / "metrics_server.py"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"

# -- Scrape-time gauges ------------------------------------------------------------------------
# Not defined in actors/ops/metrics.py: the node's metrics server (actors/ops/metrics_server.py)
# computes them on each scrape, from the database and from the node's processes. Names as
# exposed (the counter txproc_transfers_committed is exposed with its _total).
SCRAPE_TIME_METRICS = frozenset({
    "txproc_outbox_undelivered",
    "txproc_outbox_oldest_undelivered_age_seconds",
    "txproc_dead_letters",
    "txproc_payment_steps_open",
    "txproc_payment_steps_unknown",
    "txproc_payment_steps_stale",
    "txproc_cost_cpu_seconds_per_transfer",
    "txproc_cost_per_transfer",
    "txproc_server_cpu_seconds_total",
    "txproc_transfers_committed_total",
})

# The alerts the issue asks for; more may exist.
REQUIRED_ALERTS = frozenset({
    "AuthorizationLatencyP99High",
    "LedgerWriteFailure",
    "PaymentsOutcomeUnknownBacklog",
    "RecoveryLagging",
    "DeadLetterGrowth",
    "ProviderBreakerOpen",
    "ShardQueueSaturation",
    "CostPerTransferAboveBudget",
})

# A txproc metric (txproc_...) or a recorded series (txproc:...:...).
NAME_RE = re.compile(r"\btxproc[_:][a-z0-9_:]*")
HISTOGRAM_SUFFIX_RE = re.compile(r"_(bucket|sum|count)$")
RECORD_NAME_RE = re.compile(r"^txproc:[a-z0-9_]+:[a-z0-9_]+$")
DURATION_RE = re.compile(r"^[0-9]+[smhdwy]$")
DATASOURCE_UID = "txproc-prometheus"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in _yaml(path)["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules(PROMETHEUS / "alerts.yml") if "alert" in rule]


def _records() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in _rules(PROMETHEUS / "recording.yml")}


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "txproc.json").read_text(encoding="utf-8"))


def _dashboard_exprs() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"])
            for panel in _panels(_dashboard()) for target in panel.get("targets", [])]


def _all_exprs() -> list[tuple[str, str]]:
    exprs = [(f"alert {a['alert']}", a["expr"]) for a in _alerts()]
    exprs += [(f"record {name}", expr) for name, expr in _records().items()]
    return exprs + [(f"panel {title}", expr) for title, expr in _dashboard_exprs()]


def defined_metrics(source: str) -> set[str]:
    """Names exposed for the metrics declared in ``source`` (actors/ops/metrics.py's text)."""
    names: set[str] = set()
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(txproc_[a-z0-9_]+)\"",
                                 source):
        if kind == "Counter" and not name.endswith("_total"):
            name += "_total"  # prometheus-client exposes counters with _total
        names.add(name)
    return names


def known_metrics() -> set[str]:
    return defined_metrics(METRICS_SOURCE.read_text(encoding="utf-8")) | SCRAPE_TIME_METRICS


def unknown_names(expr: str, metrics: set[str], records: set[str]) -> list[str]:
    """Names in ``expr`` that are neither a known metric nor a recorded series."""
    unknown = []
    for name in NAME_RE.findall(expr):
        if ":" in name:
            if name not in records:
                unknown.append(name)
        elif name not in metrics and HISTOGRAM_SUFFIX_RE.sub("", name) not in metrics:
            unknown.append(name)
    return unknown


def brackets_balance(expr: str) -> bool:
    """True if (), [] and {} nest properly outside string literals and comments."""
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    quote = ""
    escaped = False
    comment = False
    for char in expr:
        if comment:
            comment = char != "\n"
        elif quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char == "#":
            comment = True
        elif char in "([{":
            stack.append(char)
        elif char in closing:
            if not stack or stack.pop() != closing[char]:
                return False
    return not stack and not quote


# -- the checks can fail ---------------------------------------------------------------------


def test_the_checks_themselves_catch_bad_input() -> None:
    """The name, histogram-suffix and bracket checks reject what they must, so a pass means
    something."""
    metrics = {"txproc_a_seconds", "txproc_b_total"}
    assert unknown_names("rate(txproc_a_seconds_bucket[5m])", metrics, set()) == []
    assert unknown_names("txproc_b_total + txproc_c_total", metrics, set()) == [
        "txproc_c_total"]
    assert unknown_names("txproc:x:y > 1", metrics, {"txproc:x:y"}) == []
    assert unknown_names("txproc:x:z > 1", metrics, {"txproc:x:y"}) == ["txproc:x:z"]
    assert unknown_names('up{job="txproc"}', metrics, set()) == []
    assert brackets_balance('sum by (le) (rate(m{a=~"(x"}[5m]))')
    assert not brackets_balance("sum(rate(m[5m])")
    assert not brackets_balance("sum(rate(m[5m)))")
    assert not brackets_balance('m{a="x}')
    assert defined_metrics('C = Counter(\n    "txproc_things",\n    "help", [])') == {
        "txproc_things_total"}


def test_metrics_source_defines_the_histograms_the_rules_need() -> None:
    """Parsing actors/ops/metrics.py finds its metrics (so an empty parse cannot pass vacuously)."""
    metrics = defined_metrics(METRICS_SOURCE.read_text(encoding="utf-8"))
    assert {"txproc_authorization_duration_seconds", "txproc_ledger_write_failures_total",
            "txproc_provider_breaker_state", "txproc_shard_queue_items",
            "txproc_transfers_total"} <= metrics
    assert len(metrics) >= 14


def test_scrape_time_metrics_are_those_the_metrics_server_exposes() -> None:
    """The scrape-time list above names what actors/ops/metrics_server.py really yields."""
    if not METRICS_SERVER_SOURCE.exists():
        pytest.skip("actors/ops/metrics_server.py is not in this tree")
    source = METRICS_SERVER_SOURCE.read_text(encoding="utf-8")
    for name in SCRAPE_TIME_METRICS:
        base = name.removesuffix("_total")
        assert f'"{name}"' in source or f'"{base}"' in source, name


# -- prometheus.yml and targets --------------------------------------------------------------


def test_scrape_config_has_the_txproc_job_with_file_discovery() -> None:
    """The txproc job discovers its targets from targets/*.json and the rule files exist."""
    config = _yaml(PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["txproc"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    files = [f for sd in job["file_sd_configs"] for f in sd["files"]]
    assert "targets/*.json" in files
    assert {"alerts.yml", "recording.yml"} <= set(config["rule_files"])
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file(), rule_file
    for key in ("scrape_interval", "evaluation_interval"):
        assert DURATION_RE.match(config["global"][key]), key


def test_local_target_is_the_default_metrics_port_on_loopback() -> None:
    """targets/local.json is a file_sd list naming 127.0.0.1:9464, txproc serve's default."""
    groups = json.loads((PROMETHEUS / "targets" / "local.json").read_text(encoding="utf-8"))
    assert isinstance(groups, list) and groups
    targets = [t for group in groups for t in group["targets"]]
    assert targets == ["127.0.0.1:9464"]
    for group in groups:
        assert all(isinstance(v, str) for v in group.get("labels", {}).values())


# -- rules -----------------------------------------------------------------------------------


def test_every_alert_is_complete_and_links_an_existing_runbook() -> None:
    """Each alert has for, severity page|ticket, summary, description and a runbook_url to a
    file under docs/runbooks/ that names the alert and says who acts in the first hour."""
    alerts = _alerts()
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "alert names repeat"
    assert REQUIRED_ALERTS <= set(names), REQUIRED_ALERTS - set(names)
    for alert in alerts:
        name = alert["alert"]
        assert DURATION_RE.match(str(alert.get("for", ""))), f"{name}: for"
        assert alert["labels"]["severity"] in ("page", "ticket"), name
        annotations = alert["annotations"]
        for key in ("summary", "description", "runbook_url"):
            assert str(annotations.get(key, "")).strip(), f"{name}: {key}"
        url = annotations["runbook_url"]
        assert url.startswith("docs/runbooks/") and url.endswith(".md"), url
        runbook = ROOT / url
        assert runbook.is_file(), f"{name}: {url} missing"
        text = runbook.read_text(encoding="utf-8")
        assert name in text, f"{url} does not name {name}"
        assert "Who acts in the first hour" in text, url


def test_runbook_index_maps_every_alert_to_its_runbook() -> None:
    """docs/runbooks/README.md has a row per alert pointing at the alert's runbook_url."""
    index = (RUNBOOKS / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in index.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        link = re.search(r"\]\(([^)]+\.md)\)", cells[-1]) if len(cells) >= 2 else None
        if link:
            rows[cells[0]] = link.group(1)
    for alert in _alerts():
        url = alert["annotations"]["runbook_url"]
        assert rows.get(alert["alert"]) == Path(url).name, alert["alert"]


def test_recorded_names_follow_the_convention_and_are_defined_once() -> None:
    """Recording rules are named txproc:<what>:<how> and none is recorded twice."""
    names = [rule["record"] for rule in _rules(PROMETHEUS / "recording.yml")]
    assert len(names) == len(set(names))
    for name in names:
        assert RECORD_NAME_RE.match(name), name


def test_every_metric_name_in_rules_and_panels_exists() -> None:
    """Every txproc name in an alert, a recording rule or a panel is a metric of
    actors/ops/metrics.py, a scrape-time gauge, or a series recorded in recording.yml."""
    metrics = known_metrics()
    records = set(_records())
    problems = [(where, unknown_names(expr, metrics, records)) for where, expr in _all_exprs()]
    assert [p for p in problems if p[1]] == []


def test_promql_brackets_balance() -> None:
    """Parentheses, brackets and braces balance in every expression."""
    exprs = _all_exprs()
    assert len(exprs) > 30
    assert [where for where, expr in exprs if not brackets_balance(expr)] == []


def test_shard_queue_limit_in_the_rules_matches_the_config() -> None:
    """The saturation rule divides by FrontConfig.queue_items_max, whatever it is now."""
    expr = _records()["txproc:shard_queue:saturation"]
    divisors = [int(n) for n in re.findall(r"/\s*([0-9]+)\b", expr)]
    assert divisors == [FrontConfig().queue_items_max]


def test_objective_and_budget_are_the_documented_constants() -> None:
    """The alerts compare against the recorded objective and budget, whose values the
    runbooks and the Grafana README state."""
    records = _records()
    objective = records["txproc:authorization_duration_seconds:p99_objective"]
    budget = records["txproc:cost_cpu_seconds_per_transfer:budget"]
    assert objective == "vector(1)"
    assert budget == "vector(0.1)"
    alerts = {a["alert"]: a["expr"] for a in _alerts()}
    assert "txproc:authorization_duration_seconds:p99_objective" in alerts[
        "AuthorizationLatencyP99High"]
    assert "txproc:cost_cpu_seconds_per_transfer:budget" in alerts[
        "CostPerTransferAboveBudget"]
    readme = (GRAFANA / "README.md").read_text(encoding="utf-8")
    assert "**1 s**" in readme and "**0.1 CPU-seconds per committed" in readme
    assert "p99 < 1 s" in (RUNBOOKS / "authorization-latency.md").read_text(encoding="utf-8")
    assert "**0.1 CPU-seconds" in (RUNBOOKS / "cost-per-transfer.md").read_text(
        encoding="utf-8")


# -- Grafana ---------------------------------------------------------------------------------


def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource() -> None:
    """Unique panel ids, a query on every panel, all on the provisioned datasource uid."""
    dashboard = _dashboard()
    assert dashboard["uid"] and 36 <= dashboard["schemaVersion"] <= 41
    datasources = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    assert [d["uid"] for d in datasources["datasources"]] == [DATASOURCE_UID]
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", {}).get("uid", DATASOURCE_UID) == DATASOURCE_UID
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_shows_every_metric() -> None:
    """Every metric (actors/ops/metrics.py and scrape-time) appears on some panel, directly or
    through a recorded series."""
    records = _records()
    seen: set[str] = set()
    pending = [expr for _, expr in _dashboard_exprs()]
    while pending:
        for name in NAME_RE.findall(pending.pop()):
            if ":" in name:
                if name not in seen and name in records:
                    pending.append(records[name])
                seen.add(name)
            else:
                seen.add(HISTOGRAM_SUFFIX_RE.sub("", name))
    assert known_metrics() - seen == set()


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards() -> None:
    """The provisioned dashboard path is the one deploy/docker-compose.yml mounts, and both
    services listen on loopback only."""
    providers = _yaml(GRAFANA / "provisioning" / "dashboards" / "txproc.yml")["providers"]
    path = providers[0]["options"]["path"]
    compose = _yaml(COMPOSE)["services"]
    mounts = [v.split(":") for v in compose["grafana"]["volumes"]]
    assert ["./grafana/dashboards", path, "ro"] in mounts
    assert ["./prometheus", "/etc/prometheus", "ro"] in [
        v.split(":") for v in compose["prometheus"]["volumes"]]
    assert "--web.listen-address=127.0.0.1:9090" in compose["prometheus"]["command"]
    assert compose["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"


# -- promtool ---------------------------------------------------------------------------------
#
# promtool is a Go binary, on no Python registry. Debian's ``prometheus`` package ships it,
# statically linked but for libc, so when it is not on PATH the session downloads that
# package (``apt-get download`` needs no root) and unpacks only the binary with
# ``dpkg-deb -x``, into a per-user cache, once per machine. Only when that is impossible
# (no apt or dpkg, no package list, no network) does the test skip, saying why.

PROMTOOL_CACHE = Path.home() / ".cache" / "txproc" / "promtool"
PROMTOOL_DEB = "prometheus"
PROMTOOL_DOWNLOAD_TIMEOUT_S = 300


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                          timeout=PROMTOOL_DOWNLOAD_TIMEOUT_S, check=False)


def _promtool_from_debian(scratch: Path) -> Path:
    """promtool unpacked from Debian's package into PROMTOOL_CACHE; skips the test, saying
    why, when it cannot be had."""
    cached = PROMTOOL_CACHE / "usr" / "bin" / "promtool"
    if cached.is_file():
        return cached
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"promtool is not on PATH and {tool} is missing to fetch Debian's")
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        fetched = _run(["apt-get", "download", PROMTOOL_DEB], scratch)
    except subprocess.TimeoutExpired:
        pytest.skip(f"apt-get download {PROMTOOL_DEB} took over {PROMTOOL_DOWNLOAD_TIMEOUT_S} s")
    debs = sorted(scratch.glob(f"{PROMTOOL_DEB}_*.deb"))
    if fetched.returncode != 0 or not debs:
        pytest.skip(f"promtool is not on PATH and apt-get download {PROMTOOL_DEB} failed: "
                    + (fetched.stderr or fetched.stdout).strip()[-500:])
    unpacked = scratch / "root"
    done = _run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], scratch)
    if done.returncode != 0:
        pytest.skip(f"dpkg-deb -x {debs[-1].name} failed: {done.stderr.strip()[-500:]}")
    # Only the one binary is kept; a rename makes a half-written cache impossible, and a
    # concurrent session that got there first wins harmlessly.
    staged = scratch / "cache"
    (staged / "usr" / "bin").mkdir(parents=True)
    shutil.copy2(unpacked / "usr" / "bin" / "promtool", staged / "usr" / "bin" / "promtool")
    PROMTOOL_CACHE.parent.mkdir(parents=True, exist_ok=True)
    try:
        staged.rename(PROMTOOL_CACHE)
    except OSError:
        if not cached.is_file():
            raise
    return cached


@pytest.fixture(scope="session")
def promtool(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A working promtool: the one on PATH, else Debian's, fetched once (see above)."""
    on_path = shutil.which("promtool")
    found = Path(on_path) if on_path else _promtool_from_debian(tmp_path_factory.mktemp("p"))
    version = subprocess.run([str(found), "--version"], capture_output=True, text=True,
                             timeout=60, check=False)
    assert version.returncode == 0, f"{found} does not run: {version.stderr}"
    return str(found)


@pytest.mark.parametrize("args", [
    ["check", "config", "prometheus.yml"],
    ["check", "rules", "recording.yml", "alerts.yml"],
    ["test", "rules", "tests/alerts_test.yml"],
], ids=["check-config", "check-rules", "test-rules"])
def test_promtool(promtool: str, args: list[str]) -> None:
    """promtool accepts the config and rules, and the alert unit tests pass."""
    done = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
