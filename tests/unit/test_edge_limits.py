"""Tests of the edge limits' pure parts: the per-peer counter, the limits' validation, and
that the configuration, the listeners and the wire protocol agree on every default.

The deadlines themselves are watched on real sockets in tests/e2e/test_edge_hardening.py.
"""

from __future__ import annotations

import socket
from typing import Any

import msgspec
import pytest

from actors.edge import rpc_server
from actors.edge.limits import (
    HttpLimits,
    PeerConnections,
    enable_tcp_keepalive,
    http_server,
    peer_host,
)
from processor import wire
from processor.config import Config, FrontConfig, ShardConfig

HTTP_FIELDS = {
    "header_timeout_s": "http_header_timeout_s",
    "header_bytes_max": "http_header_bytes_max",
    "body_timeout_s": "http_body_timeout_s",
    "keep_alive_timeout_s": "http_keep_alive_timeout_s",
    "write_timeout_s": "http_write_timeout_s",
    "connections_max": "http_connections_max",
    "connections_per_peer_max": "http_connections_per_peer_max",
}
RPC_DEFAULTS = {
    "rpc_connections_max": rpc_server.CONNECTIONS_MAX_DEFAULT,
    "rpc_connections_per_peer_max": rpc_server.CONNECTIONS_PER_PEER_MAX_DEFAULT,
    "rpc_hello_timeout_s": rpc_server.HELLO_TIMEOUT_S_DEFAULT,
    "rpc_hello_bytes_max": rpc_server.HELLO_BYTES_MAX_DEFAULT,
    "rpc_idle_timeout_s": rpc_server.IDLE_TIMEOUT_S_DEFAULT,
    "rpc_frame_timeout_s": rpc_server.FRAME_TIMEOUT_S_DEFAULT,
    "rpc_write_timeout_s": rpc_server.WRITE_TIMEOUT_S_DEFAULT,
    "rpc_token_grace_s": rpc_server.TOKEN_GRACE_S_DEFAULT,
}


def _config(**front: Any) -> Config:
    return Config(shard=ShardConfig(database_url="postgresql://db", shards=2),
                  front=FrontConfig(**front), data_dir="/tmp/txproc")


# -- PeerConnections ------------------------------------------------------------------------------


def test_each_peer_gets_its_own_cap() -> None:
    """A peer at its cap is refused while another peer is still admitted."""
    peers = PeerConnections(per_peer_max=2)
    assert [peers.try_open("10.0.0.1") for _ in range(3)] == [True, True, False]
    assert peers.try_open("10.0.0.2")
    assert (peers.count("10.0.0.1"), peers.count("10.0.0.2")) == (2, 1)


def test_a_closed_connection_frees_its_peers_slot_and_forgets_an_idle_peer() -> None:
    """Closing makes room for one more, and a peer with nothing open is not remembered."""
    peers = PeerConnections(per_peer_max=1)
    assert peers.try_open("a")
    assert not peers.try_open("a")
    peers.close("a")
    assert peers.count("a") == 0
    assert peers._open == {}
    assert peers.try_open("a")


def test_closing_a_connection_never_counted_is_a_bug() -> None:
    """A close without its open would let the peer exceed its cap later: it raises."""
    peers = PeerConnections(per_peer_max=1)
    with pytest.raises(RuntimeError):
        peers.close("a")


def test_slot_holds_one_connection_for_the_block_and_nothing_when_refused() -> None:
    """The context manager releases what it took, also on error, and takes nothing when
    the peer is at its cap."""
    peers = PeerConnections(per_peer_max=1)
    with pytest.raises(KeyError), peers.slot("a") as admitted:
        assert admitted
        assert peers.count("a") == 1
        with peers.slot("a") as second:
            assert not second
        assert peers.count("a") == 1
        raise KeyError("the connection failed")
    assert peers.count("a") == 0


@pytest.mark.parametrize("per_peer_max", [0, -1])
def test_a_cap_below_one_is_refused(per_peer_max: int) -> None:
    """Zero never means unbounded."""
    with pytest.raises(ValueError, match="per_peer_max"):
        PeerConnections(per_peer_max)


@pytest.mark.parametrize(
    ("peername", "host"),
    [(("192.0.2.1", 5000), "192.0.2.1"), (("::1", 5000, 0, 0), "::1"), (None, ""), ("", "")],
    ids=["ipv4", "ipv6", "none", "unix"],
)
def test_peer_host_is_the_address_without_the_port(peername: object, host: str) -> None:
    """Connections from one host share a cap whatever their source ports."""
    assert peer_host(peername) == host


# -- HttpLimits and the server built from them ----------------------------------------------------


