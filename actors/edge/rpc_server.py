"""The binary RPC server for gateways: processor.wire frames over TCP, served by asyncio streams.

One task reads a connection's frames in order; each accepted request then runs in a task of
its own, so a slow batch does not hold up the requests behind it and responses leave in
completion order. Everything a connection holds is bounded: at most
``in_flight_per_connection_max`` request tasks (more are answered ``too_many_in_flight``),
one frame of at most ``wire.FRAME_BYTES_MAX`` bytes being read, and responses waiting in
the socket buffer, because a request task finishes only when its response is drained.

Nor can a connection hold its slot for nothing (docs/security.md, "Edge limits"): the first
frame must be a Hello, small and prompt; after it, a connection with no frame and no request
in flight for ``idle_timeout_s`` is closed, a frame's body must follow its header within
``frame_timeout_s``, a client that leaves its responses unread for ``write_timeout_s`` is
cut off, and a connection whose token expired is closed ``token_grace_s`` later unless the
client sent a new Hello. One peer address holds at most ``connections_per_peer_max`` of
the ``connections_max`` connections, and TCP keepalive finds peers that vanished.

The server runs on whatever loop it is started on (uvloop inside the gateway actor). In
Python 3.11, ``Server.close()`` stops accepting but leaves accepted connections open; they
end when their clients close or when the loop cancels their tasks at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Sized
from typing import Any, cast

import msgspec
import numpy as np
from msgspec.structs import replace

from actors.edge.audit import AuditWriter
from actors.edge.credentials import Credentials, as_credentials
from actors.edge.limits import PeerConnections, enable_tcp_keepalive, peer_host
from actors.edge.tenancy import visible_accounts, visible_transfers
from actors.ops import metrics, telemetry
from actors.payments import AUDITED_OPERATIONS, OPERATION_SCOPES
from processor import identity, wire
from processor.batch import BatchInvalid, TransferBatch
from processor.errors import LedgerError, Unavailable
from processor.history import AccountTransfersFilter, HistoryError, HistoryService, TransfersQuery
from processor.ratelimit import RateLimiter
from processor.reserved import (
    RESERVED_ID_MIN_DEFAULT,
    SYSTEM_SCOPE,
    accounts_reserved,
    columns_reserved,
    transfers_reserved,
)
from processor.service import BATCH_ITEMS_MAX, LedgerService, create_transfer_batch
from processor.stream import STREAM_LIMIT_MAX, STREAM_WAIT_S_MAX, StreamService
from processor.types import ID_MAX, InvariantError, Transfer

__all__ = [
    "CLOSE_DRAIN_TIMEOUT_S",
    "CONNECTIONS_MAX_DEFAULT",
    "CONNECTIONS_PER_PEER_MAX_DEFAULT",
    "FRAME_TIMEOUT_S_DEFAULT",
    "HELLO_BYTES_MAX_DEFAULT",
    "HELLO_TIMEOUT_S_DEFAULT",
    "IDLE_TIMEOUT_S_DEFAULT",
    "TOKEN_GRACE_S_DEFAULT",
    "WRITE_TIMEOUT_S_DEFAULT",
    "start_rpc_server",
]

log = logging.getLogger(__name__)

# How long a closing connection waits for its accepted requests to be answered before
# cancelling them; bounded so that a hung ledger call cannot pin a connection slot forever.
CLOSE_DRAIN_TIMEOUT_S = 5.0
# A connection that has not sent Hello by then is closed; it would otherwise hold one of
# connections_max slots without ever being authenticated.
HELLO_TIMEOUT_S_DEFAULT = 10.0
# The defaults below are FrontConfig's too (its rpc_* fields); docs/security.md gives reasons.
CONNECTIONS_MAX_DEFAULT = 1024
CONNECTIONS_PER_PEER_MAX_DEFAULT = 256
# Before Hello a frame longer than this is refused unread: a client not yet authenticated
# must not make the server buffer FRAME_BYTES_MAX. A legal Hello is at most
# wire.HELLO_BYTES_MAX (about 16 KiB).
HELLO_BYTES_MAX_DEFAULT = 64 * 1024
# A gateway's connection is either busy or cheap to open again.
IDLE_TIMEOUT_S_DEFAULT = 300.0
# A full 5 MiB frame takes well under a second on any link a gateway should use.
FRAME_TIMEOUT_S_DEFAULT = 30.0
WRITE_TIMEOUT_S_DEFAULT = 30.0
# Time for a client told token_expired to send a new Hello before the connection closes.
TOKEN_GRACE_S_DEFAULT = 30.0
# Hints sent with the server's own limits; a client over its in-flight limit only has to
# wait for one of its own responses, while a full server needs a connection to go away.
_TOO_MANY_IN_FLIGHT_RETRY_AFTER_S = 0.01
_CONNECTIONS_FULL_RETRY_AFTER_S = 1.0

_Batch = (
    wire.CreateAccounts | wire.CreateTransfers | wire.LookupAccounts | wire.LookupTransfers
    | wire.PaymentCall | wire.CreateTransferBatch | wire.GetAccountTransfers
    | wire.QueryTransfers | wire.GetAccountBalances | wire.StreamTransfers
)

_RPC_TRANSFER_SECONDS = metrics.TRANSFER_REQUEST_SECONDS.labels("rpc")

_SCOPE_OF_REQUEST: dict[type[_Batch], str] = {
    wire.CreateAccounts: "accounts:write",
    wire.CreateTransfers: "transfers:write",
    wire.CreateTransferBatch: "transfers:write",
    wire.LookupAccounts: "accounts:read",
    wire.LookupTransfers: "transfers:read",
    wire.GetAccountTransfers: "accounts:read",
    wire.GetAccountBalances: "accounts:read",
    wire.QueryTransfers: "transfers:read",
    wire.StreamTransfers: "transfers:read",
}
# The scope of the processor's own token (processor/identity): its postings may name
# their payments request's record as origin (``_vouched_origin``).
_SYSTEM_SCOPES = frozenset(identity.SYSTEM_SCOPES)
_HISTORY_REQUESTS = (wire.GetAccountTransfers, wire.QueryTransfers, wire.GetAccountBalances)


class _Refused(Exception):
    """The connection broke one of its limits: answered with ``code`` and closed."""

    def __init__(self, code: str, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason  # the label of the closed-connections counter


class _Server:
    """What every connection of one server shares: the service, the key and the limits."""

    def __init__(
        self,
        service: LedgerService,
        key: bytes | Credentials,
        *,
        clock_s: Callable[[], float],
        in_flight_per_connection_max: int,
        connections_max: int,
        connections_per_peer_max: int,
        hello_timeout_s: float,
        hello_bytes_max: int,
        idle_timeout_s: float,
        frame_timeout_s: float,
        write_timeout_s: float,
        token_grace_s: float,
        reserved_id_min: int = RESERVED_ID_MIN_DEFAULT,
        rate_limiter: RateLimiter | None = None,
        audit: AuditWriter | None = None,
    ) -> None:
        self.service = service
        self.audit = audit
        self.rate_limiter = rate_limiter or RateLimiter(0, 0)
        self.reserved_id_min = reserved_id_min
        self.credentials = as_credentials(key)
        self.clock_s = clock_s
        self.in_flight_per_connection_max = in_flight_per_connection_max
        self.connections_max = connections_max
        self.hello_timeout_s = hello_timeout_s
        self.hello_bytes_max = hello_bytes_max
        self.idle_timeout_s = idle_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self.write_timeout_s = write_timeout_s
        self.token_grace_s = token_grace_s
        self.connections = 0
        self.peers = PeerConnections(connections_per_peer_max)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        enable_tcp_keepalive(writer.get_extra_info("socket"))
        peer = peer_host(writer.get_extra_info("peername"))
        if self.connections >= self.connections_max:
            _closed("connections")
            return await self._refuse(writer, f"the server has {self.connections_max} connections")
        with self.peers.slot(peer) as admitted:
            if not admitted:
                _closed("peer_connections")
                return await self._refuse(
                    writer, f"{peer} has {self.peers.per_peer_max} connections open")
            self.connections += 1
            try:
                await _Connection(self, reader, writer).run()
            except asyncio.CancelledError:
                # The loop is shutting down and the connection is already cleaned up. Python
                # 3.11's start_server reports a handler task that ends cancelled as an error
                # ("Exception in callback"), so this task, awaited by no one, ends normally.
                pass
            finally:
                self.connections -= 1
        return None

    async def _refuse(self, writer: asyncio.StreamWriter, message: str) -> None:
        error = wire.Error(None, "overloaded", message, _CONNECTIONS_FULL_RETRY_AFTER_S)
        writer.write(wire.encode_frame(error))
        await _close(writer, self.write_timeout_s)


class _Connection:
    def __init__(
        self, server: _Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self._claims: identity.Claims | None = None
        self._version = 1  # the protocol version the client's Hello named
        self._tasks: set[asyncio.Task[None]] = set()
        self._peer = writer.get_extra_info("peername")
        self._loop = asyncio.get_running_loop()
        # When the last frame arrived or the last response left, in loop seconds.
        self._active_s = self._loop.time()

    async def run(self) -> None:
        try:
            try:
                await self._read_frames()
            except (asyncio.IncompleteReadError, OSError):
                # The client went away between or in the middle of frames (or its socket
                # failed): an expected outcome, handled like a close once the accepted
                # requests are answered.
                log.debug("rpc client %s disconnected", self._peer)
            except Exception:
                # A bug in this module: it must end this connection only, not the server.
                log.exception("rpc connection from %s failed", self._peer)
            await self._finish_tasks()
        finally:
            # Reached on cancellation too: no request task may outlive its connection.
            await self._cancel_tasks()
            await _close(self._writer, self._server.write_timeout_s)

    async def _read_frames(self) -> None:
        while True:
            try:
                request = await self._read_request()
            except wire.FrameTooLarge as exc:
                return self._refuse_connection("frame_too_large", str(exc))
            except wire.MalformedFrame as exc:
                return self._refuse_connection("malformed_frame", f"not a request: {exc}")
            except _Refused as exc:
                _closed(exc.reason)
                return self._refuse_connection(exc.code, exc.message)
            if isinstance(request, wire.Hello):
                if not self._hello(request):
                    return None
            elif self._claims is None:
                return self._refuse_connection("token_missing", "the first frame must be Hello")
            elif not self._still_authorized(self._claims):
                return None
            else:
                self._accept(request, self._claims)
            # Stops reading while the client does not read its answers, so that the errors
            # answered right here cannot pile up in the socket buffer.
            await self._drain()
            if self._writer.is_closing():
                return None  # cut off by the write timeout

    async def _read_request(self) -> wire.Request:
        """The next frame: a small Hello, promptly, first; then any frame within the
        idle and token deadlines. Raises ``_Refused`` when a limit is broken."""
        if self._claims is None:
            return await self._read_hello()
        return await self._read_frame()

    async def _read_hello(self) -> wire.Request:
        server = self._server
        deadline = asyncio.timeout(server.hello_timeout_s)
        try:
            async with deadline:
                header = await self._reader.readexactly(wire.FRAME_HEADER_BYTES)
                length_bytes = wire.frame_length(header)
                if length_bytes > server.hello_bytes_max:
                    # Refused before a byte of the body is read: nobody is known yet.
                    raise _Refused(
                        "frame_too_large",
                        f"a frame of {length_bytes} bytes exceeds the "
                        f"{server.hello_bytes_max} bytes allowed before Hello",
                        reason="hello_too_large")
                return await self._read_body(length_bytes)
        except TimeoutError as exc:
            # A TimeoutError from the socket (ETIMEDOUT) is a lost client, not a silent one.
            if not deadline.expired():
                raise
            raise _Refused("token_missing", f"no Hello within {server.hello_timeout_s} s",
                           reason="hello_timeout") from exc

    async def _read_frame(self) -> wire.Request:
        header = await self._read_header()
        return await self._read_body(wire.frame_length(header))

    async def _read_header(self) -> bytes:
        """Wait for the next frame's header, for as long as the connection may stay open.

        That is until it has been idle for ``idle_timeout_s`` (no frame received and no
        response sent, and none of its requests in flight: then the client waits for us),
        and until ``token_grace_s`` after its token's expiry (a new Hello moves it).
        """
        server = self._server
        while True:
            # Read anew each time round: a new Hello replaces the claims. Called after
            # Hello only, so there are claims.
            token_left_s = (self._current_claims.expires_at_s + server.token_grace_s
                            - server.clock_s())
            if token_left_s <= 0:
                raise _Refused("token_expired",
                               "the token expired and no new Hello came; connect with a new "
                               "token", reason="token_expired")
            idle_left_s = self._active_s + server.idle_timeout_s - self._loop.time()
            if idle_left_s <= 0:
                if not self._tasks:
                    raise _Refused("idle_timeout", f"no frame for {server.idle_timeout_s} s",
                                   reason="idle_timeout")
                idle_left_s = server.idle_timeout_s  # look again once they are answered
            deadline = asyncio.timeout(min(token_left_s, idle_left_s))
            try:
                async with deadline:
                    # Cancelling it leaves a partly received header in the reader's buffer.
                    return await self._reader.readexactly(wire.FRAME_HEADER_BYTES)
            except TimeoutError:
                if not deadline.expired():
                    raise  # ETIMEDOUT from the socket: the client is lost

    async def _read_body(self, length_bytes: int) -> wire.Request:
        timeout_s = self._server.frame_timeout_s
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                body = await self._reader.readexactly(length_bytes)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise _Refused("frame_timeout",
                           f"a frame's {length_bytes} bytes did not arrive within {timeout_s} s",
                           reason="frame_timeout") from exc
        self._active_s = self._loop.time()
        return wire.decode_request(body)

    async def _drain(self) -> None:
        """Wait until the socket buffer takes what was written.

        A client that reads nothing for ``write_timeout_s`` is cut off: the transport is
        aborted (closing it would wait for that very buffer to drain), which also ends the
        read loop and fails the other waiting writers. Raises ``ConnectionError`` if the
        connection was lost.
        """
        deadline = asyncio.timeout(self._server.write_timeout_s)
        try:
            async with deadline:
                await self._writer.drain()
        except TimeoutError:
            if not deadline.expired():
                raise
            if self._writer.transport.is_closing():
                return  # another writer of this connection already cut it off
            _closed("write_timeout")
            log.info("rpc connection from %s aborted: responses unread for %s s",
                     self._peer, self._server.write_timeout_s)
            self._writer.transport.abort()

    def _hello(self, hello: wire.Hello) -> bool:
        if hello.version not in wire.PROTOCOL_VERSIONS:
            self._refuse_connection(
                "protocol_version_unsupported",
                f"protocol version {hello.version} is not one of "
                f"{sorted(wire.PROTOCOL_VERSIONS)}")
            return False
        now_s = int(self._server.clock_s())
        try:
            claims = self._server.credentials.verify(hello.token, now_s=now_s)
        except identity.AuthError as exc:
            self._refuse_connection(exc.code, exc.message)
            return False
        self._claims = claims
        self._version = hello.version
        self._send(wire.HelloOk(claims.expires_at_s, wire.PROTOCOL_VERSION))
        return True

    def _still_authorized(self, claims: identity.Claims) -> bool:
        """Whether the connection's token is still good for a request: its key not retired
        and the token not revoked since Hello. If it is not, the connection is refused
        (``token_invalid`` or ``token_revoked``): its holder may no longer send anything,
        and a reconnect with the same token is refused at Hello."""
        try:
            self._server.credentials.check(claims)
        except identity.AuthError as exc:
            self._refuse_connection(exc.code, exc.message)
            return False
        return True

    def _accept(self, request: _Batch, claims: identity.Claims) -> None:
        """Start a task for ``request``, or answer it at once if it cannot be accepted."""
        request_id = request.request_id
        if int(self._server.clock_s()) >= claims.expires_at_s:
            return self._send(
                wire.Error(request_id, "token_expired", "the token has expired; send Hello")
            )
        if isinstance(request, wire.PaymentCall):
            scope = OPERATION_SCOPES.get(request.operation)
            if scope is None:
                return self._send(wire.Error(request_id, "unknown_operation",
                                             f"no payments operation is named "
                                             f"{request.operation[:32]}"))
        else:
            scope = _SCOPE_OF_REQUEST[type(request)]
        if isinstance(request, wire.CreateTransferBatch) and self._version < 2:
            return self._send(wire.Error(
                request_id, "protocol_version_unsupported",
                "CreateTransferBatch needs protocol version 2; say so in Hello"))
        try:
            identity.require_scope(claims, scope)
        except identity.ScopeError as exc:
            return self._send(wire.Error(request_id, exc.code, exc.message))
        reserved_min = self._server.reserved_id_min
        if SYSTEM_SCOPE not in claims.scopes and _touches_reserved(request, reserved_min):
            return self._send(wire.Error(
                request_id, "id_reserved",
                f"ids from {reserved_min} up belong to the processor; nothing was written"))
        items_count = _items_count(request)
        if items_count > BATCH_ITEMS_MAX:
            message = f"{items_count} items exceed the batch limit of {BATCH_ITEMS_MAX}"
            return self._send(wire.Error(request_id, "batch_too_large", message))
        if len(self._tasks) >= self._server.in_flight_per_connection_max:
            return self._send(
                wire.Error(
                    request_id,
                    "too_many_in_flight",
                    f"{len(self._tasks)} requests are in flight on this connection",
                    _TOO_MANY_IN_FLIGHT_RETRY_AFTER_S,
                )
            )
        # Last: a request refused for any other reason takes nothing from the budget.
        limit = self._server.rate_limiter.take(identity.principal_of(claims),
                                               max(1, items_count), self._server.clock_s())
        if not limit.allowed:
            return self._send(wire.Error(
                request_id, "rate_limited",
                f"the rate limit of {self._server.rate_limiter.rate_per_s:g} operations/s "
                f"(burst {self._server.rate_limiter.burst}) is spent; nothing was applied",
                limit.retry_after_s))
        task = asyncio.create_task(self._serve(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    async def _serve(self, request: _Batch) -> None:
        if telemetry.TRACER is None:
            return await self._serve_traced(request)
        with telemetry.span(f"rpc {type(request).__name__}",
                            attributes={"rpc.system": "txproc"}):
            return await self._serve_traced(request)

    async def _serve_traced(self, request: _Batch) -> None:
        request_id = request.request_id
        try:
            frame = wire.encode_frame(await self._call(request))
        except LedgerError as exc:
            error = wire.Error(request_id, exc.code, exc.message, exc.retry_after_s)
            frame = wire.encode_frame(error)
        except Exception:
            # A bug in the service or here: answered and logged, and the server lives on.
            log.exception("rpc %s request %d failed", type(request).__name__, request_id)
            message = "internal error; the request may or may not have been applied"
            frame = wire.encode_frame(wire.Error(request_id, "internal", message))
        if self._writer.is_closing():
            return
        self._writer.write(frame)
        # The task, and with it an in-flight slot, lasts until the response has left, which
        # bounds the responses buffered for a client that does not read.
        with contextlib.suppress(ConnectionError):
            await self._drain()
        self._active_s = self._loop.time()

    async def _call(self, request: _Batch) -> wire.Response:
        service = self._server.service
        request_id = request.request_id
        if isinstance(request, wire.PaymentCall):
            payments_call = getattr(service, "payments_call", None)
            if payments_call is None:
                raise Unavailable("payments are not served here", retry_after_s=60)
            origin, handed = 0, ""
            audit = self._server.audit
            if request.operation in AUDITED_OPERATIONS and audit is not None:
                # Written by the payments actor with the request's first write
                # (processor/request_audit.py).
                origin, handed = audit.delegate(self._current_claims,
                                                f"rpc {self._peer} #{request.request_id}",
                                                f"payments.{request.operation}", 1)
            elif not request.operation.startswith(("get_", "list_")):
                # Reads (get_*, list_*) change nothing and record nothing.
                origin = await self._origin(request, f"payments.{request.operation}", 1)
            status, body, replayed = await payments_call(
                identity.principal_of(self._current_claims), request.operation,
                request.idempotency_key,
                request.subject_id, request.body, origin=origin, audit=handed)
            return wire.PaymentResult(request_id, status, body, replayed)
        # Whatever tenant a client wrote into an item, it is created as the token's tenant's
        # (actors/edge/tenancy.py); reads show only what that tenant may see.
        tenant = self._current_claims.tenant_slot
        if isinstance(request, _HISTORY_REQUESTS):
            return await _history_call(service, request, tenant)
        if isinstance(request, wire.StreamTransfers):
            return await _stream_call(service, request, tenant)
        if isinstance(request, wire.CreateAccounts):
            origin = await self._origin(request, "create_accounts", len(request.items))
            accounts = [replace(a, tenant=tenant, origin=origin) for a in request.items]
            account_codes = await service.create_accounts(accounts)
            _require_count(account_codes, request.items)
            return wire.CreateAccountsResult(request_id, cast(list[int], account_codes))
        if isinstance(request, wire.CreateTransferBatch):
            return await self._create_transfer_batch(request, tenant)
        if isinstance(request, wire.CreateTransfers):
            origin = self._vouched_origin(request.items) or await self._origin(
                request, "create_transfers", len(request.items))
            items = [replace(t, tenant=tenant, origin=origin) for t in request.items]
            with _RPC_TRANSFER_SECONDS.time():
                transfer_codes = await service.create_transfers(items)
            _require_count(transfer_codes, request.items)
            return wire.CreateTransfersResult(request_id, cast(list[int], transfer_codes))
        if isinstance(request, wire.LookupAccounts):
            found = await service.lookup_accounts(request.ids)
            _require_count(found, request.ids)
            return wire.LookupAccountsResult(request_id, visible_accounts(found, tenant))
        transfers = await service.lookup_transfers(request.ids)
        _require_count(transfers, request.ids)
        return wire.LookupTransfersResult(
            request_id, await visible_transfers(service, transfers, tenant))

    async def _create_transfer_batch(self, request: wire.CreateTransferBatch,
                                     tenant: int) -> wire.Response:
        try:
            batch = TransferBatch.from_bytes(
                request.id, request.debit_account_id, request.credit_account_id,
                request.amount, request.currency, request.flags, request.pending_id,
                request.timeout_s, request.code, request.user_data)
        except BatchInvalid as exc:
            return wire.Error(request.request_id, "invalid_batch", str(exc))
        origin = await self._origin(request, "create_transfers", len(batch))
        batch = batch.with_tenant(tenant, origin)
        with _RPC_TRANSFER_SECONDS.time():
            codes = await create_transfer_batch(self._server.service, batch)
        _require_count(codes, batch)
        return wire.CreateTransferBatchResult(request.request_id,
                                              codes.astype(np.uint8).tobytes())

    @property
    def _current_claims(self) -> identity.Claims:
        """The claims of the connection's last Hello: requests are served only after one."""
        claims = self._claims
        if claims is None:
            raise InvariantError("a request is served only after Hello")
        return claims

    async def _origin(self, request: _Batch, operation: str, items: int) -> int:
        """Write the request's audit record (actors/edge/audit.py); its id, 0 without a
        writer. Raises ``Unavailable`` if it cannot be written: nothing is applied."""
        audit = self._server.audit
        if audit is None:
            return 0
        return await audit.record(self._current_claims,
                                  f"rpc {self._peer} #{request.request_id}",
                                  operation, items)

    def _vouched_origin(self, items: list[Transfer]) -> int:
        """The record the items name as their origin, if this request may use it instead of
        a record of its own: the processor's own token sent it (the payments engine posting
        a step), every item names the same record, and this edge's writer wrote that record
        (the payments request the step serves), so its commit precedes the transfers'. 0
        otherwise: whatever else a client writes into ``origin`` is ignored."""
        audit = self._server.audit
        if audit is None or not items or not self._current_claims.scopes & _SYSTEM_SCOPES:
            return 0
        origin = items[0].origin
        if origin and all(t.origin == origin for t in items) and audit.wrote(origin):
            return origin
        return 0

    def _send(self, message: wire.Response) -> None:
        # A client gone mid-request is normal; writing to its closed transport would only
        # make asyncio log warnings.
        if not self._writer.is_closing():
            self._writer.write(wire.encode_frame(message))

    def _refuse_connection(self, code: str, message: str) -> None:
        """Answer a connection-level error; the caller then stops reading and closes."""
        log.info("rpc connection from %s refused: %s", self._peer, code)
        self._send(wire.Error(None, code, message))

    async def _finish_tasks(self) -> None:
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=CLOSE_DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _cancel_tasks(self) -> None:
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _items_count(request: _Batch) -> int:
    if isinstance(request, (wire.PaymentCall, wire.StreamTransfers, *_HISTORY_REQUESTS)):
        return 1
    if isinstance(request, wire.CreateAccounts | wire.CreateTransfers):
        return len(request.items)
    if isinstance(request, wire.CreateTransferBatch):
        return len(request.id) // 8
    return len(request.ids)


