"""The parts split out of the TCP connection, each on its own: no connection, no stack.

``Reassembly`` (the receiver's out-of-order data), ``SackScoreboard`` and
``Retransmissions`` (the sender's scoreboard), and the fused IPv4+TCP writer in
``wire.ipv4_tcp`` checked against the one-header-at-a-time parsers.
"""

from __future__ import annotations

import ipaddress

import pytest

from trionet.netstack.rbuf import RecvBuffer
from trionet.netstack.reassembly import Reassembly
from trionet.netstack.scoreboard import Retransmissions, SackScoreboard
from trionet.netstack.wire import WireError, pseudo_sum
from trionet.netstack.wire import ipv4 as wip4
from trionet.netstack.wire import tcp as wtcp
from trionet.netstack.wire.ipv4_tcp import FAST_RX, emit_run, flow_key

STREAM = bytes(range(256)) * 8


def test_reassembly_keeps_each_byte_once_and_hands_over_in_order() -> None:
    stats: dict[str, int] = {"ooo_dropped": 0, "ooo_pruned": 0}
    ooo = Reassembly(stats)
    base = 1000
    for off, n in ((300, 100), (100, 50), (350, 100), (120, 10), (600, 10)):  # overlaps included
        ooo.add(base + off, memoryview(STREAM[off:off + n]))
    assert ooo.blocks == [[base + 100, base + 150], [base + 300, base + 450], [base + 600, base + 610]]
    assert ooo.nbytes == 50 + 150 + 10
    # the block of the newest arrival first, then those before it (RFC 2018)
    assert ooo.sack_blocks(3) == ((base + 600, base + 610), (base + 100, base + 150), (base + 300, base + 450))
    rbuf = RecvBuffer()
    rbuf.append(STREAM[:100])
    assert ooo.take_ready(base + 100, rbuf) == base + 150  # up to the next hole
    assert bytes(rbuf) == STREAM[:150] and ooo.nbytes == 160
    rbuf.append(STREAM[150:300])
    assert ooo.take_ready(base + 300, rbuf) == base + 450
    assert bytes(rbuf) == STREAM[:450] and ooo.blocks == [[base + 600, base + 610]]
    ooo.clear()
    assert not ooo.pieces and not ooo.starts and not ooo.blocks and ooo.nbytes == 0
    assert stats == {"ooo_dropped": 0, "ooo_pruned": 0}


def test_scoreboard_merges_blocks_cuts_retransmissions_and_sees_reneging() -> None:
    stats = {"sack_blocks_ignored": 0}
    board, rtx = SackScoreboard(stats), Retransmissions()
    una, snd_max = 10_000, 20_000
    rtx.add(una, 1000, snd_max)  # the first hole resent, then the third
    rtx.add(una + 2000, 1000, snd_max)
    assert rtx.nbytes == 2000 and (rtx.min_mark, rtx.min_count) == (snd_max, 2)
    board.note(((una + 1000, una + 2000), (una + 2500, una + 4000), (una + 30_000, una + 31_000)),
               una, una, snd_max, rtx)  # the last is past SND.MAX: ignored
    assert board.blocks == [(una + 1000, una + 2000), (una + 2500, una + 4000)] and board.nbytes == 2500
    # what was SACKed is no retransmission in flight: [una+2500, una+3000) left it
    assert rtx.entries == [[una, una + 1000, snd_max], [una + 2000, una + 2500, snd_max]]
    assert rtx.nbytes == 1500
    board.note(((una + 2000, una + 2500),), una, una, snd_max, rtx)  # fills the gap: one block
    assert board.blocks == [(una + 1000, una + 4000)] and board.nbytes == 3000
    assert rtx.entries == [[una, una + 1000, snd_max]]
    assert board.acked_through(una + 500)  # below every block: nothing leaves
    assert not board.acked_through(una + 1500), "a cumulative ACK inside a SACKed block: reneging"
    assert board.acked_through(una + 4000) and board.blocks == [] and board.nbytes == 0
    assert rtx.remove_older(snd_max + 1) == (1, una) and rtx.entries == [] and rtx.nbytes == 0


def test_emit_run_writes_what_the_header_parsers_accept() -> None:
    src, dst = ipaddress.ip_address("10.0.0.1").packed, ipaddress.ip_address("10.0.0.2").packed
    out: list[bytes] = []
    ts = wtcp.TIMESTAMP.pack(wtcp.TS_WORD, 7, 9)
    count, ident = emit_run(out.append, src, dst, 40000, 80, (1 << 32) - 1000, 5, wtcp.ACK, 512, ts,
                            memoryview(STREAM), 700, True, pseudo_sum(src, dst, 6, 0) % 0xFFFF, 0xFFFE)
    assert count == len(out) == 3 and ident == 1  # the identification wraps too
    for i, packet in enumerate(out):
        view = memoryview(packet)
        ip = wip4.parse(view)  # checks the IPv4 checksum
        seg = view[20:]
        h = wtcp.parse(seg, pseudo_sum(src, dst, 6, len(seg)))  # and the TCP checksum
        assert (ip.ident, h.seq, h.ack, h.window) == ((0xFFFF + i) & 0xFFFF, ((1 << 32) - 1000 + 700 * i) & wtcp.MASK,
                                                      5, 512)
        assert h.flags == (wtcp.ACK | wtcp.PSH if i == 2 else wtcp.ACK)
        assert wtcp.parse_options(seg[20:h.header_len]) == wtcp.TcpOptions(ts_val=7, ts_ecr=9)
        assert bytes(seg[h.header_len:]) == STREAM[700 * i:700 * (i + 1)]
        assert FAST_RX.unpack_from(packet)[4] == flow_key(src, 40000, dst, 80)


def test_ipv4_unpack_checks_the_checksum_only_when_asked() -> None:
    hdr = bytearray(wip4.build_header(b"\x0a\0\0\x01", b"\x0a\0\0\x02", 6, 0))
    hdr[10] ^= 0xFF
    with pytest.raises(WireError, match="ipv4_bad_checksum"):
        wip4.unpack(memoryview(hdr))
    assert wip4.unpack(memoryview(hdr), verify=False)[5] == 6
