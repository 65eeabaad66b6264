"""TCP header and options (RFC 9293, RFC 7323, RFC 2018)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from . import WireError, finish_checksum, ones_sum

HEADER = struct.Struct("!HHIIBBHHH")
HEADER_LEN = 20
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERM = 4
OPT_SACK = 5
OPT_TS = 8
#: Sequence and acknowledgment numbers are 32 bits on the wire.
MASK = 0xFFFFFFFF
#: NOP, NOP, kind 8, length 10 read as one 32-bit word: how every timestamp option
#: we send starts, and how Linux and most stacks lay it out (RFC 7323 appendix A).
TS_WORD = 0x0101080A
TS_PREFIX = TS_WORD.to_bytes(4, "big")
#: that 12-byte option in one pack: TS_WORD, TSval, TSecr
TIMESTAMP = struct.Struct("!III")
_II = struct.Struct("!II")


class TcpHeader(NamedTuple):
    src_port: int
    dst_port: int
    seq: int
    ack: int
    header_len: int
    flags: int
    window: int


class TcpOptions(NamedTuple):
    mss: int | None = None
    wscale: int | None = None
    sack_perm: bool = False
    sack: tuple[tuple[int, int], ...] = ()
    ts_val: int | None = None
    ts_ecr: int | None = None


NO_OPTIONS = TcpOptions()


def unpack(buf: memoryview, pseudo: int | None) -> tuple[int, int, int, int, int, int, int, TcpOptions]:
    """Check a TCP segment and return its fields as a plain tuple (what ``parse``
    names) and its options: header length always, the checksum unless ``pseudo``
    (the pseudo-header sum, length included) is None. A lone timestamp option (the
    usual case) takes one unpack; anything else, ``parse_options``."""
    if len(buf) < HEADER_LEN:
        raise WireError("tcp_short")
    sport, dport, seq, ack, off, flags, wnd, _ck, _urg = HEADER.unpack_from(buf)
    hlen = (off >> 4) * 4
    if hlen < HEADER_LEN or hlen > len(buf):
        raise WireError("tcp_bad_header_len")
    if pseudo is not None and (pseudo + ones_sum(buf)) % 0xFFFF != 0:
        raise WireError("tcp_bad_checksum")
    if hlen == HEADER_LEN:
        opts = NO_OPTIONS
    elif hlen == 32 and buf[20:24] == TS_PREFIX:
        val, ecr = _II.unpack_from(buf, 24)
        opts = TcpOptions(ts_val=val, ts_ecr=ecr)
    else:
        opts = parse_options(buf[HEADER_LEN:hlen])
    return sport, dport, seq, ack, hlen, flags, wnd, opts


def parse(buf: memoryview, pseudo: int) -> TcpHeader:
    """Check a TCP segment (header length, checksum and options)."""
    return TcpHeader._make(unpack(buf, pseudo)[:7])


def parse_options(opts: memoryview) -> TcpOptions:
    """Parse the options area; unknown kinds are skipped, malformed ones raise."""
    n = len(opts)
    mss: int | None = None
    wscale: int | None = None
    sack_perm = False
    sack: list[tuple[int, int]] = []
    ts_val: int | None = None
    ts_ecr: int | None = None
    i = 0
    while i < n:
        kind = opts[i]
        if kind == OPT_END:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise WireError("tcp_bad_option")
        length = opts[i + 1]
        if length < 2 or i + length > n:
            raise WireError("tcp_bad_option")
        if kind == OPT_MSS:
            if length != 4:
                raise WireError("tcp_bad_option")
            mss = (opts[i + 2] << 8) | opts[i + 3]
        elif kind == OPT_WSCALE:
            if length != 3:
                raise WireError("tcp_bad_option")
            wscale = min(opts[i + 2], 14)
        elif kind == OPT_SACK_PERM:
            if length != 2:
                raise WireError("tcp_bad_option")
            sack_perm = True
        elif kind == OPT_SACK:
            if (length - 2) % 8 != 0:
                raise WireError("tcp_bad_option")
            for j in range(i + 2, i + length, 8):
                sack.append(_II.unpack_from(opts, j))
        elif kind == OPT_TS:
            if length != 10:
                raise WireError("tcp_bad_option")
            ts_val, ts_ecr = _II.unpack_from(opts, i + 2)
        i += length
    return TcpOptions(mss, wscale, sack_perm, tuple(sack), ts_val, ts_ecr)


def build_options(mss: int | None = None, wscale: int | None = None,
                  sack_perm: bool = False, ts: tuple[int, int] | None = None,
                  sack: tuple[tuple[int, int], ...] = ()) -> bytes:
    """Options padded to a multiple of 4 bytes."""
    out = bytearray()
    if mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, mss)
    if sack_perm:
        out += b"\x01\x01\x04\x02"
    if ts is not None:
        out += TIMESTAMP.pack(TS_WORD, ts[0] & MASK, ts[1] & MASK)
    if wscale is not None:
        out += struct.pack("!BBBB", OPT_NOP, OPT_WSCALE, 3, wscale)
    if sack:
        out += struct.pack("!BBBB", OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(sack))
        for left, right in sack:
            out += _II.pack(left & 0xFFFFFFFF, right & 0xFFFFFFFF)
    while len(out) % 4:
        out.append(OPT_NOP)
    return bytes(out)


def build(src_port: int, dst_port: int, seq: int, ack: int, flags: int, window: int,
          options: bytes, payload: bytes | memoryview, pseudo_base: int) -> bytes:
    """Header + options with checksum (payload not included in the result).

    ``pseudo_base`` is the pseudo-header sum without the length.
    """
    hlen = HEADER_LEN + len(options)
    hdr = HEADER.pack(src_port, dst_port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      (hlen // 4) << 4, flags, window, 0, 0) + options
    total = pseudo_base + hlen + len(payload) + ones_sum(hdr)
    if payload:
        total += ones_sum(payload)
    ck = finish_checksum(total)
    return hdr[:16] + ck.to_bytes(2, "big") + hdr[18:]
