"""Local listeners that carry programs' traffic into the tailnet, and back.

* `serve_forward`: LOCALPORT -> tailnet HOST:PORT (``--forward``)
* `serve_socks5`: SOCKS5 CONNECT and UDP ASSOCIATE, optional username/password
* `serve_http_proxy`: HTTP CONNECT, plus absolute-form plain HTTP requests
* `serve_inbound`: tailnet PORT -> LOCALHOST:PORT (``--serve``)

Listeners bind loopback unless told otherwise. Each client connection is its
own task; a broken or malicious client only ever loses its own connection.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from trionet.errors import RemoteProtocolError, TrionetError
from trionet.proxy import socks5

log = logging.getLogger(__name__)

COPY_CHUNK = 256 * 1024
ACCEPT_BATCH = 128  # connections taken per wake-up, so the listener still yields under a flood
ACCEPT_RETRY = 0.1
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_CLIENT_GONE_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
HANDSHAKE_TIMEOUT = 30.0
MAX_HTTP_HEADER = 64 * 1024


class UdpEndpoint(Protocol):
    async def send_to(self, data: bytes, host: str, port: int) -> None: ...
    async def receive_from(self) -> tuple[bytes, tuple[str, int]]: ...
    def close(self) -> None: ...


class Dialer(Protocol):
    """What the proxies need from a node (trionet.Node provides it)."""

    async def open_tcp_stream(self, host: str, port: int) -> trio.abc.Stream: ...
    async def open_udp(self) -> UdpEndpoint: ...


stats: Counter[str] = Counter()


async def _copy(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
    try:
        while True:
            data = await src.receive_some(COPY_CHUNK)
            if not data:
                break
            await dst.send_all(data)
        if isinstance(dst, trio.abc.HalfCloseableStream):
            await dst.send_eof()
        else:
            await dst.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # One side went away: take the other down too.
        await trio.aclose_forcefully(src)
        await trio.aclose_forcefully(dst)


async def pipe(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    """Copy both ways until both directions are done; then close both."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy, a, b)
            nursery.start_soon(_copy, b, a)
    finally:
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)


async def _serve(port: int, bind: str, handler: Callable[[trio.SocketStream], Awaitable[None]],
                 name: str, task_status: Any) -> None:
    try:
        listeners = await trio.open_tcp_listeners(port, host=bind)
    except OSError as exc:
        raise TrionetError(f"cannot listen on {bind}:{port} for {name}: {exc.strerror or exc}") from exc

    async def guarded(stream: trio.SocketStream) -> None:
        stats[f"{name}.accepted"] += 1
        try:
            await handler(stream)
        except TrionetError as exc:
            stats[f"{name}.failed"] += 1
            log.info("%s: %s", name, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            stats[f"{name}.broken"] += 1
            log.debug("%s: connection broke: %s", name, exc)
        finally:
            await trio.aclose_forcefully(stream)

    bound = [ls.socket.getsockname()[1] for ls in listeners]
    log.info("%s listening on %s:%s", name, bind, bound[0])
    task_status.started(bound[0])
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            raw = socket.socket(fileno=listener.socket.detach())
            nursery.start_soon(_accept_all, raw, guarded, nursery)


async def _accept_all(raw: socket.socket, handler: Callable[[trio.SocketStream], Awaitable[None]],
                      nursery: trio.Nursery) -> None:
    """trio.serve_listeners, except that each wake-up accepts every connection already
    queued. Under load a scheduling round takes milliseconds, and one accept per round
    (trio's SocketListener) kept the last of 200 simultaneous clients waiting most of
    a second for its accept."""
    raw.setblocking(False)
    with raw:
        while True:
            await trio.lowlevel.wait_readable(raw)
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _addr = raw.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:  # out of descriptors or memory: wait
                        stats["accept.capacity"] += 1
                        log.warning("accept: %s; retrying in %.1f s", exc, ACCEPT_RETRY)
                        await trio.sleep(ACCEPT_RETRY)
                        break
                    if exc.errno in _ACCEPT_CLIENT_GONE_ERRNOS:  # the client gave up before its accept
                        stats["accept.client_gone"] += 1
                        log.debug("accept: %s", exc)
                        continue
                    raise
                nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(conn)))


