"""The proxies against a dialer that reaches loopback TCP servers."""

from __future__ import annotations

import errno
import socket
from functools import partial

import pytest
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
    proxy = server.Socks5Proxy(0, dialer, auth=("u", "p"))
    port = await nursery.start(proxy.serve)

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
    stats = proxy.statistics()
    assert stats["handshake_errors"] == {"garbage.greeting": 1}
    assert stats["failed"] == {"unknown_host": 1}


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
    proxy = server.ForwardProxy(0, "peer", 80, LoopbackDialer({"peer": echo}))
    port = await nursery.start(proxy.serve)
    wakes = [0]
    real_wait = trio.lowlevel.wait_readable

    async def counting(sock: socket.socket) -> None:
        if isinstance(sock, socket.socket) and sock.getsockname()[1] == port:
            wakes[0] += 1
        await real_wait(sock)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting)  # from the listener's next wait on
    clients = []
    for _ in range(100):  # connected by the kernel, all queued before the listener runs
        c = socket.socket()
        c.connect(("127.0.0.1", port))
        clients.append(c)
    await trio.testing.wait_all_tasks_blocked()
    assert proxy.statistics()["accepted"] == 100
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


class ScriptedListener:
    """A listening socket whose accept() follows a script: OSErrors are raised,
    sockets returned, and an empty script blocks (BlockingIOError). It reads as
    readable while its script has entries, via a socketpair with a byte queued."""

    def __init__(self, script: list[OSError | socket.socket]) -> None:
        self.script = script
        self._wake, self._poke = socket.socketpair()
        self._poke.send(b"x")

    def fileno(self) -> int:
        return self._wake.fileno()

    def setblocking(self, flag: bool) -> None:
        assert flag is False

    def __enter__(self) -> ScriptedListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self._wake.close()
        self._poke.close()

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        if not self.script:
            self._wake.recv(1)  # not readable any more: the loop waits
            raise BlockingIOError(errno.EAGAIN, "empty")
        step = self.script.pop(0)
        if isinstance(step, OSError):
            raise step
        return step, ("127.0.0.1", 1)


class _Recorder(server.Proxy):
    """A listener whose clients only have their descriptors noted."""

    def __init__(self) -> None:
        super().__init__("recorder")
        self.handled: list[int] = []

    async def _handle(self, client: trio.SocketStream) -> None:
        self.handled.append(client.socket.fileno())


async def _run_accept_all(script: list[OSError | socket.socket], settle: float = 0.0) -> _Recorder:
    proxy = _Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy._accept_all, ScriptedListener(script), nursery)
        await trio.sleep(settle)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return proxy


async def test_accept_skips_clients_that_gave_up_and_takes_the_rest_in_one_round() -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    wanted = sorted(p[0].fileno() for p in pairs)
    gone = OSError(errno.ECONNABORTED, "aborted")
    proxy = await _run_accept_all([pairs[0][0], gone, pairs[1][0], pairs[2][0]])
    assert sorted(proxy.handled) == wanted
    stats = proxy.statistics()
    assert stats["accept_errors"] == {"client_gone": 1}
    assert (stats["accepted"], stats["completed"], stats["live_connections"]) == (3, 3, 0)
    for _a, b in pairs:
        b.close()


async def test_accept_out_of_descriptors_waits_and_retries(autojump_clock: trio.testing.MockClock) -> None:
    first, other = socket.socketpair()
    wanted = first.fileno()
    start = trio.current_time()
    proxy = await _run_accept_all([OSError(errno.EMFILE, "too many open files"), first],
                                  settle=2 * server.ACCEPT_RETRY)
    assert proxy.handled == [wanted]
    assert proxy.statistics()["accept_errors"] == {"capacity": 1}
    assert trio.current_time() - start >= server.ACCEPT_RETRY
    other.close()


async def test_accept_raises_errors_that_are_not_the_clients() -> None:
    with pytest.raises(BaseExceptionGroup) as info:
        await _run_accept_all([OSError(errno.EBADF, "bad descriptor")])
    raised, _rest = info.value.split(OSError)
    assert raised is not None
    assert [e.errno for e in _leaves(raised)] == [errno.EBADF]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[OSError]:
    out: list[OSError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out += _leaves(exc)
        else:
            assert isinstance(exc, OSError)
            out.append(exc)
    return out
