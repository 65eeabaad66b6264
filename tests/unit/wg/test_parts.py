"""Replay window (wireguard-go replay/replay.go semantics) and AllowedIPs."""

from __future__ import annotations

import ipaddress
import random

from trionet.wg.allowedips import AllowedIPs
from trionet.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE
from trionet.wg.replay import ReplayWindow


def test_replay_window_size_is_wireguard_gos() -> None:
    assert REPLAY_WINDOW_SIZE == 8128


def test_replay_in_order_out_of_order_and_too_old() -> None:
    w = ReplayWindow()
    assert w.validate(0) and not w.validate(0)
    assert w.validate(2) and w.validate(1) and not w.validate(1)
    top = 20_000
    assert w.validate(top)
    assert w.validate(top - REPLAY_WINDOW_SIZE)  # the oldest counter still in the window
    assert not w.validate(top - REPLAY_WINDOW_SIZE - 1)
    assert w.validate(top - 1) and not w.validate(top - 1)
    assert not w.validate(top)
    assert not w.validate(REJECT_AFTER_MESSAGES)
    assert w.validate(REJECT_AFTER_MESSAGES - 1)


def test_replay_matches_a_reference_model() -> None:
    rng = random.Random(5)
    w = ReplayWindow()
    seen: set[int] = set()
    last = 0
    for _ in range(50_000):
        c = max(0, last + rng.randint(-9000, 300))
        expect = c not in seen and (c > last or last - c <= REPLAY_WINDOW_SIZE)
        assert w.check(c) == expect
        assert w.validate(c) == expect, (c, last)
        if expect:
            seen.add(c)
            last = max(last, c)


def test_allowed_ips_longest_prefix() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    for net, v in [("0.0.0.0/0", "default"), ("10.0.0.0/8", "ten"), ("10.1.0.0/16", "ten-one"),
                   ("10.1.2.3/32", "host"), ("::/0", "v6"), ("fd7a:115c:a1e0::/48", "ts")]:
        t.insert(ipaddress.ip_network(net), v)
    assert t.lookup(ipaddress.ip_address("10.1.2.3")) == "host"
    assert t.lookup(ipaddress.ip_address("10.1.2.4")) == "ten-one"
    assert t.lookup(ipaddress.ip_address("10.2.0.1")) == "ten"
    assert t.lookup(ipaddress.ip_address("1.1.1.1")) == "default"
    assert t.lookup(ipaddress.ip_address("fd7a:115c:a1e0::1")) == "ts"
    assert t.lookup(ipaddress.ip_address("2001:db8::1")) == "v6"
    t.remove_value("host")
    assert t.lookup(ipaddress.ip_address("10.1.2.3")) == "ten-one"
    assert sorted(map(str, t.networks_of("ten"))) == ["10.0.0.0/8"]


def test_handshake_state_reprs_hold_no_key_material() -> None:
    from trionet.wg.handshake import ConsumedInitiation, InitiationState, SessionKeys

    secret = bytes(range(32))
    shown = " ".join(map(repr, (InitiationState(7, secret, secret, secret), SessionKeys(secret, secret),
                                ConsumedInitiation(b"p" * 32, 7, b"e" * 32, secret, secret, b"t" * 12))))
    assert secret.hex() not in shown and repr(secret) not in shown
    assert "local_index=7" in shown
