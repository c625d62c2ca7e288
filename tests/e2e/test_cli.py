"""The txproc command as an operator runs it: token issue, migrate, serve and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import jwt
import psutil
import pytest

from actors.database import create_database, drop_database
from actors.migrate import load_migrations
from processor.identity import (
    KEY_FILE_NAME,
    KEYS_FILE_NAME,
    load_or_create_key,
    load_or_create_ring,
    verify_token,
)
from tests.ports import free_port_pair

TXPROC = [sys.executable, "-m", "actors.app.cli"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TXPROC, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, check=False)




def test_token_issue_signs_with_the_data_dir_key(tmp_path: Path) -> None:
    """A token printed by `txproc token issue` verifies with that data directory's key."""
    done = _run("token", "issue", "--scopes", "transfers:write,accounts:read",
                "--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    key = load_or_create_key(tmp_path / KEY_FILE_NAME)
    claims = verify_token(key, done.stdout.strip(), now_s=int(time.time()))
    assert claims.scopes == {"transfers:write", "accounts:read"}
    assert (tmp_path / KEY_FILE_NAME).stat().st_mode & 0o077 == 0
    assert (claims.tenant, claims.subject) == ("default", "local")
    bad = _run("token", "issue", "--scopes", "everything", "--data-dir", str(tmp_path))
    assert bad.returncode == 2 and "everything" in bad.stderr


def test_token_issue_names_tenant_and_subject_and_refuses_what_it_should(
        tmp_path: Path) -> None:
    """--tenant and --subject reach the token; a ttl over the 24 h cap and a data
    directory that does not exist are refused with a non-zero exit (no new key made)."""
    done = _run("token", "issue", "--scopes", "accounts:read", "--tenant", "acme",
                "--subject", "ops-1", "--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    key = load_or_create_key(tmp_path / KEY_FILE_NAME)
    claims = verify_token(key, done.stdout.strip(), now_s=int(time.time()))
    assert (claims.tenant, claims.subject) == ("acme", "ops-1")
    long = _run("token", "issue", "--scopes", "accounts:read", "--ttl-s", str(24 * 3600 + 1),
                "--data-dir", str(tmp_path))
    assert long.returncode == 2 and "ttl_s" in long.stderr
    missing = tmp_path / "nowhere"
    gone = _run("token", "issue", "--scopes", "accounts:read", "--data-dir", str(missing))
    assert gone.returncode == 2 and "does not exist" in gone.stderr
    assert not missing.exists()


async def test_migrate_applies_once(pg_admin_url: str) -> None:
    """`txproc migrate` applies the migrations, and a second run has nothing to do."""
    name = f"txproc_cli_{uuid.uuid4().hex[:12]}"
    url = await create_database(pg_admin_url, name)
    try:
        first = _run("migrate", "--database-url", url)
        assert first.returncode == 0, first.stderr
        versions = [m.version for m in load_migrations()]
        # In order and each once; numbers are reserved per branch, so a branch may carry
        # a gap until the others merge (0021 before 0019 and 0020).
        assert versions == sorted(set(versions)) and versions[0] == 1
        assert f"applied: {versions}" in first.stdout
        second = _run("migrate", "--database-url", url)
        assert "nothing" in second.stdout
    finally:
        await drop_database(pg_admin_url, name)




def test_serve_on_embedded_defaults_then_sigterm(tmp_path: Path) -> None:
    """`txproc serve` with no database starts everything, serves (here with two fronts on
    consecutive ports, both listed in fronts.json and serving one ledger), and stops it all
    on SIGTERM."""
    http_port = free_port_pair()
    rpc_port = next(p for p in iter(free_port_pair, None) if abs(p - http_port) > 1)
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TXPROC_DATABASE_URL")}
    proc = subprocess.Popen(
        [*TXPROC, "serve", "--data-dir", str(data_dir), "--http-port", str(http_port),
         "--rpc-port", str(rpc_port), "--shards", "1", "--fronts", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    ready = True
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        if not ready:
            proc.kill()
            output, _ = proc.communicate(timeout=30)
            raise AssertionError(f"never ready; serve said:\n{output[-4000:]}")
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        token = _run("token", "issue", "--scopes", "accounts:write,accounts:read",
                     "--data-dir", str(data_dir)).stdout.strip()
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{base}/v1/accounts", json={"id": 42, "currency": "EUR"}, headers=auth,
                       timeout=10)
        assert r.status_code == 201, r.text
        fronts = json.loads((data_dir / "fronts.json").read_text())
        assert [(f["http"], f["rpc"]) for f in fronts] == [
            (f"http://127.0.0.1:{http_port + i}", f"127.0.0.1:{rpc_port + i}") for i in (0, 1)]
        second = fronts[1]["http"]
        for _ in range(240):  # the second front becomes ready on its own pace
            if httpx.get(f"{second}/readyz", timeout=2).status_code == 200:
                break
            time.sleep(0.25)
        found = httpx.get(f"{second}/v1/accounts/42", headers=auth, timeout=10)
        assert found.status_code == 200 and found.json()["id"] == 42, found.text
        postmasters = [p for p in psutil.process_iter(["cmdline"])
                       if str(data_dir) in " ".join(p.info["cmdline"] or [])
                       and p.pid != proc.pid]
        assert postmasters, "the embedded database runs under the data directory"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, output
        assert f"{http_port}" in output and "stopped" in output
        assert "front 1 on node" in output, output[-4000:]
        _gone, alive = psutil.wait_procs(postmasters, timeout=10)
        assert not alive, "the embedded database was left running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def test_keys_rotate_list_retire(tmp_path: Path) -> None:
    """`txproc keys rotate` prints the new active kid and tokens issued next carry it;
    `keys list` shows ids and states, never a secret; `keys retire` refuses the active key
    and an unknown id, retires an old one, and every keys command refuses a data directory
    that does not exist."""
    first = _run("token", "issue", "--scopes", "accounts:read", "--data-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    old_kid = jwt.get_unverified_header(first.stdout.strip())["kid"]
    rotated = _run("keys", "rotate", "--data-dir", str(tmp_path))
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.strip()
    assert new_kid != old_kid
    second = _run("token", "issue", "--scopes", "accounts:read", "--data-dir", str(tmp_path))
    assert jwt.get_unverified_header(second.stdout.strip())["kid"] == new_kid
    listing = _run("keys", "list", "--data-dir", str(tmp_path)).stdout
    assert f"{old_kid} verify_only" in listing and f"{new_kid} active" in listing
    ring = load_or_create_ring(tmp_path, now_s=int(time.time()))
    assert all(key.secret.hex() not in listing for key in ring.keys)
    for kid, says in ((new_kid, "is active"), ("0" * 16, "no key")):
        refused = _run("keys", "retire", kid, "--data-dir", str(tmp_path))
        assert refused.returncode == 2 and says in refused.stderr
    assert _run("keys", "retire", old_kid, "--data-dir", str(tmp_path)).returncode == 0
    assert f"{old_kid} retired" in _run("keys", "list", "--data-dir", str(tmp_path)).stdout
    missing = tmp_path / "nowhere"
    for command in (["rotate"], ["list"], ["retire", old_kid]):
        gone = _run("keys", *command, "--data-dir", str(missing))
        assert gone.returncode == 2 and "does not exist" in gone.stderr
    assert not missing.exists()


def test_exposed_key_files_are_refused_by_name(tmp_path: Path) -> None:
    """A key ring readable by others stops `token issue`, and a symbolically linked one stops
    `serve` before anything starts; each says which file and what to change."""
    assert _run("keys", "list", "--data-dir", str(tmp_path)).returncode == 0
    ring_file = tmp_path / KEYS_FILE_NAME
    ring_file.chmod(0o644)
    issue = _run("token", "issue", "--scopes", "accounts:read", "--data-dir", str(tmp_path))
    assert issue.returncode == 2
    assert f"{ring_file} must not be readable by group or others" in issue.stderr
    ring_file.chmod(0o600)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / KEYS_FILE_NAME).symlink_to(ring_file)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TXPROC_DATABASE_URL")}
    serve = subprocess.run([*TXPROC, "serve", "--data-dir", str(linked), "--http-port", "0",
                            "--rpc-port", "0", "--shards", "1"], capture_output=True,
                           text=True, timeout=120, env=env, check=False)
    assert serve.returncode == 2, serve.stderr[-2000:]
    assert f"{linked / KEYS_FILE_NAME} is a symbolic link" in serve.stderr
    assert not (linked / "pg").exists(), "nothing was started"


def test_token_revoke_names_one_token_or_one_principal(tmp_path: Path) -> None:
    """`txproc token revoke` needs --jti, or --tenant with --subject, and not both."""
    for args in ([], ["--tenant", "acme"], ["--subject", "gw-1"],
                 ["--jti", "j", "--tenant", "acme", "--subject", "gw-1"]):
        done = _run("token", "revoke", *args, "--data-dir", str(tmp_path))
        assert done.returncode == 2 and "name one token" in done.stderr, args


@pytest.mark.timeout(450)
def test_demo_ends_with_a_reconciliation_and_verify_ok(tmp_path: Path) -> None:
    """`txproc demo` on embedded defaults (a small workload) exits 0, and ends with a
    reconciliation table of both simulated providers' reports of the day, each run
    succeeded with every line matched, and a verify summary of every check that is ok."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "TXPROC_DATABASE_URL")}
    done = subprocess.run(
        [*TXPROC, "demo", "--data-dir", str(tmp_path / "data"), "--accounts", "20",
         "--transfers", "500", "--batch", "100"],
        capture_output=True, text=True, timeout=400, env={**env, "COLUMNS": "140"},
        check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert "settlement reconciliation" in out
    rows = [line for line in out.splitlines()
            if line.startswith("│ acme ") or line.startswith("│ globex ")]
    runs = {cells[0]: cells for cells in
            ([c.strip() for c in row.strip("│").split("│")] for row in rows) if len(cells) == 7}
    assert set(runs) == {"acme", "globex"}, out
    for provider, (_, _date, status, lines, matched, exceptions, _fees) in runs.items():
        assert status == "succeeded", (provider, out)
        assert int(lines) > 0 and matched == lines and exceptions == "none open", out
    summary = out[out.index("verify: "):]
    assert summary.startswith("verify: ok: "), summary
    for counted in ("transfers", "links", "anchors", "audit events", "reconciliation records"):
        assert counted in " ".join(summary.split()), summary
