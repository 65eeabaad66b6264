"""What a hostile peer can make one connection, or the stack, hold is bounded.

Every bound is proved by counts and sizes (no timing): out-of-order bytes within
the receive window and stored once, the SACK scoreboard's blocks under their cap,
FIN-WAIT-2 and TIME-WAIT ended by their timers (time is passed in), half-open
connections of a SYN flood at the listener's cap, connections per peer and in all
refused past their limits, UDP queues bounded in bytes.
"""

from __future__ import annotations

import ipaddress
import itertools
import random

import pytest
import trio
import trio.testing

from trionet.netstack.driver import TcpStream
from trionet.netstack.reassembly import OOO_MAX_PIECES
from trionet.netstack.scoreboard import RTX_MAX, SACK_SCOREBOARD_MAX
from trionet.netstack.stack import ConnectionLimitError, StackCore
from trionet.netstack.tcp import State, TcpConfig, TcpConnection
from trionet.netstack.wire import ipv4 as wip4
from trionet.netstack.wire import tcp as wtcp
from trionet.netstack.wire import udp as wudp
from trionet.netstack.wire.tcp import ACK, FIN, RST, SYN

from .fakepeer import PEER, US, Harness, make_segment
from .simlink import B4, Pipe, linked_stacks

MASK = 0xFFFFFFFF
PATTERN = random.Random(5).randbytes(5 << 20)  # the peer's stream: byte k is PATTERN[k]


def _receiver(config: TcpConfig | None = None) -> tuple[Harness, TcpConnection, int, int]:
    """Our listener accepted the fake peer (SACK, MSS 1200, no window scale of its own
    asked for ours): (harness, connection, the peer's first data seq, our next seq)."""
    h = Harness(config)
    lst = h.stack.tcp_listen(80)
    h.send(0.0, 4000, 80, 100, 0, SYN, options=wtcp.build_options(mss=1200, wscale=0, sack_perm=True))
    (sa,) = h.take()
    h.send(0.0, 4000, 80, 101, sa.seq + 1, ACK)
    conn = lst.accept_queue.popleft()
    assert conn.state is State.ESTABLISHED
    return h, conn, 101, sa.seq + 1


def _data(h: Harness, now: float, pseq: int, seq: int, off: int, n: int) -> bytes:
    """The peer's segment of stream bytes [off, off + n)."""
    return make_segment(4000, 80, (pseq + off) & MASK, seq, ACK, 65535, PATTERN[off:off + n])


def _check_ooo(conn: TcpConnection, base: int) -> None:
    """Pieces disjoint and sorted, blocks their exact union, bytes the stream's, the
    total inside the window."""
    starts = conn.reassembly.starts
    assert starts == sorted(conn.reassembly.pieces) and len(starts) <= OOO_MAX_PIECES
    total = 0
    union: list[list[int]] = []
    for s in starts:
        piece = conn.reassembly.pieces[s]
        assert s > conn.rcv_nxt and len(piece) > 0
        assert bytes(piece) == PATTERN[s - base:s - base + len(piece)], "a stored byte is wrong"
        if union:
            assert union[-1][1] <= s, "a byte is stored twice"
        if union and union[-1][1] == s:
            union[-1][1] = s + len(piece)
        else:
            union.append([s, s + len(piece)])
        total += len(piece)
    assert conn.reassembly.blocks == union
    assert conn.ooo_bytes == total
    assert conn.rcv_nxt + conn.config.recv_buffer - len(conn.rbuf) >= (union[-1][1] if union else 0)
    assert total <= conn.config.recv_buffer - len(conn.rbuf)


