"""Audit a hashed lock file with pip-audit and say plainly what was and was not audited.

pip-audit passes silently when PyPI's vulnerability data is not there: a pinned release
that PyPI's JSON API does not answer for is *skipped*, not failed, and the run exits 0
with "No known vulnerabilities found". A gate that passes because it looked at nothing
is worse than none, so this wrapper reads pip-audit's JSON report and decides:

* a known vulnerability in any pin: exit 1, naming the package, the advisory and the
  releases that fix it (bump the pin with ``deploy/requirements/compile
  --upgrade-package NAME``);
* the service cannot be reached, or answered for none of the pins: one line saying the
  dependencies were NOT audited, and exit 0, because CI must still run where the
  vulnerability service is blocked;
* some pins skipped: how many and which, and exit 0;
* anything else pip-audit fails on (a bad lock file, a hash it refuses): its exit code.

Usage: ``python deploy/requirements/audit.py deploy/requirements/test.txt``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# pip-audit stops on the first request that fails, so one timeout bounds a request and the
# whole run is bounded well below CI's budget.
REQUEST_TIMEOUT_S = 20
RUN_TIMEOUT_S = 600
UNREACHABLE = "pip-audit: vulnerability service unreachable, dependencies NOT audited"
# What pip-audit (and requests under it) print when the service cannot be reached at all.
CONNECTION_MARKERS = (
    "ConnectionError", "ConnectTimeout", "ReadTimeout", "NameResolutionError",
    "Max retries exceeded", "Could not connect", "your network may be blocking",
)


@dataclass(frozen=True)
class Verdict:
    exit_code: int
    lines: tuple[str, ...]


def judge(report_text: str, returncode: int, stderr: str) -> Verdict:
    """Decide from pip-audit's JSON report (empty when it stopped early), its exit code and
    its standard error."""
    try:
        report: dict[str, Any] = json.loads(report_text)
    except ValueError:
        report = {}
    dependencies: list[dict[str, Any]] = report.get("dependencies", [])
    if not dependencies:
        tail = stderr.strip().splitlines()[-1:] or [f"pip-audit exited {returncode}"]
        if any(marker in stderr for marker in CONNECTION_MARKERS):
            return Verdict(0, (UNREACHABLE, f"  ({tail[0][:300]})"))
        return Verdict(returncode or 1, ("pip-audit failed:", stderr.strip()[-3000:]))
    vulnerable = [d for d in dependencies if d.get("vulns")]
    if vulnerable:
        lines = [f"pip-audit: known vulnerabilities in {len(vulnerable)} locked package(s):"]
        for dep in vulnerable:
            for vuln in dep["vulns"]:
                fixed = ", ".join(vuln.get("fix_versions") or []) or "no fixed release yet"
                lines.append(f"  {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed})")
        return Verdict(1, tuple(lines))
    if returncode != 0:
        return Verdict(returncode, ("pip-audit failed:", stderr.strip()[-3000:]))
    skipped = [d for d in dependencies if d.get("skip_reason")]
    audited = len(dependencies) - len(skipped)
    if audited == 0:
        return Verdict(0, (UNREACHABLE, f"  (every pin skipped, e.g. {skipped[0]['skip_reason']})"))
    lines = [f"pip-audit: {audited} locked dependencies audited, no known vulnerabilities"]
    if skipped:
        names = ", ".join(d["name"] for d in skipped)
        lines.append(f"pip-audit: {len(skipped)} dependencies NOT audited: {names}")
    return Verdict(0, tuple(lines))


def audit(lock: Path) -> Verdict:
    """Run pip-audit over ``lock`` (hashed pins, no resolution) against PyPI's data."""
    with tempfile.TemporaryDirectory(prefix="txproc-audit-") as scratch:
        report = Path(scratch) / "report.json"
        command = [
            sys.executable, "-m", "pip_audit", "--requirement", str(lock), "--require-hashes",
            "--disable-pip", "--vulnerability-service", "pypi", "--format", "json",
            "--output", str(report), "--progress-spinner", "off",
            "--timeout", str(REQUEST_TIMEOUT_S),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True,  # noqa: S603 - our own argv
                                  timeout=RUN_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return Verdict(0, (UNREACHABLE, f"  (no answer within {RUN_TIMEOUT_S} s)"))
        text = report.read_text() if report.exists() else ""
        return judge(text, done.returncode, done.stderr)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: audit.py LOCK_FILE", file=sys.stderr)
        return 2
    verdict = audit(Path(argv[0]))
    print("\n".join(verdict.lines), flush=True)
    return verdict.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
