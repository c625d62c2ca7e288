"""Direct calls between txproc's own actors: framed, authenticated, multiplexed TCP.

A Ray actor call costs about a millisecond of CPU on each side and as much again in
latency, however little it carries. A single HTTP transfer used to cross four of them
(front to shard, the reserve and the settle on the peer shard, the answer), which set its
latency and most of its CPU. The ledger's data plane, the calls that carry transfers from
the front to a shard and between shards, now goes over this channel instead; Ray stays the
control plane: it places and restarts the actors, answers ``ready`` and ``stats``, and
tells a caller where a shard's channel listens (``LedgerShard.endpoint``), anew after every
restart.

Wire: after the handshake, frames of a little-endian u32 length and a msgpack body. A call
is ``[call_id, method, args]``; its answer ``[call_id, status, payload]`` with status
``OK`` (payload: the method's return value), ``LEDGER_ERROR`` (``[code, message,
retry_after_s]``, rebuilt as the same ``processor.errors`` class) or ``FAILED`` (a
description). Calls on one connection run concurrently on the server and are answered in
completion order; frames are written whole, in order.

Handshake: the server sends a random 16-byte nonce; the client answers with
HMAC-SHA256(key, nonce). The key is made by the runtime when it starts the processor and
given to the front and the shards only, so a process that can reach the port but is not
one of them cannot call a shard. A wrong answer closes the connection.

Failure: when a connection ends, every call waiting on it fails with ``ChannelBroken``.
Whether the callee ran such a call is unknown, exactly as when a Ray actor dies during a
call; callers handle both the same way (the front retries, ids being idempotent; a shard
whose reserve call failed restarts). The next call connects again, asking for the endpoint
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import msgspec

from processor.errors import LedgerError, Overloaded, Unavailable

__all__ = ["ChannelBroken", "ChannelClient", "ChannelServer", "RemoteError"]

log = logging.getLogger("txproc.channel")

FRAME = struct.Struct("<I")
# A batch of 8,189 transfers as objects is about a megabyte; far above it is a bug.
FRAME_BYTES_MAX = 64 * 1024 * 1024
NONCE_BYTES = 16
HANDSHAKE_TIMEOUT_S = 5.0
OK, LEDGER_ERROR, FAILED = 0, 1, 2

_ENCODER = msgspec.msgpack.Encoder()
_CALL = msgspec.msgpack.Decoder(tuple[int, str, list[Any]])
_ANSWER = msgspec.msgpack.Decoder(tuple[int, int, Any])
_LEDGER_ERRORS: dict[str, type[LedgerError]] = {
    cls.code: cls for cls in (LedgerError, Overloaded, Unavailable)
}


class ChannelBroken(ConnectionError):
    """The connection ended (or could not be made) with the call unanswered: whether the
    callee ran it is unknown."""


class RemoteError(RuntimeError):
    """The called method raised something other than a ``LedgerError``."""


def _digest(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, nonce, hashlib.sha256).digest()


def _frame(body: bytes) -> bytes:
    return FRAME.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    if length > FRAME_BYTES_MAX:
        raise ValueError(f"frame of {length} bytes is over the limit")
    return await reader.readexactly(length)


class ChannelServer:
    """Serves ``methods`` of ``target`` (async methods) to clients holding ``key``."""

    def __init__(self, target: object, methods: Collection[str], key: bytes,
                 *, name: str) -> None:
        if not key:
            raise ValueError("a channel needs a key")
        self._methods = {m: getattr(target, m) for m in methods}
        self._key = key
        self._name = name
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int = 0) -> tuple[str, int]:
        """Listen on ``host`` (port 0: any free one); returns the address bound."""
        self._server = await asyncio.start_server(self._serve, host, port)
        bound = self._server.sockets[0].getsockname()
        return host, int(bound[1])

    def close(self) -> None:
        """Stop accepting and close every connection (their callers see ChannelBroken)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            nonce = os.urandom(NONCE_BYTES)
            writer.write(nonce)
            answer = await asyncio.wait_for(reader.readexactly(32), HANDSHAKE_TIMEOUT_S)
            if not hmac.compare_digest(answer, _digest(self._key, nonce)):
                log.warning("%s channel: a peer failed the handshake; closed", self._name)
                return
            while True:
                call_id, method, args = _CALL.decode(await _read_frame(reader))
                task = asyncio.get_running_loop().create_task(
                    self._run(writer, call_id, method, args))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the peer went away (or never finished the handshake)
        except (ValueError, RecursionError, msgspec.DecodeError) as exc:
            log.warning("%s channel: bad frame (%s); connection closed", self._name, exc)
        finally:
            # Calls already running finish (a transfer being committed is not abandoned
            # because its caller left); their answers are dropped.
            self._writers.discard(writer)
            writer.close()

    async def _run(self, writer: asyncio.StreamWriter, call_id: int, method: str,
                   args: list[Any]) -> None:
        try:
            function = self._methods.get(method)
            if function is None:
                raise RemoteError(f"no method {method!r} on this channel")
            answer: tuple[int, int, Any] = (call_id, OK, await function(*args))
        except LedgerError as exc:
            answer = (call_id, LEDGER_ERROR, [exc.code, exc.message, exc.retry_after_s])
        except Exception as exc:  # noqa: BLE001 - every failure is logged or answered, never lost
            answer = (call_id, FAILED, f"{type(exc).__name__}: {exc}")
        if writer.is_closing():
            return
        writer.write(_frame(_ENCODER.encode(answer)))
        with contextlib.suppress(ConnectionError):
            await writer.drain()


