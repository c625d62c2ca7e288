"""End-to-end tests of the RPC protocol: the real server and client over loopback TCP.

The ledger behind the server is an in-memory fake; these tests are about framing,
authentication, pipelining, limits and error mapping, not about ledger rules.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import pytest

from actors.edge.rpc_server import HELLO_TIMEOUT_S_DEFAULT, start_rpc_server
from processor import wire
from processor.batch import TransferBatch
from processor.client import CONNECT_ATTEMPTS_MAX_DEFAULT, Client, ClientError
from processor.codes import AccountResult, TransferResult
from processor.errors import LedgerError, Overloaded, Unavailable
from processor.identity import DEFAULT_TENANT, SCOPES, issue_token, tenant_slot
from processor.ratelimit import RateLimiter
from processor.service import BATCH_ITEMS_MAX
from processor.types import Account, Transfer

KEY = bytes(range(32))
NOW_S = 1_700_000_000
TTL_S = 900
# Long enough never to fire on a loaded machine, short enough that a hang fails fast.
TIMEOUT_S = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now_s = float(NOW_S)

    def __call__(self) -> float:
        return self.now_s


class FakeLedger:
    """An in-memory LedgerService: stores items by id and answers ok or exists."""

    def __init__(self) -> None:
        self.accounts: dict[int, Account] = {}
        self.transfers: dict[int, Transfer] = {}
        # Raised by the next calls while set, to test the server's error mapping.
        self.error: Exception | None = None
        # While set, calls wait for it, so tests can hold requests in flight.
        self.gate: asyncio.Event | None = None
        # Calls sleep for delay_s(first id) seconds, to make responses overtake each other.
        self.delay_s: dict[int, float] = {}
        self.calls_in_flight = 0
        self.calls_in_flight_peak = 0
        self.calls_finished = 0

    async def _enter(self, first_id: int | None) -> None:
        self.calls_in_flight += 1
        self.calls_in_flight_peak = max(self.calls_in_flight_peak, self.calls_in_flight)
        try:
            if first_id is not None and first_id in self.delay_s:
                await asyncio.sleep(self.delay_s[first_id])
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None:
                raise self.error
        finally:
            self.calls_in_flight -= 1

    async def create_accounts(self, accounts: list[Account]) -> list[AccountResult]:
        await self._enter(accounts[0].id if accounts else None)
        results = []
        for account in accounts:
            stored = self.accounts.setdefault(account.id, account)
            results.append(AccountResult.ok if stored is account else AccountResult.exists)
        self.calls_finished += 1
        return results

    async def create_transfers(self, transfers: list[Transfer]) -> list[TransferResult]:
        await self._enter(transfers[0].id if transfers else None)
        results = []
        for transfer in transfers:
            stored = self.transfers.setdefault(transfer.id, transfer)
            results.append(TransferResult.ok if stored is transfer else TransferResult.exists)
        self.calls_finished += 1
        return results

    async def lookup_accounts(self, ids: list[int]) -> list[Account | None]:
        await self._enter(ids[0] if ids else None)
        self.calls_finished += 1
        return [self.accounts.get(id_) for id_ in ids]

    async def lookup_transfers(self, ids: list[int]) -> list[Transfer | None]:
        await self._enter(ids[0] if ids else None)
        self.calls_finished += 1
        return [self.transfers.get(id_) for id_ in ids]


class Rig:
    """A running server with its fake ledger and clock."""

    def __init__(self, server: asyncio.Server, ledger: FakeLedger, clock: FakeClock) -> None:
        self.server = server
        self.ledger = ledger
        self.clock = clock
        self.port: int = server.sockets[0].getsockname()[1]

    def token(self, scopes: Iterable[str] = SCOPES, *, ttl_s: int = TTL_S) -> str:
        return issue_token(KEY, scopes, ttl_s=ttl_s, now_s=int(self.clock.now_s))

    def client(
        self,
        token: str | None = None,
        *,
        in_flight_max: int = 64,
        connect_attempts_max: int = CONNECT_ATTEMPTS_MAX_DEFAULT,
    ) -> Client:
        return Client(
            "127.0.0.1",
            self.port,
            self.token() if token is None else token,
            timeout_s=TIMEOUT_S,
            in_flight_max=in_flight_max,
            connect_attempts_max=connect_attempts_max,
        )


async def _start(
    *,
    in_flight_per_connection_max: int = 64,
    connections_max: int = 1024,
    hello_timeout_s: float = HELLO_TIMEOUT_S_DEFAULT,
    rate_limiter: RateLimiter | None = None,
) -> AsyncIterator[Rig]:
    ledger, clock = FakeLedger(), FakeClock()
    server = await start_rpc_server(
        ledger,
        KEY,
        host="127.0.0.1",
        port=0,
        clock_s=clock,
        in_flight_per_connection_max=in_flight_per_connection_max,
        connections_max=connections_max,
        hello_timeout_s=hello_timeout_s,
        rate_limiter=rate_limiter,
    )
    try:
        yield Rig(server, ledger, clock)
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async for running in _start():
        yield running


# What the server stamps on every item a token of the default tenant creates.
TENANT = tenant_slot(DEFAULT_TENANT)


def _account(id_: int) -> Account:
    return Account(id=id_, currency="EUR", user_data=f"account {id_}", tenant=TENANT)


def _transfer(id_: int) -> Transfer:
    return Transfer(id=id_, debit_account_id=1, credit_account_id=2, amount=id_, currency="EUR",
                    tenant=TENANT)


class Raw:
    """A bare TCP connection speaking frames, to send what the real client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, rig: Rig) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        return cls(reader, writer)

    async def send(self, data: bytes | wire.Request) -> None:
        self.writer.write(data if isinstance(data, bytes) else wire.encode_frame(data))
        await self.writer.drain()

    async def receive(self) -> wire.Response:
        async with asyncio.timeout(TIMEOUT_S):
            header = await self.reader.readexactly(wire.FRAME_HEADER_BYTES)
            return wire.decode_response(await self.reader.readexactly(wire.frame_length(header)))

    async def closed_by_server(self) -> bool:
        async with asyncio.timeout(TIMEOUT_S):
            return await self.reader.read(1) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


