"""Locust users for txproc: partners over HTTP, gateways over the batched RPC, a hot account,
and the original ledger holds. What each sends is in ``loadtests/workload.py`` (pure);
this file wires it to Locust. Pick the users by class name on the command line:

=================  ==================================================================
AuthorizingClient  HTTP holds (``pending`` transfers), then capture or void; Locust
                   names ``authorize``, ``capture``, ``void``
PartnerUser        HTTP: ``transfer`` (POST /v1/transfers), ``authorize``
                   (POST /v1/payments), ``capture``, ``refund``, weighted by
                   TXPROC_PARTNER_MIX; every payments POST has its own Idempotency-Key
GatewayUser        batched ``create_transfers`` over the binary RPC (processor.client),
                   TXPROC_BATCH_SIZE transfers per call: one Locust request
                   ``rpc``/``create_transfers batch`` per call and one ``rpc``/``transfer``
                   per transfer, failed with its ledger result code unless ok or exists
HotAccountUser     HTTP transfers, TXPROC_HOT_SHARE of them (half) to or from one hot
                   account (``transfer hot``), the rest between customers (``transfer``)
=================  ==================================================================

Before the load starts (Locust's ``test_start`` event) the accounts are created through
``POST /v1/accounts/batch`` and funded from an operator account, unless TXPROC_SKIP_SETUP=1
(``loadtests/run.py`` does it itself, before it starts measuring); both are idempotent.

Bounds: run with ``--run-time``; TXPROC_MAX_REQUESTS (per Locust process) stops the run
once that many requests (HTTP requests or RPC calls) were sent. With TXPROC_RECORD_DIR set,
every request is also written to ``<dir>/requests-<pid>.csv`` (start time, latency, result
code, count), which ``loadtests/run.py`` turns into its summary.

Environment: see loadtests/README.md. Run headless so it stops by itself::

    TXPROC_TOKEN=... locust -f loadtests/locustfile.py --headless -u 50 -r 50 \\
        --run-time 20s --host http://127.0.0.1:8080 --csv /tmp/txproc PartnerUser
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import gevent
import gevent.event
import gevent.monkey
from locust import FastHttpUser, User, constant, constant_throughput, events, task
from locust.exception import StopUser
from locust.runners import WorkerRunner

from loadtests.workload import (
    AuthorizationFlow,
    Budget,
    HotAccountFlow,
    HttpCall,
    KeySource,
    PartnerFlow,
    Request,
    Settings,
    error_code,
    funding_id,
    gateway_batch,
    load_ids,
    post_setup_batch,
    scenario_setup_requests,
    setup_requests,
)

__all__ = [
    "AuthorizationFlow",
    "AuthorizingClient",
    "GatewayUser",
    "HotAccountUser",
    "PartnerUser",
    "Request",
    "Settings",
    "funding_id",
    "setup_requests",
]

log = logging.getLogger("txproc.locust")

_T = TypeVar("_T")
_IDS = load_ids()
_KEYS = KeySource()
_BUDGET = Budget(max(0, int(os.environ.get("TXPROC_MAX_REQUESTS", "0") or 0)))
BUDGET_MARKER = "budget-exhausted"
RPC_TIMEOUT_S = 30.0


# -- recording ----------------------------------------------------------------------------


class Recorder:
    """Appends one CSV line per request (or per result code of an RPC batch) to
    ``<TXPROC_RECORD_DIR>/requests-<pid>.csv``: start time (Unix seconds), kind (``http``,
    ``batch`` or ``item``), name, latency in ms, ok (1/0), code, count. Does nothing when
    TXPROC_RECORD_DIR is unset."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory) if directory else None
        self._file: IO[str] | None = None

    def write(self, start_s: float, kind: str, name: str, latency_ms: float, ok: bool,
              code: str, count: int = 1) -> None:
        if self.directory is None:
            return
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = (self.directory / f"requests-{os.getpid()}.csv").open(
                "a", buffering=1 << 16)
        code = code.replace(",", ";").replace("\n", " ")
        self._file.write(f"{start_s:.6f},{kind},{name},{latency_ms:.3f},{int(ok)},{code},"
                         f"{count}\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def mark(self, name: str) -> None:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / name).write_text(f"{os.getpid()}\n")


RECORDER = Recorder(os.environ.get("TXPROC_RECORD_DIR", ""))
atexit.register(RECORDER.flush)


def _take_or_stop(user: User) -> None:
    """Take one request from the budget, or stop this user and the run (raises StopUser)."""
    if _BUDGET.take():
        return
    _stop_run(user.environment)
    raise StopUser()


_stopping = False


def _stop_run(environment: Any) -> None:
    global _stopping
    if _stopping:
        return
    _stopping = True
    log.warning("txproc: TXPROC_MAX_REQUESTS=%d reached, stopping", _BUDGET.limit)
    RECORDER.mark(BUDGET_MARKER)
    runner = getattr(environment, "runner", None)
    if runner is not None:
        gevent.spawn(runner.quit)


@events.test_stop.add_listener
def _flush_records(**_kwargs: object) -> None:
    RECORDER.flush()


@events.quitting.add_listener
def _flush_records_on_quit(**_kwargs: object) -> None:
    RECORDER.flush()


# -- HTTP users ---------------------------------------------------------------------------


def _wait_time() -> Any:
    rps = float(os.environ.get("TXPROC_USER_RPS", "0") or 0)
    return constant_throughput(rps) if rps > 0 else constant(0)


def _answer_code(status: int, text: str | None, body: Any, *, ok: bool) -> str:
    """A success's code is the payment's status, or ``created`` (201) / ``exists`` (200)
    for a transfer; a failure's is the JSON error code."""
    if not ok:
        return error_code(status, text)
    if isinstance(body, dict) and isinstance(body.get("status"), str):
        return str(body["status"])
    return "created" if status == 201 else "exists" if status == 200 else f"http_{status}"


class _TxprocHttpUser(FastHttpUser):
    abstract = True
    wait_time = _wait_time()

    def on_start(self) -> None:
        self.settings = Settings.from_env(os.environ)
        self.rng = random.Random()
        self.headers = {"Authorization": f"Bearer {self.settings.token}",
                        "Content-Type": "application/json"}

    def post(self, name: str, path: str, body: bytes,
             idempotency_key: str | None = None) -> tuple[int, Any]:
        """POST ``body``, report it to Locust under ``name`` and to the recorder; returns
        the HTTP status (0 without an answer) and the decoded JSON body (None if none)."""
        _take_or_stop(self)
        headers = self.headers
        if idempotency_key is not None:
            headers = {**headers, "Idempotency-Key": idempotency_key}
        start_s = time.time()
        started = time.perf_counter()
        with self.client.post(path, data=body, headers=headers, name=name,
                              catch_response=True) as response:
            latency_ms = (time.perf_counter() - started) * 1000
            status = response.status_code or 0
            text = response.text if status else None
            try:
                body = json.loads(text) if text else None
            except ValueError:
                body = None
            ok = 200 <= status < 300
            code = _answer_code(status, text, body, ok=ok)
            if status == 0 and response.error is not None:
                code = f"no_answer:{type(response.error).__name__}"
            if ok:
                response.success()
            else:
                response.failure(f"{status} {code}")
        RECORDER.write(start_s, "http", name, latency_ms, ok, code)
        return status, body


class AuthorizingClient(_TxprocHttpUser):
    """One payment gateway connection placing and settling ledger holds (scenario holds)."""

    def on_start(self) -> None:
        super().on_start()
        self.flow = AuthorizationFlow(self.settings, self.rng, _IDS)

    @task
    def step(self) -> None:
        request = self.flow.next_request()
        status, _ = self.post(request.name, "/v1/transfers", request.body)
        self.flow.answered(request, status in (200, 201))


class PartnerUser(_TxprocHttpUser):
    """A partner over HTTP: transfers, payment authorizations, captures and refunds."""

    def on_start(self) -> None:
        super().on_start()
        self.flow = PartnerFlow(self.settings, self.rng, _IDS, _KEYS)

    @task
    def step(self) -> None:
        call: HttpCall = self.flow.next_call()
        status, body = self.post(call.name, call.path, call.body, call.idempotency_key)
        self.flow.answered(call, status, body)


class HotAccountUser(_TxprocHttpUser):
    """HTTP transfers, half of them to or from one hot account."""

    def on_start(self) -> None:
        super().on_start()
        self.flow = HotAccountFlow(self.settings, self.rng, _IDS)

    @task
    def step(self) -> None:
        call = self.flow.next_call()
        self.post(call.name, call.path, call.body)


# -- the RPC gateway: an asyncio client on a native thread --------------------------------


class _AsyncioThread:
    """One asyncio event loop per Locust process, on a native thread.

    Locust runs on gevent and has monkey-patched ``threading``, ``selectors`` and the locks,
    while ``processor.client.Client`` is asyncio. The loop therefore runs on a thread started
    with the original ``_thread.start_new_thread`` and the original epoll selector, and
    results come back to the waiting greenlet through ``hub.loop.run_callback_threadsafe``:
    no gevent object is touched from the loop's thread and no patched lock is shared between
    the two (``asyncio.run_coroutine_threadsafe`` would wait on a patched Condition), so a
    greenlet waiting for an RPC answer never blocks the others.
    """

    def __init__(self) -> None:
        selector_class = gevent.monkey.get_original("selectors", "DefaultSelector")
        start_new_thread = gevent.monkey.get_original("_thread", "start_new_thread")
        self.loop = asyncio.SelectorEventLoop(selector_class())
        self._hub = gevent.get_hub()
        start_new_thread(self._run, ())

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, make: Callable[[], Coroutine[Any, Any, _T]], timeout_s: float) -> _T:
        """Run ``make()`` on the loop; the calling greenlet waits (cooperatively) at most
        ``timeout_s`` and the coroutine is cancelled if it has not finished by then."""
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        tasks: list[asyncio.Task[_T]] = []

        def settle(task: asyncio.Task[_T]) -> None:  # on the gevent hub
            if task.cancelled():
                result.set_exception(TimeoutError("cancelled"))
            elif (exc := task.exception()) is not None:
                result.set_exception(exc)
            else:
                result.set(task.result())

        def start() -> None:  # on the asyncio thread
            task = self.loop.create_task(make())
            tasks.append(task)
            task.add_done_callback(
                lambda t: self._hub.loop.run_callback_threadsafe(settle, t))

        self.loop.call_soon_threadsafe(start)
        try:
            return result.get(timeout=timeout_s)
        except gevent.Timeout:
            self.loop.call_soon_threadsafe(lambda: [t.cancel() for t in tasks])
            raise TimeoutError(f"no answer within {timeout_s} s") from None


