"""The code standards are checked by the suite, so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_is_clean() -> None:
    """ruff finds nothing anywhere in the repository."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_is_clean_on_the_service() -> None:
    """mypy --strict (configured in pyproject.toml) passes on processor/, adapters/ and
    actors/, and none of them is left out of the configuration."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert {"processor", "adapters", "actors"} <= set(config["files"])
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_security_rules_are_on_and_the_service_is_not_exempt() -> None:
    """The security issue's gates: bandit's S, ASYNC and BLE are selected, and no
    per-file exemption covers the service's packages wholesale (only the SQL-building
    stores are exempt from S608, whose values are all parameters)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert {"S", "ASYNC", "BLE"} <= set(config["select"])
    exempt = config.get("per-file-ignores", {})
    for pattern, codes in exempt.items():
        if pattern.startswith(("processor", "actors")):
            assert codes == ["S608"] and pattern.endswith(".py"), (pattern, codes)
