"""Congestion control: one small pluggable class (RFC 5681 / RFC 6582 NewReno)."""

from __future__ import annotations


class NewReno:
    """Slow start, congestion avoidance, and the NewReno recovery window.

    The connection tells it what happened; it owns ``cwnd`` and ``ssthresh``.
    Another algorithm implements the same five methods.
    """

    def __init__(self, mss: int, initial_window: int = 10) -> None:
        self.mss = mss
        self.cwnd = initial_window * mss
        self.ssthresh = 1 << 30
        self._acc = 0

    def on_ack(self, acked: int, in_recovery: bool) -> None:
        if in_recovery:
            return
        if self.cwnd < self.ssthresh:
            self.cwnd += min(acked, 2 * self.mss) if acked < 8 * self.mss else acked
        else:
            self._acc += acked
            if self._acc >= self.cwnd:
                self._acc -= self.cwnd
                self.cwnd += self.mss

    def on_enter_recovery(self, flight: int) -> None:
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh + 3 * self.mss

    def on_dupack_in_recovery(self) -> None:
        self.cwnd += self.mss

    def on_exit_recovery(self, flight: int) -> None:
        self.cwnd = min(self.ssthresh, max(flight, self.mss) + self.mss)

    def on_partial_ack(self, acked: int) -> None:
        self.cwnd = max(self.cwnd - acked + self.mss, self.mss)

    def on_rto(self, flight: int) -> None:
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self._acc = 0
