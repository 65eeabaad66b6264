"""MagicDNS served: quad-100 inside the netstack, a host port, forwarding, `resolve`.

Upstream resolvers here are small servers on 127.0.0.1 (real sockets); timeouts
run on Trio's MockClock, which jumps when every task waits.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
import trio
import trio.testing

from tests.unit.dns.netmaps import BASE, EXTRA, ME, WEB, dns_config, node
from tests.unit.netstack.simlink import A4, B4, linked_stacks
from trionet.dns import driver
from trionet.dns.driver import MagicDns
from trionet.errors import ConfigError, TransportError
from trionet.netstack import NetStack

Handler = Callable[[dns.message.Message], dns.message.Message | None]


def make_dns(resolvers: list[str] | None = None, **over: Any) -> MagicDns:
    service = MagicDns()
    config = dns_config(**over)
    config["Resolvers"] = [{"Addr": a} for a in resolvers or []]
    service.update(node(1, f"me.{BASE}.", ME), [node(2, f"web.{BASE}.", WEB)], config)
    return service


def answer_a(address: str, ttl: int = 60) -> Handler:
    def handler(query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query)
        if query.question[0].rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(query.question[0].name, ttl, "IN", "A", address))
        return reply
    return handler


def rcode_only(rcode: int) -> Handler:
    def handler(query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.Rcode.make(rcode))
        return reply
    return handler


class Upstream:
    """A DNS server on 127.0.0.1: UDP and TCP on one port, answering with `udp` / `tcp`."""

    def __init__(self, udp: Handler | None, tcp: Handler | None = None) -> None:
        self.udp_handler, self.tcp_handler = udp, tcp
        self.udp_queries = self.tcp_queries = 0
        self.port = 0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Upstream]:
        for _ in range(20):  # a free UDP port whose TCP twin is free too
            udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await udp.bind(("127.0.0.1", 0))
            self.port = udp.getsockname()[1]
            tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                await tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                udp.close()
                tcp.close()
        tcp.listen(8)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._udp, udp)
            if self.tcp_handler is not None:
                nursery.start_soon(trio.serve_listeners, self._tcp, [trio.SocketListener(tcp)])
            else:
                tcp.close()  # connections are refused
            yield self
            nursery.cancel_scope.cancel()
        udp.close()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _udp(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, addr = await sock.recvfrom(65535)
            self.udp_queries += 1
            reply = self.udp_handler(dns.message.from_wire(data)) if self.udp_handler else None
            if reply is not None:
                await sock.sendto(reply.to_wire(), addr)

    async def _tcp(self, stream: trio.SocketStream) -> None:
        assert self.tcp_handler is not None
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
            buf += await stream.receive_some(65536)
        self.tcp_queries += 1
        reply = self.tcp_handler(dns.message.from_wire(buf[2:]))
        if reply is not None:
            wire = reply.to_wire()
            await stream.send_all(struct.pack("!H", len(wire)) + wire)
        await stream.aclose()


def query(name: str, rdtype: str = "A", **kw: Any) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()  # type: ignore[arg-type]


def records(wire: bytes | None) -> list[str]:
    assert wire is not None
    return [rd.to_text() for rrset in dns.message.from_wire(wire).answer for rd in rrset]


# ---------------------------------------------------------------- quad-100
class Sink:
    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def __call__(self, packet: bytes) -> None:
        self.packets.append(packet)


@asynccontextmanager
async def node_stack(service: MagicDns) -> AsyncIterator[tuple[NetStack, Sink]]:
    sink = Sink()  # stands for WireGuard: nothing for quad-100 may go there
    stack = NetStack([ipaddress.ip_address(ME[0]), ipaddress.ip_address(ME[1])], sink)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stack.run)
        await nursery.start(service.serve_netstack, stack)
        yield stack, sink
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("server", ["100.100.100.100", "fd7a:115c:a1e0::53"])
async def test_quad100_answers_udp_and_tcp_from_our_own_stack_without_leaving_it(server: str) -> None:
    service = make_dns()
    async with node_stack(service) as (stack, sink):
        async with stack.udp_bind(0) as endpoint:
            await endpoint.send(query(f"web.{BASE}."), (server, 53))
            with trio.fail_after(5):
                data, source = await endpoint.receive()
        assert records(data) == [WEB[0]]
        assert source == (ipaddress.ip_address(server), 53)
        stream = await stack.open_tcp_stream(server, 53)
        first = query(f"extra.{BASE}.")
        second = query(ipaddress.ip_address(WEB[0]).reverse_pointer + ".", "PTR")
        await stream.send_all(struct.pack("!H", len(first)) + first + struct.pack("!H", len(second)) + second)
        replies = await read_replies(stream, 2)
        assert sorted(records(r)[0] for r in replies) == sorted([EXTRA, f"web.{BASE}."])
        await stream.aclose()
        assert sink.packets == []
        assert stack.statistics()["ip_out"] > 0  # they went to quad-100, not to `output`
    assert service.stats["answered_locally"] == 3


async def read_replies(stream: trio.abc.ReceiveStream, count: int) -> list[bytes]:
    """`count` length-prefixed DNS messages from a TCP stream."""
    buf, out = b"", []
    with trio.fail_after(5):
        while len(out) < count:
            if len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                n = int.from_bytes(buf[:2], "big")
                out.append(buf[2:2 + n])
                buf = buf[2 + n:]
                continue
            chunk = await stream.receive_some(65536)
            assert chunk, "the server closed the connection"
            buf += chunk
    return out


async def test_quad100_other_ports_refuse_and_the_divert_ends_with_the_server() -> None:
    service = make_dns()
    async with node_stack(service) as (stack, sink):
        with pytest.raises(TransportError):
            with trio.fail_after(5):
                await stack.open_tcp_stream("100.100.100.100", 80)  # RST from quad-100's stack
        assert sink.packets == []
    stack.core.divert.clear()
    assert not stack.core.divert


async def test_a_big_udp_answer_is_truncated_to_fit_the_netstack() -> None:
    service = make_dns()
    upstream = Upstream(lambda q: _big(q, 100))
    async with upstream.running():
        service = make_dns([upstream.addr])
        async with node_stack(service) as (stack, _):
            async with stack.udp_bind(0) as endpoint:
                await endpoint.send(query("big.example.", use_edns=0, payload=4096), ("100.100.100.100", 53))
                with trio.fail_after(10):
                    data, _ = await endpoint.receive()
    msg = dns.message.from_wire(data)
    assert msg.flags & dns.flags.TC and not msg.answer and len(data) <= driver.NETSTACK_UDP_MAX
    assert service.stats["truncated"] == 1


def _big(q: dns.message.Message, count: int) -> dns.message.Message:
    reply = dns.message.make_response(q)
    for i in range(count):
        reply.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", f"10.0.{i}.1"))
    return reply


# --------------------------------------------------------------- host port
async def test_host_port_answers_udp_and_pipelined_tcp_and_survives_garbage() -> None:
    service = make_dns()
    async with trio.open_nursery() as nursery:
        bind, port = await nursery.start(service.serve_host, "127.0.0.1", 0)
        assert service.status()["listeners"] == [f"udp+tcp 127.0.0.1:{port}"]
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.connect((bind, port))
        for garbage in (b"", b"\x00", b"\xff" * 11, b"\x12\x34" + b"\x01" * 40):
            await udp.send(garbage)
        await udp.send(query("web."))
        with trio.fail_after(5):
            reply = await udp.recv(65535)
            while dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR:
                reply = await udp.recv(65535)
        assert records(reply) == [WEB[0]]
        assert service.stats["malformed"] >= 3
        stream = await trio.open_tcp_stream(bind, port)
        a, b = query(f"web.{BASE}."), query("nosuch.ts.test.")
        await stream.send_all(struct.pack("!H", len(a)) + a + struct.pack("!H", len(b)) + b)
        rcodes = sorted(dns.message.from_wire(r).rcode() for r in await read_replies(stream, 2))
        assert rcodes == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN]
        await stream.send_all(struct.pack("!H", 5000))  # past the 4096-byte limit: we hang up
        with trio.fail_after(5):
            assert await stream.receive_some(10) == b""
        nursery.cancel_scope.cancel()
    assert service.stats["nxdomain"] == 1


async def test_an_idle_tcp_client_is_closed_after_45_s(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.1
    service = make_dns()
    async with trio.open_nursery() as nursery:
        bind, port = await nursery.start(service.serve_host, "127.0.0.1", 0)
        start = trio.current_time()  # (before connecting: the server's clock starts at its accept)
        stream = await trio.open_tcp_stream(bind, port)
        assert await stream.receive_some(10) == b""
        assert trio.current_time() - start >= driver.TCP_IDLE
        nursery.cancel_scope.cancel()
    assert service.stats["tcp_idle_closed"] == 1


async def test_dns_port_in_use_is_a_config_error() -> None:
    blocker = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await blocker.bind(("127.0.0.1", 0))
    with blocker, pytest.raises(ConfigError, match="--dns: cannot listen"):
        await make_dns().serve_host("127.0.0.1", blocker.getsockname()[1])


# --------------------------------------------------------------- forwarding
async def test_forwards_outside_names_to_the_resolvers() -> None:
    async with Upstream(answer_a("192.0.2.7")).running() as upstream:
        service = make_dns([upstream.addr])
        reply = await service.handle(query("example.com."), tcp=False)
    assert records(reply) == ["192.0.2.7"]
    assert (service.stats["forwarded"], upstream.udp_queries) == (1, 1)


async def test_the_first_good_answer_wins_and_servfail_refused_are_relayed() -> None:
    async with Upstream(rcode_only(dns.rcode.SERVFAIL)).running() as bad, \
            Upstream(answer_a("192.0.2.8")).running() as good:
        reply = await make_dns([bad.addr, good.addr]).handle(query("example.com."), tcp=False)
        assert records(reply) == ["192.0.2.8"]
        reply = await make_dns([bad.addr]).handle(query("example.com."), tcp=False)
        assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL
    async with Upstream(rcode_only(dns.rcode.REFUSED)).running() as refuses:
        reply = await make_dns([refuses.addr]).handle(query("example.com."), tcp=False)
        assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED


async def test_a_truncated_udp_answer_is_asked_again_over_tcp_for_a_tcp_client() -> None:
    upstream = Upstream(lambda q: _truncated(q), tcp=answer_a("192.0.2.9"))
    async with upstream.running():
        service = make_dns([upstream.addr])
        reply = await service.handle(query("example.com."), tcp=True)
        assert records(reply) == ["192.0.2.9"]
        assert (upstream.udp_queries, upstream.tcp_queries) == (1, 1)
        udp_reply = await service.handle(query("example.com."), tcp=False)  # a UDP client asks us again
        assert udp_reply is not None and dns.message.from_wire(udp_reply).flags & dns.flags.TC


def _truncated(q: dns.message.Message) -> dns.message.Message:
    reply = dns.message.make_response(q)
    reply.flags |= dns.flags.TC
    return reply


async def test_a_silent_upstream_gets_tcp_after_2_s_then_servfail_at_10_s(
        mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.1
    upstream = Upstream(None)  # UDP silent, TCP refused
    async with upstream.running():
        service = make_dns([upstream.addr])
        start = trio.current_time()
        reply = await service.handle(query("example.com."), tcp=False)
        assert trio.current_time() - start >= driver.QUERY_TIMEOUT
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL
    assert service.stats["upstream_tcp_failed"] == 1  # the refused TCP try, after the head start
    assert service.stats["upstream_timeout"] == 1 and service.stats["servfail"] == 1


async def test_split_routes_reach_their_own_resolver() -> None:
    async with Upstream(answer_a("192.0.2.1")).running() as default, \
            Upstream(answer_a("10.1.1.1")).running() as corp:
        service = make_dns([default.addr], Routes={"corp.example": [{"Addr": corp.addr}]})
        assert records(await service.handle(query("git.corp.example."), tcp=False)) == ["10.1.1.1"]
        assert records(await service.handle(query("example.com."), tcp=False)) == ["192.0.2.1"]


async def test_unsupported_resolvers_fail_cleanly() -> None:
    service = make_dns(["https://dns.example/dns-query"])
    reply = await service.handle(query("example.com."), tcp=False)
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL
    assert service.stats["upstream_unsupported_resolver"] == 1


async def test_forwarded_queries_in_flight_are_bounded(monkeypatch: pytest.MonkeyPatch,
                                                       mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.1
    monkeypatch.setattr(driver, "MAX_IN_FLIGHT", 2)
    async with Upstream(None).running() as silent:
        service = make_dns([silent.addr])
        results: list[bytes | None] = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(lambda: _collect(service, results))
        assert sum(r is None for r in results) == 1  # the third had no slot: dropped
    assert service.stats["dropped_busy"] == 1 and service._in_flight == 0


async def _collect(service: MagicDns, results: list[bytes | None]) -> None:
    results.append(await service.handle(query("example.com."), tcp=False))


async def test_the_exit_node_upstream_replaces_the_resolvers() -> None:
    asked: list[bytes] = []

    async def doh(wire: bytes) -> bytes:
        asked.append(wire)
        return answer_a("198.51.100.4")(dns.message.from_wire(wire)).to_wire()  # type: ignore[union-attr]

    service = make_dns(["127.0.0.1:9"])
    service.set_exit_node_upstream(doh)
    assert records(await service.handle(query("example.com."), tcp=False)) == ["198.51.100.4"]
    assert len(asked) == 1 and service.stats["exit_node_doh_answers"] == 1
    assert service.status()["exit_node_doh"] is True
    assert records(await service.handle(query("web."), tcp=False)) == [WEB[0]]  # tailnet names stay ours


async def test_resolvers_in_the_tailnet_are_asked_through_the_netstack() -> None:
    async with linked_stacks() as (a, b):
        service = MagicDns(via_tailnet=lambda ip: ip == B4)
        config = dns_config()
        config["Resolvers"] = [{"Addr": str(B4)}]
        service.update(node(1, f"me.{BASE}.", (str(A4),)), [], config)
        service.stack = a
        async with b.udp_bind(53) as peer_dns, trio.open_nursery() as nursery:
            async def serve_one() -> None:
                data, addr = await peer_dns.receive()
                await peer_dns.send(answer_a("192.0.2.55")(dns.message.from_wire(data)).to_wire(), addr)
            nursery.start_soon(serve_one)
            with trio.fail_after(10):
                assert await service.resolve("example.com") == "192.0.2.55"


# ------------------------------------------------------------------ resolve
async def test_resolve_tailnet_names_extra_records_and_outside_names() -> None:
    async with Upstream(answer_a("192.0.2.77", ttl=30)).running() as upstream:
        service = make_dns([upstream.addr], Proxied=False)
        assert await service.resolve("web") == WEB[0]  # short names for dialing even without MagicDNS
        assert await service.resolve(f"WEB.{BASE}.") == WEB[0]
        assert await service.resolve(f"extra.{BASE}") == EXTRA
        assert await service.resolve("192.0.2.1") == "192.0.2.1"
        assert await service.resolve("www.example.com") == "192.0.2.77"
        assert await service.resolve("www.example.com") == "192.0.2.77"
        assert upstream.udp_queries == 1  # the second came from the cache


async def test_resolve_refuses_names_nobody_answers() -> None:
    service = make_dns([])
    with pytest.raises(ConfigError, match="unknown peer 'nosuch'"):
        await service.resolve("nosuch")  # MagicDNS on: our zone, NXDOMAIN
    with pytest.raises(ConfigError, match=r"cannot resolve 'example\.com': not a tailnet name, and no DNS resolver"):
        await service.resolve("example.com")
    async with Upstream(rcode_only(dns.rcode.NXDOMAIN)).running() as upstream:
        with pytest.raises(ConfigError, match="NXDOMAIN"):
            await make_dns([upstream.addr]).resolve("nosuch.example.com")
    async with Upstream(rcode_only(dns.rcode.SERVFAIL)).running() as upstream:
        with pytest.raises(TransportError, match="SERVFAIL"):
            await make_dns([upstream.addr]).resolve("broken.example.com")


def test_status_names_the_configuration() -> None:
    status = make_dns(["10.9.9.9"]).status()
    assert status["magic_dns"] is True and status["base_domain"] == BASE
    assert status["resolvers"] == ["10.9.9.9"] and status["extra_records"] == 3
    assert status["split_routes"]["corp.example."] == ["10.1.1.1"]
    assert status["forwarding"]["."] == ["10.9.9.9"]
