"""mac1/mac2 and cookie replies (src: wireguard-go device/cookie.go).

`CookieChecker` is our side as a receiver of handshake messages: it checks
mac1 (always) and mac2 (only under load) and makes cookie replies.
`CookieGenerator` is per peer, our side as a sender: it adds mac1 and, while a
cookie from that peer is fresh, mac2; it consumes that peer's cookie replies.
Time is passed in (`now`, monotonic seconds).
"""

from __future__ import annotations

import hmac
import socket
import struct

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.exceptions import CryptoError

from trionet.wg import crypto
from trionet.wg.constants import COOKIE_REFRESH_TIME, COOKIE_REPLY_SIZE, MSG_COOKIE_REPLY

_COOKIE_HEAD = struct.Struct("<II")
_U32 = struct.Struct("<I")
_NONCE_TAIL = struct.Struct("<Q")
_PORT = struct.Struct("<H")
_V4_MAPPED = bytes(10) + b"\xff\xff"


def source_identity(src: object, src_key: bytes | None = None) -> tuple[bytes, bytes]:
    """Who sent a handshake message: (the bytes its cookie is bound to, its rate-limit key).

    The cookie binds to the exact return address, as wireguard-go's DstToBytes
    (address and port). The rate limiter counts per host, as the kernel's
    ratelimiter.c (an IPv4 address, an IPv6 /64): one host cannot multiply
    its budget over ports or over its /64.

    - `("udp", (host, port))` (a magicsock path tag) or `(host, port)`: as above.
    - `("derp", region)`: with `src_key`, the DERP source node key, both are
      that key: the DERP server set it from a connection that proved it holds
      the key's private half, so it names a sender as a source address does
      (and one flooding peer does not use up every relayed peer's budget).
      Without it, both are the region: all peers relayed through it share one
      (and the device sends no cookie reply to an initiation: DERP delivers by key).
    - bytes: the bytes. Anything else: its repr.

    Never raises. The keys of different kinds never collide (a one-byte tag)."""
    if type(src) is tuple and len(src) == 2:
        kind, where = src
        if kind == "udp" and type(where) is tuple and len(where) == 2:
            found = _address_identity(*where)
        elif kind == "derp":
            if src_key:
                return b"derp" + src_key, b"k" + src_key
            region = _text(where)
            return b"derp" + region, b"d" + region
        else:
            found = _address_identity(kind, where)
        if found is not None:
            return found
    if isinstance(src, bytes):
        return src, b"b" + src
    text = _text(src)
    return text, b"?" + text


def _address_identity(host: object, port: object) -> tuple[bytes, bytes] | None:
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    host = host.partition("%")[0]  # an IPv6 scope
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        try:
            packed = socket.inet_pton(socket.AF_INET6, host)
        except (OSError, ValueError):
            return None
        if packed[:12] == _V4_MAPPED:
            packed = packed[12:]
    cookie_source = packed + _PORT.pack(port & 0xFFFF)
    return (cookie_source, b"4" + packed) if len(packed) == 4 else (cookie_source, b"6" + packed[:8])


def _text(value: object) -> bytes:
    try:
        return repr(value).encode("utf-8", "replace")
    except Exception:  # a repr that fails names no one
        return b""