class _Connection:
    """One authenticated connection and the calls waiting on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self.closed = False
        self._reading = asyncio.get_running_loop().create_task(self._read(reader))

    async def call(self, method: str, args: tuple[Any, ...]) -> Any:
        if self.closed:
            raise ChannelBroken("connection closed")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        try:
            self._writer.write(_frame(_ENCODER.encode((call_id, method, args))))
            await self._writer.drain()
            return await future
        except ConnectionError as exc:
            self._end()
            raise ChannelBroken(str(exc)) from exc
        finally:
            self._waiting.pop(call_id, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                call_id, status, payload = _ANSWER.decode(await _read_frame(reader))
                future = self._waiting.pop(call_id, None)
                if future is None or future.done():
                    continue  # its caller gave up (a timeout) before the answer came
                if status == OK:
                    future.set_result(payload)
                elif status == LEDGER_ERROR:
                    code, message, retry_after_s = payload
                    cls = _LEDGER_ERRORS.get(code, LedgerError)
                    future.set_exception(cls(message, retry_after_s=retry_after_s))
                else:
                    future.set_exception(RemoteError(str(payload)))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, RecursionError,
                msgspec.DecodeError):
            pass
        finally:
            self._end()

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._writer.close()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelBroken("connection lost during the call"))
        self._waiting.clear()

    def close(self) -> None:
        self._reading.cancel()
        self._end()


class ChannelClient:
    """Calls one server; connects on first use and again after the connection ends.

    ``resolve`` answers where the server listens (for a shard, a Ray call to its
    ``endpoint``, which waits for the shard to be ready).
    """

    def __init__(self, resolve: Callable[[], Awaitable[tuple[str, int]]], key: bytes,
                 *, connect_timeout_s: float = 10.0) -> None:
        self._resolve = resolve
        self._key = key
        self._connect_timeout_s = connect_timeout_s
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    async def call(self, method: str, *args: Any) -> Any:
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        return await connection.call(method, args)

    async def connect(self, timeout_s: float) -> None:
        """Be connected within ``timeout_s`` or raise ChannelBroken: a caller with a
        deadline bounds the wait for a restarting server (whose endpoint answers only once
        it has recovered) without bounding the calls themselves."""
        connection = self._connection
        if connection is not None and not connection.closed:
            return
        try:
            await asyncio.wait_for(self._connect(), timeout_s)
        except TimeoutError as exc:
            raise ChannelBroken(f"not connected within {timeout_s:.1f} s") from exc

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def _connect(self) -> _Connection:
        # Concurrent callers share one attempt; a failed attempt fails them all, and the
        # next call makes a new one.
        task = self._connecting
        if task is None:
            task = self._connecting = asyncio.get_running_loop().create_task(self._open())
        try:
            connection = await asyncio.shield(task)
        finally:
            if self._connecting is task and task.done():
                self._connecting = None
        self._connection = connection
        return connection

    async def _open(self) -> _Connection:
        host, port = await self._resolve()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self._connect_timeout_s)
            nonce = await asyncio.wait_for(reader.readexactly(NONCE_BYTES),
                                           self._connect_timeout_s)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise ChannelBroken(f"cannot connect to {host}:{port}: {exc!r}") from exc
        writer.write(_digest(self._key, nonce))
        return _Connection(reader, writer)
