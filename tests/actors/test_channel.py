"""The data-plane channel (actors.channel) over real loopback sockets."""

from __future__ import annotations

import asyncio

import pytest

from actors.channel import ChannelBroken, ChannelClient, ChannelServer, RemoteError
from processor.errors import Overloaded

KEY = b"k" * 32


class Target:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.finished: list[int] = []

    async def echo(self, value: bytes, links: object = None) -> bytes:
        return value[::-1]

    async def slow(self, n: int) -> int:
        self.started.set()
        await self.release.wait()
        self.finished.append(n)
        return n

    async def full(self) -> None:
        raise Overloaded("queue full", retry_after_s=0.25)

    async def broken(self) -> None:
        raise KeyError("boom")

    async def hidden(self) -> int:
        return 1


async def _serve(target: Target, key: bytes = KEY) -> tuple[ChannelServer, tuple[str, int]]:
    server = ChannelServer(target, ("echo", "slow", "full", "broken"), key, name="test")
    return server, await server.start("127.0.0.1")


def _client(address: tuple[str, int], key: bytes = KEY) -> ChannelClient:
    async def resolve() -> tuple[str, int]:
        return address

    return ChannelClient(resolve, key, connect_timeout_s=2)


async def test_calls_answer_in_completion_order_over_one_connection() -> None:
    target = Target()
    server, address = await _serve(target)
    client = _client(address)
    try:
        assert await client.call("echo", b"abc", [{"t": "x"}]) == b"cba"
        slow = asyncio.ensure_future(client.call("slow", 7))
        await target.started.wait()
        # A later call is not held behind a slow one.
        assert await client.call("echo", b"xy") == b"yx"
        assert not slow.done()
        target.release.set()
        assert await slow == 7
    finally:
        client.close()
        server.close()


async def test_errors_come_back_as_the_callers_exceptions() -> None:
    server, address = await _serve(Target())
    client = _client(address)
    try:
        with pytest.raises(Overloaded) as caught:
            await client.call("full")
        assert caught.value.retry_after_s == 0.25
        assert caught.value.message == "queue full"
        with pytest.raises(RemoteError, match="KeyError"):
            await client.call("broken")
        # Only the methods named are served, however the target is made.
        with pytest.raises(RemoteError, match="no method 'hidden'"):
            await client.call("hidden")
        with pytest.raises(RemoteError, match="no method '__init__'"):
            await client.call("__init__")
        # The connection survives all of that.
        assert await client.call("echo", b"ok") == b"ko"
    finally:
        client.close()
        server.close()


async def test_a_wrong_key_is_refused() -> None:
    target = Target()
    server, address = await _serve(target)
    client = _client(address, key=b"x" * 32)
    try:
        with pytest.raises(ChannelBroken):
            await client.call("echo", b"abc")
    finally:
        client.close()
        server.close()


async def test_a_lost_connection_fails_the_waiting_calls_and_the_next_call_reconnects() -> None:
    target = Target()
    server, address = await _serve(target)
    addresses = [address]
    resolved: list[tuple[str, int]] = []

    async def resolve() -> tuple[str, int]:
        resolved.append(addresses[-1])
        return addresses[-1]

    client = ChannelClient(resolve, KEY, connect_timeout_s=2)
    try:
        waiting = asyncio.ensure_future(client.call("slow", 1))
        await target.started.wait()
        server.close()  # the callee going away, as a SIGKILLed shard's sockets do
        with pytest.raises(ChannelBroken):
            await waiting
        # A new incarnation on another port: the client asks where it is again.
        second = Target()
        server, address = await _serve(second)
        addresses.append(address)
        assert await client.call("echo", b"ab") == b"ba"
        assert resolved == [addresses[0], addresses[1]]
        # The call whose connection was lost still ran to its end on the old server.
        target.release.set()
        await asyncio.sleep(0.05)
        assert target.finished == [1]
    finally:
        client.close()
        server.close()


async def test_nothing_listening_is_a_broken_channel() -> None:
    server, address = await _serve(Target())
    server.close()
    await asyncio.sleep(0.05)
    client = _client(address)
    with pytest.raises(ChannelBroken):
        await client.call("echo", b"abc")


async def test_a_connect_deadline_bounds_the_wait_for_a_server_still_recovering() -> None:
    server, address = await _serve(Target())
    recovered = asyncio.Event()

    async def resolve() -> tuple[str, int]:
        await recovered.wait()  # a restarting shard answers its endpoint once recovered
        return address

    client = ChannelClient(resolve, KEY, connect_timeout_s=2)
    try:
        with pytest.raises(ChannelBroken, match="not connected within"):
            await client.connect(0.1)
        recovered.set()
        await client.connect(1.0)
        assert await client.call("echo", b"ab") == b"ba"
    finally:
        client.close()
        server.close()


async def test_a_bad_or_oversized_frame_closes_only_its_connection() -> None:
    """After the handshake, a frame that is not a call, or one over FRAME_BYTES_MAX, ends
    that connection (nothing is run); the server keeps serving others."""
    import hashlib
    import hmac
    import struct

    from actors.channel import FRAME_BYTES_MAX, NONCE_BYTES

    server, address = await _serve(Target())
    try:
        for frame in (struct.pack("<I", 3) + b"\xc1\xc1\xc1",
                      struct.pack("<I", FRAME_BYTES_MAX + 1)):
            reader, writer = await asyncio.open_connection(*address)
            nonce = await reader.readexactly(NONCE_BYTES)
            writer.write(hmac.new(KEY, nonce, hashlib.sha256).digest() + frame)
            assert await asyncio.wait_for(reader.read(), 2) == b""  # closed by the server
            writer.close()
        client = _client(address)
        assert await client.call("echo", b"still") == b"llits"
        client.close()
    finally:
        server.close()
