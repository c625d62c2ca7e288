"""A real HTTP receiver on 127.0.0.1 for webhook deliveries: it records every request and
answers 200, so tests can check what the outbox relay sent, to which path, with which
headers and body."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

__all__ = ["Delivery", "Receiver", "receiving"]

HEADER_LINES_MAX = 100


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Receiver:
    port: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == path]

    async def wait_for(self, path: str, count: int, *, timeout_s: float = 30.0
                       ) -> list[Delivery]:
        """The deliveries to ``path`` once there are at least ``count`` (or at the
        deadline, whatever arrived)."""
        deadline = time.monotonic() + timeout_s
        while len(self.at(path)) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.at(path)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while request_line := await reader.readline():
                headers: dict[str, str] = {}
                for _ in range(HEADER_LINES_MAX):
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.deliveries.append(Delivery(request_line.split()[1].decode(), headers, body))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    server = await asyncio.start_server(receiver.serve, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    try:
        yield receiver
    finally:
        server.close()
        # The relay keeps its connections open; wait_closed waits for them (3.12+).
        for writer in list(receiver.writers):
            writer.close()
        await asyncio.wait_for(server.wait_closed(), timeout=5)
