"""Wire formats: one module per header, views over memoryviews, no behaviour.

``ipv4``, ``ipv6``, ``tcp``, ``udp``, ``icmp``: each header parsed (checked) and
built; ``ipv4_tcp``: the two headers the fast paths read and write together. Here:
the checksum arithmetic they share. Every parser raises :class:`WireError` whose
``reason`` names the drop counter.
"""

from __future__ import annotations


class WireError(ValueError):
    """A header is malformed; ``reason`` is the statistics counter name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones'-complement sum of ``data`` reduced modulo 0xFFFF.

    Since 2**16 == 1 (mod 0xFFFF), the sum of the big-endian 16-bit words is
    the whole buffer read as one big integer modulo 0xFFFF: one C-level pass
    (``int.from_bytes``) instead of a Python loop. An odd length is padded
    with a zero byte (a shift by 8 bits).
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    return value % 0xFFFF


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The ones' sum of the pseudo-header of a TCP, UDP or ICMPv6 checksum (IPv4 or
    IPv6 addresses alike: the same words, summed)."""
    return ones_sum(src + dst) + proto + length


def finish_checksum(total: int) -> int:
    """Fold a sum of :func:`ones_sum` values into the checksum field value.

    A result of 0 is sent as 0xFFFF (the same value in ones' complement), which
    is also what UDP requires.
    """
    return (~(total % 0xFFFF)) & 0xFFFF