_SERVER_TASK_NAMES = frozenset({"_Server.handle", "_Connection._serve"})


def _server_tasks_count() -> int:
    """Connection handlers and request tasks of the RPC server still running."""
    return sum(
        1
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "__qualname__", "") in _SERVER_TASK_NAMES
    )


async def _server_tasks_settle(count_max: int = 0) -> None:
    """Wait until at most ``count_max`` server tasks are left running, or fail."""
    async with asyncio.timeout(TIMEOUT_S):
        while _server_tasks_count() > count_max:
            await asyncio.sleep(0.01)


async def test_round_trip_of_every_operation(rig: Rig) -> None:
    """Creates and lookups of both kinds travel through the real client and server intact."""
    async with rig.client() as client:
        assert await client.create_accounts([_account(1), _account(2)]) == [AccountResult.ok] * 2
        assert await client.create_accounts([_account(1)]) == [AccountResult.exists]
        assert await client.create_transfers([_transfer(10)]) == [TransferResult.ok]
        assert await client.lookup_accounts([2, 404, 1]) == [_account(2), None, _account(1)]
        assert await client.lookup_transfers([10, 11]) == [_transfer(10), None]
        assert client.token_expires_at_s == NOW_S + TTL_S


async def test_pipelining_100_concurrent_requests_on_one_connection() -> None:
    """100 concurrent calls share one connection, run concurrently, and each gets its answer."""
    async for rig in _start(in_flight_per_connection_max=128):
        await _pipeline_100(rig)


