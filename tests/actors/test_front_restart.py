"""The front actor dies: Ray restarts it, and the processor starts it on the same ports."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import httpx
import pytest

from actors.app.runtime import Processor
from processor.client import Client
from processor.codes import AccountResult
from processor.types import Account
from tests.running import IdSource, token_for


async def test_sigkilled_front_comes_back_on_the_same_ports(
    processor: Processor, ids: IdSource
) -> None:
    """After SIGKILL of ray::Front, HTTP and RPC answer again on the ports gateways know."""
    supervisor = asyncio.create_task(processor.supervise(interval_s=0.2))
    try:
        before = await processor.front.pid.remote()
        os.kill(before, signal.SIGKILL)
        base = f"http://127.0.0.1:{processor.http_port}"
        ready = False
        async with httpx.AsyncClient(base_url=base) as http:
            for _ in range(240):
                try:
                    if (await http.get("/readyz", timeout=2)).status_code == 200:
                        ready = True
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.25)
        assert ready, "the front never came back"
        assert await processor.front.pid.remote() != before
        async with Client("127.0.0.1", processor.rpc_port, token_for(processor)) as client:
            account = ids.one()
            assert await client.create_accounts([Account(id=account, currency="EUR")]) == [
                AccountResult.ok]
            found = await client.lookup_accounts([account])
            assert found[0] is not None and found[0].id == account
    finally:
        supervisor.cancel()


async def test_a_front_whose_http_port_is_taken_fails_its_start(processor: Processor) -> None:
    """A taken HTTP port fails the front's start with the bind error. uvicorn, left to bind
    by itself, calls sys.exit, which ended the actor's task and left the start unanswered:
    `txproc serve` then waited forever for a front that would never listen."""
    import ray

    from tests.running import extra_front

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ray.exceptions.RayTaskError) as raised:
            async with asyncio.timeout(60):
                async with extra_front(processor, http_port=port):
                    pass
    assert "address already in use" in str(raised.value).lower()
