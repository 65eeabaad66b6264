"""WireGuard wire format: message types, sizes, offsets, TAI64N.

Cheap helpers for a demultiplexer that must not decrypt: `classify` and
`receiver_index` (src: wireguard-go device/noise-protocol.go, tai64n/tai64n.go).
"""

from __future__ import annotations

import struct

from trionet.wg.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MAX_SEGMENT_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)

U32 = struct.Struct("<I")
TRANSPORT_HEADER = struct.Struct("<IIQ")  # type, receiver, counter
INITIATION_HEAD = struct.Struct("<II")  # type, sender
RESPONSE_HEAD = struct.Struct("<III")  # type, sender, receiver
TAI64N = struct.Struct(">QI")
TAI64_BASE = 0x400000000000000A
WHITENER_MASK = 0x1000000 - 1  # tai64n.go: nanoseconds rounded down to ~16.8 ms

# (type, exact size or minimum) for the four messages; anything else is garbage.
_EXACT = {MSG_INITIATION: INITIATION_SIZE, MSG_RESPONSE: RESPONSE_SIZE, MSG_COOKIE_REPLY: COOKIE_REPLY_SIZE}

# offsets of mac1 in the two messages that carry macs
MAC1_OFFSET = {MSG_INITIATION: 116, MSG_RESPONSE: 60}


def classify(datagram: bytes | bytearray | memoryview) -> int:
    """The WireGuard message type (1-4) of a well-sized datagram, else 0.

    The first byte is the type and the next three must be zero; sizes are
    checked (exact for handshake messages, at least 32 for transport)."""
    n = len(datagram)
    if n < 4:
        return 0
    t: int = U32.unpack_from(datagram)[0]
    if t == MSG_TRANSPORT:
        return t if TRANSPORT_MIN_SIZE <= n <= MAX_SEGMENT_SIZE else 0
    size = _EXACT.get(t)
    return t if size == n else 0


def receiver_index(datagram: bytes | bytearray | memoryview) -> int | None:
    """Our local index a datagram is addressed to (types 2, 3, 4), else None."""
    t = classify(datagram)
    if t == MSG_TRANSPORT or t == MSG_COOKIE_REPLY:
        return int(U32.unpack_from(datagram, 4)[0])
    if t == MSG_RESPONSE:
        return int(U32.unpack_from(datagram, 8)[0])
    return None


def tai64n(wall: float) -> bytes:
    """TAI64N label of Unix time `wall`, nanoseconds whitened as wireguard-go does."""
    sec = int(wall // 1)
    nsec = int((wall - sec) * 1e9) & ~WHITENER_MASK
    return TAI64N.pack(TAI64_BASE + sec, nsec)
