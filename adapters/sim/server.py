"""The HTTP host every simulated provider runs in: fault gate, admin API, serving, shutdown.

A provider module subclasses ``SimProvider`` and supplies its wire format: routes, how it
authenticates, how it words an outage, a throttle or an error, how it renders events and
settlement reports. This class supplies the rest: the order in which faults strike a call,
idempotent execution, asynchronous settlement, webhook dispatch, the admin API under
``/_sim`` and a uvicorn server that prints ``listening on http://HOST:PORT`` once it accepts
connections.

Order of faults for a provider API call: outage, burst of 503 and rate limit (the front
door, before authentication); then authentication; for an operation, validation and the
claim of its idempotency key (so from here on a status query says "in progress", never
"never received"); latency; an injected 5xx (nothing happened, the key is released); a hang;
the operation; and last a lost response (it took effect, then the connection is aborted
without an answer).
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import collections
import contextlib
import hmac
import logging
import os
import random
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import uvicorn
import uvloop
from msgspec import Meta
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from adapters.base import Operation
from adapters.sim.core import (
    Book,
    Dispute,
    IdempotencyStore,
    KeyState,
    Op,
    Refusal,
    Refused,
    ReportWriter,
    Stored,
    fingerprint,
    load_secrets,
)
from adapters.sim.faults import FAULTS_DECODER, FaultModel, Faults
from adapters.sim.settlement import DISCREPANCIES_DECODER, Batch, Discrepancies, Entry, batches_of
from adapters.sim.webhooks import WebhookDispatcher
from processor.client import client_tls_context
from processor.types import AMOUNT_MAX

__all__ = ["OPS_MAX", "Answer", "SimOptions", "SimProvider", "parse_args", "run_main"]

log = logging.getLogger(__name__)

RAW_SEND = "txproc.sim.raw_send"  # scope key: the server's own ``send``, to abort a connection
BODY_BYTES_MAX = 64 * 1024
OPS_MAX = 1_000_000
KEYS_MAX = 1_000_000
IDEMPOTENCY_KEY_CHARS_MAX = 255
SETTLEMENTS_PENDING_MAX = 100_000
# Operations whose serving time is kept for GET /_sim/charges (the oldest go first).
SERVED_MAX = 100_000
REBIND_ATTEMPTS_MAX = 100  # 10 s of trying to listen again after a refusing outage
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Answer:
    """What an operation answered; stored for its idempotency key when ``store`` is set."""

    status: int
    body: bytes
    op_id: str = ""
    store: bool = True
    media_type: str = JSON


@dataclass(frozen=True, slots=True)
class SimOptions:
    webhook_url: str = ""
    report_dir: Path | None = None
    seed: int | None = None
    settle_delay_ms: float = 1_000.0
    webhook_attempts_max: int = 5
    webhook_backoff_s: float = 0.5
    webhook_batch_max: int = 1  # events queued together go in one request, up to this many
    webhook_batch_linger_s: float = 0.0  # and a batch waits this long for more after its first
    # Webhooks to an https URL: the receiver's CA (PEM; the system's store when empty)
    # and, for a receiver requiring mutual TLS, a client certificate and key.
    webhook_ca: str = ""
    webhook_cert: str = ""
    webhook_key: str = ""


@dataclass(slots=True)
class _Counts:
    operations: int = 0
    replays: int = 0
    idempotency_conflicts: int = 0
    status_queries: int = 0
    tokens: int = 0


def _webhook_tls(options: SimOptions) -> ssl.SSLContext | None:
    """The client context for webhooks sent over TLS with a CA or certificate of their own."""
    if not (options.webhook_ca or options.webhook_cert):
        return None
    return client_tls_context(options.webhook_ca, options.webhook_cert, options.webhook_key)


class _KeepSend:
    """Outermost ASGI layer: remembers the server's ``send`` so a lost response can abort the
    connection itself (uvicorn's ``send`` is a method of the request cycle that owns the
    transport)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND] = send
        await self.app(scope, receive, send)


