"""mac1/mac2 and cookie replies (src: wireguard-go device/cookie.go).

`CookieChecker` is our side as a receiver of handshake messages: it checks
mac1 (always) and mac2 (only under load) and makes cookie replies.
`CookieGenerator` is per peer, our side as a sender: it adds mac1 and, while a
cookie from that peer is fresh, mac2; it consumes that peer's cookie replies.
Time is passed in (`now`, monotonic seconds).
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
from typing import Any

from nacl.exceptions import CryptoError

from trionet.wg import crypto
from trionet.wg.constants import COOKIE_REFRESH_TIME, COOKIE_REPLY_SIZE, MSG_COOKIE_REPLY

_COOKIE_HEAD = struct.Struct("<II")


def source_bytes(src: Any) -> bytes:
    """Bytes naming a source address for cookies and rate limiting.

    `(host, port)` tuples become address bytes + port (as wireguard-go's
    DstToBytes); bytes pass through; anything else is its repr."""
    if isinstance(src, bytes):
        return src
    if isinstance(src, tuple) and len(src) >= 2 and isinstance(src[1], int):
        try:
            return ipaddress.ip_address(src[0]).packed + struct.pack("<H", src[1] & 0xFFFF)
        except ValueError:
            pass
    return repr(src).encode()


class CookieChecker:
    def __init__(self, our_public: bytes) -> None:
        self.mac1_key = crypto.hash_(crypto.LABEL_MAC1, our_public)
        self.encryption_key = crypto.hash_(crypto.LABEL_COOKIE, our_public)
        self.secret = b""
        self.secret_set: float | None = None

    def check_mac1(self, msg: bytes) -> bool:
        smac1 = len(msg) - 32
        return hmac.compare_digest(crypto.mac(self.mac1_key, memoryview(msg)[:smac1]), msg[smac1:smac1 + 16])

    def check_mac2(self, msg: bytes, src: bytes, now: float) -> bool:
        if self.secret_set is None or now - self.secret_set > COOKIE_REFRESH_TIME:
            return False
        cookie = crypto.mac(self.secret, src)
        smac2 = len(msg) - 16
        return hmac.compare_digest(crypto.mac(cookie, memoryview(msg)[:smac2]), msg[smac2:])

    def create_reply(self, msg: bytes, receiver: int, src: bytes, now: float) -> bytes:
        if self.secret_set is None or now - self.secret_set > COOKIE_REFRESH_TIME:
            self.secret = crypto.random_bytes(32)
            self.secret_set = now
        cookie = crypto.mac(self.secret, src)
        smac1 = len(msg) - 32
        nonce = crypto.random_bytes(24)
        sealed = crypto.xaead_encrypt(self.encryption_key, nonce, cookie, msg[smac1:smac1 + 16])
        out = _COOKIE_HEAD.pack(MSG_COOKIE_REPLY, receiver) + nonce + sealed
        assert len(out) == COOKIE_REPLY_SIZE
        return out


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
