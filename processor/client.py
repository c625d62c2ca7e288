"""The async Python client of the binary RPC protocol (processor.wire).

One client keeps one TCP connection and pipelines every call over it: each call takes a
fresh request id, writes its frame and waits on a future that the connection's reader task
resolves when the response with that id arrives, in whatever order the server answers.

Failures are raised, never returned:

* ``Overloaded`` and ``Unavailable`` (``processor.errors``) for the server's retryable codes
  of the same names, and ``Unavailable`` when the connection drops or cannot be opened, or
  when the server closed it as idle (``idle_timeout``) just as a call was sent;
* ``ClientError`` for every other error code (``processor.wire.ERROR_CODES``);
* ``TimeoutError`` when a call gets no answer within ``timeout_s``. A create that timed out
  may or may not have been applied; sending it again with the same ids is safe.

Over TLS (``ssl``), a server whose certificate the context does not trust raises
``ssl.SSLCertVerificationError`` and a TLS error on an open connection ``ClientError``
``tls_failed``; neither is retried. A server that refuses the client's certificate
usually just closes the connection (in TLS 1.3 after the client's side of the handshake
ended), which reads as ``Unavailable``.

After a dropped connection, the next call opens a new one (at most ``connect_attempts_max``
attempts). A call is sent again only for ``Overloaded`` or ``Unavailable``, at most
``retries_max`` times (default 0), which is safe because ledger ids are idempotency keys;
a payments operation only if it reads or carries an idempotency key.

**Several fronts.** ``Client(addresses=["host:port", ...], token=...)`` starts at a front
drawn at random and, when its connection breaks, opens the next one to the following
front (connecting goes round the list). A call lost with a broken connection is sent
again at once over the new one, at most ``failovers_max`` times (default: the number of
addresses) and only within ``timeout_s`` of its first sending, if sending it twice is
harmless (``processor.failover``): a create the lost attempt applied then answers
``exists``, a transfer it refused by the ledger's state ``id_already_failed``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence, Sized
from types import TracebackType
from typing import Any, TypeVar, overload

import msgspec
import numpy as np

from processor import failover, wire
from processor.batch import TransferBatch, transfer_columns
from processor.codes import AccountResult, TransferResult
from processor.errors import Overloaded, TxprocError, Unavailable
from processor.history import (
    HISTORY_LIMIT_DEFAULT,
    TIMESTAMP_END,
    AccountBalancesAt,
    TransfersPage,
)
from processor.stream import (
    STREAM_LIMIT_DEFAULT,
    StreamItem,
    StreamPage,
    item_cursors,
)
from processor.types import Account, Transfer

__all__ = ["CONNECT_ATTEMPTS_MAX_DEFAULT", "Client", "ClientError", "PaymentAnswer",
           "client_tls_context"]

CONNECT_ATTEMPTS_MAX_DEFAULT = 3
# The pause before the second and later connection attempts grows by this much each time.
_CONNECT_BACKOFF_S = 0.1

_ResultT = TypeVar("_ResultT")


class PaymentAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """A payments operation's answer: the HTTP status and decoded JSON body."""

    status: int
    body: Any
    replayed: bool = False


