"""One clock: wall time follows Trio's, so a MockClock moves it too."""

from __future__ import annotations

import time

import trio
import trio.testing

from trionet import clock


async def test_wall_time_moves_with_simulated_time(autojump_clock: trio.testing.MockClock) -> None:
    start = clock.wall()
    assert abs(start - time.time()) < 5
    await trio.sleep(86400)  # a simulated day, no real wait
    assert abs(clock.wall() - start - 86400) < 1e-6
    assert abs(clock.trio_time_of(clock.wall() + 60) - (trio.current_time() + 60)) < 1e-6


def test_outside_a_run_wall_is_the_system_clock() -> None:
    assert abs(clock.wall() - time.time()) < 1
