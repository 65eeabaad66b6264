"""Every timer of wireguard-go (timers.go, constants.go) in simulated time."""

from __future__ import annotations

import bisect
import itertools
import random
import time
from collections import deque

from tests.unit.wg.sim import A_IP, B_IP, WALL0, Sim, ip4, kind, pair
from trionet.wg.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    RECEIVING_REKEY_AFTER,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    ZERO_KEYS_AFTER,
)

EPS = 1e-9
JITTER_MAX = 0.333


def test_24_simulated_hours_of_rekeys_keepalives_and_no_loss() -> None:
    started = time.perf_counter()
    a, b = pair()
    sim = Sim(a, b)
    sent: list[float] = []
    half = 12 * 3600.0
    reply = {"on": True}

    def app(now: float) -> float:
        sim.send("a", ip4(A_IP, B_IP, b"%d" % len(sent) + b"." * 30))
        sent.append(now)
        if reply["on"]:
            sim.send("b", ip4(B_IP, A_IP))
        return now + 1.0

    sim.run(half, app, 0.0)
    # phase 2: one way only; b answers with passive keepalives
    reply["on"] = False
    mark = len(sim.events)
    sim.run(2 * half, app, sim.now + 1.0)

    # no packet lost, across ~720 rekeys
    to_b = [p for _, dst, p in sim.delivered if dst == "b"]
    assert len(to_b) == len(sent) >= 86400
    replies = len([1 for t in sent if t <= half])
    assert len([1 for _, dst, _ in sim.delivered if dst == "a"]) == replies

    # rekeys: a (the initiator) starts one on the first send after REKEY_AFTER_TIME
    inits = sim.times("a", "initiation")
    assert sim.times("b", "initiation") == []
    gaps = [y - x for x, y in itertools.pairwise(inits)]
    assert all(REKEY_AFTER_TIME < g <= REKEY_AFTER_TIME + 1.0 + EPS for g in gaps), (min(gaps), max(gaps))
    assert 710 <= len(inits) <= 720
    assert a.counters["handshakes_completed"] == len(inits) == b.counters["handshakes_completed"]
    assert a.counters["handshake_retransmits"] == 0 and a.counters["new_handshake_no_reply"] == 0
    assert a.counters["keys_zeroed"] == 0 and b.counters["keys_zeroed"] == 0

    # keepalives: phase 1 only the initiator's confirmation after each handshake
    ka_a1 = [t for t, s, k in sim.events[:mark] if s == "a" and k == "keepalive"]
    ka_b1 = [t for t, s, k in sim.events[:mark] if s == "b" and k == "keepalive"]
    # (the first handshake is confirmed by the staged data packet instead)
    assert ka_b1 == [] and ka_a1 == [t for t in inits[1:] if t < half]
    # phase 2: b sends a passive keepalive exactly KEEPALIVE_TIMEOUT after it started
    # receiving data unanswered, then every KEEPALIVE_TIMEOUT while data keeps coming
    ka_b2 = [t for t, s, k in sim.events[mark:] if s == "b" and k == "keepalive"]
    sends_b = [t for t, s, k in sim.events if s == "b"]
    for t in ka_b2:
        previous = sends_b[bisect.bisect_left(sends_b, t - EPS) - 1]
        assert KEEPALIVE_TIMEOUT - EPS <= t - previous <= KEEPALIVE_TIMEOUT + 1.0 + EPS
    assert len(ka_b2) >= 12 * 360 - 400
    assert not a.drops and not b.drops
    assert time.perf_counter() - started < 60


