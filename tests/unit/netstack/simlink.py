"""Two NetStacks back to back through a simulated link (loss, reorder, delay)."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from trionet.netstack import NetStack, TcpConfig

A4 = ipaddress.ip_address("10.0.0.1")
B4 = ipaddress.ip_address("10.0.0.2")
A6 = ipaddress.ip_address("fd00::1")
B6 = ipaddress.ip_address("fd00::2")


class Pipe:
    """One direction: batches packets and delivers them from its own task."""

    def __init__(self, loss: float = 0.0, reorder: float = 0.0, delay: float = 0.0,
                 seed: int = 1, mangle: Callable[[bytes], bytes | None] | None = None) -> None:
        self.loss = loss
        self.reorder = reorder
        self.delay = delay
        self.rng = random.Random(seed)
        self.mangle = mangle
        self.queue: list[tuple[float, bytes]] = []
        self.event = trio.Event()
        self.target: NetStack | None = None
        self.sent = 0
        self.dropped = 0

    def put(self, packet: bytes) -> None:
        self.sent += 1
        if self.mangle is not None:
            m = self.mangle(packet)
            if m is None:
                self.dropped += 1
                return
            packet = m
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        extra = 0.0
        if self.reorder and self.rng.random() < self.reorder:
            extra = self.delay + 0.002
        self.queue.append((trio.current_time() + self.delay + extra, packet))
        self.event.set()

    async def pump(self) -> None:
        while True:
            await self.event.wait()
            self.event = trio.Event()
            while self.queue:
                now = trio.current_time()
                due = [p for t, p in self.queue if t <= now]
                if due:
                    self.queue = [(t, p) for t, p in self.queue if t > now]
                    assert self.target is not None
                    self.target.deliver_many(due)
                    await trio.sleep(0)
                else:
                    await trio.sleep_until(min(t for t, _ in self.queue))


@asynccontextmanager
async def linked_stacks(ab: Pipe | None = None, ba: Pipe | None = None,
                        config: TcpConfig | None = None,
                        ) -> AsyncIterator[tuple[NetStack, NetStack]]:
    ab = ab or Pipe()
    ba = ba or Pipe()
    a = NetStack([A4, A6], ab.put, tcp_config=config, seed=1)
    b = NetStack([B4, B6], ba.put, tcp_config=config, seed=2)
    ab.target = b
    ba.target = a
    async with trio.open_nursery() as n:
        n.start_soon(ab.pump)
        n.start_soon(ba.pump)
        n.start_soon(a.run)
        n.start_soon(b.run)
        yield a, b
        n.cancel_scope.cancel()