@pytest.mark.parametrize("field", sorted(HTTP_FIELDS))
def test_http_limits_refuse_a_limit_that_is_not_positive(field: str) -> None:
    """Each limit names itself when it is zero."""
    with pytest.raises(ValueError, match=field):
        HttpLimits(**{field: 0})


def test_http_server_hands_the_limits_to_uvicorn_and_its_protocol() -> None:
    """uvicorn gets the keep-alive timeout and the concurrency limit, websockets are off,
    and the protocol it builds per connection carries the limits and one peer counter."""
    limits = HttpLimits(keep_alive_timeout_s=1.5, connections_max=7, connections_per_peer_max=3)
    config = http_server(object(), host="127.0.0.1", port=0, limits=limits).config
    assert (config.timeout_keep_alive, config.limit_concurrency, config.ws) == (1.5, 7, "none")
    protocol: Any = config.http
    assert protocol.limits is limits
    assert protocol.peers.per_peer_max == 3


# -- One default in each place --------------------------------------------------------------------


def test_front_config_defaults_are_the_http_listeners_own() -> None:
    """FrontConfig's http_* defaults equal HttpLimits' (the two cannot drift apart)."""
    front, limits = FrontConfig(), HttpLimits()
    assert {f: getattr(front, name) for f, name in HTTP_FIELDS.items()} == msgspec.structs.asdict(
        limits)


def test_front_config_defaults_are_the_rpc_listeners_own() -> None:
    """FrontConfig's rpc_* defaults equal start_rpc_server's."""
    front = FrontConfig()
    assert {name: getattr(front, name) for name in RPC_DEFAULTS} == RPC_DEFAULTS


def test_the_default_hello_limit_holds_the_largest_hello() -> None:
    """HELLO_BYTES_MAX is the size of the largest legal Hello, and the default limit holds
    it with room to spare while staying far below a full frame."""
    largest = wire.Hello("\U0010ffff" * wire.TOKEN_CHARS_MAX, 65535)
    assert len(wire.encode_frame(largest)) - wire.FRAME_HEADER_BYTES == wire.HELLO_BYTES_MAX
    assert wire.HELLO_BYTES_MAX < rpc_server.HELLO_BYTES_MAX_DEFAULT < wire.FRAME_BYTES_MAX


@pytest.mark.parametrize(
    ("front", "what"),
    [
        ({"http_header_timeout_s": 0.0}, "http_header_timeout_s > 0"),
        ({"http_connections_per_peer_max": 0}, "http_connections_per_peer_max > 0"),
        ({"rpc_idle_timeout_s": 0.0}, "rpc_idle_timeout_s > 0"),
        ({"rpc_write_timeout_s": -1.0}, "rpc_write_timeout_s > 0"),
        ({"rpc_hello_bytes_max": 1024}, "rpc_hello_bytes_max"),
        ({"rpc_hello_bytes_max": wire.FRAME_BYTES_MAX + 1}, "rpc_hello_bytes_max"),
    ],
    ids=["http-header", "http-peer", "rpc-idle", "rpc-write", "hello-small", "hello-large"],
)
def test_config_check_refuses_edge_limits_that_would_not_hold(
    front: dict[str, Any], what: str
) -> None:
    """A zero or negative deadline or cap, or a Hello limit a legal Hello would break, is
    refused at startup, naming the limit."""
    _config().check()
    with pytest.raises(ValueError, match=what):
        _config(**front).check()


@pytest.mark.parametrize(
    "limits",
    [{"idle_timeout_s": 0}, {"connections_per_peer_max": 0}, {"token_grace_s": -1},
     {"hello_bytes_max": wire.HELLO_BYTES_MAX - 1}],
    ids=["idle", "peer", "grace", "hello"],
)
async def test_start_rpc_server_refuses_limits_that_would_not_hold(limits: dict[str, int]) -> None:
    """The RPC listener checks its limits itself before it binds."""
    service: Any = object()  # never called: the limits are refused first
    with pytest.raises(ValueError, match=next(iter(limits))):
        await rpc_server.start_rpc_server(service, b"k" * 32, host="127.0.0.1", port=0,
                                          clock_s=lambda: 0.0, **limits)


# -- TCP keepalive --------------------------------------------------------------------------------


def test_tcp_keepalive_is_turned_on_for_tcp_sockets_only() -> None:
    """A TCP socket gets SO_KEEPALIVE (and Linux's probe timing); a Unix socket is left as is."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        enable_tcp_keepalive(tcp)
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        enable_tcp_keepalive(unix)
        assert unix.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    enable_tcp_keepalive(None)
