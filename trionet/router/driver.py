"""The Trio side of forwarding: host sockets for tailnet peers' flows.

``Router`` is the netstack's ``ForwardHooks``. A peer's SYN to a forwarded address
is held by the stack while a task dials the destination from the host; success
completes the peer's handshake and the two are relayed (``proxy.server.relay``,
half-closes included), failure answers the SYN with a RST at once (tailscaled's
forwardTCP). A UDP flow gets an unconnected host socket (bound to the client's
source port if free) and a reader task that sends whatever arrives back to the
client from the address it wrote to, until the flow is idle (2 min, 30 s for DNS).
An echo request is answered if the host's ``ping -c 1 -W 3`` reaches the address.

Datagrams from peers go to the host socket in the task that delivered them (a
non-blocking ``sendto``; a full buffer drops the datagram): no task hop per packet.
Host-side errors are counted and logged at debug level, never raised.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..netstack.driver import NetStack
from ..proxy.server import RelayFailed, relay
from ..rejects import RejectLog, should_log
from .core import ConnKey, Flow, ForwardTable, RoutePolicy

log = logging.getLogger(__name__)

#: The host-side dial. tailscaled sets none beyond the OS's (about 2 min on Linux);
#: by 60 s a client has sent its SYN five times and most have given up.
DIAL_TIMEOUT = 60.0
PING_TIMEOUT = 5.0  # `ping -W 3` itself, plus the process's start and end
UDP_RECV = 65535
#: Keepalive on both sides of a forwarded connection, as the proxies' (tailscaled turns it
#: on too): a peer or a destination that vanished without a FIN or RST frees the other
#: side within minutes, not hours. (idle s, interval s, probes)
TAILNET_KEEPALIVE = (60.0, 15.0, 4)
HOST_KEEPALIVE = (60, 15, 4)

HostPing = Callable[[str], Awaitable[bool]]


async def system_ping(address: str) -> bool:
    """The host's ``ping -c 1 -W 3 ADDRESS`` (what tailscaled runs on Linux)."""
    try:
        with trio.fail_after(PING_TIMEOUT):
            done = await trio.run_process(["ping", "-c", "1", "-W", "3", address], check=False,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, trio.TooSlowError):
        return False
    return done.returncode == 0


def _dial_outcome(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ETIMEDOUT):
        return "unreachable"
    return "host_error"  # EMFILE and the like


