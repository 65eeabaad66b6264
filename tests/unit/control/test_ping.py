"""Answering MapResponse.PingRequest (Headscale 0.29's HA health probe) as tailscaled does."""

from __future__ import annotations

import json
import struct
from functools import partial
from types import SimpleNamespace
from typing import Any

import trio

from trionet.control import ping
from trionet.control.client import ControlConnection


def test_each_new_url_is_answered_once_and_other_types_not() -> None:
    answerer = ping.PingAnswerer()
    url = "https://hs.test:8443/machine/ping-response?id=0123456789abcdef"
    assert answerer.decide({"URL": url}) == "head"
    assert answerer.decide({"URL": url}) is None  # the same URL again: tailscaled's isUniquePingRequest
    assert answerer.decide({"URL": url + "0", "URLIsNoise": True}) == "noise"
    assert answerer.decide({"URL": url + "1", "Types": "disco"}) is None
    assert answerer.decide({"URL": ""}) is None
    assert answerer.decide({"URL": "file:///etc/passwd"}) is None
    assert answerer.decide("garbage") is None
    assert answerer.stats == {"ping_repeat": 1, "ping_unsupported_type": 1, "ping_bad": 3}


def test_answers_in_flight_are_bounded() -> None:
    answerer = ping.PingAnswerer()
    answerer.in_flight = ping.MAX_IN_FLIGHT
    assert answerer.decide({"URL": "https://hs.test/machine/ping-response?id=x"}) is None
    assert answerer.stats["ping_dropped_busy"] == 1


async def test_head_ping_sends_head_to_the_url() -> None:
    seen: list[bytes] = []

    async def server(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        seen.append(data)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        answerer = ping.PingAnswerer()
        url = f"http://127.0.0.1:{port}/machine/ping-response?id=abc"
        await ping.answer(answerer, answerer.decide({"URL": url}) or "", url, None)
        nursery.cancel_scope.cancel()
    assert seen[0].startswith(b"HEAD /machine/ping-response?id=abc HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}".encode() in seen[0]
    assert answerer.stats["ping_answered"] == 1 and answerer.in_flight == 0


async def test_a_failed_answer_is_counted_not_raised() -> None:
    answerer = ping.PingAnswerer()
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await ping.answer(answerer, "head", f"http://127.0.0.1:{port}/machine/ping-response?id=x", None)
    assert answerer.stats["ping_failed"] == 1 and answerer.in_flight == 0


class _FakeH2:
    """One map stream request: yields the given map messages, then ends."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages

    def request(self, method: str, path: str, body: bytes) -> Any:
        messages = self.messages

        class _Cm:
            async def __aenter__(self) -> Any:
                send, recv = trio.open_memory_channel[Any](100)
                send.send_nowait(("status", 200))
                for msg in messages:
                    raw = json.dumps(msg).encode()
                    send.send_nowait(("data", struct.pack("<I", len(raw)) + raw))
                send.send_nowait(("end", None))
                return recv

            async def __aexit__(self, *exc: object) -> None:
                return None

        return _Cm()


async def test_map_stream_hands_ping_requests_over_even_in_keepalives() -> None:
    from trionet import keys

    state = SimpleNamespace(node_public=keys.public_of(keys.new_private()),
                            disco_public=keys.public_of(keys.new_private()))
    config = SimpleNamespace(hostname="me", advertise_tags=("tag:a",))
    url = "https://hs.test/machine/ping-response?id=1"
    conn = ControlConnection(config, state, _FakeH2([{"KeepAlive": True, "PingRequest": {"URL": url}}]))  # type: ignore[arg-type]
    got: list[Any] = []
    conn.on_ping_request = got.append
    magic = SimpleNamespace(endpoints=lambda: [], endpoint_types=lambda: [], home_region=0)
    try:
        async for _ in conn.map_updates(magic):
            pass
    except Exception as exc:  # the stream's end
        assert "ended" in str(exc)
    assert got == [{"URL": url}]
    assert conn.hostinfo()["RequestTags"] == ["tag:a"]  # --advertise-tags, as tailscaled sends them
