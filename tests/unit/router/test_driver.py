"""The router driver between two linked netstacks: stack A plays a tailnet peer,
stack B forwards 127.0.0.0/8 (named explicitly, so loopback may be forwarded) to
real host sockets on this machine."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from trionet.errors import TransportError
from trionet.netstack import NetStack
from trionet.router import ForwardTable, RoutePolicy, Router

from ..netstack.simlink import linked_stacks

LOOPBACK = "127.0.0.1"


@asynccontextmanager
async def routed(table: ForwardTable | None = None, pings: list[str] | None = None,
                 ping_ok: bool = True) -> AsyncIterator[tuple[NetStack, Router]]:
    async def fake_ping(address: str) -> bool:
        if pings is not None:
            pings.append(address)
        await trio.sleep(0.01)
        return ping_ok

    async with linked_stacks() as (a, b), trio.open_nursery() as nursery:
        router = Router(b, RoutePolicy(["127.0.0.0/8"]), table, host_ping=fake_ping)
        await nursery.start(router.run)
        yield a, router
        nursery.cancel_scope.cancel()


async def serve_tcp_echo(nursery: trio.Nursery) -> tuple[int, list[bytes]]:
    """A host TCP server: echoes what it gets, half-closes after the client's EOF."""
    got: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                got.append(data)
                await stream.send_all(data)
            await stream.send_eof()

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return listeners[0].socket.getsockname()[1], got


async def test_tcp_is_relayed_both_ways_with_half_close() -> None:
    async with routed() as (client, router), trio.open_nursery() as nursery:
        port, got = await serve_tcp_echo(nursery)
        with trio.fail_after(10):
            stream = await client.open_tcp_stream(LOOPBACK, port)
            payload = bytes(range(256)) * 800
            await stream.send_all(payload)
            await stream.send_eof()  # the host server sees EOF only through the relay's half-close
            back = bytearray()
            while data := await stream.receive_some():
                back += data
            assert bytes(back) == payload and b"".join(got) == payload
            await stream.aclose()
            while router.table.tcp:
                await trio.sleep(0.01)
        stats = router.statistics()
        assert stats["tcp_attempts"] == stats["tcp_established"] == stats["tcp_completed"] == 1
        assert stats["bytes_from_peer"] == stats["bytes_to_peer"] == len(payload)
        nursery.cancel_scope.cancel()


async def test_closed_port_is_refused_at_once() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind((LOOPBACK, 0))
        closed = probe.getsockname()[1]
    async with routed() as (client, router):
        start = trio.current_time()
        with trio.fail_after(5), pytest.raises(TransportError):
            await client.open_tcp_stream(LOOPBACK, closed)
        assert trio.current_time() - start < 1.0  # a RST, not SYN retries
        assert router.statistics()["tcp_refused"] == 1
        assert client.statistics()["tcp_connections"] == 0


async def test_unforwarded_destination_gets_no_answer() -> None:
    async with routed() as (client, router):
        with trio.move_on_after(0.5) as waited:
            await client.open_tcp_stream("192.0.2.1", 80)
        assert waited.cancelled_caught  # dropped as not ours: no SYN-ACK, no RST
        assert router.statistics().get("tcp_attempts", 0) == 0


async def test_status_lists_the_live_connection() -> None:
    async with routed() as (client, router), trio.open_nursery() as nursery:
        port, _ = await serve_tcp_echo(nursery)
        with trio.fail_after(10):
            stream = await client.open_tcp_stream(LOOPBACK, port)
            await stream.send_all(b"hello")
            assert await stream.receive_some() == b"hello"
        status = router.status()
        assert status["tcp"] == 1 and status["flows"][0]["dst"] == f"{LOOPBACK}:{port}"
        assert status["flows"][0]["state"] == "open" and status["flows"][0]["bytes_to_peer"] == 5
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_tcp_limit_per_peer_drops_the_syn() -> None:
    table = ForwardTable(max_tcp=10, max_tcp_per_peer=1)
    async with routed(table) as (client, router), trio.open_nursery() as nursery:
        port, _ = await serve_tcp_echo(nursery)
        with trio.fail_after(10):
            first = await client.open_tcp_stream(LOOPBACK, port)
        with trio.move_on_after(0.5) as waited:
            await client.open_tcp_stream(LOOPBACK, port)
        assert waited.cancelled_caught
        stats = router.statistics()
        assert stats["tcp_dropped_limit"] >= 1 and stats["tcp_open"] == 1
        await first.aclose()
        nursery.cancel_scope.cancel()