class SimProvider(abc.ABC):
    """A simulated provider: its state, its fault gate and its HTTP app."""

    name: str

    def __init__(self, secrets: dict[str, str], options: SimOptions, *,
                 clock_s: Callable[[], float] = time.time,
                 monotonic_s: Callable[[], float] = time.monotonic) -> None:
        self.secrets = secrets
        self.options = options
        self.clock_s = clock_s
        self.rng = random.Random(options.seed)
        self.faults = FaultModel(rng=self.rng, monotonic_s=monotonic_s)
        self.store = IdempotencyStore(keys_max=KEYS_MAX)
        self.book = self.make_book()
        self.webhooks = WebhookDispatcher(
            url=options.webhook_url, sign=self.sign_webhook, faults=self.faults,
            clock_s=clock_s, attempts_max=options.webhook_attempts_max,
            backoff_s=options.webhook_backoff_s, tls=_webhook_tls(options),
            batch_max=options.webhook_batch_max, batch_body=self.batch_webhook_body,
            batch_linger_s=options.webhook_batch_linger_s)
        self.reports = ReportWriter(options.report_dir, self.report, self.report_file_name)
        self.discrepancies = Discrepancies(currencies=self.book.currencies, clock_s=clock_s)
        self.counts = _Counts()
        self._monotonic_s = monotonic_s
        # Milliseconds from an operation's start (its key claimed) to its answer, latency
        # injected included: what a caller's measured time owes the provider, so that a
        # benchmark can say what the caller itself added (bench.authorization).
        self.served_ms: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._settlements: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._server: uvicorn.Server | None = None
        self._bound: tuple[str, int] = ("", 0)
        self._refuse_task: asyncio.Task[None] | None = None
        self.app = _KeepSend(Starlette(routes=[*self.routes(), *self._admin_routes()],
                                       max_body_size=BODY_BYTES_MAX))

    # --- what a provider supplies -------------------------------------------------------------

    @abc.abstractmethod
    def make_book(self) -> Book: ...

    @abc.abstractmethod
    def routes(self) -> Sequence[BaseRoute]: ...

    @abc.abstractmethod
    def authenticate(self, request: Request, body: bytes) -> Response | None:
        """None if the call carries valid credentials, else the provider's refusal."""

    @abc.abstractmethod
    def unavailable(self, retry_after_s: float) -> Response: ...

    @abc.abstractmethod
    def throttled(self, retry_after_s: float) -> Response: ...

    @abc.abstractmethod
    def injected_error(self) -> Response: ...

    @abc.abstractmethod
    def in_progress(self) -> Response: ...

    @abc.abstractmethod
    def key_reused(self) -> Response: ...

    @abc.abstractmethod
    def event(self, op: Op) -> tuple[str, bytes] | None:
        """The webhook event (id, body) announcing the state ``op`` is in, if any."""

    @abc.abstractmethod
    def sign_webhook(self, body: bytes, now_s: float) -> dict[str, str]: ...

    @abc.abstractmethod
    def batch_webhook_body(self, bodies: list[bytes]) -> bytes:
        """One request's body carrying several events' bodies, in order."""

    # The prefix of this provider's dispute ids.
    dispute_prefix = "dp_"

    @abc.abstractmethod
    def dispute_event(self, dispute: Dispute) -> tuple[str, bytes]:
        """The webhook event (id, body) announcing the state ``dispute`` is in."""

    @abc.abstractmethod
    def report(self, date: str) -> bytes:
        """The settlement report of ``date`` in the provider's format (``report_entries``
        and ``report_batches`` say what it holds)."""

    # The prefix of this provider's payout batch ids.
    batch_prefix = "batch_"

    def report_entries(self, date: str) -> list[Entry]:
        """The lines of the report of ``date``, discrepancies applied (adapters/sim/
        settlement.py)."""
        return self.discrepancies.entries(self.book, date)

    def report_batches(self, entries: list[Entry], date: str) -> list[Batch]:
        return batches_of(entries, date, self.batch_prefix)

    @abc.abstractmethod
    def report_file_name(self, date: str) -> str: ...

    # --- the fault gate -------------------------------------------------------------------------

    def api(self, handler: Callable[[Request, bytes], Awaitable[Response]], *,
            mutating: bool) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a provider API endpoint in the fault gate (see the module docstring)."""

        async def endpoint(request: Request) -> Response:
            if self.faults.outage() == "refuse":
                return await self._drop(request)
            edge = self.faults.edge()
            if edge is not None:
                kind, retry_after_s = edge
                return (self.unavailable(retry_after_s) if kind == "unavailable"
                        else self.throttled(retry_after_s))
            body = await request.body()
            denied = self.authenticate(request, body)
            if denied is not None:
                return denied
            # An operation meets latency, errors and hangs in ``idempotent``, once its key is
            # claimed, so a status query never calls "never received" what is under way.
            if not mutating:
                struck = await self._strike()
                if struck is not None:
                    return struck
            response = await handler(request, body)
            if mutating and self.faults.faults.answer_delay_ms > 0.0:
                await asyncio.sleep(self.faults.faults.answer_delay_ms / 1000.0)
            if self.faults.lost():
                return await self._drop(request)
            return response

        return endpoint

    async def idempotent(self, request: Request, key: str, operation: Operation, body: bytes,
                         work: Callable[[], Answer]) -> Response:
        """Run ``work`` once per idempotency key and replay its answer afterwards."""
        fp = fingerprint(request.method, request.url.path, body)
        state, stored = self.store.begin(key, fp)
        if state is KeyState.REPLAY and stored is not None:
            self.counts.replays += 1
            return Response(stored.body, stored.status, media_type=stored.media_type,
                            headers={"idempotent-replayed": "true"})
        if state is KeyState.MISMATCH:
            self.counts.idempotency_conflicts += 1
            return self.key_reused()
        if state is KeyState.IN_PROGRESS:
            self.counts.idempotency_conflicts += 1
            return self.in_progress()
        if state is KeyState.FULL or self.book.full:
            if state is KeyState.NEW:
                self.store.abandon(key)
            return self.unavailable(float(self.faults.faults.retry_after_s))
        started_s = self._monotonic_s()
        try:
            struck = await self._strike()
            if struck is not None:
                self.store.abandon(key)
                return struck
            answer = work()
        except BaseException:
            self.store.abandon(key)
            raise
        self.counts.operations += 1
        if answer.op_id:
            self.served_ms[answer.op_id] = round((self._monotonic_s() - started_s) * 1000, 3)
            if len(self.served_ms) > SERVED_MAX:
                self.served_ms.popitem(last=False)
        if answer.store:
            self.store.finish(key, Stored(fp, operation, answer.status, answer.body,
                                          answer.op_id, answer.media_type))
        else:
            self.store.abandon(key)
        return Response(answer.body, answer.status, media_type=answer.media_type)

    async def _strike(self) -> Response | None:
        """Latency, then perhaps an injected error (answered instead; nothing happens), then
        perhaps a hang (after which the call goes on)."""
        delay_s = self.faults.latency_s()
        if delay_s > 0.0:
            await asyncio.sleep(delay_s)
        if self.faults.error():
            return self.injected_error()
        hang_s = self.faults.hang_s()
        if hang_s > 0.0:
            await asyncio.sleep(hang_s)
        return None

    def recorded(self, op: Op) -> None:
        """Announce ``op`` and arrange its settlement; call once after the book recorded it."""
        self._announce(op)
        if op.state == "pending":
            self._settle_later(op.id)

    def _announce(self, op: Op) -> None:
        event = self.event(op)
        if event is not None:
            self.webhooks.emit(*event)
        self.reports.touch(op.settled_on)
        if self.book.reportable(op):
            for date in self.discrepancies.on_settled(op):
                self.reports.touch(date)

    def _settle_later(self, op_id: str) -> None:
        if len(self._settlements) >= SETTLEMENTS_PENDING_MAX:
            raise RuntimeError("too many pending settlements")
        delay_ms = self.faults.faults.settle_delay_ms
        delay_s = (self.options.settle_delay_ms if delay_ms is None else delay_ms) / 1000.0
        task = asyncio.get_running_loop().create_task(self._settle(op_id, delay_s))
        self._settlements.add(task)
        task.add_done_callback(self._settlements.discard)

    async def _settle(self, op_id: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        op = self.book.settle(op_id)
        if op is not None:
            self._announce(op)

    async def _drop(self, request: Request) -> Response:
        """Abort the connection without an answer (the client sees a reset)."""
        send = request.scope.get(RAW_SEND)
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        abort = getattr(transport, "abort", None)
        if callable(abort):
            abort()
            # Let the server see the connection go, so it does not try to answer.
            for _ in range(3):
                await asyncio.sleep(0)
        else:  # pragma: no cover - only under a server that hides its transport
            log.warning("cannot drop a connection under this server; answering instead")
        return Response(b"", 500)

    def request_key(self, request: Request, header: str) -> str | None:
        """The idempotency key in ``header``, if present and sane (1-255 visible ASCII)."""
        key = request.headers.get(header, "")
        if not 1 <= len(key) <= IDEMPOTENCY_KEY_CHARS_MAX:
            return None
        if not all("!" <= char <= "~" for char in key):
            return None
        return key

    # --- the admin API --------------------------------------------------------------------------

    def _admin_routes(self) -> list[BaseRoute]:
        return [
            Route("/_sim/health", self._health, methods=["GET"]),
            Route("/_sim/faults", self._get_faults, methods=["GET"]),
            Route("/_sim/faults", self._put_faults, methods=["PUT"]),
            Route("/_sim/charges", self._charges, methods=["GET"]),
            Route("/_sim/reset", self._reset, methods=["POST"]),
            Route("/_sim/stats", self._stats, methods=["GET"]),
            Route("/_sim/disputes", self._open_dispute, methods=["POST"]),
            Route("/_sim/disputes", self._disputes, methods=["GET"]),
            Route("/_sim/disputes/{dispute_id}/decision", self._decide_dispute,
                  methods=["POST"]),
            Route("/_sim/reports/discrepancies", self._add_discrepancies, methods=["POST"]),
            Route("/_sim/reports/discrepancies", self._get_discrepancies, methods=["GET"]),
        ]

    def _admin_denied(self, request: Request) -> Response | None:
        given = request.headers.get("authorization", "")
        expected = f"Bearer {self.secrets['admin_token']}"
        if hmac.compare_digest(given.encode(), expected.encode()):
            return None
        return _json(401, {"error": "admin_token_invalid"})

    async def _health(self, request: Request) -> Response:
        return _json(200, {"provider": self.name, "ok": True})

    async def _get_faults(self, request: Request) -> Response:
        return self._admin_denied(request) or _json(200, self.faults.snapshot())

    async def _put_faults(self, request: Request) -> Response:
        denied = self._admin_denied(request)
        if denied is not None:
            return denied
        try:
            faults = FAULTS_DECODER.decode(await request.body())
        except msgspec.ValidationError as exc:
            return _json(400, {"error": "faults_invalid", "detail": str(exc)})
        except msgspec.DecodeError:
            return _json(400, {"error": "faults_invalid", "detail": "not JSON"})
        self.faults.configure(faults)
        if faults.outage == "refuse" and faults.outage_s is not None:
            self._start_refusing(faults.outage_s)
        return _json(200, self.faults.snapshot())

    async def _charges(self, request: Request) -> Response:
        denied = self._admin_denied(request)
        if denied is not None:
            return denied
        return _json(200, {"provider": self.name, "operations": [
            {**op.to_admin(), "served_ms": self.served_ms.get(op.id)}
            for op in self.book.ops()]})

    async def _reset(self, request: Request) -> Response:
        denied = self._admin_denied(request)
        if denied is not None:
            return denied
        for task in list(self._settlements):
            task.cancel()
        self.book.clear()
        self.store.clear()
        self.faults.configure(Faults(seed=self.options.seed))
        self.faults.counts = type(self.faults.counts)()
        self.webhooks.reset()
        self.discrepancies.clear()
        self.counts = _Counts()
        self.served_ms.clear()
        return _json(200, {"reset": True})

    async def _add_discrepancies(self, request: Request) -> Response:
        """Make the next reports carry discrepancies: ``{"discrepancies": [{"kind", ...}]}``
        (adapters/sim/settlement.py, docs/providers.md)."""
        denied = self._admin_denied(request)
        if denied is not None:
            return denied
        try:
            items = DISCREPANCIES_DECODER.decode(await request.body()).discrepancies
            touched = self.discrepancies.add(items, self.book)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            return _json(400, {"error": "discrepancies_invalid", "detail": str(exc)[:200]})
        for date in touched:
            self.reports.touch(date)
        return _json(200, self.discrepancies.snapshot())

    async def _get_discrepancies(self, request: Request) -> Response:
        return self._admin_denied(request) or _json(200, self.discrepancies.snapshot())

    async def _open_dispute(self, request: Request) -> Response:
        """Open a dispute on a charge, as the payer's bank would, and send its webhook:
        ``{"authorization_id", "amount", "fee" (default 1500), "reason"}``."""
        denied = self._admin_denied(request)
        if denied is not None:
            return denied
        try:
            params = _OPEN_DISPUTE.decode(await request.body())
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _json(400, {"error": "dispute_invalid", "detail": str(exc)[:200]})
        try:
            dispute = self.book.open_dispute(
                authorization_id=params.authorization_id, amount=params.amount,
                fee=params.fee, reason=params.reason, prefix=self.dispute_prefix)
        except Refused:
            return _json(404, {"error": "authorization_not_found"})
        self.webhooks.emit(*self.dispute_event(dispute))
        return _json(201, dispute.to_admin())

    async def _decide_dispute(self, request: Request) -> Response:
        """Decide a dispute (``{"outcome": "won" | "lost"}``) and send its webhook."""
        denied = self._admin_denied(request)
        if denied is not None:
            return denied
        try:
            params = _DECIDE_DISPUTE.decode(await request.body())
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _json(400, {"error": "decision_invalid", "detail": str(exc)[:200]})
        try:
            dispute = self.book.decide_dispute(request.path_params["dispute_id"],
                                               won=params.outcome == "won")
        except Refused as refused:
            if refused.refusal is Refusal.NOT_FOUND:
                return _json(404, {"error": "dispute_not_found"})
            return _json(409, {"error": "dispute_decided"})
        self.webhooks.emit(*self.dispute_event(dispute))
        return _json(200, dispute.to_admin())

    async def _disputes(self, request: Request) -> Response:
        denied = self._admin_denied(request)
        if denied is not None:
            return denied
        return _json(200, {"provider": self.name,
                           "disputes": [d.to_admin() for d in self.book.disputes()]})

    async def _stats(self, request: Request) -> Response:
        denied = self._admin_denied(request)
        if denied is not None:
            return denied
        return _json(200, {
            "provider": self.name, "operations_recorded": len(self.book),
            "idempotency_keys": len(self.store), "settlements_pending": len(self._settlements),
            "webhooks_pending": self.webhooks.pending(), "calls": asdict(self.counts),
            "faults": asdict(self.faults.counts), "webhooks": asdict(self.webhooks.counts),
        })

    # --- serving --------------------------------------------------------------------------------

    @property
    def serving_started(self) -> bool:
        return self._server is not None

    async def serve(self, host: str, port: int, *, ready: Callable[[str], None]) -> None:
        """Serve until SIGTERM/SIGINT; call ``ready(url)`` once connections are accepted."""
        sock = _bind(host, port)
        self._bound = (host, sock.getsockname()[1])
        server = uvicorn.Server(uvicorn.Config(
            self.app, lifespan="off", log_level="warning", access_log=False,
            server_header=False, timeout_graceful_shutdown=1, timeout_keep_alive=5))
        self._server = server
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serving.done():
                serving.result()
                return
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self.webhooks.run()),
                            loop.create_task(self.reports.run())]
        ready(f"http://{_url_host(host)}:{self._bound[1]}")
        try:
            await serving
        finally:
            for task in [*self._background, *self._settlements]:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            with contextlib.suppress(OSError):
                self.reports.flush()

    def _start_refusing(self, duration_s: float) -> None:
        if self._server is None or (self._refuse_task and not self._refuse_task.done()):
            return
        self._refuse_task = asyncio.get_running_loop().create_task(self._refuse(duration_s))

    async def _refuse(self, duration_s: float) -> None:
        """Stop listening for ``duration_s`` (connections are refused), then listen again."""
        server = self._server
        assert server is not None
        await asyncio.sleep(0.05)  # the admin call that asked for it gets its answer first
        for listener in server.servers:
            listener.close()
        # Idle keep-alive connections close too, so clients reconnect and are refused;
        # a request still arriving on an open one is dropped by the fault gate.
        for connection in list(server.server_state.connections):
            connection.shutdown()
        self.faults.counts.refused_connections += 1
        await asyncio.sleep(duration_s)
        for _ in range(REBIND_ATTEMPTS_MAX):
            try:
                sock = _bind(*self._bound)
                break
            except OSError:  # the port is briefly busy; someone else may have taken it
                await asyncio.sleep(0.1)
        else:
            log.error("cannot listen on port %d again after the outage; stopping",
                      self._bound[1])
            server.should_exit = True
            return
        await server.startup(sockets=[sock])
        self.faults.outage()  # lets the expired outage clear itself


def _exit_at_stdin_eof() -> None:
    """Stop the process (as SIGTERM would) once stdin closes: the launcher holds the other
    end of the pipe, so a launcher that died without stopping us does not leave us behind."""
    # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader would hold
    # its lock while the interpreter shuts down, which aborts the process.
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


class _OpenDisputeParams(msgspec.Struct, forbid_unknown_fields=True):
    authorization_id: Annotated[str, Meta(min_length=1, max_length=100)]
    amount: Annotated[int, Meta(ge=1, le=AMOUNT_MAX)]
    fee: Annotated[int, Meta(ge=0, le=AMOUNT_MAX)] = 1500
    reason: Annotated[str, Meta(max_length=64, pattern="^[a-z_]*$")] = "fraudulent"


class _DecideDisputeParams(msgspec.Struct, forbid_unknown_fields=True):
    outcome: Literal["won", "lost"]


_OPEN_DISPUTE = msgspec.json.Decoder(_OpenDisputeParams)
_DECIDE_DISPUTE = msgspec.json.Decoder(_DecideDisputeParams)


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(payload), status, headers=headers, media_type=JSON)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --- the command line -------------------------------------------------------------------------


def parse_args(name: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m adapters.sim.{name}",
                                     description=f"The simulated {name} payment provider.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--secrets-file", type=Path, default=Path(f".sim/{name}.secrets.json"),
                        help="JSON secrets file; created with fresh secrets if missing")
    parser.add_argument("--webhook-url", default="")
    parser.add_argument("--webhook-ca", default="", metavar="FILE",
                        help="CA certificates (PEM) an https webhook receiver is verified "
                             "against (default: the system's)")
    parser.add_argument("--webhook-cert", default="", metavar="FILE",
                        help="client certificate (PEM) for a receiver requiring mutual TLS")
    parser.add_argument("--webhook-key", default="", metavar="FILE",
                        help="the private key of --webhook-cert (PEM)")
    parser.add_argument("--report-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--settle-delay-ms", type=float, default=1_000.0,
                        help="how long asynchronous settlement takes (providers that have it)")
    parser.add_argument("--webhook-backoff-ms", type=float, default=500.0)
    parser.add_argument("--webhook-batch-max", type=int, default=1,
                        help="events queued together are sent in one request, up to this "
                             "many (1: one event per request)")
    parser.add_argument("--webhook-batch-linger-ms", type=float, default=0.0,
                        help="with --webhook-batch-max above 1, how long a batch waits for "
                             "more events after its first")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop when stdin closes (the launcher's pipe: its process ended)")
    return parser.parse_args(argv)


def run_main(name: str, factory: Callable[[dict[str, str], SimOptions], SimProvider],
             argv: Sequence[str] | None = None) -> int:
    """The body of ``python -m adapters.sim.<name>``; returns the exit status."""
    from adapters.sim.launch import write_secrets

    args = parse_args(name, argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"{name} %(levelname)s %(name)s: %(message)s")
    write_secrets(args.secrets_file, name)
    secrets = load_secrets(args.secrets_file, name)
    options = SimOptions(webhook_url=args.webhook_url, webhook_ca=args.webhook_ca,
                         webhook_cert=args.webhook_cert, webhook_key=args.webhook_key,
                         report_dir=args.report_dir,
                         seed=args.seed, settle_delay_ms=args.settle_delay_ms,
                         webhook_backoff_s=args.webhook_backoff_ms / 1000.0,
                         webhook_batch_max=args.webhook_batch_max,
                         webhook_batch_linger_s=args.webhook_batch_linger_ms / 1000.0)
    provider = factory(secrets, options)

    def ready(url: str) -> None:
        print(f"listening on {url}", flush=True)

    def on_signal(signum: int, frame: object) -> None:
        # uvicorn handles the signals while it serves and raises the one that stopped it
        # again once it has shut down; ignoring that one lets the reports be flushed and the
        # process exit with status 0. Before serving starts, a signal just ends the process.
        if not provider.serving_started:
            raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    if args.exit_with_parent:
        threading.Thread(target=_exit_at_stdin_eof, name="parent-watch", daemon=True).start()
    # uvloop (a dependency) roughly doubles what one simulator process can serve.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(provider.serve(args.host, args.port, ready=ready))
    return 0
