"""Key rotation, retirement and revocation on the running processor, over real HTTP and RPC,
driven by the `txproc` command as an operator runs it, without a restart.

The session's processor is shared: these tests never retire the active key (tokens that
tests.running.token_for issues afterwards are signed with it) and revoke only principals of
a tenant of their own.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import jwt

from actors.app.runtime import Processor
from processor.client import Client, ClientError
from processor.identity import load_or_create_ring
from tests.running import IdSource, token_for

TXPROC = [sys.executable, "-m", "actors.app.cli"]
# The fronts look at the key file and the revocations every 0.5 s; a change must reach
# both listeners within this of the command's return.
REFUSED_WITHIN_S = 2.0
TENANT = "keys-e2e"


def _txproc(*args: str) -> str:
    done = subprocess.run([*TXPROC, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy(), check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def _http_answer(http: httpx.AsyncClient, token: str, account_id: int) -> tuple[int, str]:
    """The status and error code of an authorized read (404: authorized, no such account)."""
    r = await http.get(f"/v1/accounts/{account_id}", headers={"authorization": f"Bearer {token}"})
    return r.status_code, r.json()["error"]["code"]


async def _rpc_answer(client: Client) -> str:
    """``ok`` for an answered read, else the code the connection was refused with."""
    try:
        await client.lookup_accounts([1])
    except ClientError as exc:
        return exc.code
    return "ok"


async def _within(deadline_s: float, probe: Callable[[], Awaitable[object]],
                  expected: object) -> float:
    """Seconds until ``probe`` answers ``expected``; fails after ``deadline_s``."""
    started = time.monotonic()
    while True:
        answer = await probe()
        elapsed_s = time.monotonic() - started
        if answer == expected:
            return elapsed_s
        assert elapsed_s < deadline_s, f"still {answer!r} after {elapsed_s:.2f} s"
        await asyncio.sleep(0.05)


async def test_rotate_then_retire_without_restart(processor: Processor, ids: IdSource) -> None:
    """`txproc keys rotate` makes new tokens carry the new kid while tokens of the old key
    keep working on HTTP and on an open RPC connection; `txproc keys retire` of the old key
    refuses them (token_invalid) on both within two seconds, and new tokens go on."""
    data_dir = Path(processor.config.data_dir)
    subject = f"rotate-{uuid.uuid4().hex[:8]}"
    account_id = ids.one()
    old = token_for(processor, tenant=TENANT, subject=subject)
    old_kid = _kid(old)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 timeout=10) as http, \
            Client("127.0.0.1", processor.rpc_port, old) as old_rpc:
        assert await _http_answer(http, old, account_id) == (404, "account_not_found")
        assert await _rpc_answer(old_rpc) == "ok"

        new_kid = _txproc("keys", "rotate", "--data-dir", str(data_dir)).strip()
        new = token_for(processor, tenant=TENANT, subject=subject)
        assert _kid(new) == new_kid != old_kid
        listing = _txproc("keys", "list", "--data-dir", str(data_dir))
        assert f"{old_kid} verify_only" in listing and f"{new_kid} active" in listing
        ring = load_or_create_ring(data_dir, now_s=int(time.time()))
        assert all(key.secret.hex() not in listing for key in ring.keys)
        # No restart: the new key verifies within the front's look-again pace (a token of
        # an unknown key makes it look at the file, at most every 0.5 s, and its poller
        # looks every 0.5 s: the `txproc` commands above can now return inside that), and
        # the old one still does.
        await _within(REFUSED_WITHIN_S, lambda: _http_answer(http, new, account_id),
                      (404, "account_not_found"))
        assert await _http_answer(http, old, account_id) == (404, "account_not_found")
        assert await _rpc_answer(old_rpc) == "ok"
        async with Client("127.0.0.1", processor.rpc_port, new) as new_rpc:
            assert await _rpc_answer(new_rpc) == "ok"

            _txproc("keys", "retire", old_kid, "--data-dir", str(data_dir))
            await _within(REFUSED_WITHIN_S, lambda: _http_answer(http, old, account_id),
                          (401, "token_invalid"))
            await _within(REFUSED_WITHIN_S, lambda: _rpc_answer(old_rpc), "token_invalid")
            assert await _http_answer(http, new, account_id) == (404, "account_not_found")
            assert await _rpc_answer(new_rpc) == "ok"
    # What the other tests of the session issue from now on is signed with the active key.
    async with Client("127.0.0.1", processor.rpc_port, token_for(processor)) as client:
        assert await _rpc_answer(client) == "ok"


async def test_revoke_a_token_then_a_subject(processor: Processor, ids: IdSource) -> None:
    """`txproc token revoke --jti` refuses that token (token_revoked) on HTTP and on an open
    RPC connection within two seconds while another token of the same subject goes on;
    `--tenant --subject` then refuses every token of the subject issued before it, and one
    issued after it works."""
    url = processor.admin_database_url  # an operator's command: the administrative role
    subject = f"revoke-{uuid.uuid4().hex[:8]}"
    account_id = ids.one()
    doomed = token_for(processor, tenant=TENANT, subject=subject)
    sibling = token_for(processor, tenant=TENANT, subject=subject)
    doomed_jti = jwt.decode(doomed, options={"verify_signature": False})["jti"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 timeout=10) as http, \
            Client("127.0.0.1", processor.rpc_port, doomed) as doomed_rpc, \
            Client("127.0.0.1", processor.rpc_port, sibling) as sibling_rpc:
        for token in (doomed, sibling):
            assert await _http_answer(http, token, account_id) == (404, "account_not_found")
        assert await _rpc_answer(doomed_rpc) == await _rpc_answer(sibling_rpc) == "ok"

        said = _txproc("token", "revoke", "--jti", doomed_jti, "--database-url", url)
        assert doomed_jti in said
        await _within(REFUSED_WITHIN_S, lambda: _http_answer(http, doomed, account_id),
                      (401, "token_revoked"))
        await _within(REFUSED_WITHIN_S, lambda: _rpc_answer(doomed_rpc), "token_revoked")
        assert await _http_answer(http, sibling, account_id) == (404, "account_not_found")
        assert await _rpc_answer(sibling_rpc) == "ok"

        _txproc("token", "revoke", "--tenant", TENANT, "--subject", subject,
                "--database-url", url)
        await _within(REFUSED_WITHIN_S, lambda: _http_answer(http, sibling, account_id),
                      (401, "token_revoked"))
        await _within(REFUSED_WITHIN_S, lambda: _rpc_answer(sibling_rpc), "token_revoked")
    # iat has whole seconds: a token issued in a later second than the revocation is good.
    await asyncio.sleep(1.1)
    fresh = token_for(processor, tenant=TENANT, subject=subject)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 timeout=10) as http, \
            Client("127.0.0.1", processor.rpc_port, fresh) as fresh_rpc:
        assert await _http_answer(http, fresh, account_id) == (404, "account_not_found")
        assert await _rpc_answer(fresh_rpc) == "ok"
