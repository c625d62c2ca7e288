"""The edge: where gateways come in (HTTP and RPC listeners, hosted by the ledger's front).

Public interface:

* ``build_app``: the HTTP API (Starlette) over a ``LedgerService``, with the payments
  routes handed to a ``PaymentsService``;
* ``start_rpc_server``: the batched binary RPC listener over the same service;
* ``PaymentsLink``: the one hop from the edge to the payments actor (a ``PaymentsService``);
* ``http_server`` and ``HttpLimits``: the uvicorn server for the HTTP API, with the
  deadlines and connection caps that keep slow or idle clients from holding it
  (actors.edge.limits; docs/security.md, "Edge limits").

The edge verifies tokens and scopes; it holds no money rules of its own.
"""

from __future__ import annotations

from actors.edge.http_api import PaymentsService, build_app
from actors.edge.limits import HttpLimits, http_server
from actors.edge.payments_link import PaymentsLink
from actors.edge.rpc_server import start_rpc_server

__all__ = [
    "HttpLimits",
    "PaymentsLink",
    "PaymentsService",
    "build_app",
    "http_server",
    "start_rpc_server",
]
