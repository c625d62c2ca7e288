"""Which ASGI framework serves the partner API's hot path fastest: Starlette or Litestar.

Each framework serves the same endpoint, ``POST /v1/transfers``: decode the JSON body into
the API's ``TransferRequest`` struct (strict msgspec) and answer 201 with a JSON transfer,
with no ledger behind it, so only the framework's own cost differs. Each runs under uvicorn
with uvloop and httptools in a process of its own; a closed-loop client holds a fixed
number of keep-alive connections for a fixed time and reports requests/s, p50/p99 latency
and the server's CPU per request.

    python -m bench.http_frameworks [--seconds 10] [--connections 32]

Litestar is optional (``pip install -e '.[bench]'``); without it only Starlette is run.
"""


import argparse
import asyncio
import socket
import subprocess
import sys
import time
from typing import Any

import msgspec
import psutil

from actors.edge.http_api import TransferRequest
from bench.ledger import _RawConnection, latency_summary_ms

__all__ = ["litestar_app", "main", "starlette_app"]

DECODER = msgspec.json.Decoder(TransferRequest, strict=True)
BODY = msgspec.json.encode({"id": 7, "debit_account_id": 1, "credit_account_id": 2,
                            "amount": 1250, "currency": "EUR"})
ANSWER = msgspec.json.encode({"id": 7, "debit_account_id": 1, "credit_account_id": 2,
                              "amount": 1250, "currency": "EUR", "flags": [],
                              "pending_id": 0, "timeout_s": 0, "code": 0, "user_data": "",
                              "timestamp": 1})


def starlette_app() -> Any:
    """Starlette as txproc uses it: a plain route, the body decoded with msgspec."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def create(request: Request) -> Response:
        DECODER.decode(await request.body())
        return Response(ANSWER, status_code=201, media_type="application/json")

    return Starlette(routes=[Route("/v1/transfers", create, methods=["POST"])])


def litestar_app() -> Any:
    """Litestar as its users write it: the body typed as the msgspec struct."""
    from litestar import Litestar, Response, post

    @post("/v1/transfers", status_code=201)
    async def create(data: TransferRequest) -> Response[bytes]:
        return Response(ANSWER, status_code=201, media_type="application/json")

    return Litestar([create], openapi_config=None, logging_config=None)


APPS = {"starlette": starlette_app, "litestar": litestar_app}


def _serve(name: str, port: int) -> None:
    import uvicorn

    uvicorn.run(APPS[name](), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="off")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_listening(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


async def _drive(port: int, seconds: float, connections: int) -> tuple[int, list[float]]:
    head = (f"POST /v1/transfers HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: ").encode()
    latencies_ms: list[float] = []
    statuses: dict[int, int] = {}
    stop_at = time.monotonic() + seconds

    async def one(conn: _RawConnection) -> None:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            status = await conn.post(BODY)
            latencies_ms.append((time.perf_counter() - t0) * 1000)
            statuses[status] = statuses.get(status, 0) + 1
        conn.close()

    await asyncio.gather(*[one(_RawConnection("127.0.0.1", port, head))
                           for _ in range(connections)])
    if set(statuses) != {201}:
        raise RuntimeError(f"unexpected answers: {statuses}")
    return len(latencies_ms), latencies_ms


def measure(name: str, seconds: float, connections: int) -> dict[str, float]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.http_frameworks", "--serve", name,
                               "--port", str(port)])
    try:
        asyncio.run(_wait_listening(port, 30))
        proc = psutil.Process(server.pid)
        asyncio.run(_drive(port, 1.0, connections))  # warm-up
        cpu0 = sum(proc.cpu_times()[:2])
        t0 = time.perf_counter()
        count, latencies_ms = asyncio.run(_drive(port, seconds, connections))
        elapsed_s = time.perf_counter() - t0
        cpu_s = sum(proc.cpu_times()[:2]) - cpu0
    finally:
        server.terminate()
        server.wait(timeout=30)
    summary = latency_summary_ms(sorted(latencies_ms))
    return {"requests_per_s": count / elapsed_s, "p50_ms": summary["p50"],
            "p99_ms": summary["p99"], "server_cpu_us_per_request": cpu_s / count * 1e6,
            "server_cores_busy": cpu_s / elapsed_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_frameworks")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--serve", choices=sorted(APPS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.port)
        return 0
    print(f"POST /v1/transfers, {args.connections} keep-alive connections, "
          f"{args.seconds:.0f} s each, uvicorn + uvloop + httptools")
    for name in APPS:
        try:
            APPS[name]()
        except ImportError:
            print(f"{name}: not installed (pip install -e '.[bench]')")
            continue
        r = measure(name, args.seconds, args.connections)
        print(f"{name:10} {r['requests_per_s']:8,.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
              f"p99 {r['p99_ms']:6.2f} ms  server CPU {r['server_cpu_us_per_request']:5.0f} "
              f"us/request  ({r['server_cores_busy']:.2f} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
