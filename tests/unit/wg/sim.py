"""Two of our devices on a simulated link, in simulated time.

The simulator only ticks a device at its own `next_deadline()`, so a test
that passes here also shows the deadlines are right.
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
from collections.abc import Callable

from trionet.wg import Transmit, WgDevice, classify
from trionet.wg.constants import MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT, TRANSPORT_MIN_SIZE

WALL0 = 1.8e9
A_IP, B_IP = "10.0.0.1", "10.0.0.2"


def ip4(src: str, dst: str, payload: bytes = b"x" * 40) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + payload


def pair(seed: int = 1) -> tuple[WgDevice, WgDevice]:
    a = WgDevice(os.urandom(32), random.Random(seed))
    b = WgDevice(os.urandom(32), random.Random(seed + 1000))
    a.set_peer(b.public, [B_IP + "/32"])
    b.set_peer(a.public, [A_IP + "/32"])
    return a, b


def kind(t: Transmit) -> str:
    m = classify(t.data)
    if m == MSG_TRANSPORT:
        return "keepalive" if len(t.data) == TRANSPORT_MIN_SIZE else "data"
    return {MSG_INITIATION: "initiation", MSG_RESPONSE: "response"}.get(m, "other")


class Sim:
    def __init__(self, a: WgDevice, b: WgDevice) -> None:
        self.devs = {"a": a, "b": b}
        self.names = {a.public: "a", b.public: "b"}
        self.now = 0.0
        self.silent: set[str] = set()  # datagrams from these are lost
        self.events: list[tuple[float, str, str]] = []  # (time, sender, kind)
        self.delivered: list[tuple[float, str, bytes]] = []  # (time, receiver, packet)

    def send(self, name: str, packet: bytes) -> None:
        self.carry(name, self.devs[name].send_ip(packet, self.now, WALL0 + self.now))

    def carry(self, sender: str, transmits: list[Transmit]) -> None:
        queue = [(sender, t) for t in transmits]
        while queue:
            src, t = queue.pop(0)
            self.events.append((self.now, src, kind(t)))
            if src in self.silent:
                continue
            dst = self.names[t.peer]
            got = self.devs[dst].receive(t.data, self.now, WALL0 + self.now, src=src)
            self.delivered += [(self.now, dst, p) for _, p in got.packets]
            queue += [(dst, x) for x in got.transmits]

    def run(self, until: float, app: Callable[[float], float | None] | None = None,
            app_next: float | None = None) -> None:
        """Advance to `until`, ticking at deadlines; `app(now)` runs at `app_next`
        and returns its next time (or None)."""
        guard = 0
        while True:
            times = [t for t in (app_next, self.devs["a"].next_deadline(), self.devs["b"].next_deadline())
                     if t is not None]
            if not times or min(times) > until:
                break
            self.now = max(self.now, min(times))
            if app is not None and app_next is not None and app_next <= self.now:
                app_next = app(self.now)
            for name, dev in self.devs.items():
                d = dev.next_deadline()
                if d is not None and d <= self.now:
                    before = (dev.counters["keys_zeroed"], dev.counters["handshake_gave_up"])
                    self.carry(name, dev.tick(self.now, WALL0 + self.now))
                    if dev.counters["keys_zeroed"] > before[0]:
                        self.events.append((self.now, name, "keys_zeroed"))
                    if dev.counters["handshake_gave_up"] > before[1]:
                        self.events.append((self.now, name, "gave_up"))
            guard += 1
            assert guard < 10_000_000
        self.now = until

    def times(self, sender: str, what: str) -> list[float]:
        return [t for t, s, k in self.events if s == sender and k == what]
