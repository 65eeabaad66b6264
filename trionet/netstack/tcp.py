"""The TCP connection (RFC 9293), sans-IO: its state machine, input and output.

Here: the state table and every transition; opening, the application's calls
(send, read, close, release, abort, keepalive settings); segment arrival (window
checks, ACK processing, the window update, FIN); the receive fast path's header
prediction; output (new data in MSS-sized runs, pure ACKs with SACK blocks,
timestamps, the advertised window); the timers (``on_timer``: retransmission
timeout with its backoff, zero-window probe, keepalive, delayed ACK, TIME-WAIT
and FIN-WAIT-2) and the RTT estimate behind the RTO (RFC 6298, RFC 7323).

Elsewhere: which bytes are lost and resending them, SACK scoreboard, RACK and the
tail loss probe (``recovery``, ``scoreboard``); out-of-order data held for
reassembly (``reassembly``); the congestion window (``congestion``); the receive
buffer (``rbuf``); header formats (``wire``); IP routing (``stack``).

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

import enum
from collections.abc import Callable
from typing import Protocol

from ..errors import LocalProtocolError
from .congestion import NewReno
from .rbuf import RecvBuffer
from .reassembly import Reassembly
from .recovery import LossRecovery
from .wire import tcp as wtcp
from .wire.tcp import ACK, FIN, MASK, PSH, RST, SYN, TIMESTAMP, TS_WORD, URG, TcpOptions

_TS_PACK = TIMESTAMP.pack


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
        self.stats = {"segments_in": 0, "segments_out": 0, "retransmits": 0,
                      "fast_retransmits": 0, "rto_timeouts": 0, "dupacks": 0,
                      "sack_retransmits": 0, "tlp_probes": 0, "lost_retransmits": 0,
                      "sack_blocks_in": 0, "sack_blocks_ignored": 0,
                      "ooo_pruned": 0, "ooo_dropped": 0, "keepalive_probes": 0}
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
        self.reassembly = Reassembly(self.stats)  # out-of-order data
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
        # the window's use: the largest flight in the round trip that ends when
        # snd_una reaches _flight_round_end, and when data last went out
        self._flight_high = 0
        self._flight_round_end = 0
        self._data_sent_at = now
        # loss recovery: SACK scoreboard, lost ranges, RACK and TLP timers
        self.recovery = LossRecovery(self)
        # acks
        self._ack_pending = 0
        self._ack_now = False

    @property
    def ooo_bytes(self) -> int:
        """Out-of-order bytes held for reassembly."""
        return self.reassembly.nbytes

    @property
    def in_recovery(self) -> bool:
        """In fast recovery or the recovery after a timeout (``recovery.in_recovery``)."""
        return self.recovery.in_recovery

    @property
    def data_end(self) -> int:
        """The sequence number just past the queued data (where the FIN goes)."""
        return self.sbuf_seq + len(self.sbuf)

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
        self.keepalive_at = self.timewait_at = None
        self.sbuf = bytearray()
        self.reassembly.clear()
        self.recovery.clear()
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
        rec = self.recovery
        if (self.state is not S.ESTABLISHED or self.reassembly.starts or self.app_closed
                or rec.scoreboard.blocks or rec.in_recovery or rec.dupacks >= 3  # on_segment would look for losses
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
                fin_acked = self.snd_una == self.snd_max and self.snd_nxt == self.data_end + 1
                self._transition(E.RCV_FIN_ACK_OF_FIN if fin_acked else E.RCV_FIN)
            elif st in (S.ESTABLISHED, S.FIN_WAIT_2):
                self._transition(E.RCV_FIN)
            if self.state is S.TIME_WAIT:
                self._enter_time_wait(now)
        elif flags & FIN and st is S.TIME_WAIT:
            self._ack_now = True
            self.timewait_at = now + 2 * self.config.msl

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
        rec = self.recovery
        board = rec.scoreboard
        sacked_before = board.nbytes
        probe_high = rec.tlp_high
        if opts.sack and self.sack_ok:
            # (at most 4 blocks: the options area holds no more, Linux TCP_NUM_SACKS)
            self.stats["sack_blocks_in"] += len(opts.sack)
            # into the scoreboard, and out of the retransmissions in flight
            board.note(opts.sack, una, max(ack, una), self.snd_max, rec.retransmitted)
        # the answer to the probe itself, not any ACK that arrives while it is out (a late
        # one after a stall carries reordering, not news of a lost tail)
        after_probe = probe_high != 0 and (ack >= probe_high or (
            bool(board.blocks) and board.blocks[-1][1] >= probe_high))
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
            if board.blocks or rec.retransmitted.entries:
                rec.on_cumulative_ack(ack, opts.sack if self.sack_ok else ())
            delivered = acked + board.nbytes - sacked_before
            flight_high = self._flight_high
            if ack >= self._flight_round_end:  # a round trip ended: measure the next one
                self._flight_round_end = self.snd_nxt
                self._flight_high = self.snd_nxt - ack
            rec.dupacks = 0
            rec.lt_extra = 0
            if rec.in_recovery and not rec.rto_recovery:
                if ack >= rec.recover:
                    rec.exit()
            else:
                self.cc.on_ack(acked, False, flight_high)  # after an RTO: slow start
                if rec.in_recovery and ack >= rec.recover:
                    rec.exit()
            rec.tlp_high = 0
            if ack >= self.snd_max:
                self.rto_at = rec.tlp_at = rec.reo_at = None
            else:
                self.rto_at = now + self.rto
                rec.arm_tlp(now)
            self._persist_backoff = 0
            if self.fin_queued and ack == self.data_end + 1:
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
            rec.dupacks += 1
            self.stats["dupacks"] += 1
            delivered = board.nbytes - sacked_before if self.sack_ok else self.snd_mss
            if not rec.in_recovery and rec.dupacks < 3:
                rec.lt_extra = rec.dupacks * self.snd_mss  # limited transmit
        else:
            delivered = board.nbytes - sacked_before
        if self.snd_max > self.snd_una and (board.blocks or rec.dupacks >= 3
                                             or rec.in_recovery):
            rec.detect_loss(now, delivered, after_probe, ack > una)
        # window update (RFC 9293 SND.WL1/WL2 rule)
        if self.snd_wl1 < seq or (self.snd_wl1 == seq and self.snd_wl2 <= ack):
            self.snd_wnd = wnd
            self.snd_wl1 = seq
            self.snd_wl2 = ack
            if wnd > 0:
                self.persist_at = None

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
            if self.reassembly.starts:
                self.rcv_nxt = self.reassembly.take_ready(end, self.rbuf)
                self._ack_now = True  # RFC 5681 4.2: a segment that fills a hole
            else:
                self._ack_pending += 1
        else:
            self.reassembly.add(seq, payload)
            # RFC 5681 4.2: every out-of-order segment is ACKed at once, not once per
            # batch: the sender counts these duplicate ACKs, and each one carries the
            # block of the segment that caused it first (RFC 2018)
            self._send_ack(now)

    # --------------------------------------------------------------- sending
    def _ts_now(self, now: float) -> int:
        return int((now - self._ts_base) * 1000) + 1

    def _ts_opt(self, now: float) -> bytes:
        if not self.ts_ok:
            return b""
        return _TS_PACK(TS_WORD, self._ts_now(now) & MASK, self.ts_recent & MASK)

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
            rec = self.recovery
            if rec.in_recovery:
                win = rec.retransmit_lost(now)
            else:
                if self.snd_nxt == self.snd_una < data_end and now - self._data_sent_at > self.rto:
                    self.cc.on_idle()
                win = min(self.cc.cwnd + rec.lt_extra, self.snd_wnd)
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
                    rec.arm_tlp(now)
                if rec.in_recovery and not rec.rto_recovery:
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
        if self.sack_ok and self.reassembly.starts:
            # up to 4 blocks (3 beside timestamps)
            ts = (self._ts_now(now), self.ts_recent) if self.ts_ok else None
            opts = wtcp.build_options(ts=ts, sack=self.reassembly.sack_blocks(3 if self.ts_ok else 4))
        elif self.ts_ok:
            opts = self._ts_opt(now)
        self._emit(ACK, self.snd_nxt, self.rcv_nxt, self._wnd_field(), opts, b"")
        self._ack_pending = 0
        self._ack_now = False
        self.delack_at = None

    def retransmit(self, start: int, end: int, now: float) -> int:
        """Send [start, end) again (the FIN if that is what it covers), whatever the
        windows say (loss recovery decides); its length."""
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

    def send_new(self, limit: int, now: float) -> int:
        """Up to ``limit`` bytes of queued data never sent, as one segment, within the
        peer's window but whatever cwnd says (a tail loss probe); how many went."""
        nxt = self.snd_nxt
        n = min(limit, self.sbuf_seq + len(self.sbuf) - nxt, self.snd_una + self.snd_wnd - nxt)
        if n <= 0:
            return 0
        self._emit_data(nxt, memoryview(self.sbuf)[nxt - self.sbuf_seq:nxt - self.sbuf_seq + n], now)
        self.snd_nxt = nxt + n
        if self.snd_nxt > self.snd_max:
            self.snd_max = self.snd_nxt
        return n

    def _persist_interval(self) -> float:
        return min(max(self.rto, self.config.min_rto) * (1 << self._persist_backoff),
                   self.config.max_rto)

    # ----------------------------------------------------------------- timers
    def next_deadline(self) -> float | None:
        best: float | None = None
        rec = self.recovery
        for t in (self.rto_at, self.delack_at, self.persist_at, self.keepalive_at,
                  self.timewait_at, rec.tlp_at, rec.reo_at):
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
        rec = self.recovery
        if rec.tlp_at is not None and now >= rec.tlp_at:
            if self.state in _SEND_STATES:
                rec.on_tlp_timer(now)
            else:
                rec.tlp_at = None
        if rec.reo_at is not None and now >= rec.reo_at:
            rec.on_reo_timer(now)
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
        self.recovery.on_rto()  # everything not SACKed is lost: output() resends it
        self.output(now)
        self.rto_at = now + self.rto