async def _history_call(service: LedgerService, request: _Batch,
                        tenant: int) -> wire.Response:
    """A history request (processor.history): its filter checked, then read by the
    service's ``HistoryService`` side; ``invalid_query``, ``invalid_cursor`` or
    ``account_not_found`` for that request alone."""
    if not hasattr(service, "query_transfers"):
        raise Unavailable("this server keeps no history", retry_after_s=60)
    history = cast(HistoryService, service)
    request_id = request.request_id
    try:
        if isinstance(request, wire.GetAccountBalances):
            if not (1 <= request.account_id <= ID_MAX and 0 <= request.at_ns <= ID_MAX):
                return wire.Error(request_id, "invalid_query",
                                  "account_id and at_ns are integers from 1 and 0 to 2^63-1")
            balances = await history.get_account_balances(request.account_id, request.at_ns,
                                                          tenant)
            if balances is None:
                return wire.Error(request_id, "account_not_found",
                                  f"no account has the id {request.account_id}")
            return wire.AccountBalancesResult(request_id, balances)
        fields = msgspec.structs.asdict(request)
        del fields["request_id"]
        if isinstance(request, wire.GetAccountTransfers):
            page = await history.get_account_transfers(
                msgspec.convert(fields, AccountTransfersFilter), tenant)
            if page is None:
                return wire.Error(request_id, "account_not_found",
                                  f"no account has the id {request.account_id}")
        else:
            page = await history.query_transfers(msgspec.convert(fields, TransfersQuery), tenant)
    except msgspec.ValidationError as exc:
        return wire.Error(request_id, "invalid_query", str(exc)[:300])
    except HistoryError as exc:
        return wire.Error(request_id, exc.code, exc.message)
    return wire.TransfersPageResult(request_id, page.data, page.next_cursor)


