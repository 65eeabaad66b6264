"""The UDP reader against a real kernel socket: coalesced (GRO) reads are split back into
the sender's datagrams, in order (UdpSocket.drain), and each kind still reaches its
handler (MagicConn._udp_reader)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any

import trio

from trionet import keys
from trionet.magicsock.conn import MagicConn
from trionet.magicsock.udp import READ_BATCH, UdpSocket

UDP_SEGMENT = 103  # linux/udp.h: the sender's GSO segment size


def make_conn(received: list[tuple[bytes, Any]]) -> MagicConn:
    node, disco = keys.new_private(), keys.new_private()

    def on_wireguard(datagrams: Sequence[bytes | memoryview], derp_src: bytes | None, path: Any) -> None:
        received.extend((bytes(data), path) for data in datagrams)

    conn = MagicConn(node, keys.public_of(node), disco, keys.public_of(disco), on_wireguard,
                     login_server="https://hs.test", udp_bind="127.0.0.1")
    conn.bind()
    return conn


def transport_like(i: int, size: int) -> bytes:
    return b"\x04\x00\x00\x00" + i.to_bytes(4, "big") + bytes([i % 256]) * (size - 8)


async def read_until(received: list[Any], count: int) -> None:
    with trio.fail_after(5):
        while len(received) < count:
            await trio.sleep(0.01)


async def test_a_gso_batch_comes_back_as_the_senders_datagrams() -> None:
    received: list[tuple[bytes, Any]] = []
    conn = make_conn(received)
    assert conn.udp.gro, "this Linux kernel should accept UDP_GRO"
    assert conn.udp.sock is not None
    target = conn.udp.sock.getsockname()
    datagrams = [transport_like(i, 1200) for i in range(20)] + [transport_like(20, 300)]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._udp_reader)
        # One sendmsg, 21 datagrams on the wire; the last one shorter, as GSO allows.
        sender.sendmsg([b"".join(datagrams)], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", 1200))],
                       0, target)
        sender.sendto(transport_like(99, 64), target)  # a lone datagram after it
        await read_until(received, 22)
        nursery.cancel_scope.cancel()
    assert [data for data, _ in received] == [*datagrams, transport_like(99, 64)]
    assert {path for _, path in received} == {("udp", sender.getsockname())}
    assert conn.stats["recv.udp"] == 22
    sender.close()


async def test_non_transport_datagrams_in_a_batch_go_to_their_handlers() -> None:
    received: list[tuple[bytes, Any]] = []
    conn = make_conn(received)
    assert conn.udp.sock is not None
    target = conn.udp.sock.getsockname()
    stun_seen: list[bytes] = []
    conn._on_stun = stun_seen.append  # type: ignore[method-assign]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # A STUN-shaped reply (type 0x0101, magic cookie) and a WireGuard initiation (type 1).
    stun_reply = struct.pack("!HHI", 0x0101, 0, 0x2112A442) + b"\x00" * 12
    initiation = b"\x01\x00\x00\x00" + b"\x00" * 144
    segment = len(stun_reply)
    batch = stun_reply + stun_reply
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._udp_reader)
        sender.sendmsg([batch], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment))], 0, target)
        sender.sendto(initiation, target)
        await read_until(received, 1)
        with trio.fail_after(5):
            while len(stun_seen) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert stun_seen == [stun_reply, stun_reply]
    assert all(type(item) is bytes for item in stun_seen)  # the STUN parser gets bytes, not views
    assert [data for data, _ in received] == [initiation]
    sender.close()


async def test_drain_gives_a_gro_read_as_views_from_one_plain_source() -> None:
    udp = UdpSocket()  # dual-stack: an IPv4 sender shows up as ::ffff:127.0.0.1 to the socket
    udp.bind()
    assert udp.gro and udp.dual_stack
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    datagrams = [transport_like(i, 1000) for i in range(5)]
    sender.sendmsg([b"".join(datagrams)], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", 1000))],
                   0, ("127.0.0.1", udp.local_port))
    with trio.fail_after(5):
        await udp.wait_readable()
    reads = list(udp.drain())
    assert len(reads) == 1
    views, source = reads[0]
    assert source == sender.getsockname()
    assert all(type(view) is memoryview for view in views)
    assert [bytes(view) for view in views] == datagrams
    assert udp.stats["recv.udp"] == 5 and udp.stats["recv.udp_gro_reads"] == 1
    sender.close()
    udp.close()


async def test_drain_stops_after_a_batch_and_the_next_takes_the_rest() -> None:
    udp = UdpSocket("127.0.0.1")
    udp.bind()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(READ_BATCH + 10):
        sender.sendto(i.to_bytes(2, "big"), ("127.0.0.1", udp.local_port))
    with trio.fail_after(5):
        await udp.wait_readable()
    first = [bytes(datagrams[0]) for datagrams, _ in udp.drain()]
    second = [bytes(datagrams[0]) for datagrams, _ in udp.drain()]
    assert len(first) == READ_BATCH, "other tasks get a turn after a batch"
    assert first + second == [i.to_bytes(2, "big") for i in range(READ_BATCH + 10)]
    assert list(udp.drain()) == []
    sender.close()
    udp.close()
