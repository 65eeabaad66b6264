"""TCP loss recovery, sender side: which sent bytes are lost, and resending them.

Here (``LossRecovery``, one per connection): the scoreboard and the
retransmissions in flight it owns (the connection merges each ACK's SACK blocks
with ``SackScoreboard.note``; a cumulative ACK and reneging are handled here);
loss detection (RFC 6675 IsLost, three duplicate ACKs, NewReno partial ACKs, and a
RACK-style reordering timer, RFC 8985); entering and leaving fast recovery; the
pipe estimate and the retransmission of holes while it is below cwnd (RFC 6675,
with RFC 6937 PRR sizing the window through ``congestion``); the tail loss probe
(RFC 8985 7) and what a retransmission timeout does to the loss state (RFC 6675
5.1). Both timers' deadlines live here (``tlp_at``, ``reo_at``).

Not here: the retransmission timer itself, its backoff and the RTT estimate
(``tcp``: ``TcpConnection.on_timer``), sending bytes (``TcpConnection.retransmit``,
``send_new``), the data structures (``scoreboard``), the congestion window's
arithmetic (``congestion``).

Sans-IO: time comes in as ``now``. A ``LossRecovery`` reads its connection's
public send state (``snd_una``, ``snd_max``, ``snd_mss``, ...) and asks it to send;
the connection reads and resets the public fields below as ACKs arrive.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from .scoreboard import Retransmissions, SackScoreboard

if TYPE_CHECKING:
    from .tcp import TcpConnection

_INF = 1 << 62  # above every sequence number: a bisect key's second half


class LossRecovery:
    """The loss state of one connection.

    ``in_recovery`` covers fast recovery and the recovery after an RTO;
    ``rto_recovery`` says it began with a timeout (cwnd then grows in slow start
    instead of following PRR). ``recover`` is SND.MAX when it began (RFC 6582).
    ``lost_high``: every byte below it that is not SACKed is lost (IsLost, the
    reordering timer, a tail loss probe's answer or an RTO moved it up).
    ``rtx_high``: the holes below it were all retransmitted (a search hint).
    ``dupacks`` and ``lt_extra`` (the RFC 3042 limited-transmit allowance) are
    counted by the connection's ACK processing."""

    __slots__ = ("conn", "dupacks", "in_recovery", "lost_high", "lt_extra", "recover", "relost_round",
                 "reo_at", "reo_mark", "retransmitted", "rto_recovery", "rtx_high", "scoreboard", "stats",
                 "tlp_at", "tlp_high")  # one per connection: small

    def __init__(self, conn: TcpConnection) -> None:
        self.conn = conn
        self.stats = conn.stats
        self.scoreboard = SackScoreboard(conn.stats)
        self.retransmitted = Retransmissions()
        self.in_recovery = False
        self.rto_recovery = False
        self.recover = 0
        self.lost_high = 0
        self.rtx_high = 0
        self.relost_round = 0
        self.dupacks = 0
        self.lt_extra = 0
        # RACK-lite (RFC 8985): a hole below SACKed data is lost once a reordering
        # window has passed since the SACK showed it
        self.reo_at: float | None = None
        self.reo_mark = 0
        # tail loss probe (RFC 8985 7): no ACK for 2 RTTs -> resend the last segment
        self.tlp_at: float | None = None
        self.tlp_high = 0  # snd_max when the outstanding probe went out (0: none)

    # ------------------------------------------------------------- ACK input
    def on_cumulative_ack(self, ack: int, blocks: tuple[tuple[int, int], ...]) -> None:
        """SND.UNA moved up to ``ack`` (the connection has set it) while the
        scoreboard or the retransmissions held something: what it covers leaves them.
        ``blocks``: this ACK's SACK blocks (empty without SACK)."""
        board = self.scoreboard
        sb = board.blocks
        if sb and sb[0][0] <= ack and not board.acked_through(ack):
            # reneging: only this ACK's blocks still hold, and what the peer held may
            # be a hole again: search for holes from here
            board.clear()
            if blocks:
                conn = self.conn
                una = conn.snd_una
                board.note(blocks, una, max(ack, una), conn.snd_max, self.retransmitted)
            self.rtx_high = ack
            self.stats["sack_reneging"] = self.stats.get("sack_reneging", 0) + 1
        if self.retransmitted.entries:
            self.retransmitted.trim(ack)  # (what is ACKed leaves them from the front)

    def exit(self) -> None:
        self.in_recovery = False
        if not self.rto_recovery:
            self.conn.cc.on_exit_recovery()
        self.rto_recovery = False

    # -------------------------------------------------------------- detection
    def detect_loss(self, now: float, delivered: int, after_probe: bool,
                    advanced: bool) -> None:
        """Mark holes lost (RFC 6675 IsLost, RFC 8985 RACK-TLP in a simple form),
        enter recovery, and let PRR size the window for this ACK."""
        conn = self.conn
        una = conn.snd_una
        mss = conn.snd_mss
        lost = self.lost_high
        sb = self.scoreboard.blocks
        if sb:
            # RFC 6675 IsLost: DupThresh (3) SACKed blocks above, or more than
            # (DupThresh - 1) * SMSS bytes: a walk down from the top of 3 blocks at most
            acc = 0
            edge = 0
            for n, (left, right) in enumerate(reversed(sb)):
                acc += right - left
                if acc > 2 * mss or n == 2:
                    edge = left
                    break
            if after_probe:
                # the answer to a tail loss probe: every hole below the SACKed data
                # was sent a probe timeout (two RTTs) ago or more
                edge = max(edge, sb[-1][0])
            if edge > lost:
                lost = edge
            if edge and self.retransmitted.min_mark <= edge:
                self._relost(edge + 1)
            top = sb[-1][1]
            if self.reo_at is None and (
                    sb[-1][0] > max(lost, una)
                    or self.retransmitted.min_mark < top):  # a retransmission sent before top was
                self.reo_at = now + self._reo_wnd()
                self.reo_mark = top
        if self.dupacks >= 3 or (advanced and self.in_recovery and not conn.sack_ok):
            # three duplicate ACKs, or a NewReno partial ACK: the next segment is lost
            lost = max(lost, min(una + mss, conn.snd_max))
        self.lost_high = lost
        entered = False
        if not self.in_recovery and lost > una:
            self._enter()
            entered = True
        # PRR sizes the window on ACKs that deliver data (and the one that starts
        # recovery); a window update or the peer's own data is no licence to send more
        # (Linux tcp_cwnd_reduction)
        if self.in_recovery and not self.rto_recovery and (delivered > 0 or entered):
            conn.cc.on_recovery_ack(max(delivered, 0), self.pipe())

    def _reo_wnd(self) -> float:
        conn = self.conn
        srtt = conn.srtt if conn.srtt is not None else conn.rto
        return max(srtt / 4, 0.001)

    def on_reo_timer(self, now: float) -> None:
        """The reordering window passed: holes below what was SACKed then are lost."""
        self.reo_at = None
        sb = self.scoreboard.blocks
        conn = self.conn
        una = conn.snd_una
        if not sb or una >= conn.snd_max:
            return
        mark = self.reo_mark
        if mark > self.lost_high:
            self.lost_high = mark
        self._relost(mark)
        if not self.in_recovery and self.lost_high > una and self._next_hole() is not None:
            self._enter()
            conn.cc.on_recovery_ack(0, self.pipe())
        top = sb[-1][1]
        if top > mark:
            self.reo_at = now + self._reo_wnd()
            self.reo_mark = top

    def _relost(self, limit: int) -> None:
        """Retransmissions sent before data that has since been SACKed (their snd_max
        mark below ``limit``) are lost too: send them again."""
        count, low = self.retransmitted.remove_older(limit)
        if not count:
            return
        self.stats["lost_retransmits"] += count
        if low < self.rtx_high:
            self.rtx_high = low
        conn = self.conn
        if self.in_recovery and not self.rto_recovery and conn.snd_una >= self.relost_round:
            # a retransmission lost too: the window we recover into is still more
            # than the path holds; reduce again, at most once a round trip
            self.relost_round = conn.snd_max
            conn.cc.on_enter_recovery(min(self.pipe(), conn.cc.ssthresh))

    def _enter(self) -> None:
        conn = self.conn
        self.in_recovery = True
        self.rto_recovery = False
        self.recover = conn.snd_max
        conn.cc.on_enter_recovery(conn.snd_max - conn.snd_una)
        self.stats["fast_retransmits"] += 1
        self.lt_extra = 0
        self.rtx_high = conn.snd_una
        self.tlp_at = None
        self.tlp_high = 0

    # -------------------------------------------------------------- resending
    def pipe(self) -> int:
        """RFC 6675 pipe: bytes thought to be in the network."""
        conn = self.conn
        una = conn.snd_una
        out = conn.snd_max - una
        board = self.scoreboard
        sacked = board.nbytes if conn.sack_ok else min(self.dupacks * conn.snd_mss, out)
        lost = 0
        lh = self.lost_high
        if lh > una:
            # what is SACKed below lh, from the total and what lies above it (lh sits
            # near the top: IsLost marks up to 3 blocks below it)
            above = 0
            for left, right in reversed(board.blocks):
                if right <= lh:
                    break
                above += right - max(left, lh)
            lost = lh - una - (board.nbytes - above)
        # retransmitted bytes not SACKed since (SACKs cut them out as they come)
        return max(out - sacked - lost + self.retransmitted.nbytes, 0)

    def _next_hole(self) -> tuple[int, int] | None:
        """The first lost byte range not SACKed and not yet retransmitted, up to an MSS."""
        conn = self.conn
        x = max(self.rtx_high, conn.snd_una)
        lim = min(self.lost_high, conn.snd_max)
        sb = self.scoreboard.blocks
        rtx = self.retransmitted.entries
        i = k = 0
        while x < lim:  # past the SACKed block or retransmission that holds x, if one does
            i = bisect.bisect_right(sb, (x, _INF))
            if i and sb[i - 1][1] > x:
                x = sb[i - 1][1]
                continue
            k = bisect.bisect_right(rtx, [x, _INF])
            if k and rtx[k - 1][1] > x:
                x = rtx[k - 1][1]
                continue
            break
        if x >= lim:
            return None
        end = min(x + conn.snd_mss, lim)
        if i < len(sb) and sb[i][0] < end:
            end = sb[i][0]
        if k < len(rtx) and rtx[k][0] < end:
            end = rtx[k][0]
        return x, end

    def retransmit_lost(self, now: float) -> int:
        """Resend lost holes while pipe < cwnd; returns the window left for new data."""
        conn = self.conn
        cc = conn.cc
        pipe = self.pipe()
        cwnd = cc.cwnd
        sent = 0
        while pipe < cwnd:
            hole = self._next_hole()
            if hole is None:
                break
            start, end = hole
            n = conn.retransmit(start, end, now)
            if n <= 0:
                break
            self.retransmitted.add(start, n, conn.snd_max)
            self.rtx_high = start + n
            if conn.sack_ok:
                self.stats["sack_retransmits"] += 1
            pipe += n
            sent += n
        if sent:
            if not self.rto_recovery:
                cc.on_recovery_sent(sent)
            if conn.rto_at is None:
                conn.rto_at = now + conn.rto
        return min(conn.snd_nxt - conn.snd_una + max(cwnd - pipe, 0), conn.snd_wnd)

    # ------------------------------------------------------ tail loss probe
    def _pto(self) -> float:
        """RFC 8985 7.2: two RTTs, plus a worst-case delayed ACK for a lone segment."""
        conn = self.conn
        srtt = conn.srtt if conn.srtt is not None else conn.rto
        extra = 0.2 if conn.snd_max - conn.snd_una <= conn.snd_mss else 0.002
        return max(2 * srtt + extra, 0.01)

    def arm_tlp(self, now: float) -> None:
        """After data went out or an ACK left some in flight: the probe is due a PTO
        from now, unless the retransmission timer comes first."""
        conn = self.conn
        if conn.sack_ok and not self.in_recovery and conn.srtt is not None:
            t = now + self._pto()
            rto_at = conn.rto_at
            self.tlp_at = t if rto_at is None or t < rto_at else None

    def on_tlp_timer(self, now: float) -> None:
        """No ACK for a probe timeout: send one segment so that the peer's answer
        (with SACK) shows a lost tail, instead of waiting for the RTO. (The connection
        calls this only in a state that sends data.)"""
        self.tlp_at = None
        conn = self.conn
        una = conn.snd_una
        if self.in_recovery or una >= conn.snd_max:
            return
        if not conn.send_new(conn.snd_mss, now):  # new data, even beyond cwnd
            # the last segment sent, again (queued data past it may not fit the window)
            data_end = conn.data_end
            start = max(una, min(data_end, conn.snd_max) - conn.snd_mss)
            if start >= data_end:
                start = data_end  # only the FIN is outstanding
            if not conn.retransmit(start, conn.snd_max, now):  # an MSS of data at most, and the FIN if sent
                return
        self.tlp_high = conn.snd_max
        self.stats["tlp_probes"] += 1
        conn.rto_at = now + conn.rto

    # --------------------------------------------------------------- timeout
    def on_rto(self) -> None:
        """The retransmission timer expired with data outstanding (RFC 6675 5.1):
        everything not SACKed is lost; it is resent in order, from a window of one
        segment, skipping what the peer holds. A scoreboard whose first block
        starts at SND.UNA means the peer reneged: it is forgotten."""
        conn = self.conn
        sb = self.scoreboard.blocks
        if sb and sb[0][0] <= conn.snd_una:
            self.scoreboard.clear()
        self.in_recovery = True
        self.rto_recovery = True
        self.recover = conn.snd_max
        self.dupacks = 0
        self.lost_high = conn.snd_max
        self.retransmitted.reset()
        self.rtx_high = conn.snd_una
        self.tlp_at = self.reo_at = None
        self.tlp_high = 0
        self.lt_extra = 0

    def clear(self) -> None:
        """The connection closed: no timers, nothing held."""
        self.tlp_at = self.reo_at = None
        self.scoreboard.clear()
        self.retransmitted.reset()


__all__ = ["LossRecovery"]
