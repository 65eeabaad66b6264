"""The TS2021 Noise initiator against a responder written here from the spec."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

from trionet.errors import RemoteProtocolError
from trionet.noise.blake2s import hash_ as _hash
from trionet.noise.blake2s import kdf2 as _hkdf2
from trionet.noise.core import (
    MAX_PLAINTEXT,
    PROLOGUE,
    PROTOCOL_NAME,
    Initiator,
    NoiseTransport,
    parse_frame_header,
)

Z = bytes(12)


def respond(server_priv: bytes, init: bytes, version: int) -> tuple[bytes, bytes, NoiseTransport]:
    """Noise IK responder: returns (client machine pub, response frame, server transport)."""
    assert struct.unpack_from("!HBH", init) == (version, 1, 96) and len(init) == 101
    e_pub, enc_static, tag = init[5:37], init[37:85], init[85:101]
    s_pub = bytes(crypto_scalarmult_base(server_priv))
    h = _hash(PROTOCOL_NAME)
    ck = h
    h = _hash(h, PROLOGUE + str(version).encode())
    h = _hash(h, s_pub)
    h = _hash(h, e_pub)
    ck, k = _hkdf2(ck, bytes(crypto_scalarmult(server_priv, e_pub)))
    machine = ChaCha20Poly1305(k).decrypt(Z, enc_static, h)
    h = _hash(h, enc_static)
    ck, k = _hkdf2(ck, bytes(crypto_scalarmult(server_priv, machine)))
    ChaCha20Poly1305(k).decrypt(Z, tag, h)
    h = _hash(h, tag)
    r_priv = os.urandom(32)
    r_pub = bytes(crypto_scalarmult_base(r_priv))
    h = _hash(h, r_pub)
    ck, _ = _hkdf2(ck, bytes(crypto_scalarmult(r_priv, e_pub)))
    ck, k = _hkdf2(ck, bytes(crypto_scalarmult(r_priv, machine)))
    t2 = ChaCha20Poly1305(k).encrypt(Z, b"", h)
    k1, k2 = _hkdf2(ck, b"")
    return machine, b"\x02\x00\x30" + r_pub + t2, NoiseTransport(send_key=k2, recv_key=k1)


def test_handshake_and_transport_round_trip() -> None:
    server, machine = os.urandom(32), os.urandom(32)
    init = Initiator(machine, bytes(crypto_scalarmult_base(server)), 116)
    wire = init.initiation()
    got_machine, response, server_side = respond(server, wire, 116)
    assert got_machine == bytes(crypto_scalarmult_base(machine))
    client = init.response(response)
    big = os.urandom(3 * MAX_PLAINTEXT + 5)
    frames = client.seal(big)
    # split into records: every frame is at most 4096 bytes
    out, i = b"", 0
    while i < len(frames):
        ftype, n = parse_frame_header(frames[i:i + 3])
        assert n + 3 <= 4096
        out += server_side.open(ftype, frames[i + 3:i + 3 + n])
        i += 3 + n
    assert out == big
    back = server_side.seal(b"hello")
    assert client.open(back[0], back[3:]) == b"hello"


def test_transport_nonce_is_big_endian() -> None:
    key = os.urandom(32)
    t = NoiseTransport(send_key=key, recv_key=key)
    t.seal(b"a")
    second = t.seal(b"b")
    assert ChaCha20Poly1305(key).decrypt(b"\x00" * 4 + (1).to_bytes(8, "big"), second[3:], None) == b"b"


def test_wrong_server_key_fails_cleanly() -> None:
    server, machine = os.urandom(32), os.urandom(32)
    init = Initiator(machine, bytes(crypto_scalarmult_base(os.urandom(32))), 116)
    wire = init.initiation()
    with pytest.raises(Exception):  # noqa: B017 - the responder cannot even decrypt
        respond(server, wire, 116)
    bogus = b"\x02\x00\x30" + os.urandom(48)
    with pytest.raises(RemoteProtocolError, match="authenticate"):
        init.response(bogus)


def test_error_frame_is_reported() -> None:
    init = Initiator(os.urandom(32), os.urandom(32), 116)
    init.initiation()
    with pytest.raises(RemoteProtocolError, match="refused"):
        init.response(b"\x03\x00\x05nope!")


@given(st.binary(min_size=0, max_size=80))
def test_garbage_frames_rejected(data: bytes) -> None:
    t = NoiseTransport(os.urandom(32), os.urandom(32))
    try:
        ftype, n = parse_frame_header(data[:3])
        t.open(ftype, data[3:3 + n])
    except RemoteProtocolError:
        pass


@given(st.lists(st.binary(min_size=0, max_size=9000), min_size=1, max_size=4))
def test_frames_round_trip(messages: list[bytes]) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    a, b = NoiseTransport(k1, k2), NoiseTransport(k2, k1)
    for msg in messages:
        wire = a.seal(msg)
        got = b""
        while wire:
            ftype, n = parse_frame_header(wire[:3])
            assert n <= MAX_PLAINTEXT + 16 and 3 + n <= 4096
            got += b.open(ftype, wire[3:3 + n])
            wire = wire[3 + n:]
        assert got == msg


async def test_noise_stream_over_memory_pair() -> None:
    import trio.testing

    from trionet.noise.stream import NoiseStream

    k1, k2 = os.urandom(32), os.urandom(32)
    left, right = trio.testing.memory_stream_pair()
    a, b = NoiseStream(left, NoiseTransport(k1, k2)), NoiseStream(right, NoiseTransport(k2, k1))
    payload = os.urandom(20000)
    await a.send_all(payload)
    got = b""
    while len(got) < len(payload):
        got += await b.receive_some(7000)
    assert got == payload
