"""SOCKS5 (RFC 1928, RFC 1929) as data: byte parsers and builders, no I/O.

Each parser takes the bytes buffered so far and returns either None (need
more), or the parsed message and how many bytes it used. Garbage raises
RemoteProtocolError; the listener answers with a failure reply and closes.
"""

from __future__ import annotations

import enum
import ipaddress
import struct

import attrs

from trionet.errors import RemoteProtocolError

VERSION = 5
AUTH_NONE = 0x00
AUTH_USERPASS = 0x02
AUTH_NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class Reply(enum.IntEnum):
    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4


@attrs.frozen
class Greeting:
    methods: frozenset[int]


@attrs.frozen
class UserPass:
    username: str
    password: str = attrs.field(repr=False)  # never in a log


@attrs.frozen
class Request:
    command: int
    host: str
    port: int


@attrs.frozen
class UdpDatagram:
    host: str
    port: int
    data: bytes


def parse_greeting(buf: bytes) -> tuple[Greeting, int] | None:
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise RemoteProtocolError(f"not SOCKS5 (version byte {buf[0]})")
    n = buf[1]
    if n == 0:
        raise RemoteProtocolError("SOCKS5 greeting offers no methods")
    if len(buf) < 2 + n:
        return None
    return Greeting(frozenset(buf[2 : 2 + n])), 2 + n


def parse_userpass(buf: bytes) -> tuple[UserPass, int] | None:
    if len(buf) < 2:
        return None
    if buf[0] != 1:
        raise RemoteProtocolError(f"bad username/password version {buf[0]}")
    ulen = buf[1]
    if len(buf) < 2 + ulen + 1:
        return None
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    try:
        user = bytes(buf[2 : 2 + ulen]).decode()
        password = bytes(buf[3 + ulen : end]).decode()
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("username/password is not UTF-8") from exc
    return UserPass(user, password), end


def _parse_address(buf: bytes, at: int) -> tuple[str, int, int] | None:
    """(host, port, end offset) of an ATYP-tagged address at `at`, or None if short."""
    if len(buf) < at + 1:
        return None
    atyp = buf[at]
    if atyp == ATYP_IPV4:
        end = at + 1 + 4 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[at + 1 : at + 5])))
    elif atyp == ATYP_IPV6:
        end = at + 1 + 16 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[at + 1 : at + 17])))
    elif atyp == ATYP_DOMAIN:
        if len(buf) < at + 2:
            return None
        n = buf[at + 1]
        end = at + 2 + n + 2
        if len(buf) < end:
            return None
        if n == 0:
            raise RemoteProtocolError("empty SOCKS5 domain name")
        try:
            host = bytes(buf[at + 2 : at + 2 + n]).decode("idna")
        except UnicodeError as exc:
            raise RemoteProtocolError("SOCKS5 domain name is not a host name") from exc
    else:
        raise RemoteProtocolError(f"unknown SOCKS5 address type {atyp}")
    (port,) = struct.unpack_from("!H", buf, end - 2)
    return host, port, end


def parse_request(buf: bytes) -> tuple[Request, int] | None:
    if len(buf) < 4:
        return None
    if buf[0] != VERSION:
        raise RemoteProtocolError(f"not SOCKS5 (version byte {buf[0]})")
    if buf[2] != 0:
        raise RemoteProtocolError("SOCKS5 reserved byte is not zero")
    parsed = _parse_address(buf, 3)
    if parsed is None:
        return None
    host, port, end = parsed
    return Request(buf[1], host, port), end


def encode_address(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        if not 0 < len(name) < 256:
            raise ValueError(f"host name too long for SOCKS5: {host!r}") from None
        return bytes([ATYP_DOMAIN, len(name)]) + name + struct.pack("!H", port)
    if ip.version == 4:
        return bytes([ATYP_IPV4]) + ip.packed + struct.pack("!H", port)
    return bytes([ATYP_IPV6]) + ip.packed + struct.pack("!H", port)


def build_reply(reply: Reply, host: str = "0.0.0.0", port: int = 0) -> bytes:
    return bytes([VERSION, reply, 0]) + encode_address(host, port)


def parse_udp_datagram(buf: bytes) -> UdpDatagram:
    """A client's UDP ASSOCIATE datagram: RSV(2) FRAG(1) address data."""
    if len(buf) < 4:
        raise RemoteProtocolError("short SOCKS5 UDP datagram")
    if buf[0] != 0 or buf[1] != 0:
        raise RemoteProtocolError("SOCKS5 UDP reserved bytes are not zero")
    if buf[2] != 0:
        raise RemoteProtocolError("SOCKS5 UDP fragmentation is not supported")
    parsed = _parse_address(buf, 3)
    if parsed is None:
        raise RemoteProtocolError("truncated SOCKS5 UDP datagram")
    host, port, end = parsed
    return UdpDatagram(host, port, bytes(buf[end:]))


def build_udp_datagram(host: str, port: int, data: bytes) -> bytes:
    return b"\x00\x00\x00" + encode_address(host, port) + data