_LOOP: _AsyncioThread | None = None


def _loop() -> _AsyncioThread:
    global _LOOP
    if _LOOP is None:
        _LOOP = _AsyncioThread()
    return _LOOP


def _rpc_address(text: str) -> tuple[str, int]:
    """``host:port`` as (numeric address, port): resolved here, on gevent, because the
    asyncio thread must not call getaddrinfo (its executor threads would be greenlets)."""
    if not text:
        raise ValueError("GatewayUser needs TXPROC_RPC_ADDRESS=host:port (the RPC listener)")
    parts = urlsplit(f"//{text}")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"TXPROC_RPC_ADDRESS is not host:port: {text!r}")
    return socket.gethostbyname(parts.hostname), parts.port


class GatewayUser(User):
    """A card gateway sending batches of transfers over the binary RPC (one connection)."""

    wait_time = _wait_time()

    def on_start(self) -> None:
        from processor.client import Client

        self.settings = Settings.from_env(os.environ)
        self.rng = random.Random()
        host, port = _rpc_address(self.settings.rpc_address)
        token = self.settings.token

        async def connect() -> Client:
            client = Client(host, port, token, timeout_s=RPC_TIMEOUT_S)
            await client.connect()
            return client

        self.rpc = _loop().call(connect, RPC_TIMEOUT_S + 5)

    def on_stop(self) -> None:
        rpc = getattr(self, "rpc", None)
        if rpc is not None:
            with contextlib.suppress(Exception):
                _loop().call(rpc.close, 5)

    @task
    def batch(self) -> None:
        from processor.types import Transfer

        _take_or_stop(self)
        transfers = [Transfer(**t) for t in gateway_batch(self.settings, self.rng, _IDS)]
        start_s = time.time()
        started = time.perf_counter()
        exception: Exception | None = None
        codes: list[str] = []
        try:
            results = _loop().call(lambda: self.rpc.create_transfers(transfers),
                                   RPC_TIMEOUT_S + 5)
            codes = [r.name for r in results]
        except Exception as exc:  # Overloaded, Unavailable, ClientError, TimeoutError
            exception = exc
        latency_ms = (time.perf_counter() - started) * 1000
        fire = self.environment.events.request.fire
        batch_code = "ok" if exception is None else _rpc_error_code(exception)
        fire(request_type="rpc", name="create_transfers batch", response_time=latency_ms,
             response_length=len(transfers), exception=exception, context={},
             start_time=start_s, url=None, response=None)
        RECORDER.write(start_s, "batch", "create_transfers batch", latency_ms,
                       exception is None, batch_code)
        if exception is not None:
            codes = [batch_code] * len(transfers)
        for code in codes:
            failed = None if code in ("ok", "exists") else RpcItemError(code)
            fire(request_type="rpc", name="transfer", response_time=latency_ms,
                 response_length=0, exception=failed, context={}, start_time=start_s,
                 url=None, response=None)
        for code, count in collections.Counter(codes).items():
            RECORDER.write(start_s, "item", "transfer", latency_ms, code in ("ok", "exists"),
                           code, count)


class RpcItemError(Exception):
    """A transfer of a batch the ledger did not create; the message is its result code."""


def _rpc_error_code(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"error:{type(exc).__name__}"


# -- setup --------------------------------------------------------------------------------


@events.test_start.add_listener
def _create_accounts(environment: Any, **_kwargs: object) -> None:
    """Create and fund the accounts once, before any user starts (not on workers)."""
    runner = getattr(environment, "runner", None)
    if isinstance(runner, WorkerRunner) or os.environ.get("TXPROC_SKIP_SETUP") == "1":
        return
    host = getattr(environment, "host", None)
    try:
        if not host:
            raise ValueError("--host is required (the txproc HTTP address)")
        settings = Settings.from_env(os.environ)
        for path, body in scenario_setup_requests(settings):
            post_setup_batch(host.rstrip("/") + path, settings.token, body)
    except Exception as exc:
        log.error("txproc setup failed, stopping: %s", exc)
        if runner is not None:
            runner.environment.process_exit_code = 2
            runner.quit()
        raise
    log.info("txproc: %d accounts ready (operator %d)", settings.accounts, settings.operator_id)
