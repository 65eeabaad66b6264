"""Local listeners that carry programs' traffic into the tailnet, and back.

* `ForwardProxy` (``--forward``): LOCALPORT -> tailnet HOST:PORT
* `Socks5Proxy` (``--socks5``): SOCKS5 CONNECT and UDP ASSOCIATE, optional username/password
* `HttpProxy` (``--http-proxy``): HTTP CONNECT, plus absolute-form plain HTTP requests
* `InboundServer` (``--serve``): tailnet PORT -> LOCALHOST:PORT

(`serve_forward`, `serve_socks5`, `serve_http_proxy` and `serve_inbound` build one
and run it.) Listeners bind loopback unless told otherwise. Each client connection
is its own task; a broken or malicious client only ever loses its own connection,
and whatever it leaves behind is released at whichever step it vanishes: a tailnet
connection still being opened is aborted, a UDP association's host socket and
netstack endpoint close with its TCP control connection (RFC 1928 section 7).

Every accepted client ends in exactly one bucket of its proxy's `statistics()`:
``completed``, ``failed[reason]`` (after a valid request) or
``handshake_errors[kind]``; until then it counts as live.
"""

from __future__ import annotations

import errno
import hmac
import logging
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, Protocol

import trio

from trionet.errors import ConfigError, RemoteProtocolError, TrionetError
from trionet.netaddr import split_host_port
from trionet.netstack.driver import TcpStream
from trionet.proxy import socks5
from trionet.rejects import RejectLog, should_log
from trionet.routes import NoRouteError

log = logging.getLogger(__name__)

COPY_CHUNK = 256 * 1024
ACCEPT_BATCH = 128  # connections taken per wake-up, so the listener still yields under a flood
ACCEPT_RETRY = 0.1
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_CLIENT_GONE_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
#: The whole SOCKS5 greeting + auth + request, or the whole HTTP request head: one
#: deadline, not one per read, so a client trickling a byte at a time gains nothing.
#: 30 s is Dante's negotiation timeout (tailscaled's SOCKS5 server has none).
HANDSHAKE_TIMEOUT = 30.0
#: Opening the connection a client asked for. tailscaled's SOCKS5 server gives 5 s;
#: 15 s lets the netstack retransmit a SYN three times (1, 3, 7 s) over a path that
#: is still being set up (a WireGuard handshake through DERP).
CONNECT_TIMEOUT = 15.0
MAX_HTTP_HEADER = 64 * 1024
MAX_SOCKS_MESSAGE = 1024  # the longest SOCKS5 message (user/pass) is 513 bytes
#: Bytes a client may send before its tailnet connection is up; then it waits (TCP flow control).
MAX_EARLY_DATA = 64 * 1024
#: Clients alive at once per listener; at the cap the listener stops accepting and the
#: kernel's backlog holds (or refuses) the rest.
MAX_CLIENTS = 4096
REPLY_TIMEOUT = 5.0  # a failure reply to a client that does not read is not worth waiting for
RECV_CHUNK = 4096
#: Accepted sockets probe a silent peer after 60 s idle, every 10 s, 6 times: a client
#: whose machine vanished (no FIN, no RST) is reaped after two minutes. (Loopback
#: clients never need it; a listener bound to a LAN address does.)
KEEPALIVE = (60, 10, 6)
#: The tailnet side of a proxied connection gets netstack keepalive: probed after 60 s
#: in which the peer sent nothing, every 15 s, aborted after 4 silent probes. A peer
#: that vanished (no FIN, no RST) then frees its connection and our relay in 2 min.
TAILNET_KEEPALIVE = (60.0, 15.0, 4)
_LINGER_RESET = struct.pack("ii", 1, 0)


class UdpEndpoint(Protocol):
    async def send_to(self, data: bytes, host: str, port: int) -> None: ...
    async def receive_from(self) -> tuple[bytes, tuple[str, int]]: ...
    def close(self) -> None: ...


class Dialer(Protocol):
    """What the proxies need from a node (trionet.Node provides it)."""

    async def open_tcp_stream(self, host: str, port: int) -> trio.abc.Stream: ...
    async def open_udp(self) -> UdpEndpoint: ...


