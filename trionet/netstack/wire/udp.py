"""UDP header (RFC 768)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from . import WireError, finish_checksum, ones_sum

HEADER = struct.Struct("!HHHH")
HEADER_LEN = 8


class UdpHeader(NamedTuple):
    src_port: int
    dst_port: int
    length: int
    checksum: int


def parse(buf: memoryview, pseudo: int, require_checksum: bool) -> UdpHeader:
    """Check a UDP datagram; ``pseudo`` is the pseudo-header sum."""
    if len(buf) < HEADER_LEN:
        raise WireError("udp_short")
    sport, dport, length, ck = HEADER.unpack_from(buf)
    if length < HEADER_LEN or length > len(buf):
        raise WireError("udp_bad_length")
    if ck == 0:
        if require_checksum:
            raise WireError("udp_bad_checksum")
    elif (pseudo + ones_sum(buf[:length])) % 0xFFFF != 0:
        raise WireError("udp_bad_checksum")
    return UdpHeader(sport, dport, length, ck)


def build(src_port: int, dst_port: int, payload: bytes, pseudo_base: int) -> bytes:
    """A UDP datagram; ``pseudo_base`` is the pseudo sum without the length."""
    length = HEADER_LEN + len(payload)
    hdr = HEADER.pack(src_port, dst_port, length, 0)
    ck = finish_checksum(pseudo_base + length + ones_sum(hdr) + ones_sum(payload))
    return HEADER.pack(src_port, dst_port, length, ck) + payload
