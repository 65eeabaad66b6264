"""Two StackCores back to back in simulated time, sans-IO: no trio, no clock.

Each direction is a :class:`Link`: a bottleneck of ``rate`` bytes/s with a
drop-tail queue, ``delay`` seconds of propagation, seeded random loss, and an
optional ``drop(packet, now)`` hook for targeted losses and outages. The
:class:`SimNet` event loop moves time to the next packet arrival or TCP timer,
whichever is first, so a transfer of megabytes over a lossy path runs in well
under a second and gives the same result every time.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections.abc import Callable

from trionet.netstack.stack import StackCore
from trionet.netstack.tcp import TcpConfig, TcpConnection

from .fakepeer import Seg, parse_out
from .simlink import A4, B4


class Link:
    def __init__(self, loss: float = 0.0, delay: float = 0.01, rate: float = 5e6,
                 queue: int = 200, seed: int = 1,
                 drop: Callable[[Seg, float], bool] | None = None) -> None:
        self.loss = loss
        self.delay = delay
        self.rate = rate
        self.queue = queue
        self.rng = random.Random(seed)
        self.drop = drop
        self.busy_until = 0.0  # when the bottleneck has sent what is queued
        self.sent: list[tuple[float, Seg]] = []  # every packet offered, parsed
        self.dropped = 0

    def offer(self, packet: bytes, now: float) -> float | None:
        """When the packet arrives at the other end, or None if it is lost."""
        seg = parse_out(packet)
        self.sent.append((now, seg))
        if self.drop is not None and self.drop(seg, now):
            self.dropped += 1
            return None
        start = max(now, self.busy_until)
        if (start - now) * self.rate > self.queue * 1280:
            self.dropped += 1  # drop-tail
            return None
        self.busy_until = start + len(packet) / self.rate
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return None
        return self.busy_until + self.delay


class SimNet:
    """``a`` (10.0.0.1) and ``b`` (10.0.0.2) joined by ``ab`` and ``ba``."""

    def __init__(self, ab: Link | None = None, ba: Link | None = None,
                 config: TcpConfig | None = None) -> None:
        self.now = 0.0
        self.ab = ab or Link()
        self.ba = ba or Link()
        self._events: list[tuple[float, int, int, bytes]] = []
        self._n = 0
        self.a = StackCore([A4], lambda p: self._put(0, p), tcp_config=config, seed=1)
        self.b = StackCore([B4], lambda p: self._put(1, p), tcp_config=config, seed=2)

    def _put(self, side: int, packet: bytes) -> None:
        link = self.ab if side == 0 else self.ba
        at = link.offer(packet, self.now)
        if at is not None:
            self._n += 1
            heapq.heappush(self._events, (at, self._n, 1 - side, packet))

    def step(self, limit: float) -> bool:
        """Advance to the next event (no later than ``limit``); False if there is none."""
        stacks = (self.a, self.b)
        t = self._events[0][0] if self._events else None
        for s in stacks:
            d = s.next_deadline()
            if d is not None and (t is None or d < t):
                t = d
        if t is None or t > limit:
            self.now = limit
            return False
        self.now = max(self.now, t)
        batch: tuple[list[bytes], list[bytes]] = ([], [])
        while self._events and self._events[0][0] <= self.now:
            _, _, dst, packet = heapq.heappop(self._events)
            batch[dst].append(packet)
        for s, pkts in zip(stacks, batch, strict=True):
            if pkts:
                s.deliver_many(pkts, self.now)
        for s in stacks:
            d = s.next_deadline()
            if d is not None and d <= self.now:
                s.on_timer(self.now)
            s.touched.clear()
        return True


class Transfer:
    """``size`` bytes from a to b over one connection; records the receiver's progress."""

    def __init__(self, net: SimNet, size: int, seed: int = 0) -> None:
        self.net = net
        self.data = random.Random(seed).randbytes(size)
        self.got = bytearray()
        self.progress: list[tuple[float, int]] = [(0.0, 0)]
        net.b.tcp_listen(80)
        self.client: TcpConnection = net.a.tcp_connect(B4, 80, net.now)
        self.server: TcpConnection | None = None
        self._off = 0
        self.done_at: float | None = None

    def _app(self) -> None:
        now = self.net.now
        c = self.client
        if self._off < len(self.data) and c.send_space > 0 and c.state.name == "ESTABLISHED":
            self._off += c.send(memoryview(self.data)[self._off:self._off + (256 << 10)], now)
        if self.server is None:
            lst = self.net.b.listeners[80]
            if lst.accept_queue:
                self.server = lst.accept_queue.popleft()
        if self.server is not None and self.server.rbuf:
            chunk = self.server.read(1 << 20, now)
            self.got += chunk
            self.progress.append((now, len(self.got)))
            if len(self.got) == len(self.data) and self.done_at is None:
                self.done_at = now

    def run(self, limit: float = 600.0) -> float:
        """Run until every byte arrived (or ``limit``); the completion time."""
        while self.done_at is None and self.net.now < limit:
            self._app()
            if not self.net.step(limit):
                break
            self._app()
        assert self.done_at is not None, f"{len(self.got)} of {len(self.data)} bytes by {limit} s"
        assert hashlib.sha256(self.got).digest() == hashlib.sha256(self.data).digest()
        return self.done_at

    def max_stall(self) -> float:
        """The longest simulated time with no new bytes at the receiver."""
        times = [t for t, _ in self.progress]
        return max(b - a for a, b in itertools.pairwise(times))
