"""Garbage on the wire is dropped and counted by reason; parsers never crash."""

from __future__ import annotations

import ipaddress
import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from trionet.netstack.stack import StackCore
from trionet.netstack.wire import WireError, finish_checksum, ones_sum
from trionet.netstack.wire import icmp as wicmp
from trionet.netstack.wire import ipv4 as wip4
from trionet.netstack.wire import ipv6 as wip6
from trionet.netstack.wire import tcp as wtcp
from trionet.netstack.wire import udp as wudp
from trionet.netstack.wire.tcp import ACK, SYN

from .fakepeer import PEER, US, Harness, make_segment, parse_out


def _stack() -> tuple[StackCore, list[bytes]]:
    out: list[bytes] = []
    return StackCore([US, ipaddress.ip_address("fd00::1")], out.append, seed=3), out


def _naive_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@given(st.binary(max_size=3000))
def test_checksum_matches_rfc1071(data: bytes) -> None:
    naive = (~_naive_sum(data)) & 0xFFFF
    ours = finish_checksum(ones_sum(data))
    assert ours == naive or {ours, naive} == {0, 0xFFFF}


def test_bad_ip_checksum_counted() -> None:
    s, out = _stack()
    pkt = bytearray(make_segment(1, 80, 0, 0, SYN, 100))
    pkt[10] ^= 0xFF
    s.deliver(bytes(pkt), 0.0)
    assert s.stats["drop_ipv4_bad_checksum"] == 1 and out == []


def test_bad_tcp_checksum_counted() -> None:
    s, out = _stack()
    s.tcp_listen(80)
    pkt = bytearray(make_segment(1, 80, 0, 0, SYN, 100))
    pkt[-1] ^= 0x01 if len(pkt) > 40 else 0
    pkt[36] ^= 0xFF  # checksum field of the TCP header
    s.deliver(bytes(pkt), 0.0)
    assert s.stats["drop_tcp_bad_checksum"] == 1 and out == []


def test_bad_lengths_counted() -> None:
    s, _ = _stack()
    good = make_segment(1, 80, 0, 0, SYN, 100)
    s.deliver(good[:10], 0.0)
    assert s.stats["drop_ipv4_short"] == 1
    bad_total = bytearray(good)
    bad_total[2:4] = (2000).to_bytes(2, "big")
    bad_total[10:12] = b"\0\0"
    bad_total[10:12] = finish_checksum(ones_sum(bytes(bad_total[:20]))).to_bytes(2, "big")
    s.deliver(bytes(bad_total), 0.0)
    assert s.stats["drop_ipv4_bad_total_len"] == 1
    s.deliver(b"\x70" + good[1:], 0.0)
    assert s.stats["drop_bad_ip_version"] == 1
    # TCP data offset beyond the segment
    seg = bytearray(good[20:])
    seg[12] = 15 << 4
    pb = wip4.pseudo_sum(PEER.packed, US.packed, 6, len(seg))
    seg[16:18] = b"\0\0"
    seg[16:18] = finish_checksum(pb + ones_sum(bytes(seg))).to_bytes(2, "big")
    s.deliver(wip4.build_header(PEER.packed, US.packed, 6, len(seg)) + bytes(seg), 0.0)
    assert s.stats["drop_tcp_bad_header_len"] == 1


def test_bad_options_counted() -> None:
    s, out = _stack()
    s.tcp_listen(80)
    opts = b"\x02\x09\x05\xb4"  # MSS option claiming 9 bytes
    s.deliver(make_segment(1, 80, 0, 0, SYN, 100, options=opts), 0.0)
    assert s.stats["drop_tcp_bad_option"] == 1 and out == []


def test_fragments_and_ipv6_extension_headers_dropped() -> None:
    s, _ = _stack()
    pkt = bytearray(make_segment(1, 80, 0, 0, SYN, 100))
    pkt[6] = 0x20  # MF
    pkt[10:12] = b"\0\0"
    pkt[10:12] = finish_checksum(ones_sum(bytes(pkt[:20]))).to_bytes(2, "big")
    s.deliver(bytes(pkt), 0.0)
    assert s.stats["drop_ipv4_fragment"] == 1
    hdr = wip6.build_header(ipaddress.ip_address("fd00::2").packed,
                            ipaddress.ip_address("fd00::1").packed, 0, 8)
    s.deliver(hdr + b"\0" * 8, 0.0)
    assert s.stats["drop_ipv6_ext_header"] == 1


