"""Clients that vanish at every step of every proxy leave nothing behind.

The proxies dial through a real NetStack ("ours", A) linked in memory to a second
one (the "tailnet peer", B, with a TCP echo on port 80 and a UDP echo on port 53), so
each test can count what the drop left in our netstack: TCP connections and UDP
endpoints, besides the proxy's own counters and this process's descriptors.
10.0.0.99 is a black hole: B drops what is sent there, so a connection to it stays
in SYN_SENT until something aborts it.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from tests.unit.netstack.simlink import B4, linked_stacks
from trionet.errors import ConfigError
from trionet.netaddr import split_host_port
from trionet.netstack import NetStack, TcpConfig
from trionet.netstack.driver import TcpStream
from trionet.node import _NamedUdp
from trionet.proxy import server, socks5

BLACK_HOLE = "10.0.0.99"


class StackDialer:
    """A node's dialer over netstack A: "peer" is B; other names are unknown."""

    def __init__(self, stack: NetStack, nursery: trio.Nursery) -> None:
        self.stack = stack
        # what _NamedUdp needs (no netmap: no route table to consult)
        self.node = SimpleNamespace(addresses_of=self.addresses_of, _dial_route=lambda addr: None,
                                    _nursery=nursery)
        self.dials = 0

    async def addresses_of(self, host: str) -> list[str]:
        return [await self.resolve(host)]

    async def resolve(self, host: str) -> str:
        if host == "peer":
            return str(B4)
        if host[0].isdigit():
            return host
        raise ConfigError(f"unknown peer {host!r}")

    async def open_tcp_stream(self, host: str, port: int) -> trio.abc.Stream:
        self.dials += 1
        return await self.stack.open_tcp_stream(await self.resolve(host), port)

    async def open_udp(self) -> server.UdpEndpoint:
        return _NamedUdp(self.node, self.stack.udp_bind())  # type: ignore[arg-type]


class Net:
    def __init__(self, a: NetStack, b: NetStack, dialer: StackDialer, nursery: trio.Nursery) -> None:
        self.a, self.b, self.dialer, self.nursery = a, b, dialer, nursery

    def ours(self) -> tuple[int, int]:
        """Our netstack's TCP connections (any state) and UDP endpoints."""
        stats = self.a.statistics()
        return stats["tcp_connections"], stats["udp_sockets"]

    def peers(self) -> int:
        return int(self.b.statistics()["tcp_connections"])

    async def start(self, proxy: Any) -> int:
        port: int = await self.nursery.start(proxy.serve)
        return port


async def _echo_upper(stream: trio.abc.Stream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data.upper())
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _tcp_echo(stack: NetStack, port: int, nursery: trio.Nursery) -> None:
    async with stack.listen_tcp(port) as listener:
        while True:
            nursery.start_soon(_echo_upper, await listener.accept())


async def _udp_echo(stack: NetStack, port: int) -> None:
    async with stack.udp_bind(port) as ep:
        while True:
            data, src = await ep.receive()
            await ep.send(b"echo:" + data, src)


