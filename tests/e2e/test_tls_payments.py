"""End to end: payments under mutual TLS, as `txproc serve` runs them.

`txproc serve` with the development certificates, client certificates required, and
payments on: the payments actor must reach the ledger's RPC over TLS with the internal
client certificate, and the simulated providers must post their webhooks to the HTTPS
listener with it. A gateway (this test) speaks HTTPS with its own client certificate. The
processor runs in a subprocess with its own Ray, on a database of the session's server.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from actors.app.certs import write_dev_certs
from actors.database import APP_PASSWORD_FILE_NAME, create_database, drop_database
from processor.client import client_tls_context
from tests.ports import free_port

TXPROC = [sys.executable, "-m", "actors.app.cli"]
READY_WAIT_S = 150.0
SETTLE_WAIT_S = 30.0




class Served:
    def __init__(self, base: str, tls: ssl.SSLContext, token: str, database_url: str) -> None:
        self.base = base
        self.tls = tls
        self.token = token
        self.database_url = database_url

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, verify=self.tls, timeout=30,
                            headers={"Authorization": f"Bearer {self.token}"})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str,
           app_password_file: Path) -> Iterator[Served]:
    import asyncio

    root = tmp_path_factory.mktemp("tls-payments")
    certs = root / "certs"
    write_dev_certs(certs, now=datetime.datetime.now(datetime.UTC))
    name = f"txproc_tlspay_{uuid.uuid4().hex[:12]}"
    url = asyncio.run(create_database(pg_admin_url, name))
    data_dir = root / "data"
    # The service role (and its password) belongs to the server: a processor with a data
    # directory of its own would set a new password, and the session's processor could no
    # longer open connections. Processors sharing a server share the file
    # (docs/design.md §12), so this one gets the session's.
    data_dir.mkdir()
    shutil.copy(app_password_file, data_dir / APP_PASSWORD_FILE_NAME)
    (data_dir / APP_PASSWORD_FILE_NAME).chmod(0o600)
    http_port, rpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TXPROC_DATABASE_URL")}
    process = subprocess.Popen(
        [*TXPROC, "serve", "--data-dir", str(data_dir), "--database-url", url,
         "--http-port", str(http_port), "--rpc-port", str(rpc_port), "--shards", "1",
         "--metrics-port", "0", "--payments-cpu-nice", "0",  # tests/running.py says why
         "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server-key.pem"),
         "--client-ca", str(certs / "ca.pem"), "--require-client-cert",
         "--server-ca", str(certs / "ca.pem"),
         "--internal-client-cert", str(certs / "client.pem"),
         "--internal-client-key", str(certs / "client-key.pem")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tls = client_tls_context(str(certs / "ca.pem"), str(certs / "client.pem"),
                             str(certs / "client-key.pem"))
    base = f"https://127.0.0.1:{http_port}"
    try:
        _wait_ready(process, base, tls)
        issued = subprocess.run(
            [*TXPROC, "token", "issue", "--data-dir", str(data_dir), "--scopes",
             "accounts:read,accounts:write,transfers:read,transfers:write,"
             "payments:read,payments:write"],
            capture_output=True, text=True, timeout=120, check=True)
        yield Served(base, tls, issued.stdout.strip(), url)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate(timeout=30)
        asyncio.run(drop_database(pg_admin_url, name))


def _wait_ready(process: subprocess.Popen[str], base: str, tls: ssl.SSLContext) -> None:
    deadline = time.monotonic() + READY_WAIT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/readyz", verify=tls, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    output, _ = process.communicate(timeout=30)
    raise AssertionError(f"never ready; serve said:\n{output[-4000:]}")


def _payment(http: httpx.Client, path: str) -> dict[str, Any]:
    """GET ``path`` until neither it nor any of its operations is processing."""
    deadline = time.monotonic() + SETTLE_WAIT_S
    while True:
        body: dict[str, Any] = http.get(path).json()
        busy = body["status"] == "processing" or any(
            op["status"] == "processing" for op in body.get("operations", ()))
        if not busy or time.monotonic() > deadline:
            return body
        time.sleep(0.3)


def _post(http: httpx.Client, path: str, body: dict[str, Any] | None) -> httpx.Response:
    """POST with one Idempotency-Key, sent again while answered 503: the payments actor
    may still be starting when the front is ready."""
    key = uuid.uuid4().hex
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        r = http.post(path, headers={"idempotency-key": key}, json=body)
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(1.0)


async def _webhooks_recorded(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM webhook_events"))
    finally:
        await conn.close()


def test_payments_run_end_to_end_under_mutual_tls(served: Served) -> None:
    import asyncio

    merchant = int(time.time() * 1000) % (2**40) + 1
    with served.http() as http:
        r = http.post("/v1/accounts", json={"id": merchant, "currency": "EUR",
                                            "flags": ["debits_must_not_exceed_credits"]})
        assert r.status_code == 201, r.text
        # The authorization holds funds in the ledger: the payments actor's RPC over TLS.
        r = _post(http, "/v1/payments", {
            "amount": 800, "currency": "EUR", "payment_method": "pm_4242_tlsbyhttpsonly",
            "merchant_account_id": merchant, "capture": False, "provider": "globex"})
        assert r.status_code == 201, r.text
        payment = r.json()
        assert payment["status"] == "authorized"
        # globex settles captures later and says so by webhook, over HTTPS with the
        # internal client certificate.
        r = _post(http, f"/v1/payments/{payment['id']}/capture", None)
        assert r.status_code in (200, 202), r.text
        assert _payment(http, f"/v1/payments/{payment['id']}")["status"] == "captured"
        account = http.get(f"/v1/accounts/{merchant}").json()
        assert account["credits_posted"] == 800
    deadline = time.monotonic() + SETTLE_WAIT_S
    while asyncio.run(_webhooks_recorded(served.database_url)) == 0:
        assert time.monotonic() < deadline, "no webhook reached the HTTPS listener"
        time.sleep(0.5)


def test_a_gateway_without_a_client_certificate_is_refused(served: Served) -> None:
    """The listener that payments share still refuses a peer with no certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{served.base}/healthz", verify=context, timeout=5)