@pytest.mark.parametrize("window", [256 << 10, 4 << 20])
def test_20000_overlapping_out_of_order_segments_stay_in_the_window_stored_once(window: int) -> None:
    """Segments of 1 to 1,200 bytes anywhere in the window, overlapping at random. In
    256 KiB every byte that came is kept, once; 4 MiB (the default) holds more
    separate ranges than OOO_MAX_PIECES: the highest go, and the rest is still
    within the window, stored once, and right."""
    h, conn, pseq, seq = _receiver(TcpConfig(recv_buffer=window))
    rng = random.Random(1)
    covered = bytearray(window)  # which stream bytes some segment brought
    batch = []
    for i in range(20_000):
        # every segment overlaps others (starts anywhere, ends anywhere); byte 0 is the
        # hole that keeps all of them out of order; some reach past the window
        off = rng.randrange(1, window)
        n = rng.randrange(1, 1201)
        batch.append(_data(h, 0.1, pseq, seq, off, n))
        covered[off:min(off + n, window)] = b"\1" * (min(off + n, window) - off)
        if len(batch) == 64 or i == 19_999:
            h.stack.deliver_many(batch, 0.1 + i * 1e-5)
            batch.clear()
            h.out.clear()
    _check_ooo(conn, pseq)
    assert conn.rcv_nxt == pseq and not conn.rbuf
    assert conn.ooo_bytes <= window
    if window == 256 << 10:
        assert conn.stats["ooo_pruned"] == conn.stats["ooo_dropped"] == 0
        assert conn.ooo_bytes == covered.count(1)  # everything that came is kept, once
    else:
        assert conn.stats["ooo_pruned"] + conn.stats["ooo_dropped"] > 0
        assert len(conn.reassembly.pieces) <= OOO_MAX_PIECES
    # the holes filled in order: the stream comes out exactly, once
    for off in range(0, window, 1200):
        h.stack.deliver(_data(h, 0.5, pseq, seq, off, min(1200, window - off)), 0.5)
        h.out.clear()
    assert conn.ooo_bytes == 0 and not conn.reassembly.pieces and not conn.reassembly.blocks
    assert conn.rcv_nxt == pseq + window
    assert conn.read(window + 1, 0.6) == PATTERN[:window]


def test_one_byte_pieces_meet_the_piece_cap_highest_first() -> None:
    h, conn, pseq, seq = _receiver()
    for k in range(3 * OOO_MAX_PIECES):  # one byte every third byte: nothing coalesces
        h.stack.deliver(_data(h, 0.1, pseq, seq, 3 + 3 * k, 1), 0.1)
        h.out.clear()
    _check_ooo(conn, pseq)
    assert len(conn.reassembly.pieces) == OOO_MAX_PIECES
    assert conn.stats["ooo_dropped"] == 2 * OOO_MAX_PIECES  # each new one was the highest
    # a low one arrives: the highest piece makes room (Linux prunes from the top too)
    h.stack.deliver(_data(h, 0.2, pseq, seq, 1, 1), 0.2)
    assert conn.stats["ooo_pruned"] == 1 and len(conn.reassembly.pieces) == OOO_MAX_PIECES
    assert conn.reassembly.starts[-1] == pseq + 3 + 3 * (OOO_MAX_PIECES - 2)
    _check_ooo(conn, pseq)
    for off in range(0, 12_000, 1000):  # the peer resends: the stream is whole
        h.stack.deliver(_data(h, 0.5, pseq, seq, off, 1000), 0.5)
    assert conn.read(1 << 20, 0.6) == PATTERN[:12_000]
    assert conn.ooo_bytes == 0


def test_a_segment_past_the_window_is_cut_to_it() -> None:
    h, conn, pseq, seq = _receiver(TcpConfig(recv_buffer=10_000))
    h.stack.deliver(_data(h, 0.1, pseq, seq, 9_500, 1_000), 0.1)
    assert conn.ooo_bytes == 500
    h.stack.deliver(_data(h, 0.1, pseq, seq, 20_000, 1_000), 0.1)  # wholly outside
    assert conn.ooo_bytes == 500
    _check_ooo(conn, pseq)


# ------------------------------------------------------------------- SACK scoreboard


def _sender(flight: int) -> tuple[Harness, TcpConnection, int]:
    """A connection with SACK and ``flight`` bytes sent, none acknowledged: (harness,
    connection, the peer's seq)."""
    h = Harness()
    conn = h.stack.tcp_connect(PEER, 80, 0.0)
    (syn,) = h.take()
    h.send(0.0, 80, syn.sport, 5000, syn.seq + 1, SYN | ACK,
           options=wtcp.build_options(mss=1000, wscale=7, sack_perm=True))
    h.take()
    conn.cc.cwnd = 1 << 30
    assert conn.send(b"s" * flight, 0.0) == flight
    assert conn.snd_max - conn.snd_una == flight
    h.out.clear()
    return h, conn, 5001


