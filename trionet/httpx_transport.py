"""`TailnetTransport`: `httpx.AsyncClient` under Trio, reaching tailnet names.

    async with trionet.Node(...) as node:
        async with httpx.AsyncClient(transport=TailnetTransport(node)) as client:
            page = await client.get("http://web-server:8000/")

httpx's own connection pool (HTTP/1.1, keep-alive, limits, TLS for ``https://``)
with its network backend swapped for the node: each connection is
`Node.open_tcp_stream` to the URL's host, so names are the tailnet's (MagicDNS,
short names, tailnet IPs). Names outside the tailnet fail with `httpx.ConnectError`.

Needs the optional extra: ``pip install trionet[httpx]``. `import trionet` does not
import httpx; only this module does.
"""

from __future__ import annotations

import math
import ssl
import typing
from typing import Any, Protocol

import httpcore
import httpx
import trio

from trionet.errors import TrionetError
from trionet.netstack.driver import TcpStream

__all__ = ["TailnetBackend", "TailnetTransport"]


class TcpDialer(Protocol):
    """What the transport needs of a node (`trionet.Node` has it)."""

    async def open_tcp_stream(self, host: str, port: int) -> trio.abc.HalfCloseableStream: ...


class TailnetTransport(httpx.AsyncHTTPTransport):
    """An `httpx.AsyncBaseTransport` whose connections go through ``node``.

    Takes httpx.AsyncHTTPTransport's arguments that make sense inside a tailnet
    (``verify``, ``cert``, ``trust_env``, ``http1``, ``http2``, ``limits``, ``retries``);
    proxies, Unix sockets and local addresses do not apply."""

    def __init__(self, node: TcpDialer, *, verify: ssl.SSLContext | str | bool = True,
                 cert: Any = None, trust_env: bool = True, http1: bool = True, http2: bool = False,
                 limits: httpx.Limits | None = None, retries: int = 0) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's default
        ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
        super().__init__(verify=ssl_context, http1=http1, http2=http2, limits=limits, retries=retries)
        # The same pool httpx.AsyncHTTPTransport builds, over the tailnet: its request
        # and response handling (and error mapping) stay httpx's own.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            retries=retries,
            network_backend=TailnetBackend(node),
        )


class TailnetBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend over a node: TCP only, to tailnet hosts."""

    def __init__(self, node: TcpDialer) -> None:
        self.node = node

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                stream = await self.node.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port}: no answer within {timeout:g} s") from None
        except (TrionetError, OSError) as exc:  # refused, unknown name, not running
            raise httpcore.ConnectError(str(exc)) from exc
        return TailnetStream(stream)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("a tailnet transport has no Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


def _why(exc: BaseException) -> str:
    """trio's stream errors carry the reason (an SSL error, a reset) as their cause."""
    cause = exc.__cause__ or exc
    return str(cause) or type(cause).__name__


class TailnetStream(httpcore.AsyncNetworkStream):
    """A tailnet TCP stream (or TLS over one) as httpcore's network stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                return bytes(await self.stream.receive_some(max_bytes))
        except trio.TooSlowError:
            raise httpcore.ReadTimeout(f"no data within {timeout:g} s") from None
        except (*_GONE, ssl.SSLError) as exc:
            raise httpcore.ReadError(_why(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                await self.stream.send_all(buffer)
        except trio.TooSlowError:
            raise httpcore.WriteTimeout(f"could not send within {timeout:g} s") from None
        except (*_GONE, ssl.SSLError) as exc:
            raise httpcore.WriteError(_why(exc)) from exc

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)  # a pool closing a connection never waits on the peer

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        tls = trio.SSLStream(self.stream, ssl_context, server_hostname=server_hostname, https_compatible=True)
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            await self.aclose()
            raise httpcore.ConnectTimeout(f"TLS handshake: no answer within {timeout:g} s") from None
        except (*_GONE, ssl.SSLError) as exc:
            await self.aclose()
            raise httpcore.ConnectError(f"TLS handshake failed: {_why(exc)}") from exc
        return TailnetStream(tls)

    def get_extra_info(self, info: str) -> Any:
        tcp = self._tcp()
        if info == "ssl_object":  # trio's SSLStream answers what an ssl.SSLObject does (ALPN, cert)
            return self.stream if isinstance(self.stream, trio.SSLStream) else None
        if info == "is_readable":  # an idle pooled connection the server closed must not be reused
            if tcp is not None:
                return tcp.connection.readable or tcp.connection.error is not None
            plain = self._innermost()
            return isinstance(plain, trio.SocketStream) and plain.socket.is_readable()
        if info in ("client_addr", "server_addr") and tcp is not None:
            ip, port = tcp.local_address if info == "client_addr" else tcp.remote_address
            return str(ip), port
        return None

    def _innermost(self) -> trio.abc.Stream:
        stream = self.stream
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        return stream

    def _tcp(self) -> TcpStream | None:
        stream = self._innermost()
        return stream if isinstance(stream, TcpStream) else None
