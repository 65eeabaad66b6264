"""Corked sends on UdpSocket: runs of same-sized datagrams to one address leave as one
GSO write, and every datagram still arrives, in order, as its own datagram. The last
test goes through MagicConn: a burst to one peer is one path lookup and one write."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from tests.unit.magicsock.fakes import FixedPath
from trionet import keys
from trionet.magicsock.conn import MagicConn
from trionet.magicsock.udp import GSO_MAX_BYTES, UdpSocket


def make_udp() -> UdpSocket:
    udp = UdpSocket("127.0.0.1")
    udp.bind()
    assert udp.gso, "this Linux kernel should accept UDP_SEGMENT"
    return udp


def make_conn() -> MagicConn:
    node, disco = keys.new_private(), keys.new_private()
    conn = MagicConn(node, keys.public_of(node), disco, keys.public_of(disco), lambda *a: None,
                     login_server="https://hs.test", udp_bind="127.0.0.1")
    conn.bind()
    return conn


def receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    return sock


def drain(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(65535) for _ in range(count)]


def datagram(i: int, size: int) -> bytes:
    return i.to_bytes(4, "big") + bytes([i % 251]) * (size - 4)


def send_corked(udp: UdpSocket, burst: list[bytes], to: socket.socket) -> None:
    """One corked burst to `to`, one send() each, then check that each datagram arrived
    whole, in order."""
    udp.cork()
    for d in burst:
        udp.send((d,), to.getsockname())
    udp.uncork()
    assert drain(to, len(burst)) == burst


def test_a_corked_burst_leaves_in_few_writes_and_arrives_whole() -> None:
    udp = make_udp()
    a, b = receiver(), receiver()
    to_a = [datagram(i, 1312) for i in range(30)] + [datagram(30, 200)]
    to_b = [datagram(100 + i, 1312) for i in range(5)]
    udp.cork()
    for d in to_a[:10]:
        udp.send((d,), a.getsockname())
    for d in to_b:
        udp.send((d,), b.getsockname())
    for d in to_a[10:]:
        udp.send((d,), a.getsockname())
    assert udp.stats["send.udp"] == 0, "nothing leaves while corked"
    udp.uncork()
    assert drain(a, len(to_a)) == to_a
    assert drain(b, len(to_b)) == to_b
    assert udp.stats["send.udp"] == 36
    # a (10), b (5), a (21: 20 full and the short one ends the run)
    assert udp.stats["send.udp_gso"] == 3


def test_runs_stop_at_a_longer_datagram_and_at_the_size_limit() -> None:
    udp = make_udp()
    a = receiver()
    size = 1312
    per_write = GSO_MAX_BYTES // size
    burst = [datagram(i, size) for i in range(per_write + 3)] + [datagram(99, 100), datagram(100, size)]
    send_corked(udp, burst, a)
    # per_write full ones; then 3 full and the short one; then one alone (plain sendto)
    assert udp.stats["send.udp_gso"] == 2
    assert udp.stats["send.udp"] == len(burst)


def test_uncorked_sends_go_at_once() -> None:
    udp = make_udp()
    a = receiver()
    udp.send((b"now",), a.getsockname())
    assert a.recv(100) == b"now"
    assert udp.stats["send.udp_gso"] == 0


class RefusingSocket:
    """A socket whose path refuses GSO writes with one errno."""

    def __init__(self, real: socket.socket, error: int) -> None:
        self.real = real
        self.error = error
        self.refused = 0

    def sendmsg(self, *args: Any) -> int:
        self.refused += 1
        raise OSError(self.error, os.strerror(self.error))

    def sendto(self, data: bytes, addr: Any) -> int:
        return self.real.sendto(data, addr)


def send_two_bursts(error: int) -> tuple[UdpSocket, RefusingSocket]:
    udp = make_udp()
    assert udp.sock is not None
    fake = RefusingSocket(udp.sock, error)
    udp.sock = fake  # type: ignore[assignment]
    a = receiver()
    burst = [datagram(i, 1000) for i in range(8)]
    for _ in range(2):
        send_corked(udp, burst, a)
    assert udp.stats["send.udp"] == 16
    assert not [k for k in udp.stats if k.startswith("send.udp_E")], udp.stats
    return udp, fake


def test_without_checksum_offload_gso_is_tried_once_then_left_off() -> None:
    udp, fake = send_two_bursts(errno.EIO)
    assert fake.refused == 1 and not udp.gso


def test_a_run_too_big_for_the_route_goes_one_by_one_and_gso_stays_on() -> None:
    udp, fake = send_two_bursts(errno.EINVAL)
    assert fake.refused == 2 and udp.gso
    assert udp.stats["send.udp_gso_refused"] == 2


async def test_a_burst_to_one_peer_uses_its_path_once_and_one_write_when_corked() -> None:
    conn = make_conn()
    a = receiver()
    conn.paths = FixedPath(a.getsockname())  # type: ignore[assignment]
    burst = [datagram(i, 1312) for i in range(40)]
    conn.cork()
    conn.send_wireguard_many(b"peer", burst)
    conn.uncork()
    assert drain(a, len(burst)) == burst
    assert conn.stats["send.udp_gso"] == 1
    conn.send_wireguard_many(b"peer", burst[:3])  # not corked: out at once
    assert drain(a, 3) == burst[:3]
    assert conn.stats["send.udp_gso"] == 2


def test_an_eio_in_one_flush_stops_gso_for_the_rest_of_it() -> None:
    udp = make_udp()
    assert udp.sock is not None
    fake = RefusingSocket(udp.sock, errno.EIO)
    udp.sock = fake  # type: ignore[assignment]
    a, b = receiver(), receiver()
    udp.cork()
    for to in (a, b, a):
        for i in range(4):
            udp.send((datagram(i, 1000),), to.getsockname())
    udp.uncork()
    assert fake.refused == 1 and not udp.gso
    assert len(drain(a, 8)) == 8 and len(drain(b, 4)) == 4


def test_datagrams_too_big_for_a_gso_run_go_alone() -> None:
    udp = make_udp()
    a = receiver()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    big = [datagram(i, 40000) for i in range(3)]  # two would not fit 65,000 bytes
    send_corked(udp, big + [datagram(9, 1312)] * 3, a)
    assert udp.stats["send.udp_gso"] == 1  # only the three small ones
    udp.cork()
    udp.send((b"x" * 65600,), ("127.0.0.1", 9))  # over any GSO run and IPv4's limit: sendto refuses it
    udp.uncork()
    assert udp.stats["send.udp_EMSGSIZE"] == 1
