"""Noise primitives for WireGuard: BLAKE2s hash/HMAC/KDF/MAC, X25519, AEADs.

(src: wireguard-go device/noise-helpers.go, device/kdf_test.go for the HMAC
construction; the XChaCha20-Poly1305 cookie AEAD comes from libsodium.)
"""

from __future__ import annotations

import hashlib
import os

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


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def dh(private: bytes, public: bytes) -> bytes:
    """X25519. Raises ValueError for a low-order public key (all-zero result)."""
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def new_ephemeral() -> tuple[bytes, bytes]:
    k = X25519PrivateKey.generate()
    return k.private_bytes_raw(), k.public_key().public_bytes_raw()


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


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


C0 = hash_(CONSTRUCTION)
H0 = hash_(C0, IDENTIFIER)
