"""IPv6 fixed header (RFC 8200). Extension headers are not supported."""

from __future__ import annotations

import struct
from typing import NamedTuple

from . import WireError
from . import pseudo_sum as pseudo_sum  # (the TCP/UDP pseudo-header is summed alike for v4 and v6)

HEADER = struct.Struct("!IHBB16s16s")
HEADER_LEN = 40
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
KNOWN_NEXT = frozenset((PROTO_TCP, PROTO_UDP, PROTO_ICMPV6))


class Ipv6Header(NamedTuple):
    payload_len: int
    next_header: int
    hop_limit: int
    src: bytes
    dst: bytes


def unpack(buf: memoryview) -> tuple[int, int, int, bytes, bytes]:
    """Check the fixed header at the start of ``buf`` and return what ``Ipv6Header``
    names, as a plain tuple (the stack's per-packet path: no NamedTuple to build)."""
    if len(buf) < HEADER_LEN:
        raise WireError("ipv6_short")
    vtf, plen, nxt, hops, src, dst = HEADER.unpack_from(buf)
    if vtf >> 28 != 6:
        raise WireError("ipv6_bad_version")
    if HEADER_LEN + plen > len(buf):
        raise WireError("ipv6_bad_payload_len")
    if nxt not in KNOWN_NEXT:
        raise WireError("ipv6_ext_header")
    return plen, nxt, hops, src, dst


def parse(buf: memoryview) -> Ipv6Header:
    return Ipv6Header._make(unpack(buf))


def build_header(src: bytes, dst: bytes, next_header: int, payload_len: int,
                 hop_limit: int = 64) -> bytes:
    return HEADER.pack(6 << 28, payload_len, next_header, hop_limit, src, dst)
