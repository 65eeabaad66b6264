"""IPv4 and TCP headers read and written as one: the codec of the stack's fast paths.

An IPv4 header without options followed by a TCP header is read with one unpack
(``FAST_RX``, ``FAST_RX_TS``: the receive fast path in ``stack.StackCore``) and
written with one pack, both checksums summed from the field values
(``emit_run``: every IPv4 segment the stack sends). Whatever does not fit these
layouts (options other than a lone timestamp, fragments, IPv6) is read by
``ipv4``, ``ipv6`` and ``tcp`` instead. Formats only: no state, no routing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from . import ones_sum
from .tcp import MASK, PSH

#: The receive fast path's view of a packet: version/IHL, total length, flags and
#: fragment offset, protocol, the flow (source, destination, ports: ``flow_key``);
#: then seq, ack, data offset, flags, window.
FAST_RX = struct.Struct("!BxH2xHxB2x12sIIBBH")
#: the same and, at 40, what a lone timestamp option holds: the word that starts it
#: (``tcp.TS_WORD`` if that is what it is), TSval, TSecr
FAST_RX_TS = struct.Struct("!BxH2xHxB2x12sIIBBH4xIII")
#: both headers whole, for sending: IPv4 without options, then TCP without options
HEADERS = struct.Struct("!BBHHHBBH4s4sHHIIHHHH")
_PORTS = struct.Struct("!HH")


def flow_key(remote: bytes, remote_port: int, local: bytes, local_port: int) -> bytes:
    """The 12 bytes at offset 12 of an IPv4 packet of this connection (source,
    destination, source port, destination port), as ``FAST_RX`` reads them."""
    return remote + local + _PORTS.pack(remote_port, local_port)


def checksums_ok(packet: bytes | bytearray | memoryview, total: int, pseudo_base: int) -> bool:
    """Both checksums of an option-less IPv4 header and the TCP segment after it;
    ``pseudo_base``: the pseudo-header sum without the length."""
    mv = memoryview(packet)
    return ones_sum(mv[:20]) == 0 and (pseudo_base + total - 20 + ones_sum(mv[20:])) % 0xFFFF == 0


def emit_run(output: Callable[[bytes], object], src: bytes, dst: bytes, sport: int, dport: int,
             seq: int, ack: int, flags: int, window: int, options: bytes, data: memoryview,
             mss: int, push_last: bool, pseudo_base: int, ident: int) -> tuple[int, int]:
    """``data`` as IPv4 packets of up to ``mss`` payload bytes from ``seq`` (one
    header-only packet if it is empty), handed to ``output``; PSH on the last one if
    ``push_last``. ``ident``: the last IPv4 identification used. Returns how many
    packets went and the last identification."""
    # What every segment of the run shares is summed once.
    hlen = 20 + len(options)
    ack &= MASK
    off_flags = (hlen << 10) | flags
    shared = pseudo_base + hlen + sport + dport + (ack >> 16) + (ack & 0xFFFF) + off_flags + window
    if options:
        shared += ones_sum(options)
    # the IPv4 header's words: pseudo-header sum minus the protocol, plus
    # 0x4500 (version, IHL), 0x4000 (DF), 0x4006 (TTL 64, TCP); then length, ident
    ip_shared = pseudo_base + 0xC500 + 20 + hlen
    pack = HEADERS.pack
    size = len(data)
    count = 0
    for off in range(0, size or 1, mss):
        piece = data[off:off + mss]
        plen = len(piece)
        sq = (seq + off) & 0xFFFFFFFF  # (a constant: this loop runs per segment)
        total = shared + plen + (sq >> 16) + (sq & 0xFFFF)
        fl = off_flags
        if push_last and off + mss >= size:
            fl |= PSH
            total += fl - off_flags
        if plen:
            total += ones_sum(piece)
        ident = (ident + 1) & 0xFFFF
        ip_len = 20 + hlen + plen
        hdr = pack(0x45, 0, ip_len, ident, 0x4000, 64, 6, ~((ip_shared + plen + ident) % 0xFFFF) & 0xFFFF,
                   src, dst, sport, dport, sq, ack, fl, window, ~(total % 0xFFFF) & 0xFFFF, 0)
        output(b"".join((hdr, options, piece)) if options or plen else hdr)
        count += 1
    return count, ident
