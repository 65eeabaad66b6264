"""The TCP state machine (RFC 9293), sans-IO.

Rules of this file: a :class:`TcpConnection` takes segments and time in
(``on_segment(..., now)``, ``on_timer(now)``) and hands segments out through the
``host`` it was built with (the stack builds IP packets around them). It never
awaits and never reads the clock; ``next_deadline()`` says when it next needs
``on_timer``. Everything that changes ``state`` goes through ``_transition``
and the table ``TRANSITIONS`` below; an event missing from the table is our
bug and raises ``LocalProtocolError``.

Sequence numbers are kept unwrapped (plain Python ints that grow past 2**32)
and wrapped only on the wire, so comparisons are ordinary ``<``.
"""

from __future__ import annotations

import bisect
import enum
import struct
from collections.abc import Callable
from typing import Protocol

from ..errors import LocalProtocolError
from .congestion import NewReno
from .rbuf import RecvBuffer
from .wire import tcp as wtcp
from .wire.tcp import ACK, FIN, PSH, RST, SYN, URG, TcpOptions

MASK = 0xFFFFFFFF
_TS_PREFIX = b"\x01\x01\x08\x0a"
_II = struct.Struct("!II")
_INF = 1 << 62  # above every sequence number: a bisect key's second half

#: Out-of-order data is kept as disjoint pieces inside the receive window: a byte
#: that arrives twice is stored once and the total never exceeds the window (Linux
#: tcp_data_queue_ofo trims a new skb against its neighbours and drops those it
#: covers). A piece costs ~100 bytes beyond its data, so a peer sending one-byte
#: segments with gaps between them meets this cap; past it the highest piece goes
#: (Linux tcp_prune_ofo_queue prunes from the top too), or the new one if it is the
#: highest.
OOO_MAX_PIECES = 1024
#: A piece that continues the one before it is appended to it up to this size, so
#: the usual burst after one loss is a few pieces, not one per segment.
OOO_COALESCE = 64 << 10
#: and the piece after a new one is joined to it up to this size (a copy: kept small)
OOO_JOIN_NEXT = 2048
#: The sender's SACK scoreboard holds at most this many disjoint blocks (gVisor's
#: sack_scoreboard.go maxSACKBlocks is 100 too). What does not fit is forgotten,
#: which costs at most a retransmission of bytes the peer already holds; the bound
#: keeps the cost of one ACK flat however many blocks a peer sent before (Linux
#: CVE-2019-11478: crafted SACKs fragmenting the retransmit queue).
SACK_SCOREBOARD_MAX = 100
#: Retransmissions remembered in one recovery (their ranges are disjoint, one per
#: hole or so: at most about one more than the scoreboard's blocks, unless a peer
#: keeps moving its holes).
RTX_MAX = 2 * SACK_SCOREBOARD_MAX


class State(enum.Enum):
    CLOSED = "CLOSED"
    LISTEN = "LISTEN"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"


class Event(enum.Enum):
    ACTIVE_OPEN = "active open (send SYN)"
    PASSIVE_SYN = "SYN received by a listener (send SYN-ACK)"
    RCV_SYN = "SYN received while SYN-SENT (simultaneous open)"
    RCV_SYN_ACK = "SYN-ACK received"
    RCV_ACK_OF_SYN = "ACK of our SYN"
    CLOSE = "application close (send FIN)"
    RCV_FIN = "FIN received"
    RCV_ACK_OF_FIN = "ACK of our FIN"
    RCV_FIN_ACK_OF_FIN = "FIN that also ACKs our FIN"
    TIMEOUT = "2MSL timer (or an orphan's FIN-WAIT-2 timer) expired"
    RESET = "RST received or connection aborted"


S = State
E = Event
#: state -> event -> next state. Reading this is reading RFC 9293 figure 5.
TRANSITIONS: dict[State, dict[Event, State]] = {
    S.CLOSED: {E.ACTIVE_OPEN: S.SYN_SENT, E.PASSIVE_SYN: S.SYN_RECEIVED},
    S.SYN_SENT: {E.RCV_SYN_ACK: S.ESTABLISHED, E.RCV_SYN: S.SYN_RECEIVED,
                 E.CLOSE: S.CLOSED, E.RESET: S.CLOSED},
    S.SYN_RECEIVED: {E.RCV_ACK_OF_SYN: S.ESTABLISHED, E.CLOSE: S.FIN_WAIT_1,
                     E.RESET: S.CLOSED},
    S.ESTABLISHED: {E.CLOSE: S.FIN_WAIT_1, E.RCV_FIN: S.CLOSE_WAIT, E.RESET: S.CLOSED},
    S.FIN_WAIT_1: {E.RCV_ACK_OF_FIN: S.FIN_WAIT_2, E.RCV_FIN: S.CLOSING,
                   E.RCV_FIN_ACK_OF_FIN: S.TIME_WAIT, E.RESET: S.CLOSED},
    # TIMEOUT: the application closed and the peer never sent its FIN (Linux tcp_fin_timeout)
    S.FIN_WAIT_2: {E.RCV_FIN: S.TIME_WAIT, E.TIMEOUT: S.CLOSED, E.RESET: S.CLOSED},
    S.CLOSE_WAIT: {E.CLOSE: S.LAST_ACK, E.RESET: S.CLOSED},
    S.CLOSING: {E.RCV_ACK_OF_FIN: S.TIME_WAIT, E.RESET: S.CLOSED},
    S.LAST_ACK: {E.RCV_ACK_OF_FIN: S.CLOSED, E.RESET: S.CLOSED},
    S.TIME_WAIT: {E.TIMEOUT: S.CLOSED, E.RESET: S.CLOSED},
}

#: flags that take a segment off the fast path (PSH, ECE and CWR do not)
NOT_FAST = SYN | FIN | RST | ACK | URG  # flags & NOT_FAST == ACK: a header-predicted segment's flags
_SEND_STATES = frozenset((S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK))
_RECV_STATES = frozenset((S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2))
#: states whose idle time a keepalive measures (with our FIN or data in flight, the
#: retransmission timer finds a dead peer instead)
_KEEPALIVE_STATES = _SEND_STATES | {S.FIN_WAIT_2}


class TcpConfig:
    """Tunables; defaults aim at throughput over a 1280-byte MTU.

    ``msl``: TIME-WAIT lasts 2 MSL (60 s, Linux's TCP_TIMEWAIT_LEN). ``fin_wait2_timeout``:
    how long a connection the application closed waits in FIN-WAIT-2 for the peer's
    FIN (Linux tcp_fin_timeout, 60 s). ``keepalive_*``: the defaults for new
    connections (off unless ``keepalive_idle`` is set); ``TcpConnection.set_keepalive``
    changes one connection's."""

    def __init__(self, *, recv_buffer: int = 4 << 20, send_buffer: int = 4 << 20,
                 min_rto: float = 0.2, max_rto: float = 60.0, initial_rto: float = 1.0,
                 delayed_ack: float = 0.04, msl: float = 30.0, syn_retries: int = 6,
                 max_retries: int = 15, keepalive_idle: float | None = None,
                 keepalive_interval: float = 75.0, keepalive_count: int = 9,
                 timestamps: bool = True, sack: bool = True,
                 fin_wait2_timeout: float = 60.0) -> None:
        self.recv_buffer = recv_buffer
        self.send_buffer = send_buffer
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.initial_rto = initial_rto
        self.delayed_ack = delayed_ack
        self.msl = msl
        self.syn_retries = syn_retries
        self.max_retries = max_retries
        self.keepalive_idle = keepalive_idle
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        self.timestamps = timestamps
        self.sack = sack
        self.fin_wait2_timeout = fin_wait2_timeout


