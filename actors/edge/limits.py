"""What keeps one client from holding the edge's connections, memory or time hostage.

A listener's resources are its connections; a client that opens many, or opens one and
then sends (or reads) a byte now and then, holds them as surely as a busy one. So each
connection gets deadlines for what it owes the server, and each peer address a share of
the connections. docs/security.md ("Edge limits") lists every limit with its default.

This module holds what both listeners use (``PeerConnections``, ``enable_tcp_keepalive``)
and the HTTP listener's limits (``HttpLimits``, ``http_server``). uvicorn has no deadline
for a request's headers or body: its keep-alive timer only runs between a response and the
next request's first byte, and httptools buffers a header of any size. So the server's
protocol is uvicorn's own httptools protocol with timers hooked into the parser callbacks
it already receives (``_GuardedHttpProtocol``). The RPC listener's deadlines live in its
read loop (actors/edge/rpc_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any, ClassVar

import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from actors.ops import metrics
from processor.errors import register

__all__ = [
    "TCP_KEEPALIVE_IDLE_S",
    "HttpLimits",
    "ListenError",
    "PeerConnections",
    "enable_tcp_keepalive",
    "http_listener",
    "http_server",
    "peer_host",
]

log = logging.getLogger(__name__)

# A peer that vanished without a FIN or RST (a cable pulled, a NAT entry dropped) is found
# by the kernel after TCP_KEEPALIVE_IDLE_S of silence plus 6 unanswered probes 10 s apart,
# instead of Linux's default of more than two hours.
TCP_KEEPALIVE_IDLE_S = 60
TCP_KEEPALIVE_INTERVAL_S = 10
TCP_KEEPALIVE_PROBES = 6

# Codes of the answers the listener gives before (or instead of) a request reaching the app.
register(408, {"request_timeout": "the request's headers or body did not arrive in time"})
register(431, {"headers_too_large": "the request line and headers exceed the server's limit"})


def _raw_answer(status: int, reason: str, code: str, message: str,
                extra_headers: bytes = b"") -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, with the API's JSON error body
    (``{"error": {"code", "message"}}``), written straight to the transport: these answers
    leave before (or instead of) a request reaching the app, so the app cannot write them."""
    body = msgspec.json.encode({"error": {"code": code, "message": message}})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n".encode() + extra_headers
            + b"connection: close\r\n\r\n" + body)


_REQUEST_TIMEOUT = _raw_answer(408, "Request Timeout", "request_timeout",
                               "the request's headers did not arrive in time")
_HEADERS_TOO_LARGE = _raw_answer(431, "Request Header Fields Too Large", "headers_too_large",
                                 "the request line and headers exceed the server's limit")
_PEER_FULL = _raw_answer(503, "Service Unavailable", "unavailable",
                         "too many connections from this address; retry after Retry-After",
                         b"retry-after: 1\r\n")
_BUSY_BODY = msgspec.json.encode({"error": {
    "code": "unavailable",
    "message": "the server is at its connection or request limit; retry after Retry-After"}})


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The answer past ``connections_max`` (in place of uvicorn's plain-text 503)."""
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_BUSY_BODY)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": _BUSY_BODY, "more_body": False})


class HttpLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The HTTP listener's limits (FrontConfig's ``http_*`` fields carry the same defaults).

    Raises ``ValueError`` naming the first limit that is not positive.
    """

    # The whole request line and headers must arrive within this of the connection opening
    # or of the previous response completing (a slowloris sends one header byte a second).
    header_timeout_s: float = 10.0
    # Bytes of request line and headers; httptools itself has no limit. A request is
    # refused (431) once more than this arrived without the headers ending; the count may
    # start one read late (at most 256 KiB) when the headers follow a pipelined body.
    header_bytes_max: int = 64 * 1024
    # The body must arrive within this of the headers ending.
    body_timeout_s: float = 30.0
    # An idle keep-alive connection is closed this long after its last response.
    keep_alive_timeout_s: float = 5.0
    # A peer that reads nothing while a response waits in the socket buffer is cut off.
    write_timeout_s: float = 30.0
    # Beyond this many connections (or running requests), uvicorn answers requests 503.
    connections_max: int = 1000
    # Connections from one peer address; the next one is answered 503 and closed at once.
    connections_per_peer_max: int = 256

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"HttpLimits.{name} must be positive, got {value}")


class PeerConnections:
    """Open connections per peer address, each address allowed ``per_peer_max``.

    Only addresses with a connection open are kept, so memory is bounded by the listener's
    own connection limit. Raises ``ValueError`` if ``per_peer_max`` is not positive.
    """

    def __init__(self, per_peer_max: int) -> None:
        if per_peer_max <= 0:
            raise ValueError(f"per_peer_max must be positive, got {per_peer_max}")
        self.per_peer_max = per_peer_max
        self._open: dict[str, int] = {}

    def count(self, peer: str) -> int:
        return self._open.get(peer, 0)

    def try_open(self, peer: str) -> bool:
        """Count one more connection of ``peer``; False (nothing counted) if it is at its cap."""
        count = self._open.get(peer, 0)
        if count >= self.per_peer_max:
            return False
        self._open[peer] = count + 1
        return True

    def close(self, peer: str) -> None:
        """Count one connection of ``peer`` fewer; it must have been opened."""
        count = self._open.get(peer, 0)
        if count <= 0:
            raise RuntimeError(f"a connection of {peer!r} closed that was never counted")
        if count == 1:
            del self._open[peer]
        else:
            self._open[peer] = count - 1

    @contextlib.contextmanager
    def slot(self, peer: str) -> Iterator[bool]:
        """Hold one of ``peer``'s connections for the block; yields False, holding nothing,
        if ``peer`` is at its cap."""
        admitted = self.try_open(peer)
        try:
            yield admitted
        finally:
            if admitted:
                self.close(peer)


def peer_host(peername: Any) -> str:
    """The address part of a socket's peer name (``(host, port, ...)``; "" when unknown)."""
    if isinstance(peername, tuple | list) and peername:
        return str(peername[0])
    return ""