def test_silent_peer_new_handshake_retries_give_up_and_zero_keys() -> None:
    a, b = pair(seed=3)
    sim = Sim(a, b)

    def ping(now: float) -> float:
        sim.send("a", ip4(A_IP, B_IP))
        sim.send("b", ip4(B_IP, A_IP))
        return now + 1.0

    sim.run(30.0, ping, 0.0)
    created = a.peers[b.public].current.created  # type: ignore[union-attr]
    # b goes silent; a keeps sending for 60 s, then stops
    sim.silent.add("b")
    mark = len(sim.events)
    silent_at = sim.now
    last_heard = max(t for t, dst, _ in sim.delivered if dst == "a")

    def one_way(now: float) -> float | None:
        sim.send("a", ip4(A_IP, B_IP))
        return now + 1.0 if now < silent_at + 60 else None

    sim.run(silent_at + 1000, one_way, silent_at + 1.0)
    inits = [t for t, s, k in sim.events[mark:] if s == "a" and k == "initiation"]
    # first retry: KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (+ jitter) after data sent with no reply
    first_unanswered = min(t for t, s, k in sim.events[mark:] if s == "a" and k == "data" and t > last_heard)
    assert first_unanswered + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - EPS <= inits[0]
    assert inits[0] <= first_unanswered + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + JITTER_MAX + EPS
    gaps = [y - x for x, y in itertools.pairwise(inits)]
    assert all(REKEY_TIMEOUT - EPS <= g <= REKEY_TIMEOUT + JITTER_MAX + EPS for g in gaps), gaps
    assert a.counters["handshake_gave_up"] == 1
    # the retries after the app stopped: MAX_TIMER_HANDSHAKES + 1 retransmits, then give up
    assert a.counters["handshake_retransmits"] >= MAX_TIMER_HANDSHAKES + 1
    # keys zeroed exactly 3 * REJECT_AFTER_TIME after the last session was derived
    assert a.counters["keys_zeroed"] == 1
    assert a.peers[b.public].current is None and a.peers[b.public].handshake is None
    # data is never sent on a session older than REJECT_AFTER_TIME
    derived = max(t for t, s, k in sim.events[:mark] if s == "b" and k == "response")
    assert derived == created
    data_times = [t for t, s, k in sim.events[mark:] if s == "a" and k == "data"]
    assert data_times and all(t < derived + REJECT_AFTER_TIME for t in data_times)
    # give-up: 20 initiations in all for the last attempt run (MaxTimerHandshakes + 2)
    gave_up = sim.times("a", "gave_up")
    assert len(gave_up) == 1
    run = [t for t in inits if t > silent_at + 60 + KEEPALIVE_TIMEOUT]
    assert len([t for t in inits if t <= gave_up[0]]) >= MAX_TIMER_HANDSHAKES + 2
    assert run[-1] < gave_up[0] <= run[-1] + REKEY_TIMEOUT + JITTER_MAX + EPS
    assert sim.times("a", "keys_zeroed") == [derived + ZERO_KEYS_AFTER]


def test_unanswered_initiations_at_exact_instants_then_give_up_and_zero() -> None:
    a, b = pair(seed=11)
    sim = Sim(a, b)
    sim.silent.add("b")
    sim.send("a", ip4(A_IP, B_IP))  # staged; initiation at 0
    sim.run(1000.0)
    inits = sim.times("a", "initiation")
    # replay the injected RNG: each retransmit REKEY_TIMEOUT + randrange(334) ms after the last
    rng = random.Random(11)
    expected = [0.0]
    for _ in range(MAX_TIMER_HANDSHAKES + 1):
        expected.append(expected[-1] + REKEY_TIMEOUT + rng.randrange(334) / 1000)
    assert inits == expected  # MaxTimerHandshakes + 2 = 20 initiations
    gave_up = expected[-1] + REKEY_TIMEOUT + rng.randrange(334) / 1000
    assert sim.times("a", "gave_up") == [gave_up]
    assert a.peers[b.public].staged == deque()  # flushed at give-up
    assert a.drops["staged_flushed"] == 1
    assert sim.times("a", "keys_zeroed") == [gave_up + ZERO_KEYS_AFTER]
    assert a.next_deadline() is None


def test_persistent_keepalive_and_reject_after_time() -> None:
    a, b = pair(seed=5)
    a.set_peer(b.public, [B_IP + "/32"], persistent_keepalive=25)
    sim = Sim(a, b)
    sim.run(300.0)
    # set live: a keepalive at once, which needs a handshake; then every 25 s of silence
    inits = sim.times("a", "initiation")
    ka = sim.times("a", "keepalive")
    assert inits[0] == 0.0 and ka[0] == 0.0
    assert all(abs((y - x) - 25) < EPS for x, y in itertools.pairwise(ka) if y not in inits), ka
    # keepalives are sent on a session no older than REJECT_AFTER_TIME; then a new handshake
    assert all(b_ - a_ >= REKEY_AFTER_TIME - EPS for a_, b_ in itertools.pairwise(inits))
    assert len(inits) >= 2
    # turn it off live: no more traffic from a after the next zeroing
    a.set_peer(b.public, [B_IP + "/32"], persistent_keepalive=None)
    mark = len(sim.events)
    sim.run(2000.0)
    assert [k for t, s, k in sim.events[mark:] if s == "a" and k in ("keepalive", "initiation")] == []
    assert sim.times("a", "keys_zeroed")


