"""MagicDNS on Trio: the quad-100 servers, the `--dns` host port, forwarding, lookups.

`MagicDns` holds the view of the current netmap (rebuilt on the next query
after a change) and answers every query through `resolver.answer`: locally,
or by forwarding it. It serves

* inside the netstack at 100.100.100.100 and fd7a:115c:a1e0::53, UDP and TCP
  port 53 (`serve_netstack`): a second small `NetStack` owns those two
  addresses; the node's stack diverts what it sends there to it (never to
  WireGuard) and a pump task carries packets both ways. Peers cannot reach it:
  the node's stack does not own those addresses, and no peer routes them to us.
* on a host port (`serve_host`, `up --dns [BIND:]PORT`), UDP and TCP.
* `resolve(host)`, behind `Node.resolve`: the same answers for dialing.

Forwarding (tailscale net/dns/resolver/forwarder.go): every upstream of the
chosen route is asked at once; the first answer that is not SERVFAIL or
REFUSED wins. Each is asked over UDP first, and over TCP as well after 2 s
without an answer, or at once when UDP fails or brings a truncated answer to a
client that asked over TCP; TCP gets 5 s, the whole query 10 s, then SERVFAIL.
At most `MAX_IN_FLIGHT` forwarded queries run at once (tailscale's
maxActiveQueries); more are dropped and counted. Upstream addresses in the
tailnet go through the netstack, others through the host's sockets. The
default upstream can be replaced by a callable (`set_exit_node_upstream`):
the exit node's DNS-over-HTTPS, as tailscaled uses it.

Hostile input: a query that does not parse is answered FORMERR or dropped,
and counted; TCP queries are at most 4096 bytes, a connection idle for 45 s is
closed, at most `MAX_TCP_CONNECTIONS` are served at once and
`MAX_TCP_PENDING` queries per connection; no exception leaves a serving task
(`RejectLog.internal_error`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import socket
import struct
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import dns.message
import dns.rcode
import dns.rdatatype
import trio

from trionet.clock import wall
from trionet.dns import resolver
from trionet.dns.resolver import Answer, Drop, Forward, Query
from trionet.dns.view import (
    EXIT_NODE_DOH,
    QUAD100_V4,
    QUAD100_V6,
    DnsView,
    IPAddress,
    build_view,
    has_suffix,
    to_fqdn,
)
from trionet.errors import ConfigError, TransportError, TrionetError
from trionet.netaddr import split_host_port
from trionet.netstack import NetStack
from trionet.proto import Node
from trionet.rejects import RejectLog

log = logging.getLogger(__name__)

#: Forwarded queries at once (tailscale net/dns/manager.go maxActiveQueries).
MAX_IN_FLIGHT = 256
#: A whole forwarded query; TCP to one upstream; UDP alone before TCP joins (forwarder.go).
QUERY_TIMEOUT = 10.0
TCP_TIMEOUT = 5.0
UDP_HEAD_START = 2.0
#: TCP from clients (manager.go): largest query, idle time; and our own bounds.
MAX_TCP_QUERY = 4096
TCP_IDLE = 45.0
MAX_TCP_CONNECTIONS = 64
MAX_TCP_PENDING = 16
#: A UDP reply in the netstack must fit its MTU (1280 - IPv6 40 - UDP 8).
NETSTACK_UDP_MAX = 1232
HOST_UDP_MAX = 65507
#: Packets waiting in either direction between the node's stack and quad-100's.
LOOPBACK_QUEUE = 1024
#: Names `resolve` looked up upstream, kept for their TTL (at most RESOLVE_TTL_MAX).
RESOLVE_CACHE = 512
RESOLVE_TTL_MAX = 300.0

_TAILNET_V4 = ipaddress.IPv4Network("100.64.0.0/10")
_TAILNET_V6 = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")

#: An upstream that takes a DNS query's bytes and returns the answer's (raises on failure).
WireUpstream = Callable[[bytes], Awaitable[bytes]]


class _UpstreamError(Exception):
    """An upstream did not give an answer we relay as is; `reply`: what it said, if anything."""

    def __init__(self, kind: str, reply: bytes | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.reply = reply


class _Datagrams(Protocol):
    """A UDP socket as the serving loop sees it (host socket or netstack endpoint)."""

    async def receive(self) -> tuple[bytes, Any]: ...
    async def send(self, data: bytes, address: Any) -> None: ...


class _HostUdp:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def receive(self) -> tuple[bytes, Any]:
        return await self.sock.recvfrom(65535)

    async def send(self, data: bytes, address: Any) -> None:
        await self.sock.sendto(data, address)


def default_via_tailnet(ip: IPAddress) -> bool:
    """Resolvers at Tailscale addresses are asked through the tailnet, others through the host."""
    return ip in _TAILNET_V4 or ip in _TAILNET_V6


def parse_upstream(addr: str) -> tuple[IPAddress, int] | None:
    """A resolver `Addr` ("1.2.3.4", "1.2.3.4:53", "[v6]:53", "v6"), or None when it is
    not a plain DNS server (DoH URLs and the like)."""
    try:
        return ipaddress.ip_address(addr), 53
    except ValueError:
        pass
    try:
        host, port = split_host_port(addr)
        return ipaddress.ip_address(host), port
    except ValueError:
        return None


class _Loopback:
    """Packets between the node's stack and quad-100's, each way queued and delivered by
    one pump task: a stack's output never calls back into a stack in its own step."""

    def __init__(self, stats: Counter[str]) -> None:
        self.to_quad: list[bytes] = []
        self.to_main: list[bytes] = []
        self._lot = trio.lowlevel.ParkingLot()
        self.stats = stats

    def _put(self, queue: list[bytes], packet: bytes) -> None:
        if len(queue) >= LOOPBACK_QUEUE:
            self.stats["quad100_queue_full"] += 1
            return
        queue.append(packet)
        self._lot.unpark_all()

    def into_quad(self, packet: bytes) -> None:
        self._put(self.to_quad, packet)

    def into_main(self, packet: bytes) -> None:
        self._put(self.to_main, packet)

    async def pump(self, main: NetStack, quad: NetStack) -> None:
        while True:
            while not (self.to_quad or self.to_main):
                await self._lot.park()
            batch, self.to_quad = self.to_quad, []
            if batch:
                quad.deliver_many(batch)
            batch, self.to_main = self.to_main, []
            if batch:
                main.deliver_many(batch)
            await trio.lowlevel.checkpoint()


