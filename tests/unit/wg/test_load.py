"""Under load, as wireguard-go: a flood of initiations gets cookie replies, a peer
with a cookie still gets through, each source has its own rate limit (bounded).

The flood is what costs least to make for someone who knows our public key:
random bytes shaped as an initiation with a valid mac1 (not under load, each
would cost us an X25519 before its AEAD fails)."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from tests.unit.wg.sim import A_IP, B_IP, WALL0, ip4, pair
from trionet.wg import Transmit, WgDevice, classify, handshake
from trionet.wg.constants import (
    COOKIE_REPLY_SIZE,
    HANDSHAKE_SERVICE_RATE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RATELIMIT_BURST,
    RATELIMIT_MAX_SOURCES,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_BACKLOG,
)
from trionet.wg.cookie import CookieChecker, CookieGenerator, source_identity
from trionet.wg.crypto import LABEL_MAC1, dh, hash_, hchacha20, mac, public_key, xaead_decrypt, xaead_encrypt
from trionet.wg.load import HandshakeLoad
from trionet.wg.ratelimit import RateLimiter

A_PATH = ("udp", ("100.64.0.1", 41641))  # how b's driver names a's datagrams
B_PATH = ("udp", ("100.64.0.2", 41641))


def junk_initiation(our_public: bytes, rng: random.Random) -> bytes:
    body = b"\x01\0\0\0" + rng.randbytes(112)
    return body + mac(hash_(LABEL_MAC1, our_public), body) + bytes(16)


def flood_source(i: int) -> tuple[str, tuple[str, int]]:
    return ("udp", (f"198.18.{i >> 8 & 255}.{i & 255}", 1024 + (i >> 16)))


class Flood:
    """Junk initiations into `dev` at `rate` a second, each from its own address."""

    def __init__(self, dev: WgDevice, rate: float, start: float = 0.0) -> None:
        self.dev, self.rate, self.now, self.sent = dev, rate, start, 0
        self.rng = random.Random(7)
        self.replies: list[Transmit] = []

    def until(self, t: float) -> None:
        while self.now + 1 / self.rate <= t:
            self.now += 1 / self.rate
            got = self.dev.receive(junk_initiation(self.dev.public, self.rng), self.now, WALL0 + self.now,
                                   src=flood_source(self.sent))
            self.replies += got.transmits
            self.sent += 1


def count_handshakes(monkeypatch: pytest.MonkeyPatch, dev: WgDevice) -> list[int]:
    """Each time the device starts a handshake on an initiation: its cookie replies sent so far."""
    calls: list[int] = []
    real = handshake.consume_initiation

    def counting(*args: Any) -> Any:
        calls.append(dev.counters["cookie_replies_sent"])
        return real(*args)

    monkeypatch.setattr(handshake, "consume_initiation", counting)
    return calls


def test_a_flood_gets_cookie_replies_and_never_the_handshake_once_under_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _a, b = pair()
    handshakes = count_handshakes(monkeypatch, b)
    flood = Flood(b, 5000)
    flood.until(0.4)
    assert flood.sent == 2000
    cookies = b.counters["cookie_replies_sent"]
    # Only the messages before the switch ran the handshake (and failed its first AEAD);
    # none after the first cookie reply did.
    assert len(handshakes) + cookies == flood.sent
    assert len(handshakes) <= UNDER_LOAD_BACKLOG * 2
    assert set(handshakes) == {0}
    assert b.drops["decrypt_failed_initiation"] == len(handshakes)
    assert cookies == len(flood.replies) == b.drops["under_load_no_mac2"] >= 1800
    first = len(handshakes)  # the index of the first message answered with a cookie
    assert first / 5000 < 0.05  # under load within 50 ms of a 5,000/s flood
    for i, reply in enumerate(flood.replies):
        assert classify(reply.data) == MSG_COOKIE_REPLY and len(reply.data) == COOKIE_REPLY_SIZE
        assert reply.path == flood_source(first + i) and reply.peer == b""
    assert b.under_load(0.4) and b.statistics()["under_load_entered"] == 1


def test_a_peer_with_a_cookie_completes_its_handshake_during_the_flood_and_its_data_flows() -> None:
    a, b = pair()
    flood = Flood(b, 2000)
    flood.until(0.5)
    assert b.under_load(0.5)
    now = 0.5
    packet = ip4(A_IP, B_IP, b"during the flood")
    [init] = a.send_ip(packet, now, WALL0 + now)
    [cookie] = b.receive(init.data, now, WALL0 + now, src=A_PATH).transmits
    assert classify(cookie.data) == MSG_COOKIE_REPLY and cookie.path == A_PATH
    assert a.receive(cookie.data, now, WALL0 + now, src=B_PATH).transmits == []
    assert a.counters["cookie_replies_received"] == 1
    # a retries at its retransmit timer (5 s + jitter), the flood going on meanwhile
    retry_at = a.next_deadline()
    assert retry_at is not None and 5.0 <= retry_at - now <= 5.4
    flood.until(retry_at)
    now = retry_at
    [retry] = a.tick(now, WALL0 + now)
    assert classify(retry.data) == MSG_INITIATION and retry.data[-16:] != bytes(16)  # it carries mac2
    assert b.under_load(now)
    [response] = b.receive(retry.data, now, WALL0 + now, src=A_PATH).transmits
    assert classify(response.data) == MSG_RESPONSE and response.peer == a.public
    staged = a.receive(response.data, now, WALL0 + now, src=B_PATH).transmits
    assert [classify(t.data) for t in staged] == [MSG_TRANSPORT]  # the packet that waited
    got = b.receive(staged[0].data, now, WALL0 + now, src=A_PATH)
    assert got.packets == [(a.public, packet)]
    assert b.drops["ratelimited"] == 0
    # and transport data keeps flowing while the flood goes on
    flood.until(now + 0.5)
    now = flood.now
    for n in range(20):
        [tx] = a.send_ip(ip4(A_IP, B_IP, b"%d" % n), now, WALL0 + now)
        assert b.receive(tx.data, now, WALL0 + now, src=A_PATH).packets == [(a.public, ip4(A_IP, B_IP, b"%d" % n))]
    assert b.under_load(now) and b.counters["cookie_replies_sent"] > 10_000


def mac2_initiation(b: WgDevice, body: bytes, src: Any, now: float, src_key: bytes | None = None) -> bytes:
    """An initiation `body` (without macs) with a valid mac2 for `src`: a cookie fetched from `b`."""
    gen = CookieGenerator(b.public)
    [reply] = b.receive(gen.add_macs(body, now), now, WALL0, src=src, src_key=src_key).transmits
    assert gen.consume_reply(reply.data, now)
    return gen.add_macs(body, now)


def allowed(b: WgDevice, msg: bytes, src: Any, now: float, src_key: bytes | None = None) -> bool:
    before = b.drops["ratelimited"] + b.drops["under_load_no_mac2"]
    b.receive(msg, now, WALL0, src=src, src_key=src_key)
    return b.drops["ratelimited"] + b.drops["under_load_no_mac2"] == before


def test_the_rate_limit_is_per_source_host() -> None:
    a, b = pair()
    b.force_under_load = True
    body = a.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)[0].data[:116]
    now = 1.0
    sources = {
        "v4": ("udp", ("192.0.2.1", 1000)), "v4 other port": ("udp", ("192.0.2.1", 2000)),
        "v4 other host": ("udp", ("192.0.2.2", 1000)),
        "v6": ("udp", ("2001:db8:1:2::1", 1000)), "v6 same /64": ("udp", ("2001:db8:1:2::ffff", 1000)),
        "v6 other /64": ("udp", ("2001:db8:1:3::1", 1000)),
    }
    msgs = {name: mac2_initiation(b, body, src, now) for name, src in sources.items()}
    # a cookie is bound to its address and port: another port's mac2 is not valid
    assert not allowed(b, msgs["v4"], sources["v4 other port"], now)
    # the burst at one instant, then nothing
    assert [allowed(b, msgs["v4"], sources["v4"], now) for _ in range(RATELIMIT_BURST + 2)] \
        == [True] * RATELIMIT_BURST + [False, False]
    assert allowed(b, msgs["v4 other host"], sources["v4 other host"], now)
    assert not allowed(b, msgs["v4 other port"], sources["v4 other port"], now)  # the same host's bucket
    assert allowed(b, msgs["v4"], sources["v4"], now + 0.05)  # one more every 50 ms (20/s)
    assert not allowed(b, msgs["v4"], sources["v4"], now + 0.05)
    for _ in range(RATELIMIT_BURST):
        assert allowed(b, msgs["v6"], sources["v6"], now)
    assert not allowed(b, msgs["v6 same /64"], sources["v6 same /64"], now)
    assert allowed(b, msgs["v6 other /64"], sources["v6 other /64"], now)


def test_relayed_senders_are_told_apart_by_their_derp_node_key() -> None:
    a, b = pair()
    b.force_under_load = True
    body = a.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)[0].data[:116]
    now, region = 1.0, ("derp", 3)
    key1, key2 = os.urandom(32), os.urandom(32)
    [reply] = b.receive(junk_initiation(b.public, random.Random(1)), now, WALL0, src=region, src_key=key1).transmits
    assert reply.peer == key1 and reply.path == region  # addressed to the sender, via the region
    msg1 = mac2_initiation(b, body, region, now, key1)
    msg2 = mac2_initiation(b, body, region, now, key2)
    assert not allowed(b, msg1, region, now, key2)  # key1's cookie is not key2's
    for _ in range(RATELIMIT_BURST):
        assert allowed(b, msg1, region, now, key1)
    assert not allowed(b, msg1, region, now, key1)
    assert allowed(b, msg2, region, now, key2)
    # a driver that does not pass the key: a cookie reply to an initiation would be
    # addressed to no one (DERP delivers by node key), so none is sent
    got = b.receive(junk_initiation(b.public, random.Random(2)), now, WALL0, src=("derp", 4))
    assert got.transmits == [] and b.drops["cookie_reply_unaddressed"] == 1


def test_source_identity_per_host_and_never_raising() -> None:
    def key(src: Any, src_key: bytes | None = None) -> bytes:
        return source_identity(src, src_key)[1]

    def cookie_source(src: Any, src_key: bytes | None = None) -> bytes:
        return source_identity(src, src_key)[0]

    assert key(("udp", ("10.0.0.1", 1))) == key(("udp", ("10.0.0.1", 2))) == key(("10.0.0.1", 3))
    assert key(("udp", ("::ffff:10.0.0.1", 1))) == key(("udp", ("10.0.0.1", 1)))
    assert cookie_source(("udp", ("10.0.0.1", 1))) != cookie_source(("udp", ("10.0.0.1", 2)))
    assert key(("udp", ("10.0.0.1", 1))) != key(("udp", ("10.0.0.2", 1)))
    assert key(("udp", ("fe80::1%eth0", 1))) == key(("udp", ("fe80::2", 1)))
    assert key(("derp", 1), b"k" * 32) == key(("derp", 2), b"k" * 32) != key(("derp", 1), b"j" * 32)
    assert key(("derp", 1)) != key(("derp", 2))
    # kinds never collide: 4 raw bytes are not the IPv4 address they spell
    assert key(bytes([10, 0, 0, 1])) != key(("udp", ("10.0.0.1", 1)))

    class BadRepr:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    weird: Any
    for weird in [None, [], {"a": 1}, ("udp", ["x"]), ("udp", ("not an ip", 1)), ("udp", ("1.2.3.4", 10**30)),
                  ("udp", ("1.2.3.4", -1)), ("udp", ("1.2.3.4\x00", 1)), ("udp", (b"1.2.3.4", 1)),
                  ("derp", BadRepr()), BadRepr(), ("udp", ("1.2.3.4", 1), "extra"), 12345, "a string"]:
        cookie, limiter = source_identity(weird)
        assert isinstance(cookie, bytes) and isinstance(limiter, bytes)


def test_handshake_paths_never_raise_on_odd_sources() -> None:
    a, b = pair()
    rng = random.Random(3)
    init = a.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)[0].data
    unhashable: Any = ("udp", [1, 2])
    for under_load in (False, True):
        b.force_under_load = under_load
        for src in [None, [], unhashable, ("derp", object()), ("udp", ("1.2.3.4", 10**30)), b"", "x" * 10_000]:
            for src_key in (None, b"", os.urandom(32)):
                for msg in (init, junk_initiation(b.public, rng), init[:100], init[:-1] + b"\0"):
                    b.receive(msg, 1.0, WALL0, src=src, src_key=src_key)
                    b.receive_many([msg, msg], 1.0, WALL0, src=src, src_key=src_key, into=[])
    assert b.drops["internal_error"] == 0, b.drops
    assert b.counters["cookie_replies_sent"] > 0 and b.drops["ratelimited"] == 0


def test_a_bug_on_the_handshake_path_is_counted_not_raised_and_logged_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair()
    init = a.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)[0].data

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(handshake, "consume_initiation", broken)
    with caplog.at_level("ERROR", logger="trionet.wg.device"):
        for _ in range(3):
            assert b.receive(init, 0.0, WALL0, src=A_PATH).transmits == []
    assert b.drops["internal_error"] == 3
    assert [r.exc_info is not None for r in caplog.records] == [True]


def test_a_response_without_mac2_under_load_gets_a_cookie_reply_to_its_peer() -> None:
    a, b = pair()
    init = a.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)[0].data
    [response] = b.receive(init, 0.0, WALL0, src=A_PATH).transmits
    a.force_under_load = True
    [reply] = a.receive(response.data, 0.0, WALL0, src=B_PATH).transmits
    assert classify(reply.data) == MSG_COOKIE_REPLY and reply.peer == b.public and reply.path == B_PATH
    assert b.receive(reply.data, 0.0, WALL0, src=A_PATH).transmits == []
    assert b.counters["cookie_replies_received"] == 1


def test_the_device_leaves_under_load_after_the_flood_stops() -> None:
    a, b = pair()
    flood = Flood(b, 5000)
    flood.until(1.0)
    end = flood.now
    assert b.under_load(end + UNDER_LOAD_AFTER_TIME - 0.01)
    assert not b.under_load(end + UNDER_LOAD_AFTER_TIME + 0.01)
    # a new peer's plain initiation (no cookie) is answered with a handshake again
    now = end + UNDER_LOAD_AFTER_TIME + 0.01
    init = a.send_ip(ip4(A_IP, B_IP), now, WALL0 + now)[0].data
    assert [classify(t.data) for t in b.receive(init, now, WALL0 + now, src=A_PATH).transmits] == [MSG_RESPONSE]


def test_a_flood_that_slows_below_the_service_rate_ends_the_load_a_second_later() -> None:
    _a, b = pair()
    flood = Flood(b, 5000)
    flood.until(1.0)
    flood.rate = HANDSHAKE_SERVICE_RATE / 2
    flood.until(1.2)
    slow_start = 1.0
    assert b.under_load(flood.now)
    flood.until(slow_start + UNDER_LOAD_AFTER_TIME - 0.05)
    assert b.under_load(flood.now)
    flood.until(slow_start + UNDER_LOAD_AFTER_TIME + 0.1)
    assert not b.under_load(flood.now)
    flood.until(5.0)
    assert b.statistics()["under_load_entered"] == 1


def test_a_busy_tailnet_is_never_under_load() -> None:
    """1,000 peers re-keying every 2 minutes (an initiation from each and a response to
    each of ours), plus 120 of them handshaking at the same instant (after our restart)."""
    load = HandshakeLoad()
    rng = random.Random(11)
    events = [rng.uniform(0, 120) + 120 * k for _ in range(2000) for k in range(5)]
    events += [300.0] * 120
    assert not any(load.arrived(t) for t in sorted(events))
    assert load.entered == 0


def test_many_peers_handshaking_at_once_all_get_responses() -> None:
    b = WgDevice(os.urandom(32))
    peers = []
    for i in range(100):
        p = WgDevice(os.urandom(32))
        ip = f"10.1.{i}.1"
        p.set_peer(b.public, [B_IP + "/32"])
        b.set_peer(p.public, [ip + "/32"])
        peers.append((p, ip))
    inits = [p.send_ip(ip4(ip, B_IP), 1.0, WALL0)[0].data for p, ip in peers]
    kinds = [classify(t.data) for i, m in enumerate(inits)
             for t in b.receive(m, 1.0, WALL0, src=("udp", (f"203.0.113.{i}", 41641))).transmits]
    assert kinds == [MSG_RESPONSE] * 100 and not b.under_load(1.0)


def test_the_meter_switches_on_within_a_fraction_of_a_second_and_holds_for_a_second() -> None:
    load = HandshakeLoad()
    t, on_at = 0.0, None
    while t < 2.0:
        t += 1 / 5000
        if load.arrived(t) and on_at is None:
            on_at = t
    assert on_at is not None and on_at < 0.05
    assert load.under_load(t + UNDER_LOAD_AFTER_TIME - 1e-6) and not load.under_load(t + UNDER_LOAD_AFTER_TIME)
    # a real queue's depth still works as in wireguard-go
    assert HandshakeLoad().under_load(0.0, backlog=UNDER_LOAD_BACKLOG)
    assert not HandshakeLoad().under_load(0.0, backlog=UNDER_LOAD_BACKLOG - 1)


def test_the_rate_limiter_stays_under_its_cap_with_a_million_sources() -> None:
    limiter = RateLimiter()
    largest = 0
    for i in range(1_000_000):  # all within 0.1 s: no bucket refills, the worst case
        limiter.allow(i, 1.0 + i * 1e-7)
        largest = max(largest, len(limiter))
    assert largest == RATELIMIT_MAX_SOURCES and limiter.refused == 1_000_000 - RATELIMIT_MAX_SOURCES
    # once they have refilled, a new source is welcome and the old ones go
    assert limiter.allow("late", 2.0) and len(limiter) == 1


def test_the_rate_limiter_forgets_refilled_sources_as_it_goes() -> None:
    limiter = RateLimiter()
    for i in range(100_000):  # 10,000 new sources a second: 2,500 within a refill time
        assert limiter.allow(i, i * 1e-4)
        assert len(limiter) <= 2501
    assert limiter.refused == 0


def test_rate_limiter_refills_at_twenty_a_second() -> None:
    limiter = RateLimiter()
    assert sum(limiter.allow("x", 0.0) for _ in range(10)) == RATELIMIT_BURST
    assert sum(limiter.allow("x", 1.0 + i / 100) for i in range(100)) in range(20, 20 + RATELIMIT_BURST + 1)
    assert not limiter.allow("x", 0.5)  # a clock that went back gives nothing


def test_cookie_replies_open_with_libsodium_xchacha20() -> None:
    checker = CookieChecker(os.urandom(32))
    msg = os.urandom(148)
    for _ in range(3):
        reply = checker.create_reply(msg, 9, b"source", 1.0)
        cookie = xaead_decrypt(checker.encryption_key, reply[8:32], reply[32:64], msg[116:132])
        assert cookie == mac(checker.secret, b"source")
    assert len({checker.create_reply(msg, 9, b"s", 1.0)[8:32] for _ in range(100)}) == 100  # nonces never repeat


def test_hchacha20_vector_and_xchacha20_equivalence() -> None:
    # draft-irtf-cfrg-xchacha-03 §2.2.1
    out = hchacha20(bytes(range(32)), bytes.fromhex("000000090000004a0000000031415927"))
    assert out.hex() == "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    key, nonce = os.urandom(32), os.urandom(24)
    assert xaead_encrypt(key, nonce, b"cookie", b"ad") == \
        ChaCha20Poly1305(hchacha20(key, nonce[:16])).encrypt(bytes(4) + nonce[16:], b"cookie", b"ad")


def test_cached_private_keys_give_the_same_shared_secrets() -> None:
    keys = [os.urandom(32) for _ in range(40)]  # more than the cache holds
    publics = [public_key(k) for k in keys]
    for _ in range(2):
        for i in range(0, 40, 2):
            assert dh(keys[i], publics[i + 1]) == dh(keys[i + 1], publics[i])

