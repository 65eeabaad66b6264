"""The TCP stream objects against trio's generic stream checks."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio
import trio.testing

from trionet.netstack import NetStack, TcpStream

from .simlink import B4, linked_stacks


async def test_check_half_closeable_stream() -> None:
    async with AsyncExitStack() as exits:
        a, b = await exits.enter_async_context(linked_stacks())
        ports = iter(range(1000, 2000))

        async def maker() -> tuple[TcpStream, TcpStream]:
            return await _pair(a, b, next(ports))

        with trio.fail_after(20):
            await trio.testing.check_half_closeable_stream(maker, None)


async def _pair(a: NetStack, b: NetStack, port: int) -> tuple[TcpStream, TcpStream]:
    lst = b.listen_tcp(port)
    client = await a.open_tcp_stream(B4, port)
    server = await lst.accept()
    await lst.aclose()
    return client, server


async def test_serve_listeners() -> None:
    async with linked_stacks() as (a, b):
        lst = b.listen_tcp(7)

        async def echo(s: trio.abc.Stream) -> None:
            async with s:
                while data := await s.receive_some():
                    await s.send_all(data)

        async with trio.open_nursery() as n:
            await n.start(trio.serve_listeners, echo, [lst])
            s = await a.open_tcp_stream(B4, 7)
            await s.send_all(b"hello")
            assert await s.receive_some() == b"hello"
            await s.aclose()
            n.cancel_scope.cancel()


async def test_send_backpressure_bounded_buffers() -> None:
    from trionet.netstack import TcpConfig
    cfg = TcpConfig(send_buffer=64 * 1024, recv_buffer=64 * 1024)
    async with linked_stacks(config=cfg) as (a, b):
        client, server = await _pair(a, b, 9)
        with trio.move_on_after(1) as cs:
            await client.send_all(b"x" * 10_000_000)  # nobody reads: must block
        assert cs.cancelled_caught
        conn = client.connection
        assert len(conn.sbuf) <= 64 * 1024
        assert len(server.connection.rbuf) <= 64 * 1024
