"""The TS2021 control client: server key, /ts2021 upgrade, HTTP/2 over Noise.

    async with open_session(config, state) as conn:
        await conn.register()
        async for netmap, change in conn.map_updates(magic): ...
        await conn.lite_update(endpoints, types, home_region)

Facts (protocol-notes §2-§5, checked in tailscale control/ts2021,
controlhttp, controlclient/direct.go and headscale noise.go/poll.go):
`GET /key?v=CAPVER`; `POST /ts2021` with `Upgrade: tailscale-control-protocol`
and the base64 initiation in `X-Tailscale-Handshake`; the 101 is followed by
the 51-byte response; the first plaintext may be the early payload
("\xff\xff\xffTS" + BE32 length + JSON); then HTTP/2 with prior knowledge.
Map messages are LE32-length-prefixed, zstd-compressed when asked.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import platform
import ssl
import struct
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import h2.config
import h2.connection
import h2.events
import trio
import zstandard

from trionet import __version__, proto
from trionet.clock import wall
from trionet.control.login import check_login_url
from trionet.control.netmap import Netmap, NetmapChange
from trionet.errors import AuthError, ConfigError, ControlError, RemoteProtocolError, TransportError, TrionetError
from trionet.http1 import read_response_head
from trionet.keys import ZERO_NODE_KEY, format_key, parse_key, public_of
from trionet.noise.core import RESPONSE_LEN, Initiator
from trionet.noise.stream import NoiseStream

log = logging.getLogger(__name__)

# 113 is Headscale 0.29's minimum (checked at the Noise handshake); 0.23 takes
# >= 61. 116 also implies HomeDERP (cap 111) and nil AllowedIPs = Addresses
# (cap 112), and stays below peer-relay (121) and TSMP disco adverts (144).
CAPVER = 116
EARLY_MAGIC = b"\xff\xff\xffTS"
CONNECT_TIMEOUT = 15.0
MAX_MAP_MESSAGE = 64 << 20
# A Followup register waits on the server for an admin, minutes on end, so it has
# no timeout of ours; an HTTP/2 PING this often, answered within LIVENESS_TIMEOUT,
# proves the connection under it alive (a dead path would otherwise wait forever).
LIVENESS_INTERVAL = 30.0
LIVENESS_TIMEOUT = 15.0


class NodeKeyExpired(AuthError):
    """The server says our node key has expired; a renewal with an auth key can fix it."""


class StreamEnded(TransportError):
    """The server ended the map stream; reconnect."""


class LoginFollowupFailed(ControlError):
    """The server answered a login Followup with an HTTP error (Headscale 0.26 once it
    forgot the registration: 404); a fresh registration gets a new login URL."""


def _split_server(url: str) -> tuple[str, str, int, bool]:
    parts = urllib.parse.urlsplit(url)
    tls = parts.scheme == "https"
    if parts.hostname is None:
        raise ConfigError(f"login server {url!r} has no host")
    return parts.netloc, parts.hostname, parts.port or (443 if tls else 80), tls


async def _open_stream(url: str, ca_file: str | None) -> tuple[trio.abc.Stream, str]:
    netloc, host, port, tls = _split_server(url)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            tcp: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            if tls:
                ctx = ssl.create_default_context(cafile=ca_file)
                ctx.set_alpn_protocols(["http/1.1"])
                stream = trio.SSLStream(tcp, ctx, server_hostname=host)
                await stream.do_handshake()
                return stream, netloc
            return tcp, netloc
    except trio.TooSlowError as exc:
        raise TransportError(f"cannot reach login server {url}: no answer in {CONNECT_TIMEOUT:.0f} s") from exc
    except ssl.SSLError as exc:
        raise TransportError(f"TLS to login server {url} failed: {exc.reason or exc}") from exc
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ or exc
        raise TransportError(f"TLS to login server {url} failed: {cause}") from exc
    except OSError as exc:
        raise TransportError(f"cannot reach login server {url}: {exc.strerror or exc}") from exc


async def fetch_server_key(url: str, ca_file: str | None) -> bytes:
    stream, netloc = await _open_stream(url, ca_file)
    try:
        await stream.send_all(f"GET /key?v={CAPVER} HTTP/1.1\r\nHost: {netloc}\r\n"
                              f"User-Agent: trionet/{__version__}\r\nConnection: close\r\n\r\n".encode())
        with trio.fail_after(CONNECT_TIMEOUT):
            status, headers, body = await read_response_head(stream, "the login server", receive_size=65536)
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                body += data
    except trio.TooSlowError as exc:
        raise TransportError(f"login server {url} did not answer /key") from exc
    finally:
        await trio.aclose_forcefully(stream)
    if status != 200:
        raise ControlError(f"{url}/key answered HTTP {status}: is this a Headscale/Tailscale server?")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    try:
        key = parse_key(json.loads(body)["publicKey"], "mkey:")
    except (ValueError, KeyError, TypeError) as exc:
        raise ControlError(f"{url}/key gave no usable server key") from exc
    log.debug("login server %s: server key %s", url, format_key("mkey:", key))
    return key


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2:]
    return out


class H2Connection:
    """A small HTTP/2 client on h2: one reader task, many concurrent requests."""

    def __init__(self, stream: trio.abc.Stream, authority: str) -> None:
        self.stream = stream
        self.authority = authority
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.lock = trio.Lock()
        self.responses: dict[int, trio.MemorySendChannel[Any]] = {}
        self.flow = trio.Event()
        self.closed: BaseException | None = None
        self.pings: dict[bytes, trio.Event] = {}  # outstanding PINGs by their opaque data

    async def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def start(self) -> None:
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(16 << 20)
        await self._flush()

    async def reader(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise TransportError("control connection closed")
                try:
                    events = self.h2.receive_data(data)
                except Exception as exc:  # h2's protocol errors
                    raise RemoteProtocolError(f"HTTP/2 error from control: {exc}") from exc
                for ev in events:
                    self._dispatch(ev)
                async with self.lock:
                    await self._flush()
                self.flow.set()
                self.flow = trio.Event()
        except BaseException as exc:
            self.closed = exc
            for ch in self.responses.values():
                ch.send_nowait(("error", exc))
            raise

    def _dispatch(self, ev: Any) -> None:
        sid = getattr(ev, "stream_id", None)
        ch = self.responses.get(sid) if sid is not None else None
        if isinstance(ev, h2.events.ResponseReceived) and ch:
            headers: dict[Any, Any] = dict(ev.headers)
            status = int(headers.get(":status", "0"))
            ch.send_nowait(("status", status))
        elif isinstance(ev, h2.events.DataReceived):
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if ch:
                ch.send_nowait(("data", ev.data))
        elif isinstance(ev, h2.events.StreamEnded) and ch:
            ch.send_nowait(("end", None))
        elif isinstance(ev, h2.events.PingAckReceived):
            acked = self.pings.get(bytes(ev.ping_data or b""))
            if acked is not None:
                acked.set()
        elif isinstance(ev, h2.events.StreamReset) and ch:
            ch.send_nowait(("error", TransportError(f"control reset the request (code {ev.error_code})")))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            exc = TransportError(f"control closed the HTTP/2 connection (code {ev.error_code})")
            for c in self.responses.values():
                c.send_nowait(("error", exc))

    @asynccontextmanager
    async def request(self, method: str, path: str, body: bytes) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
        if self.closed is not None:
            raise TransportError(f"control connection is closed: {self.closed}")
        send, recv = trio.open_memory_channel[Any](1 << 16)
        async with self.lock:
            sid = self.h2.get_next_available_stream_id()
            self.responses[sid] = send
            self.h2.send_headers(sid, [(":method", method), (":path", path), (":scheme", "https"),
                                       (":authority", self.authority), ("content-type", "application/json"),
                                       ("content-length", str(len(body)))])
            await self._flush()
        view = memoryview(body)
        while view:
            async with self.lock:
                window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                if window > 0:
                    chunk = view[:window]
                    view = view[len(chunk):]
                    self.h2.send_data(sid, bytes(chunk), end_stream=not view)
                    await self._flush()
                    continue
            await self.flow.wait()
        if not body:
            async with self.lock:
                self.h2.end_stream(sid)
                await self._flush()
        try:
            yield recv
        finally:
            self.responses.pop(sid, None)

    async def ping(self) -> None:
        """An HTTP/2 PING; returns when the server has acknowledged it."""
        if self.closed is not None:
            raise TransportError(f"control connection is closed: {self.closed}")
        opaque = os.urandom(8)
        acked = self.pings[opaque] = trio.Event()
        try:
            async with self.lock:
                self.h2.ping(opaque)
                await self._flush()
            await acked.wait()
        finally:
            del self.pings[opaque]

    async def simple(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        async with self.request(method, path, body) as events:
            status, out = 0, b""
            async for kind, value in events:
                if kind == "status":
                    status = value
                elif kind == "data":
                    out += value
                elif kind == "end":
                    return status, out
                else:
                    raise value
        raise TransportError("control request ended without an answer")


class ControlConnection:
    def __init__(self, config: Any, state: Any, h2conn: H2Connection) -> None:
        self.config = config
        self.state = state
        self.h2 = h2conn
        self.disco_key = format_key("discokey:", state.disco_public)
        self.netmap = Netmap()
        self.map_messages = 0
        # Called with each MapResponse.PingRequest, keepalives included (tailscaled's
        # direct.go looks at it before anything else in a message).
        self.on_ping_request: Callable[[Any], None] | None = None
        # Hostinfo fields the node adds (RoutableIPs, Services): see ControlSession.
        self.hostinfo_extra: Callable[[], dict[str, Any]] | None = None

    def __repr__(self) -> str:  # public keys only: the auth key and private keys stay out of logs
        return f"<ControlConnection {self.config.login_server} as {self.node_key}>"

    @property
    def node_key(self) -> str:
        return format_key("nodekey:", self.state.node_public)

    def hostinfo(self, home_region: int = 0, net_info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Our Hostinfo; NetInfo carries the home region (PreferredDERP, which Headscale
        hands our peers as our DERP region) and netcheck's latencies when given."""
        info: dict[str, Any] = {"Hostname": self.config.hostname, "OS": "linux",
                                "IPNVersion": f"trionet-{__version__}", "GoArch": platform.machine(),
                                "NetInfo": {**(net_info or {}), "PreferredDERP": home_region}}
        tags = getattr(self.config, "advertise_tags", ())
        if tags:  # tailscaled: Hostinfo.RequestTags = prefs.AdvertiseTags, in register and map requests
            info["RequestTags"] = list(tags)
        if self.hostinfo_extra is not None:
            info.update(self.hostinfo_extra())
        return info

    async def register(self, renew_to: bytes | None = None, followup: str = "") -> proto.RegisterResponse:
        """Register our node key; with `renew_to`, ask the server to replace it by that key.

        A renewal names the current key as OldNodeKey (tailscaled's doLogin with
        regen). Headscale 0.23 answers a key refresh without MachineAuthorized,
        so for a renewal "no error, no AuthURL, not expired" is success.

        Without an auth key the server may answer with an AuthURL: an admin has to
        approve this node. That response is returned as it is (nothing committed);
        the caller shows the URL and asks again with `followup` set to it, which
        the server holds until the login is approved, rejected or expired
        (Headscale 0.23 holds it 5 s). A Followup has no timeout of ours (see
        LIVENESS_INTERVAL); an HTTP error to one is LoginFollowupFailed.
        """
        current = self.state.node_public
        new = public_of(renew_to) if renew_to is not None else current
        req: dict[str, Any] = {"Version": CAPVER, "NodeKey": format_key("nodekey:", new),
                               "OldNodeKey": format_key("nodekey:", current) if renew_to else ZERO_NODE_KEY,
                               "Hostinfo": self.hostinfo()}
        if self.config.auth_key:
            req["Auth"] = {"AuthKey": self.config.auth_key}
        if followup:
            req["Followup"] = followup
        log.debug("register: node key %s%s, auth key %s%s", req["NodeKey"],
                  f" (renewing {req['OldNodeKey']})" if renew_to else "",
                  "given" if self.config.auth_key else "none", f", following up {followup}" if followup else "")
        body_out = json.dumps(req).encode()
        if followup:
            status, body = await self._post_while_alive("/machine/register", body_out)
        else:
            status, body = await self.h2.simple("POST", "/machine/register", body_out)
        # The server may quote what we sent; whatever it says, the auth key is not repeated.
        text = _scrub(body.decode(errors="replace").strip(), self.config.auth_key)
        log.debug("register: HTTP %d, %d bytes", status, len(body))
        refused = ("renew the node key" if renew_to else "accept the auth key" if self.config.auth_key
                   else "register this node")
        if followup and status != 200:
            raise LoginFollowupFailed(f"the login server answered the login follow-up with HTTP {status}: "
                                      f"{_reason(text) or text[:200]}")
        if status == 401:
            raise AuthError(f"the login server did not {refused}: {_reason(text) or 'HTTP 401'}")
        if status != 200:
            if "key" in text.lower() or "auth" in text.lower():
                raise AuthError(f"the login server did not {refused}: {text[:200]}")
            raise ControlError(f"register failed: HTTP {status}: {text[:200]}")
        resp: proto.RegisterResponse = proto.loads(body, proto.RegisterResponse)
        log.debug("register: authorized %s, node key expired %s", resp.MachineAuthorized, resp.NodeKeyExpired)
        if resp.Error:
            error = _scrub(resp.Error, self.config.auth_key)
            if "requested tags" in error:  # Headscale >= 0.28 (state.go: a pre-auth key brings its own tags)
                raise ConfigError(f"the login server refused --advertise-tags: {error}. Headscale 0.28 and "
                                  "later take a pre-auth key's tags only from the key itself "
                                  "(preauthkeys create --tags); requested tags need an interactive login, "
                                  "and tagOwners in the policy that allow this user")
            raise AuthError(f"the login server did not {refused}: {error}")
        if resp.NodeKeyExpired:
            raise NodeKeyExpired("this node's key has expired; start it with a reusable auth key "
                                 "(--authkey) to log in again")
        if resp.AuthURL:
            url = check_login_url(resp.AuthURL)
            if self.config.auth_key:  # the server did not take our key and asks for a person instead
                raise AuthError(f"the login server wants an interactive login at {url} "
                                "instead of taking the auth key")
            log.debug("register: the login server asks for an interactive login at %s", url)
            return resp
        if not resp.MachineAuthorized and renew_to is None:
            raise AuthError("the login server did not authorize this node (no or invalid auth key)")
        self.state.extra["registered_server"] = self.config.login_server
        if self.state.node_key_since is None and renew_to is None:
            self.state.node_key_since = wall()
        await self.state.save_async()  # off the loop: an fsync can take long on a busy disk
        return resp

    async def _post_while_alive(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST and wait for the answer however long the server holds it, as long as
        the connection answers PINGs; TransportError as soon as it stops answering."""
        answer: tuple[int, bytes] | None = None
        failure: Exception | None = None
        dead = False
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                nonlocal dead
                while True:
                    await trio.sleep(LIVENESS_INTERVAL)
                    alive = False
                    try:
                        with trio.move_on_after(LIVENESS_TIMEOUT):
                            await self.h2.ping()
                            alive = True
                    except (TrionetError, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the connection is gone: as good as no answer
                    if not alive:
                        dead = True
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch)
            try:
                answer = await self.h2.simple("POST", path, body)
            except Exception as exc:  # raised after the nursery, not wrapped in a group
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if dead or answer is None:
            raise TransportError(f"the control connection stopped answering while waiting for a login "
                                 f"(no PING answer in {LIVENESS_TIMEOUT:.0f} s)")
        return answer

    def map_request(self, endpoints: list[str], types: list[int], home: int, stream: bool,
                    net_info: dict[str, Any] | None = None) -> dict[str, Any]:
        req: dict[str, Any] = {"Version": CAPVER, "NodeKey": self.node_key, "DiscoKey": self.disco_key,
                               "Endpoints": endpoints, "EndpointTypes": types,
                               "Hostinfo": self.hostinfo(home, net_info), "Stream": stream}
        if stream:
            req.update(KeepAlive=True, Compress="zstd")
        else:
            req["OmitPeers"] = True
        return req

    async def lite_update(self, endpoints: list[str], types: list[int], home_region: int,
                          net_info: dict[str, Any] | None = None) -> None:
        body = json.dumps(self.map_request(endpoints, types, home_region, stream=False, net_info=net_info)).encode()
        log.debug("lite update: endpoints %s, home DERP %s", endpoints, home_region)
        status, text = await self.h2.simple("POST", "/machine/map", body)
        if status != 200:
            raise ControlError(f"endpoint update failed: HTTP {status}: {text[:200]!r}")

    async def map_updates(self, magic: Any) -> AsyncIterator[tuple[Netmap, NetmapChange]]:
        net_info = magic.net_info() if hasattr(magic, "net_info") else None
        req = self.map_request(magic.endpoints(), magic.endpoint_types(), magic.home_region, stream=True,
                               net_info=net_info)
        dctx = zstandard.ZstdDecompressor()
        async with self.h2.request("POST", "/machine/map", json.dumps(req).encode()) as events:
            buf = bytearray()
            status = 0
            async for kind, value in events:
                if kind == "status":
                    status = value
                    if status == 404:
                        raise AuthError("the login server does not know this node any more; re-run with an auth key")
                    if status != 200:
                        continue
                elif kind == "data":
                    if status != 200:
                        raise ControlError(f"map request failed: HTTP {status}: {bytes(value)[:200]!r}")
                    buf += value
                    while len(buf) >= 4:
                        (size,) = struct.unpack_from("<I", buf)
                        if size > MAX_MAP_MESSAGE:
                            raise RemoteProtocolError(f"map message of {size} bytes is over the limit")
                        if len(buf) < 4 + size:
                            break
                        raw = bytes(buf[4:4 + size])
                        del buf[:4 + size]
                        if raw[:4] == b"\x28\xb5\x2f\xfd":
                            try:
                                raw = dctx.decompressobj().decompress(raw)
                            except zstandard.ZstdError as exc:
                                raise RemoteProtocolError(f"bad zstd map message: {exc}") from exc
                        resp = proto.loads(raw, proto.MapResponse)
                        if resp.PingRequest is not None and self.on_ping_request is not None:
                            self.on_ping_request(resp.PingRequest)
                        change = self.netmap.apply(resp)
                        self.map_messages += 1
                        log.debug("map message %d: %d bytes%s", self.map_messages, len(raw),
                                  " (keepalive)" if change.keepalive else
                                  f", peers +{len(change.peers_added)} -{len(change.peers_removed)} "
                                  f"~{len(change.peers_changed)}")
                        if change.keepalive:
                            continue
                        yield self.netmap, change
                elif kind == "end":
                    raise StreamEnded("the login server ended the map stream")
                else:
                    raise value


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "<redacted>") if secret else text


def _reason(text: str) -> str:
    """A refusal's reason: Headscale 0.23 sends a RegisterResponse as JSON, later ones plain text."""
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            return ""
        return str(doc.get("Error") or "") if isinstance(doc, dict) else ""
    return text[:200]


@asynccontextmanager
async def open_session(config: Any, state: Any) -> AsyncIterator[ControlConnection]:
    """Fetch the server key, upgrade to TS2021, and run HTTP/2 over Noise."""
    url = config.login_server
    ca = str(config.ca_file) if config.ca_file else None
    server_key = await fetch_server_key(url, ca)
    stream, netloc = await _open_stream(url, ca)
    try:
        init = Initiator(state.machine_private, server_key, CAPVER)
        msg = base64.b64encode(init.initiation()).decode()
        await stream.send_all(
            f"POST /ts2021 HTTP/1.1\r\nHost: {netloc}\r\nUpgrade: tailscale-control-protocol\r\n"
            f"Connection: upgrade\r\nX-Tailscale-Handshake: {msg}\r\nContent-Length: 0\r\n\r\n".encode())
        with trio.fail_after(CONNECT_TIMEOUT):
            status, headers, rest = await read_response_head(stream, "the login server", receive_size=65536)
            if status != 101 or headers.get("upgrade", "").lower() != "tailscale-control-protocol":
                raise ControlError(f"{url}/ts2021 answered HTTP {status}, not an upgrade")
            while len(rest) < RESPONSE_LEN:
                data = await stream.receive_some(65536)
                if not data:
                    raise ControlError("the login server closed the connection during the Noise handshake "
                                       f"(does it accept capability version {CAPVER}?)")
                rest += data
        noise = init.response(rest[:RESPONSE_LEN])
        log.debug("TS2021 Noise session with %s as machine %s", url, format_key("mkey:", state.machine_public))
        nstream = NoiseStream(stream, noise, rest[RESPONSE_LEN:])
        first = b""
        while len(first) < 9:
            data = await nstream.receive_some(9 - len(first))
            if not data:
                raise TransportError("control connection closed after the handshake")
            first += data
        leftover = b""
        if first[:5] == EARLY_MAGIC:
            (n,) = struct.unpack_from("!I", first, 5)
            if n > 10 << 20:
                raise RemoteProtocolError("early payload too large")
            payload = b""
            while len(payload) < n:
                data = await nstream.receive_some(n - len(payload))
                if not data:
                    raise TransportError("control connection closed in the early payload")
                payload += data
        else:
            leftover = first
        h2conn = H2Connection(_Prepend(nstream, leftover), netloc)
        await h2conn.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h2conn.reader)
            try:
                yield ControlConnection(config, state, h2conn)
            finally:
                nursery.cancel_scope.cancel()
    except trio.TooSlowError as exc:
        raise TransportError(f"login server {url} did not complete the TS2021 upgrade") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise TransportError(f"control connection to {url} broke: {exc.__cause__ or exc}") from exc
    finally:
        await trio.aclose_forcefully(stream)


class _Prepend(trio.abc.Stream):
    """Give back bytes we read past the early-payload check."""

    def __init__(self, inner: trio.abc.Stream, first: bytes) -> None:
        self.inner = inner
        self.first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.first:
            out, self.first = bytes(self.first), b""
            return out
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()
