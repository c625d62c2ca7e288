"""Development certificates for TLS: ``txproc certs dev --out DIR``.

One run makes a throwaway CA and two certificates it signs: the server's, valid for
127.0.0.1, ::1 and localhost, and a client's (for ``--require-client-cert``). They are for
a laptop or a test, never for a deployment: the CA's key lies beside them unencrypted.
Keys are written with mode 0600; nothing is overwritten unless asked.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEV_CLIENT_NAME",
    "DEV_FILES",
    "DEV_VALIDITY_DAYS",
    "DevFile",
    "DevFilesExist",
    "write_dev_certs",
]

DEV_CLIENT_NAME = "txproc-dev-client"
DEV_VALIDITY_DAYS = 365
# A certificate starts this long before it is made, so a peer whose clock is a little
# behind still accepts it.
_BACKDATE = datetime.timedelta(minutes=5)
_SERVER_NAMES: tuple[x509.GeneralName, ...] = (
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
)
_KEY_MODE = 0o600
_CERT_MODE = 0o644


@dataclass(frozen=True)
class DevFile:
    name: str
    what: str
    secret: bool  # a private key: mode 0600


# In the order they are written and printed.
DEV_FILES = (
    DevFile("ca.pem", "CA certificate: clients trust it; serve --client-ca names it", False),
    DevFile("ca-key.pem", "CA private key: signs more dev certificates; keep it private", True),
    DevFile("server.pem", "server certificate (localhost, 127.0.0.1, ::1): serve --tls-cert",
            False),
    DevFile("server-key.pem", "server private key: serve --tls-key", True),
    DevFile("client.pem", f"client certificate (CN {DEV_CLIENT_NAME}), signed by the CA",
            False),
    DevFile("client-key.pem", "client private key", True),
)


class DevFilesExist(Exception):
    """Some of the files ``write_dev_certs`` would write exist and ``force`` is off."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__("already exist: " + ", ".join(str(p) for p in paths))
        self.paths = paths


def write_dev_certs(out_dir: Path, *, now: datetime.datetime,
                    force: bool = False) -> list[tuple[Path, DevFile]]:
    """Write a development CA, a server and a client certificate with their keys (PEM) into
    ``out_dir`` (made if missing, mode 0700), valid from ``now`` (timezone-aware) for
    ``DEV_VALIDITY_DAYS``; returns what was written, in ``DEV_FILES`` order.

    Raises ``DevFilesExist``, writing nothing, if any of the files exists and ``force`` is
    off; with ``force`` they are replaced. ``OSError`` if the directory is not writable.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    paths = [(out_dir / f.name, f) for f in DEV_FILES]
    existing = [path for path, _ in paths if path.exists() or path.is_symlink()]
    if existing and not force:
        raise DevFilesExist(existing)
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _ca_certificate(ca_key, now)
    server = _leaf_certificate(server_key.public_key(), "localhost", ca, ca_key, now,
                               usage=ExtendedKeyUsageOID.SERVER_AUTH, names=_SERVER_NAMES)
    client = _leaf_certificate(client_key.public_key(), DEV_CLIENT_NAME, ca, ca_key, now,
                               usage=ExtendedKeyUsageOID.CLIENT_AUTH, names=())
    contents = [_cert_pem(ca), _key_pem(ca_key), _cert_pem(server), _key_pem(server_key),
                _cert_pem(client), _key_pem(client_key)]
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for (path, file), content in zip(paths, contents, strict=True):
        _write(path, content, _KEY_MODE if file.secret else _CERT_MODE)
    return paths


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: datetime.datetime
                    ) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "txproc development CA")])
    public = key.public_key()
    return (
        _validity(x509.CertificateBuilder(), now)
        .subject_name(name).issuer_name(name).public_key(public)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(public: ec.EllipticCurvePublicKey, common_name: str,
                      ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                      now: datetime.datetime, *, usage: x509.ObjectIdentifier,
                      names: tuple[x509.GeneralName, ...]) -> x509.Certificate:
    builder = (
        _validity(x509.CertificateBuilder(), now)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject).public_key(public)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)),
                                        critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _validity(builder: x509.CertificateBuilder, now: datetime.datetime
              ) -> x509.CertificateBuilder:
    return (builder.serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=DEV_VALIDITY_DAYS)))


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, content: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (a key is never readable by others, not
    even for a moment), replacing what is there."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        # The umask may have taken bits off; a certificate is meant to be readable.
        os.fchmod(f.fileno(), mode)
        f.write(content)