class Router:
    """Forwards peers' TCP, UDP and echo requests for ``policy``'s prefixes from the host.

    Run ``run()`` in a nursery; until then (and after) nothing is forwarded."""

    def __init__(self, stack: NetStack, policy: RoutePolicy | None = None, table: ForwardTable | None = None,
                 *, host_ping: HostPing = system_ping, dial_timeout: float = DIAL_TIMEOUT) -> None:
        self.stack = stack
        self.policy = policy or RoutePolicy()
        self.table = table or ForwardTable()
        self.host_ping = host_ping
        self.dial_timeout = dial_timeout
        self.errors = RejectLog(log, "forwarding", self.table.stats)
        self._nursery: trio.Nursery | None = None
        #: each UDP flow's host socket and the address its datagrams go to
        self._udp_socks: dict[ConnKey, tuple[socket.socket, tuple[str, int]]] = {}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.stack.set_forwarder(self)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.stack.set_forwarder(None)

    def set_prefixes(self, prefixes: Any) -> None:
        """The prefixes forwarded from now on (flows already open carry on)."""
        self.policy.set_prefixes(prefixes)

    def statistics(self) -> dict[str, int]:
        return self.table.statistics()

    def status(self) -> dict[str, Any]:
        """Live flow counts and the oldest flows (``ForwardTable.status``); {} while the
        router forwards nothing and holds no flow (so `status` says nothing of it)."""
        table = self.table
        if not (self.policy.prefixes or table.tcp or table.udp or table.pings):
            return {}
        try:
            now = trio.current_time()
        except RuntimeError:  # asked from outside the node's Trio run (a ThreadedNode's caller)
            return self.table.status(0.0, limit=0)
        return self.table.status(now)

    # --------------------------------------------------------- ForwardHooks
    def wants(self, dst: bytes) -> bool:
        return self._nursery is not None and self.policy.wants(dst)

    def tcp_syn(self, key: ConnKey) -> bool:
        assert self._nursery is not None  # (wants said no while not running)
        flow = self.table.open_tcp(key, trio.current_time())
        if flow is None:
            return False
        self._nursery.start_soon(self._guarded, "tcp_flow", self._forward_tcp, flow)
        return True

    def udp_datagram(self, src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> None:
        key = (src, sport, dst, dport)
        table = self.table
        now = trio.current_time()
        flow = table.udp.get(key)
        if flow is not None:
            sock, to = self._udp_socks[key]
        else:
            flow = table.open_udp(key, now)
            if flow is None:
                return
            try:
                sock = self._udp_socket(len(dst), sport)
            except OSError as exc:  # EMFILE and the like: this datagram, and the flow, are lost
                table.close_udp(flow, "host_error")
                self.errors.reject("udp_socket_error", f"UDP socket for {_addr(dst, dport)}: {exc}")
                return
            to = (str(ipaddress.ip_address(dst)), dport)
            self._udp_socks[key] = (sock, to)
            assert self._nursery is not None
            self._nursery.start_soon(self._guarded, "udp_flow", self._udp_replies, flow, sock)
        table.udp_from_peer(flow, len(payload), now)
        try:
            sock.sendto(payload, to)
        except BlockingIOError:
            self.errors.reject("udp_send_full")
        except OSError as exc:  # unreachable, too big, ...: the datagram is lost, the flow stays
            self.errors.reject("udp_send_error", f"UDP to {_addr(dst, dport)}: {exc}")

    def icmp_echo(self, src: bytes, dst: bytes, ident: int, seq: int, payload: bytes) -> None:
        if not self.table.start_ping():
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._guarded, "icmp_echo", self._answer_echo, src, dst, ident, seq, payload)

    # ---------------------------------------------------------------- tasks
    async def _guarded(self, kind: str, task: Callable[..., Awaitable[None]], *args: Any) -> None:
        """One flow's task: a bug of ours in it is counted and ends that flow only (each
        task releases its flow in its own `finally`), never the router or the node."""
        try:
            await task(*args)
        except Exception as exc:
            self.errors.internal_error(kind, exc)

    async def _forward_tcp(self, flow: Flow) -> None:
        key = flow.key
        src, sport, dst, dport = key
        outcome = "cancelled"  # (the router stopping while this dials)
        answered = False
        try:
            try:
                with trio.fail_after(self.dial_timeout):
                    host = await _dial(dst, dport)
            except (OSError, trio.TooSlowError) as exc:
                outcome = _dial_outcome(exc)
                count = self.table.stats["tcp_" + outcome] + 1  # (close_tcp counts it below)
                if log.isEnabledFor(logging.DEBUG) and should_log(count):  # a flood costs a few lines
                    log.debug("forwarding: %s -> %s: %s (%d so far): %s", _addr(src, sport), _addr(dst, dport),
                              outcome, count, exc)
                return
            outcome = "completed"
            answered = True
            peer = self.stack.complete_pending(key)
            if peer is None:  # the client reset while we dialed, or the stack is full
                outcome = "client_gone"
                await trio.aclose_forcefully(host)
                return
            self.table.tcp_established(flow)
            peer.set_keepalive(*TAILNET_KEEPALIVE)
            try:
                await relay(peer, host, counts=flow.counts)
            except RelayFailed as exc:  # one side reset: the other was reset too
                outcome = "peer_reset" if exc.reason == "client_reset" else "host_reset"
        finally:
            if not answered:  # a RST for the held SYN, whatever ended the dial
                self.stack.refuse_pending(key)
            self.table.close_tcp(flow, outcome)

    def _udp_socket(self, size: int, sport: int) -> socket.socket:
        family = socket.AF_INET if size == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            try:  # the client's own source port, as tailscaled does, if the host has it free
                sock.bind(("", sport))
            except OSError:
                sock.bind(("", 0))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _udp_replies(self, flow: Flow, sock: socket.socket) -> None:
        """Everything arriving on the flow's socket, from any source, goes back to the
        client from the address it wrote to; the flow ends when idle either way."""
        src, sport, dst, dport = flow.key
        table = self.table
        outcome = "idle"
        tsock = trio.socket.from_stdlib_socket(sock)
        try:
            while True:
                with trio.move_on_at(table.idle_deadline(flow)):
                    data, _ = await tsock.recvfrom(UDP_RECV)
                    table.udp_to_peer(flow, len(data), trio.current_time())
                    self.stack.send_udp_from(dst, dport, src, sport, data)
                    continue
                if trio.current_time() >= table.idle_deadline(flow):  # (else a datagram from the peer moved it)
                    break
        except OSError as exc:  # ICMP errors surface here as ECONNREFUSED and such: the flow ends
            outcome = "host_error"
            self.errors.reject("udp_recv_error", f"UDP from {_addr(dst, dport)}: {exc}")
        finally:
            if self._udp_socks.get(flow.key, (None,))[0] is sock:
                del self._udp_socks[flow.key]
            tsock.close()
            table.close_udp(flow, outcome)

    async def _answer_echo(self, src: bytes, dst: bytes, ident: int, seq: int, payload: bytes) -> None:
        answered = False
        try:
            answered = await self.host_ping(str(ipaddress.ip_address(dst)))
            if answered:
                self.stack.echo_reply_from(dst, src, ident, seq, payload)
        finally:
            self.table.end_ping(answered)


async def _dial(dst: bytes, port: int) -> trio.SocketStream:
    """One connect to an address (no name, no happy eyeballs): its error as it is."""
    sock = trio.socket.socket(socket.AF_INET if len(dst) == 4 else socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):  # (Linux; elsewhere the system's timings)
            idle, interval, count = HOST_KEEPALIVE
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        await sock.connect((str(ipaddress.ip_address(dst)), port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _addr(packed: bytes, port: int) -> str:
    a = ipaddress.ip_address(packed)
    return f"[{a}]:{port}" if a.version == 6 else f"{a}:{port}"


__all__ = ["DIAL_TIMEOUT", "HostPing", "Router", "system_ping"]