def client_tls_context(ca_path: str = "", cert_path: str = "",
                       key_path: str = "") -> ssl.SSLContext:
    """A client context for a front serving TLS: TLS 1.2 or later, the server's certificate
    verified against ``ca_path`` (PEM; the system's trust store when empty) and its name
    checked, and for a front that requires one (mutual TLS), the client's certificate chain
    ``cert_path`` with its key ``key_path`` (PEM, both or neither).

    The processor's own clients (the payments actor's RPC, the simulated providers'
    webhooks) are made with it; so can a gateway's. Raises ``ValueError`` for a certificate
    without its key, ``FileNotFoundError`` and ``ssl.SSLError`` for a missing or unreadable
    file."""
    if bool(cert_path) != bool(key_path):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    context = ssl.create_default_context(cafile=ca_path or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_path:
        context.load_cert_chain(certfile=cert_path, keyfile=key_path)
    return context


class ClientError(TxprocError):
    """The server refused a request or the connection with ``code`` (see wire.ERROR_CODES).

    Also raised locally with ``client_closed`` (a call after ``close()``), ``frame_too_large``
    (a request too big to send), ``protocol_mismatch`` (the server sent a frame this
    client cannot read) and ``tls_failed`` (the TLS layer reported an error on an open
    connection). These are the RPC protocol's codes, not HTTP ones, so they are listed in
    wire.ERROR_CODES rather than registered (processor.errors). ``str()`` is
    ``"code: message"``.
    """

    def __init__(self, code: str, message: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(message, code=code)
        self.args = (f"{code}: {message}",)
        self.retry_after_s = retry_after_s


def _exception_of(error: wire.Error) -> Exception:
    if error.code == Overloaded.code:
        return Overloaded(error.message, retry_after_s=error.retry_after_s)
    if error.code == Unavailable.code:
        return Unavailable(error.message, retry_after_s=error.retry_after_s)
    if error.code == "rate_limited":
        # Retryable like overloaded, but about this caller: waiting retry_after_s suffices.
        return Overloaded(error.message, retry_after_s=error.retry_after_s)
    if error.code == "idle_timeout":
        # The server closed the connection as idle while this call was on its way: it read
        # nothing more, so the call was not applied and a new connection may carry it.
        return Unavailable(error.message, retry_after_s=0.0)
    return ClientError(error.code, error.message, retry_after_s=error.retry_after_s)


class _Connection:
    """One TCP connection and the calls waiting on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[wire.Response]] = {}
        # The server answers Hellos in the order they were sent, so waiters form a queue.
        self.hello_waiters: collections.deque[asyncio.Future[wire.HelloOk]] = collections.deque()
        # Why the server is closing the connection, from its connection-level Error.
        self.closing_error: wire.Error | None = None
        self.lost = False
        self.reader_task: asyncio.Task[None] | None = None
        self.address_index = 0  # which of the client's addresses it is connected to

    @property
    def usable(self) -> bool:
        """True while new requests may be sent: a closing server reads no more of them."""
        return not self.lost and self.closing_error is None


class Client:
    """An async client of the ledger's RPC protocol; see the module docstring.

    ``timeout_s`` bounds each call and each connection attempt, in seconds. At most
    ``in_flight_max`` calls are sent at once; more wait for a slot, so keep it at or below
    the server's ``in_flight_per_connection_max``.

    With ``ssl`` (a client context: the CA that signed the server's certificate, and for a
    server that requires one, the client's certificate and key) the connection is TLS; the
    server's certificate must name ``server_hostname``, by default ``host``.

    ``Client(host, port, token)`` talks to one front; ``Client(addresses=[...], token=...)``
    to several (the module docstring), the first tried drawn from ``rng``. Raises
    ``ValueError`` for an address that is not ``host:port``, or for neither or both forms.
    """

    def __init__(
        self,
        host: str = "",
        port: int = 0,
        token: str = "",
        *,
        addresses: Sequence[str] = (),
        timeout_s: float = 30.0,
        in_flight_max: int = 64,
        retries_max: int = 0,
        connect_attempts_max: int = CONNECT_ATTEMPTS_MAX_DEFAULT,
        failovers_max: int | None = None,
        ssl: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if bool(addresses) == bool(host):
            raise ValueError("give either host and port or addresses")
        if isinstance(addresses, str):
            raise ValueError("addresses is a list of host:port, not one string")
        self._addresses = ([failover.parse_address(a) for a in addresses] if addresses
                           else [(host, port)])
        if failovers_max is not None and failovers_max < 0:
            raise ValueError("failovers_max must not be negative")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if in_flight_max <= 0:
            raise ValueError("in_flight_max must be positive")
        if retries_max < 0:
            raise ValueError("retries_max must not be negative")
        if connect_attempts_max <= 0:
            raise ValueError("connect_attempts_max must be positive")
        self._token = token
        # One address: no failover, as before; several: each may be tried once per call.
        self._failovers_max = (failovers_max if failovers_max is not None
                               else 0 if len(self._addresses) == 1 else len(self._addresses))
        # Spreading load, not a secret: any generator will do.
        self._current = failover.first_index(len(self._addresses),
                                             rng or random.Random())  # noqa: S311
        self._timeout_s = timeout_s
        self._retries_max = retries_max
        self._connect_attempts_max = connect_attempts_max
        # asyncio takes server_hostname only with ssl; the handshake has the attempt's time.
        self._tls: dict[str, Any] = {} if ssl is None else {
            "ssl": ssl, "server_hostname": server_hostname,
            "ssl_handshake_timeout": timeout_s}
        self._slots = asyncio.Semaphore(in_flight_max)
        self._connect_lock = asyncio.Lock()
        self._request_ids = itertools.count(1)
        self._connection: _Connection | None = None
        self._closed = False
        self.token_expires_at_s: int | None = None
        self.failovers = 0  # calls sent again to another front after a broken connection

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection and authenticate, unless it is open already.

        Raises ``Unavailable`` if no attempt succeeds, ``ClientError`` if the token is
        refused (``token_invalid``, ``token_expired``, ``token_revoked``).
        """
        self._closed = False
        await self._ready_connection()

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with ``ClientError`` client_closed."""
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection.reader_task is not None:
            connection.reader_task.cancel()
            await asyncio.gather(connection.reader_task, return_exceptions=True)
        await _close(connection.writer)

    async def set_token(self, token: str) -> None:
        """Use ``token`` from now on, re-authenticating the open connection with it.

        Raises ``ClientError`` if the server refuses it; the server then closes the
        connection and the next call reconnects with this token.
        """
        self._token = token
        connection = self._connection
        if connection is not None and connection.usable:
            await self._hello(connection)

    async def create_accounts(self, accounts: list[Account]) -> list[AccountResult]:
        """Create ``accounts``; one result code per account, in order."""
        response = await self._call(lambda request_id: wire.CreateAccounts(request_id, accounts))
        result = _expect(response, wire.CreateAccountsResult)
        _check_count(result.codes, accounts)
        return _codes(result.codes, AccountResult)

    @overload
    async def create_transfers(self, transfers: list[Transfer]) -> list[TransferResult]: ...

    @overload
    async def create_transfers(self, transfers: TransferBatch) -> np.ndarray: ...

    async def create_transfers(
        self, transfers: list[Transfer] | TransferBatch
    ) -> list[TransferResult] | np.ndarray:
        """Create ``transfers``; one result code per transfer, in order.

        A list of ``Transfer`` is answered with a list of ``TransferResult``; a
        ``TransferBatch`` (columns, the fast form) with a uint8 array of result codes. Both
        travel as columns (``wire.CreateTransferBatch``). Raises ``BatchInvalid`` (a
        ValueError) before sending if a value does not fit its column.
        """
        if isinstance(transfers, TransferBatch):
            columns, user_data, count = transfers.column_bytes(), transfers.user_data or [], \
                len(transfers)
        elif transfers and transfers[0].origin and all(
                t.origin == transfers[0].origin for t in transfers):
            # An origin travels only in the object form. The server honours it for the
            # processor's own token and a record it wrote, and ignores it otherwise
            # (docs/security.md, "Audit").
            return await self._create_transfer_items(transfers)
        else:
            (columns, user_data), count = transfer_columns(transfers), len(transfers)
        (ids, debits, credits, amounts, currencies, flags, pending, timeouts,
         codes_) = columns
        response = await self._call(lambda request_id: wire.CreateTransferBatch(
            request_id, ids, debits, credits, amounts, currencies, flags, pending, timeouts,
            codes_, user_data))
        result = _expect(response, wire.CreateTransferBatchResult)
        codes = np.frombuffer(result.codes, dtype=np.uint8)
        _check_count(codes, range(count))
        if isinstance(transfers, TransferBatch):
            return codes
        return _codes(codes.tolist(), TransferResult)

    async def _create_transfer_items(self, transfers: list[Transfer]) -> list[TransferResult]:
        response = await self._call(lambda request_id: wire.CreateTransfers(request_id,
                                                                            transfers))
        result = _expect(response, wire.CreateTransfersResult)
        _check_count(result.codes, transfers)
        return _codes(result.codes, TransferResult)

    async def lookup_accounts(self, ids: list[int]) -> list[Account | None]:
        """The account of each id, in order, ``None`` where there is none."""
        response = await self._call(lambda request_id: wire.LookupAccounts(request_id, ids))
        result = _expect(response, wire.LookupAccountsResult)
        _check_count(result.items, ids)
        return result.items

    async def lookup_transfers(self, ids: list[int]) -> list[Transfer | None]:
        """The transfer of each id, in order, ``None`` where there is none."""
        response = await self._call(lambda request_id: wire.LookupTransfers(request_id, ids))
        result = _expect(response, wire.LookupTransfersResult)
        _check_count(result.items, ids)
        return result.items

    # -- history, queries, balances at an instant (processor.history; docs/api.md) ----------

    async def get_account_transfers(
        self, account_id: int, *, from_ns: int = 0, to_ns: int = TIMESTAMP_END,
        limit: int = HISTORY_LIMIT_DEFAULT, cursor: str = "", order: str = "asc",
        side: str = "both",
    ) -> TransfersPage:
        """A page of the account's transfers with a timestamp in ``[from_ns, to_ns)``
        (nanoseconds since the Unix epoch), ``order`` "asc" or "desc", ``side`` "debits",
        "credits" or "both"; pass the page's ``next_cursor`` back as ``cursor`` for the next.
        Raises ``ClientError`` ``account_not_found``, ``invalid_query``, ``invalid_cursor``."""
        response = await self._call(lambda request_id: wire.GetAccountTransfers(
            request_id, account_id, from_ns, to_ns, limit, cursor, order, side))
        result = _expect(response, wire.TransfersPageResult)
        return TransfersPage(data=result.items, next_cursor=result.next_cursor)

    async def query_transfers(
        self, *, code: int | None = None, user_data: str | None = None, from_ns: int = 0,
        to_ns: int = TIMESTAMP_END, limit: int = HISTORY_LIMIT_DEFAULT, cursor: str = "",
    ) -> TransfersPage:
        """A page of the transfers the caller's tenant created with ``code`` and
        ``user_data`` (None: any), oldest first. A filtered page may hold fewer than
        ``limit`` transfers and still have a ``next_cursor``: each request reads a bounded
        number of rows. Raises ``ClientError`` ``invalid_query``, ``invalid_cursor``."""
        response = await self._call(lambda request_id: wire.QueryTransfers(
            request_id, code, user_data, from_ns, to_ns, limit, cursor))
        result = _expect(response, wire.TransfersPageResult)
        return TransfersPage(data=result.items, next_cursor=result.next_cursor)

    async def get_account_balances(self, account_id: int, at_ns: int) -> AccountBalancesAt:
        """The account's balances counting every movement at or before ``at_ns``. Raises
        ``ClientError`` ``account_not_found``, ``invalid_query``."""
        response = await self._call(lambda request_id: wire.GetAccountBalances(
            request_id, account_id, at_ns))
        return _expect(response, wire.AccountBalancesResult).balances

    # -- the change stream (processor.stream; docs/api.md, "The change stream") -------------

    async def stream_transfers(self, after: str = "", *, limit: int = STREAM_LIMIT_DEFAULT,
                               wait_s: float = 0.0) -> StreamPage:
        """One page of the caller's tenant's committed transfers after the cursor ``after``
        ("" from the beginning), at most ``limit``; with none yet, the server waits up to
        ``wait_s`` seconds (0 to 20, below this client's ``timeout_s``) for some. Continue
        from the page's ``next_cursor``. Raises ``ClientError`` ``invalid_query``,
        ``invalid_cursor``; ``Overloaded`` when the server has too many waiting."""
        if wait_s >= self._timeout_s:
            raise ValueError("wait_s must be below the client's timeout_s")
        response = await self._call(lambda request_id: wire.StreamTransfers(
            request_id, after, limit, wait_s))
        result = _expect(response, wire.TransfersStreamResult)
        _check_count(result.shards, result.items)
        return StreamPage(data=result.items, shards=list(result.shards),
                          next_cursor=result.next_cursor)

    async def subscribe_transfers(self, after: str = "", *, limit: int = 1000,
                                  wait_s: float = 10.0, retry_deadline_s: float = 60.0,
                                  ) -> AsyncIterator[StreamItem]:
        """Every committed transfer of the caller's tenant after the cursor ``after``, for
        ever, each once and with the cursor that resumes right after it (save it: a new
        subscription from it, by any client, continues without a gap or a repeat). Pages of
        ``limit`` long-polled ``wait_s`` seconds at a time; at most one page is held.
        Retryable errors (the front or the database restarting) are retried after their
        ``retry_after_s`` until ``retry_deadline_s`` passes without an answer, then raised."""
        loop = asyncio.get_running_loop()
        answered_at = loop.time()
        while True:
            try:
                page = await self.stream_transfers(after, limit=limit, wait_s=wait_s)
            except (Overloaded, Unavailable) as exc:
                if loop.time() - answered_at > retry_deadline_s:
                    raise
                await asyncio.sleep(exc.retry_after_s)
                continue
            answered_at = loop.time()
            for cursor, transfer in zip(item_cursors(after, page), page.data, strict=True):
                yield StreamItem(cursor, transfer)
            after = page.next_cursor

    # -- payments (the HTTP API's semantics and JSON bodies; docs/payments.md) ---------------

    async def payment_call(self, operation: str, *, idempotency_key: str = "",
                           subject_id: str = "", body: object = None) -> PaymentAnswer:
        """One payments operation; ``body`` is encoded as the HTTP endpoint's JSON."""
        raw = b"" if body is None else msgspec.json.encode(body)
        response = await self._call(lambda request_id: wire.PaymentCall(
            request_id, operation, idempotency_key, subject_id, raw),
            safe=failover.call_is_safe(operation, idempotency_key))
        result = _expect(response, wire.PaymentResult)
        return PaymentAnswer(status=result.status, body=msgspec.json.decode(result.body),
                             replayed=result.replayed)

    async def authorize_payment(self, *, idempotency_key: str, amount: int, currency: str,
                                payment_method: str, merchant_account_id: int,
                                capture: bool = False, provider: str | None = None,
                                reference: str = "",
                                metadata: dict[str, str] | None = None,
                                customer_ref: str = "") -> PaymentAnswer:
        """``customer_ref``: the payment's data subject, whose personal fields are sealed
        with its key and erased with it (docs/payments.md, "Data subjects")."""
        body: dict[str, object] = {
            "amount": amount, "currency": currency, "payment_method": payment_method,
            "merchant_account_id": merchant_account_id, "capture": capture,
            "reference": reference}
        if provider is not None:
            body["provider"] = provider
        if metadata:
            body["metadata"] = metadata
        if customer_ref:
            body["customer_ref"] = customer_ref
        return await self.payment_call("authorize", idempotency_key=idempotency_key,
                                       body=body)

    async def capture_payment(self, payment_id: str, *, idempotency_key: str,
                              amount: int | None = None) -> PaymentAnswer:
        return await self.payment_call("capture", idempotency_key=idempotency_key,
                                       subject_id=payment_id, body={"amount": amount})

    async def create_capture(self, payment_id: str, *, idempotency_key: str, amount: int,
                             final: bool) -> PaymentAnswer:
        """One of several captures; ``final`` releases what is left of the authorization."""
        return await self.payment_call("create_capture", idempotency_key=idempotency_key,
                                       subject_id=payment_id,
                                       body={"amount": amount, "final": final})

    async def increment_payment(self, payment_id: str, *, idempotency_key: str,
                                amount: int) -> PaymentAnswer:
        """Raise an open authorization by ``amount`` (where its provider offers it)."""
        return await self.payment_call("increment", idempotency_key=idempotency_key,
                                       subject_id=payment_id, body={"amount": amount})

    async def void_payment(self, payment_id: str, *, idempotency_key: str) -> PaymentAnswer:
        return await self.payment_call("void", idempotency_key=idempotency_key,
                                       subject_id=payment_id)

    async def refund_payment(self, payment_id: str, *, idempotency_key: str,
                             amount: int | None = None,
                             capture_id: str | None = None,
                             metadata: dict[str, str] | None = None) -> PaymentAnswer:
        body: dict[str, object] = {"amount": amount}
        if capture_id is not None:
            body["capture_id"] = capture_id
        if metadata:
            body["metadata"] = metadata
        return await self.payment_call("refund", idempotency_key=idempotency_key,
                                       subject_id=payment_id, body=body)

    async def create_payout(self, *, idempotency_key: str, amount: int, currency: str,
                            merchant_account_id: int, destination: str,
                            customer_ref: str = "") -> PaymentAnswer:
        body: dict[str, object] = {
            "amount": amount, "currency": currency,
            "merchant_account_id": merchant_account_id, "destination": destination}
        if customer_ref:
            body["customer_ref"] = customer_ref
        return await self.payment_call("payout", idempotency_key=idempotency_key, body=body)

    async def get_payment(self, payment_id: str) -> PaymentAnswer:
        return await self.payment_call("get_payment", subject_id=payment_id)

    async def get_payout(self, payout_id: str) -> PaymentAnswer:
        return await self.payment_call("get_payout", subject_id=payout_id)

    async def list_payments(self, **query: object) -> PaymentAnswer:
        """A page of the tenant's payments: ``query`` is the list's JSON form (``status``,
        ``merchant_account_id``, ``created={"gte": ..., "lt": ...}``, ``reference``,
        ``metadata={...}``, ``limit``, ``cursor``; processor/payments/listing.py)."""
        return await self.payment_call("list_payments", body=query)

    async def list_payouts(self, **query: object) -> PaymentAnswer:
        return await self.payment_call("list_payouts", body=query)

    async def list_refunds(self, **query: object) -> PaymentAnswer:
        """As ``list_payments``, with ``payment_id`` instead of ``reference``."""
        return await self.payment_call("list_refunds", body=query)

    async def get_dispute(self, dispute_id: str) -> PaymentAnswer:
        return await self.payment_call("get_dispute", subject_id=dispute_id)

    async def list_disputes(self, **query: object) -> PaymentAnswer:
        """As ``list_payments``, with ``payment_id`` instead of ``reference``."""
        return await self.payment_call("list_disputes", body=query)

    async def submit_evidence(self, dispute_id: str, *, idempotency_key: str, text: str,
                              files: list[str] | None = None) -> PaymentAnswer:
        """Send evidence for a dispute to its provider (``disputes:write``), once."""
        body: dict[str, object] = {"text": text}
        if files:
            body["files"] = files
        return await self.payment_call("submit_evidence", idempotency_key=idempotency_key,
                                       subject_id=dispute_id, body=body)

    async def _call(self, request_of: Callable[[int], wire.Request], *,
                    safe: bool = True) -> wire.Response:
        """Send one request and wait for its answer; ``safe``: whether it may be sent twice
        (``processor.failover.call_is_safe``)."""
        async with self._slots:
            started_s = time.monotonic()
            failovers = retries = 0
            while True:
                connection: _Connection | None = None
                try:
                    connection = await self._ready_connection()
                    request_id = next(self._request_ids)
                    return await self._exchange(connection, request_of(request_id), request_id)
                except (Overloaded, Unavailable) as exc:
                    step = failover.next_step(
                        safe=safe, broken=connection is not None and not connection.usable,
                        failovers=failovers, failovers_max=self._failovers_max,
                        retries=retries, retries_max=self._retries_max,
                        elapsed_s=time.monotonic() - started_s, deadline_s=self._timeout_s)
                    if step is failover.Step.RAISE:
                        raise
                    if step is failover.Step.FAIL_OVER:
                        failovers += 1
                        self.failovers += 1
                    else:
                        retries += 1
                        await asyncio.sleep(exc.retry_after_s)

    async def _exchange(
        self, connection: _Connection, request: wire.Request, request_id: int
    ) -> wire.Response:
        try:
            frame = wire.encode_frame(request)
        except wire.FrameTooLarge as exc:
            raise ClientError("frame_too_large", str(exc)) from exc
        future: asyncio.Future[wire.Response] = asyncio.get_running_loop().create_future()
        connection.pending[request_id] = future
        try:
            async with asyncio.timeout(self._timeout_s):
                connection.writer.write(frame)
                await connection.writer.drain()
                return await future
        except ConnectionError as exc:
            raise Unavailable(f"the connection to {self._address} was lost") from exc
        finally:
            # A late answer to a call that timed out finds no future and is dropped.
            connection.pending.pop(request_id, None)

    async def _ready_connection(self) -> _Connection:
        if self._closed:
            raise ClientError("client_closed", "the client was closed")
        connection = self._connection
        if connection is not None and connection.usable:
            return connection
        async with self._connect_lock:
            connection = self._connection
            if connection is None or not connection.usable:
                connection = self._connection = await self._open()
            return connection

    async def _open(self) -> _Connection:
        count = len(self._addresses)
        order = failover.connect_order(count, self._current, self._connect_attempts_max)
        for attempt, index in enumerate(order):
            if attempt and attempt % count == 0:  # a pause before each round of the list
                await asyncio.sleep(_CONNECT_BACKOFF_S * (attempt // count))
            self._current = index
            host, port = self._addresses[index]
            try:
                async with asyncio.timeout(self._timeout_s):
                    reader, writer = await asyncio.open_connection(host, port, **self._tls)
            except ssl.SSLCertVerificationError:
                raise  # the server is not who the context trusts: trying again cannot help
            except (OSError, TimeoutError) as exc:
                last_error: BaseException = exc
                continue
            connection = _Connection(reader, writer)
            connection.address_index = index
            connection.reader_task = asyncio.create_task(self._read_responses(connection))
            try:
                await self._hello(connection)
            except (Overloaded, Unavailable) as exc:
                last_error = exc
                await _close(writer)
                continue
            except BaseException:
                await _close(writer)
                raise
            return connection
        if isinstance(last_error, Overloaded):
            # The server answered, and it is full: say so rather than call it unreachable.
            raise last_error
        where = self._address if count == 1 else f"any of {count} fronts"
        message = f"cannot connect to {where} in {self._connect_attempts_max} attempts"
        raise Unavailable(message) from last_error

    async def _hello(self, connection: _Connection) -> None:
        waiter: asyncio.Future[wire.HelloOk] = asyncio.get_running_loop().create_future()
        connection.hello_waiters.append(waiter)
        try:
            async with asyncio.timeout(self._timeout_s):
                connection.writer.write(wire.encode_frame(
                    wire.Hello(self._token, wire.PROTOCOL_VERSION)))
                await connection.writer.drain()
                hello_ok = await waiter
        except (ConnectionError, TimeoutError) as exc:
            raise Unavailable(f"no answer to Hello from {self._address}") from exc
        self.token_expires_at_s = hello_ok.expires_at_s

    async def _read_responses(self, connection: _Connection) -> None:
        # Why the calls still waiting fail, if it is not the server's closing error.
        fault: tuple[str, str] | None = None
        try:
            while True:
                header = await connection.reader.readexactly(wire.FRAME_HEADER_BYTES)
                body = await connection.reader.readexactly(wire.frame_length(header))
                self._dispatch(connection, wire.decode_response(body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # The server closed the connection; handled below like any loss.
        except ssl.SSLError as exc:
            fault = ("tls_failed", f"TLS with the server failed: {exc}")
        except (wire.FrameTooLarge, wire.MalformedFrame) as exc:
            fault = ("protocol_mismatch", f"unreadable frame from the server: {exc}")
        except asyncio.CancelledError:
            fault = ("client_closed", "the client was closed")
            raise
        finally:
            self._lose(connection, fault)

    def _dispatch(self, connection: _Connection, response: wire.Response) -> None:
        if isinstance(response, wire.HelloOk):
            if connection.hello_waiters:
                _resolve(connection.hello_waiters.popleft(), response)
            return
        if isinstance(response, wire.Error) and response.request_id is None:
            # The server is closing the connection; answers to accepted requests may still
            # come, so only the Hellos waiting are failed now.
            connection.closing_error = response
            while connection.hello_waiters:
                _fail(connection.hello_waiters.popleft(), _exception_of(response))
            return
        request_id = response.request_id
        future = None if request_id is None else connection.pending.get(request_id)
        if future is None:
            return  # The call timed out or was cancelled; nobody waits for this answer.
        if isinstance(response, wire.Error):
            _fail(future, _exception_of(response))
        else:
            _resolve(future, response)

    def _lose(self, connection: _Connection, fault: tuple[str, str] | None) -> None:
        """Fail every call waiting on a connection that has ended, and forget it."""
        connection.lost = True
        closing_error = connection.closing_error

        # Each waiter gets an exception of its own: one raised in several tasks would
        # collect all their tracebacks.
        def error() -> Exception:
            if fault is not None:
                return ClientError(*fault)
            if closing_error is not None:
                return _exception_of(closing_error)
            return Unavailable(f"the connection to {self._address} was lost")

        for future in connection.pending.values():
            _fail(future, error())
        connection.pending.clear()
        while connection.hello_waiters:
            _fail(connection.hello_waiters.popleft(), error())
        connection.writer.close()
        if self._connection is connection:
            self._connection = None
            if fault is None or fault[0] != "client_closed":
                # The next connection goes to the following front (one address: the same).
                self._current = (connection.address_index + 1) % len(self._addresses)

    @property
    def _address(self) -> str:
        host, port = self._addresses[self._current]
        return f"{host}:{port}"


def _resolve(future: asyncio.Future[_ResultT], result: _ResultT) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[_ResultT], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


_ResponseT = TypeVar("_ResponseT", bound=wire.Response)


def _expect(response: wire.Response, kind: type[_ResponseT]) -> _ResponseT:
    if not isinstance(response, kind):
        message = f"expected {kind.__name__}, got {type(response).__name__}"
        raise ClientError("protocol_mismatch", message)
    return response


def _check_count(results: Sized, requested: Sized) -> None:
    if len(results) != len(requested):
        message = f"{len(results)} results for {len(requested)} items"
        raise ClientError("protocol_mismatch", message)


_CodeT = TypeVar("_CodeT", AccountResult, TransferResult)


def _codes(values: list[int], kind: type[_CodeT]) -> list[_CodeT]:
    try:
        return [kind(value) for value in values]
    except ValueError as exc:
        # A newer server may know codes this client does not; naming the problem beats a
        # bare ValueError from deep inside the enum.
        raise ClientError("protocol_mismatch", f"unknown {kind.__name__}: {exc}") from exc


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    # The peer may already have reset the connection; there is nothing left to tell it.
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