def test_udp_and_icmp_bad_checksums() -> None:
    s, out = _stack()
    s.udp_bind(53)
    dg = bytearray(wudp.build(1, 53, b"hey", wip4.pseudo_sum(PEER.packed, US.packed, 17, 0)))
    dg[-1] ^= 1
    s.deliver(wip4.build_header(PEER.packed, US.packed, 17, len(dg)) + bytes(dg), 0.0)
    assert s.stats["drop_udp_bad_checksum"] == 1
    msg = bytearray(wicmp.build(8, 0, 1, 1, b"ping"))
    msg[-1] ^= 1
    s.deliver(wip4.build_header(PEER.packed, US.packed, 1, len(msg)) + bytes(msg), 0.0)
    assert s.stats["drop_icmp_bad_checksum"] == 1
    assert out == []


# ---------------------------------------------------------------- hypothesis
@given(st.binary(max_size=200))
def test_ipv4_parser_total(data: bytes) -> None:
    try:
        h = wip4.parse(memoryview(data))
    except WireError as e:
        assert e.reason.startswith("ipv4_")
    else:
        assert 20 <= h.header_len <= h.total_len <= len(data)


@given(st.binary(max_size=200))
def test_ipv6_parser_total(data: bytes) -> None:
    try:
        h = wip6.parse(memoryview(data))
    except WireError as e:
        assert e.reason.startswith("ipv6_")
    else:
        assert 40 + h.payload_len <= len(data)


@given(st.binary(max_size=80))
def test_tcp_options_parser_total(data: bytes) -> None:
    try:
        o = wtcp.parse_options(memoryview(data))
    except WireError as e:
        assert e.reason == "tcp_bad_option"
    else:
        assert o.wscale is None or 0 <= o.wscale <= 14


@given(st.binary(max_size=100), st.integers(0, 0xFFFF))
def test_tcp_udp_icmp_parsers_total(data: bytes, pseudo: int) -> None:
    for fn in (lambda: wtcp.parse(memoryview(data), pseudo),
               lambda: wudp.parse(memoryview(data), pseudo, True),
               lambda: wicmp.parse(memoryview(data), pseudo)):
        try:
            fn()
        except WireError:
            pass


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.integers(0, 0xFF), st.integers(0, 0xFFFF),
       st.binary(max_size=100),
       st.one_of(st.none(), st.integers(0, 0xFFFF)), st.one_of(st.none(), st.integers(0, 14)),
       st.booleans())
def test_tcp_build_parse_roundtrip(sp: int, dp: int, seq: int, ack: int, flags: int,
                                   wnd: int, payload: bytes, mss: int | None,
                                   ws: int | None, sackp: bool) -> None:
    opts = wtcp.build_options(mss=mss, wscale=ws, sack_perm=sackp, ts=(seq, ack))
    pkt = make_segment(sp, dp, seq, ack, flags, wnd, payload, opts, src=US.packed,
                       dst=PEER.packed)
    seg = parse_out(pkt)
    assert (seg.sport, seg.dport, seg.seq, seg.ack, seg.flags, seg.window, seg.payload) == (
        sp, dp, seq, ack, flags, wnd, payload)
    assert seg.opts.mss == mss and seg.opts.wscale == ws and seg.opts.sack_perm == sackp
    assert (seg.opts.ts_val, seg.opts.ts_ecr) == (seq, ack)


@given(st.lists(st.binary(min_size=1, max_size=120), max_size=20))
def test_stack_survives_garbage(packets: list[bytes]) -> None:
    s, _ = _stack()
    s.tcp_listen(80)
    s.udp_bind(53)
    s.deliver_many(packets, 0.0)
    assert s.stats["ip_in"] == len(packets)


# ------------------------------------------------------------------ SYN flood
def test_syn_flood_bounded_then_serves() -> None:
    h = Harness()
    lst = h.stack.tcp_listen(80, backlog=16, syn_backlog=64)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(10_000):
            src = ipaddress.ip_address(0x0A000000 + 10 + (i % 200)).packed
            h.stack.deliver(make_segment(1024 + i % 60000, 80, i * 7919, 0, SYN, 65535,
                                         src=src), i * 1e-5)
            h.out.clear()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(lst.half_open) <= 64
    assert len(h.stack.conns) <= 64
    assert h.stack.stats["tcp_syn_backlog_evicted"] >= 10_000 - 64
    assert grown < 8 << 20
    # a real client still gets served
    h.send(1.0, 5555, 80, 1000, 0, SYN, options=wtcp.build_options(mss=1200))
    (sa,) = h.take()
    assert sa.flags == SYN | ACK
    h.send(1.01, 5555, 80, 1001, sa.seq + 1, ACK, payload=b"GET")
    assert len(lst.accept_queue) == 1
    conn = lst.accept_queue[0]
    assert bytes(conn.rbuf) == b"GET"
