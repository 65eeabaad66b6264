"""STUN binding requests as Tailscale sends them, and their responses.

Sans-IO (src: tailscale/tailscale net/stun/stun.go, Request, ParseResponse, Is).

Request, 40 bytes (20-byte header, length field 20 = 0x14)::

    00 01 ‖ length 00 14 ‖ cookie 21 12 a4 42 ‖ TxID (12)
    ‖ SOFTWARE 80 22 00 08 "tailnode"
    ‖ FINGERPRINT 80 28 00 04 ‖ CRC-32(all bytes before it) ^ 0x5354554e

Tailscale's and Headscale's STUN servers drop requests without SOFTWARE =
"tailnode" and a trailing FINGERPRINT (stun.go, ParseBindingRequest).

Response ``01 01``: XOR-MAPPED-ADDRESS (0x0020, or 0x8020 from old servers)
wins; MAPPED-ADDRESS (0x0001) is the fallback. Address attribute body::

    00 ‖ family (01 IPv4, 02 IPv6) ‖ port ‖ address     (XOR'd with cookie ‖ TxID)
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from typing import Final

from trionet.errors import LocalProtocolError, RemoteProtocolError

MAGIC_COOKIE: Final = b"\x21\x12\xa4\x42"
HEADER_LEN: Final = 20
TXID_LEN: Final = 12
BINDING_REQUEST: Final = b"\x00\x01"
BINDING_SUCCESS: Final = b"\x01\x01"
SOFTWARE: Final = b"tailnode"  # 8 bytes: no padding needed
ATTR_MAPPED_ADDRESS: Final = 0x0001
ATTR_XOR_MAPPED_ADDRESS: Final = 0x0020
ATTR_XOR_MAPPED_ADDRESS_ALT: Final = 0x8020
ATTR_SOFTWARE: Final = 0x8022
ATTR_FINGERPRINT: Final = 0x8028
FINGERPRINT_XOR: Final = 0x5354554E
REQUEST_LEN: Final = 40  # 20 header + 12 SOFTWARE + 8 FINGERPRINT (notes said 36: wrong)

Address = tuple[str, int]


def new_txid() -> bytes:
    return os.urandom(TXID_LEN)


def fingerprint(data: bytes) -> int:
    return (zlib.crc32(data) & 0xFFFFFFFF) ^ FINGERPRINT_XOR


def binding_request(txid: bytes) -> bytes:
    """The 40-byte binding request tailscaled sends, for this transaction ID."""
    if len(txid) != TXID_LEN:
        raise LocalProtocolError(f"STUN transaction ID must be 12 bytes, got {len(txid)}")
    body = struct.pack(">HH", ATTR_SOFTWARE, len(SOFTWARE)) + SOFTWARE
    head = BINDING_REQUEST + struct.pack(">H", len(body) + 8) + MAGIC_COOKIE + txid
    msg = head + body
    return msg + struct.pack(">HHI", ATTR_FINGERPRINT, 4, fingerprint(msg))


def is_stun(datagram: bytes) -> bool:
    """A STUN message: cookie at [4:8] and the top two bits of the first byte zero."""
    return len(datagram) >= HEADER_LEN and datagram[0] & 0xC0 == 0 and datagram[4:8] == MAGIC_COOKIE


def _attributes(b: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(b):
        if len(b) - pos < 4:
            raise RemoteProtocolError("STUN attributes are malformed")
        atype, alen = struct.unpack_from(">HH", b, pos)
        pos += 4
        padded = (alen + 3) & ~3
        if pos + padded > len(b):
            raise RemoteProtocolError("STUN attribute runs past the message")
        out.append((atype, b[pos : pos + alen]))
        pos += padded
    return out


def _address(attr: bytes, xor_with: bytes | None) -> Address:
    if len(attr) < 4:
        raise RemoteProtocolError("STUN address attribute too short")
    family = attr[1]
    size = {1: 4, 2: 16}.get(family)
    if size is None:
        raise RemoteProtocolError(f"STUN address family {family} unknown")
    if len(attr) < 4 + size:
        raise RemoteProtocolError("STUN address attribute too short")
    port = int.from_bytes(attr[2:4], "big")
    raw = attr[4 : 4 + size]
    if xor_with is not None:
        port ^= 0x2112
        raw = bytes(a ^ k for a, k in zip(raw, xor_with, strict=False))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (str(ip), port)


def parse_response(datagram: bytes) -> tuple[bytes, Address]:
    """(TxID, our mapped (ip, port)) from a binding success response.

    Raises RemoteProtocolError for anything else: not STUN, not a success
    response, malformed attributes, or no address attribute at all.
    """
    if not is_stun(datagram):
        raise RemoteProtocolError("not a STUN packet")
    data = bytes(datagram)
    txid = data[8:HEADER_LEN]
    if data[:2] != BINDING_SUCCESS:
        raise RemoteProtocolError(f"STUN message type {data[:2].hex()} is not a binding success")
    attrs_len = int.from_bytes(data[2:4], "big")
    body = data[HEADER_LEN:]
    if attrs_len > len(body):
        raise RemoteProtocolError("STUN message shorter than its header says")
    body = body[:attrs_len]  # trailing bytes are ignored, as in Go
    xor_key = MAGIC_COOKIE + txid
    found: Address | None = None
    fallback: Address | None = None
    for atype, value in _attributes(body):
        if atype in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            found = _address(value, xor_key)
        elif atype == ATTR_MAPPED_ADDRESS:
            fallback = _address(value, None)
    if found is not None:
        return txid, found
    if fallback is not None:
        return txid, fallback
    raise RemoteProtocolError("STUN response without a mapped address")


def binding_response(txid: bytes, addr: Address) -> bytes:
    """A success response with XOR-MAPPED-ADDRESS (for tests and fake servers)."""
    if len(txid) != TXID_LEN:
        raise LocalProtocolError("STUN transaction ID must be 12 bytes")
    ip = ipaddress.ip_address(addr[0])
    family = 1 if ip.version == 4 else 2
    xored = bytes(a ^ k for a, k in zip(ip.packed, MAGIC_COOKIE + txid, strict=False))
    value = bytes((0, family)) + (addr[1] ^ 0x2112).to_bytes(2, "big") + xored
    attr = struct.pack(">HH", ATTR_XOR_MAPPED_ADDRESS, len(value)) + value
    return BINDING_SUCCESS + struct.pack(">H", len(attr)) + MAGIC_COOKIE + txid + attr


def parse_binding_request(datagram: bytes) -> bytes:
    """The TxID of a binding request that a Tailscale STUN server would accept (for tests)."""
    if not is_stun(datagram) or datagram[:2] != BINDING_REQUEST:
        raise RemoteProtocolError("not a STUN binding request")
    data = bytes(datagram)
    attrs = _attributes(data[HEADER_LEN:])
    if not any(t == ATTR_SOFTWARE and v == SOFTWARE for t, v in attrs):
        raise RemoteProtocolError("STUN request from non-Tailscale software")
    if not attrs or attrs[-1][0] != ATTR_FINGERPRINT or len(attrs[-1][1]) != 4:
        raise RemoteProtocolError("STUN request does not end in a fingerprint")
    if int.from_bytes(attrs[-1][1], "big") != fingerprint(data[:-8]):
        raise RemoteProtocolError("STUN request has a bogus fingerprint")
    return data[8:HEADER_LEN]
