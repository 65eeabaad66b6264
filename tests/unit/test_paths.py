"""PathChooser in simulated time: DERP until a UDP pong proves a path."""

from __future__ import annotations

import itertools

from trionet.magicsock.paths import (
    DISCO_PING_INTERVAL,
    FIRST_CONTACT_PROBE,
    FIRST_CONTACT_WINDOW,
    HEARTBEAT_INTERVAL,
    TRUST_UDP_ADDR,
    CallMeMaybeAction,
    PathChooser,
    PingAction,
)

PEER = b"\x01" * 32
DISCO = b"\x02" * 32
EP = ("10.213.0.11", 41641)


def chooser(heard: bool = True) -> PathChooser:
    """A chooser with one peer; `heard`: the peer already knows us (first contact is done)."""
    counter = itertools.count()
    c = PathChooser(txid_source=lambda: next(counter).to_bytes(12, "big"))
    c.upsert_peer(PEER, DISCO, 999, [EP])
    if heard:
        assert c.on_heard(PEER)
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


def test_first_contact_probes_over_derp_until_the_peer_answers() -> None:
    c = chooser(heard=False)
    assert c.next_deadline(0.0) == float("inf")  # idle: nothing to probe
    c.paths_for_send(PEER, 0.0)
    assert c.wake, "the first packet to an unheard peer wakes the driver"
    first = c.poll(0.0)
    probes = [a for a in first if isinstance(a, PingAction) and a.addr is None]
    assert len(probes) == 1 and probes[0].derp_region == 999
    assert any(isinstance(a, PingAction) and a.addr == EP for a in first)
    assert c.next_deadline(0.0) == FIRST_CONTACT_PROBE
    # the peer does not know us yet: a probe every FIRST_CONTACT_PROBE, UDP pings on their 5 s clock
    sent = []
    now = 0.0
    while now < FIRST_CONTACT_WINDOW + 3:
        now += FIRST_CONTACT_PROBE
        sent += [(now, a) for a in c.poll(now) if isinstance(a, PingAction)]
    derp_times = [t for t, a in sent if a.addr is None]
    assert derp_times[0] == FIRST_CONTACT_PROBE and max(derp_times) <= FIRST_CONTACT_WINDOW
    assert len(derp_times) == int(FIRST_CONTACT_WINDOW / FIRST_CONTACT_PROBE)
    assert [t for t, a in sent if a.addr == EP] == [DISCO_PING_INTERVAL, 2 * DISCO_PING_INTERVAL]
    # the window closed: the next thing due is a UDP ping (or CallMeMaybe) on its 5 s clock
    assert now < c.next_deadline(now) <= now + DISCO_PING_INTERVAL


def test_first_reply_rearms_udp_pings_and_ends_probing() -> None:
    c = chooser(heard=False)
    c.paths_for_send(PEER, 0.0)
    c.poll(0.0)  # UDP ping to EP and CallMeMaybe: lost, the peer did not know us yet
    probes = c.poll(0.5)
    assert probes and all(isinstance(a, PingAction) and a.addr is None for a in probes), probes
    assert c.on_heard(PEER) and not c.on_heard(PEER)  # True only the first time
    again = c.poll(0.6)
    assert any(isinstance(a, PingAction) and a.addr == EP for a in again), "UDP ping at once, not at 5 s"
    assert any(isinstance(a, CallMeMaybeAction) for a in again)
    assert not any(isinstance(a, PingAction) and a.addr is None for a in c.poll(1.5))


def test_a_restarted_peer_is_unheard_again() -> None:
    c = chooser()
    c.upsert_peer(PEER, b"\x03" * 32, 999, [EP])  # new disco key: it restarted
    c.paths_for_send(PEER, 0.0)
    assert any(isinstance(a, PingAction) and a.addr is None for a in c.poll(0.0))


def _scenario(poll_at_deadlines: bool) -> list[tuple[float, str]]:
    """Two hours of one peer's life: first contact, traffic in bursts with idle gaps,
    pongs to some pings (a path proven, then lapsing), a CallMeMaybe, new netmap
    endpoints. The driver either polls every 10 ms, or only at `next_deadline` and
    when `wake` is set, as magicsock's disco timer does now."""
    c = chooser(heard=False)
    log: list[tuple[float, str]] = []
    step = 0.01
    now = 0.0
    next_poll = 0.0
    traffic = [(t, t + 40.0) for t in (0.0, 300.0, 1000.0, 1100.0, 5000.0)]  # (start, end) of bursts
    answered = 0
    while now < 7200.0:
        sending = any(a <= now < b for a, b in traffic)
        if sending and round(now / step) % 50 == 0:  # a packet every 0.5 s while active
            c.paths_for_send(PEER, now)
        if abs(now - 20.0) < step / 2 and c.on_heard(PEER):
            c.wake = True  # as magicsock does when on_heard says it is the first time
        if abs(now - 1050.0) < step / 2:
            c.on_call_me_maybe(PEER, [("10.213.0.99", 41641)], now)
        if abs(now - 1060.0) < step / 2:
            c.upsert_peer(PEER, DISCO, 999, [EP, ("10.213.0.12", 41641)])
        if not poll_at_deadlines or c.wake or now >= next_poll:
            c.wake = False
            for action in c.poll(now):
                kind = "cmm" if isinstance(action, CallMeMaybeAction) else f"ping {action.addr}"
                log.append((now, kind))
                # the peer answers every other UDP ping to EP, 30 ms later (in the next rounds)
                if isinstance(action, PingAction) and action.addr == EP:
                    answered += 1
                    if answered % 2:
                        c.on_pong(PEER, action.txid, EP, now + 0.03)
            next_poll = max(c.next_deadline(now), now + 0.001)
        now = round(now + step, 2)
    return log


def test_polling_only_at_next_deadline_does_what_polling_every_10_ms_does() -> None:
    """next_deadline is exact: a driver that sleeps to it (and wakes on `wake`) sends the
    same disco messages as one that polls all the time, each within a poll step."""
    fine, lazy = _scenario(False), _scenario(True)
    assert len(fine) > 100
    assert [kind for _, kind in lazy] == [kind for _, kind in fine]
    assert max(abs(a - b) for (a, _), (b, _) in zip(lazy, fine, strict=True)) <= 0.011


def test_an_idle_chooser_sleeps_until_woken() -> None:
    c = chooser()
    assert c.next_deadline(0.0) == float("inf")  # never active: nothing is due
    c.wake = False
    c.paths_for_send(PEER, 100.0)
    assert c.wake, "traffic to an idle peer must wake the driver"
    assert c.next_deadline(100.0) <= 100.0  # its first ping is due at once
