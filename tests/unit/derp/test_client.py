"""DerpClient sans-IO: login, ping/pong, liveness, events, garbage."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from tests.unit.derp.fakeserver import FakeServer
from trionet.derp import client as dc
from trionet.derp import frames
from trionet.derp.frames import FrameType
from trionet.errors import LocalProtocolError, RemoteProtocolError, TransportError

NODE = PrivateKey.generate()
NODE_PRIV = bytes(NODE)
NODE_PUB = bytes(NODE.public_key)
PEER = bytes(range(32))


def login(preferred: bool = True, now: float = 0.0) -> tuple[dc.DerpClient, FakeServer]:
    client = dc.DerpClient(NODE_PRIV, preferred=preferred, now=now)
    server = FakeServer()
    assert client.receive_data(server.hello(), now) == []
    assert client.state is dc.State.AWAIT_SERVER_INFO
    reply = server.feed(client.data_to_send())
    events = client.receive_data(reply, now)
    assert events == [dc.Connected(server.public, {"version": 2})]
    assert client.state is dc.State.CONNECTED
    server.feed(client.data_to_send())
    return client, server


def test_login_uses_long_term_node_key_and_go_json() -> None:
    _client, server = login()
    assert server.client_public == NODE_PUB  # not an ephemeral key (sunbeam-net bug 2)
    assert server.client_info == {"version": 2, "CanAckPings": True}
    assert server.received == [(FrameType.NOTE_PREFERRED, b"\x01")]


def test_client_info_wire_layout() -> None:
    client = dc.DerpClient(NODE_PRIV, now=0, nonce=lambda n: b"\x07" * n)
    server = FakeServer()
    client.receive_data(server.hello(), 0)
    out = client.data_to_send()
    assert out[0] == FrameType.CLIENT_INFO
    (length,) = struct.unpack(">I", out[1:5])
    payload = out[5:]
    assert len(payload) == length
    assert payload[:32] == NODE_PUB
    assert payload[32:56] == b"\x07" * 24
    plain = Box(server.private, PublicKey(NODE_PUB)).decrypt(payload[32:])
    assert plain == b'{"version":2,"CanAckPings":true}'


def test_not_preferred_sends_zero_and_can_change() -> None:
    client, server = login(preferred=False)
    assert server.received == [(FrameType.NOTE_PREFERRED, b"\x00")]
    client.note_preferred(True)
    client.note_preferred(True)
    server.feed(client.data_to_send())
    assert server.received[-1] == (FrameType.NOTE_PREFERRED, b"\x01")
    assert len(server.received) == 2


def test_bad_magic_is_remote_error() -> None:
    client = dc.DerpClient(NODE_PRIV)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(frames.build_frame(FrameType.SERVER_KEY, b"NOTDERP!" + PEER), 0)
    assert client.state is dc.State.CLOSED


def test_server_info_that_does_not_open() -> None:
    client = dc.DerpClient(NODE_PRIV)
    client.receive_data(FakeServer().hello(), 0)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(frames.build_server_info(bytes(60)), 0)


def test_server_info_not_json() -> None:
    client = dc.DerpClient(NODE_PRIV)
    server = FakeServer()
    client.receive_data(server.hello(), 0)
    box = Box(server.private, PublicKey(NODE_PUB))
    with pytest.raises(RemoteProtocolError):
        client.receive_data(frames.build_server_info(bytes(box.encrypt(b"[1,", bytes(24)))), 0)


def test_packet_before_login_is_an_error() -> None:
    client = dc.DerpClient(NODE_PRIV)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(frames.build_recv_packet(PEER, b"x"), 0)


def test_packets_sent_before_server_key_follow_client_info() -> None:
    client = dc.DerpClient(NODE_PRIV)
    client.send_packet(PEER, b"early")
    assert client.data_to_send() == b""
    assert client.pending_bytes == 5 + 32 + 5
    server = FakeServer()
    client.receive_data(server.hello(), 0)
    server.feed(client.data_to_send())
    assert server.received == [(FrameType.SEND_PACKET, PEER + b"early")]
    assert client.pending_bytes == 0


def test_steady_state_events() -> None:
    client, _ = login()
    wire = (
        frames.build_recv_packet(PEER, b"wg")
        + frames.build_keep_alive()
        + frames.build_peer_gone(PEER, 1)
        + frames.build_peer_present(PEER, ("1.2.3.4", 5), 1)
        + frames.build_health("duplicate")
        + frames.build_health("")
        + frames.build_restarting(2000, 30000)
    )
    events = client.receive_data(wire, 10.0)
    assert events == [
        dc.Packet(PEER, b"wg"),
        dc.PeerGone(PEER, 1),
        dc.PeerPresent(PEER, ("1.2.3.4", 5), 1),
        dc.Health("duplicate"),
        dc.Health(""),
        dc.Restarting(2.0, 30.0),
    ]
    assert client.stats["keepalives_in"] == 1


def test_ping_is_answered_with_same_bytes() -> None:
    client, server = login()
    assert client.receive_data(frames.build_ping(b"abcdefgh"), 1.0) == []
    server.feed(client.data_to_send())
    assert server.received[-1] == (FrameType.PONG, b"abcdefgh")


def test_our_ping_gets_rtt() -> None:
    client, server = login()
    data = client.send_ping(5.0)
    server.feed(client.data_to_send())
    assert server.received[-1] == (FrameType.PING, data)
    assert client.receive_data(frames.build_pong(data), 5.25) == [dc.PongReceived(data, 0.25)]
    assert client.receive_data(frames.build_pong(b"zzzzzzzz"), 6.0) == [dc.PongReceived(b"zzzzzzzz", None)]


def test_unknown_and_unexpected_frames_are_skipped_and_counted() -> None:
    client, _ = login()
    wire = (
        frames.build_frame(0x42, b"future")
        + frames.build_frame(0xFF)
        + frames.build_send_packet(PEER, b"not for clients")
        + frames.build_server_key(PEER)
        + frames.build_recv_packet(PEER, b"after")
    )
    assert client.receive_data(wire, 0) == [dc.Packet(PEER, b"after")]
    assert client.stats["unknown_frames"] == 2
    assert client.stats["unexpected_frames"] == 2


def test_oversized_frame_closes() -> None:
    client, _ = login()
    with pytest.raises(RemoteProtocolError):
        client.receive_data(b"\x05" + struct.pack(">I", (1 << 20) + 1), 0)
    assert client.state is dc.State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"x", 0)


@pytest.mark.parametrize(
    "frame",
    [
        frames.build_frame(FrameType.RECV_PACKET, b"short"),
        frames.build_frame(FrameType.PING, b"1234"),
        frames.build_frame(FrameType.PEER_GONE, b"short"),
        frames.build_frame(FrameType.RESTARTING, b"1234"),
    ],
)
def test_malformed_known_frame_closes(frame: bytes) -> None:
    client, _ = login()
    with pytest.raises(RemoteProtocolError):
        client.receive_data(frame, 0)


def test_keepalive_liveness_130s() -> None:
    assert dc.DEAD_AFTER == 130.0
    client, _ = login(now=0.0)
    client.receive_data(frames.build_keep_alive(), 100.0)
    assert client.next_deadline() == 230.0
    client.check_timers(229.9)
    with pytest.raises(TransportError):
        client.check_timers(230.0)


def test_login_timeout() -> None:
    client = dc.DerpClient(NODE_PRIV, now=50.0)
    assert client.next_deadline() == 50.0 + dc.HANDSHAKE_TIMEOUT
    with pytest.raises(TransportError):
        client.check_timers(50.0 + dc.HANDSHAKE_TIMEOUT)


def test_misuse_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        dc.DerpClient(b"short")
    client = dc.DerpClient(NODE_PRIV)
    with pytest.raises(LocalProtocolError):
        client.send_ping(0)
    with pytest.raises(LocalProtocolError):
        client.send_packet(PEER, bytes(65537))


def test_server_info_rate_limit_fields_kept() -> None:
    client = dc.DerpClient(NODE_PRIV)
    server = FakeServer({"version": 2, "TokenBucketBytesPerSecond": 1000, "TokenBucketBytesBurst": 5000})
    client.receive_data(server.hello(), 0)
    (event,) = client.receive_data(server.feed(client.data_to_send()), 0)
    assert isinstance(event, dc.Connected)
    assert event.server_info["TokenBucketBytesPerSecond"] == 1000
    assert json.loads(json.dumps(client.statistics()))["state"] == "connected"


@given(st.binary(max_size=600), st.booleans())
def test_garbage_only_remote_protocol_errors(data: bytes, logged_in: bool) -> None:
    if logged_in:
        client, _ = login()
    else:
        client = dc.DerpClient(NODE_PRIV)
    try:
        client.receive_data(data, 1.0)
    except RemoteProtocolError:
        assert client.state is dc.State.CLOSED


@given(st.lists(st.tuples(st.integers(0, 0x20), st.binary(max_size=80)), max_size=10))
def test_random_frames_after_login(items: list[tuple[int, bytes]]) -> None:
    client, _ = login()
    wire = b"".join(frames.build_frame(t, p) for t, p in items)
    try:
        client.receive_data(wire, 1.0)
    except RemoteProtocolError:
        pass
