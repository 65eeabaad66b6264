"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it, as pure functions.

(src: wireguard-go device/noise-protocol.go: CreateMessageInitiation,
ConsumeMessageInitiation, CreateMessageResponse, ConsumeMessageResponse,
BeginSymmetricSession; protocol-notes §10.) The PSK is 32 zero bytes
(Tailscale sets none). Functions return messages *without* mac1/mac2 (the
cookie module adds those) and raise `cryptography.exceptions.InvalidTag` or
`ValueError` (bad point, unknown peer) on bad input; the device turns those
into counted drops.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from trionet.wg import crypto
from trionet.wg.constants import MSG_INITIATION, MSG_RESPONSE
from trionet.wg.messages import INITIATION_HEAD, RESPONSE_HEAD, tai64n

PSK = crypto.ZERO_KEY


@attrs.define(eq=False)
class InitiationState:
    """What the initiator keeps between its initiation and the response."""

    local_index: int
    e_private: bytes = attrs.field(repr=False)  # secrets never reach a log
    chaining_key: bytes = attrs.field(repr=False)
    hash: bytes = attrs.field(repr=False)


@attrs.define(eq=False)
class ConsumedInitiation:
    peer_static: bytes
    sender: int
    e_public: bytes
    chaining_key: bytes = attrs.field(repr=False)
    hash: bytes = attrs.field(repr=False)
    timestamp: bytes


@attrs.frozen
class SessionKeys:
    send: bytes = attrs.field(repr=False)
    receive: bytes = attrs.field(repr=False)


def create_initiation(our_public: bytes, peer_public: bytes, static_static: bytes, local_index: int,
                      wall: float, ephemeral: tuple[bytes, bytes] | None = None) -> tuple[bytes, InitiationState]:
    e_priv, e_pub = ephemeral or crypto.new_ephemeral()
    h = crypto.hash_(crypto.H0, peer_public)
    c = crypto.kdf1(crypto.C0, e_pub)
    h = crypto.hash_(h, e_pub)
    c, k = crypto.kdf2(c, crypto.dh(e_priv, peer_public))
    static = crypto.aead_encrypt(k, our_public, h)
    h = crypto.hash_(h, static)
    c, k = crypto.kdf2(c, static_static)
    ts = crypto.aead_encrypt(k, tai64n(wall), h)
    h = crypto.hash_(h, ts)
    msg = INITIATION_HEAD.pack(MSG_INITIATION, local_index) + e_pub + static + ts
    return msg, InitiationState(local_index, e_priv, c, h)


def consume_initiation(our_private: bytes, our_public: bytes, msg: bytes,
                       static_static_of: Callable[[bytes], bytes | None]) -> ConsumedInitiation:
    """Decrypt an initiation; `static_static_of(peer_public)` gives the
    precomputed DH(our static, peer static), or None for an unknown peer."""
    sender = INITIATION_HEAD.unpack_from(msg)[1]
    e_pub = msg[8:40]
    h = crypto.hash_(crypto.H0, our_public)
    c = crypto.kdf1(crypto.C0, e_pub)
    h = crypto.hash_(h, e_pub)
    c, k = crypto.kdf2(c, crypto.dh(our_private, e_pub))
    sealed_static = msg[40:88]
    peer_static = crypto.aead_decrypt(k, sealed_static, h)
    h = crypto.hash_(h, sealed_static)
    ss = static_static_of(peer_static)
    if ss is None:
        raise LookupError("initiation from an unknown peer")
    c, k = crypto.kdf2(c, ss)
    sealed_ts = msg[88:116]
    ts = crypto.aead_decrypt(k, sealed_ts, h)
    h = crypto.hash_(h, sealed_ts)
    return ConsumedInitiation(peer_static, sender, e_pub, c, h, ts)


def create_response(init: ConsumedInitiation, local_index: int,
                    ephemeral: tuple[bytes, bytes] | None = None) -> tuple[bytes, SessionKeys]:
    e_priv, e_pub = ephemeral or crypto.new_ephemeral()
    c = crypto.kdf1(init.chaining_key, e_pub)
    h = crypto.hash_(init.hash, e_pub)
    c = crypto.kdf1(c, crypto.dh(e_priv, init.e_public))
    c = crypto.kdf1(c, crypto.dh(e_priv, init.peer_static))
    c, tau, k = crypto.kdf3(c, PSK)
    h = crypto.hash_(h, tau)
    empty = crypto.aead_encrypt(k, b"", h)
    msg = RESPONSE_HEAD.pack(MSG_RESPONSE, local_index, init.sender) + e_pub + empty
    recv, send = crypto.kdf2(c, b"")
    return msg, SessionKeys(send, recv)


def consume_response(our_private: bytes, state: InitiationState, msg: bytes) -> tuple[int, SessionKeys]:
    """Finish our handshake; returns (their index, session keys)."""
    sender = RESPONSE_HEAD.unpack_from(msg)[1]
    e_pub = msg[12:44]
    c = crypto.kdf1(state.chaining_key, e_pub)
    h = crypto.hash_(state.hash, e_pub)
    c = crypto.kdf1(c, crypto.dh(state.e_private, e_pub))
    c = crypto.kdf1(c, crypto.dh(our_private, e_pub))
    c, tau, k = crypto.kdf3(c, PSK)
    h = crypto.hash_(h, tau)
    crypto.aead_decrypt(k, msg[44:60], h)
    send, recv = crypto.kdf2(c, b"")
    return sender, SessionKeys(send, recv)