async def udp_echo_server() -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((LOOPBACK, 0))
    return sock


async def echo_udp(sock: trio.socket.SocketType) -> None:
    while True:
        data, addr = await sock.recvfrom(65536)
        await sock.sendto(data.upper(), addr)


async def test_udp_flow_round_trip_then_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    server = await udp_echo_server()
    port = server.getsockname()[1]
    async with routed() as (client, router), trio.open_nursery() as nursery:
        nursery.start_soon(echo_udp, server)
        ep = client.udp_bind()
        with trio.fail_after(5):
            await ep.send(b"hello", (LOOPBACK, port))
            data, source = await ep.receive()
        assert data == b"HELLO" and source == (ipaddress.ip_address(LOOPBACK), port)
        assert router.table.udp and router.statistics()["udp_flows"] == 1
        await trio.sleep(100)
        await ep.send(b"again", (LOOPBACK, port))  # any packet resets the idle timer
        assert (await ep.receive())[0] == b"AGAIN"
        await trio.sleep(100)
        assert router.table.udp  # 100 s after the last packet: still open (2 min)
        await trio.sleep(30)
        assert not router.table.udp
        assert router.statistics()["udp_closed_idle"] == 1
        nursery.cancel_scope.cancel()
    server.close()


async def test_dns_flow_times_out_after_30_s(autojump_clock: trio.testing.MockClock) -> None:
    async with routed() as (client, router):
        ep = client.udp_bind()
        await ep.send(b"q", (LOOPBACK, 53))  # nothing need answer: the flow opens anyway
        await trio.sleep(0.1)
        assert router.table.udp
        await trio.sleep(31)
        assert not router.table.udp


async def test_udp_flow_limit() -> None:
    server = await udp_echo_server()
    port = server.getsockname()[1]
    async with routed(ForwardTable(max_udp=2, max_udp_per_peer=2)) as (client, router):
        for _ in range(3):
            ep = client.udp_bind()
            await ep.send(b"x", (LOOPBACK, port))
        await trio.sleep(0.1)
        assert len(router.table.udp) == 2 and router.statistics()["udp_dropped_limit"] == 1
    server.close()


async def test_echo_is_answered_when_the_host_can_ping() -> None:
    pings: list[str] = []
    async with routed(pings=pings) as (client, router):
        with trio.fail_after(5):
            rtt = await client.ping(LOOPBACK)
        assert rtt >= 0 and pings == [LOOPBACK]
        assert router.statistics()["icmp_echo_answered"] == 1


async def test_echo_is_not_answered_when_the_host_cannot_ping() -> None:
    async with routed(ping_ok=False) as (client, router):
        with pytest.raises(TransportError):
            await client.ping(LOOPBACK, timeout=0.5)
        assert router.statistics()["icmp_echo_failed"] == 1


