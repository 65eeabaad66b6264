"""magicsock under hostile disco and UDP input: a peer that restarted, replays, forged
CallMeMaybe, a churning peer table, and handlers that raise. Nothing escapes the reader."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import trio

from trionet import keys
from trionet.magicsock import disco
from trionet.magicsock.conn import MAX_CALL_ME_MAYBE_ENDPOINTS, MagicConn
from trionet.magicsock.paths import MAX_LEARNED

PEER_ADDR = ("10.9.9.9", 41641)


class Peer:
    """A peer's node key and a disco key it can seal with (a restart makes a new one)."""

    def __init__(self) -> None:
        self.node_private = keys.new_private()
        self.node_public = keys.public_of(self.node_private)
        self.restart()

    def restart(self) -> None:
        self.disco_private = keys.new_private()
        self.disco_public = keys.public_of(self.disco_private)

    def seal_to(self, conn: MagicConn, msg: disco.Message) -> bytes:
        return disco.DiscoBox(self.disco_private, conn.disco_public).seal(None, msg)


class Sent:
    """Captures what the conn would put on the wire (UDP and DERP)."""

    def __init__(self, conn: MagicConn) -> None:
        self.udp: list[tuple[bytes, Any]] = []
        self.derp: list[tuple[int, bytes, bytes]] = []
        conn._send_udp = lambda data, addr: self.udp.append((data, addr))  # type: ignore[method-assign]
        conn._send_derp = lambda region, key, data: self.derp.append((region, key, data))  # type: ignore[method-assign]

    def pongs(self, conn: MagicConn, peer: Peer) -> int:
        box = disco.DiscoBox(peer.disco_private, conn.disco_public)
        return sum(isinstance(box.open(data), disco.Pong) for data, _ in self.udp + [(d, 0) for _, _, d in self.derp]
                   if disco.sender_key(data) == conn.disco_public)


def make_conn(on_wireguard: Any = None) -> MagicConn:
    node, disco_private = keys.new_private(), keys.new_private()

    def ignore(datagrams: Sequence[bytes | memoryview], derp_src: bytes | None, path: Any) -> None:
        pass

    return MagicConn(node, keys.public_of(node), disco_private, keys.public_of(disco_private),
                     on_wireguard or ignore, login_server="https://hs.test", udp_bind="127.0.0.1")


def add(conn: MagicConn, peer: Peer) -> None:
    conn.upsert_peer(peer.node_public, peer.disco_public, 999, [PEER_ADDR])


def ping(tx_id: bytes | None = None) -> disco.Ping:
    return disco.Ping(tx_id=tx_id or os.urandom(12), node_key=b"\x01" * 32)


async def test_a_restarted_peers_old_disco_packets_are_counted_not_fatal() -> None:
    conn, peer = make_conn(), Peer()
    sent = Sent(conn)
    add(conn, peer)
    before_restart = [peer.seal_to(conn, ping()) for _ in range(3)]
    conn._on_udp_datagram(before_restart[0], ("udp", PEER_ADDR))
    assert conn.stats["disco.ping_in"] == 1 and sent.pongs(conn, peer) == 1

    old_disco = peer.disco_public
    peer.restart()
    add(conn, peer)  # the netmap brings its new disco key
    for data in before_restart:  # late or replayed: sealed with the key it had before
        conn._on_udp_datagram(data, ("udp", PEER_ADDR))
        conn._on_derp_packet(999, peer.node_public, data)
    assert conn.stats["disco.unknown_sender"] == 6
    assert conn.stats["disco.ping_in"] == 1
    assert old_disco not in conn._disco_peers, "the old key's box is dropped with the key"
    conn._on_udp_datagram(peer.seal_to(conn, ping()), ("udp", PEER_ADDR))  # its new key works
    assert conn.stats["disco.ping_in"] == 2


async def test_a_replayed_ping_from_the_same_address_is_answered_once() -> None:
    conn, peer = make_conn(), Peer()
    sent = Sent(conn)
    add(conn, peer)
    data = peer.seal_to(conn, ping())
    for _ in range(100):
        conn._on_udp_datagram(data, ("udp", PEER_ADDR))
    assert sent.pongs(conn, peer) == 1
    assert conn.stats["disco.duplicate_ping"] == 99


