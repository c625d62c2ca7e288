"""End to end: TLS and mutual TLS on both listeners, and `txproc certs dev`.

Certificates come from the `certs dev` code (a development CA, a server certificate for
127.0.0.1 and localhost, a client certificate), written into the module's temporary
directory, plus a second set whose CA the fronts do not know. Two fronts (the real
``Front`` actor over the session's shards and database, as in test_edge_hardening.py) serve
with them: one with TLS, one that requires client certificates. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from actors.app.certs import DEV_CLIENT_NAME, DEV_FILES, write_dev_certs
from actors.app.runtime import Processor
from processor.client import Client, ClientError
from processor.codes import AccountResult
from processor.config import Config, FrontConfig, ShardConfig
from processor.errors import Unavailable
from processor.types import Account
from tests.running import ExtraFront, IdSource, extra_front

# Short enough to watch pass: the TLS front's RPC handshake deadline (rpc_hello_timeout_s)
# and its HTTP header deadline, which must still work under TLS.
HELLO_TIMEOUT_S = 1.0
HEADER_TIMEOUT_S = 2.0
# How late a deadline may be seen to pass on a loaded two-core machine.
SLACK_S = 2.5
# Bounds every wait of a test that would otherwise hang when its protection is missing.
WAIT_MAX_S = 8.0


@dataclass(frozen=True)
class Certs:
    dev: Path  # the CA the fronts trust, and the server and client certificates it signed
    other: Path  # a second CA and a client certificate it signed, unknown to the fronts


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    root = tmp_path_factory.mktemp("certs")
    now = datetime.datetime.now(datetime.UTC)
    write_dev_certs(root / "dev", now=now)
    write_dev_certs(root / "other", now=now)
    return Certs(root / "dev", root / "other")


@pytest.fixture(scope="module")
async def tls_front(processor: Processor, certs: Certs) -> AsyncIterator[ExtraFront]:
    """TLS with the dev server certificate; no client certificates asked for."""
    async with extra_front(processor, tls_cert_path=str(certs.dev / "server.pem"),
                      tls_key_path=str(certs.dev / "server-key.pem"),
                      rpc_hello_timeout_s=HELLO_TIMEOUT_S,
                      http_header_timeout_s=HEADER_TIMEOUT_S) as listeners:
        yield listeners


@pytest.fixture(scope="module")
async def mtls_front(processor: Processor, certs: Certs) -> AsyncIterator[ExtraFront]:
    """Mutual TLS: clients must present a certificate signed by the dev CA."""
    async with extra_front(processor, tls_cert_path=str(certs.dev / "server.pem"),
                      tls_key_path=str(certs.dev / "server-key.pem"),
                      tls_client_ca_path=str(certs.dev / "ca.pem"),
                      tls_require_client_cert=True) as listeners:
        yield listeners


def _context(certs: Certs, identity: Path | None = None, *,
             tls_version_max: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client context trusting the dev CA, presenting ``identity``'s client certificate."""
    context = ssl.create_default_context(cafile=str(certs.dev / "ca.pem"))
    if identity is not None:
        context.load_cert_chain(identity / "client.pem", identity / "client-key.pem")
    if tls_version_max is not None:
        context.maximum_version = tls_version_max
    return context


@pytest.fixture
def processor_config(tmp_path: Path) -> Config:
    """A valid configuration that nothing is started from."""
    return Config(shard=ShardConfig(database_url="postgresql://unused", shards=2),
                  front=FrontConfig(), data_dir=str(tmp_path))


def _identity(certs: Certs, name: str) -> Path | None:
    return {"none": None, "other_ca": certs.other, "dev": certs.dev}[name]


