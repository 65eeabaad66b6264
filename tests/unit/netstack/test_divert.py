"""`NetStack.divert`: packets to an address served in this process leave through the
callable, never through `output`, on every path that emits (UDP, ICMP, TCP's
IPv4 run builder and IPv6), and go back to `output` once the divert is removed."""

from __future__ import annotations

import ipaddress

import trio

from trionet.netstack import NetStack

LOCAL4, LOCAL6 = ipaddress.ip_address("100.64.0.1"), ipaddress.ip_address("fd7a:115c:a1e0::1")
SERVED4, SERVED6 = "100.100.100.100", "fd7a:115c:a1e0::53"


def _dst(packet: bytes) -> str:
    return str(ipaddress.ip_address(packet[16:20] if packet[0] >> 4 == 4 else packet[24:40]))


async def test_divert_takes_every_kind_of_packet_and_can_be_undone() -> None:
    network: list[bytes] = []
    diverted: list[bytes] = []
    stack = NetStack([LOCAL4, LOCAL6], network.append)
    stack.divert(SERVED4, diverted.append)
    stack.divert(SERVED6, diverted.append)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stack.run)
        async with stack.udp_bind(0) as endpoint:
            await endpoint.send(b"q", (SERVED4, 53))
            await endpoint.send(b"q", (SERVED6, 53))
            await endpoint.send(b"q", ("100.64.0.2", 53))  # a peer: the network
        with trio.move_on_after(0.05):  # no answer comes: we only look at what left
            await stack.ping(SERVED4, timeout=0.05)
        for server in (SERVED4, SERVED6):
            with trio.move_on_after(0.05):
                await stack.open_tcp_stream(server, 53)  # a SYN, unanswered
        nursery.cancel_scope.cancel()
    assert sorted(_dst(p) for p in diverted) == sorted([SERVED4, SERVED6, SERVED4, SERVED4, SERVED6])
    assert [_dst(p) for p in network] == ["100.64.0.2"]
    stack.divert(SERVED4, None)
    async with stack.udp_bind(0) as endpoint:
        await endpoint.send(b"q", (SERVED4, 53))
    assert [_dst(p) for p in network] == ["100.64.0.2", SERVED4]
    assert len(diverted) == 5
