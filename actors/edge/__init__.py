"""The edge: where gateways come in (HTTP and RPC listeners, hosted by the ledger's front).

Public interface:

* ``build_app``: the HTTP API (Starlette) over a ``LedgerService``, with the payments
  routes handed to a ``PaymentsService``;
* ``start_rpc_server``: the batched binary RPC listener over the same service;
* ``PaymentsLink``: the one hop from the edge to the payments actor (a ``PaymentsService``);
* ``http_server``, ``http_listener`` (``ListenError`` when it cannot bind) and
  ``HttpLimits``: the uvicorn server for the HTTP API on a socket bound by the caller,
  with the deadlines and connection caps that keep slow or idle clients from holding it
  (actors.edge.limits; docs/security.md, "Edge limits");
* ``AuditWriter``: the audit record each state-changing request writes before it is
  applied (actors.edge.audit; docs/security.md, "Audit");
* ``server_context``: the one TLS context both listeners serve with, when TLS is on
  (actors.edge.tls; docs/security.md, "TLS");
* ``Credentials`` and ``CredentialsWatch``: the key ring and the revocations both
  listeners check every request's token against, kept current while serving, and
  ``revoke_token_id`` / ``revoke_subject`` that write revocations (actors.edge.credentials;
  docs/security.md, "Tokens");
* ``RequestSignatures``: the signature checks of state-changing HTTP requests (RFC 9421,
  client keys and nonces in the database), and ``create_client_key`` /
  ``revoke_client_key`` that write client keys (actors.edge.signatures; docs/security.md,
  "Signed requests").

The edge verifies tokens and scopes; it holds no money rules of its own.

Its names are imported when first read (``processor.lazy``): a command that writes a
revocation does not load the HTTP API, its web framework or Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from processor.lazy import lazy_exports

if TYPE_CHECKING:
    from actors.edge.audit import AuditWriter
    from actors.edge.credentials import (
        Credentials,
        CredentialsWatch,
        revoke_subject,
        revoke_token_id,
    )
    from actors.edge.http_api import PaymentsService, build_app
    from actors.edge.limits import HttpLimits, ListenError, http_listener, http_server
    from actors.edge.payments_link import PaymentsLink
    from actors.edge.personal import PersonalUserData
    from actors.edge.rpc_server import start_rpc_server
    from actors.edge.signatures import RequestSignatures, create_client_key, revoke_client_key
    from actors.edge.tls import server_context

__all__ = [
    "AuditWriter",
    "Credentials",
    "CredentialsWatch",
    "HttpLimits",
    "ListenError",
    "PaymentsLink",
    "PaymentsService",
    "PersonalUserData",
    "RequestSignatures",
    "build_app",
    "create_client_key",
    "http_listener",
    "http_server",
    "revoke_client_key",
    "revoke_subject",
    "revoke_token_id",
    "server_context",
    "start_rpc_server",
]

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(__name__, {
        "actors.edge.audit": ("AuditWriter",),
        "actors.edge.credentials": (
            "Credentials", "CredentialsWatch", "revoke_subject", "revoke_token_id",
        ),
        "actors.edge.http_api": ("PaymentsService", "build_app"),
        "actors.edge.limits": ("HttpLimits", "ListenError", "http_listener", "http_server"),
        "actors.edge.payments_link": ("PaymentsLink",),
        "actors.edge.personal": ("PersonalUserData",),
        "actors.edge.rpc_server": ("start_rpc_server",),
        "actors.edge.signatures": ("RequestSignatures", "create_client_key", "revoke_client_key"),
        "actors.edge.tls": ("server_context",),
    })
