"""ICMPv4 and ICMPv6 echo messages (RFC 792, RFC 4443)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from . import WireError, finish_checksum, ones_sum

HEADER = struct.Struct("!BBHHH")
HEADER_LEN = 8
V4_ECHO_REPLY = 0
V4_ECHO_REQUEST = 8
V6_ECHO_REQUEST = 128
V6_ECHO_REPLY = 129


class IcmpEcho(NamedTuple):
    type: int
    code: int
    ident: int
    seq: int
    payload: memoryview


def parse(buf: memoryview, pseudo: int) -> IcmpEcho:
    """Parse an ICMP message; ``pseudo`` is 0 for ICMPv4, the pseudo sum for v6."""
    if len(buf) < HEADER_LEN:
        raise WireError("icmp_short")
    if (pseudo + ones_sum(buf)) % 0xFFFF != 0:
        raise WireError("icmp_bad_checksum")
    typ, code, _ck, ident, seq = HEADER.unpack_from(buf)
    return IcmpEcho(typ, code, ident, seq, buf[HEADER_LEN:])


def build(typ: int, code: int, ident: int, seq: int, payload: bytes | memoryview,
          pseudo: int = 0) -> bytes:
    body = HEADER.pack(typ, code, 0, ident, seq) + payload
    ck = finish_checksum(pseudo + ones_sum(body))
    return body[:2] + ck.to_bytes(2, "big") + body[4:]
