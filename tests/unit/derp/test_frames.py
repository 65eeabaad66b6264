"""DERP frame codec: numbers, builders, incremental parser, fuzz."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trionet.derp import frames
from trionet.derp.frames import Frame, FrameParser, FrameType
from trionet.errors import LocalProtocolError, RemoteProtocolError

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))


def test_frame_numbers_match_derp_go() -> None:
    # src: tailscale/tailscale derp/derp.go, Frame* constants
    assert {t.name: int(t) for t in FrameType} == {
        "SERVER_KEY": 0x01,
        "CLIENT_INFO": 0x02,
        "SERVER_INFO": 0x03,
        "SEND_PACKET": 0x04,
        "RECV_PACKET": 0x05,
        "KEEP_ALIVE": 0x06,
        "NOTE_PREFERRED": 0x07,
        "PEER_GONE": 0x08,
        "PEER_PRESENT": 0x09,
        "FORWARD_PACKET": 0x0A,
        "WATCH_CONNS": 0x10,
        "CLOSE_PEER": 0x11,
        "PING": 0x12,
        "PONG": 0x13,
        "HEALTH": 0x14,
        "RESTARTING": 0x15,
    }
    assert frames.MAGIC == bytes.fromhex("44455250f09f9491")
    assert frames.MAX_SEND_FRAME == 65568


def test_builders_exact_bytes() -> None:
    assert frames.build_keep_alive() == b"\x06\x00\x00\x00\x00"
    assert frames.build_note_preferred(True) == b"\x07\x00\x00\x00\x01\x01"
    assert frames.build_note_preferred(False) == b"\x07\x00\x00\x00\x01\x00"
    assert frames.build_ping(b"12345678") == b"\x12\x00\x00\x00\x0812345678"
    assert frames.build_pong(b"12345678") == b"\x13\x00\x00\x00\x0812345678"
    assert frames.build_send_packet(KEY_A, b"hi") == b"\x04\x00\x00\x00\x22" + KEY_A + b"hi"
    assert frames.build_server_key(KEY_A) == b"\x01\x00\x00\x00\x28" + frames.MAGIC + KEY_A
    assert frames.build_restarting(1500, 60000) == b"\x15\x00\x00\x00\x08" + struct.pack(">II", 1500, 60000)
    assert frames.build_watch_conns() == b"\x10\x00\x00\x00\x00"
    assert frames.build_close_peer(KEY_B)[:5] == b"\x11\x00\x00\x00\x20"
    assert frames.build_peer_gone(KEY_A, 1) == b"\x08\x00\x00\x00\x21" + KEY_A + b"\x01"


def test_send_packet_size_limit() -> None:
    frames.build_send_packet(KEY_A, bytes(frames.MAX_PACKET_SIZE))
    with pytest.raises(LocalProtocolError):
        frames.build_send_packet(KEY_A, bytes(frames.MAX_PACKET_SIZE + 1))
    with pytest.raises(LocalProtocolError):
        frames.build_send_packet(b"short", b"")
    with pytest.raises(LocalProtocolError):
        frames.build_ping(b"1234567")


def test_parser_byte_by_byte() -> None:
    wire = frames.build_recv_packet(KEY_A, b"x" * 100) + frames.build_keep_alive() + frames.build_health("dup")
    parser = FrameParser()
    got: list[Frame] = []
    for i in range(len(wire)):
        parser.feed(wire[i : i + 1])
        got.extend(parser.frames())
    assert [f.type for f in got] == [FrameType.RECV_PACKET, FrameType.KEEP_ALIVE, FrameType.HEALTH]
    assert frames.parse_packet(got[0].payload) == (KEY_A, b"x" * 100)
    assert frames.parse_health(got[2].payload) == "dup"
    assert parser.buffered == 0


def test_parser_rejects_oversized_header_at_once() -> None:
    parser = FrameParser()
    parser.feed(b"\x05" + struct.pack(">I", frames.MAX_FRAME_LEN + 1))
    with pytest.raises(RemoteProtocolError):
        parser.next_frame()
    ok = FrameParser()
    ok.feed(b"\x05" + struct.pack(">I", frames.MAX_FRAME_LEN))
    assert ok.next_frame() is None  # legal size, just incomplete


def test_payload_parsers() -> None:
    assert frames.parse_server_key(frames.MAGIC + KEY_A + b"future") == KEY_A
    with pytest.raises(RemoteProtocolError):
        frames.parse_server_key(b"DERP!!!!" + KEY_A)
    with pytest.raises(RemoteProtocolError):
        frames.parse_server_key(frames.MAGIC + KEY_A[:31])
    assert frames.parse_peer_gone(KEY_A) == (KEY_A, 0)
    assert frames.parse_peer_gone(KEY_A + b"\x01") == (KEY_A, 1)
    assert frames.parse_restarting(struct.pack(">II", 7, 9)) == (7, 9)
    pp = frames.build_peer_present(KEY_A, ("10.1.2.3", 41641), 1)
    assert frames.parse_peer_present(pp[5:]) == (KEY_A, ("10.1.2.3", 41641), 1)
    pp6 = frames.build_peer_present(KEY_A, ("fd7a::1", 5))
    assert frames.parse_peer_present(pp6[5:]) == (KEY_A, ("fd7a::1", 5), 0)
    assert frames.parse_peer_present(KEY_A) == (KEY_A, None, 0)
    assert frames.parse_forward_packet(KEY_A + KEY_B + b"p") == (KEY_A, KEY_B, b"p")
    assert frames.parse_note_preferred(b"\x01") is True
    assert frames.parse_client_info(KEY_A + bytes(30)) == (KEY_A, bytes(30))


PARSERS = [
    frames.parse_server_key,
    frames.parse_client_info,
    frames.parse_packet,
    frames.parse_forward_packet,
    frames.parse_note_preferred,
    frames.parse_peer_gone,
    frames.parse_peer_present,
    frames.parse_ping,
    frames.parse_health,
    frames.parse_restarting,
]


@given(st.binary(max_size=200))
def test_payload_parsers_never_raise_other_errors(data: bytes) -> None:
    for parse in PARSERS:
        try:
            parse(data)
        except RemoteProtocolError:
            pass


@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=8), st.data())
def test_parser_round_trip_any_split(items: list[tuple[int, bytes]], data: st.DataObject) -> None:
    wire = b"".join(frames.build_frame(t, p) for t, p in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    parser = FrameParser()
    got: list[tuple[int, bytes]] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        parser.feed(wire[prev:cut])
        prev = cut
        got.extend((f.type, f.payload) for f in parser.frames())
    assert got == items


@given(st.binary(max_size=2000), st.integers(1, 64))
def test_parser_garbage_only_remote_errors(data: bytes, limit: int) -> None:
    parser = FrameParser(max_frame_len=limit * 16)
    try:
        parser.feed(data)
        list(parser.frames())
    except RemoteProtocolError:
        pass