async def test_pings_past_the_limit_are_dropped() -> None:
    async with routed(ForwardTable(max_pings=1)) as (client, router):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(lambda: client.ping(LOOPBACK, timeout=1.0))
                await trio.sleep(0)
            await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
        assert router.statistics()["icmp_echo_dropped_limit"] == 2


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_ipv6_tcp_is_forwarded_too() -> None:
    async with linked_stacks() as (a, b), trio.open_nursery() as nursery:
        router = Router(b, RoutePolicy(["::1/128"]))
        await nursery.start(router.run)
        listeners = await nursery.start(partial(trio.serve_tcp, _echo_once, 0, host="::1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10):
            stream = await a.open_tcp_stream("::1", port)
            await stream.send_all(b"over v6")
            assert await stream.receive_some() == b"over v6"
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def _echo_once(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.send_all(await stream.receive_some())


async def test_host_error_is_a_rst_and_a_counter_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from trionet.router import driver

    async def out_of_files(dst: bytes, port: int) -> trio.SocketStream:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(driver, "_dial", out_of_files)
    async with routed() as (client, router):
        with trio.fail_after(5), pytest.raises(TransportError):
            await client.open_tcp_stream(LOOPBACK, 9)
        assert router.statistics()["tcp_host_error"] == 1
        with trio.fail_after(5), pytest.raises(TransportError):  # and the router still works
            await client.open_tcp_stream(LOOPBACK, 9)


async def test_a_slow_dial_holds_the_handshake_and_swallows_the_retransmitted_syns(
        monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    from trionet.router import driver

    real_dial = driver._dial

    async def slow_dial(dst: bytes, port: int) -> trio.SocketStream:
        await trio.sleep(5)  # the client retransmits its SYN meanwhile (1 s, then 3 s)
        return await real_dial(dst, port)

    monkeypatch.setattr(driver, "_dial", slow_dial)
    async with routed() as (client, router), trio.open_nursery() as nursery:
        port, _ = await serve_tcp_echo(nursery)
        start = trio.current_time()
        stream = await client.open_tcp_stream(LOOPBACK, port)
        assert trio.current_time() - start >= 5  # established only once the host had dialed
        await stream.send_all(b"late")
        assert await stream.receive_some() == b"late"
        assert router.stack.statistics()["tcp_forward_syn_swallowed"] >= 1
        assert router.statistics()["tcp_attempts"] == 1
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_udp_host_socket_takes_the_clients_source_port_if_free_else_another() -> None:
    server = await udp_echo_server()
    port = server.getsockname()[1]
    seen: list[int] = []

    async def record(sock: trio.socket.SocketType) -> None:
        while True:
            data, addr = await sock.recvfrom(65536)
            seen.append(addr[1])
            await sock.sendto(data, addr)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("", 0))  # a port the host already uses
        busy = taken.getsockname()[1]
        async with routed() as (client, router), trio.open_nursery() as nursery:
            nursery.start_soon(record, server)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a port free on the host just now
                probe.bind(("", 0))
                free = probe.getsockname()[1]
            free_ep = client.udp_bind(free)
            busy_ep = client.udp_bind(busy)
            with trio.fail_after(5):
                await free_ep.send(b"a", (LOOPBACK, port))
                await free_ep.receive()
                await busy_ep.send(b"b", (LOOPBACK, port))
                await busy_ep.receive()  # answered all the same, from another host port
            assert seen[0] == free_ep.port and seen[1] != busy
            assert router.statistics()["udp_flows"] == 2
            nursery.cancel_scope.cancel()
    server.close()


async def test_a_bug_in_one_flow_is_counted_and_the_router_keeps_forwarding(monkeypatch: pytest.MonkeyPatch) -> None:
    from trionet.router import driver

    real_dial = driver._dial
    calls: list[int] = []

    async def buggy_once(dst: bytes, port: int) -> trio.SocketStream:
        calls.append(port)
        if len(calls) == 1:
            raise KeyError("a bug of ours")  # not a host error: nothing expects it
        return await real_dial(dst, port)

    monkeypatch.setattr(driver, "_dial", buggy_once)
    async with routed() as (client, router), trio.open_nursery() as nursery:
        port, _got = await serve_tcp_echo(nursery)
        with trio.fail_after(5), pytest.raises(TransportError):  # the held SYN still gets its RST
            await client.open_tcp_stream(LOOPBACK, port)
        stats = router.statistics()
        assert stats["internal_error.tcp_flow"] == 1 and not router.table.tcp
        with trio.fail_after(10):  # and the next connection is forwarded
            stream = await client.open_tcp_stream(LOOPBACK, port)
            await stream.send_all(b"still here")
            assert await stream.receive_some() == b"still here"
            await stream.aclose()
        nursery.cancel_scope.cancel()
