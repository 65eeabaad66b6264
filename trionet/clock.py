"""One clock for the whole node: Trio's.

Drivers read `trio.current_time()` and pass it to the sans-IO cores as `now`
(monotonic seconds). Where a wall-clock time is needed (WireGuard's TAI64N
timestamps, the node key's expiry, when the status last changed), `wall()`
derives it from the same clock: the wall time when this Trio run first asked,
plus the Trio time elapsed since. Under `trio.testing.MockClock` the wall clock
therefore moves with simulated time, and a test can take a whole node through a
simulated day (renewals, rekeys, backoff) in seconds.

A wall clock that jumps (NTP stepping it) does not move ours: what trionet does
with wall time (expiry a day or hours ahead, strictly increasing handshake
timestamps) is better served by a clock that never goes back.
"""

from __future__ import annotations

import time

import trio
from trio.lowlevel import RunVar

_WALL_MINUS_TRIO: RunVar[float] = RunVar("trionet_wall_minus_trio")


def now() -> float:
    """Trio's clock: what drivers pass to the cores as `now`."""
    return trio.current_time()


def _offset() -> float:
    try:
        return _WALL_MINUS_TRIO.get()
    except LookupError:
        offset = time.time() - trio.current_time()
        _WALL_MINUS_TRIO.set(offset)
        return offset


def wall() -> float:
    """Seconds since the epoch, moving with Trio's clock (see the module docstring);
    outside a Trio run, the system's wall clock."""
    try:
        return _offset() + trio.current_time()
    except RuntimeError:  # not in a Trio run: no Trio clock to follow
        return time.time()


def trio_time_of(wall_time: float) -> float:
    """The Trio time at which `wall()` reads `wall_time`: what to sleep until."""
    return wall_time - _offset()