async def _stream_call(service: LedgerService, request: wire.StreamTransfers,
                       tenant: int) -> wire.Response:
    """A page of the change stream (processor.stream); ``invalid_query`` or
    ``invalid_cursor`` for that request alone."""
    if not hasattr(service, "stream_transfers"):
        raise Unavailable("this server keeps no change stream", retry_after_s=60)
    request_id = request.request_id
    if not (1 <= request.limit <= STREAM_LIMIT_MAX
            and 0 <= request.wait_s <= STREAM_WAIT_S_MAX):  # NaN fails both
        return wire.Error(request_id, "invalid_query", f"limit is 1 to {STREAM_LIMIT_MAX}, "
                                                       f"wait_s 0 to {STREAM_WAIT_S_MAX:g}")
    try:
        page = await cast(StreamService, service).stream_transfers(
            request.after, request.limit, request.wait_s, tenant)
    except HistoryError as exc:
        return wire.Error(request_id, exc.code, exc.message)
    return wire.TransfersStreamResult(request_id, page.data, bytes(page.shards),
                                      page.next_cursor)


def _require_count(results: Sized, requested: Sized) -> None:
    # One result per item is the service's contract; a short list would shift every answer.
    if len(results) != len(requested):
        raise RuntimeError(f"the service returned {len(results)} results for {len(requested)}")


