"""Noise primitives for WireGuard: BLAKE2s hash/HMAC/KDF/MAC, X25519, AEADs.

(src: wireguard-go device/noise-helpers.go, device/kdf_test.go for the HMAC
construction; the XChaCha20-Poly1305 cookie AEAD comes from libsodium.)
"""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)

# Shared with TS2021 (trionet.noise), re-exported for the WireGuard handshake.
from trionet.noise.blake2s import hash_ as hash_
from trionet.noise.blake2s import hmac_ as hmac_
from trionet.noise.blake2s import kdf1 as kdf1
from trionet.noise.blake2s import kdf2 as kdf2
from trionet.noise.blake2s import kdf3 as kdf3

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
ZERO_NONCE = bytes(12)
ZERO_KEY = bytes(32)


def mac(key: bytes, data: bytes | memoryview) -> bytes:
    """Keyed BLAKE2s-128 (mac1, mac2, cookie)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


# Recent private keys as OpenSSL objects, least recently used first. Making one from
# bytes derives its public key: a scalar multiplication as dear as the DH itself. Our
# static key takes part in every handshake and an ephemeral in two or three DHs.
_PRIVATE_KEYS: dict[bytes, X25519PrivateKey] = {}
_PRIVATE_KEYS_MAX = 16


def _private_key(private: bytes) -> X25519PrivateKey:
    key = _PRIVATE_KEYS.pop(private, None)
    if key is None:
        key = X25519PrivateKey.from_private_bytes(private)
        if len(_PRIVATE_KEYS) >= _PRIVATE_KEYS_MAX:
            del _PRIVATE_KEYS[next(iter(_PRIVATE_KEYS))]
    _PRIVATE_KEYS[private] = key
    return key


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def dh(private: bytes, public: bytes) -> bytes:
    """X25519. Raises ValueError for a low-order public key (all-zero result)."""
    return _private_key(private).exchange(X25519PublicKey.from_public_bytes(public))


def new_ephemeral() -> tuple[bytes, bytes]:
    k = X25519PrivateKey.generate()
    private = k.private_bytes_raw()
    if len(_PRIVATE_KEYS) >= _PRIVATE_KEYS_MAX:
        del _PRIVATE_KEYS[next(iter(_PRIVATE_KEYS))]
    _PRIVATE_KEYS[private] = k
    return private, k.public_key().public_bytes_raw()


def aead_encrypt(key: bytes, plain: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(ZERO_NONCE, plain, ad)


def aead_decrypt(key: bytes, sealed: bytes | memoryview, ad: bytes) -> bytes:
    """Raises cryptography.exceptions.InvalidTag on failure."""
    return ChaCha20Poly1305(key).decrypt(ZERO_NONCE, sealed, ad)


def xaead_encrypt(key: bytes, nonce: bytes, plain: bytes, ad: bytes) -> bytes:
    return bytes(crypto_aead_xchacha20poly1305_ietf_encrypt(plain, ad, nonce, key))


def xaead_decrypt(key: bytes, nonce: bytes, sealed: bytes, ad: bytes) -> bytes:
    """Raises nacl.exceptions.CryptoError on failure."""
    return bytes(crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, ad, nonce, key))


_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
_KEY_WORDS = struct.Struct("<8I")
_NONCE_WORDS = struct.Struct("<4I")
_ROUNDS = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),  # columns
           (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))  # diagonals


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha §2.2): the ChaCha20 key that XChaCha20
    derives from its key and the first 16 bytes of its 24-byte nonce.

    Pure Python (about 0.1 ms): for a subkey derived once and kept, not per message."""
    x = [*_SIGMA, *_KEY_WORDS.unpack(key), *_NONCE_WORDS.unpack(nonce16)]
    for _ in range(10):
        for a, b, c, d in _ROUNDS:
            x[a] = (x[a] + x[b]) & 0xFFFFFFFF
            t = x[d] ^ x[a]
            x[d] = ((t << 16) | (t >> 16)) & 0xFFFFFFFF
            x[c] = (x[c] + x[d]) & 0xFFFFFFFF
            t = x[b] ^ x[c]
            x[b] = ((t << 12) | (t >> 20)) & 0xFFFFFFFF
            x[a] = (x[a] + x[b]) & 0xFFFFFFFF
            t = x[d] ^ x[a]
            x[d] = ((t << 8) | (t >> 24)) & 0xFFFFFFFF
            x[c] = (x[c] + x[d]) & 0xFFFFFFFF
            t = x[b] ^ x[c]
            x[b] = ((t << 7) | (t >> 25)) & 0xFFFFFFFF
    return _KEY_WORDS.pack(*x[0:4], *x[12:16])


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


C0 = hash_(CONSTRUCTION)
H0 = hash_(C0, IDENTIFIER)
