"""IPv4 header (RFC 791): parse a checked view, build a header with checksum."""

from __future__ import annotations

import struct
from typing import NamedTuple

from . import WireError, finish_checksum, ones_sum
from . import pseudo_sum as pseudo_sum  # (the TCP/UDP pseudo-header is summed alike for v4 and v6)

HEADER = struct.Struct("!BBHHHBBH4s4s")
HEADER_LEN = 20
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
FLAG_MF = 0x2000
FRAG_OFFSET_MASK = 0x1FFF


class Ipv4Header(NamedTuple):
    header_len: int
    total_len: int
    ident: int
    flags_frag: int
    ttl: int
    proto: int
    src: bytes
    dst: bytes

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_frag & (FLAG_MF | FRAG_OFFSET_MASK))


def unpack(buf: memoryview, verify: bool = True) -> tuple[int, int, int, int, int, int, bytes, bytes]:
    """Check the header at the start of ``buf`` (its checksum only if ``verify``)
    and return what ``Ipv4Header`` names, as a plain tuple."""
    if len(buf) < HEADER_LEN:
        raise WireError("ipv4_short")
    vihl, _tos, total, ident, ff, ttl, proto, _ck, src, dst = HEADER.unpack_from(buf)
    if vihl >> 4 != 4:
        raise WireError("ipv4_bad_version")
    ihl = (vihl & 0xF) * 4
    if ihl < HEADER_LEN or ihl > len(buf):
        raise WireError("ipv4_bad_header_len")
    if total < ihl or total > len(buf):
        raise WireError("ipv4_bad_total_len")
    if verify and ones_sum(buf[:ihl]) != 0:
        raise WireError("ipv4_bad_checksum")
    return ihl, total, ident, ff, ttl, proto, src, dst


def parse(buf: memoryview) -> Ipv4Header:
    """Parse and check the header at the start of ``buf`` (checksum included)."""
    return Ipv4Header._make(unpack(buf))


def build_header(src: bytes, dst: bytes, proto: int, payload_len: int,
                 ident: int = 0, ttl: int = 64) -> bytes:
    """A 20-byte header with the DF bit set and a valid checksum."""
    total = HEADER_LEN + payload_len
    hdr = HEADER.pack(0x45, 0, total, ident & 0xFFFF, 0x4000, ttl, proto, 0, src, dst)
    ck = finish_checksum(ones_sum(hdr))
    return hdr[:10] + ck.to_bytes(2, "big") + hdr[12:]