def _handshake_tls12(port: int, certs: Certs, identity: Path | None) -> None:
    """A TLS 1.2 handshake with the listener on ``port``, presenting ``identity``'s client
    certificate; raises what it raises.

    In TLS 1.2 the server checks the client's certificate before the handshake ends, so a
    refusal shows here (in TLS 1.3 the client's side ends first and the refusal reaches it
    as the connection closing, indistinguishable from an application that hung up).
    """
    context = _context(certs, identity, tls_version_max=ssl.TLSVersion.TLSv1_2)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_MAX_S) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        assert tls.version() == "TLSv1.2"


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (or resets it)."""
    received = b""
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return received


async def _account_round_trip(port: int, token: str, context: ssl.SSLContext,
                              ids: IdSource) -> None:
    """Create an account over RPC with TLS and read it back."""
    account_id = ids.one()
    async with Client("127.0.0.1", port, token, ssl=context, timeout_s=WAIT_MAX_S) as client:
        codes = await client.create_accounts([Account(id=account_id, currency="EUR")])
        assert codes == [AccountResult.ok]
        (account,) = await client.lookup_accounts([account_id])
    assert account is not None and account.id == account_id


# -- TLS ----------------------------------------------------------------------------------------


async def test_https_with_the_dev_ca_is_served_and_plain_http_gets_no_http_answer(
        tls_front: ExtraFront, certs: Certs) -> None:
    """The HTTP listener speaks HTTPS with the dev certificate (for 127.0.0.1 and
    localhost), and a plain HTTP request on its port gets no HTTP answer."""
    async with httpx.AsyncClient(verify=_context(certs), timeout=WAIT_MAX_S) as http:
        for host in ("127.0.0.1", "localhost"):
            response = await http.get(f"https://{host}:{tls_front.http_port}/healthz")
            assert response.status_code == 200
            assert response.extensions["network_stream"].get_extra_info(
                "ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_front.http_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(WAIT_MAX_S):
        received = await _until_closed(reader)
    writer.close()
    assert not received.startswith(b"HTTP/")


async def test_http_header_deadline_still_applies_under_tls(
        tls_front: ExtraFront, certs: Certs) -> None:
    """The listener's own limits run on the decrypted stream: headers left unfinished over
    TLS get 408 and are closed at the header deadline."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", tls_front.http_port, ssl=_context(certs), ssl_handshake_timeout=WAIT_MAX_S)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\nX-Slow: ")
    started = time.monotonic()
    async with asyncio.timeout(WAIT_MAX_S):
        received = await _until_closed(reader)
    writer.close()
    assert received.startswith(b"HTTP/1.1 408 ")
    assert HEADER_TIMEOUT_S - 0.5 <= time.monotonic() - started <= HEADER_TIMEOUT_S + SLACK_S


async def test_rpc_over_tls_creates_and_looks_up_an_account_and_plain_rpc_is_refused(
        tls_front: ExtraFront, certs: Certs, ids: IdSource) -> None:
    """The Python client with an SSL context creates and reads an account over the RPC
    listener's TLS; the same client without TLS gets nowhere on that port."""
    await _account_round_trip(tls_front.rpc_port, tls_front.token, _context(certs), ids)
    plain = Client("127.0.0.1", tls_front.rpc_port, tls_front.token, timeout_s=WAIT_MAX_S,
                   connect_attempts_max=1)
    with pytest.raises(Unavailable):
        async with asyncio.timeout(WAIT_MAX_S):
            await plain.connect()
    await plain.close()


async def test_client_refuses_a_server_whose_certificate_it_does_not_trust(
        tls_front: ExtraFront, certs: Certs) -> None:
    """A client context trusting another CA fails at once with the verification error,
    not retried as if the server were away."""
    context = ssl.create_default_context(cafile=str(certs.other / "ca.pem"))
    client = Client("127.0.0.1", tls_front.rpc_port, tls_front.token, ssl=context,
                    timeout_s=WAIT_MAX_S)
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.connect()
    await client.close()


