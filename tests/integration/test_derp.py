"""trionet's DERP client and STUN against Headscale's real embedded DERP server.

Each Headscale version gets a private stack (this module restarts Headscale),
with two registered node keys as DERP identities (tests/integration/derp_helpers.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from nacl.public import PrivateKey

from tests.integration.derp_helpers import DerpStack, derp_stack_for
from tests.realstack import HEADSCALE_VERSIONS, STUN_PORT
from trionet.derp import client as dc
from trionet.derp.driver import DerpConnection
from trionet.magicsock import disco, stun

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=HEADSCALE_VERSIONS, ids=lambda v: f"hs{v}")
def derp_stack(request: pytest.FixtureRequest) -> Iterator[DerpStack]:
    with derp_stack_for(request.param, ("dk1", "dk2")) as stack:
        yield stack


class Inbox:
    def __init__(self) -> None:
        self.packets: list[tuple[bytes, bytes]] = []
        self.events: list[Any] = []
        self._arrived = trio.Event()

    def on_packet(self, src: bytes, data: bytes) -> None:
        self.packets.append((src, data))
        self._arrived.set()
        self._arrived = trio.Event()

    def on_event(self, ev: Any) -> None:
        self.events.append(ev)

    async def wait_for(self, n: int) -> None:
        while len(self.packets) < n:
            await self._arrived.wait()


def pub(private: bytes) -> bytes:
    return bytes(PrivateKey(private).public_key)


def _transports() -> list[Any]:
    return [pytest.param("http", id="http-upgrade"), pytest.param("websocket", id="websocket")]


@pytest.mark.parametrize("transport", _transports())
async def test_two_clients_exchange_packets(derp_stack: DerpStack, transport: str) -> None:
    if transport == "websocket" and not derp_stack.at_least_024:
        await _websocket_refused_by_023(derp_stack)  # a fact of 0.23, tested rather than skipped
        return
    k1, k2 = derp_stack.keys
    in1, in2 = Inbox(), Inbox()
    a = derp_stack.connection(k1, transport, preferred=True, on_packet=in1.on_packet, on_event=in1.on_event)
    b = derp_stack.connection(k2, transport, on_packet=in2.on_packet, on_event=in2.on_event)
    big = bytes(range(256)) * 256  # 64 KiB: the largest packet DERP carries
    wire_disco = disco.DiscoBox(bytes(PrivateKey.generate()), pub(k2)).seal(None, disco.Ping(b"t" * 12, pub(k1)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        with trio.fail_after(20):
            await a.wait_connected()
            await b.wait_connected()
            # in windows: derpserver queues at most 32 packets per receiving client and drops the rest
            for window in range(0, 100, 10):
                for i in range(window, window + 10):
                    assert a.send_packet_nowait(pub(k2), b"a->b %d" % i)
                await in2.wait_for(window + 10)
            await b.send_packet(pub(k1), big)
            await b.send_packet(pub(k1), wire_disco)
            await in1.wait_for(2)
            rtt = await a.ping()
        assert in2.packets == [(pub(k1), b"a->b %d" % i) for i in range(100)]
        assert in1.packets == [(pub(k2), big), (pub(k2), wire_disco)]
        assert 0 <= rtt < 1.0
        assert isinstance(in1.events[0], dc.Connected)
        stats = a.statistics()
        assert stats["packets_out"] == 100 and stats["pongs_in"] == 1 and stats.get("unknown_frames", 0) == 0
        nursery.cancel_scope.cancel()


async def _websocket_refused_by_023(derp_stack: DerpStack) -> None:
    """Headscale 0.23 has no serveWebsocket: it answers the upgrade with raw DERP. We fail cleanly."""
    a = derp_stack.connection(derp_stack.keys[0], "websocket")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        with trio.fail_after(20):
            while a.statistics().get("closed_transport_error", 0) < 2:
                await trio.sleep(0.05)
        assert not a.connected
        nursery.cancel_scope.cancel()


async def test_peer_gone_for_disco_to_absent_peer(derp_stack: DerpStack) -> None:
    inbox = Inbox()
    a = derp_stack.connection(derp_stack.keys[0], on_event=inbox.on_event)
    absent = pub(bytes(PrivateKey.generate()))
    wire = disco.DiscoBox(bytes(PrivateKey.generate()), absent).seal(
        None, disco.Ping(b"x" * 12, pub(derp_stack.keys[0]))
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        with trio.fail_after(20):
            await a.wait_connected()
            a.send_packet_nowait(absent, wire)  # derpserver answers PeerGone(NotHere) for disco only
            while not any(isinstance(e, dc.PeerGone) for e in inbox.events):
                await trio.sleep(0.05)
        gone = next(e for e in inbox.events if isinstance(e, dc.PeerGone))
        assert gone.peer == absent and gone.reason == 1
        nursery.cancel_scope.cancel()


async def test_unregistered_key_and_verify_clients(derp_stack: DerpStack) -> None:
    """0.29 (verify_clients: true) drops an unregistered node key after ClientInfo; 0.23 admits it."""
    stranger = derp_stack.connection(bytes(PrivateKey.generate()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stranger.run)
        with trio.fail_after(20):
            if derp_stack.verifies_clients:
                while stranger.statistics().get("closed_transport_error", 0) < 2:
                    await trio.sleep(0.05)
                assert stranger.statistics().get("connects", 0) == 0
                assert "closed the connection" in stranger.last_error
            else:
                await stranger.wait_connected()
        nursery.cancel_scope.cancel()


async def test_stun_binding_returns_our_mapped_address(derp_stack: DerpStack) -> None:
    stack = derp_stack.stack
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((stack.local_ip, 0))
        txid = stun.new_txid()
        request = stun.binding_request(txid)
        with trio.fail_after(10):
            while True:  # UDP: resend until answered
                await sock.sendto(request, (stack.hs_host.ip, STUN_PORT))
                with trio.move_on_after(0.5):
                    data, src = await sock.recvfrom(2048)
                    break
        assert stun.is_stun(data) and not disco.looks_like_disco(data)
        got_txid, mapped = stun.parse_response(data)
        assert got_txid == txid
        assert mapped == sock.getsockname()
        assert src == (stack.hs_host.ip, STUN_PORT)


@pytest.mark.parametrize("transport", _transports())
async def test_reconnects_after_headscale_restart(derp_stack: DerpStack, transport: str) -> None:
    """Kill Headscale under a live link: Disconnected, backoff retries while it is down, then Connected."""
    if transport == "websocket" and not derp_stack.at_least_024:
        transport = "http"  # 0.23 has no WebSocket DERP (see _websocket_refused_by_023)
    inbox = Inbox()
    k1, k2 = derp_stack.keys
    a = derp_stack.connection(k1, transport, on_event=inbox.on_event)
    peer_inbox = Inbox()
    b = derp_stack.connection(k2, transport, on_packet=peer_inbox.on_packet)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        with trio.fail_after(20):
            await a.wait_connected()
            await b.wait_connected()
        await trio.to_thread.run_sync(derp_stack.stack.restart_headscale, 3.0)
        with trio.fail_after(60):
            while a.statistics().get("connects", 0) < 2 or not a.connected:
                await trio.sleep(0.1)
            await b.wait_connected()
            while b.statistics().get("connects", 0) < 2:
                await trio.sleep(0.1)
            a.send_packet_nowait(pub(k2), b"after restart")
            await peer_inbox.wait_for(1)
        kinds = [type(e).__name__ for e in inbox.events]
        assert kinds[0] == "Connected" and "Disconnected" in kinds and kinds[-1] == "Connected"
        stats = a.statistics()
        assert stats["connect_attempts"] >= 3  # at least one refused attempt while Headscale was down
        assert peer_inbox.packets == [(pub(k1), b"after restart")]
        nursery.cancel_scope.cancel()


@pytest.mark.soak
async def test_real_server_keepalive_interval(derp_stack: DerpStack) -> None:
    """Headscale's DERP sends KeepAlive every 60 s + 0-5 s jitter; our 130 s deadline covers two."""
    a = derp_stack.connection(derp_stack.keys[0])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        with trio.fail_after(20):
            await a.wait_connected()
        start = trio.current_time()
        with trio.fail_after(dc.KEEPALIVE_INTERVAL + dc.KEEPALIVE_JITTER + 5):
            while a.statistics().get("keepalives_in", 0) < 1:
                await trio.sleep(0.5)
        waited = trio.current_time() - start
        assert dc.KEEPALIVE_INTERVAL - 1 <= waited <= dc.KEEPALIVE_INTERVAL + dc.KEEPALIVE_JITTER + 1
        assert a.statistics()["connects"] == 1
        nursery.cancel_scope.cancel()


async def test_tls_is_verified(derp_stack: DerpStack) -> None:
    """Without the stack's CA (system store only) the certificate is refused and we keep retrying."""
    url, ip = derp_stack.derp_url()
    a = DerpConnection(url, derp_stack.keys[0], connect_ip=ip, backoff=lambda n: 0.1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        with trio.fail_after(20):
            while a.statistics().get("closed_transport_error", 0) < 2:
                await trio.sleep(0.05)
        assert not a.connected and "CERTIFICATE_VERIFY_FAILED" in a.last_error
        nursery.cancel_scope.cancel()
