"""PathChooser in simulated time: DERP until a UDP pong proves a path."""

from __future__ import annotations

import itertools

from trionet.magicsock.paths import (
    HEARTBEAT_INTERVAL,
    TRUST_UDP_ADDR,
    CallMeMaybeAction,
    PathChooser,
    PingAction,
)

PEER = b"\x01" * 32
DISCO = b"\x02" * 32
EP = ("10.213.0.11", 41641)


def chooser() -> PathChooser:
    counter = itertools.count()
    c = PathChooser(txid_source=lambda: next(counter).to_bytes(12, "big"))
    c.upsert_peer(PEER, DISCO, 999, [EP])
    return c


def test_unproven_path_sends_on_derp_and_pings_candidates() -> None:
    c = chooser()
    assert c.paths_for_send(PEER, 0.0) == (None, 999)
    actions = c.poll(0.0)
    assert [type(a) for a in actions] == [PingAction, CallMeMaybeAction]
    assert actions[0].addr == EP  # type: ignore[union-attr]
    # no second ping to the same candidate within 5 s
    assert not [a for a in c.poll(1.0) if isinstance(a, PingAction)]


def test_pong_makes_udp_trusted_then_it_lapses() -> None:
    c = chooser()
    c.paths_for_send(PEER, 0.0)
    ping = c.poll(0.0)[0]
    assert isinstance(ping, PingAction)
    assert c.on_pong(PEER, ping.txid, EP, 0.01)
    assert c.paths_for_send(PEER, 0.02) == (EP, 0)  # trusted: UDP only
    # without heartbeats' pongs, trust lapses and DERP is used again (with UDP too)
    assert c.paths_for_send(PEER, 0.01 + TRUST_UDP_ADDR + 0.1) == (EP, 999)


def test_heartbeat_keeps_trust_while_active() -> None:
    c = chooser()
    c.paths_for_send(PEER, 0.0)
    ping = c.poll(0.0)[0]
    assert isinstance(ping, PingAction)
    c.on_pong(PEER, ping.txid, EP, 0.0)
    now = 0.0
    for _ in range(20):
        now += 1.0
        c.paths_for_send(PEER, now)
        for action in c.poll(now):
            assert isinstance(action, PingAction) and action.addr == EP
            c.on_pong(PEER, action.txid, EP, now + 0.001)
        assert c.paths_for_send(PEER, now + 0.5)[1] == 0, f"lost trust at {now}"
    assert c.peers[PEER].pongs >= 20 // HEARTBEAT_INTERVAL


def test_unknown_or_late_pong_is_ignored() -> None:
    c = chooser()
    c.paths_for_send(PEER, 0.0)
    ping = c.poll(0.0)[0]
    assert isinstance(ping, PingAction)
    assert not c.on_pong(PEER, b"x" * 12, EP, 0.1)
    assert not c.on_pong(PEER, ping.txid, EP, 6.0)  # after the 5 s ping timeout
    assert c.paths_for_send(PEER, 6.1) == (None, 999)


def test_call_me_maybe_replaces_learned_and_pings() -> None:
    c = chooser()
    actions = c.on_call_me_maybe(PEER, [("10.0.0.9", 1), ("10.0.0.9", 2)], 0.0)
    assert sorted(a.addr for a in actions if isinstance(a, PingAction)) == [("10.0.0.9", 1), ("10.0.0.9", 2)]
    c.on_call_me_maybe(PEER, [("10.0.0.9", 3)], 1.0)
    assert set(c.peers[PEER].learned) == {("10.0.0.9", 3)}


def test_new_disco_key_forgets_proven_path() -> None:
    c = chooser()
    c.paths_for_send(PEER, 0.0)
    ping = c.poll(0.0)[0]
    assert isinstance(ping, PingAction)
    c.on_pong(PEER, ping.txid, EP, 0.0)
    c.upsert_peer(PEER, b"\x03" * 32, 999, [EP])
    assert c.paths_for_send(PEER, 0.1) == (None, 999)


def test_idle_peer_is_not_pinged() -> None:
    c = chooser()
    assert c.poll(0.0) == []  # never sent to: nothing to do
