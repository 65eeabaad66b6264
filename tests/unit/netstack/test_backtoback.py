"""Two of our stacks talking through a simulated link."""

from __future__ import annotations

import hashlib

import pytest
import trio
import trio.testing

from trionet.netstack import TcpConfig

from .simlink import A4, A6, B4, B6, Pipe, linked_stacks


async def _transfer(size: int, ab: Pipe | None = None, ba: Pipe | None = None,
                    v6: bool = False, config: TcpConfig | None = None) -> None:
    data = (hashlib.sha256(b"x").digest() * (size // 32 + 1))[:size]
    got = bytearray()
    async with linked_stacks(ab, ba, config) as (a, b):
        lst = b.listen_tcp(80)

        async def server() -> None:
            s = await lst.accept()
            while True:
                chunk = await s.receive_some()
                if not chunk:
                    break
                got.extend(chunk)
            await s.aclose()

        async with trio.open_nursery() as n:
            n.start_soon(server)
            s = await a.open_tcp_stream(B6 if v6 else B4, 80)
            await s.send_all(data)
            await s.send_eof()
            assert await s.receive_some() == b""
            await s.aclose()
    assert len(got) == size
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


async def test_transfer_clean() -> None:
    await _transfer(2_000_000)


async def test_transfer_v6() -> None:
    await _transfer(500_000, v6=True)


async def test_transfer_lossy_reordering(autojump_clock: trio.testing.MockClock) -> None:
    await _transfer(300_000, Pipe(loss=0.05, reorder=0.1, delay=0.01, seed=3),
                    Pipe(loss=0.05, reorder=0.1, delay=0.01, seed=4))


async def test_transfer_small_buffers_zero_window() -> None:
    cfg = TcpConfig(recv_buffer=8192, send_buffer=8192)
    await _transfer(200_000, config=cfg)


async def test_ping_both_versions() -> None:
    async with linked_stacks() as (a, b):
        assert await a.ping(B4) >= 0
        assert await b.ping(A6) >= 0


async def test_udp_both_ways() -> None:
    async with linked_stacks() as (a, b):
        ea = a.udp_bind(5000)
        eb = b.udp_bind(6000)
        await ea.send(b"hello", (B4, 6000))
        data, (ip, port) = await eb.receive()
        assert (data, ip, port) == (b"hello", A4, 5000)
        await eb.send(b"back", (A4, 5000))
        assert (await ea.receive())[0] == b"back"
        await ea.send(b"six", (B6, 6000))
        assert (await eb.receive())[0] == b"six"


async def test_connection_refused() -> None:
    from trionet.errors import TransportError
    async with linked_stacks() as (a, _b):
        with pytest.raises(TransportError):
            await a.open_tcp_stream(B4, 81)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_abort_resets_the_peer_and_leaves_no_time_wait() -> None:
    async with linked_stacks() as (a, b):
        async with b.listen_tcp(80) as listener:
            ours = await a.open_tcp_stream(B4, 80)
            theirs = await listener.accept()
            await ours.send_all(b"x")
            assert await theirs.receive_some(10) == b"x"
            await ours.abort("test")
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                await theirs.receive_some(10)  # RST: not an orderly EOF
            assert a.statistics()["tcp_connections"] == 0  # gone at once, no TIME_WAIT
            await theirs.aclose()