class MagicDns:
    """The node's resolver: see the module docstring. `stats` counts queries by outcome."""

    def __init__(self, *, via_tailnet: Callable[[IPAddress], bool] = default_via_tailnet) -> None:
        self.stats: Counter[str] = Counter()
        self.rejects = RejectLog(log, "dns", self.stats)
        self.via_tailnet = via_tailnet
        self.stack: NetStack | None = None  # the node's, for upstreams in the tailnet
        self.listeners: list[str] = []  # "udp+tcp 127.0.0.1:5353", "quad-100"
        self._source: tuple[Node | None, Iterable[Node], Mapping[str, Any] | None] = (None, (), None)
        self._view: DnsView | None = DnsView()
        self._exit_upstream: WireUpstream | None = None
        self._in_flight = 0
        self._tcp_connections = 0
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()

    # ------------------------------------------------------------------ config
    def update(self, self_node: Node | None, peers: Iterable[Node], dns_config: Mapping[str, Any] | None) -> None:
        """A new netmap: the view is rebuilt when next needed."""
        self._source = (self_node, peers, dns_config)
        self._view = None
        self._cache.clear()

    def set_exit_node_upstream(self, upstream: WireUpstream | None) -> None:
        """Forward through `upstream` (the exit node's DoH) instead of the default resolvers,
        as tailscaled does with an exit node that offers DNS; None: the resolvers again."""
        self._exit_upstream = upstream
        self._view = None
        self._cache.clear()

    @property
    def view(self) -> DnsView:
        if self._view is None:
            self_node, peers, config = self._source
            self._view = build_view(self_node, list(peers), config,
                                    exit_node_doh=self._exit_upstream is not None)
            for problem in self._view.problems:
                self.rejects.reject("config_problem", problem)
        return self._view

    def status(self) -> dict[str, Any]:
        """The DNS configuration and counters, for `status --json`."""
        return {**self.view.summary(), "listeners": list(self.listeners), "stats": dict(self.stats)}

    # --------------------------------------------------------------- answering
    async def handle(self, wire: bytes, *, tcp: bool, udp_max: int = HOST_UDP_MAX) -> bytes | None:
        """The reply to one query (None: send nothing). Over UDP it fits the client's size."""
        decision = self._decide(wire)
        return None if decision is None else await self._complete(decision, tcp, udp_max)

    def _decide(self, wire: bytes) -> Answer | Forward | None:
        """Answer locally, or forward (a slot in flight is taken: `_complete` frees it)."""
        self.stats["queries"] += 1
        try:
            result = resolver.answer(self.view, wire, wall())
        except Exception as exc:  # a bug of ours: this query goes unanswered, the server goes on
            self.rejects.internal_error("answer", exc)
            return None
        if isinstance(result, Drop):  # (every Drop is a malformed query: too short, or a response)
            self.rejects.reject("malformed", result.reason)
            return None
        if isinstance(result, Answer):
            self._count(result)
            return result
        if self._in_flight >= MAX_IN_FLIGHT:
            self.rejects.reject("dropped_busy", "too many forwarded queries in flight")
            return None
        self._in_flight += 1
        return result

    async def _complete(self, decision: Answer | Forward, tcp: bool, udp_max: int) -> bytes:
        if isinstance(decision, Answer):
            reply, query = decision.wire, decision.query
        else:
            try:
                reply = await self._forward(decision, tcp)
            finally:
                self._in_flight -= 1
            query = decision.query
        if not tcp:
            fitted = resolver.fit_udp(reply, query, udp_max)
            if fitted is not reply:
                self.stats["truncated"] += 1
            reply = fitted
        return reply

    def _count(self, result: Answer) -> None:
        outcome = result.outcome
        if outcome == "formerr":
            self.rejects.reject("malformed", "FORMERR")
        elif outcome == "local":
            self.stats["answered_locally"] += 1
        else:
            self.stats[outcome] += 1

    async def _forward(self, fwd: Forward, tcp: bool) -> bytes:
        self.stats["forwarded"] += 1
        winner: list[bytes] = []
        errors: list[_UpstreamError] = []
        with trio.move_on_after(QUERY_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for upstream in fwd.upstreams:
                    nursery.start_soon(self._ask, upstream, fwd, tcp, winner, errors, nursery.cancel_scope)
        if winner:
            return winner[0]
        self.stats["servfail"] += 1
        if not errors:
            self.rejects.reject("upstream_timeout", fwd.query.name)
            return resolver.servfail(fwd.query)
        refused_only = all(e.kind == "refused" for e in errors)
        first = errors[0]
        if refused_only and first.reply is not None:
            return first.reply
        if first.kind == "servfail" and first.reply is not None:
            return first.reply
        return resolver.servfail(fwd.query)

    async def _ask(self, upstream: str, fwd: Forward, tcp: bool, winner: list[bytes],
                   errors: list[_UpstreamError], done: trio.CancelScope) -> None:
        try:
            reply = await self._ask_one(upstream, fwd, tcp)
            code = resolver.reply_rcode(reply)
            if code == dns.rcode.SERVFAIL:
                raise _UpstreamError("servfail", reply)
            if code == dns.rcode.REFUSED:
                raise _UpstreamError("refused", reply)
        except _UpstreamError as exc:
            self.rejects.reject(f"upstream_{exc.kind}", upstream)
            errors.append(exc)
            return
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                TrionetError) as exc:
            self.rejects.reject("upstream_unreachable", f"{upstream}: {exc!r}")
            errors.append(_UpstreamError("unreachable"))
            return
        except Exception as exc:  # a bug of ours: count it, this upstream failed
            self.rejects.internal_error("forward", exc)
            errors.append(_UpstreamError("internal"))
            return
        if not winner:
            winner.append(reply)
        done.cancel()

    async def _ask_one(self, upstream: str, fwd: Forward, tcp: bool) -> bytes:
        if upstream == EXIT_NODE_DOH:
            plugged = self._exit_upstream
            if plugged is None:
                raise _UpstreamError("no_exit_node_dns")
            reply = await plugged(fwd.wire)
            problem = resolver.check_upstream_reply(fwd.query, reply)
            if problem is not None:
                raise _UpstreamError(problem)
            self.stats["exit_node_doh_answers"] += 1
            return reply
        target = parse_upstream(upstream)
        if target is None:
            raise _UpstreamError("unsupported_resolver")  # DoH/DoT URLs: not spoken here
        return await self._exchange(target[0], target[1], fwd, tcp)

    async def _exchange(self, ip: IPAddress, port: int, fwd: Forward, client_tcp: bool) -> bytes:
        """UDP, and TCP when UDP stays silent for 2 s, fails, or is truncated for a TCP client."""
        result: list[bytes] = []
        failures: list[BaseException] = []
        tcp_started = udp_over = tcp_over = False

        async with trio.open_nursery() as nursery:
            def start_tcp() -> None:
                nonlocal tcp_started
                if not tcp_started:
                    tcp_started = True
                    nursery.start_soon(via_tcp)

            def ended() -> None:  # both ways tried and over without an answer: stop waiting
                if udp_over and tcp_over:
                    nursery.cancel_scope.cancel()

            async def via_tcp() -> None:
                nonlocal tcp_over
                try:
                    with trio.fail_after(TCP_TIMEOUT):
                        result.append(await self._tcp_exchange(ip, port, fwd))
                except (_UpstreamError, OSError, trio.TooSlowError, trio.BrokenResourceError,
                        trio.ClosedResourceError, TrionetError) as exc:
                    self.rejects.reject("upstream_tcp_failed", f"{ip}:{port}: {exc!r}")
                    failures.append(exc)
                    tcp_over = True
                    ended()
                    return
                nursery.cancel_scope.cancel()

            async def via_udp() -> None:
                nonlocal udp_over
                try:
                    reply = await self._udp_exchange(ip, port, fwd)
                except (_UpstreamError, OSError, TrionetError) as exc:
                    self.rejects.reject("upstream_udp_failed", f"{ip}:{port}: {exc!r}")
                    failures.append(exc)
                    udp_over = True
                    start_tcp()
                    ended()
                    return
                if client_tcp and resolver.truncated(reply):
                    udp_over = True
                    start_tcp()
                    ended()
                    return
                result.append(reply)
                nursery.cancel_scope.cancel()

            async def head_start() -> None:
                await trio.sleep(UDP_HEAD_START)
                start_tcp()

            nursery.start_soon(via_udp)
            nursery.start_soon(head_start)
        if result:
            return result[0]
        first = failures[0] if failures else None
        if isinstance(first, _UpstreamError):
            raise first
        raise _UpstreamError("unreachable") from first

    async def _udp_exchange(self, ip: IPAddress, port: int, fwd: Forward) -> bytes:
        if self.stack is not None and self.via_tailnet(ip):
            async with self.stack.udp_bind(0) as endpoint:
                await endpoint.send(fwd.wire, (ip, port))
                while True:
                    data, _ = await endpoint.receive()
                    if self._accept(fwd, data):
                        return data
        sock = trio.socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.connect((str(ip), port))  # replies only from the upstream's address
            await sock.send(fwd.wire)
            while True:
                data = await sock.recv(65535)
                if self._accept(fwd, data):
                    return data

    def _accept(self, fwd: Forward, data: bytes) -> bool:
        problem = resolver.check_upstream_reply(fwd.query, data)
        if problem is not None:
            self.rejects.reject(f"upstream_reply_{problem}")
        return problem is None

    async def _tcp_exchange(self, ip: IPAddress, port: int, fwd: Forward, via_host: bool = False) -> bytes:
        stream: trio.abc.Stream
        if not via_host and self.stack is not None and self.via_tailnet(ip):
            stream = await self.stack.open_tcp_stream(ip, port)
        else:
            stream = await trio.open_tcp_stream(str(ip), port)
        async with stream:
            await stream.send_all(struct.pack("!H", len(fwd.wire)) + fwd.wire)
            buf = bytearray()
            while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise _UpstreamError("tcp_closed")
                buf += chunk
            reply = bytes(buf[2:2 + int.from_bytes(buf[:2], "big")])
        problem = resolver.check_upstream_reply(fwd.query, reply)
        if problem is not None:
            raise _UpstreamError(f"reply_{problem}")
        return reply

    async def ask_host_resolver(self, wire: bytes, nameserver: tuple[IPAddress, int] | None) -> bytes:
        """A query from a client of our exit node (the peer API's DoH), answered as tailscaled
        on Linux answers it (tsdns.go HandlePeerDNSQuery): `nameserver` (the host's first
        resolv.conf entry) over TCP, so no 512-byte limit; with none, or quad-100 itself,
        the resolvers MagicDNS forwards to. TransportError when no answer comes."""
        parsed = resolver.parse_query(wire)
        if not isinstance(parsed, Query):
            raise TransportError("not a DNS query")
        self.stats["exit_client_queries"] += 1
        if nameserver is None or nameserver[0] in (QUAD100_V4, QUAD100_V6):
            reply = await self.handle(wire, tcp=True)
            if reply is None:
                raise TransportError("MagicDNS dropped the query")
            return reply
        try:
            with trio.fail_after(TCP_TIMEOUT):
                return await self._tcp_exchange(nameserver[0], nameserver[1], Forward(parsed, wire, ()),
                                                via_host=True)
        except _UpstreamError as exc:
            self.rejects.reject(f"host_resolver_{exc.kind}", nameserver)
            raise TransportError(f"the host's resolver {nameserver[0]} failed: {exc.kind}") from None
        except trio.TooSlowError:
            self.rejects.reject("host_resolver_timeout", nameserver)
            raise TransportError(f"the host's resolver {nameserver[0]} did not answer") from None

    # ----------------------------------------------------------------- servers
    async def _serve_udp(self, sock: _Datagrams, udp_max: int) -> None:
        """Local answers go out from this loop; forwarded queries each get a task (at
        most MAX_IN_FLIGHT of them)."""
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data, address = await sock.receive()
                except OSError as exc:  # an ICMP error reported on the socket: not fatal
                    self.rejects.reject("receive_failed", exc)
                    continue
                try:
                    decision = self._decide(bytes(data))
                    if isinstance(decision, Answer):
                        await sock.send(await self._complete(decision, False, udp_max), address)
                    elif decision is not None:
                        nursery.start_soon(self._udp_reply, sock, decision, address, udp_max)
                except (OSError, trio.ClosedResourceError, TrionetError) as exc:
                    self.rejects.reject("reply_failed", exc)
                except Exception as exc:  # never out of the serving task
                    self.rejects.internal_error("udp_query", exc)

    async def _udp_reply(self, sock: _Datagrams, decision: Forward, address: Any, udp_max: int) -> None:
        try:
            await sock.send(await self._complete(decision, False, udp_max), address)
        except (OSError, trio.ClosedResourceError, TrionetError) as exc:
            self.rejects.reject("reply_failed", exc)
        except Exception as exc:  # never out of the serving task
            self.rejects.internal_error("udp_query", exc)

    async def _serve_tcp(self, listener: trio.abc.Listener[Any]) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                if self._tcp_connections >= MAX_TCP_CONNECTIONS:
                    self.rejects.reject("tcp_connections_full")
                    nursery.start_soon(trio.aclose_forcefully, stream)
                    continue
                self._tcp_connections += 1
                nursery.start_soon(self._tcp_connection, stream)

    async def _tcp_connection(self, stream: trio.abc.Stream) -> None:
        """Length-prefixed queries, answered as they complete (maybe out of order, as
        tailscaled does); the connection ends at EOF, on garbage, or after 45 s idle."""
        write_lock = trio.Lock()
        pending = 0

        async def one(query: bytes) -> None:
            nonlocal pending
            try:
                reply = await self.handle(query, tcp=True)
                if reply is not None:
                    async with write_lock:
                        await stream.send_all(struct.pack("!H", len(reply)) + reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            except Exception as exc:
                self.rejects.internal_error("tcp_query", exc)
            finally:
                pending -= 1

        try:
            async with stream, trio.open_nursery() as nursery:
                buf = bytearray()
                while True:
                    with trio.move_on_after(TCP_IDLE) as idle:
                        chunk = await stream.receive_some(65536)
                    if idle.cancelled_caught:
                        self.stats["tcp_idle_closed"] += 1
                        nursery.cancel_scope.cancel()
                        break
                    if not chunk:
                        break  # EOF: the answers still on their way go out, then we close
                    buf += chunk
                    while len(buf) >= 2:
                        length = int.from_bytes(buf[:2], "big")
                        if length > MAX_TCP_QUERY or length < resolver.HEADER:
                            self.rejects.reject("malformed", f"TCP query of {length} bytes")
                            nursery.cancel_scope.cancel()
                            return
                        if len(buf) < 2 + length:
                            break
                        query = bytes(buf[2:2 + length])
                        del buf[:2 + length]
                        if pending >= MAX_TCP_PENDING:
                            self.rejects.reject("dropped_busy", "too many queries on one TCP connection")
                            continue
                        pending += 1
                        nursery.start_soon(one, query)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception as exc:
            self.rejects.internal_error("tcp_connection", exc)
        finally:
            self._tcp_connections -= 1

    async def serve_netstack(self, stack: NetStack, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Quad-100 inside the netstack: for this process's own queries (see the module docstring)."""
        self.stack = stack
        link = _Loopback(self.stats)
        quad = NetStack([QUAD100_V4, QUAD100_V6], output=link.into_main, verify_checksums=False,
                        max_connections=MAX_TCP_CONNECTIONS * 2)
        stack.divert(QUAD100_V4, link.into_quad)
        stack.divert(QUAD100_V6, link.into_quad)
        self.listeners.append("quad-100 (100.100.100.100, fd7a:115c:a1e0::53) udp+tcp 53")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(quad.run)
                nursery.start_soon(link.pump, stack, quad)
                udp = quad.udp_bind(53)
                listener = quad.listen_tcp(53)
                nursery.start_soon(self._serve_udp, udp, NETSTACK_UDP_MAX)
                nursery.start_soon(self._serve_tcp, listener)
                task_status.started()
        finally:
            stack.divert(QUAD100_V4, None)
            stack.divert(QUAD100_V6, None)

    async def serve_host(self, bind: str = "127.0.0.1", port: int = 0, *,
                         task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The resolver on a host port, UDP and TCP (`up --dns`). Starts once bound,
        with the (host, port) it listens on (port 0: any free one)."""
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        for attempt in range(20 if port == 0 else 1):  # port 0: a free UDP port whose TCP twin is free
            udp = trio.socket.socket(family, socket.SOCK_DGRAM)
            tcp = trio.socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await udp.bind((bind, port))
                chosen = udp.getsockname()[1]
                await tcp.bind((bind, chosen))
                tcp.listen(128)
                break
            except OSError as exc:
                udp.close()
                tcp.close()
                if attempt == 19 or port != 0 or exc.errno != errno.EADDRINUSE:
                    raise ConfigError(f"--dns: cannot listen on {bind}:{port}: {exc.strerror or exc}") from exc
        port = chosen
        where = f"[{bind}]:{port}" if family == socket.AF_INET6 else f"{bind}:{port}"
        self.listeners.append(f"udp+tcp {where}")
        log.info("MagicDNS on %s (UDP and TCP)", where)
        try:
            with udp:
                async with trio.SocketListener(tcp) as listener, trio.open_nursery() as nursery:
                    nursery.start_soon(self._serve_udp, _HostUdp(udp), HOST_UDP_MAX)
                    nursery.start_soon(self._serve_tcp, listener)
                    task_status.started((bind, port))
        finally:
            self.listeners.remove(f"udp+tcp {where}")

    # ------------------------------------------------------------------ lookups
    def lookup_tailnet(self, host: str) -> str | None:
        """A tailnet name's address for dialing (IPv4 first), or None when it is not one."""
        addresses = resolver.lookup_node_addresses(self.view, host)
        if not addresses:
            return None
        return str(next((a for a in addresses if a.version == 4), addresses[0]))

    async def resolve(self, host: str) -> str:
        """An address for `host`: an IP literal as it is; a tailnet name (FQDN, short
        name, extra record) from the netmap; any other name from the upstreams quad-100
        would ask (A, then AAAA). Raises ConfigError for names that do not exist or
        that nobody is configured to answer, TransportError when the upstreams fail."""
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            pass
        local = self.lookup_tailnet(host)
        if local is not None:
            return local
        fqdn = to_fqdn(host)
        view = self.view
        if fqdn is None or fqdn == ".":
            raise ConfigError(f"unknown peer {host!r}: not a DNS name")
        if resolver.authoritative_zone(view, fqdn) or has_suffix(fqdn, "onion"):
            raise ConfigError(f"unknown peer {host!r}: not in this node's netmap")
        if not resolver.upstreams_for(view, fqdn):
            # a bare word reads as a peer the user expected in the netmap; a dotted name
            # as an internet name nobody here can look up
            what = f"unknown peer {host!r}: not in this node's netmap" if "." not in host.rstrip(".") \
                else f"cannot resolve {host!r}: not a tailnet name"
            raise ConfigError(f"{what}, and no DNS resolver is configured for other names "
                              "(Headscale's nameservers, or an exit node that offers DNS)")
        cached = self._cache.get(fqdn)
        now = trio.current_time()
        if cached is not None and cached[1] > now:
            self._cache.move_to_end(fqdn)
            return cached[0]
        self.stats["resolve_forwarded"] += 1
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            query = dns.message.make_query(fqdn, rdtype)
            wire = await self.handle(query.to_wire(), tcp=True)
            if wire is None:
                raise TransportError(f"resolving {host!r}: no answer (the resolver is busy)")
            try:
                reply = dns.message.from_wire(wire)
            except Exception as exc:  # an upstream's garbage: as good as no answer
                raise TransportError(f"resolving {host!r}: unreadable answer: {exc}") from None
            rcode = reply.rcode()
            if rcode == dns.rcode.NXDOMAIN:
                raise ConfigError(f"unknown host {host!r}: no such name (NXDOMAIN)")
            if rcode != dns.rcode.NOERROR:
                raise TransportError(f"resolving {host!r}: {dns.rcode.to_text(rcode)} from the resolver")
            for rrset in reply.answer:
                if rrset.rdtype == rdtype:
                    address = str(next(iter(rrset)))
                    self._remember(fqdn, address, now + min(float(rrset.ttl), RESOLVE_TTL_MAX))
                    return address
        raise ConfigError(f"unknown host {host!r}: the resolver knows no address for it")

    def _remember(self, fqdn: str, address: str, expires: float) -> None:
        if not math.isfinite(expires):
            return
        self._cache[fqdn] = (address, expires)
        self._cache.move_to_end(fqdn)
        while len(self._cache) > RESOLVE_CACHE:
            self._cache.popitem(last=False)


__all__ = ["MagicDns", "Query", "WireUpstream", "default_via_tailnet", "parse_upstream"]
