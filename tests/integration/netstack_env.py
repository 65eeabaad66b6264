"""A network namespace with a TUN device whose other end is our NetStack.

The kernel in namespace ``ns`` owns 10.252.N.1/24 and fd00:252:N::1/64 on the
TUN; our stack answers for 10.252.N.2 and fd00:252:N::2. Everything is
removed on exit, also after a failure.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import itertools
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from trionet.netstack import NetStack, TcpConfig
from trionet.netstack.tun import Tun

PEER = str(Path(__file__).with_name("netstack_peer.py"))
BLOCK = random.Random(252).randbytes(1 << 20)
_counter = itertools.count()


def pattern_sha(n: int) -> str:
    h = hashlib.sha256()
    full, rest = divmod(n, len(BLOCK))
    for _ in range(full):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    return h.hexdigest()


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Env:
    def __init__(self, ns: str, tun: Tun, n: int) -> None:
        self.ns = ns
        self.tun = tun
        self.kernel4 = ipaddress.ip_address(f"10.252.{n}.1")
        self.ours4 = ipaddress.ip_address(f"10.252.{n}.2")
        self.kernel6 = ipaddress.ip_address(f"fd00:252:{n}::1")
        self.ours6 = ipaddress.ip_address(f"fd00:252:{n}::2")
        self.stack: NetStack | None = None
        self.delay_line: DelayLine | None = None

    def nsexec(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]

    def set_loss(self, percent: int) -> None:
        """Drop ``percent``% of TCP packets both ways inside the namespace."""
        rules = f"""
table inet netstack_loss {{
  chain in {{ type filter hook input priority 0; meta l4proto tcp numgen random mod 100 < {percent} drop; }}
  chain out {{ type filter hook output priority 0; meta l4proto tcp numgen random mod 100 < {percent} drop; }}
}}
"""
        subprocess.run(self.nsexec("nft", "-f", "-"), input=rules.encode(), check=True,
                       capture_output=True)

    async def start_peer(self, *args: str) -> trio.Process:
        proc = await trio.lowlevel.open_process(
            self.nsexec(sys.executable, PEER, *args), stdout=subprocess.PIPE)
        if args[0].startswith("server") or args[0] == "udp-echo":
            line = await read_line(proc)
            assert line == "READY", line
        return proc


async def read_line(proc: trio.Process) -> str:
    assert proc.stdout is not None
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(1)
        if not chunk:
            break
        buf += chunk
    return buf.decode().strip()


class DelayLine:
    """Holds packets for ``delay`` seconds; ``reorder`` of them 1-5 ms longer."""

    def __init__(self, deliver: Callable[[list[bytes]], None], delay: float,
                 reorder: float, seed: int) -> None:
        self.deliver = deliver
        self.delay = delay
        self.reorder = reorder
        self.rng = random.Random(seed)
        self.heap: list[tuple[float, int, bytes]] = []
        self.seq = itertools.count()
        self.wake = trio.Event()
        self.reordered = 0

    def put_many(self, packets: list[bytes]) -> None:
        now = trio.current_time()
        for p in packets:
            t = now + self.delay
            if self.reorder and self.rng.random() < self.reorder:
                t += self.rng.uniform(0.001, 0.005)
                self.reordered += 1
            heapq.heappush(self.heap, (t, next(self.seq), p))
        self.wake.set()

    def put(self, packet: bytes) -> None:
        self.put_many([packet])

    async def run(self) -> None:
        while True:
            if not self.heap:
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            t = self.heap[0][0]
            now = trio.current_time()
            if t > now:
                with trio.move_on_at(t):
                    self.wake = trio.Event()
                    await self.wake.wait()
                continue
            due = []
            while self.heap and self.heap[0][0] <= now:
                due.append(heapq.heappop(self.heap)[2])
            self.deliver(due)
            await trio.lowlevel.checkpoint()


@asynccontextmanager
async def netns_tun(mtu: int = 1280, config: TcpConfig | None = None,
                    start_stack: bool = True, delay: float = 0.0,
                    reorder: float = 0.0) -> AsyncIterator[Env]:
    idx = next(_counter)
    n = (os.getpid() + idx * 7) % 250 + 1
    ns = f"tnstk{os.getpid()}-{idx}"
    tun = Tun.open(f"tns{os.getpid() % 100000}x{idx}"[:15])
    try:
        sh("ip", "netns", "add", ns)
        try:
            sh("ip", "link", "set", tun.name, "netns", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", tun.name, "mtu", str(mtu), "up")
            sh("ip", "-n", ns, "addr", "add", f"10.252.{n}.1/24", "dev", tun.name)
            sh("ip", "-n", ns, "-6", "addr", "add", f"fd00:252:{n}::1/64", "dev", tun.name,
               "nodad")
            env = Env(ns, tun, n)
            if not start_stack:
                yield env
                return
            async with trio.open_nursery() as nursery:
                if delay or reorder:
                    stack = NetStack([env.ours4, env.ours6], tun.write, mtu=mtu,
                                     tcp_config=config)
                    line = DelayLine(stack.deliver_many, delay, reorder, seed=n)
                    nursery.start_soon(line.run)
                    nursery.start_soon(tun.pump, line.put_many)
                    env.delay_line = line
                else:
                    stack = NetStack([env.ours4, env.ours6], tun.write, mtu=mtu,
                                     tcp_config=config)
                    nursery.start_soon(tun.pump, stack)
                env.stack = stack
                nursery.start_soon(stack.run)
                yield env
                nursery.cancel_scope.cancel()
        finally:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    finally:
        tun.close()
