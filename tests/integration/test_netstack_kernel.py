"""Our NetStack against a real peer: the Linux kernel, through a TUN device.

Each test builds its own network namespace (removed afterwards) whose kernel
side owns 10.252.N.1 / fd00:252:N::1; our stack is .2 / ::2. Needs root.
Normal runs move 20 MB (10 MB on impaired paths); ``-m soak`` moves 100 MB.
"""

from __future__ import annotations

import hashlib
import subprocess

import pytest
import trio

from trionet.netstack import NetStack

from .netstack_env import BLOCK, Env, netns_tun, pattern_sha, read_line

pytestmark = [pytest.mark.integration, pytest.mark.netns]

MB = 1_000_000


async def _recv_all(stream: trio.abc.ReceiveStream) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while True:
        d = await stream.receive_some(1 << 20)
        if not d:
            return n, h.hexdigest()
        h.update(d)
        n += len(d)


async def _send_pattern(stream: trio.abc.HalfCloseableStream, n: int) -> None:
    view = memoryview(BLOCK)
    left = n
    while left:
        k = min(left, len(view))
        await stream.send_all(view[:k])
        left -= k
    await stream.send_eof()


async def _peer_result(proc: trio.Process) -> tuple[int, str]:
    line = await read_line(proc)
    await proc.wait()
    assert proc.returncode == 0, line
    n, digest, _cpu = line.split()
    return int(n), digest


async def kernel_to_us(env: Env, size: int, v6: bool, we_connect: bool) -> None:
    stack = env.stack
    assert stack is not None
    kernel = env.kernel6 if v6 else env.kernel4
    ours = env.ours6 if v6 else env.ours4
    if we_connect:
        proc = await env.start_peer("server-send", "5001", str(size), *(["6"] if v6 else []))
        stream = await stack.open_tcp_stream(kernel, 5001)
    else:
        lst = stack.listen_tcp(5002)
        proc = await env.start_peer("client-send", str(ours), "5002", str(size))
        stream = await lst.accept()
        await lst.aclose()
    got = await _recv_all(stream)
    await stream.aclose()
    sent = await _peer_result(proc)
    assert got == sent == (size, pattern_sha(size))


async def us_to_kernel(env: Env, size: int, v6: bool, we_connect: bool) -> None:
    stack = env.stack
    assert stack is not None
    kernel = env.kernel6 if v6 else env.kernel4
    ours = env.ours6 if v6 else env.ours4
    if we_connect:
        proc = await env.start_peer("server-recv", "5003", *(["6"] if v6 else []))
        stream = await stack.open_tcp_stream(kernel, 5003)
    else:
        lst = stack.listen_tcp(5004)
        proc = await env.start_peer("client-recv", str(ours), "5004")
        stream = await lst.accept()
        await lst.aclose()
    await _send_pattern(stream, size)
    got = await _peer_result(proc)
    assert await stream.receive_some() == b""
    await stream.aclose()
    assert got == (size, pattern_sha(size))


DIRECTIONS = [kernel_to_us, us_to_kernel]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("we_connect", [True, False], ids=["we-connect", "kernel-connects"])
@pytest.mark.parametrize("direction", DIRECTIONS, ids=["kernel-to-us", "us-to-kernel"])
async def test_tcp_transfer(direction: object, we_connect: bool, v6: bool) -> None:
    async with netns_tun() as env:
        with trio.fail_after(120):
            await direction(env, 20 * MB, v6, we_connect)  # type: ignore[operator]


@pytest.mark.soak
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("we_connect", [True, False], ids=["we-connect", "kernel-connects"])
@pytest.mark.parametrize("direction", DIRECTIONS, ids=["kernel-to-us", "us-to-kernel"])
async def test_tcp_transfer_100mb(direction: object, we_connect: bool, v6: bool) -> None:
    async with netns_tun() as env:
        with trio.fail_after(600):
            await direction(env, 100 * MB, v6, we_connect)  # type: ignore[operator]


