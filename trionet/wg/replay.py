"""Anti-replay sliding window (RFC 6479 style, as wireguard-go replay/replay.go).

A ring of 128 blocks of 64 bits; the block holding the highest counter seen is
the newest, the other 127 blocks are the window: 8128 counters behind the
highest are still accepted once each.
"""

from __future__ import annotations

from trionet.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_RING_BLOCKS, REPLAY_WINDOW_SIZE

_RING_MASK = REPLAY_RING_BLOCKS - 1


class ReplayWindow:
    __slots__ = ("last", "ring")

    def __init__(self) -> None:
        self.last = 0
        self.ring = [0] * REPLAY_RING_BLOCKS

    def reset(self) -> None:
        self.last = 0
        self.ring = [0] * REPLAY_RING_BLOCKS

    def check(self, counter: int) -> bool:
        """Would `counter` be accepted? (no state change)"""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        if counter > self.last:
            return True
        if self.last - counter > REPLAY_WINDOW_SIZE:
            return False
        return not (self.ring[(counter >> 6) & _RING_MASK] >> (counter & 63)) & 1

    def validate(self, counter: int) -> bool:
        """Accept `counter` once: True the first time, False when replayed or too old."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        ring = self.ring
        block = counter >> 6
        if counter > self.last:
            current = self.last >> 6
            diff = block - current
            if diff:
                if diff > REPLAY_RING_BLOCKS:
                    diff = REPLAY_RING_BLOCKS
                for i in range(current + 1, current + 1 + diff):
                    ring[i & _RING_MASK] = 0
            self.last = counter
        elif self.last - counter > REPLAY_WINDOW_SIZE:
            return False
        i = block & _RING_MASK
        bit = 1 << (counter & 63)
        old = ring[i]
        if old & bit:
            return False
        ring[i] = old | bit
        return True