class CookieChecker:
    def __init__(self, our_public: bytes) -> None:
        self.mac1_key = crypto.hash_(crypto.LABEL_MAC1, our_public)
        self.encryption_key = crypto.hash_(crypto.LABEL_COOKIE, our_public)
        self.secret = b""
        self.secret_set: float | None = None
        self._nonce_prefix = b""
        self._reply_cipher: ChaCha20Poly1305
        self._replies = 0
        self._new_reply_cipher()

    def check_mac1(self, msg: bytes) -> bool:
        smac1 = len(msg) - 32
        return hmac.compare_digest(crypto.mac(self.mac1_key, memoryview(msg)[:smac1]), msg[smac1:smac1 + 16])

    def check_mac2(self, msg: bytes, src: bytes, now: float) -> bool:
        if self.secret_set is None or now - self.secret_set > COOKIE_REFRESH_TIME:
            return False
        return self._mac2_valid(msg, crypto.mac(self.secret, src))

    def create_reply(self, msg: bytes, receiver: int, src: bytes, now: float) -> bytes:
        return self._seal_reply(msg, receiver, self._refreshed_cookie(src, now))

    def reply_unless_mac2(self, msg: bytes, src: bytes, now: float) -> bytes | None:
        """None if `msg` carries a valid mac2 for `src`, else the cookie reply to send
        back (to the message's sender index): the two steps under load, with the
        cookie computed once."""
        if self.secret_set is None or now - self.secret_set > COOKIE_REFRESH_TIME:
            cookie = self._refreshed_cookie(src, now)
        else:
            cookie = crypto.mac(self.secret, src)
            if self._mac2_valid(msg, cookie):
                return None
        return self._seal_reply(msg, _U32.unpack_from(msg, 4)[0], cookie)

    @staticmethod
    def _mac2_valid(msg: bytes, cookie: bytes) -> bool:
        smac2 = len(msg) - 16
        return hmac.compare_digest(crypto.mac(cookie, memoryview(msg)[:smac2]), msg[smac2:])

    def _refreshed_cookie(self, src: bytes, now: float) -> bytes:
        if self.secret_set is None or now - self.secret_set > COOKIE_REFRESH_TIME:
            self.secret = crypto.random_bytes(32)
            self.secret_set = now
        return crypto.mac(self.secret, src)

    def _seal_reply(self, msg: bytes, receiver: int, cookie: bytes) -> bytes:
        smac1 = len(msg) - 32
        count = self._replies
        if count >> 64:
            self._new_reply_cipher()
            count = 0
        self._replies = count + 1
        tail = _NONCE_TAIL.pack(count)
        sealed = self._reply_cipher.encrypt(b"\0\0\0\0" + tail, cookie, msg[smac1:smac1 + 16])
        out = _COOKIE_HEAD.pack(MSG_COOKIE_REPLY, receiver) + self._nonce_prefix + tail + sealed
        assert len(out) == COOKIE_REPLY_SIZE
        return out

    def _new_reply_cipher(self) -> None:
        """XChaCha20-Poly1305 is ChaCha20-Poly1305 under the key HChaCha20(key,
        nonce[:16]), with nonce[16:] as its nonce. Our reply nonces are one random
        prefix and a counter after it: unique as random ones, and the subkey is
        derived once, not per reply (a pynacl XChaCha20 call costs ~10 us; this ~1)."""
        self._nonce_prefix = crypto.random_bytes(16)
        self._reply_cipher = ChaCha20Poly1305(crypto.hchacha20(self.encryption_key, self._nonce_prefix))
        self._replies = 0


class CookieGenerator:
    def __init__(self, peer_public: bytes) -> None:
        self.mac1_key = crypto.hash_(crypto.LABEL_MAC1, peer_public)
        self.encryption_key = crypto.hash_(crypto.LABEL_COOKIE, peer_public)
        self.cookie = b""
        self.cookie_set: float | None = None
        self.last_mac1: bytes | None = None

    def add_macs(self, msg_without_macs: bytes, now: float) -> bytes:
        """Append mac1 and mac2 (zeros unless we hold a fresh cookie)."""
        mac1 = crypto.mac(self.mac1_key, msg_without_macs)
        self.last_mac1 = mac1
        msg = msg_without_macs + mac1
        if self.cookie_set is None or now - self.cookie_set > COOKIE_REFRESH_TIME:
            return msg + bytes(16)
        return msg + crypto.mac(self.cookie, msg)

    def consume_reply(self, reply: bytes, now: float) -> bool:
        if self.last_mac1 is None or len(reply) != COOKIE_REPLY_SIZE:
            return False
        try:
            cookie = crypto.xaead_decrypt(self.encryption_key, reply[8:32], reply[32:64], self.last_mac1)
        except CryptoError:
            return False
        self.cookie, self.cookie_set = cookie, now
        return True
