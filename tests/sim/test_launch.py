"""Starting the simulators: secrets files, the launcher and the command line."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.sim.core import PROVIDER_SECRET_FIELDS, SecretsError
from adapters.sim.launch import SimProcess, start_sim, write_secrets


@pytest.mark.parametrize("name", ["acme", "globex"])
def test_write_secrets_creates_a_private_file_once(tmp_path: Path, name: str) -> None:
    """Fresh secrets are written readable by the owner only, and never overwritten."""
    path = tmp_path / "nested" / f"{name}.json"
    write_secrets(path, name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = json.loads(path.read_text())
    assert first["provider"] == name
    assert set(PROVIDER_SECRET_FIELDS[name]) <= set(first)
    write_secrets(path, name)
    assert json.loads(path.read_text()) == first
    other = tmp_path / f"other-{name}.json"
    write_secrets(other, name)
    assert json.loads(other.read_text())["admin_token"] != first["admin_token"]


def test_write_secrets_refuses_another_providers_file(tmp_path: Path) -> None:
    """A secrets file of the other provider is not silently reused."""
    path = tmp_path / "secrets.json"
    write_secrets(path, "acme")
    with pytest.raises(SecretsError):
        write_secrets(path, "globex")
    with pytest.raises(ValueError, match="unknown provider"):
        write_secrets(tmp_path / "x.json", "initech")


def test_secrets_never_reach_the_command_line(acme_sim: SimProcess,
                                              globex_sim: SimProcess) -> None:
    """The child's argv names the secrets file, never a secret in it."""
    for sim in (acme_sim, globex_sim):
        argv = str(sim.process.args)
        secrets = json.loads(sim.secrets_file.read_text())
        assert str(sim.secrets_file) in argv
        for field in PROVIDER_SECRET_FIELDS[sim.name]:
            assert secrets[field] not in argv
        assert sim.url == f"http://127.0.0.1:{sim.port}" and sim.running()


def test_start_sim_reports_a_child_that_cannot_start(tmp_path: Path) -> None:
    """An unknown provider name is refused before anything starts."""
    with pytest.raises(ValueError, match="unknown provider"):
        start_sim("initech", secrets_file=tmp_path / "s.json")


def test_command_line_prints_one_line_and_exits_cleanly(tmp_path: Path) -> None:
    """``python -m adapters.sim.globex --port 0`` says where it listens, once, and a SIGTERM
    ends it with status 0 and nothing more on stdout."""
    secrets = tmp_path / "globex.json"
    write_secrets(secrets, "globex")
    child = subprocess.Popen([sys.executable, "-m", "adapters.sim.globex", "--port", "0",
                              "--secrets-file", str(secrets)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().decode()
        assert line.startswith("listening on http://127.0.0.1:")
        child.terminate()
        out, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0 and out == b""
    for value in json.loads(secrets.read_text()).values():
        if value != "globex":
            assert value.encode() not in err


def test_a_sim_stops_when_its_launcher_dies(tmp_path: Path) -> None:
    """A launcher that ends without stopping its sim (a crash, a killed test run) does not
    leave the sim running: the sim sees its stdin pipe close and stops."""
    script = ("import os, pathlib\n"
              "from adapters.sim.launch import start_sim\n"
              f"sim = start_sim('acme', secrets_file=pathlib.Path({str(tmp_path / 'a.json')!r}))\n"
              "print(sim.pid, flush=True)\n"
              "os._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, timeout=30, check=True)
    pid = int(done.stdout.split()[-1])
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid), "the orphaned sim is still running"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) counts as gone.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())
