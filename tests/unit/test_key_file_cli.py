"""`--key-file`: one key ring named by path, shared by every node of a cluster, on
`serve`, `token issue` and `keys rotate|retire|list` (docs/operations.md, "Running a
cluster"). The ring's own checks (private, regular, owned) are tested with the ring."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.app.cli import main
from processor.identity import KEYS_FILE_NAME, load_ring, verify_token
from processor.privacy import MASTER_KEY_FILE_NAME


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_rotate_makes_the_ring_then_issue_and_list_use_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ring_file = tmp_path / "secret" / KEYS_FILE_NAME
    ring_file.parent.mkdir(mode=0o700)
    elsewhere = tmp_path / "data"  # a data directory with no ring of its own
    elsewhere.mkdir()
    code, kid, _ = _cli(capsys, "keys", "rotate", "--key-file", str(ring_file),
                        "--data-dir", str(elsewhere))
    assert code == 0 and ring_file.exists()
    # The erasure master key beside it: the servers only read it from a shared directory.
    master = ring_file.parent / MASTER_KEY_FILE_NAME
    assert master.exists() and master.stat().st_mode & 0o077 == 0
    ring = load_ring(ring_file.parent)
    assert ring.active.kid == kid.strip()
    code, token, err = _cli(capsys, "token", "issue", "--key-file", str(ring_file),
                            "--data-dir", str(elsewhere), "--scopes", "accounts:read",
                            "--tenant", "acme", "--subject", "gw-1")
    assert code == 0, err
    claims = verify_token(ring.verifying(), token.strip(), now_s=int(os.path.getmtime(ring_file)))
    assert claims.tenant == "acme"
    assert not (elsewhere / KEYS_FILE_NAME).exists(), "the data directory's ring is not used"
    code, listed, _ = _cli(capsys, "keys", "list", "--key-file", str(ring_file))
    assert code == 0 and kid.strip() in listed


def test_issue_never_makes_the_shared_ring(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / KEYS_FILE_NAME
    code, out, err = _cli(capsys, "token", "issue", "--key-file", str(missing),
                          "--scopes", "accounts:read")
    assert code == 2 and out == ""
    assert f"the key file {missing} does not exist" in err
    assert not missing.exists()


def test_a_key_file_not_named_as_a_ring_is_refused(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "keys.json"
    for argv in (("token", "issue", "--scopes", "accounts:read"), ("keys", "list"),
                 ("keys", "rotate")):
        code, _, err = _cli(capsys, *argv, "--key-file", str(other))
        assert code == 2, argv
        assert f"a key ring's file is named {KEYS_FILE_NAME}" in err, argv
    assert not other.exists()


def test_serve_refuses_a_shared_ring_without_its_erasure_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ring_file = tmp_path / "keys" / KEYS_FILE_NAME
    ring_file.parent.mkdir(mode=0o700)
    assert _cli(capsys, "keys", "rotate", "--key-file", str(ring_file))[0] == 0
    (ring_file.parent / MASTER_KEY_FILE_NAME).unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TXPROC_DATABASE_URL")}
    serve = subprocess.run(
        [sys.executable, "-m", "actors.app.cli", "serve", "--data-dir", str(tmp_path / "data"),
         "--key-file", str(ring_file), "--http-port", "0", "--rpc-port", "0", "--shards", "1"],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert serve.returncode == 2, serve.stderr[-2000:]
    assert f"the key file {ring_file.parent / MASTER_KEY_FILE_NAME} does not exist" in serve.stderr
    assert not (tmp_path / "data" / "pg").exists(), "nothing was started"


def test_serve_refuses_a_missing_key_file_before_starting_anything(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TXPROC_DATABASE_URL")}
    missing = tmp_path / "keys" / KEYS_FILE_NAME
    serve = subprocess.run(
        [sys.executable, "-m", "actors.app.cli", "serve", "--data-dir", str(tmp_path / "data"),
         "--key-file", str(missing), "--http-port", "0", "--rpc-port", "0", "--shards", "1"],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert serve.returncode == 2, serve.stderr[-2000:]
    assert f"the key file {missing} does not exist" in serve.stderr
    assert not (tmp_path / "data" / "pg").exists(), "nothing was started"
