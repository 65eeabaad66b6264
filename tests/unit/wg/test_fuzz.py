"""Random and mutated datagrams never raise and never break a working session."""

from __future__ import annotations

import random
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.wg.sim import A_IP, B_IP, WALL0, Sim, ip4, pair
from trionet.wg import WgDevice
from trionet.wg.crypto import LABEL_MAC1, hash_, mac


def corpus() -> tuple[WgDevice, WgDevice, list[bytes]]:
    a, b = pair(seed=21)
    init = a.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)[0].data
    resp = b.receive(init, 0.0, WALL0, src=("10.0.0.1", 1)).transmits[0].data
    back = a.receive(resp, 0.0, WALL0).transmits
    for t in back:
        b.receive(t.data, 0.0, WALL0)
    data = a.send_ip(ip4(A_IP, B_IP, b"z" * 100), 1.0, WALL0)[0].data
    b.receive(data, 1.0, WALL0)
    keepalive = b.tick(11.0, WALL0)  # passive keepalive
    c, d = pair(seed=22)
    d.force_under_load = True
    cookie = d.receive(c.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)[0].data, 0.0, WALL0, src=("10.0.0.1", 1)).transmits
    samples = [bytes(x) for x in (init, resp, data)] + [bytes(t.data) for t in back + keepalive + cookie]
    assert len(samples) == 6
    return a, b, samples


def mutate(rng: random.Random, sample: bytes, mac1_key: bytes) -> bytes:
    d = bytearray(sample)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        if op == 0 and d:
            i = rng.randrange(len(d))
            d[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            del d[rng.randrange(len(d) + 1):]
        elif op == 2:
            d += rng.randbytes(rng.randrange(1, 64))
        elif op == 3 and d:
            d[rng.randrange(len(d))] = rng.randrange(256)
        elif op == 4 and len(d) >= 4:
            d[0] = rng.randrange(6)
        elif op == 5 and len(d) >= 16:
            d[8:16] = rng.randbytes(8)  # counter / fields
        elif op == 6:
            d = bytearray(rng.randbytes(rng.choice([4, 32, 64, 92, 148, rng.randrange(4, 2000)])))
            d[0] = rng.randrange(1, 5)
            d[1:4] = b"\0\0\0"
        elif op == 7 and len(d) in (148, 92):  # keep mac1 valid so the handshake code runs
            m = 116 if len(d) == 148 else 60
            d[m:m + 16] = mac(mac1_key, bytes(d[:m]))
    return bytes(d)


def test_100k_random_and_mutated_datagrams() -> None:
    a, b, samples = corpus()
    rng = random.Random(1234)
    key_b, key_a = hash_(LABEL_MAC1, b.public), hash_(LABEL_MAC1, a.public)
    started = time.perf_counter()
    n = 100_000
    for i in range(n):
        dev, key = (b, key_b) if i & 1 else (a, key_a)
        if i % 10 == 0:
            d = rng.randbytes(rng.randrange(0, 200))
        else:
            d = mutate(rng, rng.choice(samples), key)
        now = 1.0 + i * 1e-4
        got = dev.receive(d, now, WALL0 + now, src=("10.0.0.9", i & 0xFFFF), backlog=i % 300)
        for t in got.transmits:
            assert t.data
        if i % 1000 == 0:
            dev.tick(now, WALL0 + now)
    elapsed = time.perf_counter() - started
    assert a.drops["internal_error"] == 0 and b.drops["internal_error"] == 0, (a.drops, b.drops)
    assert sum(a.drops.values()) + sum(b.drops.values()) > n // 2
    print(f"100k datagrams in {elapsed:.1f} s; drops a={dict(a.drops)} b={dict(b.drops)}")
    # the session still works afterwards
    sim = Sim(a, b)
    sim.now = 20.0
    sim.send("a", ip4(A_IP, B_IP, b"after"))
    assert sim.delivered and sim.delivered[-1][2] == ip4(A_IP, B_IP, b"after")


_A, _B, _SAMPLES = corpus()


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(_SAMPLES), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
       st.integers(0, 2000), st.binary(max_size=64))
def test_hypothesis_mutations(sample: bytes, edits: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    d = bytearray(sample)
    for pos, val in edits:
        if d:
            d[pos % len(d)] = val
    d = d[:cut] + tail
    for dev in (_A, _B):
        got = dev.receive(bytes(d), 2.0, WALL0, src=("10.0.0.5", 5))
        assert all(isinstance(t.data, (bytes, bytearray)) for t in got.transmits)
        assert dev.drops["internal_error"] == 0


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_hypothesis_random_bytes_and_send_ip(data: bytes) -> None:
    _A.receive(data, 3.0, WALL0)
    _A.send_ip(data, 3.0, WALL0)
    assert _A.drops["internal_error"] == 0