class TcpHost(Protocol):
    """What a connection needs from the stack that owns it."""

    def tcp_emit(self, conn: TcpConnection, flags: int, seq: int, ack: int, window: int,
                 options: bytes, payload: bytes | memoryview) -> None: ...

    def tcp_emit_run(self, conn: TcpConnection, flags: int, seq: int, ack: int, window: int,
                     options: bytes, data: memoryview, mss: int, push_last: bool) -> int:
        """``data`` as segments of up to ``mss`` bytes from ``seq``; PSH on the last one
        if ``push_last``. Returns how many segments went out."""
        ...

    def tcp_established(self, conn: TcpConnection) -> None: ...

    def tcp_closed(self, conn: TcpConnection) -> None: ...


def _wscale_for(buffer: int) -> int:
    shift = 0
    while (65535 << shift) < buffer and shift < 14:
        shift += 1
    return shift


class TcpConnection:
    """One TCP connection (both directions), driven by segments and timers."""

    def __init__(self, host: TcpHost, key: tuple[bytes, int, bytes, int], mss: int,
                 iss: int, config: TcpConfig, now: float) -> None:
        self.host = host
        self.key = key  # (remote ip, remote port, local ip, local port)
        self.config = config
        self.state = S.CLOSED
        self.error: str | None = None
        self.listener: object | None = None
        self.user: object | None = None  # the driver's stream object
        self.waker: Callable[[], object] | None = None
        self.app_closed = False  # close() called: incoming data gets a RST
        self._local_mss = mss
        self.snd_mss = min(536, mss)
        # send side
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.sbuf = bytearray()
        self.sbuf_seq = iss + 1
        self.fin_queued = False
        self.snd_wscale = 0
        self.rcv_wscale = _wscale_for(config.recv_buffer)
        # receive side
        self.irs = 0
        self.rcv_nxt = 0
        self.rbuf = RecvBuffer()
        self.fin_received = False
        # out-of-order data: disjoint pieces by their first sequence number
        self._ooo: dict[int, bytearray] = {}
        self._ooo_starts: list[int] = []  # sorted
        self._ooo_blocks: list[list[int]] = []  # merged [left, right) of _ooo, sorted
        self._ooo_recent: list[int] = []  # starts of the latest out-of-order arrivals, newest first
        self.ooo_bytes = 0  # bytes in _ooo
        self._rcv_adv_edge = 0
        # options
        self.ts_ok = False
        self.sack_ok = False
        self.ts_recent = 0
        self._ts_base = now
        # timers, RTT
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = config.initial_rto
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        self._ts_floor: int | None = None  # our TSval at the last RTO: older echoes are no RTT sample
        self.retries = 0
        self.rto_at: float | None = None
        self.delack_at: float | None = None
        self.persist_at: float | None = None
        self.keepalive_at: float | None = None
        self.timewait_at: float | None = None
        self._persist_backoff = 0
        self._orphan_probes = 0  # zero-window probes since the application closed
        # keepalive (RFC 9293 3.8.4), per connection; idle is measured from last_rcv
        self.keepalive_idle = config.keepalive_idle
        self.keepalive_interval = config.keepalive_interval
        self.keepalive_count = config.keepalive_count
        self.last_rcv = now  # when an acceptable segment last arrived
        self._ka_probes = 0
        # congestion
        self.cc = NewReno(self.snd_mss)
        self.dupacks = 0
        # the window's use: the largest flight in the round trip that ends when
        # snd_una reaches _flight_round_end, and when data last went out
        self._flight_high = 0
        self._flight_round_end = 0
        self._data_sent_at = now
        # Loss recovery (RFC 6675 with RFC 6937 PRR; after an RTO, RFC 6675 5.1: the
        # scoreboard is kept and only what was not SACKed is resent). ``in_recovery``
        # covers both; ``_rto_recovery`` says it began with a timeout (cwnd then grows
        # in slow start instead of following PRR).
        self.in_recovery = False
        self._rto_recovery = False
        self.recover = 0
        self._sacked: list[tuple[int, int]] = []  # SACK scoreboard, merged, > snd_una
        self._sacked_bytes = 0
        #: every byte below this that is not SACKed is lost (RFC 6675 IsLost, the
        #: reordering timer, a tail loss probe's answer or an RTO moved it up)
        self._lost_high = 0
        #: retransmissions still in flight in this recovery: [start, end, snd_max when
        #: sent], sorted and disjoint; SACKs of data sent after one of them say whether
        #: it was lost in turn. What is SACKed is cut out of them (``_rtx_cut``), so
        #: their bytes, and the oldest mark with its count, are kept as they change:
        #: an ACK never walks the list.
        self._rtx: list[list[int]] = []
        self._rtx_bytes = 0
        self._rtx_min_mark = _INF
        self._rtx_min_count = 0
        self._rtx_high = 0  # holes below were all retransmitted (a search hint)
        self._relost_round = 0
        # RACK-lite (RFC 8985): a hole below SACKed data is lost once a reordering
        # window has passed since the SACK showed it
        self.reo_at: float | None = None
        self._reo_mark = 0
        # tail loss probe (RFC 8985 7): no ACK for 2 RTTs -> resend the last segment
        self.tlp_at: float | None = None
        self._tlp_high = 0  # snd_max when the outstanding probe went out (0: none)
        self._lt_extra = 0  # RFC 3042 limited transmit allowance
        # acks
        self._ack_pending = 0
        self._ack_now = False
        self.stats = {"segments_in": 0, "segments_out": 0, "retransmits": 0,
                      "fast_retransmits": 0, "rto_timeouts": 0, "dupacks": 0,
                      "sack_retransmits": 0, "tlp_probes": 0, "lost_retransmits": 0,
                      "sack_blocks_in": 0, "sack_blocks_ignored": 0,
                      "ooo_pruned": 0, "ooo_dropped": 0, "keepalive_probes": 0}

    # ------------------------------------------------------------ state table
    def _transition(self, event: Event) -> None:
        try:
            new = TRANSITIONS[self.state][event]
        except KeyError:
            raise LocalProtocolError(f"TCP: {event.name} in state {self.state.name}") from None
        self.state = new

    # ----------------------------------------------------------------- opens
    def open_active(self, now: float) -> None:
        self._transition(E.ACTIVE_OPEN)
        self._send_syn(now)

    def open_passive(self, seq: int, window: int, opts: TcpOptions, now: float) -> None:
        """A listener got a SYN for this connection."""
        self._transition(E.PASSIVE_SYN)
        self._take_syn(seq, window, opts)
        self._send_syn(now)

    def _take_syn(self, seq: int, window: int, opts: TcpOptions) -> None:
        self.irs = seq
        self.rcv_nxt = seq + 1
        if opts.mss is not None:
            self.snd_mss = max(64, min(opts.mss, self._local_mss))
        else:
            self.snd_mss = min(536, self._local_mss)
        if opts.wscale is not None:
            self.snd_wscale = opts.wscale
        else:
            self.rcv_wscale = 0
            self.snd_wscale = 0
        self.sack_ok = opts.sack_perm and self.config.sack
        if opts.ts_val is not None and self.config.timestamps:
            self.ts_ok = True
            self.ts_recent = opts.ts_val
        else:
            self.ts_ok = False
        if self.ts_ok:
            self.snd_mss -= 12
        self.snd_wnd = window  # never scaled in a SYN
        self.snd_wl1 = seq
        self.cc = NewReno(self.snd_mss)

    def _syn_options(self, now: float) -> bytes:
        synack = self.state is S.SYN_RECEIVED
        want_ts = self.config.timestamps and (self.ts_ok or not synack)
        want_ws = not synack or self.snd_wscale or self.rcv_wscale
        want_sack = self.config.sack and (self.sack_ok or not synack)
        return wtcp.build_options(
            mss=self._local_mss,
            wscale=self.rcv_wscale if want_ws else None,
            sack_perm=bool(want_sack),
            ts=(self._ts_now(now), self.ts_recent) if want_ts else None)

    def _send_syn(self, now: float) -> None:
        flags = SYN | ACK if self.state is S.SYN_RECEIVED else SYN
        ack = self.rcv_nxt if flags & ACK else 0
        self.snd_nxt = self.iss + 1
        self.snd_max = max(self.snd_max, self.snd_nxt)
        wnd = min(self._rcv_space(), 65535)
        self._emit(flags, self.iss, ack, wnd, self._syn_options(now), b"")
        if self.rto_at is None:
            self.rto_at = now + self.rto
        if self._rtt_seq is None and self.retries == 0:
            self._rtt_seq = self.iss + 1
            self._rtt_time = now

    # ----------------------------------------------------------- application
    def send(self, data: bytes | memoryview, now: float) -> int:
        """Queue up to the free send-buffer space; returns how much was taken."""
        if self.fin_queued or self.state not in (S.SYN_SENT, S.SYN_RECEIVED, S.ESTABLISHED,
                                                 S.CLOSE_WAIT):
            raise LocalProtocolError("send on a closed TCP direction")
        room = self.config.send_buffer - len(self.sbuf)
        if room <= 0:
            return 0
        n = min(room, len(data))
        self.sbuf += data[:n]
        self.output(now)
        return n

    @property
    def send_space(self) -> int:
        return self.config.send_buffer - len(self.sbuf)

    def read(self, max_bytes: int, now: float) -> bytes:
        rbuf = self.rbuf
        if not rbuf:
            return b""
        data = rbuf.read(max_bytes)
        if self.state in _RECV_STATES:
            edge = self.rcv_nxt + self._rcv_space()
            inc = edge - self._rcv_adv_edge
            if inc >= max(2 * self._local_mss, self.config.recv_buffer // 4) or (
                    self._rcv_adv_edge <= self.rcv_nxt and inc >= self._local_mss):
                self._ack_now = True
                self.output(now)
        return data

    @property
    def readable(self) -> bool:
        return bool(self.rbuf) or self.fin_received or self.state is S.CLOSED

    def close(self, now: float) -> None:
        """Half-close: send FIN after the queued data."""
        if self.fin_queued:
            if self.app_closed and self.state is S.FIN_WAIT_2 and self.timewait_at is None:
                self.timewait_at = now + self.config.fin_wait2_timeout  # orphaned after a half-close
            return
        if self.state is S.SYN_SENT:
            self._transition(E.CLOSE)
            self._closed()
            return
        if self.state in (S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT):
            self.fin_queued = True
            self._transition(E.CLOSE)
            self.output(now)

    def release(self, now: float) -> None:
        """The application is done with this connection (a full close): unread data
        gets the peer a RST; otherwise FIN after the queued data, and from here on
        timers alone end it (FIN-WAIT-2 and TIME-WAIT do not wait for anyone)."""
        self.app_closed = True
        if self.rbuf or self.state is S.SYN_SENT:
            self.abort(now, "closed with unread data")
        else:
            self.close(now)

    def set_keepalive(self, idle: float | None, interval: float, count: int, now: float) -> None:
        """Probe after ``idle`` seconds without a segment from the peer, then every
        ``interval``; abort after ``count`` unanswered probes (RFC 9293 3.8.4, Linux
        TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT). ``idle`` None turns it off."""
        if idle is not None and (idle <= 0 or interval <= 0 or count < 1):
            raise LocalProtocolError("keepalive: idle and interval must be > 0, count >= 1")
        self.keepalive_idle = idle
        self.keepalive_interval = interval
        self.keepalive_count = count
        self._ka_probes = 0
        if idle is None:
            self.keepalive_at = None
        elif self.state in _KEEPALIVE_STATES:
            self.keepalive_at = max(now, self.last_rcv + idle)

    def abort(self, now: float, reason: str = "aborted") -> None:
        """Send RST (when synchronized) and drop everything."""
        if self.state in (S.SYN_RECEIVED, S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2,
                          S.CLOSE_WAIT, S.CLOSING, S.LAST_ACK):
            self._emit(RST | ACK, self.snd_nxt, self.rcv_nxt, 0, b"", b"")
        self._reset(reason)

    def _reset(self, reason: str) -> None:
        if self.error is None and self.state is not S.TIME_WAIT:
            self.error = reason
        if self.state is not S.CLOSED:
            self._transition(E.RESET)
        self._closed()

    def _closed(self) -> None:
        self.rto_at = self.delack_at = self.persist_at = None
        self.keepalive_at = self.timewait_at = self.tlp_at = self.reo_at = None
        self.sbuf = bytearray()
        self._ooo.clear()
        self._ooo_starts.clear()
        self._ooo_blocks.clear()
        self._ooo_recent.clear()
        self.ooo_bytes = 0
        self._sacked = []
        self._sacked_bytes = 0
        self._rtx_reset()
        self.host.tcp_closed(self)

    # ------------------------------------------------------------- receiving
    def _rcv_space(self) -> int:
        return self.config.recv_buffer - len(self.rbuf)

    def rcv_prediction(self) -> tuple[int, int, int] | None:
        """Header prediction (RFC 9293 3.10.7.4, Jacobson's fast path), for a run of segments.

        None when this connection cannot take the fast path now. Otherwise what
        every segment of a run must match: its sequence number is the wrapped
        RCV.NXT (then the end of the previous segment), its ACK field the wrapped
        SND.UNA (it acknowledges nothing new), its flags ACK (PSH allowed), and its
        payload is not empty and fits the remaining receive space (the third
        number, shrinking by each payload). Such a run is handed to
        ``rcv_fast_run``."""
        cfg = self.config
        rn = self.rcv_nxt
        wl1 = self.snd_wl1
        if (self.state is not S.ESTABLISHED or self._ooo_starts or self.app_closed
                or self._sacked or self.in_recovery or self.dupacks >= 3  # on_segment would look for losses
                or wl1 > rn or (wl1 == rn and self.snd_wl2 > self.snd_una)):
            return None  # (the last two: the run's first segment would not update the window)
        return rn & MASK, self.snd_una & MASK, cfg.recv_buffer - len(self.rbuf)

    def rcv_fast_run(self, payloads: list[memoryview], nbytes: int, last_seq_w: int, last_wnd: int,
                     any_wnd: int, ts_val: int | None, now: float) -> None:
        """Take a run of segments that matched ``rcv_prediction``, leaving the connection
        exactly as ``on_segment`` on each in turn would: their payloads (``nbytes`` in
        all) appended; the window of the last one (sequence number ``last_seq_w``)
        in force, as each updated it in turn; the persist timer stopped if any window
        (``any_wnd``: all of them OR-ed) was open; TS.Recent from the last timestamp."""
        rn = self.rcv_nxt
        count = len(payloads)
        self.stats["segments_in"] += count
        self.last_rcv = now
        self._ka_probes = 0
        if ts_val is not None and self.ts_ok:
            self.ts_recent = ts_val
        self.snd_wnd = last_wnd << self.snd_wscale
        self.snd_wl1 = rn + ((last_seq_w - rn) & MASK)
        self.snd_wl2 = self.snd_una
        if any_wnd:
            self.persist_at = None
        self.rbuf.extend(payloads, nbytes)
        self.rcv_nxt = rn + nbytes
        self._ack_pending += count

    def on_segment(self, seq_w: int, ack_w: int, flags: int, window: int,
                   opts: TcpOptions, payload: memoryview, now: float) -> None:
        """Process one segment addressed to this connection."""
        self.stats["segments_in"] += 1
        st = self.state
        if st is S.SYN_SENT:
            self._on_syn_sent(seq_w, ack_w, flags, window, opts, now)
            return
        if st is S.CLOSED:
            return
        d = (seq_w - self.rcv_nxt) & MASK
        seq = self.rcv_nxt + (d - (1 << 32) if d & 0x80000000 else d)
        plen = len(payload)
        seglen = plen + (flags & SYN and 1) + (flags & FIN and 1)
        rwnd = self._rcv_space()
        rn = self.rcv_nxt
        if seglen == 0:
            ok = seq == rn if rwnd == 0 else rn <= seq <= rn + rwnd
        else:
            ok = rwnd > 0 and (rn <= seq < rn + rwnd or rn < seq + seglen <= rn + rwnd)
        if not ok:
            if not flags & RST:
                self._ack_now = True
            return
        # the keepalive timer compares this with its deadline when it fires: no
        # rescheduling per segment
        self.last_rcv = now
        self._ka_probes = 0
        if flags & RST:
            if seq == rn:
                self._reset("connection reset by peer")
            else:
                self._ack_now = True  # RFC 5961 challenge ACK
            return
        if flags & SYN:
            self._ack_now = True  # RFC 5961 challenge ACK
            return
        if not flags & ACK:
            return
        if self.ts_ok and opts.ts_val is not None and seq <= rn:
            self.ts_recent = opts.ts_val
        d = (ack_w - self.snd_una) & MASK
        ack = self.snd_una + (d - (1 << 32) if d & 0x80000000 else d)
        if st is S.SYN_RECEIVED:
            if self.snd_una < ack <= self.snd_max:
                self._transition(E.RCV_ACK_OF_SYN)
                self.snd_wnd = window << self.snd_wscale
                self.snd_wl1 = seq
                self.snd_wl2 = ack
                self._established(now)
                st = self.state
            else:
                self._emit(RST, ack, 0, 0, b"", b"")
                return
        if ack > self.snd_max:
            self._ack_now = True
            return
        self._process_ack(seq, ack, window << self.snd_wscale, plen, flags, opts, now)
        if self.state is S.CLOSED:
            return
        st = self.state
        if plen:
            if st in _RECV_STATES:
                if self.app_closed:
                    self.abort(now, "data after close")
                    return
                self._on_data(seq, payload, now)
            else:
                self._ack_now = True
        if flags & FIN and seq + plen == self.rcv_nxt and not self.fin_received:
            self.fin_received = True
            self.rcv_nxt += 1
            self._ack_now = True
            st = self.state
            if st is S.FIN_WAIT_1:
                fin_acked = self.snd_una == self.snd_max and self.snd_nxt == self._fin_seq() + 1
                self._transition(E.RCV_FIN_ACK_OF_FIN if fin_acked else E.RCV_FIN)
            elif st in (S.ESTABLISHED, S.FIN_WAIT_2):
                self._transition(E.RCV_FIN)
            if self.state is S.TIME_WAIT:
                self._enter_time_wait(now)
        elif flags & FIN and st is S.TIME_WAIT:
            self._ack_now = True
            self.timewait_at = now + 2 * self.config.msl

    def _fin_seq(self) -> int:
        return self.sbuf_seq + len(self.sbuf)

    def _enter_time_wait(self, now: float) -> None:
        self.rto_at = self.persist_at = self.keepalive_at = None
        self.timewait_at = now + 2 * self.config.msl

    def _established(self, now: float) -> None:
        self.last_rcv = now
        if self.keepalive_idle is not None:
            self.keepalive_at = now + self.keepalive_idle
        self.host.tcp_established(self)

    def _on_syn_sent(self, seq_w: int, ack_w: int, flags: int, window: int,
                     opts: TcpOptions, now: float) -> None:
        if flags & ACK:
            if ack_w != (self.iss + 1) & MASK:
                if not flags & RST:
                    self._emit(RST, ack_w, 0, 0, b"", b"")
                return
            if flags & RST:
                self._reset("connection refused")
                return
        elif flags & RST:
            return
        if not flags & SYN:
            return
        self._take_syn(seq_w, window, opts)
        if flags & ACK:
            self.snd_una = self.iss + 1
            self._transition(E.RCV_SYN_ACK)
            self.snd_wnd = window << self.snd_wscale
            self.snd_wl2 = self.snd_una
            self._rtt_sample(self.snd_una, now)
            self.rto_at = None
            self.retries = 0
            self._ack_now = True
            self._established(now)
        else:
            # simultaneous open: answer with SYN-ACK
            self._transition(E.RCV_SYN)
            self._send_syn(now)

    def _rtt_sample(self, ack: int, now: float) -> None:
        if self._rtt_seq is None or ack < self._rtt_seq:
            return
        self._rtt_seq = None
        self._rtt_update(now - self._rtt_time)

    def _ts_rtt_sample(self, ecr: int, now: float) -> None:
        """RFC 7323 RTTM: the echoed timestamp times every ACK that advances SND.UNA,
        retransmitted or not, so a backed-off RTO comes back down at the first ACK."""
        tsn = self._ts_now(now)
        floor = self._ts_floor
        if floor is not None:
            if (ecr - floor) & 0x80000000:
                return  # echoes a segment sent before the last timeout (Karn, RFC 6298 5)
            self._ts_floor = None  # echoes are past the timeout now: no wraparound in 24.8 days
        d = (tsn - ecr) & MASK
        if d < 600_000:  # ms; anything else is not an echo of ours
            self._rtt_update(d / 1000)

    def _rtt_update(self, r: float) -> None:
        if self.srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        self.rto = min(max(self.srtt + max(0.001, 4 * self.rttvar), self.config.min_rto),
                       self.config.max_rto)

    def _process_ack(self, seq: int, ack: int, wnd: int, plen: int, flags: int,
                     opts: TcpOptions, now: float) -> None:
        una = self.snd_una
        sacked_before = self._sacked_bytes
        probe_high = self._tlp_high
        if opts.sack and self.sack_ok:
            # (at most 4 blocks: the options area holds no more, Linux TCP_NUM_SACKS)
            self.stats["sack_blocks_in"] += len(opts.sack)
            self._note_sack(opts.sack, ack)
        # the answer to the probe itself, not any ACK that arrives while it is out (a late
        # one after a stall carries reordering, not news of a lost tail)
        after_probe = probe_high != 0 and (ack >= probe_high or (
            bool(self._sacked) and self._sacked[-1][1] >= probe_high))
        if ack > una:
            acked = ack - una
            self.snd_una = ack
            if self.snd_nxt < ack:
                self.snd_nxt = ack
            drop = min(ack, self.sbuf_seq + len(self.sbuf)) - self.sbuf_seq
            if drop > 0:
                del self.sbuf[:drop]
                self.sbuf_seq += drop
            self.retries = 0
            if self.ts_ok and opts.ts_ecr:
                self._ts_rtt_sample(opts.ts_ecr, now)
            else:
                self._rtt_sample(ack, now)
            sb = self._sacked
            if sb and sb[0][0] <= ack:
                k = bisect.bisect_right(sb, (ack, _INF))  # the blocks that start at or below ack
                if sb[k - 1][1] > ack:
                    # the peer ACKs up to data it had SACKed: it dropped what it held
                    # out of order (RFC 2018 reneging). Only this ACK's blocks still hold,
                    # and what it held may be a hole again: search for holes from here.
                    self._sacked = []
                    self._sacked_bytes = 0
                    if opts.sack and self.sack_ok:
                        self._note_sack(opts.sack, ack)
                    self._rtx_high = ack
                    self.stats["sack_reneging"] = self.stats.get("sack_reneging", 0) + 1
                else:  # each block leaves once: no walk over the rest
                    self._sacked_bytes -= sum([r - left for left, r in sb[:k]])
                    del sb[:k]
            delivered = acked + self._sacked_bytes - sacked_before
            flight_high = self._flight_high
            if ack >= self._flight_round_end:  # a round trip ended: measure the next one
                self._flight_round_end = self.snd_nxt
                self._flight_high = self.snd_nxt - ack
            if self._rtx:
                self._trim_rtx()  # (what is ACKed leaves them from the front)
            self.dupacks = 0
            self._lt_extra = 0
            if self.in_recovery and not self._rto_recovery:
                if ack >= self.recover:
                    self._exit_recovery()
            else:
                self.cc.on_ack(acked, False, flight_high)  # after an RTO: slow start
                if self.in_recovery and ack >= self.recover:
                    self._exit_recovery()
            self._tlp_high = 0
            if ack >= self.snd_max:
                self.rto_at = self.tlp_at = self.reo_at = None
            else:
                self.rto_at = now + self.rto
                self._arm_tlp(now)
            self._persist_backoff = 0
            if self.fin_queued and ack == self._fin_seq() + 1:
                st = self.state
                if st in (S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK):
                    self._transition(E.RCV_ACK_OF_FIN)
                    if self.state is S.TIME_WAIT:
                        self._enter_time_wait(now)
                    elif self.state is S.FIN_WAIT_2 and self.app_closed:
                        # nobody will read or close this again: the peer's FIN has a
                        # deadline (Linux tcp_fin_timeout)
                        self.timewait_at = now + self.config.fin_wait2_timeout
                    elif self.state is S.CLOSED:
                        self._closed()
                        return
        elif (ack == una and plen == 0 and not flags & FIN and self.snd_max > una
              and (wnd == self.snd_wnd or opts.sack)):
            self.dupacks += 1
            self.stats["dupacks"] += 1
            delivered = self._sacked_bytes - sacked_before if self.sack_ok else self.snd_mss
            if not self.in_recovery and self.dupacks < 3:
                self._lt_extra = self.dupacks * self.snd_mss  # limited transmit
        else:
            delivered = self._sacked_bytes - sacked_before
        if self.snd_max > self.snd_una and (self._sacked or self.dupacks >= 3
                                             or self.in_recovery):
            self._detect_loss(now, delivered, after_probe, ack > una)
        # window update (RFC 9293 SND.WL1/WL2 rule)
        if self.snd_wl1 < seq or (self.snd_wl1 == seq and self.snd_wl2 <= ack):
            self.snd_wnd = wnd
            self.snd_wl1 = seq
            self.snd_wl2 = ack
            if wnd > 0:
                self.persist_at = None

    def _note_sack(self, blocks: tuple[tuple[int, int], ...], ack: int) -> None:
        """Merge an ACK's blocks into the scoreboard: a binary search and the blocks a
        new one swallows per block, never a walk over the rest (gVisor's scoreboard
        is a btree for the same reason); full, a block that would be a new entry is
        forgotten."""
        base = self.snd_una
        floor = max(ack, base)
        snd_max = self.snd_max
        sb = self._sacked
        for lw, rw in blocks:
            d = (lw - base) & MASK
            left = base + (d - (1 << 32) if d & 0x80000000 else d)
            right = left + ((rw - lw) & MASK)
            if right <= floor or right > snd_max or left >= right:
                continue  # D-SACK, stale or bogus
            i = bisect.bisect_left(sb, (left,))
            if i and sb[i - 1][1] >= left:  # joins the block before
                i -= 1
                left = sb[i][0]
            j = i
            swallowed = 0
            n = len(sb)
            while j < n and sb[j][0] <= right:
                r = sb[j][1]
                if r > right:
                    right = r
                swallowed += r - sb[j][0]
                j += 1
            if j == i and n >= SACK_SCOREBOARD_MAX:
                self.stats["sack_blocks_ignored"] += 1
                continue
            grown = right - left - swallowed
            if grown:
                sb[i:j] = ((left, right),)
                self._sacked_bytes += grown
                if self._rtx:
                    self._rtx_cut(left, right)

    # ------------------------------------------------------------ loss recovery
    def _detect_loss(self, now: float, delivered: int, after_probe: bool,
                     advanced: bool) -> None:
        """Mark holes lost (RFC 6675 IsLost, RFC 8985 RACK-TLP in a simple form),
        enter recovery, and let PRR size the window for this ACK."""
        una = self.snd_una
        mss = self.snd_mss
        lost = self._lost_high
        sb = self._sacked
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
            if edge and self._rtx_min_mark <= edge:
                self._relost(edge + 1)
            top = sb[-1][1]
            if self.reo_at is None and (
                    sb[-1][0] > max(lost, una)
                    or self._rtx_min_mark < top):  # a retransmission sent before top was
                self.reo_at = now + self._reo_wnd()
                self._reo_mark = top
        if self.dupacks >= 3 or (advanced and self.in_recovery and not self.sack_ok):
            # three duplicate ACKs, or a NewReno partial ACK: the next segment is lost
            lost = max(lost, min(una + mss, self.snd_max))
        self._lost_high = lost
        entered = False
        if not self.in_recovery and lost > una:
            self._enter_recovery()
            entered = True
        # PRR sizes the window on ACKs that deliver data (and the one that starts
        # recovery); a window update or the peer's own data is no licence to send more
        # (Linux tcp_cwnd_reduction)
        if self.in_recovery and not self._rto_recovery and (delivered > 0 or entered):
            self.cc.on_recovery_ack(max(delivered, 0), self._pipe())

    def _reo_wnd(self) -> float:
        srtt = self.srtt if self.srtt is not None else self.rto
        return max(srtt / 4, 0.001)

    def _relost(self, limit: int) -> None:
        """Retransmissions sent before data that has since been SACKed (their snd_max
        mark below ``limit``) are lost too: send them again."""
        if self._rtx_min_mark >= limit:
            return  # none is that old
        keep = []
        lost = False
        for e in self._rtx:
            if e[2] < limit:
                self.stats["lost_retransmits"] += 1
                self._rtx_bytes -= e[1] - e[0]
                lost = True
                if e[0] < self._rtx_high:
                    self._rtx_high = e[0]
            else:
                keep.append(e)
        self._rtx = keep
        self._rtx_recount()
        if lost and self.in_recovery and not self._rto_recovery \
                and self.snd_una >= self._relost_round:
            # a retransmission lost too: the window we recover into is still more
            # than the path holds; reduce again, at most once a round trip
            self._relost_round = self.snd_max
            self.cc.on_enter_recovery(min(self._pipe(), self.cc.ssthresh))

    def _trim_rtx(self) -> None:
        """Forget the retransmissions SND.UNA passed (from the front: each leaves once)."""
        una = self.snd_una
        rtx = self._rtx
        k = 0
        n = len(rtx)
        while k < n and rtx[k][1] <= una:
            self._rtx_bytes -= rtx[k][1] - rtx[k][0]
            k += 1
        gone = rtx[:k]
        del rtx[:k]
        if rtx and rtx[0][0] < una:
            self._rtx_bytes -= una - rtx[0][0]
            rtx[0][0] = una
        for e in gone:
            self._rtx_mark_removed(e[2])

    def _rtx_cut(self, left: int, right: int) -> None:
        """[left, right) is SACKed: no retransmission in it is in flight any more. Only
        the entries that overlap it are looked at (and each leaves or shrinks)."""
        rtx = self._rtx
        i = bisect.bisect_right(rtx, [left, _INF])
        if i and rtx[i - 1][1] > left:
            i -= 1
        j = i
        n = len(rtx)
        if j >= n or rtx[j][0] >= right:
            return
        kept: list[list[int]] = []
        changes: list[tuple[int, int]] = []  # (mark, entries it has now less the one it had)
        while j < n and rtx[j][0] < right:
            s, e, m = rtx[j]
            pieces = 0
            if s < left:
                kept.append([s, left, m])
                pieces += 1
            if e > right:
                kept.append([right, e, m])
                pieces += 1
            self._rtx_bytes -= min(e, right) - max(s, left)
            if pieces != 1:
                changes.append((m, pieces - 1))
            j += 1
        rtx[i:j] = kept
        for m, delta in changes:
            if delta > 0:
                self._rtx_mark_added(m)
            else:
                self._rtx_mark_removed(m)
        if len(rtx) > RTX_MAX:
            self._rtx_drop_lowest()

    def _rtx_drop_lowest(self) -> None:
        # below _rtx_high it is not sent again, only counted out of the pipe (a peer
        # that keeps moving its holes gets here)
        e = self._rtx.pop(0)
        self._rtx_bytes -= e[1] - e[0]
        self._rtx_mark_removed(e[2])

    def _rtx_mark_added(self, mark: int) -> None:
        if mark < self._rtx_min_mark:
            self._rtx_min_mark = mark
            self._rtx_min_count = 1
        elif mark == self._rtx_min_mark:
            self._rtx_min_count += 1

    def _rtx_mark_removed(self, mark: int) -> None:
        if mark == self._rtx_min_mark:
            self._rtx_min_count -= 1
            if not self._rtx_min_count:
                self._rtx_recount()  # (only when the last of the oldest goes)

    def _rtx_recount(self) -> None:
        marks = [e[2] for e in self._rtx]
        self._rtx_min_mark = min(marks, default=_INF)
        self._rtx_min_count = marks.count(self._rtx_min_mark)

    def _rtx_reset(self) -> None:
        self._rtx = []
        self._rtx_bytes = 0
        self._rtx_min_mark = _INF
        self._rtx_min_count = 0

    def _enter_recovery(self) -> None:
        self.in_recovery = True
        self._rto_recovery = False
        self.recover = self.snd_max
        self.cc.on_enter_recovery(self.snd_max - self.snd_una)
        self.stats["fast_retransmits"] += 1
        self._lt_extra = 0
        self._rtx_high = self.snd_una
        self.tlp_at = None
        self._tlp_high = 0

    def _exit_recovery(self) -> None:
        self.in_recovery = False
        if not self._rto_recovery:
            self.cc.on_exit_recovery()
        self._rto_recovery = False

    def _pipe(self) -> int:
        """RFC 6675 pipe: bytes thought to be in the network."""
        una = self.snd_una
        out = self.snd_max - una
        sb = self._sacked
        sacked = self._sacked_bytes if self.sack_ok else min(self.dupacks * self.snd_mss, out)
        lost = 0
        lh = self._lost_high
        if lh > una:
            # what is SACKed below lh, from the total and what lies above it (lh sits
            # near the top: IsLost marks up to 3 blocks below it)
            above = 0
            for left, right in reversed(sb):
                if right <= lh:
                    break
                above += right - max(left, lh)
            lost = lh - una - (self._sacked_bytes - above)
        # retransmitted bytes not SACKed since (SACKs cut them out as they come)
        return max(out - sacked - lost + self._rtx_bytes, 0)

    def _next_hole(self) -> tuple[int, int] | None:
        """The first lost byte range not SACKed and not yet retransmitted, up to an MSS."""
        x = max(self._rtx_high, self.snd_una)
        lim = min(self._lost_high, self.snd_max)
        sb = self._sacked
        rtx = self._rtx
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
        end = min(x + self.snd_mss, lim)
        if i < len(sb) and sb[i][0] < end:
            end = sb[i][0]
        if k < len(rtx) and rtx[k][0] < end:
            end = rtx[k][0]
        return x, end

    def _retransmit(self, start: int, end: int, now: float) -> int:
        """Send [start, end) again (the FIN if that is what it covers); its length."""
        data_end = self.sbuf_seq + len(self.sbuf)
        n = min(end, data_end) - start
        if n > 0:
            off = start - self.sbuf_seq
            # a range that runs past the data covers the FIN, if it was sent: carry it
            # along, as the segment that first went out with it may be what was lost
            fin = end > data_end and self.fin_queued and self.snd_max > data_end
            self._emit_data(start, memoryview(self.sbuf)[off:off + n], now, fin)
            n += fin
        elif self.fin_queued and start == data_end and self.snd_max > data_end:
            self._emit(FIN | ACK, start, self.rcv_nxt, self._wnd_field(), self._ts_opt(now),
                       b"")
            self._ack_pending = 0
            self._ack_now = False
            n = 1
        else:
            return 0
        self.stats["retransmits"] += 1
        if self._rtt_seq is not None and start < self._rtt_seq:
            self._rtt_seq = None  # Karn
        return n

    def _recovery_output(self, now: float) -> int:
        """Resend lost holes while pipe < cwnd; returns the window left for new data."""
        pipe = self._pipe()
        cwnd = self.cc.cwnd
        sent = 0
        while pipe < cwnd:
            hole = self._next_hole()
            if hole is None:
                break
            start, end = hole
            n = self._retransmit(start, end, now)
            if n <= 0:
                break
            rtx = self._rtx
            i = bisect.bisect_left(rtx, [start])
            mark = self.snd_max
            self._rtx_bytes += n  # (a hole: none of it is SACKed)
            if i and rtx[i - 1][1] == start:  # extends a run of retransmissions
                e = rtx[i - 1]
                old, e[1], e[2] = e[2], start + n, mark
                if old != mark:
                    self._rtx_mark_added(mark)
                    self._rtx_mark_removed(old)
            else:
                rtx.insert(i, [start, start + n, mark])
                self._rtx_mark_added(mark)
                if len(rtx) > RTX_MAX:
                    self._rtx_drop_lowest()
            self._rtx_high = start + n
            if self.sack_ok:
                self.stats["sack_retransmits"] += 1
            pipe += n
            sent += n
        if sent:
            if not self._rto_recovery:
                self.cc.on_recovery_sent(sent)
            if self.rto_at is None:
                self.rto_at = now + self.rto
        return min(self.snd_nxt - self.snd_una + max(cwnd - pipe, 0), self.snd_wnd)

    def _on_data(self, seq: int, payload: memoryview, now: float) -> None:
        rn = self.rcv_nxt
        if seq < rn:
            payload = payload[rn - seq:]
            seq = rn
            if not payload:
                self._ack_now = True
                return
        room = self._rcv_space()
        end = seq + len(payload)
        if end > rn + room:
            payload = payload[:rn + room - seq]
            end = seq + len(payload)
            if not payload:
                self._ack_now = True
                return
        if seq == rn:
            self.rbuf.append(payload)
            self.rcv_nxt = end
            if self._ooo_starts:
                self._drain_ooo()
                self._ack_now = True  # RFC 5681 4.2: a segment that fills a hole
            else:
                self._ack_pending += 1
        else:
            self._store_ooo(seq, payload)
            recent = self._ooo_recent
            recent.insert(0, seq)
            del recent[8:]
            # RFC 5681 4.2: every out-of-order segment is ACKed at once, not once per
            # batch: the sender counts these duplicate ACKs, and each one carries the
            # block of the segment that caused it first (RFC 2018)
            self._send_ack(now)

    def _store_ooo(self, seq: int, payload: memoryview) -> None:
        """Keep the bytes of an out-of-order segment that no piece holds yet (the
        segment lies inside the window: see ``_on_data``)."""
        end = seq + len(payload)
        blocks = self._ooo_blocks
        gaps: list[tuple[int, int]] = []
        i = bisect.bisect_right(blocks, [seq, _INF])  # the first block that starts above seq
        x = seq
        if i and blocks[i - 1][1] > x:
            x = blocks[i - 1][1]
        n = len(blocks)
        while x < end:
            if i < n and blocks[i][0] < end:
                left, right = blocks[i]
                if left > x:
                    gaps.append((x, left))
                x = right
                i += 1
            else:
                gaps.append((x, end))
                break
        for start, stop in gaps:
            if self._put_ooo(start, payload[start - seq:stop - seq]):
                self._add_ooo_block(start, stop)
            else:
                self.stats["ooo_dropped"] += 1

    def _put_ooo(self, start: int, data: memoryview) -> bool:
        """Store ``data`` (bytes no piece holds) from ``start``: appended to the piece
        that ends there if that is still small, else as a piece of its own; a small
        piece that starts where it ends is joined to it (segments that overlap at
        random would otherwise leave a piece per gap they filled)."""
        starts = self._ooo_starts
        ooo = self._ooo
        end = start + len(data)
        j = bisect.bisect_left(starts, start)
        nxt = ooo.get(end) if j < len(starts) and starts[j] == end else None
        if nxt is not None and len(nxt) > OOO_JOIN_NEXT:
            nxt = None  # (joining copies it: only small ones)
        if j:
            prev = ooo[starts[j - 1]]
            if starts[j - 1] + len(prev) == start and len(prev) < OOO_COALESCE:
                prev += data
                if nxt is not None:
                    prev += nxt
                    del ooo[end], starts[j]
                self.ooo_bytes += len(data)
                return True
        if nxt is not None:  # the next piece now starts here
            piece = bytearray(data)
            piece += nxt
            del ooo[end]
            starts[j] = start
            ooo[start] = piece
            self.ooo_bytes += len(data)
            return True
        if len(starts) >= OOO_MAX_PIECES:
            if j == len(starts):
                return False  # the highest: nothing above it to make room
            self._prune_ooo_top()
        starts.insert(j, start)
        ooo[start] = bytearray(data)
        self.ooo_bytes += len(data)
        return True

    def _prune_ooo_top(self) -> None:
        """Forget the highest piece, SACKed or not (RFC 2018 lets a receiver renege)."""
        top = self._ooo_starts.pop()
        self.ooo_bytes -= len(self._ooo.pop(top))
        blk = self._ooo_blocks[-1]  # the piece is the end of the top block
        if blk[0] >= top:
            self._ooo_blocks.pop()
        else:
            blk[1] = top
        self.stats["ooo_pruned"] += 1

    def _add_ooo_block(self, left: int, right: int) -> None:
        blocks = self._ooo_blocks
        i = bisect.bisect_left(blocks, [left])
        if i > 0 and blocks[i - 1][1] >= left:
            i -= 1
            b = blocks[i]
            if right > b[1]:
                b[1] = right
        else:
            b = [left, right]
            blocks.insert(i, b)
        while i + 1 < len(blocks) and blocks[i + 1][0] <= b[1]:
            if blocks[i + 1][1] > b[1]:
                b[1] = blocks[i + 1][1]
            del blocks[i + 1]

    def _drain_ooo(self) -> None:
        starts = self._ooo_starts
        ooo = self._ooo
        i = 0
        while i < len(starts) and starts[i] <= self.rcv_nxt:
            s = starts[i]
            d = ooo.pop(s)
            self.ooo_bytes -= len(d)
            end = s + len(d)
            if end > self.rcv_nxt:
                # a whole piece is handed over as it is (nobody else holds it)
                self.rbuf.append(d if s == self.rcv_nxt else memoryview(d)[self.rcv_nxt - s:])
                self.rcv_nxt = end
            i += 1
        del starts[:i]
        blocks = self._ooo_blocks
        j = 0
        while j < len(blocks) and blocks[j][0] <= self.rcv_nxt:
            j += 1
        del blocks[:j]

    def _sack_blocks(self) -> tuple[tuple[int, int], ...]:
        """Up to 4 blocks (3 beside timestamps): the one holding the latest
        out-of-order segment first, then those of the arrivals before it (RFC 2018),
        then the highest others."""
        blocks = self._ooo_blocks
        limit = 3 if self.ts_ok else 4
        out: list[tuple[int, int]] = []
        for s in self._ooo_recent:
            i = bisect.bisect_right(blocks, [s, 1 << 62]) - 1
            if i >= 0 and blocks[i][1] > s:
                b = (blocks[i][0], blocks[i][1])
                if b not in out:
                    out.append(b)
                    if len(out) == limit:
                        return tuple(out)
        for blk in reversed(blocks):
            b = (blk[0], blk[1])
            if b not in out:
                out.append(b)
                if len(out) == limit:
                    break
        return tuple(out)

    # --------------------------------------------------------------- sending
    def _ts_now(self, now: float) -> int:
        return int((now - self._ts_base) * 1000) + 1

    def _ts_opt(self, now: float) -> bytes:
        if not self.ts_ok:
            return b""
        return _TS_PREFIX + _II.pack(self._ts_now(now) & MASK, self.ts_recent & MASK)

    def _wnd_field(self) -> int:
        space = self._rcv_space()
        self._rcv_adv_edge = self.rcv_nxt + space
        return min(space >> self.rcv_wscale, 65535)

    def _emit(self, flags: int, seq: int, ack: int, window: int, options: bytes,
              payload: bytes | memoryview) -> None:
        self.stats["segments_out"] += 1
        self.host.tcp_emit(self, flags, seq, ack, window, options, payload)

    def _emit_data(self, seq: int, payload: memoryview, now: float, fin: bool = False) -> None:
        flags = ACK | FIN if fin else ACK
        if seq + len(payload) == self.sbuf_seq + len(self.sbuf):
            flags |= PSH
        self._emit(flags, seq, self.rcv_nxt, self._wnd_field(), self._ts_opt(now), payload)
        self._ack_pending = 0
        self._ack_now = False
        self.delack_at = None

    def output(self, now: float) -> None:
        """Send what the windows allow, then a pure ACK if one is due."""
        st = self.state
        if st in _SEND_STATES:
            mss = self.snd_mss
            data_end = self.sbuf_seq + len(self.sbuf)
            if self.in_recovery:
                win = self._recovery_output(now)
            else:
                if self.snd_nxt == self.snd_una < data_end and now - self._data_sent_at > self.rto:
                    self.cc.on_idle()
                win = min(self.cc.cwnd + self._lt_extra, self.snd_wnd)
            nxt0 = self.snd_nxt
            mv = memoryview(self.sbuf)
            sent = False
            while True:
                nxt = self.snd_nxt
                avail = data_end - nxt
                usable = self.snd_una + win - nxt
                if avail > 0 and usable > 0:
                    n = min(avail, usable)
                    if n < avail:  # the window ends this run: full segments only
                        if n >= mss:
                            n -= n % mss
                        elif nxt > self.snd_una:
                            break  # sender SWS avoidance: wait for a bigger window
                    off = nxt - self.sbuf_seq
                    end = nxt + n
                    # the whole run in one call: MSS-sized segments, PSH on the last if it
                    # empties the buffer
                    self.stats["segments_out"] += self.host.tcp_emit_run(
                        self, ACK, nxt, self.rcv_nxt, self._wnd_field(), self._ts_opt(now),
                        mv[off:end - self.sbuf_seq], mss, end == data_end)
                    self._ack_pending = 0
                    self._ack_now = False
                    self.delack_at = None
                    if self._rtt_seq is None and end > self.snd_max:
                        # time the first segment that carries new data
                        self._rtt_seq = min(end, nxt + (max(0, self.snd_max - nxt) // mss + 1) * mss)
                        self._rtt_time = now
                    self.snd_nxt = end
                    if end > self.snd_max:
                        self.snd_max = end
                    sent = True
                    continue
                if self.fin_queued and avail == 0:
                    self._emit(FIN | ACK, nxt, self.rcv_nxt, self._wnd_field(),
                               self._ts_opt(now), b"")
                    self._ack_pending = 0
                    self._ack_now = False
                    self.snd_nxt = nxt + 1
                    if self.snd_nxt > self.snd_max:
                        self.snd_max = self.snd_nxt
                    sent = True
                break
            mv.release()
            if sent:
                self._data_sent_at = now
                if self.snd_nxt - self.snd_una > self._flight_high:
                    self._flight_high = self.snd_nxt - self.snd_una
                if self.rto_at is None:
                    self.rto_at = now + self.rto
                    self._arm_tlp(now)
                if self.in_recovery and not self._rto_recovery:
                    self.cc.on_recovery_sent(self.snd_nxt - nxt0)
            if (self.snd_wnd == 0 and data_end > self.snd_nxt and self.snd_nxt == self.snd_una
                    and self.persist_at is None):
                self.persist_at = now + self._persist_interval()
        if self._ack_now or self._ack_pending >= 2:
            self._send_ack(now)
        elif self._ack_pending and self.delack_at is None:
            self.delack_at = now + self.config.delayed_ack

    def _send_ack(self, now: float) -> None:
        opts = b""
        if self.sack_ok and self._ooo_starts:
            ts = (self._ts_now(now), self.ts_recent) if self.ts_ok else None
            opts = wtcp.build_options(ts=ts, sack=self._sack_blocks())
        elif self.ts_ok:
            opts = self._ts_opt(now)
        self._emit(ACK, self.snd_nxt, self.rcv_nxt, self._wnd_field(), opts, b"")
        self._ack_pending = 0
        self._ack_now = False
        self.delack_at = None

    def _persist_interval(self) -> float:
        return min(max(self.rto, self.config.min_rto) * (1 << self._persist_backoff),
                   self.config.max_rto)

    # ----------------------------------------------------------------- timers
    def next_deadline(self) -> float | None:
        best: float | None = None
        for t in (self.rto_at, self.delack_at, self.persist_at, self.keepalive_at,
                  self.timewait_at, self.tlp_at, self.reo_at):
            if t is not None and (best is None or t < best):
                best = t
        return best

    def on_timer(self, now: float) -> None:
        if self.timewait_at is not None and now >= self.timewait_at:
            self.timewait_at = None
            self._transition(E.TIMEOUT)
            self._closed()
            return
        if self.rto_at is not None and now >= self.rto_at:
            self._on_rto(now)
            if self.state is S.CLOSED:
                return
        if self.tlp_at is not None and now >= self.tlp_at:
            self._on_tlp(now)
        if self.reo_at is not None and now >= self.reo_at:
            self._on_reo(now)
        if self.persist_at is not None and now >= self.persist_at:
            self.persist_at = None
            if self.snd_wnd == 0 and self.sbuf_seq + len(self.sbuf) > self.snd_nxt:
                if self.app_closed:
                    # an orphan: a peer that keeps its window shut (and answers every
                    # probe) must not hold it forever (Linux tcp_probe_timer gives an
                    # orphan tcp_orphan_retries probes)
                    self._orphan_probes += 1
                    if self._orphan_probes > self.config.max_retries:
                        self.abort(now, "orphan: peer window stayed closed")
                        return
                # zero-window probe: an old sequence number elicits an ACK
                self._emit(ACK, self.snd_una - 1, self.rcv_nxt, self._wnd_field(),
                           self._ts_opt(now), b"")
                self._persist_backoff = min(self._persist_backoff + 1, 12)
                self.persist_at = now + self._persist_interval()
        if self.keepalive_at is not None and now >= self.keepalive_at:
            self._on_keepalive(now)
            if self.state is S.CLOSED:
                return
        if self.delack_at is not None and now >= self.delack_at:
            self.delack_at = None
            if self._ack_pending:
                self._send_ack(now)

    def _on_keepalive(self, now: float) -> None:
        """Idle since ``last_rcv``: probe (the byte before SND.UNA elicits an ACK);
        ``keepalive_count`` probes unanswered: abort. The deadline set at the last
        segment may be stale: segments do not move it, this does."""
        self.keepalive_at = None
        idle = self.keepalive_idle
        if idle is None or self.state not in _KEEPALIVE_STATES:
            return
        if self._ka_probes == 0 and now < self.last_rcv + idle:
            self.keepalive_at = self.last_rcv + idle
            return
        if self.snd_max > self.snd_una or self.sbuf_seq + len(self.sbuf) > self.snd_nxt:
            # data in flight or queued: the retransmission (or persist) timer watches the
            # peer (Linux tcp_keepalive_timer reschedules the same way)
            self._ka_probes = 0
            self.keepalive_at = now + idle
            return
        if self._ka_probes >= self.keepalive_count:
            self.abort(now, "keepalive timeout")
            return
        self._ka_probes += 1
        self.stats["keepalive_probes"] += 1
        self._emit(ACK, self.snd_una - 1, self.rcv_nxt, self._wnd_field(), self._ts_opt(now), b"")
        self.keepalive_at = now + self.keepalive_interval

    def _on_rto(self, now: float) -> None:
        self.rto_at = None
        st = self.state
        if self.snd_una >= self.snd_max:
            return
        self.retries += 1
        limit = self.config.syn_retries if st in (S.SYN_SENT, S.SYN_RECEIVED) \
            else self.config.max_retries
        if self.retries > limit:
            self.abort(now, "connection timed out")
            return
        self.stats["rto_timeouts"] += 1
        self._rtt_seq = None  # Karn's rule
        self._ts_floor = self._ts_now(now) & MASK
        self.rto = min(self.rto * 2, self.config.max_rto)
        if st in (S.SYN_SENT, S.SYN_RECEIVED):
            self.stats["retransmits"] += 1
            self.stats["syn_retransmits"] = self.stats.get("syn_retransmits", 0) + 1
            self._send_syn(now)
            self.rto_at = now + self.rto
            return
        self.cc.on_rto(self.snd_max - self.snd_una, repeated=self.retries > 1)
        # RFC 6675 5.1: everything not SACKed is lost; resend it in order, from a
        # window of one segment, skipping what the peer holds. A scoreboard whose
        # first block starts at SND.UNA means the peer reneged: forget it.
        if self._sacked and self._sacked[0][0] <= self.snd_una:
            self._sacked = []
            self._sacked_bytes = 0
        self.in_recovery = True
        self._rto_recovery = True
        self.recover = self.snd_max
        self.dupacks = 0
        self._lost_high = self.snd_max
        self._rtx_reset()
        self._rtx_high = self.snd_una
        self.tlp_at = self.reo_at = None
        self._tlp_high = 0
        self._lt_extra = 0
        self.output(now)
        self.rto_at = now + self.rto

    def _pto(self) -> float:
        """RFC 8985 7.2: two RTTs, plus a worst-case delayed ACK for a lone segment."""
        srtt = self.srtt if self.srtt is not None else self.rto
        extra = 0.2 if self.snd_max - self.snd_una <= self.snd_mss else 0.002
        return max(2 * srtt + extra, 0.01)

    def _arm_tlp(self, now: float) -> None:
        if self.sack_ok and not self.in_recovery and self.srtt is not None:
            t = now + self._pto()
            rto_at = self.rto_at
            self.tlp_at = t if rto_at is None or t < rto_at else None

    def _on_tlp(self, now: float) -> None:
        """No ACK for a probe timeout: send one segment so that the peer's answer
        (with SACK) shows a lost tail, instead of waiting for the RTO."""
        self.tlp_at = None
        una = self.snd_una
        if self.in_recovery or una >= self.snd_max or self.state not in _SEND_STATES:
            return
        data_end = self.sbuf_seq + len(self.sbuf)
        nxt = self.snd_nxt
        n = min(self.snd_mss, data_end - nxt, una + self.snd_wnd - nxt)
        if n > 0:  # new data, even beyond cwnd
            self._emit_data(nxt, memoryview(self.sbuf)[nxt - self.sbuf_seq:nxt - self.sbuf_seq + n],
                            now)
            self.snd_nxt = nxt + n
            if self.snd_nxt > self.snd_max:
                self.snd_max = self.snd_nxt
        else:  # the last segment sent, again (queued data past it may not fit the window)
            start = max(una, min(data_end, self.snd_max) - self.snd_mss)
            if start >= data_end:
                start = data_end  # only the FIN is outstanding
            if not self._retransmit(start, self.snd_max, now):  # an MSS of data at most, and the FIN if sent
                return
        self._tlp_high = self.snd_max
        self.stats["tlp_probes"] += 1
        self.rto_at = now + self.rto

    def _on_reo(self, now: float) -> None:
        """The reordering window passed: holes below what was SACKed then are lost."""
        self.reo_at = None
        sb = self._sacked
        una = self.snd_una
        if not sb or una >= self.snd_max:
            return
        mark = self._reo_mark
        if mark > self._lost_high:
            self._lost_high = mark
        self._relost(mark)
        if not self.in_recovery and self._lost_high > una and self._next_hole() is not None:
            self._enter_recovery()
            self.cc.on_recovery_ack(0, self._pipe())
        top = sb[-1][1]
        if top > mark:
            self.reo_at = now + self._reo_wnd()
            self._reo_mark = top