def enable_tcp_keepalive(sock: Any) -> None:
    """Turn on TCP keepalive probes on an accepted socket (a ``socket.socket`` or the
    socket-like object uvloop hands out); nothing for a socket that is not TCP."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    # A connection reset before it was handled needs no keepalive (and has no socket left).
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # Linux names these; elsewhere the system's defaults apply.
        for option, value in (("TCP_KEEPIDLE", TCP_KEEPALIVE_IDLE_S),
                              ("TCP_KEEPINTVL", TCP_KEEPALIVE_INTERVAL_S),
                              ("TCP_KEEPCNT", TCP_KEEPALIVE_PROBES)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


_WAITING, _HEADERS, _BODY = "waiting", "headers", "body"


class _GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for headers, body and writes, a header
    size limit and a per-peer connection cap.

    Where a request is comes from the parser callbacks (``on_message_begin``,
    ``on_headers_complete``, ``on_message_complete``) that httptools calls on this object
    anyway, and from uvicorn's ``on_response_complete``; each override also runs uvicorn's
    own. ``http_server`` makes a subclass per server that carries its ``limits`` and
    ``peers``.

    The header timer runs while the connection waits for a request's headers and no
    response is being written; the body timer from the end of the headers to the end of
    the body; the write timer while the transport has paused writing.

    A client pipelining a request with a body behind a slow one may see its connection
    closed by the body deadline (uvicorn stops reading while the first is answered);
    clients do not pipeline requests with bodies (RFC 9112, section 9.3.2).
    """

    limits: ClassVar[HttpLimits]
    peers: ClassVar[PeerConnections]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _WAITING
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._peer: str | None = None  # set once the peer holds one of its slots
        # The connection and request cap is checked here (on_headers_complete), not by
        # uvicorn, so that its 503 carries the API's JSON error body.
        self._concurrency_max: int | None = self.limit_concurrency
        self.limit_concurrency = None

    # -- the connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        enable_tcp_keepalive(transport.get_extra_info("socket"))
        peer = self.client[0] if self.client else ""
        if not self.peers.try_open(peer):
            _closed("http", "peer_connections")
            log.info("http connection from %s refused: %d connections open", peer,
                     self.peers.count(peer))
            transport.write(_PEER_FULL)
            transport.close()
            return
        self._peer = peer
        # The first request's headers are due this long after the connection opened, so
        # a connection that sends nothing is closed too.
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._body_timer, self._write_timer):
            _cancel(timer)
        self._header_timer = self._body_timer = self._write_timer = None
        if self._peer is not None:
            self.peers.close(self._peer)
            self._peer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._peer is None:
            return  # refused in connection_made; closing
        # A read that began inside a body may end in the next request's headers; how much
        # of it is headers is unknown, so it is not counted (the limit may be passed by
        # one read). A read that began between requests or in headers is all headers.
        counted = self._phase != _BODY
        super().data_received(data)
        if self._phase != _HEADERS or self.transport.is_closing():
            return
        if counted:
            self._header_bytes += len(data)
        if self._header_bytes > self.limits.header_bytes_max:
            _closed("http", "header_too_large")
            self.transport.write(_HEADERS_TOO_LARGE)
            self.transport.close()

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEADERS
        self._header_bytes = 0
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        _cancel(self._header_timer)
        self._header_timer = None
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_late)
        cap = self._concurrency_max
        if cap is not None and (len(self.connections) >= cap or len(self.tasks) >= cap):
            # uvicorn's own check (switched off in __init__) answers in plain text; this
            # one answers as every other refusal does.
            _closed("http", "concurrency")
            app, self.app = self.app, _busy
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = _WAITING
        _cancel(self._body_timer)
        self._body_timer = None
        if self.cycle is not None and self.cycle.response_complete:
            # Answered before the body had arrived: the next request's deadline starts now.
            self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._phase != _BODY:
            self._arm_header_timer()

    # -- flow control -----------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout_s,
                                                     self._write_late)

    def resume_writing(self) -> None:
        super().resume_writing()
        _cancel(self._write_timer)
        self._write_timer = None

    # -- deadlines --------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        _cancel(self._header_timer)
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s,
                                                  self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._phase == _BODY:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The client waits for our answer; the deadline starts again when it is sent.
            return
        _closed("http", "header_timeout")
        if self._phase == _HEADERS:
            # Part of a request arrived: say why it will not be answered. A connection that
            # sent nothing is closed without a word, as an idle keep-alive one is.
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()

    def _body_late(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        _closed("http", "body_timeout")
        log.info("http connection from %s closed: body not received within %s s",
                 self._peer, self.limits.body_timeout_s)
        # The app, if it waits for the body, is told the client disconnected.
        self.transport.close()

    def _write_late(self) -> None:
        self._write_timer = None
        _closed("http", "write_timeout")
        log.info("http connection from %s aborted: response unread for %s s",
                 self._peer, self.limits.write_timeout_s)
        # close() would wait for the buffer to drain, which is what never happens.
        self.transport.abort()


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def _closed(listener: str, reason: str) -> None:
    metrics.EDGE_CONNECTIONS_CLOSED.labels(listener, reason).inc()


class ListenError(OSError):
    """A listener could not bind its address (a port taken, an address that is not this
    machine's): raised by the front's start, so its caller can tell it from the start's
    other failures (a database that does not answer is an ``OSError`` too)."""


def http_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 picks a free port) for
    ``uvicorn.Server.serve(sockets=...)``.

    uvicorn binds by itself only when given no socket, and then answers a bind failure
    (the port taken) by logging it and calling ``sys.exit``. Inside an actor that
    SystemExit ends the event loop's task without failing the call that waits for the
    listener, so a front whose port is taken never answered its start. Bound here, the
    failure is a ``ListenError`` the start raises and its caller reports.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ListenError(f"http {host}:{port}: {exc.strerror or exc}") from exc
    # Accepted connections inherit it on Linux. uvloop sets it on each connection anyway;
    # asyncio's own loop does not for a server made from a socket, and a small answer
    # would then wait on Nagle's algorithm for the client's delayed ACK.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


def http_server(app: Any, *, host: str, port: int, limits: HttpLimits,
                ssl_context: ssl.SSLContext | None = None) -> uvicorn.Server:
    """A uvicorn server for ``app`` on ``host:port`` (0 picks a free port) that enforces
    ``limits``, for the caller to ``serve()`` on its running loop.

    With ``ssl_context`` (actors.edge.tls.server_context) it serves HTTPS only. The TLS
    layer sits on the listening socket, under the protocol, so every limit above applies
    to the decrypted stream, from the end of the handshake on. The handshake itself has
    asyncio's 60 s (uvicorn passes no ``ssl_handshake_timeout``).
    """
    protocol = type("GuardedHttpProtocol", (_GuardedHttpProtocol,),
                    {"limits": limits, "peers": PeerConnections(limits.connections_per_peer_max)})
    # The context as built, rather than uvicorn's own from file names, so that both
    # listeners share one; uvicorn calls the factory once, when the config is loaded.
    context_factory = None if ssl_context is None else (lambda _config, _default: ssl_context)
    return uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, loop="none", lifespan="off", log_level="warning",
        access_log=False,
        http=protocol,
        ssl_context_factory=context_factory,
        # The API has no websockets; an upgrade request is answered as plain HTTP.
        ws="none",
        # uvicorn declares an int but only hands it to loop.call_later.
        timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore[arg-type]
        limit_concurrency=limits.connections_max,
    ))
