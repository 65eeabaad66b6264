"""Disco: the small sealed messages that find and prove paths between peers.

Sans-IO: bytes in, messages out, and back. No sockets, no clock.
(src: tailscale/tailscale disco/disco.go; types/key/disco.go, DiscoShared)

Wrapper, as sent on UDP or inside a DERP packet::

    "TS💬" (54 53 f0 9f 92 ac) ‖ sender disco pub (32) ‖ nonce (24) ‖ box(payload)

sealed with the NaCl box precomputed from my disco private key and the peer's
disco public key. Payload = ``type u8 ‖ version u8 (0) ‖ body``; trailing
bytes are ignored.

====  ========================  ==========================================
type  message                   body
====  ========================  ==========================================
0x01  Ping                      TxID 12 ‖ sender node pub 32 ‖ zero padding
0x02  Pong                      TxID 12 ‖ src IP 16 (v4-mapped) ‖ port u16 BE
0x03  CallMeMaybe               n × (IP 16 ‖ port u16 BE); bad length or
                                version ≠ 0 = no endpoints (as Go does)
0x04  BindUDPRelayEndpoint      peer relay: recognised, ignored
0x05  BindUDPRelayEndpointChal  peer relay: recognised, ignored
0x06  BindUDPRelayEndpointAnsw  peer relay: recognised, ignored
0x07  CallMeMaybeVia            peer relay: recognised, ignored
0x08  AllocateUDPRelayEndpReq   peer relay: recognised, ignored
0x09  AllocateUDPRelayEndpResp  peer relay: recognised, ignored
====  ========================  ==========================================

Anything else (short wrapper, failed decrypt, unknown type, short body)
raises RemoteProtocolError, which callers count and drop.
"""

from __future__ import annotations

import enum
import ipaddress
import os
from dataclasses import dataclass
from typing import Final

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from trionet.errors import LocalProtocolError, RemoteProtocolError

MAGIC: Final = "TS💬".encode()  # 54 53 f0 9f 92 ac
KEY_LEN: Final = 32
NONCE_LEN: Final = 24
TAG_LEN: Final = 16
HEADER_LEN: Final = len(MAGIC) + KEY_LEN + NONCE_LEN  # 62: disco.LooksLikeDiscoWrapper minimum
TXID_LEN: Final = 12
ENDPOINT_LEN: Final = 18
VERSION: Final = 0


class MessageType(enum.IntEnum):
    PING = 0x01
    PONG = 0x02
    CALL_ME_MAYBE = 0x03
    BIND_UDP_RELAY_ENDPOINT = 0x04
    BIND_UDP_RELAY_ENDPOINT_CHALLENGE = 0x05
    BIND_UDP_RELAY_ENDPOINT_ANSWER = 0x06
    CALL_ME_MAYBE_VIA = 0x07
    ALLOCATE_UDP_RELAY_ENDPOINT_REQUEST = 0x08
    ALLOCATE_UDP_RELAY_ENDPOINT_RESPONSE = 0x09


IGNORED_TYPES: Final = frozenset(range(0x04, 0x0A))

Endpoint = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Ping:
    tx_id: bytes  # 12 bytes
    node_key: bytes | None = None  # the sender's node public key; old senders omit it
    padding: int = 0  # zero bytes appended (path MTU probes)

    def encode(self) -> bytes:
        _check_len(self.tx_id, TXID_LEN, "TxID")
        body = self.tx_id
        if self.node_key is not None:
            _check_len(self.node_key, KEY_LEN, "node key")
            body += self.node_key
        return bytes((MessageType.PING, VERSION)) + body + bytes(self.padding)