async def _close(writer: asyncio.StreamWriter, flush_timeout_s: float) -> None:
    """Close after flushing what is written, for at most ``flush_timeout_s``; a client that
    does not read is then cut off (abort), or its connection would never end."""
    writer.close()
    deadline = asyncio.timeout(flush_timeout_s)
    try:
        async with deadline:
            # The peer may already have reset the connection; there is nothing left to
            # tell it.
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
    except TimeoutError:
        if not deadline.expired():
            raise
        writer.transport.abort()


def _closed(reason: str) -> None:
    metrics.EDGE_CONNECTIONS_CLOSED.labels("rpc", reason).inc()


async def start_rpc_server(
    service: LedgerService,
    key: bytes | Credentials,
    *,
    host: str,
    port: int,
    clock_s: Callable[[], float],
    in_flight_per_connection_max: int = 64,
    connections_max: int = CONNECTIONS_MAX_DEFAULT,
    connections_per_peer_max: int = CONNECTIONS_PER_PEER_MAX_DEFAULT,
    hello_timeout_s: float = HELLO_TIMEOUT_S_DEFAULT,
    hello_bytes_max: int = HELLO_BYTES_MAX_DEFAULT,
    idle_timeout_s: float = IDLE_TIMEOUT_S_DEFAULT,
    frame_timeout_s: float = FRAME_TIMEOUT_S_DEFAULT,
    write_timeout_s: float = WRITE_TIMEOUT_S_DEFAULT,
    token_grace_s: float = TOKEN_GRACE_S_DEFAULT,
    reserved_id_min: int = RESERVED_ID_MIN_DEFAULT,
    rate_limiter: RateLimiter | None = None,
    audit: AuditWriter | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """Listen on ``host:port`` (0 picks a free port) and serve ``service`` to token holders.

    Creating accounts or transfers with ids from ``reserved_id_min`` up is refused
    (``id_reserved``) to a token without the system scope (processor/reserved.py). A
    request beyond its principal's ``rate_limiter`` budget (one operation per item) is
    answered ``rate_limited`` and not applied.

    ``key`` verifies the HS256 tokens (processor.identity): one key, or a front's
    ``Credentials``, whose retired keys and revocations are checked on every request (a
    connection whose token they refuse is refused: ``token_invalid``, ``token_revoked``);
    ``clock_s`` returns seconds since the Unix epoch and decides token expiry. The limits
    are described in the module docstring and docs/security.md; times are in seconds, sizes
    in bytes. Raises ``ValueError`` for a non-positive limit or a ``hello_bytes_max`` outside
    ``wire.HELLO_BYTES_MAX`` to ``wire.FRAME_BYTES_MAX``, and ``OSError`` if the address
    cannot be bound.

    With ``ssl_context`` (actors.edge.tls.server_context) it speaks TLS only. A connection
    is handed to the code above once its handshake is done, so until then it holds none of
    the connection slots; the handshake must end within ``hello_timeout_s`` (the Hello's
    own deadline starts after it) and a closing connection's TLS shutdown within
    ``write_timeout_s``.
    """
    limits = {
        "in_flight_per_connection_max": in_flight_per_connection_max,
        "connections_max": connections_max,
        "connections_per_peer_max": connections_per_peer_max,
        "hello_timeout_s": hello_timeout_s,
        "idle_timeout_s": idle_timeout_s,
        "frame_timeout_s": frame_timeout_s,
        "write_timeout_s": write_timeout_s,
        "token_grace_s": token_grace_s,
    }
    for name, value in limits.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if not wire.HELLO_BYTES_MAX <= hello_bytes_max <= wire.FRAME_BYTES_MAX:
        raise ValueError(f"hello_bytes_max must be within {wire.HELLO_BYTES_MAX}.."
                         f"{wire.FRAME_BYTES_MAX}, got {hello_bytes_max}")
    server = _Server(
        service,
        key,
        clock_s=clock_s,
        in_flight_per_connection_max=in_flight_per_connection_max,
        connections_max=connections_max,
        connections_per_peer_max=connections_per_peer_max,
        hello_timeout_s=hello_timeout_s,
        hello_bytes_max=hello_bytes_max,
        idle_timeout_s=idle_timeout_s,
        frame_timeout_s=frame_timeout_s,
        write_timeout_s=write_timeout_s,
        token_grace_s=token_grace_s,
        reserved_id_min=reserved_id_min,
        rate_limiter=rate_limiter,
        audit=audit,
    )
    # asyncio refuses TLS timeouts without TLS; with it, they are never left to its defaults
    # (60 s and 30 s): a peer that connects and never completes a handshake is let go as
    # promptly as one that never sends Hello.
    tls: dict[str, Any] = {} if ssl_context is None else {
        "ssl": ssl_context, "ssl_handshake_timeout": hello_timeout_s,
        "ssl_shutdown_timeout": write_timeout_s}
    return await asyncio.start_server(server.handle, host=host, port=port,
                                      backlog=connections_max, **tls)


_ID_COLUMN = np.dtype("<i8")


def _touches_reserved(request: _Batch, reserved_min: int) -> bool:
    """Whether a create request names an id in the processor's own range."""
    if isinstance(request, wire.CreateAccounts):
        return accounts_reserved(request.items, reserved_min)
    if isinstance(request, wire.CreateTransfers):
        return transfers_reserved(request.items, reserved_min)
    if isinstance(request, wire.CreateTransferBatch):
        # A column of the wrong length is refused later, as an invalid batch.
        columns = [np.frombuffer(raw, dtype=_ID_COLUMN) for raw in (
            request.id, request.debit_account_id, request.credit_account_id,
            request.pending_id) if len(raw) % _ID_COLUMN.itemsize == 0]
        return columns_reserved(reserved_min, *columns)
    return False
