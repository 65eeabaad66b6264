"""A long-lived stack under a stream of mutated IPv4, IPv6, TCP, UDP and ICMP packets.

Unlike tests/fuzz (a fresh stack per input), one StackCore lives through the
whole run, as a node's does: packets are built from the live state (in-window
data, out-of-order data, SACK blocks for what is in flight, FINs, RSTs, SYNs to
the listener, the ACK that completes a half-open connection, datagrams, echoes),
then most are mutated (bit flips, bytes, cuts, junk, header fields) and most of
those get their checksums fixed again so the mutation reaches the state
machines. An application accepts, reads, writes and closes meanwhile; timers run.

Asserted: nothing raises and no internal error is counted; every packet is
accounted for (the ones that were not processed are counted as drops); every
table stays within its bound all along; and once the application lets go, timers
alone empty every table.

`make fuzz` runs TRIONET_FUZZ_EXAMPLES packets (1,000,000 by default); `make
unit` runs QUICK.
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct

import pytest

from trionet.netstack.reassembly import OOO_MAX_PIECES
from trionet.netstack.scoreboard import RTX_MAX, SACK_SCOREBOARD_MAX
from trionet.netstack.stack import StackCore
from trionet.netstack.tcp import State, TcpConnection
from trionet.netstack.wire import finish_checksum, ones_sum
from trionet.netstack.wire import icmp as wicmp
from trionet.netstack.wire import ipv4 as wip4
from trionet.netstack.wire import ipv6 as wip6
from trionet.netstack.wire import tcp as wtcp
from trionet.netstack.wire.tcp import ACK, FIN, PSH, RST, SYN

QUICK = 30_000
LONG = int(os.environ.get("TRIONET_FUZZ_EXAMPLES", "1000000"))
L4, L6 = ipaddress.ip_address("100.64.0.1"), ipaddress.ip_address("fd7a:115c:a1e0::1")
P4, P6 = ipaddress.ip_address("100.64.0.2"), ipaddress.ip_address("fd7a:115c:a1e0::2")
MAX_CONNS, MAX_PER_PEER, SYN_BACKLOG, BACKLOG = 128, 64, 32, 16
UDP_COUNT, UDP_BYTES = 64, 16 << 10
ICMP_COUNTED = ("icmp_echo_replied", "icmp_unmatched_reply", "icmp_ignored", "icmp_echo_reply_matched")


def _ip(src: ipaddress.IPv4Address | ipaddress.IPv6Address, dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
        proto: int, body: bytes) -> bytes:
    if src.version == 4:
        return wip4.build_header(src.packed, dst.packed, proto, len(body)) + body
    return wip6.build_header(src.packed, dst.packed, proto, len(body)) + body


def fix_checksums(data: bytes) -> bytes:
    """The packet with its lengths cut to the buffer and its checksums valid again."""
    buf = bytearray(data)
    if len(buf) >= 20 and buf[0] >> 4 == 4:
        ihl = (buf[0] & 0xF) * 4
        if not 20 <= ihl <= len(buf):
            return bytes(buf)
        if struct.unpack_from("!H", buf, 2)[0] > len(buf):
            buf[2:4] = struct.pack("!H", len(buf))
        buf[10:12] = b"\0\0"
        buf[10:12] = finish_checksum(ones_sum(buf[:ihl])).to_bytes(2, "big")
        start, end, proto = ihl, min(len(buf), struct.unpack_from("!H", buf, 2)[0]), buf[9]
        pseudo = 0 if proto == 1 else ones_sum(buf[12:20]) + proto + max(0, end - start)
    elif len(buf) >= 40 and buf[0] >> 4 == 6:
        if 40 + struct.unpack_from("!H", buf, 4)[0] > len(buf):
            buf[4:6] = struct.pack("!H", len(buf) - 40)
        start, end, proto = 40, min(len(buf), 40 + struct.unpack_from("!H", buf, 4)[0]), buf[6]
        pseudo = ones_sum(buf[8:40]) + proto + max(0, end - start)
    else:
        return bytes(buf)
    off = {6: 16, 17: 6, 1: 2, 58: 2}.get(proto)
    if off is not None and end - start >= off + 2:
        buf[start + off:start + off + 2] = b"\0\0"
        buf[start + off:start + off + 2] = finish_checksum(pseudo + ones_sum(buf[start:end])).to_bytes(2, "big")
    return bytes(buf)


class World:
    """The stack, its application, and the peers' side of each connection."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.out: list[bytes] = []
        self.stack = StackCore([L4, L6], self.out.append, seed=seed, max_connections=MAX_CONNS,
                               max_connections_per_peer=MAX_PER_PEER)
        self.listener = self.stack.tcp_listen(80, backlog=BACKLOG, syn_backlog=SYN_BACKLOG)
        self.udp = self.stack.udp_bind(53, queue_limit=UDP_COUNT, queue_bytes_limit=UDP_BYTES)
        self.accepted: list[TcpConnection] = []
        self.now = 0.0
        self.delivered = 0
        self.next_port = 20000

    # ------------------------------------------------------------- the peers
    def _peer_of(self, conn: TcpConnection) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
                                                     ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return ipaddress.ip_address(conn.key[0]), ipaddress.ip_address(conn.key[2])

    def _tcp(self, src: ipaddress.IPv4Address | ipaddress.IPv6Address, sport: int,
             dst: ipaddress.IPv4Address | ipaddress.IPv6Address, dport: int, seq: int, ack: int,
             flags: int, opts: bytes = b"", payload: bytes = b"", window: int = 65535) -> bytes:
        pb = ones_sum(src.packed + dst.packed) + 6
        seg = wtcp.build(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, window, opts,
                         payload, pb) + payload
        return _ip(src, dst, 6, seg)

    def to_connection(self, conn: TcpConnection) -> bytes:
        """A segment a live peer could send: mostly in the window, sometimes not."""
        rng = self.rng
        src, dst = self._peer_of(conn)
        sport, dport = conn.key[1], conn.key[3]
        seq = conn.rcv_nxt
        ack = conn.snd_una + rng.randrange(0, max(1, conn.snd_max - conn.snd_una + 1))
        kind = rng.randrange(10)
        opts = wtcp.build_options(ts=(int(self.now * 1000), 0)) if conn.ts_ok and rng.random() < 0.5 else b""
        if kind <= 2:  # in order (mostly what the receive fast path predicts)
            if rng.random() < 0.7:
                ack = conn.snd_una
            return self._tcp(src, sport, dst, dport, seq, ack, ACK | PSH, opts,
                             rng.randbytes(rng.randrange(1, 1200)))
        if kind <= 4:  # out of order, overlapping
            return self._tcp(src, sport, dst, dport, seq + rng.randrange(1, 200_000), ack, ACK, opts,
                             rng.randbytes(rng.randrange(1, 1200)))
        if kind == 5 and conn.snd_max > conn.snd_una:  # SACK blocks for what is in flight
            blocks = []
            for _ in range(rng.randrange(1, 5)):
                left = conn.snd_una + rng.randrange(0, conn.snd_max - conn.snd_una)
                blocks.append((left & 0xFFFFFFFF, (left + rng.randrange(1, 3000)) & 0xFFFFFFFF))
            return self._tcp(src, sport, dst, dport, seq, conn.snd_una, ACK,
                             wtcp.build_options(sack=tuple(blocks)))
        if kind == 6:
            return self._tcp(src, sport, dst, dport, seq, ack, ACK | FIN, opts)
        if kind == 7 and rng.random() < 0.1:
            return self._tcp(src, sport, dst, dport, seq + rng.choice((0, 1, 5000)), 0, RST)
        if kind == 8:  # a window that shuts and opens
            return self._tcp(src, sport, dst, dport, seq, ack, ACK, opts, window=rng.choice((0, 1, 65535)))
        return self._tcp(src, sport, dst, dport, seq + rng.randrange(-5000, 5000), ack,
                         rng.randrange(256), opts, rng.randbytes(rng.randrange(0, 64)))

    def syn(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.5:
            src: ipaddress.IPv4Address | ipaddress.IPv6Address = P4 if rng.random() < 0.5 else \
                ipaddress.ip_address(0x0A000000 + rng.randrange(1 << 16))
            dst: ipaddress.IPv4Address | ipaddress.IPv6Address = L4
        else:
            src, dst = (P6 if rng.random() < 0.5 else ipaddress.ip_address(
                int(P6) + rng.randrange(1, 1 << 16))), L6
        self.next_port = self.next_port % 60000 + 1
        opts = wtcp.build_options(mss=rng.choice((536, 1200, 1460)), wscale=rng.choice((None, 0, 7, 14)),
                                  sack_perm=rng.random() < 0.7,
                                  ts=(rng.randrange(1 << 32), 0) if rng.random() < 0.7 else None)
        return self._tcp(src, 1024 + self.next_port, dst, rng.choice((80, 80, 80, 81)),
                         rng.randrange(1 << 32), 0, SYN, opts)

    def complete_handshake(self) -> bytes | None:
        """The ACK that turns a half-open connection into an established one."""
        half = list(self.stack._half_open.values())
        if not half:
            return None
        conn = self.rng.choice(half)
        src, dst = self._peer_of(conn)
        return self._tcp(src, conn.key[1], dst, conn.key[3], conn.rcv_nxt, conn.iss + 1, ACK)

    def datagram(self) -> bytes:
        rng = self.rng
        src, dst = (P4, L4) if rng.random() < 0.5 else (P6, L6)
        body = struct.pack("!HHHH", 5353, rng.choice((53, 53, 54)), 8 + 0, 0)
        payload = rng.randbytes(rng.randrange(0, 1400))
        body = body[:4] + struct.pack("!H", 8 + len(payload)) + b"\0\0" + payload
        return fix_checksums(_ip(src, dst, 17, body))

    def echo(self) -> bytes:
        rng = self.rng
        src, dst = (P4, L4) if rng.random() < 0.5 else (P6, L6)
        typ = rng.choice((wicmp.V4_ECHO_REQUEST, wicmp.V4_ECHO_REPLY, 3) if src.version == 4 else
                         (wicmp.V6_ECHO_REQUEST, wicmp.V6_ECHO_REPLY, 1))
        body = struct.pack("!BBHHH", typ, 0, 0, rng.randrange(1 << 16), rng.randrange(1 << 16))
        return fix_checksums(_ip(src, dst, 1 if src.version == 4 else 58, body + rng.randbytes(rng.randrange(64))))

    def seed_packet(self) -> bytes:
        rng = self.rng
        r = rng.random()
        live = [c for c in self.stack.conns.values() if c.state is not State.SYN_RECEIVED]
        if r < 0.5 and live:
            return self.to_connection(rng.choice(live))
        if r < 0.62:
            return self.syn()
        if r < 0.72:
            ack = self.complete_handshake()
            if ack is not None:
                return ack
        if r < 0.85:
            return self.datagram()
        if r < 0.95:
            return self.echo()
        return rng.randbytes(rng.randrange(1, 100))

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        buf = bytearray(data)
        ihl = 20 if buf and buf[0] >> 4 == 4 else 40
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(7)
            if op == 0 and buf:
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
            elif op == 1 and buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif op == 2:
                del buf[rng.randrange(len(buf) + 1):]
            elif op == 3:
                buf += rng.randbytes(rng.randrange(1, 64))
            elif op == 4 and len(buf) >= ihl + 20:  # a TCP header field: seq, ack, offset/flags, window
                at = ihl + rng.choice((4, 8, 12, 13, 14))
                width = 4 if at - ihl in (4, 8) else (2 if at - ihl == 14 else 1)
                buf[at:at + width] = rng.randbytes(width)
            elif op == 5 and len(buf) >= ihl:  # an IP header field
                at = rng.randrange(ihl)
                buf[at] = rng.randrange(256)
            elif op == 6 and len(buf) >= ihl + 4:  # ports
                buf[ihl:ihl + 4] = rng.randbytes(4)
        out = bytes(buf)
        return fix_checksums(out) if rng.random() < 0.8 else out

    # --------------------------------------------------------- the application
    def application(self) -> None:
        rng = self.rng
        now = self.now
        while (conn := self.listener.accept_queue.popleft() if self.listener.accept_queue else None):
            if conn.state is not State.CLOSED:
                self.accepted.append(conn)
        for conn in list(self.accepted):
            if conn.state is State.CLOSED:
                self.accepted.remove(conn)
                continue
            if conn.rbuf and rng.random() < 0.7:
                conn.read(rng.choice((100, 1 << 20)), now)
            if conn.state in (State.ESTABLISHED, State.CLOSE_WAIT) and not conn.fin_queued \
                    and rng.random() < 0.2:
                conn.send(b"r" * rng.randrange(1, 20_000), now)
            if rng.random() < 0.02:
                conn.release(now)
                self.accepted.remove(conn)
            elif rng.random() < 0.01 and conn.state is State.ESTABLISHED:
                conn.set_keepalive(5.0, 1.0, 3, now)
        while self.udp.queue and rng.random() < 0.8:
            self.udp.pop()
        self.stack._flush(now)
        self.stack.touched.clear()  # (the driver wakes these and lets go of them)

    # -------------------------------------------------------------- the checks
    def check_bounds(self) -> None:
        st = self.stack
        assert len(st.conns) <= MAX_CONNS
        assert sum(st._peer_conns.values()) == len(st.conns)
        assert all(0 < n <= MAX_PER_PEER for n in st._peer_conns.values())
        assert len(self.listener.half_open) <= SYN_BACKLOG and len(st._half_open) <= SYN_BACKLOG
        assert len(self.listener.accept_queue) <= BACKLOG
        assert len(st._flows4) <= len(st.conns)
        assert len(self.udp.queue) <= UDP_COUNT and self.udp.queued_bytes <= UDP_BYTES
        assert self.udp.queued_bytes == sum(len(d) for d, _ in self.udp.queue)
        assert len(st._pseudo) <= 4097 and not st.echo
        for c in st.conns.values():
            cfg = c.config
            ooo, board, rtx = c.reassembly, c.recovery.scoreboard, c.recovery.retransmitted
            assert len(ooo.pieces) <= OOO_MAX_PIECES and len(board.blocks) <= SACK_SCOREBOARD_MAX
            assert len(rtx.entries) <= RTX_MAX and len(ooo.recent) <= 8
            assert c.ooo_bytes + len(c.rbuf) <= cfg.recv_buffer and len(c.sbuf) <= cfg.send_buffer
            assert c.ooo_bytes == sum(map(len, ooo.pieces.values()))
            assert board.nbytes == sum(r - left for left, r in board.blocks)
            assert rtx.nbytes == sum(e[1] - e[0] for e in rtx.entries)
            marks = [e[2] for e in rtx.entries]
            assert (rtx.min_mark, rtx.min_count) == (
                (min(marks), marks.count(min(marks))) if marks else (rtx.min_mark, 0))
            for e in rtx.entries:  # none of a retransmission in flight is SACKed
                assert all(r <= e[0] or left >= e[1] for left, r in board.blocks)

    def check_accounting(self) -> None:
        stats = self.stack.statistics()
        errors = {k: v for k, v in stats.items() if k.startswith("internal_error")}
        assert not errors, errors
        drops = sum(v for k, v in stats.items() if k.startswith("drop_"))
        handled = stats["tcp_in"] + stats["udp_in"] + sum(stats.get(k, 0) for k in ICMP_COUNTED)
        assert stats["ip_in"] == self.delivered == drops + handled

    def run(self, packets: int) -> None:
        rng = self.rng
        sent = 0
        rounds = 0
        while sent < packets:
            batch = []
            for _ in range(min(rng.randrange(1, 65), packets - sent)):
                p = self.seed_packet()
                batch.append(self.mutate(p) if rng.random() < 0.7 else p)
            self.now += rng.choice((0.0, 0.001, 0.01, 0.2))
            if rng.random() < 0.5:
                self.stack.deliver_many(batch, self.now)
            else:
                for p in batch:
                    self.stack.deliver(p, self.now)
            self.delivered += len(batch)
            sent += len(batch)
            self.application()
            deadline = self.stack.next_deadline()
            if deadline is not None and deadline <= self.now:
                self.stack.on_timer(self.now)
            rounds += 1
            if rounds % 50 == 0:
                self.check_bounds()
                for p in self.out[-20:]:  # what we send is well-formed
                    assert fix_checksums(p) == p
            self.out.clear()
        self.check_bounds()
        self.check_accounting()

    def wind_down(self) -> None:
        """The application lets go of everything; timers alone must empty the tables."""
        for conn in self.accepted + list(self.listener.accept_queue):
            conn.release(self.now)
        self.listener.accept_queue.clear()
        self.accepted.clear()
        for _ in range(10_000):
            d = self.stack.next_deadline()
            if d is None:
                break
            self.now = max(self.now, d)
            self.stack.on_timer(self.now)
            self.out.clear()
        st = self.stack
        leftover = [c.state for c in st.conns.values()]
        assert not st.conns, leftover
        assert not st._peer_conns and not st._half_open and not st._flows4
        assert not self.listener.half_open
        self.check_accounting()


def test_mutated_packets_to_a_living_stack() -> None:
    world = World(seed=1)
    world.run(QUICK)
    stats = world.stack.statistics()
    # the run reached what it is meant to: connections, their data, limits, drops
    assert stats["tcp_passive_opens"] > 100 and world.stack.fast_segments > 0
    assert stats["tcp_syn_backlog_evicted"] > 0 and stats["udp_in"] > 0
    assert stats["icmp_echo_replied"] > 0 and stats["drop_tcp_bad_checksum"] > 0
    world.wind_down()


@pytest.mark.fuzz
def test_a_million_mutated_packets_to_a_living_stack() -> None:
    world = World(seed=int(os.environ.get("TRIONET_FUZZ_SEED", "0")))
    world.run(LONG)
    world.wind_down()