def _sack_ack(conn: TcpConnection, pseq: int, blocks: list[tuple[int, int]]) -> bytes:
    return make_segment(80, conn.key[3], pseq, conn.snd_una, ACK, 65535,
                        options=wtcp.build_options(sack=tuple((a & MASK, b & MASK) for a, b in blocks)))


def _check_rtx(conn: TcpConnection) -> None:
    """Retransmissions in flight: sorted, disjoint, none of it SACKed, within their cap;
    the bytes and the oldest mark kept beside them are theirs."""
    held = conn.recovery.retransmitted
    rtx = held.entries
    assert len(rtx) <= RTX_MAX
    assert all(e[0] < e[1] for e in rtx) and all(a[1] <= b[0] for a, b in itertools.pairwise(rtx))
    assert held.nbytes == sum(e[1] - e[0] for e in rtx)
    marks = [e[2] for e in rtx]
    assert held.min_mark == min(marks, default=held.min_mark)
    assert held.min_count == marks.count(held.min_mark)
    sacked = conn.recovery.scoreboard.blocks
    for s, e, _m in rtx:
        assert all(r <= s or left >= e for left, r in sacked), "a SACKed byte counted as in flight"


def _model_insert(model: list[list[int]], left: int, right: int) -> None:
    """The scoreboard's rule, the slow way: merge what overlaps or touches; a block
    that would be a new entry of a full board is forgotten."""
    touching = [b for b in model if b[0] <= right and left <= b[1]]
    if not touching and len(model) >= SACK_SCOREBOARD_MAX:
        return
    for b in touching:
        model.remove(b)
        left, right = min(left, b[0]), max(right, b[1])
    model.append([left, right])
    model.sort()


