"""DERP's transports: the byte streams DERP frames travel over, up to the first frame.

(src: tailscale/tailscale derp/derphttp/derphttp_client.go, websocket.go;
juanfont/headscale hscontrol/derp/server/derp_server.go, DERPHandler,
servePlain, serveWebsocket)

* ``open_stream``: TCP to the server (to ``connect_ip`` when given), then TLS
  when asked for, verified against the context's CA store; SNI and the
  certificate name are the DERP ``HostName``.
* ``open_http_link``: ``GET /derp`` with ``Upgrade: DERP``; the server answers
  ``101 Switching Protocols`` and starts DERP frames at once, possibly in the
  same TCP segment as the headers, so bytes after the blank line are handed
  back to be fed to the client.
* ``host_websocket``: ``GET /derp`` as a WebSocket with subprotocol ``derp``;
  DERP bytes travel in binary messages (Headscale >= 0.24 only).

Each gives a `Link`: ``receive_some()`` (b"" at the end), ``send_all``, ``aclose``.

A DERP node's ``CertName`` changes what its certificate must be, as tailscaled's
tlsClient reads it (derphttp_client.go; net/tlsdial SetConfigExpectedCert,
SetConfigExpectedCertHash): ``sha256-raw:<hex>`` pins the certificate itself (a
derper with an IP for a host name makes itself one: cmd/derper/cert.go), and
any other name is the one a CA-verified certificate must carry instead of the
host name. SNI stays the host name.

``https_latency`` is netcheck's probe when UDP is blocked: the time of one
``GET /derp/latency-check`` on a fresh TLS connection (netcheck.go,
measureHTTPSLatency).

TLS is our own `TlsStream`, the ssl module's SSLObject over memory BIOs on a
plain Trio stream, rather than trio.SSLStream: a DERP server writes about one
TLS record per packet and an SSLObject decrypts one record per read, so the
link wants every record already received in one receive; TlsStream can tell
when its incoming buffer is empty, which trio.SSLStream does not expose.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import ssl
from typing import Protocol

import trio
import trio_websocket

from trionet.derp import frames
from trionet.errors import RemoteProtocolError, TransportError
from trionet.exc_groups import first_leaf
from trionet.http1 import read_response_head

__all__ = ["Link", "StreamLink", "TlsStream", "WebSocketLink", "check_server_cert", "host_websocket",
           "https_latency", "open_http_link", "open_stream", "tls_context"]

READ_SIZE = 256 << 10
MAX_RESPONSE_HEAD = 16 << 10
WS_MAX_MESSAGE = 32 << 10  # coder/websocket's default read limit (32768) on the server side


class Link(Protocol):
    async def receive_some(self) -> bytes: ...
    async def send_all(self, data: bytes) -> None: ...
    async def aclose(self) -> None: ...


# ----------------------------------------------------------------------- TLS


class TlsStream(trio.abc.Stream):
    """A TLS client over any Trio stream. ``receive_some`` returns every record already
    received (up to `max_bytes`), not one per call. One task may receive while another
    sends; TLS bytes leave in the order they were made. A missing close_notify at EOF
    is taken as EOF (as trio.SSLStream's https_compatible=True)."""

    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext, server_hostname: str) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        self._send_lock = trio.Lock()  # the transport has one sender at a time
        self._eof = False
        self._closed = False

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """For what the handshake agreed (version(), cipher(), selected_alpn_protocol())."""
        return self._tls

    async def do_handshake(self) -> None:
        tls = self._tls
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise TransportError("the server closed the connection during the TLS handshake") from None
            except ssl.SSLError as exc:  # a certificate that does not verify, no common cipher, ...
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    await self._flush()  # our alert, so the server knows why
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
        await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")
        size = READ_SIZE if max_bytes is None else max_bytes
        read = self._tls.read
        while True:
            chunks: list[bytes] = []
            got = 0
            try:
                while got < size:  # one record per read, until none is whole
                    chunk = read(size - got)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
            except ssl.SSLWantReadError:  # (once per call: cheaper than asking before each record)
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or EOF without it
                self._eof = True
            except ssl.SSLError as exc:  # a record that does not decrypt, an alert: this stream is over
                raise trio.BrokenResourceError(f"TLS: {exc}") from exc
            if self._outgoing.pending and not self._eof:  # what reading made (a TLS 1.3 KeyUpdate
                await self._flush()  # reply); at EOF only an alert for a peer that is gone
            if chunks:
                return b"".join(chunks)
            if self._eof:
                return b""
            if not await self._fill():
                self._eof = True  # the next read raises SSLEOFError, or returns the last bytes

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")
        view = memoryview(data)
        try:
            while view:
                view = view[self._tls.write(view):]
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Sends close_notify if it can (without waiting for the server's), then closes."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self._tls.unwrap()
            except ssl.SSLError:  # SSLWantReadError: ours is written; or the session was already broken
                pass
            if self._outgoing.pending:
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self.transport.aclose()

    async def _fill(self) -> bool:
        """More bytes from the transport into the TLS object; False at EOF."""
        data = await self.transport.receive_some(READ_SIZE)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def _flush(self) -> None:
        # Taken from the BIO under the lock, so two flushes cannot reorder TLS records.
        async with self._send_lock:
            out = self._outgoing.read()
            if out:
                await self.transport.send_all(out)


def tls_context(ca_file: str | None, host: str, cert_name: str | None) -> ssl.SSLContext:
    """The client context for a DERP node. With a CertName other than the host, the name
    check (and for a pinned certificate, the chain check too) moves to `check_server_cert`."""
    if cert_name and cert_name.startswith("sha256-raw:"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the certificate is pinned instead
    else:
        ctx = ssl.create_default_context(cafile=ca_file)
        if cert_name and cert_name != host:
            ctx.check_hostname = False  # the chain is still verified; the name is CertName's
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _names_of(cert: object) -> tuple[list[str], list[str]]:
    from cryptography import x509

    assert isinstance(cert, x509.Certificate)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return ([str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
            [name.lower() for name in san.get_values_for_type(x509.DNSName)])


def _name_matches(name: str, ips: list[str], dns_names: list[str]) -> bool:
    try:
        return str(ipaddress.ip_address(name)) in ips
    except ValueError:
        pass
    name = name.lower().rstrip(".")
    for pattern in dns_names:
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name and name.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def check_server_cert(der: bytes | None, host: str, cert_name: str | None,
                      now: datetime.datetime | None = None) -> None:
    """After a handshake made with `tls_context`: raises TransportError unless the server's
    certificate is what the node's CertName asks for (nothing to check without one)."""
    from cryptography import x509

    if not cert_name or cert_name == host:
        return
    if der is None:
        raise TransportError("the DERP server presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    pin = cert_name.removeprefix("sha256-raw:")
    if pin != cert_name:
        if hashlib.sha256(der).hexdigest() != pin.strip().lower():
            raise TransportError("the DERP server's certificate is not the one its CertName pins")
        name = host  # tlsdial checks the dialled name too, when there is one
        when = now or datetime.datetime.now(datetime.UTC)
        if when < cert.not_valid_before_utc or when > cert.not_valid_after_utc:
            raise TransportError(f"the DERP server's pinned certificate is not valid now "
                                 f"({cert.not_valid_before_utc} to {cert.not_valid_after_utc})")
    else:
        name = cert_name
    ips, dns_names = _names_of(cert)
    if not _name_matches(name, ips, dns_names):
        raise TransportError(f"the DERP server's certificate is not valid for {name!r}")


# --------------------------------------------------------------------- links


class StreamLink:
    """DERP bytes straight on a stream (after the HTTP upgrade), TLS or plain."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def receive_some(self) -> bytes:
        return bytes(await self.stream.receive_some(READ_SIZE))

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


class WebSocketLink:
    """DERP bytes in WebSocket binary messages."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def receive_some(self) -> bytes:
        try:
            msg = await self.ws.get_message()
        except trio_websocket.ConnectionClosed:
            return b""
        if isinstance(msg, str):
            raise RemoteProtocolError("DERP over WebSocket got a text message")
        return bytes(msg)

    async def send_all(self, data: bytes) -> None:
        # Headscale reads with coder/websocket's default 32 KiB read limit and closes the
        # connection on a bigger message (measured against 0.29.2: 32767 bytes pass, 32837
        # do not). Its NetConn joins messages into one byte stream, so split freely.
        view = memoryview(data)
        for i in range(0, len(view), WS_MAX_MESSAGE):
            await self.ws.send_message(bytes(view[i : i + WS_MAX_MESSAGE]))

    async def aclose(self) -> None:
        await self.ws.aclose()


# ------------------------------------------------------------------- opening


async def open_stream(host: str, port: int, *, connect_ip: str | None = None,
                      ssl_context: ssl.SSLContext | None = None, cert_name: str | None = None) -> trio.abc.Stream:
    """TCP to `connect_ip` (or `host`), with TLS for `host` when a context is given (made by
    `tls_context` when the node has a `cert_name`)."""
    tcp = await trio.open_tcp_stream(connect_ip or host, port)
    if ssl_context is None:
        return tcp
    stream = TlsStream(tcp, ssl_context, server_hostname=host)
    try:
        await stream.do_handshake()
        check_server_cert(stream.ssl_object.getpeercert(binary_form=True), host, cert_name)
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


async def https_latency(host: str, port: int, *, connect_ip: str | None = None,
                        ssl_context: ssl.SSLContext | None = None, cert_name: str | None = None) -> float:
    """Seconds from sending ``GET /derp/latency-check`` to its answer's head, on a connection
    made for it (its TCP and TLS set-up are not timed). An answer above 299 raises
    TransportError: a proxy in the way, not a DERP server. Plain HTTP without a context."""
    stream = await open_stream(host, port, connect_ip=connect_ip, ssl_context=ssl_context, cert_name=cert_name)
    try:
        # The Host is the bare host name, as Go's client sends for "https://<HostName>/...".
        request = (f"GET /derp/latency-check HTTP/1.1\r\nHost: {host}\r\nUser-Agent: trionet\r\n"
                   "Connection: close\r\n\r\n").encode()
        started = trio.current_time()
        await stream.send_all(request)
        status, _, _ = await read_response_head(stream, f"DERP server {host}", max_size=MAX_RESPONSE_HEAD)
        took = trio.current_time() - started
    finally:
        await trio.aclose_forcefully(stream)
    if status > 299:
        raise TransportError(f"DERP latency check at {host} answered HTTP {status}")
    return took


async def open_http_link(stream: trio.abc.Stream, host: str, path: str, peer: str) -> tuple[StreamLink, bytes]:
    """The ``Upgrade: DERP`` request and its 101; (the link, DERP bytes already received).
    `host` is the Host header's value, `peer` names the server in errors."""
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: trionet\r\n"
        "Connection: Upgrade\r\n"
        "Upgrade: DERP\r\n"
        "\r\n"
    )
    await stream.send_all(request.encode())
    status, headers, rest = await read_response_head(stream, f"DERP server {peer}", max_size=MAX_RESPONSE_HEAD)
    if status != 101:
        body = rest[:200].decode("utf-8", "replace")
        raise TransportError(f"DERP upgrade refused by {peer}: HTTP {status} {body!r}")
    if headers.get("upgrade", "").lower() != "derp":
        raise RemoteProtocolError(f"DERP upgrade answered with Upgrade: {headers.get('upgrade')!r}")
    return StreamLink(stream), rest


async def host_websocket(stream: trio.abc.Stream, host: str, path: str, peer: str, *,
                         task_status: trio.TaskStatus[Link] = trio.TASK_STATUS_IGNORED) -> None:
    """Runs trio-websocket's reader task for a DERP WebSocket; starts with its Link.
    Its failures (h11, wsproto, groups of them) come out as one TransportError."""
    try:
        async with trio.open_nursery() as ws_nursery:
            ws = await trio_websocket.wrap_client_stream(
                ws_nursery,
                stream,  # type: ignore[arg-type]
                host,
                path,
                subprotocols=["derp"],
                message_queue_size=64,
                max_message_size=frames.MAX_FRAME_LEN + frames.HEADER_LEN,
            )
            if ws.subprotocol != "derp":
                await ws.aclose()
                raise TransportError(f"DERP WebSocket at {peer} did not accept subprotocol 'derp'")
            task_status.started(WebSocketLink(ws))
            await trio.sleep_forever()
    except Exception as exc:  # a group of plain Exceptions; Cancelled is a BaseException
        leaf = first_leaf(exc)
        if isinstance(leaf, TransportError):
            raise leaf from exc
        raise TransportError(f"DERP WebSocket to {peer} failed: {type(leaf).__name__}: {leaf}") from exc