@pytest.fixture
async def net(nursery: trio.Nursery) -> AsyncIterator[Net]:
    # a short TIME_WAIT: a graceful close's leftover is not what these tests look for
    async with linked_stacks(config=TcpConfig(msl=0.05)) as (a, b), trio.open_nursery() as inner:
        inner.start_soon(_tcp_echo, b, 80, inner)
        inner.start_soon(_udp_echo, b, 53)
        await trio.testing.wait_all_tasks_blocked()
        yield Net(a, b, StackDialer(a, inner), nursery)
        inner.cancel_scope.cancel()


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def eventually(cond: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    with trio.move_on_after(limit):
        while not cond():
            await trio.sleep(0.005)
    assert cond(), what


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def drop(stream: trio.SocketStream, how: str) -> None:
    """``close``: FIN, as a program that exits; ``reset``: RST, as one killed mid-write."""
    if how == "reset":
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def recv_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await stream.receive_some(n - len(out))
        assert chunk, f"closed after {out!r}"
        out += chunk
    return out


async def recv_all(stream: trio.abc.Stream) -> bytes:
    out = b""
    try:
        while chunk := await stream.receive_some(65536):
            out += chunk
    except trio.BrokenResourceError:
        pass
    return out


def accounted(proxy: Any) -> dict[str, Any]:
    """The proxy's statistics, once every accepted client is in exactly one bucket."""
    st: dict[str, Any] = proxy.statistics()
    ended = st["completed"] + sum(st["failed"].values()) + sum(st["handshake_errors"].values())
    assert st["accepted"] == ended + st["live_connections"], st
    return st


async def all_released(net: Net, proxy: Any, fds_before: int) -> dict[str, Any]:
    await eventually(lambda: proxy.statistics()["live_connections"] == 0, "the client's task ended")
    await eventually(lambda: net.ours() == (0, 0), f"our netstack back to empty, not {net.ours()}")
    await eventually(lambda: fds() == fds_before, f"{fds() - fds_before} descriptors left open")
    st = accounted(proxy)
    assert st["live_udp_associations"] == 0
    return st


SOCKS_REQUEST = b"\x05\x01\x00" + socks5.encode_address("peer", 80)
HOW = pytest.mark.parametrize("how", ["close", "reset"])


# ------------------------------------------------------------------------ SOCKS5


@HOW
@pytest.mark.parametrize(("sent", "reply", "stage"), [
    (b"", 0, "greeting"),  # accepted, not a byte sent
    (b"\x05", 0, "greeting"),  # mid-greeting
    (b"\x05\x01\x00", 2, "request"),  # after the greeting, before the request
    (b"\x05\x01\x00" + SOCKS_REQUEST[:6], 2, "request"),  # mid-request
], ids=["accepted", "mid_greeting", "after_greeting", "mid_request"])
async def test_socks5_client_drops_during_handshake(net: Net, how: str, sent: bytes, reply: int,
                                                    stage: str) -> None:
    proxy = server.Socks5Proxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await eventually(lambda: proxy.statistics()["accepted"] == 1, "accepted")
    await client.send_all(sent)
    if reply:
        await recv_exactly(client, reply)  # all read: a close sends FIN, not RST
    await drop(client, how)
    st = await all_released(net, proxy, before)
    kind = "closed" if how == "close" else "reset"
    assert st["handshake_errors"] == {f"{kind}.{stage}": 1}
    assert net.dialer.dials == 0


@HOW
async def test_socks5_client_drops_mid_auth(net: Net, how: str) -> None:
    proxy = server.Socks5Proxy(0, net.dialer, auth=("user", "secret"))
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(b"\x05\x01\x02")
    assert await recv_exactly(client, 2) == b"\x05\x02"
    await client.send_all(b"\x01\x04us")
    await drop(client, how)
    st = await all_released(net, proxy, before)
    assert st["handshake_errors"] == {("closed" if how == "close" else "reset") + ".auth": 1}


async def test_socks5_wrong_password_and_unsupported_command_are_handshake_errors(net: Net) -> None:
    proxy = server.Socks5Proxy(0, net.dialer, auth=("user", "secret"))
    port = await net.start(proxy)
    client = await connect(port)
    await client.send_all(b"\x05\x01\x02\x01\x04user\x05wrong")
    assert await recv_all(client) == b"\x05\x02\x01\x01"
    client = await connect(port)
    await client.send_all(b"\x05\x01\x02\x01\x04user\x06secret\x05\x02\x00" + socks5.encode_address("peer", 80))
    reply = await recv_all(client)
    assert reply[4:6] == bytes([5, socks5.Reply.COMMAND_NOT_SUPPORTED])  # BIND, after the method and auth replies
    client = await connect(port)
    await client.send_all(b"\x05\x01\x00")  # no username/password offered
    assert await recv_all(client) == b"\x05\xff"
    await eventually(lambda: proxy.statistics()["live_connections"] == 0, "all ended")
    assert accounted(proxy)["handshake_errors"] == {"auth_failed": 1, "unsupported_command": 1,
                                                    "no_acceptable_method": 1}


async def test_socks5_silent_client_is_dropped_at_the_handshake_timeout(
        net: Net, autojump_clock: trio.testing.MockClock) -> None:
    proxy = server.Socks5Proxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(b"\x05\x01\x00\x05\x01")  # a greeting and two bytes of a request, then silence
    start = trio.current_time()
    assert await recv_all(client) == b"\x05\x00"  # the proxy closes
    assert trio.current_time() - start >= server.HANDSHAKE_TIMEOUT
    await client.aclose()
    st = await all_released(net, proxy, before)
    assert st["handshake_errors"] == {"timeout.request": 1}


@HOW
async def test_socks5_client_leaves_while_the_tailnet_connect_is_in_progress(net: Net, how: str) -> None:
    proxy = server.Socks5Proxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(b"\x05\x01\x00\x05\x01\x00" + socks5.encode_address(BLACK_HOLE, 80))
    await recv_exactly(client, 2)
    await eventually(lambda: net.ours() == (1, 0), "the connection to the black hole is being opened")
    [conn] = net.a.core.conns.values()
    assert conn.state.name == "SYN_SENT"
    await drop(client, how)
    st = await all_released(net, proxy, before)  # aborted now, not after the SYN retries (~2 min)
    assert st["failed"] == {f"client_{'closed' if how == 'close' else 'reset'}_while_connecting": 1}
    assert conn.state.name == "CLOSED"


async def test_socks5_connect_times_out_and_closes_the_half_open_connection(
        net: Net, autojump_clock: trio.testing.MockClock) -> None:
    proxy = server.Socks5Proxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(b"\x05\x01\x00\x05\x01\x00" + socks5.encode_address(BLACK_HOLE, 80))
    start = trio.current_time()
    got = await recv_all(client)
    assert trio.current_time() - start >= server.CONNECT_TIMEOUT
    assert got[:2] == b"\x05\x00" and got[3] == socks5.Reply.HOST_UNREACHABLE
    await client.aclose()
    st = await all_released(net, proxy, before)
    assert st["failed"] == {"connect_timeout": 1}


@HOW
async def test_socks5_client_drops_after_the_connect_reply(net: Net, how: str) -> None:
    proxy = server.Socks5Proxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(b"\x05\x01\x00" + SOCKS_REQUEST + b"hi")
    assert (await recv_exactly(client, 12))[:5] == b"\x05\x00\x05\x00\x00"  # method reply, then CONNECT reply
    assert await recv_exactly(client, 2) == b"HI"
    await drop(client, how)
    st = await all_released(net, proxy, before)
    if how == "close":  # a FIN passes through as a half-close; the echo then closes: a clean end
        assert (st["completed"], st["failed"]) == (1, {})
    else:  # a reset resets the tailnet side too: nothing lingers on either stack
        assert st["failed"] == {"client_reset": 1}
        await eventually(lambda: net.peers() == 0, "the peer's side reset too")


async def test_socks5_tailnet_reset_resets_the_client(net: Net) -> None:
    proxy = server.Socks5Proxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(b"\x05\x01\x00" + SOCKS_REQUEST)
    await recv_exactly(client, 12)
    await eventually(lambda: net.peers() == 1, "connected to the peer")
    [peer_side] = net.b.core.conns.values()
    peer_side.abort(trio.current_time(), "test")  # the peer sends RST
    net.b.after_core_call()
    with pytest.raises(trio.BrokenResourceError):  # ECONNRESET: passed on, not turned into a clean EOF
        await client.receive_some(10)
    await client.aclose()
    st = await all_released(net, proxy, before)
    assert st["failed"] == {"target_reset": 1}


@HOW
@pytest.mark.parametrize("read_reply", [False, True], ids=["right_after_request", "after_reply"])
async def test_socks5_udp_associate_client_vanishes(net: Net, how: str, read_reply: bool) -> None:
    proxy = server.Socks5Proxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(b"\x05\x01\x00\x05\x03\x00\x01" + bytes(6))
    await recv_exactly(client, 2)
    if read_reply:
        reply = await recv_exactly(client, 10)
        relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
        await eventually(lambda: net.ours() == (0, 1), "a netstack endpoint for the association")
        assert proxy.statistics()["live_udp_associations"] == 1
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.sendto(socks5.build_udp_datagram("peer", 53, b"ping"), relay)
        got = await udp.recv(2048)
        assert socks5.parse_udp_datagram(got).data == b"echo:ping"
        udp.close()
    await drop(client, how)
    st = await all_released(net, proxy, before)  # the host UDP socket and the netstack endpoint both closed
    if read_reply:
        assert (st["completed"], st["failed"]) == ((1, {}) if how == "close" else (0, {"client_reset": 1}))
    else:  # ended by the close, or by the reply meeting a closed socket
        assert st["completed"] + sum(st["failed"].values()) == 1
        assert set(st["failed"]) <= {"client_reset"}


async def test_socks5_udp_associate_without_a_netstack_endpoint_closes_its_socket(net: Net) -> None:
    async def no_udp() -> server.UdpEndpoint:
        raise ConfigError("no UDP here")

    net.dialer.open_udp = no_udp  # type: ignore[method-assign]
    proxy = server.Socks5Proxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(b"\x05\x01\x00\x05\x03\x00\x01" + bytes(6))
    got = await recv_all(client)
    assert got[3] == socks5.Reply.GENERAL_FAILURE
    await client.aclose()
    st = await all_released(net, proxy, before)
    assert st["failed"] == {"udp_unavailable": 1}


async def test_udp_datagrams_from_elsewhere_are_counted_not_relayed(net: Net) -> None:
    proxy = server.Socks5Proxy(0, net.dialer)
    port = await net.start(proxy)
    client = await connect(port)
    await client.send_all(b"\x05\x01\x00\x05\x03\x00\x01" + bytes(6))
    reply = (await recv_exactly(client, 12))[2:]
    relay = ("127.0.0.1", struct.unpack("!H", reply[8:10])[0])
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await udp.sendto(b"\x00\x00\x01garbage", relay)  # fragmented: refused
    await udp.sendto(socks5.build_udp_datagram("nope", 53, b"x"), relay)  # unknown peer
    await eventually(lambda: sum(proxy.statistics()["udp_dropped"].values()) == 2, "both counted")
    assert proxy.statistics()["udp_dropped"] == {"malformed": 1, "unroutable": 1}
    udp.close()
    await client.aclose()


async def test_a_bug_in_one_client_is_counted_and_the_listener_keeps_serving(net: Net) -> None:
    calls = [0]
    real = net.dialer.open_tcp_stream

    async def buggy(host: str, port: int) -> trio.abc.Stream:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a bug")
        return await real(host, port)

    net.dialer.open_tcp_stream = buggy  # type: ignore[method-assign]
    proxy = server.Socks5Proxy(0, net.dialer)
    port = await net.start(proxy)
    client = await connect(port)
    await client.send_all(b"\x05\x01\x00" + SOCKS_REQUEST + b"ok")
    assert await recv_all(client) == b"\x05\x00"  # closed after the method reply
    await client.aclose()
    client = await connect(port)
    await client.send_all(b"\x05\x01\x00" + SOCKS_REQUEST + b"ok")
    assert (await recv_exactly(client, 14)).endswith(b"OK")
    await client.send_eof()
    assert await recv_all(client) == b""
    await client.aclose()
    await eventually(lambda: proxy.statistics()["live_connections"] == 0, "all ended")
    st = accounted(proxy)
    assert st["failed"] == {"internal_error.socks5": 1} and st["completed"] == 1


async def test_clients_over_the_cap_wait_in_the_kernel_backlog(net: Net) -> None:
    proxy = server.Socks5Proxy(0, net.dialer, max_clients=2)
    port = await net.start(proxy)
    clients = [await connect(port) for _ in range(3)]
    await eventually(lambda: proxy.statistics()["accepted"] == 2, "two accepted")
    await trio.testing.wait_all_tasks_blocked()
    assert proxy.statistics()["accepted"] == 2 and proxy.statistics()["accept_errors"]["paused_at_max_clients"] >= 1
    await clients[0].aclose()
    await eventually(lambda: proxy.statistics()["accepted"] == 3, "the third taken once a slot freed")
    for c in clients[1:]:
        await c.aclose()
    await eventually(lambda: proxy.statistics()["live_connections"] == 0, "all ended")


# -------------------------------------------------------------------- HTTP proxy


@HOW
async def test_http_client_drops_mid_head(net: Net, how: str) -> None:
    proxy = server.HttpProxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(b"CONNECT peer:80 HTTP/1.1\r\nHost: pe")
    await drop(client, how)
    st = await all_released(net, proxy, before)
    assert st["handshake_errors"] == {("closed" if how == "close" else "reset") + ".head": 1}


async def test_http_client_that_stalls_mid_head_gets_408_at_the_timeout(
        net: Net, autojump_clock: trio.testing.MockClock) -> None:
    proxy = server.HttpProxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(b"CONNECT peer:80 HTTP/1.1\r\nHost: pe")
    start = trio.current_time()
    assert (await recv_all(client)).startswith(b"HTTP/1.1 408 ")
    assert trio.current_time() - start >= server.HANDSHAKE_TIMEOUT
    await client.aclose()
    st = await all_released(net, proxy, before)
    assert st["handshake_errors"] == {"timeout.head": 1}


async def test_http_head_over_the_cap_gets_431(net: Net) -> None:
    proxy = server.HttpProxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    head = b"CONNECT peer:80 HTTP/1.1\r\n" + b"X: " + b"a" * server.MAX_HTTP_HEADER
    head = head[:server.MAX_HTTP_HEADER + 1]  # one byte over, all of it read: the answer is not lost to a RST
    await client.send_all(head)
    assert (await recv_all(client)).startswith(b"HTTP/1.1 431 ")
    await client.aclose()
    st = await all_released(net, proxy, before)
    assert st["handshake_errors"] == {"too_long.head": 1}


async def test_http_head_trickled_a_byte_at_a_time_is_scanned_once() -> None:
    stream_a, stream_b = trio.testing.memory_stream_pair()
    reader = server._Buffered(stream_b)
    head = b"CONNECT peer:80 HTTP/1.1\r\nHost: peer\r\n\r\nearly"
    for byte in head:
        await stream_a.send_all(bytes([byte]))
    await stream_a.send_eof()
    got = await reader.read_head("head", server.MAX_HTTP_HEADER)
    assert got == head[:-5] and reader.buf == b"early"


@HOW
async def test_http_client_leaves_while_the_tailnet_connect_is_in_progress(net: Net, how: str) -> None:
    proxy = server.HttpProxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(f"CONNECT {BLACK_HOLE}:80 HTTP/1.1\r\n\r\n".encode())
    await eventually(lambda: net.ours() == (1, 0), "the connection to the black hole is being opened")
    await drop(client, how)
    st = await all_released(net, proxy, before)
    assert st["failed"] == {f"client_{'closed' if how == 'close' else 'reset'}_while_connecting": 1}


async def test_http_client_resets_after_200(net: Net) -> None:
    proxy = server.HttpProxy(0, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await client.send_all(b"CONNECT peer:80 HTTP/1.1\r\n\r\n")
    assert await recv_exactly(client, 39) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    await drop(client, "reset")
    st = await all_released(net, proxy, before)
    assert st["failed"] == {"client_reset": 1}
    await eventually(lambda: net.peers() == 0, "the peer's side reset too")


async def test_http_bad_port_is_a_400() -> None:
    with pytest.raises(ValueError):
        split_host_port("peer:99999", 80)
    with pytest.raises(ValueError):
        split_host_port("[::1]:x", 80)
    assert split_host_port("[fd7a::1]:8080", 80) == ("fd7a::1", 8080)


# ---------------------------------------------------------------------- --forward


async def test_forward_client_that_connects_and_resets_at_once(net: Net) -> None:
    proxy = server.ForwardProxy(0, BLACK_HOLE, 80, net.dialer)
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    await eventually(lambda: net.ours() == (1, 0), "dialing for the client")
    await drop(client, "reset")
    st = await all_released(net, proxy, before)
    assert st["failed"] == {"client_reset_while_connecting": 1}


async def test_forward_many_clients_that_reset_at_once_to_a_live_target(net: Net) -> None:
    proxy = server.ForwardProxy(0, "peer", 80, net.dialer)
    port = await net.start(proxy)
    before = fds()
    for _ in range(50):
        await drop(await connect(port), "reset")
    await eventually(lambda: proxy.statistics()["accepted"] == 50, "all accepted")
    st = await all_released(net, proxy, before)
    assert set(st["failed"]) <= {"client_reset", "client_reset_while_connecting"}, st
    assert sum(st["failed"].values()) == 50
    await eventually(lambda: net.peers() == 0, "nothing left on the peer either")


async def test_forward_half_close_while_connecting_is_passed_on(net: Net) -> None:
    proxy = server.ForwardProxy(0, "peer", 80, net.dialer)
    port = await net.start(proxy)
    client = await connect(port)
    await client.send_all(b"hello")
    await client.send_eof()  # `nc -N`: EOF at once, still reading the answer
    assert await recv_all(client) == b"HELLO"
    await client.aclose()
    await eventually(lambda: proxy.statistics()["live_connections"] == 0, "ended")
    assert accounted(proxy)["completed"] == 1


async def test_forward_to_a_refusing_target_resets_the_client(net: Net) -> None:
    proxy = server.ForwardProxy(0, "peer", 81, net.dialer)  # nothing listens on the peer's port 81
    port = await net.start(proxy)
    before = fds()
    client = await connect(port)
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some(10)
    await client.aclose()
    st = await all_released(net, proxy, before)
    assert st["failed"] == {"connect_refused": 1}


# ------------------------------------------------------------------------ --serve


async def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()  # nothing listens there now: connections to it are refused
    return port


async def test_serve_connection_whose_local_target_refuses_is_reset(net: Net) -> None:
    proxy = server.InboundServer(net.a.listen_tcp(9000), "127.0.0.1", await _closed_port())
    await net.nursery.start(proxy.serve)
    before = fds()
    stream = await net.b.open_tcp_stream("10.0.0.1", 9000)
    with pytest.raises(trio.BrokenResourceError):  # the tailnet peer sees RST, as from a closed port
        await stream.receive_some(10)
    await stream.aclose()
    await eventually(lambda: net.ours() == (0, 0) and net.peers() == 0, "no connection left on either side")
    await eventually(lambda: fds() == before, "no descriptor left")
    assert accounted(proxy)["failed"] == {"connect_refused": 1}


async def test_serve_tailnet_client_that_resets_closes_the_local_connection(net: Net) -> None:
    local_got: list[bytes] = []
    local_closed = trio.Event()

    async def local_service(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(100):
                local_got.append(data)
        except trio.BrokenResourceError:
            local_got.append(b"reset")
        local_closed.set()

    listeners = await net.nursery.start(partial(trio.serve_tcp, local_service, 0, host="127.0.0.1"))
    local_port = listeners[0].socket.getsockname()[1]
    proxy = server.InboundServer(net.a.listen_tcp(9001), "127.0.0.1", local_port)
    await net.nursery.start(proxy.serve)
    stream = await net.b.open_tcp_stream("10.0.0.1", 9001)
    assert isinstance(stream, TcpStream)
    await stream.send_all(b"x")
    await eventually(lambda: local_got == [b"x"], "relaying to the local service")
    await server.reset(stream)
    with trio.fail_after(10):
        await local_closed.wait()
    assert local_got == [b"x", b"reset"]  # the tailnet peer's RST passed on as one
    await eventually(lambda: proxy.statistics()["live_connections"] == 0, "ended")
    await eventually(lambda: net.ours()[0] == 0, "the tailnet side closed")
    assert accounted(proxy)["failed"] == {"client_reset": 1}


async def test_the_tailnet_side_of_every_proxied_connection_probes_when_idle(net: Net) -> None:
    """A tailnet peer that vanishes without FIN or RST must not hold a relay forever:
    dialed (--forward, SOCKS5, HTTP) and accepted (--serve) tailnet streams get keepalive."""
    forward = server.ForwardProxy(0, "peer", 80, net.dialer)
    port = await net.start(forward)
    client = await connect(port)
    await client.send_all(b"hi")
    assert await recv_exactly(client, 2) == b"HI"
    dialed = [c for c in net.a.core.conns.values()]
    assert len(dialed) == 1 and dialed[0].keepalive_idle == server.TAILNET_KEEPALIVE[0]

    local = await net.nursery.start(partial(trio.serve_tcp, _echo_upper, 0, host="127.0.0.1"))
    inbound = server.InboundServer(net.a.listen_tcp(9002), "127.0.0.1", local[0].socket.getsockname()[1])
    await net.nursery.start(inbound.serve)
    stream = await net.b.open_tcp_stream("10.0.0.1", 9002)
    await stream.send_all(b"yo")
    assert await recv_exactly(stream, 2) == b"YO"
    accepted = [c for c in net.a.core.conns.values() if 9002 in (c.key[1], c.key[3])]
    assert len(accepted) == 1 and accepted[0].keepalive_idle == server.TAILNET_KEEPALIVE[0]
    await client.aclose()
    await stream.aclose()
