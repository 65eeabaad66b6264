"""Our WireGuard device against wireguard-go and the Linux kernel behind it.

A network namespace joined to ours by a veth; wireguard-go runs in it (see
`wgpeer`), the kernel behind it answers ICMP, and our device talks to it over
a UDP socket from this process. Needs root, wireguard-go, wg and ip: a missing
tool fails the test, it never skips.
"""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.wgpeer import OUR_TUN_IP, THEIR_TUN_IP, Ours, WgGoPeer, icmp_echo, is_echo_reply, new_private
from trionet.wg.constants import REKEY_AFTER_TIME

pytestmark = [pytest.mark.integration, pytest.mark.netns]


@pytest.fixture
def wg_go(tmp_path: Path) -> Iterator[WgGoPeer]:
    peer = WgGoPeer(tmp_path)
    try:
        yield peer
    finally:
        peer.close()


@pytest.fixture
def ours(wg_go: WgGoPeer) -> Iterator[Ours]:
    o = Ours(wg_go)
    try:
        yield o
    finally:
        o.close()


def ping_flood(ours: Ours, total: int, batch: int, gap: float, ident: int) -> set[int]:
    """Send `total` echo requests in batches; return the sequence numbers answered."""
    ours.received.clear()
    for start in range(0, total, batch):
        for seq in range(start, min(total, start + batch)):
            ours.send_ip(icmp_echo(OUR_TUN_IP, THEIR_TUN_IP, ident, seq % 65536))
        ours.pump(gap)
    deadline = time.monotonic() + 10
    while ours.echo_replies() < total and time.monotonic() < deadline:
        ours.pump(0.2)
    return {struct.unpack_from("!H", p, 26)[0] for p in ours.received if is_echo_reply(p)}


def test_we_initiate_and_10000_echoes_without_loss(wg_go: WgGoPeer, ours: Ours) -> None:
    wg_go.start(ours.dev.public, ours.port)
    ours.send_ip(icmp_echo(OUR_TUN_IP, THEIR_TUN_IP, 7, 0))  # staged; an initiation goes out
    ours.pump(3)
    assert any(is_echo_reply(p) for p in ours.received), ours.dev.statistics()
    assert ours.dev.counters["initiations_sent"] == 1
    assert ours.dev.counters["handshakes_completed"] == 1

    total = 10_000
    answered = ping_flood(ours, total, batch=100, gap=0.02, ident=9)
    assert ours.echo_replies() == total and len(answered) == total, ours.dev.statistics()
    assert not ours.dev.drops, ours.dev.drops
    stats = ours.dev.peer_statistics(wg_go.public)
    assert stats["rx_packets"] >= total + 1 and stats["tx_packets"] >= total + 1


def test_it_initiates_after_a_restart_and_we_respond(wg_go: WgGoPeer, ours: Ours) -> None:
    wg_go.start(ours.dev.public, ours.port)
    ours.send_ip(icmp_echo(OUR_TUN_IP, THEIR_TUN_IP, 7, 0))
    ours.pump(2)
    assert ours.dev.counters["handshakes_completed"] == 1

    # restart: wireguard-go has no session any more; the kernel pings us, wireguard-go initiates
    wg_go.stop()
    wg_go.start(ours.dev.public, ours.port)
    ours.answer_pings = True
    pinger = subprocess.Popen(["ip", "netns", "exec", wg_go.ns, "ping", "-c", "3", "-W", "2", OUR_TUN_IP],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while pinger.poll() is None:
        ours.pump(0.1)
    out = pinger.stdout.read().decode() if pinger.stdout else ""
    assert pinger.returncode == 0, out
    assert ours.dev.counters["responses_sent"] >= 1
    assert ours.dev.counters["handshakes_completed"] == 2  # confirmed by its first transport packet
    # and our own traffic flows on the session it made
    ours.received.clear()
    ours.send_ip(icmp_echo(OUR_TUN_IP, THEIR_TUN_IP, 8, 1))
    ours.pump(1)
    assert any(is_echo_reply(p) for p in ours.received)
    assert ours.dev.counters["initiations_sent"] == 1


def test_its_persistent_keepalive_initiates(wg_go: WgGoPeer, ours: Ours) -> None:
    wg_go.start(ours.dev.public, ours.port, persistent_keepalive=1)
    ours.pump(3)
    assert ours.dev.counters["responses_sent"] >= 1
    assert ours.dev.counters["handshakes_completed"] >= 1
    assert ours.dev.counters["keepalives_received"] >= 1


def test_our_persistent_keepalive_initiates(wg_go: WgGoPeer) -> None:
    ours = Ours(wg_go, persistent_keepalive=1.0)
    try:
        wg_go.start(ours.dev.public, ours.port)
        ours.pump(3.5)
        assert ours.dev.counters["initiations_sent"] >= 1
        assert ours.dev.counters["handshakes_completed"] == 1
        assert ours.dev.counters["keepalives_sent"] >= 2
    finally:
        ours.close()


def test_wrong_key_is_dropped_and_counted(wg_go: WgGoPeer, ours: Ours) -> None:
    # wireguard-go with a private key we do not know initiates towards us
    wg_go.start(ours.dev.public, ours.port, private=new_private())
    subprocess.run(["ip", "netns", "exec", wg_go.ns, "ping", "-c", "1", "-W", "1", OUR_TUN_IP],
                   capture_output=True)
    ours.pump(1.0)
    assert ours.dev.drops["unknown_peer"] >= 1
    assert ours.dev.counters["handshakes_completed"] == 0
    assert not ours.received


@pytest.mark.soak
def test_soak_across_rekeys_without_loss(wg_go: WgGoPeer, ours: Ours) -> None:
    """Traffic for 200 s (REKEY_AFTER_TIME is 120 s): at least one rekey, zero loss."""
    wg_go.start(ours.dev.public, ours.port)
    ours.send_ip(icmp_echo(OUR_TUN_IP, THEIR_TUN_IP, 5, 0))
    ours.pump(2)
    assert ours.dev.counters["handshakes_completed"] == 1
    duration, rate, batch = REKEY_AFTER_TIME + 80, 100, 10
    ours.received.clear()
    start, sent = time.monotonic(), 0
    while time.monotonic() - start < duration:
        for _ in range(batch):
            ours.send_ip(icmp_echo(OUR_TUN_IP, THEIR_TUN_IP, 6, sent % 65536, payload=struct.pack("!I", sent) * 8))
            sent += 1
        ours.pump(batch / rate)
    deadline = time.monotonic() + 10
    while ours.echo_replies() < sent and time.monotonic() < deadline:
        ours.pump(0.2)
    got = {struct.unpack_from("!I", p, 28)[0] for p in ours.received if is_echo_reply(p)}
    stats = ours.dev.statistics()
    print(f"soak: {time.monotonic() - start:.0f} s, sent {sent}, answered {len(got)}, "
          f"handshakes {stats['counters'].get('handshakes_completed')}, drops {stats['drops']}")
    assert len(got) == sent, f"lost {sent - len(got)} of {sent}"
    assert ours.dev.counters["handshakes_completed"] >= 2, stats
