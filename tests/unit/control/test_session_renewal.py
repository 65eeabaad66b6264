"""When the node key is renewed: parsing Go times and the schedule, without a server."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from trionet import keys
from trionet.control.session import (
    MIN_RENEW_INTERVAL,
    RENEW_BEFORE,
    ControlSession,
    parse_go_time,
    renewal_due,
)
from trionet.status import StatusMachine

DAY = 24 * 3600.0


@pytest.mark.parametrize(("text", "expected"), [
    (None, None), ("", None), ("0001-01-01T00:00:00Z", None),
    ("2026-11-25T07:40:00Z", 1795592400.0),
    ("2026-11-25T07:40:00.123456789Z", 1795592400.123456),
    ("2026-11-25T08:40:00.5+01:00", 1795592400.5),
    ("not a time", None),
])
def test_parse_go_time(text: str | None, expected: float | None) -> None:
    assert parse_go_time(text) == (pytest.approx(expected) if expected is not None else None)


def test_a_long_lived_key_is_renewed_a_day_before_expiry() -> None:
    since, expiry = 0.0, 180 * DAY
    assert renewal_due(expiry, since, now=10.0) == expiry - RENEW_BEFORE


def test_a_short_lived_key_is_renewed_a_third_of_its_life_early() -> None:
    assert renewal_due(expiry=1090.0, key_since=1000.0, now=1010.0) == pytest.approx(1060.0)
    # an unknown start counts from now, so the margin only shrinks
    assert renewal_due(expiry=1090.0, key_since=None, now=1030.0) == pytest.approx(1070.0)


def _session(tmp_path: Path) -> ControlSession:
    state = keys.load_or_create_state(tmp_path)
    return ControlSession(SimpleNamespace(auth_key="k"), state, None, lambda *_: None, StatusMachine(),
                          random.Random(1))


def test_schedule_follows_the_netmap_expiry_and_never_loops(tmp_path: Path) -> None:
    session = _session(tmp_path)
    assert session.renewal_time(1000.0) is None  # no expiry, no renewal
    session.state.node_key_since = 0.0
    session._note_expiry(SimpleNamespace(KeyExpiry="1970-01-01T00:05:00Z"))  # expires at 300 s
    assert session.key_expiry == 300.0
    assert session.renewal_time(100.0) == pytest.approx(200.0)
    # just renewed: not again within the minimum interval, even if already due
    session._last_renewal = 250.0
    assert session.renewal_time(260.0) == 250.0 + MIN_RENEW_INTERVAL
    # the server took the new key but kept the expiry: wait for it, then log in again
    session._renewed_against = 300.0
    session.key_expiry = None
    session._note_expiry(SimpleNamespace(KeyExpiry="1970-01-01T00:05:00Z"))
    assert session.renewal_time(260.0) == 310.0  # max(expiry, last renewal + interval)
    session._note_expiry(None)
    assert session.key_expiry is None and session.renewal_time(400.0) is None