def test_rekey_and_reject_after_messages() -> None:
    a, b = pair()
    sim = Sim(a, b)
    sim.send("a", ip4(A_IP, B_IP))
    sim.send("b", ip4(B_IP, A_IP))
    kb = b.peers[a.public].current
    assert kb is not None and not kb.initiator
    # the responder rekeys on messages too (keepKeyFreshSending: nonce > REKEY_AFTER_MESSAGES)
    kb.send_counter = REKEY_AFTER_MESSAGES + 1
    sim.now = 10.0
    sim.send("b", ip4(B_IP, A_IP))
    assert sim.times("b", "initiation") == [10.0]
    # a session at REJECT_AFTER_MESSAGES is never used: the packet waits for a handshake
    a.reset_sessions(b.public)
    sim.now = 20.0
    sim.send("a", ip4(A_IP, B_IP))
    ka = a.peers[b.public].current
    assert ka is not None
    ka.send_counter = REJECT_AFTER_MESSAGES
    sim.now = 40.0
    before = len([1 for _, d, _ in sim.delivered if d == "b"])
    sim.send("a", ip4(A_IP, B_IP))
    assert sim.times("a", "initiation")[-1] == 40.0
    assert len([1 for _, d, _ in sim.delivered if d == "b"]) == before + 1  # delivered on the new session


def test_receiving_initiator_rekeys_at_165_s() -> None:
    a, b = pair()
    sim = Sim(a, b)
    sim.send("a", ip4(A_IP, B_IP))
    sim.run(RECEIVING_REKEY_AFTER)  # b's passive keepalive at 10 s; nothing else
    assert sim.times("a", "initiation") == [0.0]
    sim.now = RECEIVING_REKEY_AFTER + 0.5
    sim.send("b", ip4(B_IP, A_IP))
    assert sim.times("a", "initiation") == [0.0, RECEIVING_REKEY_AFTER + 0.5]
    # only once per session (sentLastMinuteHandshake)
    assert a.counters["handshakes_completed"] == 2


def test_responder_waits_for_confirmation_before_sending() -> None:
    a, b = pair()
    init = a.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)
    got = b.receive(init[0].data, 0.0, WALL0, src="path-a")
    assert [t.path for t in got.transmits] == ["path-a"]  # the response goes back where it came from
    # b has only a `next` session: its data waits (and, as in wireguard-go's
    # SendStagedPackets, with no current session b starts a handshake of its own)
    assert [kind(t) for t in b.send_ip(ip4(B_IP, A_IP), 0.1, WALL0)] == ["initiation"]
    assert b.peer_statistics(a.public)["queued"] == 1
    back = a.receive(got.transmits[0].data, 0.2, WALL0, src="path-b")
    assert len(back.transmits) == 1  # the staged packet confirms the session
    got2 = b.receive(back.transmits[0].data, 0.3, WALL0, src="path-a")
    assert len(got2.packets) == 1 and len(got2.transmits) == 1  # b's staged packet goes out now
    assert a.receive(got2.transmits[0].data, 0.4, WALL0).packets


def test_next_deadline_is_none_when_idle_and_deadlines_are_honest() -> None:
    a, b = pair()
    assert a.next_deadline() is None
    sim = Sim(a, b)
    sim.send("a", ip4(A_IP, B_IP))
    d = a.next_deadline()
    assert d is not None
    # ticking before the deadline does nothing
    assert a.tick(d - 0.001, WALL0) == []


def _earliest(dev: object) -> float:
    timers = [t for p in dev.peers.values()  # type: ignore[attr-defined]
              for t in (p.t_retransmit_handshake, p.t_send_keepalive, p.t_new_handshake,
                        p.t_zero_key_material, p.t_persistent_keepalive) if t is not None]
    return min(timers, default=float("inf"))


def test_soonest_never_runs_later_than_any_pending_timer() -> None:
    """A driver sleeping to `soonest` between ticks must never sleep through a timer:
    whatever traffic, loss and rekeys set, `soonest` stays at or before the earliest."""
    a, b = pair()
    sim = Sim(a, b)
    rng = random.Random(3)
    checked = 0

    def app(now: float) -> float:
        nonlocal checked
        sim.silent = {"a"} if rng.random() < 0.1 else set()  # some lost bursts: retries, timeouts
        sim.send(rng.choice("ab"), ip4(A_IP, B_IP) if rng.random() < 0.5 else ip4(B_IP, A_IP))
        for dev in (a, b):
            assert dev.soonest <= _earliest(dev) + EPS
            checked += 1
        return now + rng.choice((0.5, 3.0, 11.0, 40.0, 130.0))

    sim.run(6 * 3600.0, app, 0.0)
    assert checked > 1000
    assert a.counters["handshakes_completed"] > 50
