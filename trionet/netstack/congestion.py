"""Congestion control: one small pluggable class (RFC 5681 NewReno growth, RFC 6937
Proportional Rate Reduction while in loss recovery)."""

from __future__ import annotations


class NewReno:
    """Slow start, congestion avoidance, and the window during loss recovery.

    The connection tells it what happened; it owns ``cwnd`` and ``ssthresh``.
    During fast recovery the connection reports, per ACK, how many bytes left the
    network (``delivered``: newly cumulatively ACKed plus newly SACKed) and how many
    it thinks are still in it (``pipe``, RFC 6675); PRR then sets ``cwnd`` to
    ``pipe`` plus what may be sent now, so the flight shrinks smoothly to
    ``ssthresh`` instead of stopping for half a round trip. Another algorithm
    implements the same methods.
    """

    def __init__(self, mss: int, initial_window: int = 10) -> None:
        self.mss = mss
        self.initial_window = initial_window * mss
        self.cwnd = self.initial_window
        self.ssthresh = 1 << 30
        self._acc = 0
        self._recover_fs = 1
        self._prr_delivered = 0
        self._prr_out = 0

    def on_ack(self, acked: int, in_recovery: bool, flight_high: int) -> None:
        """``flight_high``: the most bytes in flight during the round trip this ACK
        ends. The window grows only while it is what limits the sender (RFC 7661, and
        Linux's tcp_is_cwnd_limited): an application that sends less, or a peer's
        smaller window, would otherwise let it grow without bound, to be spent in one
        burst when the application has more to say."""
        if in_recovery:
            return
        if self.cwnd < self.ssthresh:
            if self.cwnd >= 2 * flight_high:  # slow start may use up to twice its flight
                return
            self.cwnd += min(acked, 2 * self.mss) if acked < 8 * self.mss else acked
        else:
            if flight_high + self.mss <= self.cwnd:  # another full segment would have fitted
                return
            self._acc += acked
            if self._acc >= self.cwnd:
                self._acc -= self.cwnd
                self.cwnd += self.mss

    def on_enter_recovery(self, flight: int) -> None:
        """A loss was detected. Out of slow start the window doubled in the last
        round trip, so half of it is what the path held (RFC 5681); in congestion
        avoidance it grew by one segment, and it shrinks to 0.7 of the flight, the
        multiplicative decrease of CUBIC (RFC 9438) and Linux: with random loss of
        a few percent, halving kept the window at a handful of segments."""
        beta = 5 if self.cwnd < self.ssthresh else 7
        self.ssthresh = max(flight * beta // 10, 2 * self.mss)
        self._recover_fs = max(flight, 1)
        self._prr_delivered = 0
        self._prr_out = 0

    def on_recovery_ack(self, delivered: int, pipe: int) -> None:
        """RFC 6937 PRR-SSRB: the window for what may be sent in answer to this ACK."""
        self._prr_delivered += delivered
        ss = self.ssthresh
        if pipe > ss:
            # proportional: ceil(prr_delivered * ssthresh / RecoverFS) - prr_out
            sndcnt = -(-self._prr_delivered * ss // self._recover_fs) - self._prr_out
        else:
            sndcnt = min(ss - pipe, max(self._prr_delivered - self._prr_out, delivered) + self.mss)
        if self._prr_out == 0 and sndcnt < self.mss:
            sndcnt = self.mss  # the fast retransmit itself always goes out
        self.cwnd = pipe + max(sndcnt, 0)

    def on_recovery_sent(self, nbytes: int) -> None:
        self._prr_out += nbytes

    def on_exit_recovery(self) -> None:
        self.cwnd = self.ssthresh
        self._acc = 0

    def on_idle(self) -> None:
        """Nothing was sent for longer than the RTO: what the window knew of the path
        is stale, so it starts again from the initial window (RFC 5681 4.1)."""
        self.cwnd = min(self.cwnd, self.initial_window)
        self._acc = 0

    def on_rto(self, flight: int, repeated: bool = False) -> None:
        if not repeated:  # a backed-off retransmission says nothing new (RFC 5681 eq. 4)
            self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self._acc = 0
