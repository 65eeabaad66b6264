"""The proxies against a dialer that reaches loopback TCP servers."""

from __future__ import annotations

from functools import partial

import trio
import trio.testing

from trionet.errors import ConfigError
from trionet.proxy import server, socks5


class LoopbackDialer:
    """Maps "tailnet" names to loopback ports; unknown names are a ConfigError."""

    def __init__(self, names: dict[str, int]) -> None:
        self.names = names

    async def open_tcp_stream(self, host: str, port: int) -> trio.abc.Stream:
        if host not in self.names:
            raise ConfigError(f"unknown peer {host!r}")
        return await trio.open_tcp_stream("127.0.0.1", self.names[host])

    async def open_udp(self) -> server.UdpEndpoint:
        raise NotImplementedError


async def _echo_upper(stream: trio.SocketStream) -> None:
    async for data in stream:
        await stream.send_all(data.upper())


async def _start_echo(nursery: trio.Nursery) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, _echo_upper, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def _recv_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await stream.receive_some(n - len(out))
        assert chunk, "closed early"
        out += chunk
    return out


async def test_forward_pipes_both_ways(nursery: trio.Nursery) -> None:
    echo = await _start_echo(nursery)
    dialer = LoopbackDialer({"peer": echo})
    port = await nursery.start(partial(server.serve_forward, 0, "peer", 80, dialer))
    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(b"hello")
    assert await _recv_exactly(client, 5) == b"HELLO"
    await client.aclose()


async def test_socks5_connect_auth_and_unknown_host(nursery: trio.Nursery) -> None:
    echo = await _start_echo(nursery)
    dialer = LoopbackDialer({"peer": echo})
    port = await nursery.start(partial(server.serve_socks5, 0, dialer, auth=("u", "p")))

    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(b"\x05\x01\x02")
    assert await _recv_exactly(client, 2) == b"\x05\x02"
    await client.send_all(b"\x01\x01u\x01p")
    assert await _recv_exactly(client, 2) == b"\x01\x00"
    await client.send_all(b"\x05\x01\x00" + socks5.encode_address("peer", 80) + b"early")
    reply = await _recv_exactly(client, 10)
    assert reply[1] == socks5.Reply.SUCCEEDED
    assert await _recv_exactly(client, 5) == b"EARLY"
    await client.aclose()

    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(b"\x05\x01\x02\x01\x01u\x01p\x05\x01\x00" + socks5.encode_address("nope", 1))
    await _recv_exactly(client, 4)
    reply = await _recv_exactly(client, 10)
    assert reply[1] == socks5.Reply.HOST_UNREACHABLE

    bad = await trio.open_tcp_stream("127.0.0.1", port)
    await bad.send_all(b"GET / HTTP/1.1\r\n\r\n")
    assert await bad.receive_some(100) == b""  # garbage: dropped, listener keeps serving
    assert server.stats["socks5.bad_request"] >= 1


async def test_http_proxy_connect_and_absolute_form(nursery: trio.Nursery) -> None:
    echo = await _start_echo(nursery)
    dialer = LoopbackDialer({"peer": echo})
    port = await nursery.start(partial(server.serve_http_proxy, 0, dialer))
    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(b"CONNECT peer:80 HTTP/1.1\r\nHost: peer:80\r\n\r\nabc")
    head = await _recv_exactly(client, len(b"HTTP/1.1 200 Connection established\r\n\r\n"))
    assert head.startswith(b"HTTP/1.1 200")
    assert await _recv_exactly(client, 3) == b"ABC"
    await client.aclose()

    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(b"GET http://peer:80/x HTTP/1.1\r\nHost: peer\r\nProxy-Connection: keep-alive\r\n\r\n")
    echoed = await _recv_exactly(client, len(b"GET /X HTTP/1.1\r\nHOST: PEER\r\nCONNECTION: CLOSE\r\n\r\n"))
    assert echoed == b"GET /X HTTP/1.1\r\nHOST: PEER\r\nCONNECTION: CLOSE\r\n\r\n"

    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(b"CONNECT nope:80 HTTP/1.1\r\n\r\n")
    assert (await client.receive_some(100)).startswith(b"HTTP/1.1 502")


async def test_a_burst_of_clients_is_accepted_in_one_wake_up(nursery: trio.Nursery, monkeypatch: object) -> None:
    import socket

    import pytest

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    echo = await _start_echo(nursery)
    port = await nursery.start(partial(server.serve_forward, 0, "peer", 80, LoopbackDialer({"peer": echo})))
    wakes = [0]
    real_wait = trio.lowlevel.wait_readable

    async def counting(sock: socket.socket) -> None:
        if isinstance(sock, socket.socket) and sock.getsockname()[1] == port:
            wakes[0] += 1
        await real_wait(sock)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting)  # from the listener's next wait on
    name = "forward 0->peer:80.accepted"
    before = server.stats[name]
    clients = []
    for _ in range(100):  # connected by the kernel, all queued before the listener runs
        c = socket.socket()
        c.connect(("127.0.0.1", port))
        clients.append(c)
    await trio.testing.wait_all_tasks_blocked()
    assert server.stats[name] - before == 100
    assert wakes[0] <= 2  # all 100 taken in a pass or two (a spurious wake-up may add one), not one each
    for c in clients:
        c.sendall(b"x")
    await trio.testing.wait_all_tasks_blocked()
    assert all(c.recv(1) == b"X" for c in clients)
    for c in clients:
        c.close()


async def test_serve_inbound_takes_a_burst_of_tailnet_connections_together(nursery: trio.Nursery) -> None:
    from tests.unit.netstack.simlink import B4, Pipe, linked_stacks

    echo = await _start_echo(nursery)
    async with linked_stacks(Pipe(), Pipe()) as (a, b):
        listener = b.listen_tcp(8080, backlog=64)
        started: list[int] = []
        real_nowait = listener.accept_nowait

        def counted() -> object:
            stream = real_nowait()
            if stream is not None:
                started.append(1)
            return stream

        listener.accept_nowait = counted  # type: ignore[method-assign]
        async with trio.open_nursery() as inner:
            await inner.start(server.serve_inbound, listener, "127.0.0.1", echo)
            streams: list[trio.abc.Stream] = []

            async def dial() -> None:
                streams.append(await a.open_tcp_stream(B4, 8080))

            async with trio.open_nursery() as dials:
                for _ in range(20):
                    dials.start_soon(dial)
            for s in streams:
                await s.send_all(b"hi")
            for s in streams:
                assert await _recv_exactly(s, 2) == b"HI"
            assert started, "some connections were taken without a wait of their own"
            inner.cancel_scope.cancel()
