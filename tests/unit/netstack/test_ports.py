"""Ephemeral ports: a destination never sees a recently used local port again.

A peer keeps our closed connections in TIME_WAIT (60 s in gVisor, tailscaled's
netstack); a new SYN on the same 4-tuple is ignored or answered with an old
ACK, and the connection hangs in SYN retries. Random port choice hit that
within a few hundred connections (issue 8's 200-connection benchmark).
"""

from __future__ import annotations

import ipaddress
import struct

from trionet.netstack.stack import EPHEMERAL_COUNT, EPHEMERAL_LOW, StackCore

from .fakepeer import PEER, US


def _local_port(packet: bytes) -> int:
    """The TCP source port of an IPv4 packet we sent (20-byte IP header)."""
    assert packet[0] == 0x45
    return int(struct.unpack_from("!H", packet, 20)[0])


def test_a_destination_sees_every_port_once_before_any_repeats() -> None:
    out: list[bytes] = []
    stack = StackCore([US], out.append, seed=1)
    ports = []
    for i in range(EPHEMERAL_COUNT):
        conn = stack.tcp_connect(PEER, 80, float(i))
        ports.append(_local_port(out[-1]))
        conn.abort(float(i), "test")  # closed at once: only the peer would remember it
    assert len(set(ports)) == EPHEMERAL_COUNT
    assert all(EPHEMERAL_LOW <= p < 65536 for p in ports)
    # the cycle starts over only now
    stack.tcp_connect(PEER, 80, 1e6)
    assert _local_port(out[-1]) in ports[:2]


def test_ports_in_use_and_listeners_are_skipped_and_other_destinations_start_elsewhere() -> None:
    out: list[bytes] = []
    stack = StackCore([US], out.append, seed=2)
    first = stack.tcp_connect(PEER, 80, 0.0)
    p1 = _local_port(out[-1])
    stack.tcp_listen(p1 + 1 if p1 + 1 < 65536 else EPHEMERAL_LOW, 8, 8)
    stack.tcp_connect(PEER, 80, 0.0)
    p2 = _local_port(out[-1])
    assert p2 not in (p1, p1 + 1) and first.state.name == "SYN_SENT"
    stack.tcp_connect(ipaddress.ip_address("100.64.0.77"), 443, 0.0)
    p3 = _local_port(out[-1])
    assert abs(p3 - p2) != 1, "another destination gets its own offset"
