"""BLAKE2s hash, HMAC and HKDF: the Noise primitives TS2021 and WireGuard share.

Both use Noise's HKDF over HMAC-BLAKE2s (Noise spec §4.3; wireguard-go
device/noise-helpers.go; tailscale control/controlbase/noise.go).
"""

from __future__ import annotations

import hashlib
import hmac


def hash_(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    t0 = hmac_(key, data)
    return hmac_(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    return t1, hmac_(t0, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    t2 = hmac_(t0, t1 + b"\x02")
    return t1, t2, hmac_(t0, t2 + b"\x03")
