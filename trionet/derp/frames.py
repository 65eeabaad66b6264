"""DERP wire format: frame types, an incremental parser, builders.

Rules of this file: it knows bytes only. No crypto, no state machine, no I/O,
no clock. ``client.py`` holds the behaviour; the trio driver holds sockets.

A frame is ``type u8 ‖ length u32 big-endian ‖ payload``
(src: tailscale/tailscale derp/derp.go, FrameHeaderLen, WriteFrameHeader).

Frame types (src: derp/derp.go, ``Frame*`` constants; the numbers 0x10-0x15 are
NOT 0x0b-0x0f, a mistake sunbeam-net made):

=====  =============  =====  ================================================
code   name           dir    payload
=====  =============  =====  ================================================
0x01   ServerKey      S->C   magic "DERP🔑" (8) ‖ server pub (32) ‖ future use
0x02   ClientInfo     C->S   node pub (32) ‖ nonce (24) ‖ box(JSON)
0x03   ServerInfo     S->C   nonce (24) ‖ box(JSON)
0x04   SendPacket     C->S   dst node pub (32) ‖ packet (≤ 64 KiB)
0x05   RecvPacket     S->C   src node pub (32) ‖ packet   (protocol v2)
0x06   KeepAlive      S->C   empty
0x07   NotePreferred  C->S   1 byte: 01 = home region, 00 = not
0x08   PeerGone       S->C   peer pub (32) ‖ reason (1, optional)
0x09   PeerPresent    S->C   peer pub (32) [‖ ip 16 ‖ port u16 [‖ flags u8]]
0x0a   ForwardPacket  mesh   src pub (32) ‖ dst pub (32) ‖ packet
0x10   WatchConns     mesh   empty
0x11   ClosePeer      mesh   peer pub (32)
0x12   Ping           both   8 bytes, echoed in the Pong
0x13   Pong           both   8 bytes of the Ping being answered
0x14   Health         S->C   UTF-8 text; empty clears the problem
0x15   Restarting     S->C   reconnect-in ms u32 ‖ try-for ms u32
=====  =============  =====  ================================================
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Iterator
from typing import Final, NamedTuple

from trionet.errors import LocalProtocolError, RemoteProtocolError

MAGIC: Final = "DERP🔑".encode()  # 44 45 52 50 f0 9f 94 91
HEADER_LEN: Final = 5
KEY_LEN: Final = 32
NONCE_LEN: Final = 24
PROTOCOL_VERSION: Final = 2
MAX_PACKET_SIZE: Final = 64 << 10  # derp.MaxPacketSize: data bytes of one Send/RecvPacket
MAX_SEND_FRAME: Final = KEY_LEN + MAX_PACKET_SIZE  # 65568: the largest legal SendPacket payload
MAX_FRAME_LEN: Final = 1 << 20  # derp_client.go recv: "unexpectedly large frame" above 1 MiB
MAX_INFO_LEN: Final = 1 << 20  # derp.MaxInfoLen (ServerInfo/ClientInfo JSON)
PING_LEN: Final = 8


class FrameType(enum.IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


KNOWN_FRAME_TYPES: Final = frozenset(int(t) for t in FrameType)


class PeerGoneReason(enum.IntEnum):
    DISCONNECTED = 0x00  # the peer was here and left
    NOT_HERE = 0x01  # the server never knew that peer
    MESH_CONN_BROKE = 0xF0  # invented by Go's mesh watcher; never on the wire


class Frame(NamedTuple):
    type: int  # a FrameType value, or an unknown byte the caller may skip
    payload: bytes


_HEADER = struct.Struct(">BI")


class FrameParser:
    """Feed bytes in, pop whole frames out.

    A frame longer than ``max_frame_len`` raises RemoteProtocolError as soon as
    its header is seen (the stream cannot be resynchronised: the caller closes
    that connection). Every other byte sequence is accepted here; payload
    checks belong to the per-type ``parse_*`` helpers.
    """

    __slots__ = ("_buf", "_pos", "max_frame_len")

    def __init__(self, max_frame_len: int = MAX_FRAME_LEN) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_frame_len = max_frame_len

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_LEN:
            return None
        ftype, length = _HEADER.unpack_from(buf, pos)
        if length > self.max_frame_len:
            raise RemoteProtocolError(
                f"DERP frame type 0x{ftype:02x} of {length} bytes exceeds the limit of {self.max_frame_len}"
            )
        end = pos + HEADER_LEN + length
        if end > len(buf):
            return None
        payload = bytes(buf[pos + HEADER_LEN : end])
        self._pos = end
        return Frame(ftype, payload)

    def frames(self) -> Iterator[Frame]:
        """Every whole frame buffered so far, in order."""
        while True:
            frame = self.next_frame()
            if frame is None:
                return
            yield frame


# ----------------------------------------------------------------- builders


def build_frame(ftype: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    if not 0 <= ftype <= 0xFF:
        raise LocalProtocolError(f"frame type {ftype} is not a byte")
    return _HEADER.pack(ftype, len(payload)) + bytes(payload)


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_LEN:
        raise LocalProtocolError(f"{what} must be {KEY_LEN} bytes, got {len(key)}")


def build_server_key(server_public: bytes) -> bytes:
    _check_key(server_public, "server key")
    return build_frame(FrameType.SERVER_KEY, MAGIC + server_public)


def build_client_info(node_public: bytes, sealed: bytes) -> bytes:
    """``sealed`` = nonce (24) ‖ box(JSON), as NaCl ``Box.encrypt`` returns it."""
    _check_key(node_public, "node key")
    return build_frame(FrameType.CLIENT_INFO, node_public + sealed)


def build_server_info(sealed: bytes) -> bytes:
    return build_frame(FrameType.SERVER_INFO, sealed)


def build_send_packet(dst: bytes, data: bytes | bytearray | memoryview) -> bytes:
    _check_key(dst, "destination key")
    if len(data) > MAX_PACKET_SIZE:
        raise LocalProtocolError(f"DERP packet of {len(data)} bytes exceeds {MAX_PACKET_SIZE}")
    return _HEADER.pack(FrameType.SEND_PACKET, KEY_LEN + len(data)) + dst + bytes(data)


def build_recv_packet(src: bytes, data: bytes | bytearray | memoryview) -> bytes:
    _check_key(src, "source key")
    return _HEADER.pack(FrameType.RECV_PACKET, KEY_LEN + len(data)) + src + bytes(data)


def build_forward_packet(src: bytes, dst: bytes, data: bytes) -> bytes:
    _check_key(src, "source key")
    _check_key(dst, "destination key")
    return build_frame(FrameType.FORWARD_PACKET, src + dst + data)


def build_keep_alive() -> bytes:
    return build_frame(FrameType.KEEP_ALIVE)


def build_note_preferred(preferred: bool) -> bytes:
    return build_frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def build_peer_gone(peer: bytes, reason: int = PeerGoneReason.DISCONNECTED) -> bytes:
    _check_key(peer, "peer key")
    return build_frame(FrameType.PEER_GONE, peer + bytes([reason]))


def build_peer_present(peer: bytes, addr: tuple[str, int] | None = None, flags: int | None = None) -> bytes:
    _check_key(peer, "peer key")
    payload = peer
    if addr is not None:
        ip = ipaddress.ip_address(addr[0])
        packed = ip.packed if ip.version == 6 else b"\x00" * 10 + b"\xff\xff" + ip.packed
        payload += packed + addr[1].to_bytes(2, "big")
        if flags is not None:
            payload += bytes([flags])
    return build_frame(FrameType.PEER_PRESENT, payload)


def build_watch_conns() -> bytes:
    return build_frame(FrameType.WATCH_CONNS)


def build_close_peer(peer: bytes) -> bytes:
    _check_key(peer, "peer key")
    return build_frame(FrameType.CLOSE_PEER, peer)


def build_ping(data: bytes) -> bytes:
    if len(data) != PING_LEN:
        raise LocalProtocolError("DERP ping data must be 8 bytes")
    return build_frame(FrameType.PING, data)


def build_pong(data: bytes) -> bytes:
    if len(data) != PING_LEN:
        raise LocalProtocolError("DERP pong data must be 8 bytes")
    return build_frame(FrameType.PONG, data)


def build_health(problem: str) -> bytes:
    return build_frame(FrameType.HEALTH, problem.encode())


def build_restarting(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    return build_frame(FrameType.RESTARTING, struct.pack(">II", reconnect_in_ms, try_for_ms))


# ------------------------------------------------------------ payload views


def _need(payload: bytes, n: int, what: str) -> None:
    if len(payload) < n:
        raise RemoteProtocolError(f"short DERP {what} frame: {len(payload)} bytes, need {n}")


def parse_server_key(payload: bytes) -> bytes:
    """The server's public key; extra bytes after it are for future use."""
    _need(payload, len(MAGIC) + KEY_LEN, "ServerKey")
    if payload[: len(MAGIC)] != MAGIC:
        raise RemoteProtocolError("DERP ServerKey frame without the DERP🔑 magic")
    return payload[len(MAGIC) : len(MAGIC) + KEY_LEN]