async def test_a_ping_replayed_from_many_forged_sources_learns_a_bounded_set() -> None:
    conn, peer = make_conn(), Peer()
    Sent(conn)
    add(conn, peer)
    data = peer.seal_to(conn, ping())
    for i in range(5000):
        conn._on_udp_datagram(data, ("udp", (f"10.{i >> 8 & 255}.{i & 255}.1", 1000 + i % 7)))
    path = conn.paths.peers[peer.node_public]
    assert len(path.learned) == MAX_LEARNED
    assert len(path.last_ping_rx) <= MAX_LEARNED + 1


async def test_call_me_maybe_counts_only_through_derp_from_its_owner_and_pings_a_bounded_number() -> None:
    conn, peer, other = make_conn(), Peer(), Peer()
    sent = Sent(conn)
    add(conn, peer)
    add(conn, other)
    many = disco.CallMeMaybe(endpoints=[(f"10.1.{i >> 8}.{i & 255}", 4000) for i in range(1000)])
    data = peer.seal_to(conn, many)
    conn._on_udp_datagram(data, ("udp", PEER_ADDR))  # over UDP: tailscaled ignores these too
    conn._on_derp_packet(999, other.node_public, data)  # relayed by DERP, but from another node
    assert conn.stats["disco.callmemaybe_not_via_derp"] == 1
    assert conn.stats["disco.derp_sender_mismatch"] == 1
    assert conn.stats["disco.callmemaybe_in"] == 0 and not sent.udp
    conn._on_derp_packet(999, peer.node_public, data)
    assert conn.stats["disco.callmemaybe_in"] == 1
    assert len(sent.udp) == MAX_CALL_ME_MAYBE_ENDPOINTS  # one ping per endpoint it kept


async def test_a_churning_peer_table_keeps_exactly_one_box_per_current_peer() -> None:
    conn = make_conn()
    Sent(conn)
    peers = [Peer() for _ in range(50)]
    stale: list[bytes] = []
    for round_ in range(20):
        for i, peer in enumerate(peers):
            if (i + round_) % 3 == 0:
                stale.append(peer.seal_to(conn, ping()))
                peer.restart()
            if (i + round_) % 7 == 0:
                conn.remove_peer(peer.node_public)
            else:
                add(conn, peer)
        for data in stale[-20:]:
            conn._on_udp_datagram(data, ("udp", PEER_ADDR))
    current = {p.disco_public for p in peers if p.node_public in conn.paths.peers}
    assert set(conn._disco_peers) == current
    assert conn.stats["disco.unknown_sender"] > 0
    assert not any(k.startswith("internal_error") for k in conn.stats)


async def test_garbage_that_is_neither_wireguard_stun_nor_disco_is_counted() -> None:
    conn = make_conn()
    for first in (b"\x00", b"\x05", b"T", b"\xff"):
        conn._on_udp_datagram(first + b"\x00" * 40, ("udp", PEER_ADDR))
    conn._on_udp_datagram(disco.MAGIC + b"\x00" * 10, ("udp", PEER_ADDR))  # a truncated disco header
    assert conn.stats["recv.udp_unknown"] + conn.stats["stun.bad"] == 5


async def test_a_handler_that_raises_costs_one_datagram_not_the_reader() -> None:
    seen: list[bytes] = []

    def on_wireguard(datagrams: Sequence[bytes | memoryview], derp_src: bytes | None, path: Any) -> None:
        for data in datagrams:
            if bytes(data[4:8]) == b"boom":
                raise KeyError("a bug met by one packet")
            seen.append(bytes(data))

    conn = make_conn(on_wireguard)
    batch_ends: list[int] = []

    def on_batch_end() -> None:
        batch_ends.append(1)
        if len(batch_ends) == 1:
            raise ValueError("a bug at the end of a batch")

    conn.on_batch_end = on_batch_end
    conn.bind()
    assert conn.udp.sock is not None
    target = conn.udp.sock.getsockname()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._udp_reader)
        for i in range(10):
            sender.sendto(b"\x04\x00\x00\x00" + (b"boom" if i % 2 else b"good") + bytes([i]) * 32, target)
            await trio.sleep(0.01)
        with trio.fail_after(5):
            while len(seen) < 5:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    sender.close()
    assert len(seen) == 5
    assert conn.stats["internal_error.udp_datagram"] == 5
    assert conn.stats["internal_error.batch_end"] == 1
