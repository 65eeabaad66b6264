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
from .wire import tcp as wtcp
from .wire.tcp import ACK, FIN, PSH, RST, SYN, URG, TcpOptions

MASK = 0xFFFFFFFF
_TS_PREFIX = b"\x01\x01\x08\x0a"
_II = struct.Struct("!II")


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
    TIMEOUT = "2MSL timer expired"
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
    S.FIN_WAIT_2: {E.RCV_FIN: S.TIME_WAIT, E.RESET: S.CLOSED},
    S.CLOSE_WAIT: {E.CLOSE: S.LAST_ACK, E.RESET: S.CLOSED},
    S.CLOSING: {E.RCV_ACK_OF_FIN: S.TIME_WAIT, E.RESET: S.CLOSED},
    S.LAST_ACK: {E.RCV_ACK_OF_FIN: S.CLOSED, E.RESET: S.CLOSED},
    S.TIME_WAIT: {E.TIMEOUT: S.CLOSED, E.RESET: S.CLOSED},
}

#: flags that take a segment off the fast path (PSH, ECE and CWR do not)
_NOT_FAST = SYN | FIN | RST | ACK | URG
_SEND_STATES = frozenset((S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK))
_RECV_STATES = frozenset((S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2))


class TcpConfig:
    """Tunables; defaults aim at throughput over a 1280-byte MTU."""

    def __init__(self, *, recv_buffer: int = 4 << 20, send_buffer: int = 4 << 20,
                 min_rto: float = 0.2, max_rto: float = 60.0, initial_rto: float = 1.0,
                 delayed_ack: float = 0.04, msl: float = 30.0, syn_retries: int = 6,
                 max_retries: int = 15, keepalive_idle: float | None = None,
                 keepalive_interval: float = 75.0, keepalive_count: int = 9,
                 timestamps: bool = True, sack: bool = True) -> None:
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


