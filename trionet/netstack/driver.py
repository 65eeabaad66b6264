"""The trio driver: socket-like streams, listeners, UDP endpoints and ping.

The hot path runs in the caller's task: ``NetStack.deliver(packet)`` (no
await) processes a packet, emits the resulting packets through ``output`` and
wakes the tasks waiting on the connections it touched. ``run()`` is the one
timer task: it sleeps until the core's next deadline.
"""

from __future__ import annotations

import ipaddress
import math
import operator
from collections.abc import Callable, Iterable

import trio

from ..errors import TransportError
from .stack import (
    MAX_CONNECTIONS,
    UDP_QUEUE_BYTES,
    ConnKey,
    EchoWaiter,
    ForwardHooks,
    IPAddress,
    ListenerCore,
    PacketInfo,
    StackCore,
    UdpSocketCore,
)
from .tcp import State, TcpConfig, TcpConnection


class NetStack:
    """A userspace TCP/IP stack for some local addresses.

    ``output`` gets every outbound IP packet (called synchronously, from
    whichever task caused it). ``accept_inbound`` vetoes new inbound TCP
    connections, UDP datagrams and echo requests. ``verify_checksums=False`` suits
    packets that arrive through WireGuard (already authenticated); a TUN device
    wants the default. ``output_done`` is called after every step that may have
    called ``output`` (a batch delivered, a send, a read, a timer), so the owner can
    hold a step's packets and write them together.

    ``max_connections`` and ``max_connections_per_peer`` (per remote address; default
    2/3 of the total) bound the TCP connections: a SYN past them gets a RST and is
    counted as ``tcp_conn_limit_total`` / ``tcp_conn_limit_peer``; ``open_tcp_stream``
    raises ``ConnectionLimitError`` (a ``TransportError``).
    """

    def __init__(self, addresses: Iterable[IPAddress | str], output: Callable[[bytes], None],
                 mtu: int = 1280, accept_inbound: Callable[[PacketInfo], bool] | None = None,
                 tcp_config: TcpConfig | None = None, seed: int | None = None,
                 verify_checksums: bool = True, output_done: Callable[[], None] | None = None,
                 max_connections: int = MAX_CONNECTIONS, max_connections_per_peer: int | None = None) -> None:
        addrs = [ipaddress.ip_address(a) for a in addresses]
        self.core = StackCore(addrs, output, mtu=mtu, accept_inbound=accept_inbound,
                              tcp_config=tcp_config, seed=seed,
                              verify_checksums=verify_checksums, max_connections=max_connections,
                              max_connections_per_peer=max_connections_per_peer)
        self._timer_scope: trio.CancelScope | None = None
        self._output_done = output_done

    # ------------------------------------------------------------ packet path
    def deliver(self, packet: bytes | bytearray | memoryview) -> None:
        """Process one inbound IP packet now (no await)."""
        self.core.deliver(packet, trio.current_time())
        self.after_core_call()

    def deliver_many(self, packets: Iterable[bytes | bytearray | memoryview],
                     admit: Callable[[bytes | bytearray | memoryview], bool] | None = None) -> None:
        """Process a batch; ACKs go out once at the end of it. ``admit``: see
        ``StackCore.deliver_many``."""
        self.core.deliver_many(packets, trio.current_time(), admit)
        self.after_core_call()

    def after_core_call(self, conn: TcpConnection | None = None) -> None:
        """Call after calling into ``core`` directly (every method here does): wake the
        tasks of what the core touched; bring the timer task forward if a touched
        connection (or ``conn``, which the caller just used) now needs it sooner; then
        ``output_done``.

        Only connections the core touched or the caller names can have moved a deadline
        earlier, so this looks at those, not at every connection: with hundreds of
        connections a full scan per packet batch and per read was most of the cost."""
        core = self.core
        touched = core.touched
        d = math.inf
        if touched:
            core.touched = []
            for obj in touched:
                w = obj.waker
                if w is not None:
                    w()
                if type(obj) is TcpConnection:
                    t = obj.next_deadline()
                    if t is not None and t < d:
                        d = t
        if conn is not None:
            t = conn.next_deadline()
            if t is not None and t < d:
                d = t
        if core.timer_hint is not None:
            d = min(d, core.timer_hint)
            core.timer_hint = None
        cs = self._timer_scope
        if cs is not None and d < cs.deadline:
            cs.deadline = d
        if self._output_done is not None:
            self._output_done()


    async def run(self) -> None:
        """The timer task: run it in a nursery for the stack's lifetime."""
        while True:
            d = self.core.next_deadline()
            with trio.CancelScope(deadline=math.inf if d is None else d) as cs:
                self._timer_scope = cs
                await trio.sleep_forever()
            self._timer_scope = None
            self.core.on_timer(trio.current_time())
            self.after_core_call()

    def statistics(self) -> dict[str, int]:
        return self.core.statistics()

    def divert(self, address: IPAddress | str, to: Callable[[bytes], None] | None) -> None:
        """Packets this stack sends to ``address`` go to ``to`` instead of ``output``
        (None: to ``output`` again). For addresses served in this process, such as
        MagicDNS's 100.100.100.100: ``to`` must not call back into this stack (queue
        the packet and deliver it from another task)."""
        key = ipaddress.ip_address(address).packed
        if to is None:
            self.core.divert.pop(key, None)
        else:
            self.core.divert[key] = to

    # ------------------------------------------------------------- forwarding
    def set_forwarder(self, hooks: ForwardHooks | None) -> None:
        """Packets for addresses not ours that ``hooks.wants`` go to ``hooks`` (a
        ``trionet.router.Router``); None: they are dropped again."""
        self.core.forwarder = hooks

    def complete_pending(self, key: ConnKey) -> TcpStream | None:
        """Answer a held forwarded SYN (see ``StackCore.complete_pending``): its stream,
        still in SYN_RECEIVED, or None if the client went away or the stack is full."""
        conn = self.core.complete_pending(key, trio.current_time())
        stream = None if conn is None else TcpStream(self, conn)
        self.after_core_call(conn)
        return stream

    def refuse_pending(self, key: ConnKey) -> None:
        """RST a held forwarded SYN: its destination could not be reached."""
        self.core.refuse_pending(key)
        self.after_core_call()

    def send_udp_from(self, src: bytes, sport: int, dst: bytes, dport: int, data: bytes) -> bool:
        """A datagram from any address (a forwarded flow's reply); False if too big."""
        sent = self.core.udp_send_from(src, sport, dst, dport, data)
        self.after_core_call()
        return sent

    def echo_reply_from(self, src: bytes, dst: bytes, ident: int, seq: int, payload: bytes) -> None:
        self.core.echo_reply_from(src, dst, ident, seq, payload)
        self.after_core_call()

    # -------------------------------------------------------------------- TCP
    async def open_tcp_stream(self, ip: IPAddress | str, port: int) -> TcpStream:
        conn = self.core.tcp_connect(ipaddress.ip_address(ip), port, trio.current_time())
        stream = TcpStream(self, conn)
        self.after_core_call(conn)
        try:
            while conn.state in (State.SYN_SENT, State.SYN_RECEIVED):
                await stream._wait()
        except BaseException:
            conn.abort(trio.current_time(), "cancelled")
            self.after_core_call()
            raise
        if conn.state is State.CLOSED or conn.error is not None:
            raise TransportError(f"connect to {ip}:{port} failed: {conn.error or 'closed'}")
        return stream

    def listen_tcp(self, port: int, backlog: int = 128, syn_backlog: int = 256) -> TcpListener:
        return TcpListener(self, self.core.tcp_listen(port, backlog, syn_backlog))

    # -------------------------------------------------------------------- UDP
    def udp_bind(self, port: int = 0, queue_limit: int = 256,
                 queue_bytes_limit: int = UDP_QUEUE_BYTES) -> UdpEndpoint:
        """``queue_limit`` datagrams, ``queue_bytes_limit`` bytes wait for ``receive``;
        more are dropped (``drop_udp_queue_full``)."""
        return UdpEndpoint(self, self.core.udp_bind(port, queue_limit, queue_bytes_limit))

    udp_endpoint = udp_bind

    # ------------------------------------------------------------------- ICMP
    async def ping(self, ip: IPAddress | str, payload: bytes = b"trionet",
                   timeout: float = 5.0) -> float:
        """Send one echo request; return the round-trip time in seconds."""
        start = trio.current_time()
        key, w = self.core.ping_start(ipaddress.ip_address(ip), payload)
        ev = trio.Event()
        w.waker = ev.set
        self.after_core_call()
        try:
            with trio.move_on_after(timeout):
                await ev.wait()
        finally:
            self.core.echo.pop(key, None)
        if w.reply is None:
            raise TransportError(f"ping {ip}: no reply within {timeout} s")
        return trio.current_time() - start


