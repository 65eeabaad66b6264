"""Names outside the tailnet, resolved by the exit node's DNS (protocol-notes-next §15.6).

An exit node offers DNS-over-HTTPS on its peer API (tailscale ipn/ipnlocal/peerapi.go,
handleDNSQuery), which answers from the exit node's own resolver: the names a
proxy client asks for resolve as they would on the exit node, where the traffic
leaves. tailscaled's dialer does the same (net/tsdial/dohclient.go):

* ``POST http://<exit node IP>:<peerapi port>/dns-query`` over the tailnet, plain
  HTTP/1.1, ``Content-Type: application/dns-message``, the DNS query as the body;
* only a ``200`` whose ``Content-Type`` is exactly ``application/dns-message`` is
  an answer; A and AAAA are asked separately; answers are cached.

`doh_query` is that exchange. The node plugs it into MagicDNS (`trionet.dns`) as
the upstream while an exit node that offers DNS is in use, so every name trionet
looks up (and every question to 100.100.100.100) goes there, with MagicDNS's
checks of the answer and its cache.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any, Protocol

import trio

from trionet.errors import ConfigError, RemoteProtocolError, TransportError
from trionet.http1 import read_response_head
from trionet.netaddr import join_host_port

__all__ = ["DOH_CONTENT_TYPE", "DohError", "StreamOpener", "doh_query"]

log = logging.getLogger(__name__)

DOH_CONTENT_TYPE = "application/dns-message"
DOH_TIMEOUT = 10.0  # the exit node gives its resolver 5 s (tsdns.go HandlePeerDNSQuery); a dial and a retry on top
MAX_DNS_MESSAGE = 65535  # a DNS message never exceeds this (its TCP length prefix is 16 bits)


class StreamOpener(Protocol):
    """What `doh_query` dials through: a `trionet.Node` is one."""

    async def open_tcp_stream(self, host: str, port: int) -> Any: ...


class DohError(TransportError):
    """The DoH server did not answer with a DNS message."""


def _split_url(url: str) -> tuple[str, int, str, str]:
    """(host, port, path, Host header) of an ``http://IP:PORT/path`` DoH URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"DoH URL {url!r}: only http://IP:PORT/... (a peer API over the tailnet) is supported")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ConfigError(f"DoH URL {url!r}: bad port") from exc
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, port, path, join_host_port(parts.hostname, port)


async def _read_body(stream: Any, headers: dict[str, str], first: bytes, peer: str) -> bytes:
    """The response body: by Content-Length, chunked, or to the end; never over MAX_DNS_MESSAGE."""
    body = bytearray(first)

    async def more() -> bool:
        data = await stream.receive_some(16384)
        if not data:
            return False
        body.extend(data)
        if len(body) > MAX_DNS_MESSAGE + 16384:
            raise RemoteProtocolError(f"{peer} sent more than a DNS message can hold")
        return True

    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            while b"\r\n" not in body:
                if not await more():
                    raise RemoteProtocolError(f"{peer} closed the connection inside a chunked body")
            size_line = bytes(body).partition(b"\r\n")[0]
            try:
                size = int(size_line.split(b";")[0].strip() or b"x", 16)
            except ValueError:
                raise RemoteProtocolError(f"{peer} sent a bad chunk size {size_line[:20]!r}") from None
            if size > MAX_DNS_MESSAGE - len(out):
                raise RemoteProtocolError(f"{peer} sent more than a DNS message can hold")
            del body[:len(size_line) + 2]
            if size == 0:
                return bytes(out)
            while len(body) < size + 2:
                if not await more():
                    raise RemoteProtocolError(f"{peer} closed the connection inside a chunk")
            out += body[:size]
            del body[:size + 2]
    length_text = headers.get("content-length")
    if length_text is not None:
        if not length_text.isdigit() or int(length_text) > MAX_DNS_MESSAGE:
            raise RemoteProtocolError(f"{peer} sent Content-Length {length_text[:20]!r}")
        length = int(length_text)
        while len(body) < length:
            if not await more():
                raise RemoteProtocolError(f"{peer} closed the connection {length - len(body)} bytes early")
        return bytes(body[:length])
    while await more():
        pass
    if len(body) > MAX_DNS_MESSAGE:
        raise RemoteProtocolError(f"{peer} sent more than a DNS message can hold")
    return bytes(body)


async def doh_query(node_or_stream_opener: StreamOpener, base_url: str, wire_query: bytes, *,
                    timeout: float = DOH_TIMEOUT) -> bytes:
    """One DNS-over-HTTPS exchange: POST `wire_query` (a DNS message, no length prefix) to
    `base_url`, the full DoH URL (``http://100.64.0.3:46813/dns-query``, as
    `RouteTable.doh_url` gives it: tailscaled's dohConn.baseURL), dialing through
    `node_or_stream_opener` (a `trionet.Node`, or anything with ``open_tcp_stream``).

    Returns the DNS response message. Raises `DohError` (a TransportError) when the
    server answers anything but 200 + ``application/dns-message``, TransportError when
    it cannot be reached within `timeout`, RemoteProtocolError for a broken HTTP answer.
    The response is not checked against the query: that is the caller's DNS layer."""
    if len(wire_query) > MAX_DNS_MESSAGE:
        raise ConfigError(f"a DNS query of {len(wire_query)} bytes is too large")
    host, port, path, host_header = _split_url(base_url)
    peer = f"the DoH server at {base_url}"
    request = (f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: trionet\r\n"
               f"Content-Type: {DOH_CONTENT_TYPE}\r\nAccept: {DOH_CONTENT_TYPE}\r\n"
               f"Content-Length: {len(wire_query)}\r\nConnection: close\r\n\r\n").encode() + bytes(wire_query)
    stream: Any = None
    try:
        with trio.fail_after(timeout):
            stream = await node_or_stream_opener.open_tcp_stream(host, port)
            await stream.send_all(request)
            status, headers, rest = await read_response_head(stream, peer)
            body = await _read_body(stream, headers, rest, peer)
    except trio.TooSlowError:
        raise TransportError(f"{peer} did not answer within {timeout:g} s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise TransportError(f"{peer}: connection failed: {exc}") from exc
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)
    if status != 200:
        raise DohError(f"{peer} answered HTTP {status}: {body[:100].decode('latin-1', 'replace').strip()!r}")
    content_type = headers.get("content-type", "")
    if content_type != DOH_CONTENT_TYPE:
        raise DohError(f"{peer} answered with Content-Type {content_type[:60]!r}, not {DOH_CONTENT_TYPE}")
    return body
