"""DerpConnection against an in-process relay: transport, reconnects, isolation of bad links."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import PrivateKey

from tests.unit.derp.fakerelay import FakeRelay
from trionet.derp import client as dc
from trionet.derp import frames
from trionet.derp.driver import DerpConnection, backoff_delay, derp_url_for_node
from trionet.errors import ConfigError


def key() -> bytes:
    return bytes(PrivateKey.generate())


def pub(private: bytes) -> bytes:
    return bytes(PrivateKey(private).public_key)


def fast_backoff(n: int) -> float:
    return 0.01 * (n + 1)


class Recorder:
    def __init__(self) -> None:
        self.packets: list[tuple[bytes, bytes]] = []
        self.events: list[Any] = []
        self.got = trio.Event()

    def on_packet(self, src: bytes, data: bytes) -> None:
        self.packets.append((src, data))
        self.got.set()

    def on_event(self, ev: Any) -> None:
        self.events.append(ev)


def conn(relay: FakeRelay, private: bytes, rec: Recorder, **kw: Any) -> DerpConnection:
    return DerpConnection(
        f"http://127.0.0.1:{relay.port}/derp",
        private,
        on_packet=rec.on_packet,
        on_event=rec.on_event,
        backoff=fast_backoff,
        **kw,
    )


async def test_two_clients_exchange_packets() -> None:
    relay = FakeRelay()
    a_key, b_key = key(), key()
    ra, rb = Recorder(), Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        a = conn(relay, a_key, ra, preferred=True)
        b = conn(relay, b_key, rb)
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        with trio.fail_after(5):
            await a.wait_connected()
            await b.wait_connected()
            assert a.send_packet_nowait(pub(b_key), b"hello b")
            await rb.got.wait()
            await b.send_packet(pub(a_key), b"hello a" * 1000)
            await ra.got.wait()
            rtt = await a.ping()
        assert rb.packets == [(pub(a_key), b"hello b")]
        assert ra.packets == [(pub(b_key), b"hello a" * 1000)]
        assert rtt >= 0
        assert relay.preferred == {pub(a_key): True, pub(b_key): False}
        assert set(relay.logins) == {pub(a_key), pub(b_key)}
        assert isinstance(ra.events[0], dc.Connected) and ra.events[0].server_public == relay.public
        stats = a.statistics()
        assert stats["connected"] is True and stats["packets_out"] == 1 and stats["packets_in"] == 1
        nursery.cancel_scope.cancel()


async def test_peer_gone_event_and_set_preferred() -> None:
    relay = FakeRelay()
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        a = conn(relay, key(), rec)
        nursery.start_soon(a.run)
        with trio.fail_after(5):
            await a.wait_connected()
            a.send_packet_nowait(b"\x09" * 32, b"to nobody")
            while not any(isinstance(e, dc.PeerGone) for e in rec.events):
                await trio.sleep(0.01)
            a.set_preferred(True)
            while not relay.preferred.get(a.node_public):
                await trio.sleep(0.01)
        assert dc.PeerGone(b"\x09" * 32, 1) in rec.events
        nursery.cancel_scope.cancel()


async def test_malformed_frame_closes_only_that_connection_and_it_reconnects() -> None:
    relay = FakeRelay()
    bad_key, good_key = key(), key()
    sent_garbage: list[bytes] = []

    async def misbehave(stream: trio.SocketStream, who: bytes) -> None:
        if who == pub(bad_key) and not sent_garbage:
            sent_garbage.append(who)
            await stream.send_all(b"\x05" + struct.pack(">I", (1 << 20) + 1))  # oversized RecvPacket

    relay.after_login = misbehave
    rbad, rgood = Recorder(), Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        bad = conn(relay, bad_key, rbad)
        good = conn(relay, good_key, rgood)
        nursery.start_soon(good.run)
        with trio.fail_after(5):
            await good.wait_connected()
            nursery.start_soon(bad.run)
            while bad.statistics().get("connects", 0) < 2 or not bad.connected:
                await trio.sleep(0.01)
            # the good link never dropped and still relays to the reconnected one
            assert good.statistics()["connects"] == 1
            good.send_packet_nowait(pub(bad_key), b"still here")
            await rbad.got.wait()
        assert bad.statistics()["closed_protocol_error"] == 1
        assert any(isinstance(e, dc.Disconnected) and "exceeds" in e.reason for e in rbad.events)
        nursery.cancel_scope.cancel()


async def test_upgrade_refused_then_backoff_and_retry() -> None:
    relay = FakeRelay()
    relay.status_line = b"HTTP/1.1 401 Unauthorized"
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        a = conn(relay, key(), rec)
        nursery.start_soon(a.run)
        with trio.fail_after(5):
            while relay.connections < 3:
                await trio.sleep(0.01)
            assert "HTTP 401" in a.last_error
            assert not a.connected
            assert not a.send_packet_nowait(b"\x01" * 32, b"x")
            relay.status_line = b"HTTP/1.1 101 Switching Protocols"
            await a.wait_connected()
        stats = a.statistics()
        assert stats["closed_transport_error"] >= 2 and stats["send_dropped_not_connected"] == 1
        nursery.cancel_scope.cancel()


async def test_server_close_reconnects_and_close_stops_run() -> None:
    relay = FakeRelay()

    async def drop(stream: trio.SocketStream, who: bytes) -> None:
        if relay.connections == 1:
            await stream.aclose()

    relay.after_login = drop
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        a = conn(relay, key(), rec)
        done = trio.Event()

        async def runner() -> None:
            await a.run()
            done.set()

        nursery.start_soon(runner)
        with trio.fail_after(5):
            while a.statistics().get("connects", 0) < 2 or not a.connected:
                await trio.sleep(0.01)
            a.close()
            await done.wait()
        kinds = [type(e).__name__ for e in rec.events]
        assert kinds[:3] == ["Connected", "Disconnected", "Connected"]
        nursery.cancel_scope.cancel()


async def test_login_timeout_then_silence_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """Memory streams and a mock clock: a stalled login, then 130 s of silence, each end the link."""
    relay_private = PrivateKey.generate()
    opened: list[tuple[float, Any]] = []

    async def open_stream() -> trio.abc.Stream:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        await server_stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n")
        opened.append((trio.current_time(), server_stream))
        return client_stream

    rec = Recorder()
    a = DerpConnection(
        "http://derp.test/derp", key(), open_stream=open_stream, on_event=rec.on_event, backoff=lambda n: 1.0
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        await trio.sleep(dc.HANDSHAKE_TIMEOUT + 0.5)  # no ServerKey at all: login timeout
        assert len(opened) == 1 and "login did not finish" in a.last_error
        await trio.sleep(1.0)
        assert len(opened) == 2
        _, s = opened[1]
        await s.send_all(frames.build_server_key(bytes(relay_private.public_key)))
        from nacl.public import Box, PublicKey

        box = Box(relay_private, PublicKey(a.node_public))
        await s.send_all(frames.build_server_info(bytes(box.encrypt(b"{}", bytes(24)))))
        await trio.sleep(0.01)
        assert a.connected
        await trio.sleep(100)
        await s.send_all(frames.build_keep_alive())  # resets the 130 s window
        await trio.sleep(129)
        assert a.connected and len(opened) == 2
        await trio.sleep(2)
        assert not a.connected and "silent for 130 s" in a.last_error
        assert isinstance(rec.events[-1], dc.Disconnected)
        nursery.cancel_scope.cancel()


def _memory_link(backoff: float) -> tuple[DerpConnection, list[Any]]:
    """A DerpConnection whose every dial is a fresh memory stream, kept as (time, server end)."""
    streams: list[Any] = []

    async def open_stream() -> trio.abc.Stream:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        streams.append((trio.current_time(), server_stream))
        return client_stream

    return DerpConnection("http://derp.test/derp", key(), open_stream=open_stream,
                          backoff=lambda n: backoff), streams


async def _login(s: Any, relay_private: PrivateKey, a: DerpConnection) -> None:
    from nacl.public import Box, PublicKey

    await s.receive_some()  # the GET
    await s.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n"
                     + frames.build_server_key(bytes(relay_private.public_key)))
    await trio.sleep(0.1)
    box = Box(relay_private, PublicKey(a.node_public))
    await s.send_all(frames.build_server_info(bytes(box.encrypt(b"{}", bytes(24)))))
    await trio.sleep(0.1)


async def test_restarting_sets_reconnect_delay(autojump_clock: trio.testing.MockClock) -> None:
    relay_private = PrivateKey.generate()
    a, streams = _memory_link(backoff=50.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        await trio.sleep(0.1)
        t0, s = streams[0]
        await _login(s, relay_private, a)
        assert a.connected
        await s.send_all(frames.build_restarting(3000, 60000))
        await trio.sleep(0.1)
        await s.aclose()
        await trio.sleep(10)
        assert len(streams) == 2
        assert 3.0 <= streams[1][0] - (t0 + 0.4) <= 3.5  # 3 s + ≤10 % jitter, not the 50 s backoff
        nursery.cancel_scope.cancel()


async def test_a_link_that_was_up_is_redialled_at_once_then_backoff(autojump_clock: trio.testing.MockClock) -> None:
    relay_private = PrivateKey.generate()
    a, streams = _memory_link(backoff=50.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        await trio.sleep(0.1)
        await _login(streams[0][1], relay_private, a)
        assert a.connected
        await trio.sleep(30)  # a healthy link for a while, then the server drops it
        dropped_at = trio.current_time()
        await streams[0][1].aclose()
        await trio.sleep(1)
        assert len(streams) == 2 and streams[1][0] - dropped_at <= 0.06, "redialled within 50 ms, not after backoff"
        assert a.stats["fast_reconnects"] == 1
        # a link that breaks right after it came up gets the ordinary backoff
        await _login(streams[1][1], relay_private, a)
        await streams[1][1].aclose()
        await trio.sleep(10)
        assert len(streams) == 2
        await trio.sleep(50)
        assert len(streams) == 3
        nursery.cancel_scope.cancel()


def test_backoff_delay_grows_to_60() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff_delay(n, rng) for n in range(10)]
    for n, d in enumerate(delays):
        base = min(2**n, 60)
        assert base <= d <= base + 1


def test_derp_url_for_node() -> None:
    node = {"HostName": "10.213.5.1", "DERPPort": 8443, "IPv4": "10.213.5.1", "STUNPort": 3478}
    assert derp_url_for_node(node, "https://10.213.5.1:8443") == (
        "https://10.213.5.1:8443/derp",
        "10.213.5.1",
    )
    # no usable host: the login server's host and port
    assert derp_url_for_node({"HostName": "", "DERPPort": 0}, "https://hs.test:8443") == (
        "https://hs.test:8443/derp",
        None,
    )
    # the login server's host without a port: its port
    assert derp_url_for_node({"HostName": "hs.test"}, "https://hs.test:8443")[0] == "https://hs.test:8443/derp"
    # another host without a port: 443, as Tailscale does
    assert derp_url_for_node({"HostName": "derp.example"}, "https://hs.test:8443")[0] == "https://derp.example/derp"
    # plain http only for the login server's own listener when it is http
    assert derp_url_for_node({"HostName": "h", "DERPPort": 8080}, "http://h:8080")[0] == "http://h:8080/derp"
    assert derp_url_for_node({"HostName": "o", "DERPPort": 8080}, "http://h:8080")[0] == "https://o:8080/derp"
    # IPv4 "none" disables the family; IPv6 brackets
    assert derp_url_for_node({"HostName": "h", "IPv4": "none", "IPv6": "fd00::1"}, "https://h")[1] == "fd00::1"
    assert derp_url_for_node({"HostName": "fd00::2", "DERPPort": 8443}, "https://x")[0] == "https://[fd00::2]:8443/derp"

    class Node:  # attribute-style (cattrs) objects work too
        HostName = "a.b"
        DERPPort = 443
        IPv4 = ""
        IPv6 = None

    assert derp_url_for_node(Node(), "https://a.b") == ("https://a.b/derp", None)
    with pytest.raises(ConfigError):
        derp_url_for_node(node, "ftp://x")


def test_constructor_forms() -> None:
    c = DerpConnection(("10.0.0.1", 8443, True, "10.0.0.1"), key())
    assert c.url == "https://10.0.0.1:8443/derp" and c.connect_ip == "10.0.0.1" and c.tls
    w = DerpConnection("wss://h.test/derp", key())
    assert w.transport == "websocket" and w.port == 443
    with pytest.raises(ConfigError):
        DerpConnection("https://h/derp", key(), transport="carrier-pigeon")
    with pytest.raises(ConfigError):
        DerpConnection("https://h/derp", b"short")


async def test_websocket_transport_subprotocol_and_binary_messages() -> None:
    """A trio-websocket server speaking DERP in binary messages, one byte per message at first."""
    from trio_websocket import serve_websocket

    from tests.unit.derp.fakeserver import FakeServer

    server = FakeServer()
    seen_subprotocols: list[Any] = []
    sizes: list[int] = []

    async def handler(request: Any) -> None:
        seen_subprotocols.append(request.proposed_subprotocols)
        ws = await request.accept(subprotocol="derp")
        hello = server.hello()
        for i in range(len(hello)):  # split the ServerKey frame across messages
            await ws.send_message(hello[i : i + 1])
        while True:
            message = await ws.get_message()
            sizes.append(len(message))
            reply = server.feed(message)
            if reply:
                await ws.send_message(reply + frames.build_recv_packet(b"\x07" * 32, b"over ws"))

    rec = Recorder()
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        port = ws_server.port
        a = DerpConnection(
            f"http://127.0.0.1:{port}/derp",
            key(),
            transport="websocket",
            on_packet=rec.on_packet,
            backoff=fast_backoff,
        )
        nursery.start_soon(a.run)
        with trio.fail_after(5):
            await rec.got.wait()
            a.send_packet_nowait(b"\x08" * 32, b"back")
            a.send_packet_nowait(b"\x08" * 32, bytes(65536))
            while len([r for r in server.received if r[0] == frames.FrameType.SEND_PACKET]) < 2:
                await trio.sleep(0.01)
        assert seen_subprotocols == [("derp",)] or seen_subprotocols == [["derp"]]
        assert rec.packets == [(b"\x07" * 32, b"over ws")]
        sends = [r for r in server.received if r[0] == frames.FrameType.SEND_PACKET]
        assert sends == [
            (frames.FrameType.SEND_PACKET, b"\x08" * 32 + b"back"),
            (frames.FrameType.SEND_PACKET, b"\x08" * 32 + bytes(65536)),
        ]
        assert max(sizes) <= 32768  # Headscale's websocket read limit
        nursery.cancel_scope.cancel()


async def test_upgrade_response_split_anywhere_keeps_following_frames(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The 101 head arrives byte by byte and the ServerKey + ServerInfo ride in its last segment."""
    from tests.unit.derp.fakeserver import FakeServer

    server = FakeServer()
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nDerp-Version: 2\r\nDerp-Public-Key: x\r\n\r\n"
    rec = Recorder()

    async def open_stream() -> trio.abc.Stream:
        client_stream, server_stream = trio.testing.memory_stream_pair()

        async def serve() -> None:
            request = await server_stream.receive_some()
            assert request.startswith(b"GET /derp HTTP/1.1\r\nHost: derp.test\r\n")
            for i in range(len(head) - 1):
                await server_stream.send_all(head[i : i + 1])
                await trio.sleep(0.001)
            await server_stream.send_all(head[-1:] + server.hello())
            while True:
                reply = server.feed(await server_stream.receive_some())
                if reply:
                    await server_stream.send_all(reply + frames.build_recv_packet(b"\x05" * 32, b"first"))

        nursery.start_soon(serve)
        return client_stream

    async with trio.open_nursery() as nursery:
        a = DerpConnection("http://derp.test/derp", key(), open_stream=open_stream, on_packet=rec.on_packet)
        nursery.start_soon(a.run)
        with trio.fail_after(5):
            await rec.got.wait()
        assert rec.packets == [(b"\x05" * 32, b"first")]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (b"HTTP/1.1 426 Upgrade Required\r\n\r\nDERP requires connection upgrade", "HTTP 426"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "Upgrade: 'websocket'"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "bad HTTP status line"),
    ],
)
async def test_upgrade_refusals(autojump_clock: trio.testing.MockClock, head: bytes, error: str) -> None:
    async def open_stream() -> trio.abc.Stream:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        await server_stream.send_all(head)
        return client_stream

    a = DerpConnection("http://derp.test/derp", key(), open_stream=open_stream, backoff=lambda n: 100.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        await trio.sleep(1)
        assert error in a.last_error and not a.connected
        nursery.cancel_scope.cancel()


@given(st.binary(max_size=300))
def test_upgrade_head_parser_garbage(head: bytes) -> None:
    from trionet.errors import RemoteProtocolError
    from trionet.http1 import parse_response_head

    try:
        status, headers = parse_response_head(head)
    except RemoteProtocolError:
        return
    assert 0 <= status <= 999 and all(name == name.lower() for name in headers)


async def test_callbacks_that_raise_are_counted_and_the_link_stays_up() -> None:
    """A bug met by one packet (on_packet, on_batch_end) costs that packet, not the DERP link."""
    relay = FakeRelay()
    a_key, b_key = key(), key()
    rb = Recorder()
    delivered: list[bytes] = []

    def on_packet(src: bytes, data: bytes) -> None:
        if data.startswith(b"boom"):
            raise KeyError("a bug met by one packet")
        delivered.append(data)
        rb.got.set()

    def on_batch_end() -> None:
        raise ValueError("a bug at the end of a read")

    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        a = conn(relay, a_key, Recorder())
        b = DerpConnection(f"http://127.0.0.1:{relay.port}/derp", b_key, on_packet=on_packet,
                           on_event=rb.on_event, backoff=fast_backoff, on_batch_end=on_batch_end)
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        with trio.fail_after(5):
            await a.wait_connected()
            await b.wait_connected()
            for i in range(20):
                await a.send_packet(pub(b_key), (b"boom" if i % 2 else b"fine") + bytes([i]))
            while len(delivered) < 10:
                await trio.sleep(0.01)
        stats = b.statistics()
        assert stats["internal_error.packet"] == 10
        assert stats["internal_error.batch_end"] >= 1
        assert stats["connects"] == 1, "the link never dropped"
        nursery.cancel_scope.cancel()


async def test_a_parser_bug_ends_only_that_link_as_a_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception the frame parser was never meant to raise does not escape `run`:
    the link is treated as broken by its server and redialled."""
    relay = FakeRelay()
    rec = Recorder()
    calls: list[int] = []
    real = dc.DerpClient.receive_data

    def flaky(self: dc.DerpClient, data: bytes, now: float) -> Any:
        if b"trigger" in data and not calls:  # the read that carries the packet below, once
            calls.append(1)
            raise IndexError("parser bug")
        return real(self, data, now)

    monkeypatch.setattr(dc.DerpClient, "receive_data", flaky)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        a = conn(relay, key(), rec)
        other = conn(relay, key(), Recorder())
        nursery.start_soon(a.run)
        nursery.start_soon(other.run)
        with trio.fail_after(5):
            await a.wait_connected()
            await other.wait_connected()
            other.send_packet_nowait(a.node_public, b"trigger")
            while a.statistics().get("connects", 0) < 2:
                await trio.sleep(0.01)
        stats = a.statistics()
        assert stats["internal_error.frames"] == 1
        assert stats["closed_protocol_error"] == 1
        nursery.cancel_scope.cancel()