def test_scoreboard_merges_exactly_and_keeps_its_cap() -> None:
    h, conn, pseq = _sender(400_000)
    base = conn.snd_una
    rng = random.Random(3)
    model: list[list[int]] = []
    sent = 0
    for _ in range(2_500):  # 10,000 blocks, four to an ACK, none acknowledging more
        blocks = []
        for _ in range(4):
            left = base + rng.randrange(1, 400_000 - 50)
            blocks.append((left, left + rng.randrange(1, 50)))
        h.stack.deliver(_sack_ack(conn, pseq, blocks), 0.01)
        h.out.clear()
        for left, right in blocks:
            _model_insert(model, left, right)
        sent += 4
        if conn.state is not State.ESTABLISHED:
            break
    assert conn.stats["sack_blocks_in"] == sent == 10_000
    sb = conn.recovery.scoreboard.blocks
    assert [list(b) for b in sb] == model
    assert len(sb) == SACK_SCOREBOARD_MAX
    assert conn.stats["sack_blocks_ignored"] > 0
    assert conn.recovery.scoreboard.nbytes == sum(r - left for left, r in sb)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(sb))
    _check_rtx(conn)
    # a cumulative ACK takes the blocks below it off, and their bytes
    mid = sb[SACK_SCOREBOARD_MAX // 2][1]
    h.stack.deliver(make_segment(80, conn.key[3], pseq, mid & MASK, ACK, 65535), 0.02)
    assert all(left > mid for left, _r in conn.recovery.scoreboard.blocks)
    assert conn.recovery.scoreboard.nbytes == sum(r - left for left, r in conn.recovery.scoreboard.blocks)


def test_blocks_outside_the_flight_are_ignored() -> None:
    h, conn, pseq = _sender(10_000)
    una = conn.snd_una
    h.stack.deliver(_sack_ack(conn, pseq, [(una - 500, una),  # D-SACK: below SND.UNA
                                           (una + 9_000, una + 20_000),  # past SND.MAX
                                           (una + 300, una + 300)]), 0.01)  # empty
    assert conn.recovery.scoreboard.blocks == [] and conn.recovery.scoreboard.nbytes == 0
    assert conn.stats["sack_blocks_in"] == 3


# ------------------------------------------------------------------------ timers


def test_orphaned_fin_wait_2_ends_on_its_timer_and_frees_its_entry() -> None:
    h = Harness()
    port, seq, pseq = h.connect(now=0.0)
    conn = h.conn
    conn.release(1.0)  # the application is gone: FIN
    (fin,) = h.take()
    assert fin.flags & FIN
    h.send(1.5, 80, port, pseq, seq + 1, ACK)  # our FIN acknowledged; the peer never sends its own
    assert conn.state is State.FIN_WAIT_2
    assert h.stack.statistics()["tcp_state_fin_wait_2"] == 1
    assert h.stack.next_deadline() == pytest.approx(61.5)  # TcpConfig.fin_wait2_timeout
    h.stack.on_timer(61.4)
    assert conn.state is State.FIN_WAIT_2
    h.stack.on_timer(61.5)
    assert conn.state is State.CLOSED and h.take() == []  # silently, as Linux
    stats = h.stack.statistics()
    assert not h.stack.conns and stats["tcp_connections"] == 0 and stats["tcp_peers"] == 0
    assert stats["tcp_state_fin_wait_2"] == 0


def test_half_closed_fin_wait_2_waits_until_the_application_lets_go() -> None:
    h = Harness()
    port, seq, pseq = h.connect(now=0.0)
    conn = h.conn
    conn.close(1.0)  # send_eof: the application still reads
    h.take()
    h.send(1.5, 80, port, pseq, seq + 1, ACK)
    assert conn.state is State.FIN_WAIT_2 and h.stack.next_deadline() is None
    h.send(100.0, 80, port, pseq, seq + 1, ACK, payload=b"late")  # still readable
    assert conn.read(10, 100.0) == b"late"
    h.stack.on_timer(100.1)  # (its delayed ACK)
    assert h.stack.next_deadline() is None
    conn.release(200.0)
    assert h.stack.next_deadline() == pytest.approx(260.0)
    h.stack.on_timer(260.0)
    assert conn.state is State.CLOSED and not h.stack.conns


def test_time_wait_ends_on_its_timer_and_frees_its_entry() -> None:
    h = Harness()
    port, seq, pseq = h.connect(now=0.0)
    conn = h.conn
    conn.release(1.0)
    h.take()
    h.send(1.5, 80, port, pseq, seq + 1, FIN | ACK)
    assert conn.state is State.TIME_WAIT
    assert h.stack.statistics()["tcp_state_time_wait"] == 1
    assert h.stack.next_deadline() == pytest.approx(61.5)  # 2 MSL
    h.stack.on_timer(61.5)
    assert conn.state is State.CLOSED and not h.stack.conns
    assert h.stack.statistics()["tcp_state_time_wait"] == 0


def test_orphan_facing_a_shut_window_gives_up() -> None:
    h = Harness(TcpConfig(max_retries=5))
    port, seq, pseq = h.connect(now=0.0, peer_window=1000)
    conn = h.conn
    conn.send(b"q" * 5000, 0.0)
    h.take()
    h.send(0.1, 80, port, pseq, seq + 1000, ACK, window=0)  # one segment taken, window shut
    conn.release(0.2)
    now = 0.2
    for _ in range(100):
        d = h.stack.next_deadline()
        if d is None:
            break
        now = d
        h.stack.on_timer(now)
        for probe in h.take():  # the peer answers every probe: still no room
            if not probe.flags & RST:
                h.send(now, 80, port, pseq, seq + 1000, ACK, window=0)
    assert conn.state is State.CLOSED and conn.error == "orphan: peer window stayed closed"
    assert not h.stack.conns


def test_set_keepalive_probes_an_idle_peer_then_aborts() -> None:
    h = Harness()
    _port, seq, _pseq = h.connect(now=0.0)
    conn = h.conn
    assert conn.keepalive_at is None  # off by default
    conn.set_keepalive(5.0, 1.0, 3, 0.0)
    assert h.stack.next_deadline() == pytest.approx(5.0)
    for t in (5.0, 6.0, 7.0):
        h.stack.on_timer(t)
        (probe,) = h.take()
        assert probe.flags == ACK and probe.seq == seq - 1 and probe.payload == b""
    h.stack.on_timer(8.0)
    (rst,) = h.take()
    assert rst.flags & RST
    assert conn.state is State.CLOSED and conn.error == "keepalive timeout"
    assert h.stack.statistics()["tcp_keepalive_probes"] == 3 and not h.stack.conns


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_stream_keepalive_finds_a_vanished_peer(autojump_clock: trio.testing.MockClock) -> None:
    gone = [False]

    def vanish(packet: bytes) -> bytes | None:
        return None if gone[0] else packet

    async with linked_stacks(Pipe(mangle=vanish), Pipe(mangle=vanish)) as (a, b):
        lst = b.listen_tcp(80)
        client = await a.open_tcp_stream(B4, 80)
        server = await lst.accept()
        assert isinstance(client, TcpStream)
        client.set_keepalive(idle=10.0, interval=1.0, count=3)
        await client.send_all(b"hi")
        assert await server.receive_some() == b"hi"
        await trio.sleep(1.0)  # its ACK is in
        gone[0] = True  # the peer vanishes without a FIN or RST
        start = trio.current_time()
        with trio.fail_after(60), pytest.raises(trio.BrokenResourceError, match="keepalive timeout"):
            await client.receive_some()
        # simulated time: 10 s idle (one of them already passed), then 3 probes 1 s apart
        assert trio.current_time() - start == pytest.approx(12.0, abs=0.1)
        assert a.statistics()["tcp_keepalive_probes"] == 3
        assert a.statistics()["tcp_connections"] == 0


def test_keepalive_leaves_data_in_flight_to_the_retransmission_timer() -> None:
    h = Harness()
    port, seq, pseq = h.connect(now=0.0)
    conn = h.conn
    conn.set_keepalive(5.0, 1.0, 3, 0.0)
    conn.send(b"d" * 100, 4.0)
    h.take()
    h.send(4.1, 80, port, pseq, seq, ACK)  # heard, nothing acknowledged
    conn.rto_at = None  # (only the keepalive timer runs here)
    h.stack.on_timer(9.1)
    assert h.take() == [] and conn.stats["keepalive_probes"] == 0
    assert conn.keepalive_at == pytest.approx(14.1)


# --------------------------------------------------------------- SYN flood, limits


def test_syn_flood_of_100000_from_many_addresses_keeps_half_open_at_the_cap() -> None:
    out: list[bytes] = []
    stack = StackCore([US], out.append, seed=7, verify_checksums=False)  # as behind WireGuard
    lst = stack.tcp_listen(80, backlog=16, syn_backlog=256)
    template = bytearray(make_segment(1024, 80, 1, 0, SYN, 65535))
    for i in range(100_000):  # 100,000 addresses, none of which ever ACKs
        template[12:16] = (0x0A000000 + i).to_bytes(4, "big")
        template[20:22] = (1024 + i % 60_000).to_bytes(2, "big")
        stack.deliver(bytes(template), i * 1e-5)
        if len(out) > 1000:
            out.clear()
    out.clear()
    stats = stack.statistics()
    assert len(lst.half_open) == 256 and stats["tcp_half_open"] == 256
    assert len(stack.conns) == 256 and stats["tcp_state_syn_received"] == 256
    assert stats["tcp_peers"] == 256  # no count left behind by an evicted one
    assert len(stack._flows4) == 256
    assert stats["tcp_syn_backlog_evicted"] == 100_000 - 256
    # the SYN-ACK retransmissions of those left end when their syn_retries run out
    now = 1.0
    while (d := stack.next_deadline()) is not None:
        now = d
        stack.on_timer(now)
        out.clear()
    assert not stack.conns and not lst.half_open and stack.statistics()["tcp_half_open"] == 0
    # and a real client is served
    stack.deliver(make_segment(5555, 80, 1000, 0, SYN, 65535), now)
    sa = out.pop()
    stack.deliver(make_segment(5555, 80, 1001, int.from_bytes(sa[24:28], "big") + 1, ACK, 65535,
                               b"GET"), now)
    assert bytes(lst.accept_queue[0].rbuf) == b"GET"


def _syn_from(stack: StackCore, out: list[bytes], src: str, sport: int, now: float = 0.0) -> int:
    """A handshake from src:sport to port 80; the flags of our answer to the SYN."""
    srcb = ipaddress.ip_address(src).packed
    stack.deliver(make_segment(sport, 80, 1000, 0, SYN, 65535, src=srcb), now)
    answer = out.pop()
    flags = answer[33]
    if flags == SYN | ACK:
        stack.deliver(make_segment(sport, 80, 1001, int.from_bytes(answer[24:28], "big") + 1, ACK,
                                   65535, src=srcb), now)
    return flags


def test_connection_limits_refuse_with_rst_and_count() -> None:
    out: list[bytes] = []
    stack = StackCore([US], out.append, seed=7, max_connections=10, max_connections_per_peer=4)
    lst = stack.tcp_listen(80, backlog=100)
    assert [_syn_from(stack, out, "10.0.0.2", 2000 + i) for i in range(5)] == [SYN | ACK] * 4 + [RST | ACK]
    stats = stack.statistics()
    assert stats["tcp_conn_limit_peer"] == 1 and stats["tcp_state_established"] == 4
    for i in range(6):  # others fill the table
        assert _syn_from(stack, out, f"10.0.1.{i + 1}", 3000) == SYN | ACK
    assert _syn_from(stack, out, "10.0.2.1", 3000) == RST | ACK
    assert stack.statistics()["tcp_conn_limit_total"] == 1
    with pytest.raises(ConnectionLimitError):  # our own connections count too
        stack.tcp_connect(ipaddress.ip_address("10.0.3.1"), 443, 0.0)
    assert stack.statistics()["tcp_conn_limit_total"] == 2
    # one ends: its slot is free again, for the peer that was refused too
    conn = lst.accept_queue.popleft()
    assert conn.key[0] == ipaddress.ip_address("10.0.0.2").packed
    conn.abort(1.0)
    out.clear()
    assert stack.statistics()["tcp_connections"] == 9
    assert _syn_from(stack, out, "10.0.0.2", 2009, 1.0) == SYN | ACK


def test_a_full_table_makes_room_from_half_open_connections() -> None:
    out: list[bytes] = []
    stack = StackCore([US], out.append, seed=7, max_connections=8)
    stack.tcp_listen(80, backlog=100)
    stack.tcp_listen(81, backlog=100)
    for i in range(8):  # half-open only: never ACKed
        stack.deliver(make_segment(4000 + i, 80, 1, 0, SYN, 65535,
                                   src=ipaddress.ip_address(f"10.1.0.{i + 1}").packed), 0.0)
    assert stack.statistics()["tcp_half_open"] == 8
    # a SYN to another listener: the oldest half-open of them all makes room
    stack.deliver(make_segment(5000, 81, 1, 0, SYN, 65535), 0.0)
    assert out[-1][33] == SYN | ACK
    stats = stack.statistics()
    assert stats["tcp_syn_backlog_evicted"] == 1 and stats["tcp_connections"] == 8
    assert stats.get("tcp_conn_limit_total", 0) == 0


def test_udp_queue_is_bounded_in_bytes_as_well_as_in_datagrams() -> None:
    out: list[bytes] = []
    stack = StackCore([US], out.append, seed=7)
    sock = stack.udp_bind(53, queue_limit=1000, queue_bytes_limit=10_000)
    pb = wip4.pseudo_sum(PEER.packed, US.packed, 17, 0)
    dg = wudp.build(5353, 53, b"u" * 1000, pb)
    for _ in range(20):
        stack.deliver(wip4.build_header(PEER.packed, US.packed, 17, len(dg)) + dg, 0.0)
    stats = stack.statistics()
    assert len(sock.queue) == 10 and sock.queued_bytes == 10_000
    assert stats["udp_queued_bytes"] == 10_000 and stats["drop_udp_queue_full"] == 10
    data, (_ip, port) = sock.pop()
    assert data == b"u" * 1000 and port == 5353 and sock.queued_bytes == 9_000
    stack.udp_close(sock)
    assert stack.statistics()["udp_queued_bytes"] == 0


def test_statistics_gauges() -> None:
    h = Harness()
    h.stack.tcp_listen(81)
    h.stack.udp_bind(53)
    h.connect()
    stats = h.stack.statistics()
    assert stats["tcp_connections"] == 1 and stats["tcp_state_established"] == 1
    assert stats["tcp_listeners"] == 1 and stats["udp_sockets"] == 1
    assert stats["tcp_half_open"] == 0 and stats["tcp_peers"] == 1
    for key in ("tcp_state_syn_sent", "tcp_state_syn_received", "tcp_state_fin_wait_1",
                "tcp_state_fin_wait_2", "tcp_state_close_wait", "tcp_state_closing",
                "tcp_state_last_ack", "tcp_state_time_wait", "tcp_ooo_bytes", "tcp_accept_queued",
                "tcp_recv_buffered_bytes", "tcp_send_buffered_bytes", "udp_queued_datagrams",
                "udp_queued_bytes", "icmp_echo_waiting"):
        assert stats[key] == 0, key
