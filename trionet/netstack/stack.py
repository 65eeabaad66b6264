"""The sans-IO IP stack: routes IP packets to TCP connections, UDP sockets, ICMP.

``StackCore`` takes packets with ``deliver(packet, now)`` / ``deliver_many``
and hands packets out through ``output(packet)``. It never awaits and never
reads the clock: the driver calls ``on_timer(now)`` at ``next_deadline()``.
Objects whose state changed (connections, listeners, UDP sockets, pings) are
collected in ``touched`` for the driver to wake its waiting tasks.

Nothing a peer sends can make it raise: a packet that trips a bug of ours is
counted as ``internal_error.<kind>`` (``RejectLog``), its connection (if it
had one) is aborted, and the batch goes on. What a peer can make it hold is
bounded: connections in total and per remote address, half-open ones per
listener (the oldest go first), out-of-order bytes and SACK state per
connection (see ``reassembly`` and ``scoreboard``), queued datagrams per UDP
socket in count and bytes.

Here: routing and the tables (connections by key and, for the IPv4 fast path, by
the 12 bytes that name them in a packet), the receive fast path's loop, listeners
and their backlogs, UDP sockets, ICMP echo, the limits. Headers are read and built
by ``wire`` (the fast paths' fused IPv4+TCP codec: ``wire.ipv4_tcp``); a
connection's TCP is ``tcp.TcpConnection``.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import random
import zlib
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

from ..errors import LocalProtocolError, TransportError
from ..rejects import RejectLog
from .tcp import NOT_FAST, State, TcpConfig, TcpConnection
from .wire import WireError, pseudo_sum
from .wire import icmp as wicmp
from .wire import ipv4 as wip4
from .wire import ipv6 as wip6
from .wire import tcp as wtcp
from .wire import udp as wudp
from .wire.ipv4_tcp import FAST_RX, FAST_RX_TS, checksums_ok, emit_run, flow_key
from .wire.tcp import ACK, MASK, PSH, RST, SYN, TS_WORD

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PacketInfo(NamedTuple):
    """What the inbound filter sees: a new TCP connection, a datagram, an echo."""

    version: int
    proto: int  # 6 tcp, 17 udp, 1 icmp, 58 icmpv6
    src: IPAddress
    dst: IPAddress
    src_port: int
    dst_port: int


class ConnectionLimitError(TransportError):
    """A new connection would pass ``max_connections`` or ``max_connections_per_peer``."""


#: Connections in all, and per remote address: tailscaled's netstack allows 8192
#: in-flight forwarded connections on Linux (2048 elsewhere), a client 2/3 of that.
#: Each of ours costs a few KiB idle and up to its buffers busy.
MAX_CONNECTIONS = 4096
#: SYNs for forwarded destinations whose host-side dial is still running (tailscaled's
#: gVisor forwarder: 8192 in flight on Linux), and per client address (2/3 of that).
MAX_FORWARD_PENDING = 8192
#: A UDP socket's queue, in bytes (Linux's rmem_default is 208 KiB), beside its count.
UDP_QUEUE_BYTES = 256 << 10


ConnKey = tuple[bytes, int, bytes, int]  # (remote address, remote port, local address, local port)


class ForwardHooks(Protocol):
    """What a router (``trionet.router``) tells the stack, and is told by it, about
    packets for addresses that are not the stack's own. All called synchronously from
    inside a core call: they must not call back into the stack."""

    def wants(self, dst: bytes) -> bool:
        """Is ``dst`` (a packed address, not one of ours) forwarded at all?"""

    def tcp_syn(self, key: ConnKey) -> bool:
        """A new connection to a forwarded address: start dialing it (then call
        ``complete_pending`` or ``refuse_pending``), or False to drop the SYN."""

    def udp_datagram(self, src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> None:
        """A datagram for a forwarded address."""

    def icmp_echo(self, src: bytes, dst: bytes, ident: int, seq: int, payload: bytes) -> None:
        """An echo request for a forwarded address (answer with ``echo_reply_from``)."""


class PendingSyn(NamedTuple):
    """A forwarded connection's SYN, held while the host dials its destination."""

    seq: int
    wnd: int
    opts: wtcp.TcpOptions


class ListenerCore:
    """Half-open (SYN backlog) and established-not-accepted (accept backlog) queues."""

    def __init__(self, port: int, backlog: int, syn_backlog: int) -> None:
        self.port = port
        self.backlog = backlog
        self.syn_backlog = syn_backlog
        self.half_open: dict[tuple[bytes, int, bytes, int], TcpConnection] = {}
        self.accept_queue: collections.deque[TcpConnection] = collections.deque()
        self.closed = False
        self.waker: Callable[[], object] | None = None


class UdpSocketCore:
    def __init__(self, port: int, queue_limit: int, queue_bytes_limit: int = UDP_QUEUE_BYTES) -> None:
        self.port = port
        self.queue: collections.deque[tuple[bytes, tuple[IPAddress, int]]] = collections.deque()
        self.queue_limit = queue_limit  # datagrams
        self.queue_bytes_limit = queue_bytes_limit
        self.queued_bytes = 0
        self.drops = 0
        self.closed = False
        self.waker: Callable[[], object] | None = None

    def pop(self) -> tuple[bytes, tuple[IPAddress, int]]:
        """The oldest queued datagram (the queue must not be empty)."""
        item = self.queue.popleft()
        self.queued_bytes -= len(item[0])
        return item


class EchoWaiter:
    def __init__(self) -> None:
        self.reply: bytes | None = None
        self.waker: Callable[[], object] | None = None


class _Touchable:
    waker: Callable[[], object] | None


