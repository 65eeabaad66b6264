"""magicsock's netcheck driver on loopback: STUN to every region over the node's own UDP
socket, the home region chosen from the answers, our endpoint learned, the home moved
when its region goes silent, and what status shows."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import trio
import trio.testing

from trionet import keys, proto
from trionet.magicsock import stun
from trionet.magicsock.conn import MagicConn


class StunServer:
    """A STUN server on loopback that answers only while `answering`."""

    def __init__(self) -> None:
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.answering = True
        self.requests = 0

    async def bind(self) -> int:
        await self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    async def serve(self) -> None:
        while True:
            data, addr = await self.sock.recvfrom(2048)
            self.requests += 1
            if self.answering:
                await self.sock.sendto(stun.binding_response(stun.parse_binding_request(data), addr), addr)


def closed_tcp_port() -> int:
    """A loopback port nothing listens on: the DERP links to it fail at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def derp_map(ports: dict[int, int]) -> proto.DERPMap:
    derp_port = closed_tcp_port()
    return proto.DERPMap(Regions={rid: proto.DERPRegion(
        RegionID=rid, RegionCode=f"r{rid}", RegionName=f"region {rid}",
        Nodes=[proto.DERPNode(Name=f"{rid}a", RegionID=rid, HostName="127.0.0.1", IPv4="127.0.0.1", IPv6="none",
                              STUNPort=port, DERPPort=derp_port)]) for rid, port in ports.items()})


def make_conn(changes: list[int]) -> MagicConn:
    node, disco = keys.new_private(), keys.new_private()

    def on_wireguard(datagrams: Sequence[bytes | memoryview], derp_src: bytes | None, path: Any) -> None:
        pass

    conn = MagicConn(node, keys.public_of(node), disco, keys.public_of(disco), on_wireguard,
                     login_server="https://127.0.0.1:1", udp_bind="127.0.0.1",
                     on_endpoints_changed=lambda: changes.append(1))
    conn.bind()
    conn.control_connected = True
    return conn


async def wait_home(conn: MagicConn, region: int) -> None:
    with trio.fail_after(10):
        while conn.home_region != region:
            await trio.sleep(0.05)


async def test_home_is_the_region_that_answers_and_moves_when_it_goes_silent() -> None:
    servers = {1: StunServer(), 2: StunServer()}
    ports = {rid: await server.bind() for rid, server in servers.items()}
    servers[1].answering = False
    changes: list[int] = []
    conn = make_conn(changes)
    async with trio.open_nursery() as nursery:
        for server in servers.values():
            nursery.start_soon(server.serve)
        await nursery.start(conn.run)
        conn.set_derp_map(derp_map(ports))
        await wait_home(conn, 2)
        assert servers[1].requests >= 3  # a full report: 3 tries to the silent region
        assert conn.stun_endpoints == conn.local_endpoints  # loopback: STUN sees our own socket
        assert changes  # control is told (endpoint and home)
        status = conn.derp_status()
        by_id = {r["id"]: r for r in status["regions"]}
        assert by_id[2]["home"] and by_id[2]["latency_ms"] is not None and by_id[2]["measured_by"] == "stun"
        assert by_id[1]["latency_ms"] is None and not by_id[1]["home"]
        assert status["last_netcheck"] is not None and status["udp"] is True and status["home_changes"] == 0
        assert conn.net_info()["PreferredDERP"] == 2 and "2-v4" in conn.net_info()["DERPLatency"]
        assert conn.derps[2].preferred

        # The home region falls silent and the other answers: the next report moves home.
        servers[2].answering = False
        servers[1].answering = True
        conn.request_netcheck()
        await wait_home(conn, 1)
        assert conn.home_changes == 1
        assert conn.derps[1].preferred and not conn.derps[2].preferred  # the old link is told
        assert conn.stats["stun.unsolicited"] == 0
        nursery.cancel_scope.cancel()


async def test_a_single_region_is_home_at_once_without_waiting_for_a_report() -> None:
    server = StunServer()
    port = await server.bind()
    server.answering = False
    conn = make_conn([])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        await nursery.start(conn.run)
        conn.set_derp_map(derp_map({7: port}))
        assert conn.home_region == 7  # before any STUN reply
        assert 7 in conn.derps
        nursery.cancel_scope.cancel()


async def test_without_control_the_home_stays_where_it_is() -> None:
    servers = {1: StunServer(), 2: StunServer()}
    ports = {rid: await server.bind() for rid, server in servers.items()}
    servers[2].answering = False
    conn = make_conn([])
    async with trio.open_nursery() as nursery:
        for server in servers.values():
            nursery.start_soon(server.serve)
        await nursery.start(conn.run)
        conn.set_derp_map(derp_map(ports))
        await wait_home(conn, 1)
        conn.control_connected = False
        servers[1].answering = False
        servers[2].answering = True
        reports = conn.netcheck.reports
        conn.request_netcheck()
        with trio.fail_after(10):
            while conn.netcheck.reports == reports:
                await trio.sleep(0.05)
        assert conn.last_report is not None and conn.last_report.preferred_derp == 2
        assert conn.home_region == 1  # peers could not learn of a move
        nursery.cancel_scope.cancel()


async def test_late_and_forged_stun_replies_are_counted_not_taken() -> None:
    conn = make_conn([])
    conn._on_stun(stun.binding_response(b"x" * 12, ("192.0.2.1", 5)))  # no report running
    conn._on_stun(b"\x01\x01\x00\x00" + stun.MAGIC_COOKIE + b"y" * 12)  # no address
    assert conn.stats["stun.unsolicited"] == 1 and conn.stats["stun.bad"] == 1
    assert conn.stun_endpoints == []
    conn.udp.close()


async def test_a_link_that_is_not_home_closes_after_a_minute_unused(autojump_clock: trio.testing.MockClock) -> None:
    """A peer's home region (or our old home) is dialled on demand and closed once we have
    not written to it for 60 s (tailscaled's cleanStaleDerp); the home link stays."""
    node, disco = keys.new_private(), keys.new_private()
    conn = MagicConn(node, keys.public_of(node), disco, keys.public_of(disco), lambda *_: None,
                     login_server="https://127.0.0.1:1")  # no UDP socket: nothing real to wait for
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        conn.set_derp_map(derp_map({1: 3478, 2: 3478}))
        conn._set_home(1, "test")
        conn._send_derp(2, b"k" * 32, b"to a peer homed in 2")
        assert set(conn.derps) == {1, 2}
        await trio.sleep(45)
        conn._send_derp(2, b"k" * 32, b"still in use")
        await trio.sleep(50)
        assert set(conn.derps) == {1, 2}  # written to 50 s ago
        await trio.sleep(30)
        assert set(conn.derps) == {1} and conn.stats["derp.idle_closed"] == 1
        # a move leaves the old home to the same fate
        conn._set_home(2, "test")
        await trio.sleep(90)
        assert set(conn.derps) == {2} and conn.stats["derp.idle_closed"] == 2
        nursery.cancel_scope.cancel()
