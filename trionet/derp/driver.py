"""The trio driver for one DERP region: connect, log in, pump frames, reconnect.

It owns the link and the timers and nothing else; every protocol decision is
``client.DerpClient``'s, and how bytes reach the server (TCP, TLS, the HTTP
upgrade or a WebSocket) is ``transport``'s. One ``DerpConnection`` = one
server (one region's first node), kept up by ``run()`` until cancelled.

TLS is verified against the system store or ``ca_file``; SNI and the
certificate name are the DERP ``HostName`` (unless the node's ``cert_name``
names another, or pins the certificate: transport.tls_context); the TCP
connection goes to ``connect_ip`` (DERPNode.IPv4/IPv6) when given. Plain HTTP only for an
``http://`` URL, i.e. when the caller asks for it.

Hot path: the reading task parses frames and calls ``on_packet(src, data)``
synchronously, without hopping to another task. Sends are non-blocking:
``send_packet_nowait`` queues a frame in the client and wakes the writer
task, which writes everything queued in one ``send_all``.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import ssl
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
import trio_websocket

from trionet.backoff import backoff_delay
from trionet.derp import client as dc
from trionet.derp import frames, transport
from trionet.derp.transport import Link
from trionet.errors import ConfigError, RemoteProtocolError, TransportError
from trionet.exc_groups import first_leaf
from trionet.netaddr import join_host_port
from trionet.rejects import RejectLog

__all__ = ["DerpConnection", "backoff_delay", "derp_url_for_node"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0  # TCP + TLS + upgrade; the login has its own deadline in DerpClient
# A link that stayed up this long and then broke is redialled at once (tailscaled
# waits ~10 ms: util/backoff); backoff is for links that keep failing.
FAST_RETRY_AFTER_UP = 2.0
FAST_RETRY_JITTER = 0.05
MAX_QUEUED_BYTES = 2 << 20  # per connection; beyond it send_packet_nowait drops

OnPacket = Callable[[bytes, bytes], None]
OnEvent = Callable[[Any], None]

_RECOVERABLE: tuple[type[BaseException], ...] = (
    OSError,  # includes ssl.SSLError and socket errors
    TransportError,
    RemoteProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    trio_websocket.ConnectionClosed,
    trio_websocket.HandshakeError,
)


def _describe(exc: BaseException) -> str:
    """One line: the exception and its causes (TLS errors come wrapped in BrokenResourceError)."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 3:
        parts.append(f"{type(seen).__name__}: {seen}" if str(seen) else type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


# ------------------------------------------------------------------ where to


def _field(node: Any, name: str) -> Any:
    if isinstance(node, Mapping):
        return node.get(name)
    return getattr(node, name, None)


def derp_url_for_node(node: Any, login_server_url: str) -> tuple[str, str | None]:
    """(DERP URL, address to connect to or None) for a DERPNode (dict or attrs object).

    Tailscale dials ``https://HostName[:DERPPort]/derp`` (DERPPort 0 = 443),
    to ``IPv4``/``IPv6`` when set (src: derphttp_client.go, urlString,
    dialNode). When the node gives no usable host, or no port for the login
    server's own host, the login server's host and port are used: that is
    Headscale's embedded DERP, which lives on the control listener
    (derp_server.go, GenerateRegion). The scheme is ``http`` only when the
    login server itself is plain ``http://`` and the DERP node is that same
    listener: the caller asked for plain HTTP by configuring it.
    """
    login = urllib.parse.urlsplit(login_server_url)
    if login.scheme not in ("http", "https") or not login.hostname:
        raise ConfigError(f"login server URL {login_server_url!r} is not http(s)://host[:port]")
    login_port = login.port or (443 if login.scheme == "https" else 80)
    host = str(_field(node, "HostName") or "").strip()
    try:
        port = int(_field(node, "DERPPort") or 0)
    except (TypeError, ValueError):
        port = 0
    if not host:
        host = login.hostname
    if port <= 0 or port > 0xFFFF:
        port = login_port if host == login.hostname else 443
    same_listener = host == login.hostname and port == login_port
    scheme = "http" if (login.scheme == "http" and same_listener) else "https"
    url = f"{scheme}://{join_host_port(host, port, 443 if scheme == 'https' else 80)}/derp"
    ip: str | None = None
    for name in ("IPv4", "IPv6"):
        value = str(_field(node, name) or "").strip()
        if value and value != "none":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                continue
            ip = value
            break
    return url, ip


# -------------------------------------------------------------------- driver


class DerpConnection:
    """A DERP link to one server, reconnecting forever inside ``run()``."""

    def __init__(
        self,
        url: str | tuple[str, int, bool, str | None],
        node_private: bytes,
        *,
        ca_file: str | None = None,
        connect_ip: str | None = None,
        transport: str = "http",
        preferred: bool = False,
        on_packet: OnPacket | None = None,
        on_event: OnEvent | None = None,
        on_batch_end: Callable[[], None] | None = None,
        path: str = "/derp",
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        connect_timeout: float = CONNECT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        cert_name: str | None = None,
        backoff: Callable[[int], float] = backoff_delay,
        open_stream: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        if isinstance(url, tuple):
            host, port, tls, ip = url
            connect_ip = connect_ip or ip
            scheme = "https" if tls else "http"
        else:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
                raise ConfigError(f"DERP URL {url!r} is not http(s)://host[:port]/derp")
            tls = parts.scheme in ("https", "wss")
            scheme = "https" if tls else "http"
            host = parts.hostname
            port = parts.port or (443 if tls else 80)
            path = parts.path or path
            if parts.scheme in ("ws", "wss"):
                transport = "websocket"
        if transport not in ("http", "websocket"):
            raise ConfigError(f"DERP transport must be 'http' or 'websocket', not {transport!r}")
        if len(node_private) != frames.KEY_LEN:
            raise ConfigError("the DERP node private key must be 32 raw bytes")
        self.host = host
        self.port = port
        self.tls = tls
        self.connect_ip = connect_ip
        self.path = path
        self.transport = transport
        self.url = f"{scheme}://{self._host_header()}{path}"
        self.node_private = node_private
        self.ca_file = ca_file
        self._ssl_context = ssl_context
        self.cert_name = cert_name or None
        self._backoff = backoff
        self._open_stream_hook = open_stream
        self.preferred = preferred
        self.on_packet = on_packet
        self.on_event = on_event
        self.on_batch_end = on_batch_end  # after the packets of one read: flush per-read batches
        self._up_since: float | None = None
        self.last_received: float | None = None  # when the server last sent us anything (netcheck asks)
        self.down_since: float | None = None  # not connected since then (from the first dial); None while up
        self.max_queued_bytes = max_queued_bytes
        self.connect_timeout = connect_timeout
        self.client: dc.DerpClient | None = None
        self.node_public = bytes(dc.DerpClient(node_private).node_public)
        self.server_public: bytes | None = None
        self.health = ""
        self.stats: Counter[str] = Counter()
        self.rejects = RejectLog(log, "derp", self.stats)
        self._closed_client_stats: Counter[str] = Counter()
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._connected = trio.Event()
        self._pings: dict[bytes, tuple[trio.Event, list[float]]] = {}
        self._restart_delay: float | None = None
        self._restart_until = 0.0
        self._failures = 0
        self._cancel: trio.CancelScope | None = None
        self.last_error = ""

    # ------------------------------------------------------------ public API
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def send_packet_nowait(self, dst: bytes, data: bytes | bytearray | memoryview) -> bool:
        """Queue one packet for ``dst`` (a node public key); False = dropped (counted)."""
        client = self.client
        if client is None or client.state is dc.State.CLOSED:
            self.stats["send_dropped_not_connected"] += 1
            return False
        if client.pending_bytes > self.max_queued_bytes:
            self.stats["send_dropped_queue_full"] += 1
            return False
        client.send_packet(dst, data)
        self._wake.set()
        return True

    async def send_packet(self, dst: bytes, data: bytes | bytearray | memoryview) -> None:
        """Like ``send_packet_nowait`` but waits for a link and for queue room instead of dropping."""
        while True:
            client = self.client
            if client is None or client.state is dc.State.CLOSED:
                await self._connected.wait()
                await trio.lowlevel.checkpoint()
                continue
            if client.pending_bytes > self.max_queued_bytes:
                await self._drained.wait()
                continue
            client.send_packet(dst, data)
            self._wake.set()
            await trio.lowlevel.checkpoint()
            return

    def set_preferred(self, preferred: bool) -> None:
        """Tell the server (now, and on every reconnect) whether this is our home region."""
        self.preferred = preferred
        if self.client is not None and self.client.state is not dc.State.CLOSED:
            self.client.note_preferred(preferred)
            self._wake.set()

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of a DERP Ping to the server; TooSlowError on timeout."""
        await self._connected.wait()
        client = self.client
        assert client is not None
        done = trio.Event()
        result: list[float] = []
        data = client.send_ping(trio.current_time())
        self._pings[data] = (done, result)
        self._wake.set()
        try:
            with trio.fail_after(timeout):
                await done.wait()
        finally:
            self._pings.pop(data, None)
        if not result:
            raise TransportError("the DERP link went down before the Pong arrived")
        return result[0]

    def close(self) -> None:
        """Stop ``run()`` (it returns); the same as cancelling its nursery."""
        if self._cancel is not None:
            self._cancel.cancel()

    def statistics(self) -> dict[str, Any]:
        totals = Counter(self._closed_client_stats)
        if self.client is not None:
            totals.update({k: v for k, v in self.client.stats.items()})
        return {
            "url": self.url,
            "transport": self.transport,
            "connected": self.connected,
            "preferred": self.preferred,
            "health": self.health,
            "last_error": self.last_error,
            "queued_bytes": self.client.pending_bytes if self.client else 0,
            **self.stats,
            **totals,
        }

    # --------------------------------------------------------------- the loop
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, pump, and reconnect with backoff until cancelled or ``close()``d."""
        with trio.CancelScope() as scope:
            self._cancel = scope
            self.down_since = trio.current_time()
            task_status.started()
            while True:
                reason = await self._one_connection()
                self.last_error = reason
                now = trio.current_time()
                up_for = now - self._up_since if self._up_since is not None else 0.0
                self._up_since = None
                if self._restart_delay is not None and now < self._restart_until:
                    delay = self._restart_delay + random.uniform(0, 0.1 * max(self._restart_delay, 0.1))
                elif up_for >= FAST_RETRY_AFTER_UP:
                    delay = random.uniform(0, FAST_RETRY_JITTER)
                    self.stats["fast_reconnects"] += 1
                else:
                    self._restart_delay = None
                    delay = self._backoff(self._failures)
                    self._failures += 1
                self.stats["reconnects"] += 1
                log.info("DERP %s: %s; reconnecting in %.1f s", self.url, reason, delay)
                await trio.sleep(delay)

    async def _one_connection(self) -> str:
        self.stats["connect_attempts"] += 1
        reason = "closed by the server"
        try:
            await self._connect_and_pump()
        except* _RECOVERABLE as group:
            exc = first_leaf(group)
            reason = _describe(exc)
            if isinstance(exc, RemoteProtocolError):
                self.stats["closed_protocol_error"] += 1
            else:
                self.stats["closed_transport_error"] += 1
        finally:
            was_connected = self._connected.is_set()
            if self.client is not None:
                self.client.close()
                self._closed_client_stats.update(dict(self.client.stats))
                self.client = None
            if was_connected:  # a fresh event for the next link; an unset one keeps its waiters
                self._connected = trio.Event()
            self._drained.set()
            self._drained = trio.Event()
            for done, _ in self._pings.values():
                done.set()
        if was_connected:
            self.down_since = trio.current_time()
            self._emit(dc.Disconnected(reason))
        return reason

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = transport.tls_context(self.ca_file, self.host, self.cert_name)
        return self._ssl_context

    def _host_header(self) -> str:
        return join_host_port(self.host, self.port, 443 if self.tls else 80)

    async def _open_stream(self) -> trio.abc.Stream:
        if self._open_stream_hook is not None:
            return await self._open_stream_hook()
        return await transport.open_stream(self.host, self.port, connect_ip=self.connect_ip,
                                           ssl_context=self._ssl() if self.tls else None,
                                           cert_name=self.cert_name)

    async def _connect_and_pump(self) -> None:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(self.connect_timeout):
                stream = await self._open_stream()
                try:
                    link: Link
                    if self.transport == "websocket":
                        link = await nursery.start(transport.host_websocket, stream, self._host_header(),
                                                   self.path, self.url)
                        leftover = b""
                    else:
                        link, leftover = await transport.open_http_link(stream, self._host_header(),
                                                                        self.path, self.url)
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
            client = dc.DerpClient(self.node_private, preferred=self.preferred, now=trio.current_time())
            self.client = client
            try:
                nursery.start_soon(self._writer, link, client)
                nursery.start_soon(self._watchdog, client)
                if leftover:
                    self._receive(client, leftover)
                await self._reader(link, client)
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await link.aclose()

    async def _writer(self, link: Link, client: dc.DerpClient) -> None:
        while True:
            self._wake = trio.Event()
            data = client.data_to_send()
            if data:
                await link.send_all(data)
                self.stats["writes"] += 1
                if client.pending_bytes <= self.max_queued_bytes // 2:
                    self._drained.set()
                    self._drained = trio.Event()
                continue
            await self._wake.wait()

    async def _reader(self, link: Link, client: dc.DerpClient) -> None:
        receive = link.receive_some
        wake = self._wake_writer
        while True:
            data = await receive()
            if not data:
                raise TransportError("the DERP server closed the connection")
            self._receive(client, data)
            if client.pending_bytes:  # a Pong to send
                wake()

    def _wake_writer(self) -> None:
        self._wake.set()

    async def _watchdog(self, client: dc.DerpClient) -> None:
        """Ends the link when the login stalls or the server goes silent (no per-read timer)."""
        while True:
            await trio.sleep_until(client.next_deadline())
            client.check_timers(trio.current_time())  # raises TransportError when dead

    def _receive(self, client: dc.DerpClient, data: bytes) -> None:
        """Bytes from the server: frames parsed, packets delivered. A protocol error
        ends this link (and the driver redials); nothing here raises anything else."""
        now = self.last_received = trio.current_time()
        try:
            events = client.receive_data(data, now)
        except dc.DerpProtocolError as exc:
            self._deliver(client, exc.events)
            raise
        except Exception as exc:  # a bug in the frame parser: this stream can't be trusted now
            self.rejects.internal_error("frames", exc)
            raise RemoteProtocolError(f"DERP frames from {self.url} broke the parser: {exc!r}") from exc
        if events:
            self._deliver(client, events)
            if self.on_batch_end is not None:
                try:
                    self.on_batch_end()
                except Exception as exc:
                    self.rejects.internal_error("batch_end", exc)

    def _deliver(self, client: dc.DerpClient, events: list[dc.Event]) -> None:
        on_packet = self.on_packet
        for ev in events:
            if type(ev) is dc.Packet:
                if on_packet is not None:
                    try:
                        on_packet(ev.src, ev.data)
                    except Exception as exc:
                        self.rejects.internal_error("packet", exc)
                continue
            if isinstance(ev, dc.Connected):
                self.server_public = ev.server_public
                self._failures = 0
                self._up_since = trio.current_time()
                self._restart_delay = None
                self.down_since = None
                self._connected.set()
                self.stats["connects"] += 1
                log.info("DERP %s: connected as %s", self.url, self.node_public.hex()[:16])
            elif isinstance(ev, dc.Health):
                self.health = ev.problem
            elif isinstance(ev, dc.Restarting):
                self._restart_delay = ev.reconnect_in
                self._restart_until = trio.current_time() + ev.try_for
            elif isinstance(ev, dc.PongReceived):
                waiter = self._pings.get(ev.data)
                if waiter is not None and ev.rtt is not None:
                    waiter[1].append(ev.rtt)
                    waiter[0].set()
            self._emit(ev)

    def _emit(self, ev: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(ev)
        except Exception as exc:
            self.rejects.internal_error("event", exc)
