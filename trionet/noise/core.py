"""Noise_IK_25519_ChaChaPoly_BLAKE2s as Tailscale's control protocol uses it.

Sans-IO: `Initiator` builds the 101-byte initiation and consumes the 51-byte
response; `NoiseTransport` seals and opens records. Facts from
tailscale/tailscale control/controlbase/{handshake,messages,conn}.go:

* prologue "Tailscale Control Protocol v<version>"; HKDF is RFC 5869 over
  HMAC-BLAKE2s with salt = ck; handshake AEADs use an all-zero nonce;
* frames: type u8 ‖ length u16 BE ‖ body; initiation = version u16 BE first;
* transport nonce = 4 zero bytes ‖ counter u64 BIG-endian; a record is at
  most 4096 bytes with its header, so at most 4077 plaintext bytes;
* the client sends with the first split key and receives with the second.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

from trionet.errors import LocalProtocolError, RemoteProtocolError
from trionet.noise.blake2s import hash_, kdf2

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"Tailscale Control Protocol v"
MSG_INITIATION, MSG_RESPONSE, MSG_ERROR, MSG_RECORD = 1, 2, 3, 4
HEADER_LEN = 3
MAX_MESSAGE = 4096
MAX_PLAINTEXT = MAX_MESSAGE - HEADER_LEN - 16  # 4077
INITIATION_LEN = 5 + 96
RESPONSE_LEN = 3 + 48
ZERO_NONCE = bytes(12)
MAX_NONCE = 2**64 - 1


def _dh(private: bytes, public: bytes) -> bytes:
    return bytes(crypto_scalarmult(private, public))


def parse_frame_header(header: bytes) -> tuple[int, int]:
    """(type, body length) of a 3-byte frame header (initiation excluded)."""
    if len(header) < HEADER_LEN:
        raise RemoteProtocolError("short Noise frame header")
    ftype, length = header[0], struct.unpack_from("!H", header, 1)[0]
    if ftype not in (MSG_RESPONSE, MSG_ERROR, MSG_RECORD):
        raise RemoteProtocolError(f"unexpected Noise frame type {ftype}")
    if length + HEADER_LEN > MAX_MESSAGE:
        raise RemoteProtocolError(f"Noise frame of {length} bytes is over the limit")
    return ftype, length


class Initiator:
    """The client half of the IK handshake; knows the server's static key."""

    def __init__(self, machine_private: bytes, server_public: bytes, version: int,
                 ephemeral_private: bytes | None = None) -> None:
        self.machine_private = machine_private
        self.server_public = server_public
        self.version = version
        self.e_private = ephemeral_private or os.urandom(32)
        self.h = hash_(PROTOCOL_NAME)
        self.ck = self.h
        self.h = hash_(self.h, PROLOGUE + str(version).encode())
        self.h = hash_(self.h, server_public)
        self._sent = False

    def initiation(self) -> bytes:
        if self._sent:
            raise LocalProtocolError("initiation already built")
        self._sent = True
        e_pub = bytes(crypto_scalarmult_base(self.e_private))
        self.h = hash_(self.h, e_pub)
        self.ck, k = kdf2(self.ck, _dh(self.e_private, self.server_public))
        machine_pub = bytes(crypto_scalarmult_base(self.machine_private))
        enc_static = ChaCha20Poly1305(k).encrypt(ZERO_NONCE, machine_pub, self.h)
        self.h = hash_(self.h, enc_static)
        self.ck, k = kdf2(self.ck, _dh(self.machine_private, self.server_public))
        tag = ChaCha20Poly1305(k).encrypt(ZERO_NONCE, b"", self.h)
        self.h = hash_(self.h, tag)
        body = e_pub + enc_static + tag
        return struct.pack("!HBH", self.version, MSG_INITIATION, len(body)) + body

    def response(self, frame: bytes) -> NoiseTransport:
        """Consume the server's response frame; the transport keys follow."""
        if len(frame) >= HEADER_LEN and frame[0] == MSG_ERROR:
            raise RemoteProtocolError("control server refused the handshake: "
                                      + bytes(frame[HEADER_LEN:]).decode(errors="replace"))
        if len(frame) != RESPONSE_LEN or frame[0] != MSG_RESPONSE or struct.unpack_from("!H", frame, 1)[0] != 48:
            raise RemoteProtocolError("malformed Noise handshake response")
        re_pub, tag = bytes(frame[3:35]), bytes(frame[35:51])
        self.h = hash_(self.h, re_pub)
        self.ck, _ = kdf2(self.ck, _dh(self.e_private, re_pub))
        self.ck, k = kdf2(self.ck, _dh(self.machine_private, re_pub))
        try:
            ChaCha20Poly1305(k).decrypt(ZERO_NONCE, tag, self.h)
        except InvalidTag as exc:
            raise RemoteProtocolError("Noise handshake response does not authenticate "
                                      "(wrong server key?)") from exc
        self.h = hash_(self.h, tag)
        k1, k2 = kdf2(self.ck, b"")
        return NoiseTransport(send_key=k1, recv_key=k2)


class NoiseTransport:
    """Record sealing and opening after the handshake."""

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._tx = ChaCha20Poly1305(send_key)
        self._rx = ChaCha20Poly1305(recv_key)
        self._tx_n = 0
        self._rx_n = 0

    @staticmethod
    def _nonce(n: int) -> bytes:
        return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")

    def seal(self, plaintext: bytes) -> bytes:
        """One or more record frames carrying `plaintext`."""
        out = bytearray()
        for i in range(0, max(len(plaintext), 1), MAX_PLAINTEXT):
            chunk = plaintext[i:i + MAX_PLAINTEXT]
            if self._tx_n >= MAX_NONCE:
                raise LocalProtocolError("Noise send nonce exhausted")
            ct = self._tx.encrypt(self._nonce(self._tx_n), bytes(chunk), None)
            self._tx_n += 1
            out += struct.pack("!BH", MSG_RECORD, len(ct)) + ct
        return bytes(out)

    def open(self, ftype: int, body: bytes) -> bytes:
        if ftype != MSG_RECORD:
            raise RemoteProtocolError(f"Noise frame type {ftype} after the handshake")
        if self._rx_n >= MAX_NONCE:
            raise RemoteProtocolError("Noise receive nonce exhausted")
        try:
            pt = self._rx.decrypt(self._nonce(self._rx_n), bytes(body), None)
        except InvalidTag as exc:
            raise RemoteProtocolError("Noise record failed to decrypt") from exc
        self._rx_n += 1
        return pt