@pytest.mark.parametrize("loss", [1, 5])
@pytest.mark.parametrize("direction", DIRECTIONS, ids=["kernel-to-us", "us-to-kernel"])
async def test_tcp_transfer_lossy(direction: object, loss: int) -> None:
    async with netns_tun() as env:
        env.set_loss(loss)
        with trio.fail_after(300):
            await direction(env, 10 * MB, False, True)  # type: ignore[operator]
        assert env.stack is not None


@pytest.mark.soak
@pytest.mark.parametrize("loss", [1, 5])
@pytest.mark.parametrize("direction", DIRECTIONS, ids=["kernel-to-us", "us-to-kernel"])
async def test_tcp_transfer_lossy_100mb(direction: object, loss: int) -> None:
    async with netns_tun() as env:
        env.set_loss(loss)
        with trio.fail_after(1200):
            await direction(env, 100 * MB, False, True)  # type: ignore[operator]


@pytest.mark.parametrize("direction", DIRECTIONS, ids=["kernel-to-us", "us-to-kernel"])
async def test_tcp_transfer_delay_reorder(direction: object) -> None:
    async with netns_tun(delay=0.020, reorder=0.02) as env:
        with trio.fail_after(300):
            await direction(env, 10 * MB, False, True)  # type: ignore[operator]
        assert env.delay_line is not None and env.delay_line.reordered > 0


@pytest.mark.soak
@pytest.mark.parametrize("direction", DIRECTIONS, ids=["kernel-to-us", "us-to-kernel"])
async def test_tcp_transfer_delay_reorder_100mb(direction: object) -> None:
    async with netns_tun(delay=0.020, reorder=0.02) as env:
        with trio.fail_after(1200):
            await direction(env, 100 * MB, False, True)  # type: ignore[operator]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
async def test_kernel_ping_is_answered(v6: bool) -> None:
    async with netns_tun() as env:
        target = str(env.ours6 if v6 else env.ours4)
        cmd = env.nsexec("ping", *(["-6"] if v6 else []), "-c", "3", "-i", "0.2", "-W", "2",
                         target)
        res = await trio.run_process(cmd, capture_stdout=True, check=False)
        assert res.returncode == 0, res.stdout.decode()
        assert b"3 received" in res.stdout
        assert env.stack is not None
        assert env.stack.statistics()["icmp_echo_replied"] >= 3
        # and we ping the kernel
        assert await env.stack.ping(env.kernel6 if v6 else env.kernel4, timeout=3) < 3


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
async def test_udp_both_ways(v6: bool) -> None:
    async with netns_tun() as env:
        stack: NetStack | None = env.stack
        assert stack is not None
        kernel = env.kernel6 if v6 else env.kernel4
        ours = env.ours6 if v6 else env.ours4
        proc = await env.start_peer("udp-echo", "7000", *(["6"] if v6 else []))
        ep = stack.udp_bind(7001)
        with trio.fail_after(10):
            await ep.send(b"ping", (kernel, 7000))
            data, (ip, port) = await ep.receive()
            assert (data, ip, port) == (b"echo:ping", kernel, 7000)
            # kernel -> us, unsolicited
            res = await trio.run_process(
                env.nsexec("python3", "-c",
                           "import socket,sys; s=socket.socket(socket.AF_INET6 if ':' in "
                           "sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM); "
                           "s.sendto(b'hi', (sys.argv[1], 7001))", str(ours)),
                check=False, capture_stdout=True)
            assert res.returncode == 0
            data, (ip, _p) = await ep.receive()
            assert (data, ip) == (b"hi", kernel)
            await ep.send(b"quit", (kernel, 7000))
            await proc.wait()
        await ep.aclose()


async def test_namespace_removed_after_use() -> None:
    async with netns_tun(start_stack=False) as env:
        ns = env.ns
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns not in out