@dataclass(frozen=True, slots=True)
class Pong:
    tx_id: bytes  # the Ping's TxID
    src: Endpoint  # where the Ping came from, as the replier saw it

    def encode(self) -> bytes:
        _check_len(self.tx_id, TXID_LEN, "TxID")
        return bytes((MessageType.PONG, VERSION)) + self.tx_id + _pack_endpoint(self.src)


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    endpoints: tuple[Endpoint, ...] | list[Endpoint] = ()

    def encode(self) -> bytes:
        return bytes((MessageType.CALL_ME_MAYBE, VERSION)) + b"".join(
            _pack_endpoint(ep) for ep in self.endpoints
        )


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message type we recognise (peer relay, 0x04-0x09) and do not act on."""

    type: int
    version: int
    body: bytes


Message = Ping | Pong | CallMeMaybe | Ignored


def _check_len(value: bytes, n: int, what: str) -> None:
    if len(value) != n:
        raise LocalProtocolError(f"disco {what} must be {n} bytes, got {len(value)}")


def _pack_endpoint(ep: Endpoint) -> bytes:
    try:
        ip = ipaddress.ip_address(ep[0])
    except ValueError as exc:
        raise LocalProtocolError(f"bad disco endpoint address {ep[0]!r}") from exc
    packed = ip.packed if ip.version == 6 else b"\x00" * 10 + b"\xff\xff" + ip.packed
    if not 0 <= ep[1] <= 0xFFFF:
        raise LocalProtocolError(f"bad disco endpoint port {ep[1]}")
    return packed + ep[1].to_bytes(2, "big")


def _unpack_endpoint(b: bytes) -> Endpoint:
    ip6 = ipaddress.IPv6Address(b[:16])
    ip = ip6.ipv4_mapped or ip6
    return (str(ip), int.from_bytes(b[16:18], "big"))


# ------------------------------------------------------------------ payload


def encode_message(msg: Message) -> bytes:
    """The cleartext payload of a message (what goes inside the box)."""
    if isinstance(msg, Ignored):
        return bytes((msg.type, msg.version)) + msg.body
    return msg.encode()


def parse_message(payload: bytes) -> Message:
    """The message inside an opened box. Raises RemoteProtocolError on garbage."""
    if len(payload) < 2:
        raise RemoteProtocolError("short disco message")
    mtype, version, body = payload[0], payload[1], payload[2:]
    if mtype == MessageType.PING:
        if len(body) < TXID_LEN:
            raise RemoteProtocolError("short disco Ping")
        rest = body[TXID_LEN:]
        if len(rest) >= KEY_LEN:
            return Ping(body[:TXID_LEN], rest[:KEY_LEN], len(rest) - KEY_LEN)
        return Ping(body[:TXID_LEN], None, len(rest))
    if mtype == MessageType.PONG:
        if len(body) < TXID_LEN + ENDPOINT_LEN:
            raise RemoteProtocolError("short disco Pong")
        return Pong(body[:TXID_LEN], _unpack_endpoint(body[TXID_LEN : TXID_LEN + ENDPOINT_LEN]))
    if mtype == MessageType.CALL_ME_MAYBE:
        if version != VERSION or not body or len(body) % ENDPOINT_LEN:
            return CallMeMaybe(())  # disco.go parseCallMeMaybe: an empty list, not an error
        return CallMeMaybe(
            tuple(_unpack_endpoint(body[i : i + ENDPOINT_LEN]) for i in range(0, len(body), ENDPOINT_LEN))
        )
    if mtype in IGNORED_TYPES:
        return Ignored(mtype, version, bytes(body))
    raise RemoteProtocolError(f"unknown disco message type 0x{mtype:02x}")


# ------------------------------------------------------------------ wrapper


def looks_like_disco(datagram: bytes) -> bool:
    """True if the bytes carry the disco magic and are long enough for the wrapper header."""
    return len(datagram) >= HEADER_LEN and datagram[:6] == MAGIC


def sender_key(datagram: bytes) -> bytes:
    """The sender's disco public key, read from the cleartext wrapper."""
    if not looks_like_disco(datagram):
        raise RemoteProtocolError("not a disco packet")
    return bytes(datagram[6 : 6 + KEY_LEN])


class DiscoBox:
    """Seals to and opens from one peer, with a NaCl box precomputed once."""

    __slots__ = ("_box", "my_public", "peer_public")

    def __init__(self, my_private: bytes, peer_public: bytes) -> None:
        _check_len(my_private, KEY_LEN, "private key")
        _check_len(peer_public, KEY_LEN, "peer public key")
        private = PrivateKey(my_private)
        self.my_public: bytes = bytes(private.public_key)
        self.peer_public = bytes(peer_public)
        self._box = Box(private, PublicKey(self.peer_public))

    def seal(self, sender_public: bytes | None, msg: Message, *, nonce: bytes | None = None) -> bytes:
        """The wire bytes of ``msg`` to this peer. ``sender_public`` defaults to my disco key."""
        sender = self.my_public if sender_public is None else sender_public
        _check_len(sender, KEY_LEN, "sender key")
        if nonce is None:
            nonce = os.urandom(NONCE_LEN)
        sealed = bytes(self._box.encrypt(encode_message(msg), nonce))  # nonce ‖ tag ‖ ciphertext
        return MAGIC + sender + sealed

    def open(self, datagram: bytes) -> Message:
        """The message in a wrapper from this peer. Raises RemoteProtocolError on anything wrong."""
        if not looks_like_disco(datagram):
            raise RemoteProtocolError("not a disco packet")
        if datagram[6 : 6 + KEY_LEN] != self.peer_public:
            raise RemoteProtocolError("disco packet from another sender")
        if len(datagram) < HEADER_LEN + TAG_LEN:
            raise RemoteProtocolError("short disco packet")
        try:
            plain = bytes(self._box.decrypt(bytes(datagram[6 + KEY_LEN :])))
        except CryptoError as exc:
            raise RemoteProtocolError("disco packet does not open") from exc
        return parse_message(plain)