class TcpHost(Protocol):
    """What a connection needs from the stack that owns it."""

    def tcp_emit(self, conn: TcpConnection, flags: int, seq: int, ack: int, window: int,
                 options: bytes, payload: bytes | memoryview) -> None: ...

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
        self.rbuf = bytearray()
        self.fin_received = False
        self._ooo: dict[int, bytes] = {}
        self._ooo_starts: list[int] = []
        self._last_ooo = 0
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
        self.retries = 0
        self.rto_at: float | None = None
        self.delack_at: float | None = None
        self.persist_at: float | None = None
        self.keepalive_at: float | None = None
        self.timewait_at: float | None = None
        self._persist_backoff = 0
        self._ka_probes = 0
        # congestion
        self.cc = NewReno(self.snd_mss)
        self.dupacks = 0
        self.in_recovery = False
        self.recover = 0
        self._sacked: list[tuple[int, int]] = []  # SACK scoreboard, merged, > snd_una
        self._rexmit_high = 0
        self._lt_extra = 0  # RFC 3042 limited transmit allowance
        # acks
        self._ack_pending = 0
        self._ack_now = False
        self.stats = {"segments_in": 0, "segments_out": 0, "retransmits": 0,
                      "fast_retransmits": 0, "rto_timeouts": 0, "dupacks": 0}

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
        with memoryview(rbuf) as mv:  # one copy, not a bytearray slice and then bytes()
            data = bytes(mv[:max_bytes])
        del rbuf[:max_bytes]
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
            return
        if self.state is S.SYN_SENT:
            self._transition(E.CLOSE)
            self._closed()
            return
        if self.state in (S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT):
            self.fin_queued = True
            self._transition(E.CLOSE)
            self.output(now)

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
        self._ooo.clear()
        self._ooo_starts.clear()
        self.host.tcp_closed(self)

    # ------------------------------------------------------------- receiving
    def _rcv_space(self) -> int:
        return self.config.recv_buffer - len(self.rbuf)

    def rcv_fast(self, seq_w: int, ack_w: int, flags: int, window: int, ts_val: int | None,
                 payload: memoryview) -> bool:
        """Header prediction (RFC 9293 3.10.7.4, Jacobson's fast path): the next in-order
        data segment of an established connection, acknowledging nothing new. Takes it
        and returns True, exactly as ``on_segment`` would; returns False, having
        changed nothing, for any other segment."""
        rn = self.rcv_nxt
        plen = len(payload)
        cfg = self.config
        if (self.state is not S.ESTABLISHED or flags & _NOT_FAST != ACK or seq_w != rn & MASK
                or ack_w != self.snd_una & MASK or not plen or self._ooo_starts
                or self.app_closed or cfg.keepalive_idle is not None
                or plen > cfg.recv_buffer - len(self.rbuf)):
            return False
        self.stats["segments_in"] += 1
        if ts_val is not None and self.ts_ok:
            self.ts_recent = ts_val
        # window update (the SND.WL1/WL2 rule of _process_ack, with seq == RCV.NXT)
        wl1 = self.snd_wl1
        if wl1 < rn or (wl1 == rn and self.snd_wl2 <= self.snd_una):
            wnd = window << self.snd_wscale
            self.snd_wnd = wnd
            self.snd_wl1 = rn
            self.snd_wl2 = self.snd_una
            if wnd > 0:
                self.persist_at = None
        self.rbuf += payload
        self.rcv_nxt = rn + plen
        self._ack_pending += 1
        return True

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
        if self.keepalive_at is not None or self.config.keepalive_idle is not None:
            self._ka_probes = 0
            if self.config.keepalive_idle is not None:
                self.keepalive_at = now + self.config.keepalive_idle
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
                self._on_data(seq, payload)
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
        if self.config.keepalive_idle is not None:
            self.keepalive_at = now + self.config.keepalive_idle
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
        r = now - self._rtt_time
        self._rtt_seq = None
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
        if opts.sack and self.sack_ok:
            self._note_sack(opts.sack, ack)
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
            self._rtt_sample(ack, now)
            if self.in_recovery:
                if ack >= self.recover:
                    self.in_recovery = False
                    self.cc.on_exit_recovery(self.snd_max - ack)
                else:
                    self.cc.on_partial_ack(acked)
                    if self._rexmit_high <= ack:
                        self._retransmit_first(now)
                    self._sack_retransmit(now)
            else:
                self.cc.on_ack(acked, False)
            self.dupacks = 0
            self._lt_extra = 0
            if self._sacked and self._sacked[0][0] < ack:
                self._sacked = [(max(a, ack), b) for a, b in self._sacked if b > ack]
            self.rto_at = None if ack >= self.snd_max else now + self.rto
            self._persist_backoff = 0
            if self.waker is not None or self.user is not None:
                pass
            if self.fin_queued and ack == self._fin_seq() + 1:
                st = self.state
                if st in (S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK):
                    self._transition(E.RCV_ACK_OF_FIN)
                    if self.state is S.TIME_WAIT:
                        self._enter_time_wait(now)
                    elif self.state is S.CLOSED:
                        self._closed()
                        return
        elif (ack == una and plen == 0 and not flags & FIN and self.snd_max > una
              and (wnd == self.snd_wnd or opts.sack)):
            self.dupacks += 1
            self.stats["dupacks"] += 1
            if self.in_recovery:
                self.cc.on_dupack_in_recovery()
                self._sack_retransmit(now)
            elif self.dupacks < 3:
                self._lt_extra = self.dupacks * self.snd_mss  # limited transmit
            if self.in_recovery:
                pass
            elif self.dupacks == 3 and (una >= self.recover or self._sacked):
                self.in_recovery = True
                self.recover = self.snd_max
                self.cc.on_enter_recovery(self.snd_max - una)
                self.stats["fast_retransmits"] += 1
                self._lt_extra = 0
                self._rexmit_high = 0
                self._retransmit_first(now)
                self._rexmit_high = min(una + self.snd_mss, self.snd_max)
                self._sack_retransmit(now)
        # window update (RFC 9293 SND.WL1/WL2 rule)
        if self.snd_wl1 < seq or (self.snd_wl1 == seq and self.snd_wl2 <= ack):
            self.snd_wnd = wnd
            self.snd_wl1 = seq
            self.snd_wl2 = ack
            if wnd > 0:
                self.persist_at = None

    def _note_sack(self, blocks: tuple[tuple[int, int], ...], ack: int) -> None:
        base = self.snd_una
        sb = self._sacked
        for lw, rw in blocks:
            d = (lw - base) & MASK
            left = base + (d - (1 << 32) if d & 0x80000000 else d)
            right = left + ((rw - lw) & MASK)
            if right <= max(ack, base) or right > self.snd_max or left >= right:
                continue
            sb.append((left, right))
        if not sb:
            return
        sb.sort()
        merged: list[tuple[int, int]] = []
        for left, right in sb:
            if right <= ack:
                continue
            if merged and left <= merged[-1][1]:
                if right > merged[-1][1]:
                    merged[-1] = (merged[-1][0], right)
            else:
                merged.append((left, right))
        self._sacked = merged

    def _sack_retransmit(self, now: float, budget: int = 2) -> None:
        """RFC 6675-style: resend the holes below the highest SACKed byte."""
        sb = self._sacked
        if not sb:
            return
        h = max(self._rexmit_high, self.snd_una)
        data_end = self.sbuf_seq + len(self.sbuf)
        for left, right in sb:
            if budget <= 0:
                break
            while h < left and budget > 0:
                n = min(self.snd_mss, left - h, data_end - h)
                if n <= 0:
                    break
                off = h - self.sbuf_seq
                self._emit_data(h, memoryview(self.sbuf)[off:off + n], now)
                self.stats["retransmits"] += 1
                self.stats["sack_retransmits"] = self.stats.get("sack_retransmits", 0) + 1
                h += n
                budget -= 1
            if h < right:
                h = right
        self._rexmit_high = h
        self._rtt_seq = None

    def _retransmit_first(self, now: float) -> None:
        una = self.snd_una
        self._rtt_seq = None  # Karn
        self.stats["retransmits"] += 1
        n = min(self.snd_mss, self.sbuf_seq + len(self.sbuf) - una)
        if n > 0:
            off = una - self.sbuf_seq
            self._emit_data(una, memoryview(self.sbuf)[off:off + n], now)
        elif self.fin_queued:
            self._emit(FIN | ACK, una, self.rcv_nxt, self._wnd_field(), self._ts_opt(now), b"")
        self.rto_at = now + self.rto

    def _on_data(self, seq: int, payload: memoryview) -> None:
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
            self.rbuf += payload
            self.rcv_nxt = end
            if self._ooo_starts:
                self._drain_ooo()
                self._ack_now = True
            else:
                self._ack_pending += 1
        else:
            old = self._ooo.get(seq)
            if old is None or len(old) < len(payload):
                if old is None:
                    bisect.insort(self._ooo_starts, seq)
                self._ooo[seq] = bytes(payload)
            self._last_ooo = seq
            self._ack_now = True

    def _drain_ooo(self) -> None:
        starts = self._ooo_starts
        ooo = self._ooo
        i = 0
        while i < len(starts) and starts[i] <= self.rcv_nxt:
            s = starts[i]
            d = ooo.pop(s)
            end = s + len(d)
            if end > self.rcv_nxt:
                self.rbuf += memoryview(d)[self.rcv_nxt - s:]
                self.rcv_nxt = end
            i += 1
        del starts[:i]

    def _sack_blocks(self) -> tuple[tuple[int, int], ...]:
        blocks: list[list[int]] = []
        for s in self._ooo_starts:
            e = s + len(self._ooo[s])
            if blocks and s <= blocks[-1][1]:
                blocks[-1][1] = max(blocks[-1][1], e)
            else:
                blocks.append([s, e])
        blocks.sort(key=lambda b: not (b[0] <= self._last_ooo < b[1]))
        limit = 3 if self.ts_ok else 4
        return tuple((b[0], b[1]) for b in blocks[:limit])

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

    def _emit_data(self, seq: int, payload: memoryview, now: float) -> None:
        flags = ACK
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
            win = min(self.cc.cwnd + self._lt_extra, self.snd_wnd)
            data_end = self.sbuf_seq + len(self.sbuf)
            mv = memoryview(self.sbuf)
            sent = False
            while True:
                nxt = self.snd_nxt
                avail = data_end - nxt
                usable = self.snd_una + win - nxt
                if avail > 0 and usable > 0:
                    n = min(avail, usable, mss)
                    if n < mss and n < avail and nxt > self.snd_una:
                        break  # sender SWS avoidance: wait for a bigger window
                    off = nxt - self.sbuf_seq
                    self._emit_data(nxt, mv[off:off + n], now)
                    if self._rtt_seq is None and nxt + n > self.snd_max:
                        self._rtt_seq = nxt + n
                        self._rtt_time = now
                    self.snd_nxt = nxt + n
                    if self.snd_nxt > self.snd_max:
                        self.snd_max = self.snd_nxt
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
            if sent and self.rto_at is None:
                self.rto_at = now + self.rto
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
                  self.timewait_at):
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
        if self.persist_at is not None and now >= self.persist_at:
            self.persist_at = None
            if self.snd_wnd == 0 and self.sbuf_seq + len(self.sbuf) > self.snd_nxt:
                # zero-window probe: an old sequence number elicits an ACK
                self._emit(ACK, self.snd_una - 1, self.rcv_nxt, self._wnd_field(),
                           self._ts_opt(now), b"")
                self._persist_backoff = min(self._persist_backoff + 1, 12)
                self.persist_at = now + self._persist_interval()
        if self.keepalive_at is not None and now >= self.keepalive_at:
            if self.state in (S.ESTABLISHED, S.CLOSE_WAIT) and self.snd_max == self.snd_una:
                if self._ka_probes >= self.config.keepalive_count:
                    self.abort(now, "keepalive timeout")
                    return
                self._ka_probes += 1
                self._emit(ACK, self.snd_una - 1, self.rcv_nxt, self._wnd_field(),
                           self._ts_opt(now), b"")
                self.keepalive_at = now + self.config.keepalive_interval
            elif self.config.keepalive_idle is not None:
                self.keepalive_at = now + self.config.keepalive_idle
        if self.delack_at is not None and now >= self.delack_at:
            self.delack_at = None
            if self._ack_pending:
                self._send_ack(now)

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
        self.stats["retransmits"] += 1
        self._rtt_seq = None  # Karn's rule
        self.rto = min(self.rto * 2, self.config.max_rto)
        if st in (S.SYN_SENT, S.SYN_RECEIVED):
            self.stats["syn_retransmits"] = self.stats.get("syn_retransmits", 0) + 1
            self._send_syn(now)
            self.rto_at = now + self.rto
            return
        self.cc.on_rto(self.snd_max - self.snd_una)
        self.in_recovery = False
        self.recover = self.snd_max
        self.dupacks = 0
        self._sacked = []
        self._rexmit_high = 0
        self.snd_nxt = self.snd_una  # go back N
        self.output(now)
        if self.snd_nxt == self.snd_una:
            # window closed: force one segment out anyway
            self._retransmit_first(now)
            self.snd_nxt = max(self.snd_nxt, min(self.snd_una + self.snd_mss,
                                                 self._fin_seq() + int(self.fin_queued)))
        self.rto_at = now + self.rto