EPHEMERAL_LOW = 49152  # IANA dynamic ports, as RFC 6056 recommends
EPHEMERAL_COUNT = 65536 - EPHEMERAL_LOW


class StackCore:
    """IPv4/IPv6 + TCP/UDP/ICMP, sans-IO."""

    def __init__(self, addresses: Iterable[IPAddress], output: Callable[[bytes], None],
                 mtu: int = 1280, accept_inbound: Callable[[PacketInfo], bool] | None = None,
                 tcp_config: TcpConfig | None = None, seed: int | None = None,
                 verify_checksums: bool = True, max_connections: int = MAX_CONNECTIONS,
                 max_connections_per_peer: int | None = None,
                 max_forward_pending: int = MAX_FORWARD_PENDING,
                 max_forward_pending_per_peer: int | None = None) -> None:
        self.addresses = [ipaddress.ip_address(a) for a in addresses]
        self._v4 = [a.packed for a in self.addresses if a.version == 4]
        self._v6 = [a.packed for a in self.addresses if a.version == 6]
        self._local = frozenset(self._v4 + self._v6)
        self.output = output
        #: destinations served inside this process (MagicDNS's 100.100.100.100): their
        #: packets go to the callable, not to ``output`` (the network); see NetStack.divert
        self.divert: dict[bytes, Callable[[bytes], None]] = {}
        self.mtu = mtu
        self.accept_inbound = accept_inbound
        self.tcp_config = tcp_config or TcpConfig()
        #: False when every packet comes through an authenticated tunnel (WireGuard:
        #: Poly1305 already guarantees it is the bytes the peer sent), as tailscaled's
        #: netstack does: IPv4 header and TCP checksums are then not recomputed.
        self.verify_checksums = verify_checksums
        self._rng = random.Random(seed)
        self.conns: dict[tuple[bytes, int, bytes, int], TcpConnection] = {}
        #: the IPv4 ones again, by the 12 bytes that name them in a packet (offsets 12-23:
        #: source, destination, ports): the receive fast path finds them without a tuple
        self._flows4: dict[bytes, TcpConnection] = {}
        self.listeners: dict[int, ListenerCore] = {}
        self.udp: dict[int, UdpSocketCore] = {}
        self.echo: dict[tuple[bytes, int, int], EchoWaiter] = {}
        self.touched: list[_Touchable | TcpConnection | ListenerCore | UdpSocketCore
                           | EchoWaiter] = []
        self.stats: collections.Counter[str] = collections.Counter()
        #: counts drops (``drop_<reason>``), refusals and internal errors in ``stats``
        self.rejects = RejectLog(logger, "netstack", self.stats)
        #: TCP connections in ``conns`` (any state, either direction), and per remote address
        self.max_connections = max_connections
        self.max_connections_per_peer = (max_connections * 2 // 3 if max_connections_per_peer is None
                                         else max_connections_per_peer)
        self._peer_conns: dict[bytes, int] = {}
        #: every listener's half-open connections, oldest first (evicted when the table is full)
        self._half_open: dict[tuple[bytes, int, bytes, int], TcpConnection] = {}
        self._pseudo: dict[tuple[bytes, bytes, int], int] = {}
        #: packets for addresses not ours go to it (None: they are dropped as not_for_us)
        self.forwarder: ForwardHooks | None = None
        #: forwarded SYNs held until the host-side dial ends (``complete_pending``)
        self.pending: dict[ConnKey, PendingSyn] = {}
        self.max_forward_pending = max_forward_pending
        self.max_forward_pending_per_peer = (max_forward_pending * 2 // 3 if max_forward_pending_per_peer is None
                                             else max_forward_pending_per_peer)
        self._pending_per_peer: dict[bytes, int] = {}
        self._ident = 0
        self._batch: set[TcpConnection] = set()
        #: the receive fast path (``deliver_many``); off only to test it against the slow path
        self.header_prediction = True
        self.fast_segments = 0  # segments it took
        #: the earliest deadline a call gave a connection it did not put in ``touched``
        #: (a half-open one's SYN-ACK retransmission); the driver takes and clears it
        self.timer_hint: float | None = None
        self._now = 0.0
        self._echo_ident = self._rng.randrange(1 << 16)
        self._echo_seq = 0
        self._port_secret = self._rng.getrandbits(64).to_bytes(8, "big")
        self._next_ephemeral = 0

    # ---------------------------------------------------------------- helpers
    def statistics(self) -> dict[str, int]:
        """Counters, then gauges of what the stack holds now. ``tcp_retransmits`` and
        the other per-connection counters include closed connections only."""
        out = dict(self.stats)
        conns = self.conns
        out["tcp_connections"] = len(conns)
        out["tcp_listeners"] = len(self.listeners)
        out["udp_sockets"] = len(self.udp)
        out["tcp_half_open"] = len(self._half_open)
        out["tcp_peers"] = len(self._peer_conns)
        out["tcp_accept_queued"] = sum(len(lst.accept_queue) for lst in self.listeners.values())
        by_state = collections.Counter(c.state for c in conns.values())
        for st in State:
            if st not in (State.LISTEN, State.CLOSED):  # (a closed one has left ``conns``)
                out["tcp_state_" + st.name.lower()] = by_state[st]
        out["tcp_ooo_bytes"] = sum(c.ooo_bytes for c in conns.values())
        out["tcp_recv_buffered_bytes"] = sum(len(c.rbuf) for c in conns.values())
        out["tcp_send_buffered_bytes"] = sum(len(c.sbuf) for c in conns.values())
        out["udp_queued_datagrams"] = sum(len(u.queue) for u in self.udp.values())
        out["udp_queued_bytes"] = sum(u.queued_bytes for u in self.udp.values())
        out["icmp_echo_waiting"] = len(self.echo)
        out["tcp_forward_pending"] = len(self.pending)
        return out

    def _drop(self, reason: str) -> None:
        self.rejects.reject("drop_" + reason)

    def _conn_failed(self, conn: TcpConnection, kind: str, exc: Exception) -> None:
        """A bug of ours while handling ``conn``: count it, and end the connection (its
        state may be half-updated) rather than the task that called us."""
        self.rejects.internal_error(kind, exc)
        try:
            if conn.state is not State.CLOSED:
                conn.abort(self._now, "internal error")
        except Exception:  # the same bug again: the table entry goes below anyway
            pass
        if conn.error is None:
            conn.error = "internal error"
        conn.state = State.CLOSED
        self._forget(conn)  # (if it is in _batch, _flush passes it by: it is CLOSED)
        self.touched.append(conn)

    def _src_for(self, dst: bytes) -> bytes:
        pool = self._v4 if len(dst) == 4 else self._v6
        if not pool:
            raise LocalProtocolError("no local address of that IP version")
        return pool[0]

    def _pseudo_base(self, src: bytes, dst: bytes, proto: int) -> int:
        k = (src, dst, proto)
        v = self._pseudo.get(k)
        if v is None:
            v = pseudo_sum(src, dst, proto, 0) % 0xFFFF
            if len(self._pseudo) > 4096:
                self._pseudo.clear()
            self._pseudo[k] = v
        return v

    def _ip_out(self, src: bytes, dst: bytes, proto: int, payload: bytes,
                extra: bytes | memoryview = b"") -> None:
        plen = len(payload) + len(extra)
        if len(src) == 4:
            self._ident = (self._ident + 1) & 0xFFFF
            hdr = wip4.build_header(src, dst, proto, plen, self._ident)
        else:
            hdr = wip6.build_header(src, dst, proto, plen)
        self.stats["ip_out"] += 1
        out = self.divert.get(dst, self.output) if self.divert else self.output
        out(b"".join((hdr, payload, extra)) if extra else hdr + payload)

    # ------------------------------------------------------------------ input
    def deliver(self, packet: bytes | bytearray | memoryview, now: float) -> None:
        """Process one inbound IP packet and flush what it caused."""
        self.deliver_many((packet,), now)

    def deliver_many(self, packets: Iterable[bytes | bytearray | memoryview], now: float,
                     admit: Callable[[bytes | bytearray | memoryview], bool] | None = None) -> None:
        """Process a batch; ACKs and window updates go out once, at the end.

        Runs of in-order data segments of an established IPv4 connection take a fast
        path: one header unpack each, checked against the connection's header
        prediction (``TcpConnection.rcv_prediction``), and one ``rcv_fast_run`` per
        run. Everything else, and anything the fast path is unsure of, goes through
        ``on_segment`` or ``_input``.

        ``admit`` (optional) is asked about every packet that does not take the fast
        path; False drops it. The fast path only carries non-SYN segments of
        connections that already exist, which a packet filter admits anyway
        (Tailscale's filter lets every non-SYN TCP segment to a local address in).
        That holds while the filter's local addresses include the stack's. Those are
        fixed when the stack starts: should the control server move a node to new
        addresses, connections to the old ones keep the fast path until they close,
        while a new connection to an old address is refused (its SYN meets ``admit``).

        Never raises: an exception (a bug of ours, or of ``admit``) is counted as
        ``internal_error.packet`` and the batch goes on after the packet that raised."""
        self._now = now
        it = iter(packets)
        while True:
            try:
                self._deliver_batch(it, now, admit)
                break
            except Exception as exc:  # the per-batch boundary: nothing a packet does ends the caller
                self.rejects.internal_error("packet", exc)
        try:
            self._flush(now)
        except Exception as exc:  # ditto (each connection's output is guarded in _flush)
            self.rejects.internal_error("flush", exc)

    def _deliver_batch(self, packets: Iterable[bytes | bytearray | memoryview], now: float,
                       admit: Callable[[bytes | bytearray | memoryview], bool] | None) -> None:
        flows = self._flows4
        verify = self.verify_checksums
        batch = self._batch
        unpack = FAST_RX.unpack_from  # (the layouts and what the fields are: wire.ipv4_tcp)
        unpack_ts = FAST_RX_TS.unpack_from
        run: TcpConnection | None = None  # the connection whose run is being gathered
        payloads: list[memoryview] = []
        exp_seq = exp_ack = space = nbytes = last_seq = last_wnd = any_wnd = 0
        last_ts: int | None = None
        for p in packets:
            conn = known = None  # known: the connection of a segment with other options (SACK)
            if len(p) >= 40:
                if len(p) >= 52:  # the timestamp option too, if it is there (else payload bytes)
                    vihl, total, ff, proto, flow, seq, ack, off, flags, wnd, kind, ts_word, ts_ecr = unpack_ts(p)
                else:
                    vihl, total, ff, proto, flow, seq, ack, off, flags, wnd = unpack(p)
                    kind = 0
                if vihl == 0x45 and proto == 6 and total == len(p) and not ff & 0x3FFF:
                    conn = flows.get(flow)  # (a connection's local address is one of ours)
                    hlen = (off >> 4) * 4
                    ts_val: int | None = None
                    if hlen == 32 and kind == TS_WORD:
                        ts_val = ts_word
                    elif hlen != 20:
                        if 20 < hlen <= total - 20:
                            known = conn  # not for a run: on_segment, once its options are parsed
                        conn = None
                    if verify and (conn is not None or known is not None) and not checksums_ok(
                            p, total, self._pseudo_base(flow[:4], flow[4:8], 6)):
                        conn = known = None  # _input counts the drop
            if conn is not None:
                plen = total - 20 - hlen
                if conn is not run:  # load this connection's prediction (`run`: the one loaded)
                    if payloads:
                        self._end_run(run, payloads, nbytes, last_seq, last_wnd, any_wnd, last_ts)
                        payloads = []
                    run = None
                    batch.add(conn)  # a fast or a slow path: output() at the end either way
                    prediction = conn.rcv_prediction() if self.header_prediction else None
                    if prediction is not None:
                        run = conn
                        exp_seq, exp_ack, space = prediction
                        nbytes = any_wnd = 0
                        last_ts = None
                if conn is run and seq == exp_seq and ack == exp_ack and flags & NOT_FAST == ACK \
                        and 0 < plen <= space:
                    payloads.append(memoryview(p)[20 + hlen:])
                    nbytes += plen
                    space -= plen
                    last_seq = seq
                    exp_seq = (seq + plen) & MASK
                    last_wnd = wnd
                    any_wnd |= wnd
                    if ts_val is not None:
                        last_ts = ts_val
                    continue
            if payloads:  # anything else may change the run's connection: take the run first
                self._end_run(run, payloads, nbytes, last_seq, last_wnd, any_wnd, last_ts)
                payloads = []
            run = None
            if known is not None:  # (and conn is None)
                if admit is not None and not admit(p):
                    continue
                self.stats["ip_in"] += 1
                try:
                    opts = wtcp.parse_options(memoryview(p)[40:20 + hlen])
                except WireError as e:
                    self._drop(e.reason)
                    continue
                conn = known
            elif conn is not None:
                if admit is not None and not admit(p):
                    continue
                opts = wtcp.NO_OPTIONS if ts_val is None else wtcp.TcpOptions(ts_val=ts_val, ts_ecr=ts_ecr)
                self.stats["ip_in"] += 1
            if conn is not None:
                self.stats["tcp_in"] += 1
                try:
                    conn.on_segment(seq, ack, flags, wnd, opts, memoryview(p)[20 + hlen:], now)
                except Exception as exc:  # a bug of ours: this connection ends, not the batch
                    self._conn_failed(conn, "tcp_segment", exc)
                    continue
                batch.add(conn)
            elif admit is None or admit(p):
                self._input(p, now)
        if payloads:
            self._end_run(run, payloads, nbytes, last_seq, last_wnd, any_wnd, last_ts)

    def _end_run(self, conn: TcpConnection | None, payloads: list[memoryview], nbytes: int, last_seq: int,
                 last_wnd: int, any_wnd: int, last_ts: int | None) -> None:
        assert conn is not None  # payloads come from a run, and a run has its connection
        conn.rcv_fast_run(payloads, nbytes, last_seq, last_wnd, any_wnd, last_ts, self._now)
        count = len(payloads)
        self.fast_segments += count
        stats = self.stats
        stats["ip_in"] += count
        stats["tcp_in"] += count

    def _flush(self, now: float) -> None:
        batch = self._batch
        if batch:
            touched = self.touched
            for c in batch:
                if c.state is not State.CLOSED:
                    try:
                        c.output(now)
                    except Exception as exc:  # a bug of ours: this connection ends
                        self._conn_failed(c, "tcp_output", exc)
                touched.append(c)
            batch.clear()

    def _input(self, packet: bytes | bytearray | memoryview, now: float) -> None:
        buf = memoryview(packet)
        self.stats["ip_in"] += 1
        if not buf:
            self._drop("empty")
            return
        v = buf[0] >> 4
        try:
            if v == 4:
                ihl, total, _id, ff, _ttl, proto, src, dst = wip4.unpack(buf, self.verify_checksums)
                if dst not in self._local and not self._forwarded(dst):
                    raise WireError("not_for_us")
                if ff & 0x3FFF:
                    raise WireError("ipv4_fragment")
                body = buf[ihl:total]
                if proto == 6:
                    self._tcp_in(4, src, dst, body, now)
                elif proto == 17:
                    self._udp_in(4, src, dst, body)
                elif proto == 1:
                    self._icmp_in(4, src, dst, body)
                else:
                    raise WireError("unknown_protocol")
            elif v == 6:
                plen6, nxt6, _hops, src6, dst6 = wip6.unpack(buf)
                if dst6 not in self._local and not self._forwarded(dst6):
                    raise WireError("not_for_us")
                body = buf[40:40 + plen6]
                if nxt6 == 6:
                    self._tcp_in(6, src6, dst6, body, now)
                elif nxt6 == 17:
                    self._udp_in(6, src6, dst6, body)
                else:
                    self._icmp_in(6, src6, dst6, body)
            else:
                raise WireError("bad_ip_version")
        except WireError as e:
            self._drop(e.reason)

    def _forwarded(self, dst: bytes) -> bool:
        fwd = self.forwarder
        return fwd is not None and fwd.wants(dst)

    # -------------------------------------------------------------------- TCP
    def _tcp_in(self, v: int, src: bytes, dst: bytes, seg: memoryview, now: float) -> None:
        n = len(seg)
        sport, dport, seq, ack, hlen, flags, wnd, opts = wtcp.unpack(
            seg, self._pseudo_base(src, dst, 6) + n if self.verify_checksums else None)
        key = (src, sport, dst, dport)
        conn = self.conns.get(key)
        self.stats["tcp_in"] += 1
        if conn is not None:
            try:
                conn.on_segment(seq, ack, flags, wnd, opts, seg[hlen:], now)
            except Exception as exc:  # a bug of ours: this connection ends, not the batch
                self._conn_failed(conn, "tcp_segment", exc)
                return
            self._batch.add(conn)
            return
        if self.pending and key in self.pending:
            if flags & RST:  # the client gave up: the dial's end finds nothing to complete
                self._forget_pending(key)
                self.stats["tcp_forward_client_reset"] += 1
            else:  # a retransmitted SYN (or junk) while the host dials: the SYN-ACK comes after
                self.stats["tcp_forward_syn_swallowed"] += 1
            return
        if flags & RST:
            self.stats["tcp_rst_no_socket"] += 1
            return
        lst: ListenerCore | None = None
        if dst not in self._local:  # (then _input found it forwarded): no listeners there
            if flags & (SYN | ACK) == SYN:
                self._forward_syn(v, key, seq, wnd, opts)
                return
        else:
            lst = self.listeners.get(dport)
        if lst is not None and not lst.closed and flags & (SYN | ACK) == SYN:
            self._tcp_syn(v, lst, key, seq, wnd, opts, now)
            return
        # no socket: answer with RST (RFC 9293 3.10.7.1)
        self.stats["tcp_no_socket"] += 1
        plen = n - hlen + (1 if flags & SYN else 0) + (flags & 1)
        if flags & ACK:
            self._tcp_raw(dst, dport, src, sport, RST, ack, 0, 0)
        else:
            self._tcp_raw(dst, dport, src, sport, RST | ACK, 0, seq + plen, 0)

    def _tcp_raw(self, src: bytes, sport: int, dst: bytes, dport: int, flags: int,
                 seq: int, ack: int, wnd: int) -> None:
        pb = self._pseudo_base(src, dst, 6)
        seg = wtcp.build(sport, dport, seq, ack, flags, wnd, b"", b"", pb)
        self._ip_out(src, dst, 6, seg)

    def _tcp_syn(self, v: int, lst: ListenerCore, key: tuple[bytes, int, bytes, int],
                 seq: int, wnd: int, opts: wtcp.TcpOptions, now: float) -> None:
        src, sport, dst, dport = key
        if self.accept_inbound is not None:
            info = PacketInfo(v, 6, ipaddress.ip_address(src), ipaddress.ip_address(dst),
                              sport, dport)
            if not self.accept_inbound(info):
                self._drop("filtered")
                return
        if len(lst.accept_queue) >= lst.backlog:
            self._drop("accept_backlog_full")
            return
        if self._peer_conns.get(src, 0) >= self.max_connections_per_peer:
            self._refuse_syn(key, seq, "tcp_conn_limit_peer", self.max_connections_per_peer)
            return
        if len(lst.half_open) >= lst.syn_backlog:
            # evict the oldest half-open connection: a flood cannot lock us out (a
            # connection that never ACKs its SYN-ACK holds a slot until evicted or its
            # syn_retries run out; either way the table stays at syn_backlog)
            self._evict(next(iter(lst.half_open.values())))
        if len(self.conns) >= self.max_connections:
            if not self._half_open:
                self._refuse_syn(key, seq, "tcp_conn_limit_total", self.max_connections)
                return
            self._evict(next(iter(self._half_open.values())))  # the oldest of every listener's
        conn = self._new_conn(key, now)
        conn.listener = lst
        lst.half_open[key] = conn
        self._half_open[key] = conn
        conn.open_passive(seq, wnd, opts, now)
        t = conn.rto_at  # not `touched` (a SYN flood would pile up there): a hint instead
        if t is not None and (self.timer_hint is None or t < self.timer_hint):
            self.timer_hint = t
        self.stats["tcp_passive_opens"] += 1

    def _forward_syn(self, v: int, key: ConnKey, seq: int, wnd: int, opts: wtcp.TcpOptions) -> None:
        """A SYN for a forwarded address: held (no SYN-ACK yet) while the forwarder
        dials the destination from the host. Over a limit it is dropped, as gVisor's
        forwarder leaves it unhandled: the client retries, by then perhaps in room."""
        src = key[0]
        if self.accept_inbound is not None:
            info = PacketInfo(v, 6, ipaddress.ip_address(src), ipaddress.ip_address(key[2]), key[1], key[3])
            if not self.accept_inbound(info):
                self._drop("filtered")
                return
        if len(self.pending) >= self.max_forward_pending:
            self._drop("forward_pending_limit")
            return
        if self._pending_per_peer.get(src, 0) >= self.max_forward_pending_per_peer:
            self._drop("forward_pending_limit_peer")
            return
        if (self._peer_conns.get(src, 0) >= self.max_connections_per_peer
                or len(self.conns) >= self.max_connections):
            self._drop("forward_conn_limit")
            return
        fwd = self.forwarder
        assert fwd is not None  # (_input let the packet in because of it)
        if not fwd.tcp_syn(key):
            self._drop("forward_refused")  # the forwarder's own limits (it counts why)
            return
        self.pending[key] = PendingSyn(seq, wnd, opts)
        self._pending_per_peer[src] = self._pending_per_peer.get(src, 0) + 1
        self.stats["tcp_forward_syns"] += 1

    def _forget_pending(self, key: ConnKey) -> PendingSyn | None:
        syn = self.pending.pop(key, None)
        if syn is not None:
            left = self._pending_per_peer[key[0]] - 1
            if left:
                self._pending_per_peer[key[0]] = left
            else:
                del self._pending_per_peer[key[0]]
        return syn

    def complete_pending(self, key: ConnKey, now: float) -> TcpConnection | None:
        """The host reached the destination of a held SYN: answer it with a SYN-ACK.
        The connection (SYN_RECEIVED) is the caller's, or None if the client reset
        meanwhile or the stack is full (then the client gets a RST)."""
        self._now = now
        syn = self._forget_pending(key)
        if syn is None:
            return None
        if self._peer_conns.get(key[0], 0) >= self.max_connections_per_peer:
            self._refuse_syn(key, syn.seq, "tcp_conn_limit_peer", self.max_connections_per_peer)
            return None
        if len(self.conns) >= self.max_connections:
            if not self._half_open:
                self._refuse_syn(key, syn.seq, "tcp_conn_limit_total", self.max_connections)
                return None
            self._evict(next(iter(self._half_open.values())))
        conn = self._new_conn(key, now)
        conn.open_passive(syn.seq, syn.wnd, syn.opts, now)
        self.touched.append(conn)  # so the driver brings its timer forward (SYN-ACK retransmission)
        self.stats["tcp_forward_completed"] += 1
        return conn

    def refuse_pending(self, key: ConnKey) -> None:
        """The host could not reach the destination of a held SYN: RST at once, as
        tailscaled does (no ICMP)."""
        syn = self._forget_pending(key)
        if syn is None:
            return
        src, sport, dst, dport = key
        self.stats["tcp_forward_refused"] += 1
        self._tcp_raw(dst, dport, src, sport, RST | ACK, 0, (syn.seq + 1) & MASK, 0)

    def _refuse_syn(self, key: tuple[bytes, int, bytes, int], seq: int, kind: str, limit: int) -> None:
        """A SYN past a connection limit: RST, so the client fails now instead of
        retrying its SYN for a minute or two."""
        src, sport, dst, dport = key
        detail = (f"SYN from {ipaddress.ip_address(src)}:{sport} refused with RST: {kind} ({limit}) reached"
                  if logger.isEnabledFor(logging.DEBUG) else "")
        self.rejects.reject(kind, detail)
        self._tcp_raw(dst, dport, src, sport, RST | ACK, 0, seq + 1, 0)

    def _evict(self, conn: TcpConnection) -> None:
        """Drop a half-open connection without a word (its peer may be spoofed)."""
        self._forget(conn)
        conn.state = State.CLOSED
        self.stats["tcp_syn_backlog_evicted"] += 1

    def _new_conn(self, key: tuple[bytes, int, bytes, int], now: float) -> TcpConnection:
        overhead = 40 if len(key[0]) == 4 else 60
        conn = TcpConnection(self, key, self.mtu - overhead, self._rng.randrange(1 << 32),
                             self.tcp_config, now)
        self.conns[key] = conn
        if len(key[0]) == 4:
            self._flows4[flow_key(*key)] = conn
        self._peer_conns[key[0]] = self._peer_conns.get(key[0], 0) + 1
        return conn

    def _forget(self, conn: TcpConnection) -> None:
        """Take ``conn`` out of every table that holds it (each entry only if it is this
        connection's: a new one may have its key by now)."""
        key = conn.key
        if self.conns.get(key) is conn:
            del self.conns[key]
            if len(key[0]) == 4:
                self._flows4.pop(flow_key(*key), None)
            left = self._peer_conns[key[0]] - 1
            if left:
                self._peer_conns[key[0]] = left
            else:
                del self._peer_conns[key[0]]
        if self._half_open.get(key) is conn:
            del self._half_open[key]
        lst = conn.listener
        if isinstance(lst, ListenerCore) and lst.half_open.get(key) is conn:
            del lst.half_open[key]

    # TcpHost
    def tcp_emit(self, conn: TcpConnection, flags: int, seq: int, ack: int, window: int,
                 options: bytes, payload: bytes | memoryview) -> None:
        self.tcp_emit_run(conn, flags, seq, ack, window, options, memoryview(payload), len(payload) or 1, False)

    def tcp_emit_run(self, conn: TcpConnection, flags: int, seq: int, ack: int, window: int,
                     options: bytes, data: memoryview, mss: int, push_last: bool) -> int:
        rip, rport, lip, lport = conn.key
        pb = self._pseudo_base(lip, rip, 6)
        stats = self.stats
        if len(lip) == 4:
            # both headers in one pack, both checksums summed from the field values
            output = self.divert.get(rip, self.output) if self.divert else self.output
            count, self._ident = emit_run(output, lip, rip, lport, rport, seq, ack, flags, window,
                                          options, data, mss, push_last, pb, self._ident)
            stats["tcp_out"] += count
            stats["ip_out"] += count
            return count
        size = len(data)
        count = 0
        for off in range(0, size or 1, mss):
            piece = data[off:off + mss]
            last = flags | PSH if push_last and off + mss >= size else flags
            hdr = wtcp.build(lport, rport, seq + off, ack, last, window, options, piece, pb)
            stats["tcp_out"] += 1
            self._ip_out(lip, rip, 6, hdr, piece)
            count += 1
        return count

    def tcp_established(self, conn: TcpConnection) -> None:
        lst = conn.listener
        if isinstance(lst, ListenerCore):
            if lst.half_open.get(conn.key) is conn:
                del lst.half_open[conn.key]
            if self._half_open.get(conn.key) is conn:
                del self._half_open[conn.key]
            if lst.closed or len(lst.accept_queue) >= lst.backlog:
                self._drop("accept_backlog_full")
                conn.abort(self._now, "listener backlog full")
                return
            lst.accept_queue.append(conn)
            self.touched.append(lst)
        self._batch.add(conn)

    def tcp_closed(self, conn: TcpConnection) -> None:
        if self.conns.get(conn.key) is conn:
            stats = self.stats
            for k, v in conn.stats.items():
                if v and k not in ("segments_in", "segments_out"):
                    stats["tcp_" + k] += v
        self._forget(conn)
        self.touched.append(conn)

    def tcp_connect(self, dst: IPAddress, port: int, now: float) -> TcpConnection:
        dstb = dst.packed
        src = self._src_for(dstb)
        # RFC 6056 algorithm 3: a secret per-destination offset plus one counter, so a
        # destination sees a local port again only after the whole range, long after
        # the peer's TIME_WAIT for it ended. Random ports collided with the peer's
        # TIME_WAIT within a few hundred connections (SYNs ignored, 60 s hangs).
        offset = zlib.crc32(self._port_secret + dstb + src + port.to_bytes(2, "big"))
        if self._peer_conns.get(dstb, 0) >= self.max_connections_per_peer:
            self.rejects.reject("tcp_conn_limit_peer", f"connect to {dst}:{port} refused")
            raise ConnectionLimitError(f"connect to {dst}:{port}: {self.max_connections_per_peer} "
                                       "connections to that address already (max_connections_per_peer)")
        if len(self.conns) >= self.max_connections:
            if not self._half_open:
                self.rejects.reject("tcp_conn_limit_total", f"connect to {dst}:{port} refused")
                raise ConnectionLimitError(f"connect to {dst}:{port}: {self.max_connections} "
                                           "connections already (max_connections)")
            self._evict(next(iter(self._half_open.values())))
        for i in range(EPHEMERAL_COUNT):
            lport = EPHEMERAL_LOW + (offset + self._next_ephemeral + i) % EPHEMERAL_COUNT
            key = (dstb, port, src, lport)
            if key not in self.conns and lport not in self.listeners:
                self._next_ephemeral += i + 1
                break
        else:
            raise LocalProtocolError("no free ephemeral port")
        conn = self._new_conn(key, now)
        conn.open_active(now)
        self.stats["tcp_active_opens"] += 1
        return conn

    def tcp_listen(self, port: int, backlog: int = 128, syn_backlog: int = 256) -> ListenerCore:
        if port in self.listeners:
            raise LocalProtocolError(f"port {port} is already listening")
        lst = ListenerCore(port, backlog, syn_backlog)
        self.listeners[port] = lst
        return lst

    def tcp_unlisten(self, lst: ListenerCore, now: float) -> None:
        lst.closed = True
        if self.listeners.get(lst.port) is lst:
            del self.listeners[lst.port]
        for c in list(lst.half_open.values()) + list(lst.accept_queue):
            c.abort(now, "listener closed")
        lst.half_open.clear()
        lst.accept_queue.clear()

    def tcp_output(self, conn: TcpConnection, now: float) -> None:
        """After an application call changed ``conn``."""
        self.touched.append(conn)

    # -------------------------------------------------------------------- UDP
    def _udp_in(self, v: int, src: bytes, dst: bytes, body: memoryview) -> None:
        pseudo = self._pseudo_base(src, dst, 17) + len(body)
        h = wudp.parse(body, pseudo, require_checksum=(v == 6))
        if dst not in self._local:  # (then _input found it forwarded)
            self._udp_forward(v, src, dst, h.src_port, h.dst_port, body[8:h.length])
            return
        sock = self.udp.get(h.dst_port)
        if sock is None or sock.closed:
            self._drop("udp_no_socket")
            return
        sip = ipaddress.ip_address(src)
        if self.accept_inbound is not None and not self.accept_inbound(
                PacketInfo(v, 17, sip, ipaddress.ip_address(dst), h.src_port, h.dst_port)):
            self._drop("filtered")
            return
        size = h.length - 8
        if len(sock.queue) >= sock.queue_limit or sock.queued_bytes + size > sock.queue_bytes_limit:
            sock.drops += 1
            self._drop("udp_queue_full")
            return
        sock.queue.append((bytes(body[8:h.length]), (sip, h.src_port)))
        sock.queued_bytes += size
        self.stats["udp_in"] += 1
        self.touched.append(sock)

    def _udp_forward(self, v: int, src: bytes, dst: bytes, sport: int, dport: int, payload: memoryview) -> None:
        if self.accept_inbound is not None and not self.accept_inbound(
                PacketInfo(v, 17, ipaddress.ip_address(src), ipaddress.ip_address(dst), sport, dport)):
            self._drop("filtered")
            return
        fwd = self.forwarder
        assert fwd is not None
        self.stats["udp_forward_in"] += 1
        fwd.udp_datagram(src, sport, dst, dport, bytes(payload))

    def udp_send_from(self, src: bytes, sport: int, dst: bytes, dport: int, data: bytes) -> bool:
        """A datagram from any address (a forwarded flow's reply comes from the address
        the client sent to); False if it does not fit the MTU (dropped, counted)."""
        overhead = (20 if len(src) == 4 else 40) + 8
        if len(data) + overhead > self.mtu or len(src) != len(dst):
            self._drop("udp_forward_too_big")
            return False
        dg = wudp.build(sport, dport, data, self._pseudo_base(src, dst, 17))
        self.stats["udp_forward_out"] += 1
        self._ip_out(src, dst, 17, dg)
        return True

    def udp_bind(self, port: int = 0, queue_limit: int = 256,
                 queue_bytes_limit: int = UDP_QUEUE_BYTES) -> UdpSocketCore:
        if port == 0:
            for _ in range(1000):
                port = self._rng.randrange(49152, 65536)
                if port not in self.udp:
                    break
        if port in self.udp:
            raise LocalProtocolError(f"UDP port {port} is in use")
        sock = UdpSocketCore(port, queue_limit, queue_bytes_limit)
        self.udp[port] = sock
        return sock

    def udp_close(self, sock: UdpSocketCore) -> None:
        sock.closed = True
        sock.queue.clear()
        sock.queued_bytes = 0
        if self.udp.get(sock.port) is sock:
            del self.udp[sock.port]

    def udp_send(self, sock: UdpSocketCore, data: bytes, dst: IPAddress, port: int) -> None:
        dstb = dst.packed
        src = self._src_for(dstb)
        overhead = (20 if len(src) == 4 else 40) + 8
        if len(data) + overhead > self.mtu:
            raise LocalProtocolError(f"UDP datagram larger than the MTU ({self.mtu})")
        dg = wudp.build(sock.port, port, bytes(data), self._pseudo_base(src, dstb, 17))
        self.stats["udp_out"] += 1
        self._ip_out(src, dstb, 17, dg)

    # ------------------------------------------------------------------- ICMP
    def _icmp_in(self, v: int, src: bytes, dst: bytes, body: memoryview) -> None:
        proto = 1 if v == 4 else 58
        pseudo = 0 if v == 4 else self._pseudo_base(src, dst, 58) + len(body)
        m = wicmp.parse(body, pseudo)
        req, rep = ((wicmp.V4_ECHO_REQUEST, wicmp.V4_ECHO_REPLY) if v == 4
                    else (wicmp.V6_ECHO_REQUEST, wicmp.V6_ECHO_REPLY))
        if m.type == req and dst not in self._local:  # (then _input found it forwarded)
            if self.accept_inbound is not None and not self.accept_inbound(
                    PacketInfo(v, proto, ipaddress.ip_address(src), ipaddress.ip_address(dst), 0, 0)):
                self._drop("filtered")
                return
            fwd = self.forwarder
            assert fwd is not None
            self.stats["icmp_forward_echo"] += 1
            fwd.icmp_echo(src, dst, m.ident, m.seq, bytes(m.payload))
        elif m.type == req:
            if self.accept_inbound is not None and not self.accept_inbound(
                    PacketInfo(v, proto, ipaddress.ip_address(src), ipaddress.ip_address(dst),
                               0, 0)):
                self._drop("filtered")
                return
            p = 0 if v == 4 else self._pseudo_base(dst, src, 58) + len(body)
            self.stats["icmp_echo_replied"] += 1
            self._ip_out(dst, src, proto, wicmp.build(rep, 0, m.ident, m.seq, m.payload, p))
        elif m.type == rep:
            w = self.echo.get((src, m.ident, m.seq))
            if w is not None:
                w.reply = bytes(m.payload)
                self.stats["icmp_echo_reply_matched"] += 1
                self.touched.append(w)
            else:
                self.stats["icmp_unmatched_reply"] += 1
        else:
            self.stats["icmp_ignored"] += 1

    def echo_reply_from(self, src: bytes, dst: bytes, ident: int, seq: int, payload: bytes) -> None:
        """An echo reply from ``src`` (a forwarded address the host could ping) to ``dst``."""
        if len(src) == 4:
            self._ip_out(src, dst, 1, wicmp.build(wicmp.V4_ECHO_REPLY, 0, ident, seq, payload))
        else:
            p = self._pseudo_base(src, dst, 58) + 8 + len(payload)
            self._ip_out(src, dst, 58, wicmp.build(wicmp.V6_ECHO_REPLY, 0, ident, seq, payload, p))
        self.stats["icmp_forward_echo_replied"] += 1

    def ping_start(self, dst: IPAddress, payload: bytes = b"") -> tuple[
            tuple[bytes, int, int], EchoWaiter]:
        dstb = dst.packed
        src = self._src_for(dstb)
        self._echo_seq = (self._echo_seq + 1) & 0xFFFF
        key = (dstb, self._echo_ident, self._echo_seq)
        w = EchoWaiter()
        self.echo[key] = w
        if len(src) == 4:
            msg = wicmp.build(wicmp.V4_ECHO_REQUEST, 0, key[1], key[2], payload)
            self._ip_out(src, dstb, 1, msg)
        else:
            p = self._pseudo_base(src, dstb, 58) + 8 + len(payload)
            msg = wicmp.build(wicmp.V6_ECHO_REQUEST, 0, key[1], key[2], payload, p)
            self._ip_out(src, dstb, 58, msg)
        return key, w

    # ----------------------------------------------------------------- timers
    def next_deadline(self) -> float | None:
        best: float | None = None
        for c in self.conns.values():
            t = c.next_deadline()
            if t is not None and (best is None or t < best):
                best = t
        return best

    def on_timer(self, now: float) -> None:
        """Run the timers that are due. Never raises: a connection whose timer trips
        a bug of ours is counted (``internal_error.tcp_timer``) and aborted."""
        self._now = now
        for c in list(self.conns.values()):
            t = c.next_deadline()
            if t is not None and t <= now:
                try:
                    c.on_timer(now)
                except Exception as exc:  # the timer task must outlive our bugs
                    self._conn_failed(c, "tcp_timer", exc)
                    continue
                self._batch.add(c)
        try:
            self._flush(now)
        except Exception as exc:  # ditto
            self.rejects.internal_error("flush", exc)


__all__ = ["ConnKey", "EchoWaiter", "ForwardHooks", "ListenerCore", "PacketInfo", "PendingSyn", "StackCore",
           "UdpSocketCore"]
