"""`Node.forward`: a local address whose connections reach a tailnet host and port."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.unit.library.tailnet import ECHO, REFUSED, RESETS, fds, linked_node
from trionet.errors import TransportError, TrionetError
from trionet.node import Node


async def recv_all(stream: trio.abc.Stream) -> bytes:
    out = b""
    while chunk := await stream.receive_some(65536):
        out += chunk
    return out


async def eventually(cond: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    with trio.move_on_after(limit):
        while not cond():
            await trio.sleep(0.005)
    assert cond(), what


async def test_forward_relays_both_ways_and_passes_half_close(tmp_path: Path) -> None:
    async with linked_node(tmp_path) as node:
        forward = await node.forward("peer", ECHO)
        host, port = forward
        assert (host, port) == forward.address and host == "127.0.0.1" and port > 0
        assert forward.target == ("peer", ECHO)
        client = await trio.open_tcp_stream(host, port)
        await client.send_all(b"hello ")
        await client.send_all(b"world")
        await client.send_eof()  # the peer answers everything, then half-closes too
        assert await recv_all(client) == b"HELLO WORLD"
        await client.aclose()
        await eventually(lambda: node.statistics()["attached"][forward.name]["completed"] == 1, "not completed")
        assert forward.name == f"forward 127.0.0.1:{port}->peer:{ECHO}"


async def test_forward_refused_target_reaches_the_client_as_a_reset(tmp_path: Path) -> None:
    async with linked_node(tmp_path) as node:
        host, port = await node.forward("peer", REFUSED)
        client = await trio.open_tcp_stream(host, port)
        with pytest.raises(trio.BrokenResourceError) as caught:
            await recv_all(client)
        assert isinstance(caught.value.__cause__, ConnectionResetError)
        name = f"forward {host}:{port}->peer:{REFUSED}"
        await eventually(lambda: node.statistics()["attached"][name]["failed"] == {"connect_refused": 1},
                         "counted as refused")


async def test_forward_peer_reset_reaches_the_client_as_a_reset(tmp_path: Path) -> None:
    async with linked_node(tmp_path) as node:
        client = await trio.open_tcp_stream(*await node.forward("peer", RESETS))
        await client.send_all(b"anything")
        with pytest.raises(trio.BrokenResourceError) as caught:
            await recv_all(client)
        assert isinstance(caught.value.__cause__, ConnectionResetError)


async def test_forward_aclose_stops_listening_and_detaches_its_counters(tmp_path: Path) -> None:
    before = fds()
    async with linked_node(tmp_path) as node:
        async with await node.forward("peer", ECHO) as forward:
            assert forward.name in node.statistics()["attached"]
            client = await trio.open_tcp_stream(*forward)
            await client.send_all(b"x")
            assert await client.receive_some(10) == b"X"
        assert forward.closed
        assert forward.name not in node.statistics()["attached"]
        assert await recv_all(client) == b""  # the relayed connection closed with the listener
        await client.aclose()
        with pytest.raises(OSError):
            await trio.open_tcp_stream(*forward)
        await eventually(lambda: node.tcp_connections() == 0, "the tailnet connection was released")
    assert fds() <= before


async def test_forward_ends_with_the_node(tmp_path: Path) -> None:
    before = fds()
    async with linked_node(tmp_path) as node:
        forward = await node.forward("peer", ECHO)
        client = await trio.open_tcp_stream(*forward)
        await client.send_all(b"x")
        assert await client.receive_some(10) == b"X"
    assert forward.closed
    with pytest.raises(OSError):
        await trio.open_tcp_stream(*forward)
    await client.aclose()
    assert fds() <= before


async def test_forward_on_a_node_that_is_not_running_raises_transport_error(tmp_path: Path) -> None:
    node = Node(login_server="https://control.invalid", state_dir=tmp_path)
    with pytest.raises(TransportError, match="not running"):
        await node.forward("peer", ECHO)


async def test_forward_to_a_port_in_use_raises_one_trionet_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        async with linked_node(tmp_path) as node:
            with pytest.raises(TrionetError, match=r"cannot listen on 127\.0\.0\.1"):
                await node.forward("peer", ECHO, local_port=taken.getsockname()[1])
            assert not [name for name in node.statistics()["attached"] if name.startswith("forward")]
