"""How loaded the handshake path is, for a driver without a handshake queue (sans-IO).

wireguard-go hands handshake messages to worker goroutines through a queue of
1,024 and is "under load" while 128 or more wait there (IsUnderLoad), and for
1 s after: then an initiation or response without a valid mac2 gets a cookie
reply instead of a handshake, and those with one are rate limited per source.

trionet handles each datagram inline, in the task that read it: there is no
queue to measure. `HandshakeLoad` models one. Every handshake message that
passed mac1 joins it, and it drains at `service_rate` messages a second: the
full handshakes we are willing to run on the reader task (each costs a few
hundred microseconds of X25519 and BLAKE2s). The model's depth is what the
queue would hold; 128 or more is under load, as in wireguard-go.

- A tailnet re-keying with us (each peer every 2 minutes: a few messages a
  second, or a burst of under 128 at once) leaves it near 0: never under load.
- A flood of thousands of initiations a second fills it within tens of
  milliseconds; it stays under load while the rate stays above `service_rate`
  and for `hold` (1 s) after it drops below. The depth is capped at the
  threshold, so a long flood leaves nothing to drain.

The state is three numbers, whatever the input. Time is passed in.
"""

from __future__ import annotations

from trionet.wg.constants import HANDSHAKE_SERVICE_RATE, UNDER_LOAD_AFTER_TIME, UNDER_LOAD_BACKLOG

__all__ = ["HandshakeLoad"]


class HandshakeLoad:
    __slots__ = ("_at", "_depth", "_until", "entered", "hold", "service_rate", "threshold")

    def __init__(self, service_rate: float = HANDSHAKE_SERVICE_RATE, threshold: int = UNDER_LOAD_BACKLOG,
                 hold: float = UNDER_LOAD_AFTER_TIME) -> None:
        self.service_rate = service_rate
        self.threshold = threshold
        self.hold = hold
        self._depth = 0.0
        self._at = float("-inf")  # when _depth was last updated
        self._until = float("-inf")  # under load before this time
        self.entered = 0  # times the device went under load

    def depth(self, now: float) -> float:
        """The modelled queue's depth at `now`."""
        elapsed = now - self._at
        if elapsed <= 0.0:  # also a clock that stepped back: nothing drained
            return self._depth
        return max(0.0, self._depth - elapsed * self.service_rate)

    def arrived(self, now: float, count: int = 1, backlog: int = 0) -> bool:
        """`count` handshake messages arrived at `now`: True if we are under load for them.

        `backlog` is a real queue's depth, for a driver that has one (wireguard-go's
        rule applies to it unchanged)."""
        self._depth = min(float(self.threshold), self.depth(now) + count)
        if now > self._at:
            self._at = now
        return self.under_load(now, backlog)

    def under_load(self, now: float, backlog: int = 0) -> bool:
        """wireguard-go's IsUnderLoad: a deep queue (modelled, or `backlog`) puts us
        under load for `hold` seconds from now."""
        if backlog >= self.threshold or self.depth(now) >= self.threshold:
            if now >= self._until:
                self.entered += 1
            self._until = now + self.hold
            return True
        return now < self._until