class _HandshakeError(Exception):
    """The client broke off or broke the handshake: counted under ``handshake_errors[kind]``."""

    def __init__(self, kind: str, detail: object = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.detail = detail


class _Failed(Exception):
    """A valid request that did not end well: counted under ``failed[reason]``."""

    def __init__(self, reason: str, detail: object = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


RelayFailed = _Failed  # what `relay` raises when a side breaks, by a name for other modules


_STREAM_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ProxyStats:
    """One listener's counters.

    ``accepted`` == ``completed`` + sum(``failed``) + sum(``handshake_errors``)
    + ``live_connections`` while the listener runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.accepted = 0
        self.completed = 0
        self.failed = RejectLog(log, f"{name}: client failed")
        self.handshake_errors = RejectLog(log, f"{name}: handshake")
        self.udp_dropped = RejectLog(log, f"{name}: UDP datagram")
        self.accept_errors: Counter[str] = Counter()
        self.live_connections = 0
        self.live_udp_associations = 0

    def statistics(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "completed": self.completed,
            "failed": dict(self.failed.counts),
            "handshake_errors": dict(self.handshake_errors.counts),
            "live_connections": self.live_connections,
            "live_udp_associations": self.live_udp_associations,
            "udp_dropped": dict(self.udp_dropped.counts),
            "accept_errors": dict(self.accept_errors),
        }


# ---------------------------------------------------------------- stream helpers


async def reset(stream: trio.abc.Stream) -> None:
    """Close with RST rather than FIN: what a peer that vanished gets passed on as.
    (A tailnet connection so closed leaves no TIME_WAIT behind in the netstack.)"""
    if isinstance(stream, trio.SocketStream):
        with suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    elif isinstance(stream, TcpStream):
        with trio.CancelScope(shield=True):  # as aclose_forcefully: it must happen even if cancelled
            await stream.abort("proxy: the other side went away")
        return
    await trio.aclose_forcefully(stream)


def _probe_when_idle(stream: trio.abc.Stream) -> None:
    """Keepalive for a tailnet stream (the other side of every proxy is a local socket)."""
    if isinstance(stream, TcpStream):
        stream.set_keepalive(*TAILNET_KEEPALIVE)


def _set_keepalive(sock: socket.socket) -> None:
    idle, interval, count = KEEPALIVE
    with suppress(OSError):  # not TCP (a test's socketpair): nothing to probe
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    """A failure reply: best effort, bounded in time, never raising."""
    with trio.move_on_after(REPLY_TIMEOUT), suppress(*_STREAM_GONE):
        await stream.send_all(data)


class _Buffered:
    """Read handshake messages off a stream, keeping what was read past them."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.stage = "greeting"  # what is being read: names the handshake error if it fails

    async def _more(self) -> None:
        try:
            data = await self.stream.receive_some(RECV_CHUNK)
        except _STREAM_GONE as exc:
            raise _HandshakeError(f"reset.{self.stage}", exc) from None
        if not data:
            raise _HandshakeError(f"closed.{self.stage}", f"after {len(self.buf)} bytes")
        self.buf += data

    async def read(self, parse: Callable[[bytes], tuple[Any, int] | None], stage: str,
                   limit: int = MAX_SOCKS_MESSAGE) -> Any:
        self.stage = stage
        while True:
            try:
                got = parse(bytes(self.buf))
            except RemoteProtocolError as exc:
                raise _HandshakeError(f"garbage.{stage}", exc) from None
            if got is not None:
                msg, used = got
                del self.buf[:used]
                return msg
            if len(self.buf) > limit:
                raise _HandshakeError(f"too_long.{stage}", f"{len(self.buf)} bytes")
            await self._more()

    async def read_head(self, stage: str, limit: int) -> bytes:
        """Through the first blank line; each byte is searched once, however it trickles in."""
        self.stage = stage
        scanned = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", max(0, scanned - 3))
            if end >= 0:
                head = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return head
            scanned = len(self.buf)
            if scanned > limit:
                raise _HandshakeError(f"too_long.{stage}", f"{scanned} bytes")
            await self._more()

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except _STREAM_GONE as exc:
            raise _HandshakeError(f"reset.{self.stage}", exc) from None


def _dial_failure(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "connect_timeout"
    if isinstance(exc, NoRouteError):  # outside the tailnet without an exit node, exit node offline, ...
        return "no_route"
    if isinstance(exc, ConfigError):  # a name not in the netmap
        return "unknown_host"
    if _refused(exc):
        return "connect_refused"
    if "timed out" in str(exc).lower():
        return "connect_timeout"
    return "connect_failed"


def _refused(exc: BaseException) -> bool:
    """trio.open_tcp_stream wraps the ConnectionRefusedError of each attempt in a group."""
    if isinstance(exc, ConnectionRefusedError) or "refused" in str(exc).lower():
        return True
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return all(_refused(e) for e in cause.exceptions)
    return False


_DIAL_FAILURES = frozenset({"connect_timeout", "unknown_host", "connect_refused", "connect_failed", "no_route"})


async def _dial_watching(client: trio.abc.Stream, reader: _Buffered,
                         dial: Callable[[], Awaitable[trio.abc.Stream]],
                         *, eof_is_gone: bool) -> tuple[trio.abc.Stream, bool]:
    """Open the target while watching the client: a client that goes away (reset, or
    EOF when ``eof_is_gone``) cancels the dial, which aborts a tailnet connection still
    in SYN_SENT. What the client sends meanwhile lands in ``reader.buf``. Returns the
    target and whether the client already sent EOF; raises `_Failed` otherwise, with
    nothing left open."""
    target: trio.abc.Stream | None = None
    error: BaseException | None = None
    gone: tuple[str, object] | None = None
    client_eof = False

    async def watch(cancel: trio.CancelScope) -> None:
        nonlocal gone, client_eof
        try:
            while len(reader.buf) < MAX_EARLY_DATA:
                data = await client.receive_some(RECV_CHUNK)
                if not data:
                    if eof_is_gone:  # a SOCKS5 or HTTP client that half-closes before its reply gave up
                        gone = ("client_closed_while_connecting", "")
                        cancel.cancel()
                    client_eof = True
                    return
                reader.buf += data
        except _STREAM_GONE as exc:
            gone = ("client_reset_while_connecting", exc)
            cancel.cancel()

    async def connect(cancel: trio.CancelScope) -> None:
        nonlocal target, error
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                target = await dial()
            _probe_when_idle(target)
        except (TrionetError, OSError, trio.TooSlowError) as exc:
            error = exc
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        nursery.start_soon(connect, nursery.cancel_scope)
    if gone is not None:
        if target is not None:  # connected in the same round the client left
            await reset(target)
        raise _Failed(*gone)
    if error is not None:
        raise _Failed(_dial_failure(error), error)
    assert target is not None
    return target, client_eof


async def _one_way(src: trio.abc.Stream, dst: trio.abc.Stream, src_name: str, dst_name: str,
                   src_eof: bool, broken: list[str], cancel: trio.CancelScope,
                   counts: list[int] | None = None, index: int = 0) -> None:
    side = src_name  # whose failure an exception would be
    try:
        if not src_eof:
            while True:
                data = await src.receive_some(COPY_CHUNK)
                if not data:
                    break
                side = dst_name
                await dst.send_all(data)
                side = src_name
                if counts is not None:
                    counts[index] += len(data)
        side = dst_name
        if isinstance(dst, trio.abc.HalfCloseableStream):
            await dst.send_eof()
        else:
            await dst.aclose()
    except _STREAM_GONE:
        broken.append(side)
        cancel.cancel()


async def relay(client: trio.abc.Stream, target: trio.abc.Stream, early: bytes | bytearray = b"",
                client_eof: bool = False, counts: list[int] | None = None) -> None:
    """Send ``early`` to the target, then copy both ways until both directions ended
    with EOF (half-closes pass through); then close both. If either side breaks, the
    other is reset and `RelayFailed` (``client_reset`` / ``target_reset``) is raised.
    ``counts`` (optional): bytes copied [client to target, target to client] are added
    to it as they go."""
    broken: list[str] = []
    try:
        if early:
            try:
                await target.send_all(bytes(early))
            except _STREAM_GONE:
                broken.append("target")
        if not broken:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_one_way, client, target, "client", "target", client_eof, broken,
                                   nursery.cancel_scope, counts, 0)
                nursery.start_soon(_one_way, target, client, "target", "client", False, broken,
                                   nursery.cancel_scope, counts, 1)
    finally:
        # Shielded: in a relay cancelled while the node runs on (a forward closed), the
        # first close's checkpoint would raise Cancelled and leave the other side open.
        with trio.CancelScope(shield=True):
            for name, stream in (("client", client), ("target", target)):
                if broken and name not in broken:
                    await reset(stream)
                else:
                    await trio.aclose_forcefully(stream)
    if broken:
        raise _Failed(f"{broken[0]}_reset")


# ---------------------------------------------------------------------- listeners


class Proxy:
    """Counts, bounds and guards the clients of one listener: the base of the four
    proxies. ``name`` (``socks5``, ``http-proxy``, ``forward 8080->host:80``,
    ``serve 9000->127.0.0.1:8080``) keys its `statistics()` in a node's."""

    kind = "proxy"

    def __init__(self, name: str, max_clients: int = MAX_CLIENTS) -> None:
        self.name = name
        self.stats = ProxyStats(name)
        self.max_clients = max_clients
        self._slot_freed = trio.Event()

    def statistics(self) -> dict[str, Any]:
        return self.stats.statistics()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve clients until cancelled; `task_status.started()` once listening."""
        raise NotImplementedError

    async def _handle(self, client: Any) -> None:
        raise NotImplementedError

    def _spawn(self, nursery: trio.Nursery, stream: trio.abc.Stream) -> None:
        # counted live from here, so the accept loop's cap sees clients not yet started
        self.stats.accepted += 1
        self.stats.live_connections += 1
        nursery.start_soon(self._client, stream)

    async def _client(self, stream: trio.abc.Stream) -> None:
        """One client, start to end: never raises (but Cancelled) into the listener."""
        st = self.stats
        try:
            await self._handle(stream)
        except _HandshakeError as exc:
            st.handshake_errors.reject(exc.kind, exc.detail)
        except _Failed as exc:
            st.failed.reject(exc.reason, exc.detail)
            if exc.reason == "no_route" and should_log(st.failed[exc.reason]):
                # the user's mistake or an exit node gone: a SOCKS5 client sees only "network unreachable"
                log.info("%s: %s", self.name, exc.detail)
        except _STREAM_GONE as exc:
            st.failed.reject("io_error", exc)
        except TrionetError as exc:
            st.failed.reject("error", exc)
        except Exception as exc:  # a bug in trionet: one client's, not the listener's
            st.failed.internal_error(self.kind, exc)
        else:
            st.completed += 1
        finally:
            st.live_connections -= 1
            self._slot_freed.set()
            await trio.aclose_forcefully(stream)

    async def _wait_for_slot(self) -> None:
        while self.stats.live_connections >= self.max_clients:
            self.stats.accept_errors["paused_at_max_clients"] += 1
            self._slot_freed = trio.Event()
            await self._slot_freed.wait()

    async def _serve_tcp(self, port: int, bind: str, task_status: Any) -> None:
        try:
            listeners = await trio.open_tcp_listeners(port, host=bind)
        except OSError as exc:
            raise TrionetError(f"cannot listen on {bind}:{port} for {self.name}: {exc.strerror or exc}") from exc
        bound = listeners[0].socket.getsockname()[1]
        log.info("%s listening on %s:%s", self.name, bind, bound)
        task_status.started(bound)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                raw = socket.socket(fileno=listener.socket.detach())
                nursery.start_soon(self._accept_all, raw, nursery)

    async def _accept_all(self, raw: socket.socket, nursery: trio.Nursery) -> None:
        """trio.serve_listeners, except that each wake-up accepts every connection already
        queued. Under load a scheduling round takes milliseconds, and one accept per round
        (trio's SocketListener) kept the last of 200 simultaneous clients waiting most of
        a second for its accept."""
        raw.setblocking(False)
        errors = self.stats.accept_errors
        with raw:
            while True:
                await self._wait_for_slot()
                await trio.lowlevel.wait_readable(raw)
                for _ in range(ACCEPT_BATCH):
                    if self.stats.live_connections >= self.max_clients:
                        break
                    try:
                        conn, _addr = raw.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno in _ACCEPT_CAPACITY_ERRNOS:  # out of descriptors or memory: wait
                            errors["capacity"] += 1
                            log.warning("%s: accept: %s; retrying in %.1f s", self.name, exc, ACCEPT_RETRY)
                            await trio.sleep(ACCEPT_RETRY)
                            break
                        if exc.errno in _ACCEPT_CLIENT_GONE_ERRNOS:  # the client gave up before its accept
                            errors["client_gone"] += 1
                            log.debug("%s: accept: %s", self.name, exc)
                            continue
                        raise
                    _set_keepalive(conn)
                    self._spawn(nursery, trio.SocketStream(trio.socket.from_stdlib_socket(conn)))


class ForwardProxy(Proxy):
    """``--forward LOCALPORT=HOST:PORT``: every local connection becomes one to HOST:PORT."""

    kind = "forward"

    def __init__(self, local_port: int, host: str, port: int, dialer: Dialer, bind: str = "127.0.0.1",
                 *, max_clients: int = MAX_CLIENTS) -> None:
        super().__init__(f"forward {local_port}->{host}:{port}", max_clients)
        self.local_port, self.host, self.port, self.dialer, self.bind = local_port, host, port, dialer, bind

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self._serve_tcp(self.local_port, self.bind, task_status)

    async def _handle(self, client: trio.abc.Stream) -> None:
        reader = _Buffered(client)
        try:
            # EOF while connecting is a half-close to pass on (`nc -N`), not a client gone
            target, client_eof = await _dial_watching(
                client, reader, lambda: self.dialer.open_tcp_stream(self.host, self.port), eof_is_gone=False)
        except _Failed as exc:
            if exc.reason in _DIAL_FAILURES:  # refused, unreachable: the client sees a reset, as from the target
                await reset(client)
            raise
        await relay(client, target, reader.buf, client_eof)


class InboundServer(Proxy):
    """``--serve PORT=LOCALHOST:LOCALPORT``: tailnet connections to PORT, each joined to
    a new connection to LOCALHOST:LOCALPORT."""

    kind = "serve"

    def __init__(self, listener: trio.abc.Listener[Any], local_host: str, local_port: int,
                 *, max_clients: int = MAX_CLIENTS) -> None:
        port = getattr(listener, "port", "?")
        super().__init__(f"serve {port}->{local_host}:{local_port}", max_clients)
        self.listener, self.local_host, self.local_port = listener, local_host, local_port

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        take_queued = getattr(self.listener, "accept_nowait", None)  # the netstack's TcpListener has it
        async with trio.open_nursery() as nursery, self.listener:
            while True:
                await self._wait_for_slot()
                self._spawn(nursery, await self.listener.accept())
                while (take_queued is not None and self.stats.live_connections < self.max_clients
                       and (stream := take_queued()) is not None):
                    self._spawn(nursery, stream)

    async def _handle(self, client: trio.abc.Stream) -> None:
        _probe_when_idle(client)  # the client here is a tailnet peer
        reader = _Buffered(client)
        try:
            local, client_eof = await _dial_watching(
                client, reader, lambda: trio.open_tcp_stream(self.local_host, self.local_port),
                eof_is_gone=False)
        except _Failed as exc:
            if exc.reason in _DIAL_FAILURES:  # the tailnet peer sees what a closed port sends: RST
                await reset(client)
            raise
        await relay(client, local, reader.buf, client_eof)


class Socks5Proxy(Proxy):
    """SOCKS5 (RFC 1928): CONNECT and UDP ASSOCIATE; username/password (RFC 1929) if ``auth``."""

    kind = "socks5"

    def __init__(self, port: int, dialer: Dialer, bind: str = "127.0.0.1", auth: tuple[str, str] | None = None,
                 *, max_clients: int = MAX_CLIENTS) -> None:
        super().__init__("socks5", max_clients)
        self.port, self.dialer, self.bind, self.auth = port, dialer, bind, auth

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self._serve_tcp(self.port, self.bind, task_status)

    async def _handle(self, client: trio.SocketStream) -> None:
        reader = _Buffered(client)
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            request = await self._handshake(reader)
        if scope.cancelled_caught:
            raise _HandshakeError(f"timeout.{reader.stage}")
        if request.command == socks5.Command.CONNECT:
            await self._connect(client, reader, request)
        elif request.command == socks5.Command.UDP_ASSOCIATE:
            await self._udp_associate(client)
        else:
            await _send_quietly(client, socks5.build_reply(socks5.Reply.COMMAND_NOT_SUPPORTED))
            raise _HandshakeError("unsupported_command", request.command)

    async def _handshake(self, reader: _Buffered) -> socks5.Request:
        greeting = await reader.read(socks5.parse_greeting, "greeting")
        wanted = socks5.AUTH_USERPASS if self.auth else socks5.AUTH_NONE
        if wanted not in greeting.methods:
            await _send_quietly(reader.stream, bytes([socks5.VERSION, socks5.AUTH_NO_ACCEPTABLE]))
            raise _HandshakeError("no_acceptable_method", sorted(greeting.methods))
        await reader.send(bytes([socks5.VERSION, wanted]))
        if self.auth:
            creds = await reader.read(socks5.parse_userpass, "auth")
            user, password = self.auth
            # both compared, in constant time: any local process can knock on this port
            ok = hmac.compare_digest(creds.username.encode(), user.encode()) & \
                hmac.compare_digest(creds.password.encode(), password.encode())
            if not ok:
                await _send_quietly(reader.stream, b"\x01\x01")
                raise _HandshakeError("auth_failed")
            await reader.send(b"\x01\x00")
        request: socks5.Request = await reader.read(socks5.parse_request, "request")
        return request

    async def _connect(self, client: trio.SocketStream, reader: _Buffered, request: socks5.Request) -> None:
        try:
            target, _eof = await _dial_watching(
                client, reader, lambda: self.dialer.open_tcp_stream(request.host, request.port), eof_is_gone=True)
        except _Failed as exc:
            if exc.reason in _DIAL_FAILURES:
                await _send_quietly(client, socks5.build_reply(_SOCKS_REPLY[exc.reason]))
            raise
        try:
            await client.send_all(socks5.build_reply(socks5.Reply.SUCCEEDED))
        except _STREAM_GONE as exc:
            await reset(target)
            raise _Failed("client_reset", exc) from None
        await relay(client, target, reader.buf)

    async def _udp_associate(self, client: trio.SocketStream) -> None:
        """Relay the client's UDP datagrams to the tailnet while its TCP stays open."""
        try:
            peer_ip = client.socket.getpeername()[0]  # only datagrams from the client's address are relayed
        except OSError as exc:
            raise _Failed("client_reset", exc) from None
        st = self.stats
        relay_sock: trio.socket.SocketType | None = None
        tailnet: UdpEndpoint | None = None
        try:
            relay_sock = trio.socket.socket(socket.AF_INET6 if ":" in self.bind else socket.AF_INET,
                                            socket.SOCK_DGRAM)
            try:
                await relay_sock.bind((self.bind, 0))
                tailnet = await self.dialer.open_udp()
            except (OSError, TrionetError) as exc:
                await _send_quietly(client, socks5.build_reply(socks5.Reply.GENERAL_FAILURE))
                raise _Failed("udp_unavailable", exc) from None
            st.live_udp_associations += 1
            host, port = relay_sock.getsockname()[:2]
            try:
                await client.send_all(socks5.build_reply(socks5.Reply.SUCCEEDED, host, port))
            except _STREAM_GONE as exc:
                raise _Failed("client_reset", exc) from None
            await self._associate(client, relay_sock, tailnet, peer_ip)
        finally:
            if relay_sock is not None:
                relay_sock.close()
            if tailnet is not None:
                tailnet.close()
                st.live_udp_associations -= 1

    async def _associate(self, client: trio.SocketStream, relay_sock: trio.socket.SocketType,
                         tailnet: UdpEndpoint, peer_ip: str) -> None:
        dropped = self.stats.udp_dropped
        client_addr: list[Any] = []
        control_reset: list[BaseException] = []

        async def from_client() -> None:
            while True:
                data, addr = await relay_sock.recvfrom(65535)
                if addr[0] != peer_ip:
                    dropped.reject("foreign_source", addr[0])
                    continue
                try:
                    dgram = socks5.parse_udp_datagram(data)
                except RemoteProtocolError as exc:
                    dropped.reject("malformed", exc)
                    continue
                client_addr[:] = [addr]
                try:
                    await tailnet.send_to(dgram.data, dgram.host, dgram.port)
                except (TrionetError, ValueError) as exc:
                    dropped.reject("unroutable", exc)

        async def to_client() -> None:
            while True:
                data, (src_host, src_port) = await tailnet.receive_from()
                if not client_addr:
                    dropped.reject("before_client", src_host)
                    continue
                try:
                    await relay_sock.sendto(socks5.build_udp_datagram(src_host, src_port, data), client_addr[0])
                except OSError as exc:
                    dropped.reject("to_client_failed", exc)

        async def control(cancel: trio.CancelScope) -> None:
            # RFC 1928 section 7: the association lives as long as this TCP connection
            try:
                while await client.receive_some(RECV_CHUNK):
                    pass
            except _STREAM_GONE as exc:
                control_reset.append(exc)
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(from_client)
            nursery.start_soon(to_client)
            nursery.start_soon(control, nursery.cancel_scope)
        if control_reset:
            raise _Failed("client_reset", control_reset[0])


_SOCKS_REPLY = {
    "unknown_host": socks5.Reply.HOST_UNREACHABLE,
    "connect_refused": socks5.Reply.CONNECTION_REFUSED,
    "connect_timeout": socks5.Reply.HOST_UNREACHABLE,
    "connect_failed": socks5.Reply.HOST_UNREACHABLE,
    "no_route": socks5.Reply.NETWORK_UNREACHABLE,
}


# ------------------------------------------------------------------ HTTP proxy


def _parse_http_head(head: bytes) -> tuple[str, str, str, list[bytes]]:
    """A request head through its blank line: method, target, version, header lines."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise RemoteProtocolError("not an HTTP/1.x request line")
    try:
        method, target, version = (p.decode("ascii") for p in parts)
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("non-ASCII request line") from exc
    return method, target, version, lines[1:]


def _http_error(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".encode()


class HttpProxy(Proxy):
    """HTTP CONNECT, and absolute-form plain HTTP (one request, then the connection is piped)."""

    kind = "http-proxy"

    def __init__(self, port: int, dialer: Dialer, bind: str = "127.0.0.1",
                 *, max_clients: int = MAX_CLIENTS) -> None:
        super().__init__("http-proxy", max_clients)
        self.port, self.dialer, self.bind = port, dialer, bind

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self._serve_tcp(self.port, self.bind, task_status)

    async def _handle(self, client: trio.SocketStream) -> None:
        reader = _Buffered(client)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                head = await reader.read_head("head", MAX_HTTP_HEADER)
            method, target, version, headers = _parse_http_head(head)
            if method == "CONNECT":
                host, port = split_host_port(target, 443)
                first = b""
            elif target.startswith("http://"):
                hostport, _, path = target[len("http://"):].partition("/")
                host, port = split_host_port(hostport, 80)
                kept = [h for h in headers if not h.lower().startswith((b"proxy-", b"connection:"))]
                first = b"\r\n".join([f"{method} /{path} {version}".encode(), *kept,
                                      b"Connection: close", b"", b""])
            else:
                raise RemoteProtocolError(f"unsupported proxy request {method} {target[:80]}")
        except trio.TooSlowError:
            await _send_quietly(client, _http_error("408 Request Timeout"))
            raise _HandshakeError("timeout.head") from None
        except _HandshakeError as exc:
            if exc.kind == "too_long.head":
                await _send_quietly(client, _http_error("431 Request Header Fields Too Large"))
            raise
        except (RemoteProtocolError, ValueError) as exc:
            await _send_quietly(client, _http_error("400 Bad Request"))
            raise _HandshakeError("garbage.head", exc) from None
        try:
            # EOF before the 200 means a CONNECT client gave up; after a whole
            # absolute-form request it is an HTTP/1.0 client's half-close
            remote, client_eof = await _dial_watching(
                client, reader, lambda: self.dialer.open_tcp_stream(host, port), eof_is_gone=method == "CONNECT")
        except _Failed as exc:
            if exc.reason in _DIAL_FAILURES:
                msg = f"{exc.reason}: {exc.detail}".encode()
                await _send_quietly(client, b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: "
                                    + str(len(msg) + 1).encode() + b"\r\n\r\n" + msg + b"\n")
            raise
        try:
            if method == "CONNECT":
                await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        except _STREAM_GONE as exc:
            await reset(remote)
            raise _Failed("client_reset", exc) from None
        await relay(client, remote, first + bytes(reader.buf), client_eof)


# ----------------------------------------------- the functions the daemon calls


async def serve_forward(local_port: int, host: str, port: int, dialer: Dialer, bind: str = "127.0.0.1",
                        *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    await ForwardProxy(local_port, host, port, dialer, bind).serve(task_status=task_status)


async def serve_inbound(listener: trio.abc.Listener[Any], local_host: str, local_port: int,
                        *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Accept tailnet connections and connect each to LOCALHOST:PORT."""
    await InboundServer(listener, local_host, local_port).serve(task_status=task_status)


async def serve_socks5(port: int, dialer: Dialer, bind: str = "127.0.0.1",
                       auth: tuple[str, str] | None = None,
                       *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    await Socks5Proxy(port, dialer, bind, auth).serve(task_status=task_status)


async def serve_http_proxy(port: int, dialer: Dialer, bind: str = "127.0.0.1",
                           *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    await HttpProxy(port, dialer, bind).serve(task_status=task_status)
