"""SACK (sending blocks, using them), limited transmit, window scaling, filter."""

from __future__ import annotations

import ipaddress

from trionet.netstack.stack import PacketInfo, StackCore
from trionet.netstack.wire import tcp as wtcp
from trionet.netstack.wire.tcp import ACK, RST, SYN

from .fakepeer import US, Harness, make_segment, parse_out


def _sack_opt(*blocks: tuple[int, int]) -> bytes:
    return wtcp.build_options(sack=blocks)


def _listen_and_accept(h: Harness) -> tuple[int, int]:
    h.stack.tcp_listen(80)
    opts = wtcp.build_options(mss=1000, wscale=2, sack_perm=True)
    h.send(0.0, 4000, 80, 100, 0, SYN, options=opts)
    (sa,) = h.take()
    assert sa.opts.sack_perm
    h.send(0.0, 4000, 80, 101, sa.seq + 1, ACK, window=1000)
    return 101, sa.seq + 1


def test_out_of_order_data_is_sacked_and_reassembled() -> None:
    h = Harness()
    pseq, seq = _listen_and_accept(h)
    h.send(0.1, 4000, 80, pseq + 100, seq, ACK, payload=b"B" * 100)
    (a,) = h.take()
    assert a.ack == pseq and a.opts.sack == ((pseq + 100, pseq + 200),)
    h.send(0.1, 4000, 80, pseq + 300, seq, ACK, payload=b"D" * 100)
    (a,) = h.take()
    assert a.opts.sack[0] == (pseq + 300, pseq + 400)  # the newest block first
    assert (pseq + 100, pseq + 200) in a.opts.sack
    h.send(0.2, 4000, 80, pseq, seq, ACK, payload=b"A" * 100)
    (a,) = h.take()
    assert a.ack == pseq + 200
    h.send(0.2, 4000, 80, pseq + 200, seq, ACK, payload=b"C" * 100)
    (a,) = h.take()
    assert a.ack == pseq + 400 and a.opts.sack == ()
    conn = next(iter(h.stack.conns.values()))
    assert bytes(conn.rbuf) == b"A" * 100 + b"B" * 100 + b"C" * 100 + b"D" * 100


def test_peer_window_is_scaled() -> None:
    h = Harness()
    _listen_and_accept(h)
    conn = next(iter(h.stack.conns.values()))
    assert conn.snd_wnd == 1000 << 2


def sack_sender(cwnd_segments: int = 4) -> tuple[Harness, int, int, int]:
    """A connection with SACK, MSS 1000 and a set window, with 12,000 bytes queued:
    (harness, our port, our first data seq, the peer's seq)."""
    h = Harness()
    port, seq, pseq = h.connect(mss=1000, peer_window=65535)
    h.conn.cc.cwnd = cwnd_segments * 1000
    h.conn.sack_ok = True
    h.conn.send(b"x" * 12000, 0.0)
    return h, port, seq, pseq


def test_limited_transmit_and_sack_retransmit() -> None:
    h, port, seq, pseq = sack_sender()
    conn = h.conn
    assert [s.seq - seq for s in h.take()] == [0, 1000, 2000, 3000]
    # segments 0 and 2 lost; 1 arrives -> first dupack: one new segment goes out
    h.send(0.01, 80, port, pseq, seq, ACK, options=_sack_opt((seq + 1000, seq + 2000)))
    assert [s.seq - seq for s in h.take()] == [4000]
    h.send(0.01, 80, port, pseq, seq, ACK, options=_sack_opt((seq + 3000, seq + 4000),
                                                             (seq + 1000, seq + 2000)))
    assert [s.seq - seq for s in h.take()] == [5000]
    h.send(0.01, 80, port, pseq, seq, ACK, options=_sack_opt((seq + 3000, seq + 5000),
                                                             (seq + 1000, seq + 2000)))
    # more than 2 MSS SACKed above the hole at 0 (RFC 6675 IsLost): fast retransmit;
    # the hole at 2000 has only 2 MSS above it, so it is not lost yet
    assert [s.seq - seq for s in h.take()] == [0]
    assert conn.in_recovery and conn.stats["sack_retransmits"] == 1
    h.send(0.02, 80, port, pseq, seq, ACK, options=_sack_opt((seq + 3000, seq + 6000),
                                                             (seq + 1000, seq + 2000)))
    # now it is; PRR lets one new segment follow
    assert [s.seq - seq for s in h.take()] == [2000, 6000]
    assert conn.stats["sack_retransmits"] == 2


def test_filter_vetoes_new_connections_udp_and_echo() -> None:
    seen: list[PacketInfo] = []

    def deny(info: PacketInfo) -> bool:
        seen.append(info)
        return False

    out: list[bytes] = []
    s = StackCore([US], out.append, accept_inbound=deny)
    s.tcp_listen(80)
    s.deliver(make_segment(4000, 80, 1, 0, SYN, 1000), 0.0)
    assert out == [] and s.stats["drop_filtered"] == 1
    assert seen[0] == PacketInfo(4, 6, ipaddress.ip_address("10.0.0.2"), US, 4000, 80)


def test_closed_port_answers_rst() -> None:
    h = Harness()
    h.send(0.0, 4000, 81, 77, 0, SYN)
    (r,) = h.take()
    assert r.flags == RST | ACK and r.ack == 78
    assert parse_out  # imported for helpers


def test_reneged_sack_blocks_are_retransmitted_without_waiting_for_the_rto() -> None:
    h, port, seq, pseq = sack_sender()
    conn = h.conn
    h.take()  # 0..3000; 0 and 2000 lost
    h.send(0.01, 80, port, pseq, seq, ACK, options=_sack_opt((seq + 1000, seq + 2000)))
    h.send(0.01, 80, port, pseq, seq, ACK, options=_sack_opt((seq + 3000, seq + 4000),
                                                             (seq + 1000, seq + 2000)))
    h.send(0.01, 80, port, pseq, seq, ACK, options=_sack_opt((seq + 3000, seq + 5000),
                                                             (seq + 1000, seq + 2000)))
    h.send(0.02, 80, port, pseq, seq, ACK, options=_sack_opt((seq + 3000, seq + 6000),
                                                             (seq + 1000, seq + 2000)))
    assert [s.seq - seq for s in h.take() if s.payload][:3] == [4000, 5000, 0]
    assert conn.in_recovery
    # the retransmitted 0 arrives, but the peer dropped the 1000..2000 it had SACKed:
    # it acknowledges 1000 only (RFC 2018 reneging)
    h.send(0.03, 80, port, pseq, seq + 1000, ACK, options=_sack_opt((seq + 3000, seq + 6000)))
    assert conn.stats["sack_reneging"] == 1
    resent = [s.seq - seq for s in h.take() if s.payload]
    assert 1000 in resent, resent
    assert conn.rto_at is not None and conn.stats["rto_timeouts"] == 0