async def test_rpc_handshake_never_completed_is_closed_at_the_hello_deadline(
        tls_front: ExtraFront) -> None:
    """A connection that never starts its TLS handshake is closed after
    rpc_hello_timeout_s (asyncio's own default would hold it 60 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_front.rpc_port)
    started = time.monotonic()
    async with asyncio.timeout(WAIT_MAX_S):
        assert await _until_closed(reader) == b""
    writer.close()
    assert HELLO_TIMEOUT_S - 0.1 <= time.monotonic() - started <= HELLO_TIMEOUT_S + SLACK_S


# -- mutual TLS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("identity", ["none", "other_ca"])
@pytest.mark.parametrize("listener", ["http", "rpc"])
async def test_client_without_a_dev_signed_certificate_is_refused_in_the_handshake(
        mtls_front: ExtraFront, certs: Certs, ids: IdSource, listener: str,
        identity: str) -> None:
    """With --require-client-cert, a client presenting no certificate, or one signed by
    another CA, fails the TLS handshake itself, and so gets nothing from the listener."""
    port = mtls_front.http_port if listener == "http" else mtls_front.rpc_port
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.to_thread(_handshake_tls12, port, certs, _identity(certs, identity))
    context = _context(certs, _identity(certs, identity))
    if listener == "http":
        async with httpx.AsyncClient(verify=context, timeout=WAIT_MAX_S) as http:
            with pytest.raises(httpx.TransportError):
                await http.get(f"https://127.0.0.1:{port}/healthz")
        return
    client = Client("127.0.0.1", port, mtls_front.token, ssl=context, timeout_s=WAIT_MAX_S,
                    connect_attempts_max=1)
    with pytest.raises((Unavailable, ClientError)):
        async with asyncio.timeout(WAIT_MAX_S):
            await client.create_accounts([Account(id=ids.one(), currency="EUR")])
    await client.close()


async def test_client_with_the_dev_client_certificate_is_served_on_both_listeners(
        mtls_front: ExtraFront, certs: Certs, ids: IdSource) -> None:
    """With --require-client-cert, the dev client certificate completes the handshake (TLS
    1.2 and 1.3) and is served over HTTPS and RPC."""
    for port in (mtls_front.http_port, mtls_front.rpc_port):
        await asyncio.to_thread(_handshake_tls12, port, certs, certs.dev)
    context = _context(certs, certs.dev)
    async with httpx.AsyncClient(verify=context, timeout=WAIT_MAX_S) as http:
        response = await http.get(
            f"https://127.0.0.1:{mtls_front.http_port}/v1/accounts/{ids.one()}",
            headers={"Authorization": f"Bearer {mtls_front.token}"})
    assert response.status_code == 404  # authenticated, and no such account
    await _account_round_trip(mtls_front.rpc_port, mtls_front.token, context, ids)


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(("front", "named"), [
    ({"tls_cert_path": "c.pem"}, "tls_cert_path and tls_key_path"),
    ({"tls_key_path": "k.pem"}, "tls_cert_path and tls_key_path"),
    ({"tls_client_ca_path": "ca.pem"}, "tls_client_ca_path needs tls_cert_path"),
    ({"tls_cert_path": "c.pem", "tls_key_path": "k.pem", "tls_require_client_cert": True},
     "tls_require_client_cert needs tls_client_ca_path"),
    ({"tls_cert_path": "c.pem", "tls_key_path": "k.pem", "tls_internal_cert_path": "i.pem"},
     "tls_internal_cert_path and tls_internal_key_path"),
    ({"tls_server_ca_path": "ca.pem"}, "tls_server_ca_path and tls_internal_cert_path need"),
])
def test_config_check_refuses_incomplete_tls_settings(processor_config: Config,
                                                      front: dict[str, Any],
                                                      named: str) -> None:
    """Config.check names the TLS setting that is missing its partner."""
    config = msgspec.structs.replace(
        processor_config, front=FrontConfig(**front),
        payments=msgspec.structs.replace(processor_config.payments, enabled=False))
    with pytest.raises(ValueError, match=named):
        config.check()


def test_config_check_wants_an_internal_certificate_for_payments_under_mutual_tls(
        processor_config: Config) -> None:
    """With client certificates required, payments need the certificate the payments actor
    and the simulated providers present; with it, or with payments off, the settings pass."""
    front = FrontConfig(tls_cert_path="c.pem", tls_key_path="k.pem",
                        tls_client_ca_path="ca.pem", tls_require_client_cert=True)
    with pytest.raises(ValueError, match="--internal-client-cert"):
        msgspec.structs.replace(processor_config, front=front).check()
    msgspec.structs.replace(
        processor_config, front=front,
        payments=msgspec.structs.replace(processor_config.payments, enabled=False)).check()
    msgspec.structs.replace(processor_config, front=msgspec.structs.replace(
        front, tls_server_ca_path="ca.pem", tls_internal_cert_path="i.pem",
        tls_internal_key_path="ik.pem")).check()
    msgspec.structs.replace(processor_config, front=FrontConfig()).check()


# -- txproc certs dev ---------------------------------------------------------------------------


def _certs_dev(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "actors.app.cli", "certs", "dev", "--out",
                           str(out), *extra], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ), check=False)


def test_certs_dev_writes_a_ca_server_and_client_certificate_and_refuses_to_overwrite(
        tmp_path: Path) -> None:
    """`txproc certs dev --out DIR` writes the CA, a server certificate for 127.0.0.1 and
    localhost and a client certificate, both signed by the CA, with keys readable by the
    owner only; run again it refuses, changing nothing, unless --force."""
    out = tmp_path / "certs"
    done = _certs_dev(out)
    assert done.returncode == 0, done.stderr
    for file in DEV_FILES:
        path = out / file.name
        assert str(path) in done.stdout
        mode = path.stat().st_mode & 0o777
        assert mode == (0o600 if file.secret else 0o644), (file.name, oct(mode))
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    client = x509.load_pem_x509_certificate((out / "client.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value \
        == DEV_CLIENT_NAME
    # The key matches the certificate: a server context loads the pair.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
        out / "server.pem", out / "server-key.pem")

    before = {f.name: (out / f.name).read_bytes() for f in DEV_FILES}
    again = _certs_dev(out)
    assert again.returncode == 2
    assert "already exist" in again.stderr and str(out / "ca.pem") in again.stderr
    assert {f.name: (out / f.name).read_bytes() for f in DEV_FILES} == before
    forced = _certs_dev(out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "ca-key.pem").read_bytes() != before["ca-key.pem"]
    assert (out / "ca-key.pem").stat().st_mode & 0o777 == 0o600
