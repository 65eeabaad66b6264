"""A scripted TCP peer for sans-IO tests: parses what the stack sends and
builds the segments we want it to receive, with explicit time."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from trionet.netstack.stack import StackCore
from trionet.netstack.tcp import TcpConfig
from trionet.netstack.wire import ipv4 as wip4
from trionet.netstack.wire import tcp as wtcp

US = ipaddress.ip_address("10.0.0.1")
PEER = ipaddress.ip_address("10.0.0.2")


class Seg(NamedTuple):
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    opts: wtcp.TcpOptions
    payload: bytes


def parse_out(packet: bytes) -> Seg:
    mv = memoryview(packet)
    ip = wip4.parse(mv)
    body = mv[ip.header_len:ip.total_len]
    sport, dport, seq, ack, hlen, flags, window, opts = wtcp.unpack(
        body, wip4.pseudo_sum(ip.src, ip.dst, 6, len(body)))
    return Seg(sport, dport, seq, ack, flags, window, opts, bytes(body[hlen:]))


def make_segment(sport: int, dport: int, seq: int, ack: int, flags: int, window: int,
                 payload: bytes = b"", options: bytes = b"", src: bytes = PEER.packed,
                 dst: bytes = US.packed) -> bytes:
    pb = wip4.pseudo_sum(src, dst, 6, 0)
    hdr = wtcp.build(sport, dport, seq, ack, flags, window, options, payload, pb)
    seg = hdr + payload
    return wip4.build_header(src, dst, 6, len(seg)) + seg


class Harness:
    """Our stack at 10.0.0.1; the test plays 10.0.0.2."""

    def __init__(self, config: TcpConfig | None = None) -> None:
        self.out: list[bytes] = []
        self.stack = StackCore([US], self.out.append, tcp_config=config, seed=7)

    def take(self) -> list[Seg]:
        segs = [parse_out(p) for p in self.out]
        self.out.clear()
        return segs

    def send(self, now: float, sport: int, dport: int, seq: int, ack: int, flags: int,
             window: int = 65535, payload: bytes = b"", options: bytes = b"") -> None:
        self.stack.deliver(make_segment(sport, dport, seq, ack, flags, window, payload,
                                        options), now)

    def connect(self, now: float = 0.0, peer_window: int = 65535, mss: int = 1000,
                wscale: int | None = None) -> tuple[int, int, int]:
        """Active open from our stack, completed by the fake peer.

        Returns (our port, our next seq, peer next seq)."""
        conn = self.stack.tcp_connect(PEER, 80, now)
        (syn,) = self.take()
        assert syn.flags == wtcp.SYN
        peer_iss = 5000
        opts = wtcp.build_options(mss=mss, wscale=wscale)
        self.send(now, 80, syn.sport, peer_iss, syn.seq + 1, wtcp.SYN | wtcp.ACK,
                  peer_window, options=opts)
        (ack,) = self.take()
        assert ack.flags == wtcp.ACK
        self.conn = conn
        return syn.sport, syn.seq + 1, peer_iss + 1