_ = EchoWaiter


class TcpStream(trio.abc.HalfCloseableStream):
    """A TCP connection as a trio stream."""

    def __init__(self, stack: NetStack, conn: TcpConnection) -> None:
        self._stack = stack
        self._conn = conn
        self._lot = trio.lowlevel.ParkingLot()
        conn.waker = self._lot.unpark_all
        conn.user = self
        self._send_busy = False
        self._recv_busy = False
        self._closed = False
        self._eof_sent = False

    @property
    def connection(self) -> TcpConnection:
        return self._conn

    def set_keepalive(self, idle: float | None = 60.0, interval: float = 15.0, count: int = 4) -> None:
        """Probe the peer after ``idle`` seconds in which it sent nothing, then every
        ``interval``; after ``count`` unanswered probes the connection is aborted (and
        reads and writes raise). ``idle=None`` turns keepalive off. For proxied
        connections whose peer may vanish without a FIN or RST."""
        self._conn.set_keepalive(idle, interval, count, trio.current_time())
        self._stack.after_core_call(self._conn)

    @property
    def local_address(self) -> tuple[IPAddress, int]:
        k = self._conn.key
        return ipaddress.ip_address(k[2]), k[3]

    @property
    def remote_address(self) -> tuple[IPAddress, int]:
        k = self._conn.key
        return ipaddress.ip_address(k[0]), k[1]

    async def _wait(self) -> None:
        await self._lot.park()

    def _broken(self) -> trio.BrokenResourceError:
        return trio.BrokenResourceError(self._conn.error or "connection closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending")
        self._send_busy = True
        try:
            if self._closed or self._eof_sent:
                raise trio.ClosedResourceError("stream closed for sending")
            conn = self._conn
            mv = memoryview(data)
            if mv.itemsize != 1:
                mv = mv.cast("B")
            off = 0
            total = len(mv)
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                if conn.error is not None or conn.state not in (
                        State.ESTABLISHED, State.CLOSE_WAIT, State.SYN_RECEIVED):
                    raise self._broken()
                if off < total:
                    off += conn.send(mv[off:], trio.current_time())
                    self._stack.after_core_call(conn)
                if off >= total:
                    break
                await self._wait()
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending")
        self._send_busy = True
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                c = self._conn
                if c.send_space > 0 or c.error is not None or c.state is State.CLOSED:
                    break
                await self._wait()
            await trio.lowlevel.checkpoint()
        finally:
            self._send_busy = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._recv_busy:
            raise trio.BusyResourceError("another task is receiving")
        self._recv_busy = True
        try:
            conn = self._conn
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                if conn.rbuf:
                    data = conn.read(max_bytes or 65536, trio.current_time())
                    self._stack.after_core_call(conn)
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                if conn.error is not None:
                    raise self._broken()
                if conn.fin_received or conn.state is State.CLOSED:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                await self._wait()
        finally:
            self._recv_busy = False

    async def send_eof(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending")
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        await trio.lowlevel.checkpoint()
        if not self._eof_sent:
            self._eof_sent = True
            self._conn.close(trio.current_time())
            self._stack.after_core_call(self._conn)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            conn = self._conn
            conn.release(trio.current_time())
            self._lot.unpark_all()
            self._stack.after_core_call(conn)
        await trio.lowlevel.checkpoint()

    async def abort(self, reason: str = "aborted") -> None:
        """Close with RST, not FIN: the peer learns at once that the connection is gone,
        and nothing lingers in TIME_WAIT here."""
        if not self._closed:
            self._conn.abort(trio.current_time(), reason)
        await self.aclose()


class TcpListener(trio.abc.Listener[TcpStream]):
    def __init__(self, stack: NetStack, core: ListenerCore) -> None:
        self._stack = stack
        self._core = core
        self._lot = trio.lowlevel.ParkingLot()
        core.waker = self._lot.unpark_all

    @property
    def port(self) -> int:
        return self._core.port

    async def accept(self) -> TcpStream:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._core.closed:
                raise trio.ClosedResourceError("listener closed")
            q = self._core.accept_queue
            while q:
                conn = q.popleft()
                if conn.state is not State.CLOSED:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return TcpStream(self._stack, conn)
            await self._lot.park()

    def accept_nowait(self) -> TcpStream | None:
        """An established connection already queued, or None; never waits. After
        ``accept`` returns, a server takes the rest of a burst this way, in the same
        scheduling round."""
        q = self._core.accept_queue
        while q and not self._core.closed:
            conn = q.popleft()
            if conn.state is not State.CLOSED:
                return TcpStream(self._stack, conn)
        return None

    async def aclose(self) -> None:
        if not self._core.closed:
            self._stack.core.tcp_unlisten(self._core, trio.current_time())
            self._lot.unpark_all()
            self._stack.after_core_call()
        await trio.lowlevel.checkpoint()


class UdpEndpoint:
    """A bound UDP port: ``send(data, (ip, port))`` and ``receive()``."""

    def __init__(self, stack: NetStack, core: UdpSocketCore) -> None:
        self._stack = stack
        self._core = core
        self._lot = trio.lowlevel.ParkingLot()
        core.waker = self._lot.unpark_all

    @property
    def port(self) -> int:
        return self._core.port

    async def send(self, data: bytes, address: tuple[IPAddress | str, int]) -> None:
        if self._core.closed:
            raise trio.ClosedResourceError("UDP endpoint closed")
        await trio.lowlevel.checkpoint()
        self._stack.core.udp_send(self._core, data, ipaddress.ip_address(address[0]),
                                  address[1])
        self._stack.after_core_call()

    async def receive(self) -> tuple[bytes, tuple[IPAddress, int]]:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._core.closed:
                raise trio.ClosedResourceError("UDP endpoint closed")
            if self._core.queue:
                item = self._core.pop()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return item
            await self._lot.park()

    async def aclose(self) -> None:
        self._stack.core.udp_close(self._core)
        self._lot.unpark_all()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> UdpEndpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