async def _pipeline_100(rig: Rig) -> None:
    for id_ in range(1, 101):
        rig.ledger.accounts[id_] = _account(id_)
    # Reverse delays make later requests finish first, so a mix-up by position would show.
    rig.ledger.delay_s = {id_: (101 - id_) * 0.001 for id_ in range(1, 101)}
    async with rig.client(in_flight_max=100) as client:
        connection = client._connection
        ids = list(range(1, 101))
        random.Random(7).shuffle(ids)
        answers = await asyncio.gather(*(client.lookup_accounts([id_, 0]) for id_ in ids))
        assert answers == [[_account(id_), None] for id_ in ids]
        assert client._connection is connection
    assert rig.ledger.calls_in_flight_peak > 50


async def test_many_pipelined_requests_from_raw_frames_match_by_request_id() -> None:
    """Responses are matched by request_id: 100 requests written at once all come back."""
    async for rig in _start(in_flight_per_connection_max=128):
        await _pipeline_100_raw(rig)


async def _pipeline_100_raw(rig: Rig) -> None:
    rig.ledger.delay_s = {id_: (101 - id_) * 0.001 for id_ in range(1, 101)}
    raw = await Raw.open(rig)
    await raw.send(wire.Hello(rig.token()))
    assert await raw.receive() == wire.HelloOk(NOW_S + TTL_S, wire.PROTOCOL_VERSION)
    frames = b"".join(
        wire.encode_frame(wire.CreateTransfers(1000 + id_, [_transfer(id_)]))
        for id_ in range(1, 101)
    )
    await raw.send(frames)
    responses = [await raw.receive() for _ in range(100)]
    await raw.close()
    assert sorted(r.request_id for r in responses if isinstance(r, wire.CreateTransfersResult)) == [
        1000 + id_ for id_ in range(1, 101)
    ]
    order = [r.request_id for r in responses if isinstance(r, wire.CreateTransfersResult)]
    assert order != sorted(order)


@pytest.mark.parametrize(
    ("scopes", "allowed"),
    [
        (["accounts:read"], "lookup_accounts"),
        (["accounts:write"], "create_accounts"),
        (["transfers:read"], "lookup_transfers"),
        (["transfers:write"], "create_transfers"),
    ],
)
async def test_each_operation_needs_its_scope(rig: Rig, scopes: list[str], allowed: str) -> None:
    """A token with one scope allows its operation and gets scope_missing for the three others."""
    calls: dict[str, Callable[[Client], Awaitable[object]]] = {
        "create_accounts": lambda client: client.create_accounts([_account(1)]),
        "create_transfers": lambda client: client.create_transfers([_transfer(1)]),
        "lookup_accounts": lambda client: client.lookup_accounts([1]),
        "lookup_transfers": lambda client: client.lookup_transfers([1]),
    }
    async with rig.client(rig.token(scopes)) as client:
        for name, call in calls.items():
            if name == allowed:
                await call(client)
                continue
            with pytest.raises(ClientError) as info:
                await call(client)
            assert info.value.code == "scope_missing"
    assert rig.ledger.calls_finished == 1


