"""TLS for the edge's listeners: the one server context both of them use.

The HTTP and RPC listeners of a front share one ``ssl.SSLContext`` (``server_context``):
TLS 1.2 or later, the server's certificate chain and key, and, for mutual TLS, the CA whose
certificates clients must present. With ``require_client_cert`` a peer without such a
certificate is refused during the handshake, before a byte of HTTP or RPC is read; without
it, a client CA only means a certificate a client chooses to present must verify.
docs/security.md ("TLS") says what each listener does with it.
"""

from __future__ import annotations

import ssl

__all__ = ["TLS_VERSION_MIN", "server_context"]

# TLS 1.0 and 1.1 are deprecated (RFC 8996); 1.2 stays for gateways that lack 1.3.
TLS_VERSION_MIN = ssl.TLSVersion.TLSv1_2


def server_context(cert_path: str, key_path: str, client_ca_path: str = "",
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """A server context for ``cert_path`` (PEM: the certificate, then any intermediates) and
    its private key ``key_path`` (PEM, unencrypted).

    ``client_ca_path`` (PEM) names the CAs client certificates are verified against; with
    ``require_client_cert`` a client without a certificate they signed fails the handshake.
    Raises ``ValueError`` when ``require_client_cert`` has no ``client_ca_path``,
    ``FileNotFoundError`` for a missing file and ``ssl.SSLError`` for an unreadable one or
    a key that does not match the certificate.
    """
    if require_client_cert and not client_ca_path:
        raise ValueError("require_client_cert needs client_ca_path: the CA that signs clients")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSION_MIN
    context.load_cert_chain(certfile=cert_path, keyfile=key_path)
    if client_ca_path:
        context.load_verify_locations(cafile=client_ca_path)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
