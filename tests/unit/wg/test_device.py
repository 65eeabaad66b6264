"""WireGuard between two of our own devices, in simulated time."""

from __future__ import annotations

import ipaddress
import itertools
import os
import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from trionet.wg import WgDevice
from trionet.wg.device import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    ReplayWindow,
)

WALL = 1.8e9


def ip4(src: str, dst: str, payload: bytes = b"x" * 40) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + payload


def pair() -> tuple[WgDevice, WgDevice]:
    a, b = WgDevice(os.urandom(32), random.Random(1)), WgDevice(os.urandom(32), random.Random(2))
    a.set_peer(b.public, ["10.0.0.2/32"])
    b.set_peer(a.public, ["10.0.0.1/32"])
    return a, b


class Link:
    """Carries transmits between two devices, counting delivered packets."""

    def __init__(self, a: WgDevice, b: WgDevice) -> None:
        self.devs = {a.public: a, b.public: b}  # a transmit names its destination
        self.delivered: list[tuple[WgDevice, bytes]] = []

    def carry(self, sender: WgDevice, transmits: list, now: float) -> None:  # type: ignore[type-arg]
        queue = [(sender, t) for t in transmits]
        while queue:
            _src, t = queue.pop(0)
            dst = self.devs[t.peer]
            got = dst.receive(t.data, now, WALL + now)
            self.delivered += [(dst, p) for _, p in got.packets]
            queue += [(dst, x) for x in got.transmits]


def test_handshake_data_both_ways_and_previous_session() -> None:
    a, b = pair()
    link = Link(a, b)
    link.carry(a, a.send_ip(ip4("10.0.0.1", "10.0.0.2"), 0.0, WALL), 0.0)
    assert [d for d, _ in link.delivered] == [b]
    link.carry(b, b.send_ip(ip4("10.0.0.2", "10.0.0.1"), 0.1, WALL), 0.1)
    assert [d for d, _ in link.delivered] == [b, a]
    assert a.counters["handshakes_completed"] == 1 and b.counters["handshakes_completed"] == 1


def test_24_simulated_hours_rekeys_on_time() -> None:
    a, b = pair()
    link = Link(a, b)
    now, sent = 0.0, 0
    rekey_times: list[float] = []
    while now < 24 * 3600:
        before = a.counters["handshakes_completed"] + b.counters["handshakes_completed"]
        link.carry(a, a.send_ip(ip4("10.0.0.1", "10.0.0.2"), now, WALL + now), now)
        link.carry(b, b.send_ip(ip4("10.0.0.2", "10.0.0.1"), now, WALL + now), now)
        link.carry(a, a.tick(now, WALL + now), now)
        link.carry(b, b.tick(now, WALL + now), now)
        sent += 2
        if a.counters["handshakes_completed"] + b.counters["handshakes_completed"] > before:
            rekey_times.append(now)
        now += 1.0
    assert len(link.delivered) == sent, "no packet lost across rekeys"
    gaps = [t2 - t1 for t1, t2 in itertools.pairwise(rekey_times)]
    assert gaps and all(REKEY_AFTER_TIME <= g <= REKEY_AFTER_TIME + 2 for g in gaps), gaps[:5]
    assert len(rekey_times) >= 24 * 3600 // (REKEY_AFTER_TIME + 2)


def test_passive_keepalive_after_receiving_only() -> None:
    a, b = pair()
    link = Link(a, b)
    link.carry(a, a.send_ip(ip4("10.0.0.1", "10.0.0.2"), 0.0, WALL), 0.0)
    assert b.tick(KEEPALIVE_TIMEOUT - 0.5, WALL) == []
    ka = b.tick(KEEPALIVE_TIMEOUT + 0.1, WALL)
    assert len(ka) == 1 and len(ka[0].data) == 32  # an empty transport message


def test_silent_peer_retransmits_then_gives_up_and_keys_are_zeroed() -> None:
    a, b = pair()
    out = a.send_ip(ip4("10.0.0.1", "10.0.0.2"), 0.0, WALL)
    assert len(out) == 1
    attempts, now = 1, 0.0
    while now < REKEY_ATTEMPT_TIME + 10:
        now += 0.25
        attempts += len(a.tick(now, WALL + now))
    assert 17 <= attempts <= 19  # every 5 s + jitter for 90 s (MaxTimerHandshakes 18)
    assert a.counters["handshake_gave_up"] == 1
    assert a.peers[b.public].queue == []
    # an established session is zeroed at 3 x REJECT_AFTER_TIME
    a2, b2 = pair()
    Link(a2, b2).carry(a2, a2.send_ip(ip4("10.0.0.1", "10.0.0.2"), 0.0, WALL), 0.0)
    a2.tick(3 * REJECT_AFTER_TIME + 1, WALL)
    assert a2.peers[b2.public].current is None and a2.counters["sessions_expired"] == 1


def test_bad_input_dropped_and_counted_by_reason() -> None:
    a, b = pair()
    link = Link(a, b)
    first_tx = a.send_ip(ip4("10.0.0.1", "10.0.0.2"), 0.0, WALL)[0]
    first = first_tx.data
    b.receive(first[:100], 0.0, WALL)
    bad_mac = bytearray(first)
    bad_mac[120] ^= 1
    b.receive(bytes(bad_mac), 0.0, WALL)
    b.receive(b"\x09\x00\x00\x00" + bytes(40), 0.0, WALL)
    b.receive(b"\x04\x00\x00\x00" + bytes(40), 0.0, WALL)
    b.receive(b"\x01", 0.0, WALL)
    assert b.drops["bad_size"] == 1 and b.drops["bad_mac1"] == 1 and b.drops["unknown_type"] == 1
    assert b.drops["unknown_index"] == 1 and b.drops["short"] == 1
    # replay of a transport packet
    link.carry(a, [first_tx], 0.0)  # the untouched initiation completes the handshake
    data = a.send_ip(ip4("10.0.0.1", "10.0.0.2"), 0.1, WALL)[0].data
    assert b.receive(data, 0.1, WALL).packets
    assert not b.receive(data, 0.1, WALL).packets and b.drops["replayed"] == 1
    # a stranger's key: the initiation is dropped as an unknown peer
    stranger = WgDevice(os.urandom(32))
    stranger.set_peer(b.public, ["10.0.0.2/32"])
    b.receive(stranger.send_ip(ip4("10.0.0.9", "10.0.0.2"), 0.0, WALL)[0].data, 0.0, WALL)
    assert b.drops["unknown_peer"] == 1
    # spoofed inner source
    spoof = a.send_ip(ip4("10.0.0.7", "10.0.0.2"), 0.2, WALL)[0].data
    assert not b.receive(spoof, 0.2, WALL).packets and b.drops["inner_src_not_allowed"] == 1


def test_replay_window() -> None:
    w = ReplayWindow(64)
    for n in (0, 5, 3, 100):
        assert w.check(n)
        w.accept(n)
    assert not w.check(5) and not w.check(100) and w.check(99) and not w.check(30)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 3))
def test_random_and_mutated_datagrams_never_raise(data: bytes, kind: int) -> None:
    a, b = pair()
    seed = a.send_ip(ip4("10.0.0.1", "10.0.0.2"), 0.0, WALL)[0].data
    if kind and data:
        buf = bytearray(seed)
        for i, byte in enumerate(data[:8]):
            buf[(byte * 7 + i) % len(buf)] ^= 1 + byte % 255
        data = bytes(buf)
    b.receive(data, 0.0, WALL)