async def test_token_expiring_during_the_connection_then_refreshed(rig: Rig) -> None:
    """Once the clock passes exp, requests get token_expired; a new Hello restores service."""
    async with rig.client(rig.token(ttl_s=60)) as client:
        await client.lookup_accounts([1])
        rig.clock.now_s += 60
        with pytest.raises(ClientError) as info:
            await client.lookup_accounts([1])
        assert info.value.code == "token_expired"
        await client.set_token(rig.token(ttl_s=60))
        assert client.token_expires_at_s == NOW_S + 120
        assert await client.lookup_accounts([1]) == [None]


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (issue_token(KEY, SCOPES, ttl_s=60, now_s=NOW_S - 60), "token_expired"),
        (issue_token(bytes(32), SCOPES, ttl_s=60, now_s=NOW_S), "token_invalid"),
        ("not a token", "token_invalid"),
    ],
    ids=["expired", "other-key", "garbage"],
)
async def test_refused_hello_fails_connect(
    rig: Rig, token: str, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused token fails connect with its code, at once, and is never logged."""
    caplog.set_level(logging.DEBUG)
    client = rig.client(token, connect_attempts_max=3)
    with pytest.raises(ClientError) as info:
        await client.connect()
    assert info.value.code == code
    await client.close()
    assert all(token not in record.getMessage() for record in caplog.records)


async def test_refused_refresh_closes_the_connection(rig: Rig) -> None:
    """A bad token sent to refresh is refused and the connection closed, as documented."""
    raw = await Raw.open(rig)
    await raw.send(wire.Hello(rig.token()))
    assert isinstance(await raw.receive(), wire.HelloOk)
    await raw.send(wire.Hello("forged"))
    error = await raw.receive()
    assert isinstance(error, wire.Error)
    assert (error.request_id, error.code) == (None, "token_invalid")
    assert await raw.closed_by_server()
    await raw.close()


async def test_request_before_hello_is_refused(rig: Rig) -> None:
    """A request sent as the first frame gets token_missing and the connection is closed."""
    raw = await Raw.open(rig)
    await raw.send(wire.LookupAccounts(1, [1]))
    error = await raw.receive()
    assert isinstance(error, wire.Error)
    assert (error.request_id, error.code) == (None, "token_missing")
    assert await raw.closed_by_server()
    await raw.close()
    assert rig.ledger.calls_finished == 0


async def test_silent_connection_is_closed_after_the_hello_timeout() -> None:
    """A connection that never sends Hello is refused after hello_timeout_s, freeing its slot."""
    async for rig in _start(hello_timeout_s=0.2):
        raw = await Raw.open(rig)
        error = await raw.receive()
        assert isinstance(error, wire.Error)
        assert (error.request_id, error.code) == (None, "token_missing")
        assert await raw.closed_by_server()
        await raw.close()


@pytest.mark.parametrize(
    "body",
    [b"\xc1garbage", b"", wire.encode_frame(wire.HelloOk(5))[4:]],
    ids=["garbage", "empty", "response-as-request"],
)
async def test_garbage_frame_is_refused_and_the_connection_closed(rig: Rig, body: bytes) -> None:
    """A body that is not a request gets malformed_frame and the connection is closed."""
    raw = await Raw.open(rig)
    await raw.send(wire.Hello(rig.token()))
    await raw.receive()
    await raw.send(struct.pack(">I", len(body)) + body)
    error = await raw.receive()
    assert isinstance(error, wire.Error)
    assert (error.request_id, error.code) == (None, "malformed_frame")
    assert await raw.closed_by_server()
    await raw.close()


async def test_oversized_frame_is_refused_before_its_body_is_read(rig: Rig) -> None:
    """A length prefix over FRAME_BYTES_MAX gets frame_too_large at once, body never sent."""
    raw = await Raw.open(rig)
    await raw.send(wire.Hello(rig.token()))
    await raw.receive()
    await raw.send(struct.pack(">I", wire.FRAME_BYTES_MAX + 1))
    error = await raw.receive()
    assert isinstance(error, wire.Error)
    assert (error.request_id, error.code) == (None, "frame_too_large")
    assert await raw.closed_by_server()
    await raw.close()


async def test_batch_over_the_limit_is_refused_and_the_limit_itself_served(rig: Rig) -> None:
    """8,190 items get batch_too_large without reaching the ledger; 8,189 are served."""
    async with rig.client() as client:
        with pytest.raises(ClientError) as info:
            await client.create_transfers([_transfer(id_) for id_ in range(1, 8191)])
        assert info.value.code == "batch_too_large"
        with pytest.raises(ClientError) as info:
            await client.lookup_accounts(list(range(BATCH_ITEMS_MAX + 1)))
        assert info.value.code == "batch_too_large"
        assert rig.ledger.calls_finished == 0
        batch = [_transfer(id_) for id_ in range(1, BATCH_ITEMS_MAX + 1)]
        assert await client.create_transfers(batch) == [TransferResult.ok] * BATCH_ITEMS_MAX
        # The connection survived the refusals: it is the one that served the full batch.
        assert await client.lookup_transfers([BATCH_ITEMS_MAX]) == [batch[-1]]


@pytest.mark.parametrize(
    "cut",
    [2, wire.FRAME_HEADER_BYTES + 3],
    ids=["in-header", "in-body"],
)
async def test_disconnect_mid_frame_leaves_nothing_behind(
    rig: Rig, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A client vanishing mid-frame ends its connection quietly while others are served."""
    caplog.set_level(logging.WARNING)
    async with rig.client() as other:
        raw = await Raw.open(rig)
        await raw.send(wire.Hello(rig.token()))
        await raw.receive()
        await raw.send(wire.encode_frame(wire.LookupAccounts(1, [1, 2, 3]))[:cut])
        await raw.close()
        await _server_tasks_settle(count_max=1)
        assert await other.create_accounts([_account(5)]) == [AccountResult.ok]
    await _server_tasks_settle()
    assert [record for record in caplog.records if record.name.startswith("actors")] == []


async def test_disconnect_mid_request_finishes_its_task_quietly(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A request whose client vanished still ends, and its answer is dropped without errors."""
    caplog.set_level(logging.WARNING)
    rig.ledger.gate = asyncio.Event()
    raw = await Raw.open(rig)
    await raw.send(wire.Hello(rig.token()))
    await raw.receive()
    await raw.send(wire.CreateAccounts(1, [_account(9)]))
    async with asyncio.timeout(TIMEOUT_S):
        while rig.ledger.calls_in_flight == 0:
            await asyncio.sleep(0.01)
    raw.writer.transport.abort()
    rig.ledger.gate.set()
    await _server_tasks_settle()
    assert rig.ledger.calls_finished == 1
    assert [record for record in caplog.records if record.name.startswith("actors")] == []


@pytest.mark.parametrize(
    ("error", "raised", "code"),
    [
        (Overloaded("shard queue full", retry_after_s=2.5), Overloaded, "overloaded"),
        (Unavailable("shard restarting", retry_after_s=7.0), Unavailable, "unavailable"),
        (LedgerError("something else", retry_after_s=1.0), ClientError, "ledger_error"),
    ],
)
async def test_ledger_errors_map_to_their_code_and_retry_after(
    rig: Rig, error: LedgerError, raised: type[Exception], code: str
) -> None:
    """A LedgerError raised by the service reaches the client with its code and retry_after_s."""
    rig.ledger.error = error
    async with rig.client() as client:
        with pytest.raises(raised) as info:
            await client.create_transfers([_transfer(1)])
        assert getattr(info.value, "code") == code  # noqa: B009
        assert getattr(info.value, "retry_after_s") == error.retry_after_s  # noqa: B009
        assert getattr(info.value, "message") == error.message  # noqa: B009
        rig.ledger.error = None
        assert await client.create_transfers([_transfer(1)]) == [TransferResult.ok]


async def test_bug_in_the_service_is_answered_internal_and_logged(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception in the service answers internal, is logged, and harms nothing."""
    rig.ledger.error = ZeroDivisionError("a bug")
    async with rig.client() as client:
        with pytest.raises(ClientError) as info:
            await client.lookup_transfers([1])
        assert info.value.code == "internal"
        rig.ledger.error = None
        assert await client.lookup_transfers([1]) == [None]
    assert any(record.exc_info and record.levelno == logging.ERROR for record in caplog.records)


async def test_in_flight_limit_answers_too_many_in_flight() -> None:
    """Beyond in_flight_per_connection_max, requests are refused rather than queued."""
    async for rig in _start(in_flight_per_connection_max=2):
        rig.ledger.gate = asyncio.Event()
        async with rig.client(in_flight_max=3) as client:
            held = [asyncio.create_task(client.lookup_accounts([id_])) for id_ in (1, 2)]
            async with asyncio.timeout(TIMEOUT_S):
                while rig.ledger.calls_in_flight < 2:
                    await asyncio.sleep(0.01)
            with pytest.raises(ClientError) as info:
                await client.lookup_accounts([3])
            assert info.value.code == "too_many_in_flight"
            assert info.value.retry_after_s > 0
            rig.ledger.gate.set()
            assert await asyncio.gather(*held) == [[None], [None]]


async def test_connections_over_the_limit_are_refused_overloaded() -> None:
    """A connection beyond connections_max is told overloaded; the first keeps working."""
    async for rig in _start(connections_max=1):
        async with rig.client() as first:
            second = rig.client(connect_attempts_max=2)
            with pytest.raises(Overloaded):
                await second.connect()
            await second.close()
            assert await first.lookup_accounts([1]) == [None]


async def test_dropped_connection_fails_pending_calls_then_reconnects(rig: Rig) -> None:
    """Calls waiting on a dropped connection fail Unavailable; the next call reconnects."""
    rig.ledger.gate = asyncio.Event()
    async with rig.client() as client:
        pending = asyncio.create_task(client.lookup_accounts([1]))
        async with asyncio.timeout(TIMEOUT_S):
            while rig.ledger.calls_in_flight == 0:
                await asyncio.sleep(0.01)
        connection = client._connection
        assert connection is not None
        connection.writer.transport.abort()
        with pytest.raises(Unavailable):
            await pending
        rig.ledger.gate = None
        assert await client.lookup_accounts([1]) == [None]
        assert client._connection is not connection


async def test_call_timeout_raises_and_the_late_answer_is_dropped(rig: Rig) -> None:
    """A call unanswered within timeout_s raises TimeoutError; the connection stays usable."""
    rig.ledger.gate = asyncio.Event()
    async with Client("127.0.0.1", rig.port, rig.token(), timeout_s=0.2) as client:
        with pytest.raises(TimeoutError):
            await client.lookup_accounts([1])
        rig.ledger.gate.set()
        rig.ledger.gate = None
        assert await client.lookup_accounts([2]) == [None]


async def test_closed_client_refuses_calls(rig: Rig) -> None:
    """After close(), a call raises client_closed instead of silently reconnecting."""
    client = rig.client()
    await client.connect()
    await client.close()
    with pytest.raises(ClientError) as info:
        await client.lookup_accounts([1])
    assert info.value.code == "client_closed"


async def test_refused_refresh_via_client_then_a_good_token_reconnects(rig: Rig) -> None:
    """set_token with a bad token raises its code; a good one afterwards reconnects."""
    async with rig.client() as client:
        with pytest.raises(ClientError) as info:
            await client.set_token("forged")
        assert info.value.code == "token_invalid"
        await client.set_token(rig.token(["accounts:read"]))
        assert await client.lookup_accounts([1]) == [None]


async def test_columnar_batches_need_protocol_version_2(rig: Rig) -> None:
    """A version-1 connection's CreateTransferBatch is refused with a clear code (the
    connection stays open), and a Hello naming an unknown version ends the connection."""
    batch = TransferBatch.from_arrays(id=[1], debit_account_id=[1], credit_account_id=[2],
                                      amount=[5], currency="EUR")
    raw = await Raw.open(rig)
    await raw.send(wire.Hello(rig.token()))  # no version: the first one
    assert await raw.receive() == wire.HelloOk(NOW_S + TTL_S, wire.PROTOCOL_VERSION)
    await raw.send(wire.CreateTransferBatch(7, *batch.column_bytes(), []))
    answer = await raw.receive()
    assert isinstance(answer, wire.Error)
    assert (answer.request_id, answer.code) == (7, "protocol_version_unsupported")
    await raw.send(wire.LookupTransfers(8, [1]))
    assert isinstance(await raw.receive(), wire.LookupTransfersResult)
    assert rig.ledger.transfers == {}
    await raw.close()
    raw = await Raw.open(rig)
    await raw.send(wire.Hello(rig.token(), 99))
    refused = await raw.receive()
    assert isinstance(refused, wire.Error) and refused.code == "protocol_version_unsupported"
    assert await raw.closed_by_server()


async def test_a_malformed_columnar_batch_is_refused_whole(rig: Rig) -> None:
    """Columns of different lengths or out-of-range values answer invalid_batch for that
    request only; nothing reaches the ledger and the connection goes on."""
    cols = list(TransferBatch.from_arrays(id=[1, 2], debit_account_id=[1, 1],
                                          credit_account_id=[2, 2], amount=[5, 6],
                                          currency="EUR").column_bytes())
    short = [*cols]
    short[3] = short[3][:8]  # one amount for two ids
    negative = [*cols]
    negative[0] = (-1).to_bytes(8, "little", signed=True) * 2
    raw = await Raw.open(rig)
    await raw.send(wire.Hello(rig.token(), wire.PROTOCOL_VERSION))
    await raw.receive()
    for request_id, columns in ((1, short), (2, negative)):
        await raw.send(wire.CreateTransferBatch(request_id, *columns, []))
        answer = await raw.receive()
        assert isinstance(answer, wire.Error), answer
        assert (answer.request_id, answer.code) == (request_id, "invalid_batch")
    assert rig.ledger.transfers == {}
    await raw.send(wire.CreateTransferBatch(3, *cols, []))
    done = await raw.receive()
    assert isinstance(done, wire.CreateTransferBatchResult) and done.codes == bytes([0, 0])
    await raw.close()


async def test_an_oversized_columnar_batch_is_too_large(rig: Rig) -> None:
    """More than BATCH_ITEMS_MAX transfers in columns answers batch_too_large."""
    n = BATCH_ITEMS_MAX + 1
    batch = TransferBatch.from_arrays(id=range(1, n + 1), debit_account_id=[1] * n,
                                      credit_account_id=[2] * n, amount=[1] * n,
                                      currency="EUR")
    async with rig.client() as client:
        with pytest.raises(ClientError) as raised:
            await client.create_transfers(batch)
    assert raised.value.code == "batch_too_large"


async def test_the_processors_own_ids_are_refused_without_the_system_scope(rig: Rig) -> None:
    """Accounts, transfers and columnar batches naming an id from 2^62 up are refused with
    ``id_reserved`` and reach no ledger, unless the token holds the system scope."""
    reserved = 2**62
    requests: list[Callable[[Client], Awaitable[object]]] = [
        lambda c: c.create_accounts([_account(3), _account(reserved + 1)]),
        lambda c: c.create_transfers([Transfer(id=20, debit_account_id=reserved,
                                               credit_account_id=2, amount=1,
                                               currency="EUR")]),
        lambda c: c.create_transfers(TransferBatch.from_arrays(
            id=[21, 22], debit_account_id=[1, 1], credit_account_id=[2, reserved + 9],
            amount=[1, 1], currency="EUR")),
    ]
    async with rig.client() as client:
        for request in requests:
            with pytest.raises(ClientError) as caught:
                await request(client)
            assert caught.value.code == "id_reserved"
    assert rig.ledger.accounts == {} and rig.ledger.transfers == {}
    async with rig.client(rig.token((*SCOPES, "ledger:system"))) as system:
        for request in requests:
            await request(system)
    assert reserved + 1 in rig.ledger.accounts


async def test_rate_limit_counts_items_and_refuses_whole_requests() -> None:
    """Over RPC a request takes one operation per item; one beyond the principal's budget
    is answered rate_limited (the client raises Overloaded with the wait) and applies
    nothing, while another principal is served."""
    async for rig in _start(rate_limiter=RateLimiter(10, 5)):
        async with rig.client() as client:
            assert await client.create_accounts([_account(i) for i in (1, 2, 3, 4)]) == \
                [AccountResult.ok] * 4
            with pytest.raises(Overloaded) as refused:
                await client.create_transfers([_transfer(10), _transfer(11)])
            assert refused.value.retry_after_s == pytest.approx(0.1)
            assert 10 not in rig.ledger.transfers
            other = issue_token(KEY, SCOPES, ttl_s=TTL_S, now_s=int(rig.clock.now_s),
                                subject="other")
            async with rig.client(other) as second:
                assert await second.lookup_accounts([1]) == [_account(1)]
            rig.clock.now_s += 0.2
            assert await client.create_transfers([_transfer(10), _transfer(11)]) == \
                [TransferResult.ok] * 2
