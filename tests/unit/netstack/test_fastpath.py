"""The receive fast path and the driver's timer bookkeeping (issue 8).

* Header prediction (``rcv_prediction``, runs taken by ``rcv_fast_run``) must leave a connection exactly
  as ``on_segment`` would: the same script is played to two stacks, one with the
  fast path switched off, and every packet out and every piece of state compared.
* The driver no longer scans every connection after each packet batch and each
  read; it looks at the connections a call touched. A timer armed anywhere else
  would be forgotten: a lost SYN-ACK or a lost first data segment would then never
  be retransmitted. Both are played here in simulated time.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable

import pytest
import trio
import trio.testing

from trionet.netstack import NetStack, TcpConfig
from trionet.netstack.stack import StackCore
from trionet.netstack.tcp import TcpConnection
from trionet.netstack.wire import tcp as wtcp
from trionet.netstack.wire.tcp import ACK, FIN, PSH, SYN, URG

from .fakepeer import PEER, US, make_segment, parse_out
from .simlink import B4, Pipe, linked_stacks

STATE = ("state", "rcv_nxt", "snd_una", "snd_nxt", "snd_wnd", "snd_wl1", "snd_wl2", "ts_recent",
         "_ack_pending", "_ack_now", "delack_at", "rto_at", "persist_at", "fin_received",
         "reassembly.starts", "recovery.dupacks", "recovery.scoreboard.blocks", "in_recovery",
         "recovery.reo_at", "recovery.lost_high", "recovery.tlp_at",
         "last_rcv", "keepalive_at", "_ka_probes", "ooo_bytes")


def _ts(val: int, ecr: int = 0) -> bytes:
    return b"\x01\x01\x08\x0a" + struct.pack("!II", val, ecr)


class _Side:
    def __init__(self, fast: bool, config: TcpConfig | None = None) -> None:
        self.out: list[bytes] = []
        self.stack = StackCore([US], self.out.append, tcp_config=config, seed=5)
        self.conn: TcpConnection | None = None  # the newest
        self.conns: list[TcpConnection] = []
        self._fast = fast

    def open(self) -> tuple[int, int]:
        """A new connection, established; its local port and our next sequence number."""
        conn = self.stack.tcp_connect(PEER, 80, 0.0)
        syn = parse_out(self.out.pop())
        self.stack.deliver(make_segment(80, syn.sport, 7000, syn.seq + 1, SYN | ACK, 65535,
                                        options=wtcp.build_options(mss=1000, wscale=2,
                                                                   sack_perm=True, ts=(50, 1))),
                           0.001)
        self.out.clear()
        self.stack.header_prediction = self._fast
        self.conn = conn
        self.conns.append(conn)
        return syn.sport, syn.seq + 1

    def state(self) -> list[dict[str, object]]:
        states = []
        for conn in self.conns:
            s = {k: operator.attrgetter(k)(conn) for k in STATE}
            s["rbuf"] = bytes(conn.rbuf)
            s["stats"] = dict(conn.stats)
            states.append(s)
        return states


def _play(sides: list[_Side], script: list[tuple[float, list[bytes]]],
          before: Callable[[_Side, float], None] | None = None) -> None:
    """Each batch to both sides (``before`` first); what goes out and every piece of
    connection state must be the same after each."""
    for now, packets in script:
        outs = []
        for side in sides:
            if before is not None:
                before(side, now)
            side.stack.deliver_many(packets, now)
            if not packets:
                side.stack.on_timer(now)
            outs.append(sorted((parse_out(p) for p in side.out), key=lambda seg: seg.sport))  # stable per port
            side.out.clear()
        assert outs[0] == outs[1], f"at {now}"
        assert sides[0].state() == sides[1].state(), f"at {now}"
        assert sides[0].stack.statistics() == sides[1].stack.statistics()


def test_fast_path_changes_exactly_what_the_slow_path_does() -> None:
    sides = [_Side(fast=True), _Side(fast=False)]
    port, our_seq = sides[0].open()
    assert sides[1].open() == (port, our_seq), "same seed, same ports and ISS"
    pseq = 7001
    script: list[tuple[float, list[bytes]]] = []

    def data(seq: int, n: int, flags: int = ACK, ack: int = our_seq, wnd: int = 4000,
             opts: bytes | None = None, fill: int = 0x61) -> bytes:
        return make_segment(80, port, seq, ack, flags, wnd, bytes([fill]) * n,
                            _ts(100 + seq % 1000, 1) if opts is None else opts)

    # in order, several per batch, PSH and no-PSH, with and without timestamps
    script.append((0.01, [data(pseq, 1000), data(pseq + 1000, 1000, ACK | PSH),
                          data(pseq + 2000, 500, opts=b"")]))
    pseq += 2500
    # the window the peer offers changes; an URG segment; a gap, then its filler
    script.append((0.02, [data(pseq, 1000, wnd=0), data(pseq + 1000, 100, ACK | URG)]))
    pseq += 1100
    script.append((0.03, [data(pseq + 1000, 1000), data(pseq, 1000, fill=0x62)]))
    pseq += 2000
    # a duplicate (old) segment, then the peer's window opens again
    script.append((0.04, [data(pseq - 1000, 1000), data(pseq, 1000, wnd=8000)]))
    pseq += 1000
    script.append((0.3, []))  # the delayed ACK timer
    # we send; the peer's data acknowledges part of it, then nothing new (fast path again)
    script.append((0.5, [data(pseq, 700)]))
    pseq += 700
    script.append((0.6, [data(pseq, 300, ack=our_seq + 400), data(pseq + 300, 300,
                                                                 ack=our_seq + 400)]))
    pseq += 600
    script.append((0.7, [data(pseq, 10, ACK | FIN, ack=our_seq + 400)]))
    pseq += 11
    script.append((0.8, [data(pseq, 10, ack=our_seq + 400)]))  # data after FIN: not taken

    def send_first(side: _Side, now: float) -> None:
        if now == 0.5:
            assert side.conn is not None
            side.conn.send(b"q" * 900, now)

    _play(sides, script, send_first)
    assert sides[0].stack.fast_segments == 7 and sides[1].stack.fast_segments == 0
    conn = sides[0].conn
    assert conn is not None and conn.fin_received and bytes(conn.rbuf).count(b"b") == 1000
    assert len(conn.rbuf) == 2500 + 1100 + 2000 + 1000 + 700 + 600 + 10


def test_runs_in_a_batch_change_exactly_what_the_slow_path_does() -> None:
    """Runs broken by another connection, a gap, a new ACK, a full receive buffer;
    windows that close and open inside a run."""
    config = TcpConfig(recv_buffer=6000)
    sides = [_Side(fast=True, config=config), _Side(fast=False, config=config)]
    ports = [sides[0].open(), sides[0].open()]
    assert [sides[1].open(), sides[1].open()] == ports
    (p1, our1), (p2, our2) = ports
    seqs = {p1: 7001, p2: 7001}

    def data(port: int, n: int, wnd: int = 4000, ack: int | None = None, skip: int = 0,
             opts: bytes | None = None) -> bytes:
        seq = seqs[port] + skip
        if not skip:
            seqs[port] += n
        return make_segment(80, port, seq, (our1 if port == p1 else our2) if ack is None else ack, ACK,
                            wnd, bytes([port & 0x7F]) * n, _ts(200 + seq % 1000, 1) if opts is None else opts)

    script: list[tuple[float, list[bytes]]] = [
        (0.01, [data(p1, 500, wnd=4000), data(p1, 500, wnd=0), data(p2, 300), data(p1, 500, wnd=0),
                data(p1, 500, wnd=0), data(p2, 300, opts=b""), data(p2, 300)]),
        (0.02, [data(p1, 400, wnd=0), data(p1, 400, wnd=0)]),  # a run whose windows are all closed
        (0.03, [data(p1, 1000), data(p1, 1000, skip=1000), data(p1, 1000), data(p1, 1000)]),
        (0.04, [data(p2, 2000), data(p2, 2000), data(p2, 1500), data(p2, 900)]),  # fills the buffer
        (0.3, []),
    ]
    _play(sides, script)
    # 7 + 2, then 1 (a gap stops the rest), then 2 (the third does not fit)
    assert sides[0].stack.fast_segments == 12 and sides[1].stack.fast_segments == 0
    # the application reads; the peer sends on, then acknowledges what we sent meanwhile
    for side in sides:
        for conn in side.conns:
            conn.read(1 << 20, 0.5)
        side.conns[0].send(b"r" * 300, 0.5)
        side.out.clear()
    _play(sides, [(0.6, [data(p1, 700), data(p1, 700, ack=our1 + 300), data(p1, 700, ack=our1 + 300)])])
    assert sides[0].stack.fast_segments == 12 + 2  # the one acknowledging new data is not
    assert sides[0].conns[0].snd_una == our1 + 300
    # the peer's window closes while we have data queued (the persist timer runs); a run
    # opens it and closes it again: the timer stops and starts over, as one by one
    acked = our1 + 300
    _play(sides, [(0.7, [data(p1, 100, wnd=0, ack=acked)]), (0.75, [])],
          lambda side, now: side.conns[0].send(b"s" * 200, now) if now == 0.75 else None)
    assert sides[0].conns[0].persist_at is not None
    _play(sides, [(0.9, [data(p1, 100, wnd=0, ack=acked), data(p1, 100, wnd=4000, ack=acked),
                         data(p1, 100, wnd=0, ack=acked)])])
    assert sides[0].stack.fast_segments == 14 + 4


def test_admit_is_asked_about_every_packet_but_the_fast_path() -> None:
    side = _Side(fast=True)
    port, our_seq = side.open()
    asked: list[int] = []

    def admit(packet: bytes | bytearray | memoryview) -> bool:
        flags = packet[33]
        asked.append(flags)
        return not flags & SYN

    segs = [make_segment(80, port, 7001, our_seq, ACK, 4000, b"x" * 100),
            make_segment(80, port, 7101, our_seq, ACK, 4000, b"y" * 100),
            make_segment(80, port, 7201, our_seq, SYN, 4000),  # refused: no challenge ACK either
            make_segment(80, port, 7201, our_seq, ACK | FIN, 4000, b"z")]
    side.stack.deliver_many(segs, 0.1, admit)
    assert asked == [SYN, ACK | FIN]
    assert side.conn is not None and bytes(side.conn.rbuf) == b"x" * 100 + b"y" * 100 + b"z"
    assert side.conn.fin_received and side.stack.fast_segments == 2
    other = make_segment(81, 5555, 1, 0, SYN, 4000)  # no connection: the slow path asks too
    side.stack.deliver_many([other], 0.2, lambda p: False)
    assert side.stack.statistics().get("tcp_in", 0) == 5 - 1


def test_keepalive_connections_keep_the_fast_path() -> None:
    """Keepalive needs no rescheduling per segment: the fast path notes when the peer
    was last heard, and the keepalive timer moves its own deadline when it is stale."""
    side = _Side(fast=True, config=TcpConfig(keepalive_idle=10.0))
    port, our_seq = side.open()
    conn = side.conn
    assert conn is not None and conn.keepalive_at == pytest.approx(10.001)  # from the handshake
    side.stack.deliver(make_segment(80, port, 7001, our_seq, ACK, 4000, b"x" * 100), 1.0)
    assert side.stack.fast_segments == 1 and conn.last_rcv == 1.0
    side.stack.on_timer(1.1)  # the delayed ACK
    side.out.clear()
    side.stack.on_timer(10.001)
    assert side.out == [], "heard from 9 s ago: no probe yet"
    assert conn.keepalive_at == pytest.approx(11.0) and conn.stats["keepalive_probes"] == 0


def test_unchecked_checksums_only_when_asked() -> None:
    for verify in (True, False):
        out: list[bytes] = []
        stack = StackCore([US], out.append, seed=5, verify_checksums=verify)
        conn = stack.tcp_connect(PEER, 80, 0.0)
        syn = parse_out(out.pop())
        stack.deliver(make_segment(80, syn.sport, 7000, syn.seq + 1, SYN | ACK, 65535), 0.0)
        seg = bytearray(make_segment(80, syn.sport, 7001, syn.seq + 1, ACK, 65535, b"hello"))
        seg[-1] ^= 0x20  # corrupt the payload: only the TCP checksum can tell
        stack.deliver(bytes(seg), 0.01)
        assert bytes(conn.rbuf) == (b"" if verify else b"hellO")
        assert stack.stats["drop_tcp_bad_checksum"] == (1 if verify else 0)


def test_other_options_of_a_known_connection_are_parsed_once_and_counted() -> None:
    """An IPv4 segment of a known connection with options other than a lone timestamp
    (an ACK with SACK blocks) goes from the fast path's unpack to its connection, not
    through a second parse: its blocks reach the scoreboard, the filter is asked, and
    it is counted once; one with malformed options is dropped and counted as such."""
    side = _Side(fast=True)
    port, our_seq = side.open()
    conn = side.conn
    assert conn is not None and conn.sack_ok and conn.ts_ok
    conn.send(b"a" * 3000, 0.01)
    side.out.clear()
    una = conn.snd_una
    sack = wtcp.build_options(ts=(60, 1), sack=((our_seq + 988, our_seq + 1976),))
    asked: list[int] = []

    def admit(packet: bytes | bytearray | memoryview) -> bool:
        asked.append(len(packet))
        return True

    before = dict(side.stack.stats)
    side.stack.deliver_many([make_segment(80, port, 7001, our_seq, ACK, 4000, options=sack)], 0.02, admit)
    assert conn.recovery.scoreboard.blocks == [(una + 988, una + 1976)]
    assert conn.stats["sack_blocks_in"] == 1 and asked == [20 + 20 + len(sack)]
    stats = side.stack.stats
    assert (stats["ip_in"] - before.get("ip_in", 0), stats["tcp_in"] - before.get("tcp_in", 0)) == (1, 1)
    bad = b"\x02\x09\x05\xb4"  # an MSS option claiming 9 bytes
    side.stack.deliver_many([make_segment(80, port, 7001, our_seq, ACK, 4000, options=bad)], 0.03)
    assert stats["drop_tcp_bad_option"] == 1
    assert (stats["ip_in"] - before.get("ip_in", 0), stats["tcp_in"] - before.get("tcp_in", 0)) == (2, 1)
    assert conn.stats["segments_in"] == 1 + 1  # the SYN-ACK, the SACK: not the malformed one


# ------------------------------------------------------------------ the driver


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class _Tcp:
    """The TCP header fields of an IPv4 packet (20-byte IP header), for dropping rules."""

    def __init__(self, packet: bytes) -> None:
        self.sport, self.dport, self.seq, self.ack, off, self.flags = struct.unpack_from(
            "!HHIIBB", packet, 20)
        self.payload_len = len(packet) - 20 - (off >> 4) * 4


def _dropper(rule: Callable[[_Tcp], bool]) -> Callable[[bytes], bytes | None]:
    return lambda packet: None if rule(_Tcp(packet)) else packet


async def _connections(a: NetStack, b: NetStack, n: int) -> list[trio.abc.Stream]:
    """``n`` idle established connections: every one a candidate for a full scan."""
    lst = b.listen_tcp(9000, backlog=n + 1)
    out: list[trio.abc.Stream] = []
    for _ in range(n):
        out.append(await a.open_tcp_stream(B4, 9000))
        out.append(await lst.accept())
    await lst.aclose()
    return out


async def test_lost_syn_ack_is_retransmitted_by_the_listener(
        autojump_clock: trio.testing.MockClock) -> None:
    syn_acks = [0]
    client_syns = [0]

    def first_syn_ack(h: _Tcp) -> bool:
        if h.sport != 80 or h.flags & (SYN | ACK) != SYN | ACK:
            return False
        syn_acks[0] += 1
        return syn_acks[0] == 1

    def client_syn_retries(h: _Tcp) -> bool:
        if h.dport != 80 or h.flags & (SYN | ACK) != SYN:
            return False
        client_syns[0] += 1
        return client_syns[0] > 1  # only the listener's own timer can save the handshake

    async with linked_stacks(Pipe(mangle=_dropper(client_syn_retries)),
                             Pipe(mangle=_dropper(first_syn_ack))) as (a, b):
        await _connections(a, b, 20)
        lst = b.listen_tcp(80)
        start = trio.current_time()
        with trio.fail_after(5):
            client = await a.open_tcp_stream(B4, 80)
            server = await lst.accept()
        assert syn_acks[0] == 2 and client_syns[0] >= 1
        assert 0.9 < trio.current_time() - start < 1.5  # the SYN-ACK's 1 s RTO
        await client.send_all(b"ping")
        assert await server.receive_some() == b"ping"


async def test_lost_first_segment_after_idle_is_retransmitted(
        autojump_clock: trio.testing.MockClock) -> None:
    dropped = [0]

    def first_data(h: _Tcp) -> bool:
        if h.dport == 80 and h.payload_len and not dropped[0]:
            dropped[0] += 1
            return True
        return False

    async with linked_stacks(Pipe(mangle=_dropper(first_data))) as (a, b):
        await _connections(a, b, 20)
        lst = b.listen_tcp(80)
        client = await a.open_tcp_stream(B4, 80)
        server = await lst.accept()
        await trio.sleep(30)  # every timer idle: the timer task sleeps for good
        start = trio.current_time()
        await client.send_all(b"x" * 500)
        with trio.fail_after(5):
            assert await server.receive_some() == b"x" * 500
        assert dropped[0] == 1
        assert trio.current_time() - start < 1.5  # one RTO, not a connection timeout
