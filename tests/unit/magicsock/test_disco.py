"""Disco wrapper and messages: byte layouts from disco.go, seal/open, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from trionet.errors import LocalProtocolError, RemoteProtocolError
from trionet.magicsock import disco

ME = PrivateKey.generate()
PEER = PrivateKey.generate()
ME_PUB = bytes(ME.public_key)
PEER_PUB = bytes(PEER.public_key)
TX = bytes(range(12))
NODE = bytes(range(100, 132))


def boxes() -> tuple[disco.DiscoBox, disco.DiscoBox]:
    return disco.DiscoBox(bytes(ME), PEER_PUB), disco.DiscoBox(bytes(PEER), ME_PUB)


def test_magic_and_header() -> None:
    assert disco.MAGIC == bytes.fromhex("5453f09f92ac")
    assert disco.HEADER_LEN == 62


def test_message_layouts() -> None:
    assert disco.Ping(TX, NODE).encode() == b"\x01\x00" + TX + NODE
    assert disco.Ping(TX, NODE, padding=3).encode() == b"\x01\x00" + TX + NODE + b"\x00\x00\x00"
    assert disco.Ping(TX).encode() == b"\x01\x00" + TX
    pong = disco.Pong(TX, ("10.0.0.1", 41641)).encode()
    assert pong == b"\x02\x00" + TX + bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]) + (41641).to_bytes(
        2, "big"
    )
    assert len(pong) == 2 + 30
    cmm = disco.CallMeMaybe([("1.2.3.4", 1), ("fd7a::5", 2)]).encode()
    assert cmm[:2] == b"\x03\x00" and len(cmm) == 2 + 36


def test_parse_round_trips_and_go_quirks() -> None:
    assert disco.parse_message(disco.Ping(TX, NODE, 10).encode()) == disco.Ping(TX, NODE, 10)
    assert disco.parse_message(disco.Ping(TX).encode()) == disco.Ping(TX, None, 0)
    assert disco.parse_message(b"\x01\x00" + TX + b"abc") == disco.Ping(TX, None, 3)
    assert disco.parse_message(disco.Pong(TX, ("fd7a::1", 9)).encode()) == disco.Pong(TX, ("fd7a::1", 9))
    assert disco.parse_message(disco.Pong(TX, ("1.2.3.4", 9)).encode() + b"trailing") == disco.Pong(
        TX, ("1.2.3.4", 9)
    )
    eps = (("1.2.3.4", 1), ("fd7a::5", 2))
    assert disco.parse_message(disco.CallMeMaybe(eps).encode()) == disco.CallMeMaybe(eps)
    # disco.go parseCallMeMaybe: bad length or version != 0 gives an empty list, not an error
    assert disco.parse_message(b"\x03\x00" + bytes(17)) == disco.CallMeMaybe(())
    assert disco.parse_message(b"\x03\x01" + bytes(18)) == disco.CallMeMaybe(())
    for t in range(4, 10):
        assert disco.parse_message(bytes([t, 0]) + b"relay") == disco.Ignored(t, 0, b"relay")


@pytest.mark.parametrize(
    "payload", [b"", b"\x01", b"\x01\x00short", b"\x02\x00" + bytes(29), b"\x0a\x00", b"\x00\x00"]
)
def test_parse_garbage(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        disco.parse_message(payload)


def test_seal_open_and_wire_layout() -> None:
    mine, theirs = boxes()
    nonce = b"\x09" * 24
    wire = mine.seal(ME_PUB, disco.Ping(TX, NODE), nonce=nonce)
    assert wire[:6] == disco.MAGIC
    assert wire[6:38] == ME_PUB
    assert wire[38:62] == nonce
    assert disco.looks_like_disco(wire)
    assert disco.sender_key(wire) == ME_PUB
    # the same box a Go peer precomputes (box.Precompute(peerDisco, myDiscoPriv))
    assert Box(PEER, PublicKey(ME_PUB)).decrypt(wire[38:]) == b"\x01\x00" + TX + NODE
    assert theirs.open(wire) == disco.Ping(TX, NODE)
    assert mine.seal(None, disco.Ping(TX))[6:38] == ME_PUB


def test_open_rejects() -> None:
    mine, theirs = boxes()
    wire = bytearray(mine.seal(ME_PUB, disco.Pong(TX, ("1.1.1.1", 1))))
    wire[-1] ^= 1
    with pytest.raises(RemoteProtocolError):
        theirs.open(bytes(wire))
    with pytest.raises(RemoteProtocolError):
        mine.open(mine.seal(ME_PUB, disco.Ping(TX)))  # sender is not this box's peer
    with pytest.raises(RemoteProtocolError):
        theirs.open(b"not disco")
    with pytest.raises(RemoteProtocolError):
        theirs.open(disco.MAGIC + ME_PUB + bytes(24))  # header only
    with pytest.raises(RemoteProtocolError):
        disco.sender_key(b"TS")
    assert not disco.looks_like_disco(disco.MAGIC + bytes(55))


def test_local_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        disco.Ping(b"short").encode()
    with pytest.raises(LocalProtocolError):
        disco.Pong(TX, ("not-an-ip", 1)).encode()
    with pytest.raises(LocalProtocolError):
        disco.DiscoBox(b"x", PEER_PUB)


ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)).map(str)
endpoints = st.tuples(ips, st.integers(0, 65535))
messages = st.one_of(
    st.builds(
        disco.Ping,
        st.binary(min_size=12, max_size=12),
        st.binary(min_size=32, max_size=32),
        st.integers(0, 64),
    ),
    st.builds(disco.Ping, st.binary(min_size=12, max_size=12), st.none(), st.integers(0, 31)),
    st.builds(disco.Pong, st.binary(min_size=12, max_size=12), endpoints),
    st.builds(disco.CallMeMaybe, st.lists(endpoints, min_size=1, max_size=5).map(tuple)),
    st.builds(disco.Ignored, st.integers(4, 9), st.just(0), st.binary(max_size=40)),
)


@given(messages)
def test_seal_open_round_trip(msg: disco.Message) -> None:
    mine, theirs = boxes()
    assert theirs.open(mine.seal(ME_PUB, msg)) == msg


@given(st.binary(max_size=200))
def test_parse_garbage_only_remote_errors(payload: bytes) -> None:
    try:
        disco.parse_message(payload)
    except RemoteProtocolError:
        pass


@given(st.binary(max_size=200), st.booleans())
def test_open_garbage_only_remote_errors(tail: bytes, with_magic: bool) -> None:
    _, theirs = boxes()
    wire = (disco.MAGIC + ME_PUB + tail) if with_magic else tail
    try:
        theirs.open(wire)
    except RemoteProtocolError:
        pass
