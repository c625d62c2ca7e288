"""The edge: where gateways come in (HTTP and RPC listeners, hosted by the ledger's front).

Public interface:

* ``build_app``: the HTTP API (Starlette) over a ``LedgerService``, with the payments
  routes handed to a ``PaymentsService``;
* ``start_rpc_server``: the batched binary RPC listener over the same service;
* ``PaymentsLink``: the one hop from the edge to the payments actor (a ``PaymentsService``).

The edge verifies tokens and scopes; it holds no money rules of its own.
"""

from __future__ import annotations

from actors.edge.http_api import PaymentsService, build_app
from actors.edge.payments_link import PaymentsLink
from actors.edge.rpc_server import start_rpc_server

__all__ = ["PaymentsLink", "PaymentsService", "build_app", "start_rpc_server"]