def parse_client_info(payload: bytes) -> tuple[bytes, bytes]:
    """(node public key, sealed box = nonce ‖ ciphertext)."""
    _need(payload, KEY_LEN + NONCE_LEN, "ClientInfo")
    if len(payload) > KEY_LEN + NONCE_LEN + MAX_INFO_LEN:
        raise RemoteProtocolError("DERP ClientInfo frame too long")
    return payload[:KEY_LEN], payload[KEY_LEN:]


def parse_packet(payload: bytes, what: str = "RecvPacket") -> tuple[bytes, bytes]:
    """(key, data) of a RecvPacket (source key) or SendPacket (destination key)."""
    _need(payload, KEY_LEN, what)
    return payload[:KEY_LEN], payload[KEY_LEN:]


def parse_forward_packet(payload: bytes) -> tuple[bytes, bytes, bytes]:
    _need(payload, 2 * KEY_LEN, "ForwardPacket")
    return payload[:KEY_LEN], payload[KEY_LEN : 2 * KEY_LEN], payload[2 * KEY_LEN :]


def parse_note_preferred(payload: bytes) -> bool:
    _need(payload, 1, "NotePreferred")
    return payload[0] != 0


def parse_peer_gone(payload: bytes) -> tuple[bytes, int]:
    """(peer key, reason); a frame without the reason byte means DISCONNECTED (Go does the same)."""
    _need(payload, KEY_LEN, "PeerGone")
    reason = payload[KEY_LEN] if len(payload) > KEY_LEN else PeerGoneReason.DISCONNECTED
    return payload[:KEY_LEN], int(reason)


def parse_peer_present(payload: bytes) -> tuple[bytes, tuple[str, int] | None, int]:
    """(peer key, (ip, port) or None, flags); old servers send fewer bytes, new ones more."""
    _need(payload, KEY_LEN, "PeerPresent")
    key = payload[:KEY_LEN]
    addr: tuple[str, int] | None = None
    flags = 0
    rest = payload[KEY_LEN:]
    if len(rest) >= 18:
        ip6 = ipaddress.IPv6Address(rest[:16])
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ip6.ipv4_mapped or ip6
        addr = (str(ip), int.from_bytes(rest[16:18], "big"))
        if len(rest) >= 19:
            flags = rest[18]
    return key, addr, flags


def parse_ping(payload: bytes) -> bytes:
    """The 8 bytes of a Ping or Pong (Go ignores any extra bytes)."""
    _need(payload, PING_LEN, "Ping/Pong")
    return payload[:PING_LEN]


def parse_health(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")


def parse_restarting(payload: bytes) -> tuple[int, int]:
    """(reconnect_in_ms, try_for_ms)."""
    _need(payload, 8, "Restarting")
    reconnect_in, try_for = struct.unpack_from(">II", payload)
    return int(reconnect_in), int(try_for)