async def serve_forward(local_port: int, host: str, port: int, dialer: Dialer, bind: str = "127.0.0.1",
                        *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(client: trio.SocketStream) -> None:
        remote = await dialer.open_tcp_stream(host, port)
        await pipe(client, remote)

    await _serve(local_port, bind, handle, f"forward {local_port}->{host}:{port}", task_status)


async def serve_inbound(listener: trio.abc.Listener[Any], local_host: str, local_port: int,
                        *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Accept tailnet connections and connect each to LOCALHOST:PORT."""

    async def handle(stream: trio.abc.Stream) -> None:
        try:
            local = await trio.open_tcp_stream(local_host, local_port)
        except OSError as exc:
            stats["serve.local_refused"] += 1
            log.info("serve: cannot reach %s:%s: %s", local_host, local_port, exc)
            await trio.aclose_forcefully(stream)
            return
        except BaseException:  # cancelled while connecting: the tailnet side is ours to close
            await trio.aclose_forcefully(stream)
            raise
        await pipe(stream, local)

    task_status.started()
    take_queued = getattr(listener, "accept_nowait", None)  # the netstack's TcpListener has it
    async with trio.open_nursery() as nursery, listener:
        while True:
            nursery.start_soon(handle, await listener.accept())
            while take_queued is not None and (stream := take_queued()) is not None:
                nursery.start_soon(handle, stream)


# ----------------------------------------------------------------------- SOCKS5


class _Buffered:
    """Read protocol messages off a stream, keeping what was read past them."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def read(self, parse: Callable[[bytes], tuple[Any, int] | None], limit: int = 4096) -> Any:
        while True:
            got = parse(bytes(self.buf))
            if got is not None:
                msg, used = got
                del self.buf[:used]
                return msg
            if len(self.buf) > limit:
                raise RemoteProtocolError("request too long")
            data = await self.stream.receive_some(4096)
            if not data:
                raise RemoteProtocolError("client closed during handshake")
            self.buf += data


async def serve_socks5(port: int, dialer: Dialer, bind: str = "127.0.0.1",
                       auth: tuple[str, str] | None = None,
                       *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(client: trio.SocketStream) -> None:
        reader = _Buffered(client)
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            try:
                request = await _socks5_handshake(client, reader, auth)
            except RemoteProtocolError as exc:
                stats["socks5.bad_request"] += 1
                log.debug("socks5: dropping client: %s", exc)
                return
        if scope.cancelled_caught or request is None:
            return
        if request.command == socks5.Command.CONNECT:
            try:
                remote = await dialer.open_tcp_stream(request.host, request.port)
            except TrionetError as exc:
                log.info("socks5: CONNECT %s:%s failed: %s", request.host, request.port, exc)
                await client.send_all(socks5.build_reply(_reply_for(exc)))
                return
            await client.send_all(socks5.build_reply(socks5.Reply.SUCCEEDED))
            if reader.buf:
                await remote.send_all(bytes(reader.buf))
            await pipe(client, remote)
        elif request.command == socks5.Command.UDP_ASSOCIATE:
            await _udp_associate(client, dialer, bind)
        else:
            await client.send_all(socks5.build_reply(socks5.Reply.COMMAND_NOT_SUPPORTED))

    await _serve(port, bind, handle, "socks5", task_status)


def _reply_for(exc: Exception) -> socks5.Reply:
    from trionet.errors import ConfigError

    if isinstance(exc, ConfigError):  # unknown peer name
        return socks5.Reply.HOST_UNREACHABLE
    if "refused" in str(exc).lower():
        return socks5.Reply.CONNECTION_REFUSED
    return socks5.Reply.HOST_UNREACHABLE


async def _socks5_handshake(client: trio.SocketStream, reader: _Buffered,
                            auth: tuple[str, str] | None) -> socks5.Request | None:
    greeting = await reader.read(socks5.parse_greeting)
    wanted = socks5.AUTH_USERPASS if auth else socks5.AUTH_NONE
    if wanted not in greeting.methods:
        await client.send_all(bytes([socks5.VERSION, socks5.AUTH_NO_ACCEPTABLE]))
        return None
    await client.send_all(bytes([socks5.VERSION, wanted]))
    if auth:
        creds = await reader.read(socks5.parse_userpass)
        ok = (creds.username, creds.password) == auth
        await client.send_all(bytes([1, 0 if ok else 1]))
        if not ok:
            stats["socks5.auth_failed"] += 1
            return None
    request: socks5.Request = await reader.read(socks5.parse_request)
    return request


async def _udp_associate(client: trio.SocketStream, dialer: Dialer, bind: str) -> None:
    """Relay the client's UDP datagrams to the tailnet while its TCP stays open."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    relay = trio.socket.socket(family, socket.SOCK_DGRAM)
    await relay.bind((bind, 0))
    tailnet = await dialer.open_udp()
    client_addr: list[Any] = []
    host, port = relay.getsockname()[:2]
    await client.send_all(socks5.build_reply(socks5.Reply.SUCCEEDED, host, port))
    peer_ip = client.socket.getpeername()[0]

    async def from_client() -> None:
        while True:
            data, addr = await relay.recvfrom(65535)
            if addr[0] != peer_ip:
                stats["socks5.udp_foreign"] += 1
                continue
            try:
                dgram = socks5.parse_udp_datagram(data)
            except RemoteProtocolError as exc:
                stats["socks5.udp_bad"] += 1
                log.debug("socks5 udp: %s", exc)
                continue
            client_addr[:] = [addr]
            try:
                await tailnet.send_to(dgram.data, dgram.host, dgram.port)
            except TrionetError as exc:
                stats["socks5.udp_unroutable"] += 1
                log.debug("socks5 udp: %s", exc)

    async def to_client() -> None:
        while True:
            data, (src_host, src_port) = await tailnet.receive_from()
            if client_addr:
                await relay.sendto(socks5.build_udp_datagram(src_host, src_port, data), client_addr[0])

    async def control_closed(cancel: trio.CancelScope) -> None:
        while await client.receive_some(1024):
            pass
        cancel.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(from_client)
            nursery.start_soon(to_client)
            nursery.start_soon(control_closed, nursery.cancel_scope)
    finally:
        relay.close()
        tailnet.close()


# ------------------------------------------------------------------ HTTP proxy


def _parse_http_head(buf: bytes) -> tuple[tuple[str, str, str, list[bytes]], int] | None:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HTTP_HEADER:
            raise RemoteProtocolError("HTTP request head too long")
        return None
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise RemoteProtocolError("not an HTTP/1.x request line")
    try:
        method, target, version = (p.decode("ascii") for p in parts)
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("non-ASCII request line") from exc
    return (method, target, version, lines[1:]), end + 4


def _split_host_port(hostport: str, default: int) -> tuple[str, int]:
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return hostport, default
    return host, int(port)


async def serve_http_proxy(port: int, dialer: Dialer, bind: str = "127.0.0.1",
                           *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(client: trio.SocketStream) -> None:
        reader = _Buffered(client)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                method, target, version, headers = await reader.read(_parse_http_head, MAX_HTTP_HEADER)
            if method == "CONNECT":
                host, tport = _split_host_port(target, 443)
                first = b""
            elif target.startswith("http://"):
                hostport, _, path = target[len("http://"):].partition("/")
                host, tport = _split_host_port(hostport, 80)
                kept = [h for h in headers if not h.lower().startswith((b"proxy-", b"connection:"))]
                first = b"\r\n".join([f"{method} /{path} {version}".encode(), *kept,
                                      b"Connection: close", b"", b""])
            else:
                raise RemoteProtocolError(f"unsupported proxy request {method} {target[:80]}")
        except (RemoteProtocolError, ValueError, trio.TooSlowError) as exc:
            stats["http.bad_request"] += 1
            log.debug("http proxy: %s", exc)
            await client.send_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            return
        try:
            remote = await dialer.open_tcp_stream(host, tport)
        except TrionetError as exc:
            msg = str(exc).encode()
            await client.send_all(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: "
                                  + str(len(msg) + 1).encode() + b"\r\n\r\n" + msg + b"\n")
            return
        if method == "CONNECT":
            await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            await remote.send_all(first)
        if reader.buf:
            await remote.send_all(bytes(reader.buf))
        await pipe(client, remote)

    await _serve(port, bind, handle, "http-proxy", task_status)
