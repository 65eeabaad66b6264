"""The peer API's DNS-over-HTTP, as an exit node serves it to its clients (sans-IO core).

tailscaled serves an HTTP API to its peers on its tailnet addresses; its clients
that use it as their exit node resolve names through ``/dns-query`` on it
(protocol-notes-next §15.6, §17.7; checked in tailscale v1.102.3
ipn/ipnlocal/peerapi.go: listen, validateHost, ServeHTTP, replyToDNSQueries,
handleDNSQuery, dohQuery; net/dns/resolver/tsdns.go HandlePeerDNSQuery;
local.go allowExitNodeDNSProxyToServeName):

* the port: ``32768 | crc32(last 3 bytes of our address)``, the first byte
  bumped on each of 5 tries (`peerapi_port_candidates`); Hostinfo.Services
  carries ``peerapi4``/``peerapi6`` and ``peerapi-dns-proxy`` (port 1, a version);
* a request with a ``Referer`` or ``Origin``, or a ``Host`` that is neither
  ``peer`` nor one of our addresses with a port, gets 403 "invalid peerapi request";
* any path starting ``/dns-query``: the caller must be of our user, or we offer
  an exit node and our packet filter would accept TCP from the caller to
  ``0.0.0.0:53`` (``2000::`` for an IPv6 caller), else 403 "DNS access denied";
* ``POST`` with ``Content-Type: application/dns-message`` and a body of at most
  256 KiB, or ``GET ?dns=`` base64url without padding; else 400;
* a name in the netmap's ``ExitNodeFilteredSet`` (".suffix" or exact) is answered
  REFUSED here; any other query goes to the host's resolver (the driver's
  business), whose failure is a 500;
* 200 with ``Content-Type: application/dns-message`` and the DNS bytes.

This module parses requests (HTTP/1.1 with ``Content-Length``, a chunked body
refused; or HTTP/2 with prior knowledge, "h2c", which Go's server takes on the
same port: `H2cSession`, the h2 library's) and decides; it never awaits and
never reads a clock.
`trionet.peerapi_server` is the Trio driver.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import urllib.parse
import zlib
from collections.abc import Iterable, Sequence

import attrs
import dns.flags
import dns.message
import dns.rcode
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

__all__ = [
    "DNS_PROXY_SERVICE",
    "DOH_CONTENT_TYPE",
    "H2_PREFACE",
    "MAX_HEAD",
    "MAX_QUERY",
    "Access",
    "AskResolver",
    "BadRequest",
    "H2cSession",
    "Reply",
    "Request",
    "RequestReader",
    "decide",
    "filtered_name",
    "peerapi_port_candidates",
    "render",
    "resolv_conf_nameserver",
    "services",
]

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address

DOH_CONTENT_TYPE = "application/dns-message"
MAX_QUERY = 256 << 10  # dohQuery's maxQueryLen
MAX_HEAD = 8 << 10  # a request head; the DoH client sends a few hundred bytes
DNS_PROXY_SERVICE = {"Proto": "peerapi-dns-proxy", "Port": 1}  # Port: the protocol's version

_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable"}


def peerapi_port_candidates(ip: IPAddr, tries: int = 5) -> list[int]:
    """The ports tailscaled tries for its peer API on `ip`, in order (peerapi.go listen)."""
    tail = bytearray(ip.packed[-3:])
    out = []
    for attempt in range(tries):
        data = bytes([(tail[0] + attempt) & 0xFF, tail[1], tail[2]])
        out.append(0x8000 | (zlib.crc32(data) & 0xFFFF))
    return out


def services(port4: int | None, port6: int | None) -> list[dict[str, object]]:
    """Hostinfo.Services for a peer API listening on these ports (peerAPIServicesLocked)."""
    out: list[dict[str, object]] = []
    if port4:
        out.append({"Proto": "peerapi4", "Port": port4})
    if port6:
        out.append({"Proto": "peerapi6", "Port": port6})
    out.append(dict(DNS_PROXY_SERVICE))
    return out


# ------------------------------------------------------------------ requests
@attrs.frozen
class Request:
    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # lower-cased names; a repeated header keeps its last value
    body: bytes
    keep_alive: bool

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(self.target.split("?", 1)[1] if "?" in self.target else "",
                                     keep_blank_values=True)


@attrs.frozen
class BadRequest:
    """Input that is not an HTTP request we serve: answer `status` and close."""

    status: int
    kind: str  # for the counters: "bad_head", "head_too_large", "body_too_large", "chunked"
    message: str


class RequestReader:
    """Requests from one connection's bytes, in order; bounded: a head of MAX_HEAD bytes,
    a body of MAX_QUERY bytes (more is a BadRequest, and the connection ends)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: tuple[str, str, dict[str, str], bool] | None = None
        self._length = 0
        self.failed: BadRequest | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_request(self) -> Request | BadRequest | None:
        """The next whole request; None until more bytes come; a BadRequest for good."""
        if self.failed is not None:
            return self.failed
        if self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    return self._fail(431, "head_too_large", "request head too large")
                return None
            if end > MAX_HEAD:
                return self._fail(431, "head_too_large", "request head too large")
            parsed = self._parse_head(bytes(self._buf[:end]))
            if isinstance(parsed, BadRequest):
                return parsed
            del self._buf[:end + 4]
            self._head = parsed
        method, target, headers, keep_alive = self._head
        if len(self._buf) < self._length:
            return None
        body = bytes(self._buf[:self._length])
        del self._buf[:self._length]
        self._head = None
        return Request(method, target, headers, body, keep_alive)

    def _fail(self, status: int, kind: str, message: str) -> BadRequest:
        self.failed = BadRequest(status, kind, message)
        return self.failed

    def _parse_head(self, head: bytes) -> tuple[str, str, dict[str, str], bool] | BadRequest:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha() \
                or not parts[1].startswith("/"):
            return self._fail(400, "bad_head", "malformed request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                return self._fail(400, "bad_head", "malformed header line")
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            return self._fail(501, "chunked", "Transfer-Encoding is not supported; send Content-Length")
        length_text = headers.get("content-length", "0")
        if not (length_text.isascii() and length_text.isdigit()):
            return self._fail(400, "bad_head", "bad Content-Length")
        self._length = int(length_text) if len(length_text) <= 12 else MAX_QUERY + 1  # (no 5000-digit int())
        if self._length > MAX_QUERY:
            return self._fail(413, "body_too_large", "query too large")
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if parts[2] == "HTTP/1.1" else connection == "keep-alive"
        return parts[0], parts[1], headers, keep_alive


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_MAX_STREAMS = 16  # requests open at once on one HTTP/2 connection


class H2cSession:
    """HTTP/2 with prior knowledge on one connection: frames in, whole requests out (by
    stream ID), answers back into frames. Bounded like `RequestReader`: a header block
    of MAX_HEAD bytes, a body of MAX_QUERY, H2_MAX_STREAMS streams at once; a protocol
    error ends the connection (`failed`)."""

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        self._conn = h2.connection.H2Connection(config)
        self._conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: H2_MAX_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEAD})
        self._conn.initiate_connection()
        self._open: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.failed: BadRequest | None = None

    def feed(self, data: bytes) -> list[tuple[int, Request | BadRequest]]:
        """The requests (or refusals, by stream) these bytes complete."""
        out: list[tuple[int, Request | BadRequest]] = []
        if self.failed is not None:
            return out
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.H2Error as exc:  # hostile or broken framing: the connection ends
            self.failed = BadRequest(400, "h2_protocol", str(exc)[:100])
            return out
        for event in events:
            if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
                headers = {str(k).lower(): str(v) for k, v in event.headers or ()}
                self._open[event.stream_id] = (headers, bytearray())
            elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
                self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                known = self._open.get(event.stream_id)
                if known is None:
                    continue
                known[1].extend(event.data or b"")
                if len(known[1]) > MAX_QUERY:
                    del self._open[event.stream_id]
                    out.append((event.stream_id, BadRequest(413, "body_too_large", "query too large")))
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id is not None:
                done = self._open.pop(event.stream_id, None)
                if done is not None:
                    out.append((event.stream_id, self._request(*done)))
            elif isinstance(event, h2.events.StreamReset) and event.stream_id is not None:
                self._open.pop(event.stream_id, None)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.failed = BadRequest(400, "h2_closed", "the client ended the connection")
        return out

    @staticmethod
    def _request(headers: dict[str, str], body: bytearray) -> Request | BadRequest:
        method, path = headers.get(":method", ""), headers.get(":path", "")
        if not method or not path.startswith("/"):
            return BadRequest(400, "bad_head", "malformed request")
        plain = {k: v for k, v in headers.items() if not k.startswith(":")}
        plain["host"] = headers.get(":authority", plain.get("host", ""))
        return Request(method, path, plain, bytes(body), keep_alive=True)

    def respond(self, stream_id: int, status: int, body: bytes, content_type: str) -> None:
        """Queue the answer to `stream_id` (flow control permitting; a DNS answer fits the
        initial window, what does not fit is cut short and the stream reset)."""
        try:
            self._conn.send_headers(stream_id, [(":status", str(status)), ("content-type", content_type),
                                                ("content-length", str(len(body)))])
            window = self._conn.local_flow_control_window(stream_id)
            if len(body) > window:
                self._conn.reset_stream(stream_id)
                return
            max_frame = self._conn.max_outbound_frame_size
            for start in range(0, len(body), max_frame):
                self._conn.send_data(stream_id, body[start:start + max_frame])
            self._conn.end_stream(stream_id)
        except h2.exceptions.H2Error:  # the client reset or closed that stream meanwhile
            return

    def data_to_send(self) -> bytes:
        return bytes(self._conn.data_to_send())


# ------------------------------------------------------------------ deciding
@attrs.frozen
class Access:
    """What the access rule needs to know of the caller and of us, found by the driver."""

    own_addresses: frozenset[IPAddr]
    same_user: bool  # the caller's node belongs to our user
    offers_exit_node: bool
    caller_may_use_internet: bool  # our filter would accept TCP from it to 0.0.0.0:53 (2000:: for IPv6)
    filtered_names: tuple[str, ...] = ()  # DNSConfig.ExitNodeFilteredSet


@attrs.frozen
class Reply:
    """Answer with this; `reject`: the counter's kind when it is a refusal ("" otherwise)."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    reject: str = ""


@attrs.frozen
class AskResolver:
    """Ask the host's resolver `wire` (a DNS query of `name`); 200 with its answer, 500 if it fails."""

    wire: bytes
    name: str


def _text(status: int, message: str, reject: str = "") -> Reply:
    return Reply(status, (message + "\n").encode(), reject=reject)


def _host_ok(host: str, own: frozenset[IPAddr]) -> bool:
    if host == "peer":
        return True
    if host.startswith("["):
        addr_text, sep, port = host[1:].partition("]:")
    else:
        addr_text, sep, port = host.rpartition(":")
        if ":" in addr_text:
            return False  # a bare IPv6 address needs brackets
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535:
        return False
    try:
        return ipaddress.ip_address(addr_text) in own
    except ValueError:
        return False


def filtered_name(name: str, filtered: Iterable[str]) -> bool:
    """Whether `name` (an FQDN) is in ExitNodeFilteredSet: ".suffix" entries match the
    name and its subdomains, others only exactly."""
    name = name.lower().rstrip(".")
    for entry in filtered:
        if not entry:
            continue
        bare = entry.lower().rstrip(".")
        if bare.startswith("."):
            suffix = bare[1:]
            if name == suffix or name.endswith("." + suffix):
                return True
        elif name == bare:
            return True
    return False


def _b64url(text: str) -> bytes | None:
    if len(text) * 3 // 4 > MAX_QUERY:
        return None
    try:
        # strict, as Go's RawURLEncoding: no padding, nothing outside the URL alphabet
        if "=" in text:
            return None
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


def _refused(wire: bytes) -> bytes | None:
    """REFUSED for this query (its ID and question kept); None when it does not parse."""
    try:
        query = dns.message.from_wire(wire, question_only=True)
    except Exception:  # anything dnspython raises on hostile input
        return None
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.REFUSED)
    response.flags |= dns.flags.RA
    return bytes(response.to_wire())


def _question_name(wire: bytes) -> str | None:
    try:
        query = dns.message.from_wire(wire, question_only=True)
    except Exception:  # anything dnspython raises on hostile input
        return None
    if query.flags & dns.flags.QR or not query.question:
        return None
    return str(query.question[0].name.to_text()).lower()


def decide(request: Request, access: Access) -> Reply | AskResolver:
    """What to answer `request` (protocol-notes-next §17.7)."""
    if request.headers.get("referer") or request.headers.get("origin") \
            or not _host_ok(request.headers.get("host", ""), access.own_addresses):
        return _text(403, "invalid peerapi request", "invalid_request")
    if not request.path.startswith("/dns-query"):
        return _text(404, "404 page not found", "not_found")
    if not (access.same_user or (access.offers_exit_node and access.caller_may_use_internet)):
        return _text(403, "DNS access denied", "dns_denied")
    if request.method == "POST":
        if request.headers.get("content-type") != DOH_CONTENT_TYPE:
            return _text(400, "unexpected Content-Type", "bad_query")
        wire = request.body
    elif request.method == "GET":
        values = request.query.get("dns")
        if not values or not values[0]:
            return _text(400, "missing 'dns' parameter; try '?dns=' (DoH standard)", "bad_query")
        decoded = _b64url(values[0])
        if decoded is None:
            return _text(400, "invalid 'dns' base64 encoding", "bad_query")
        wire = decoded
    else:
        return _text(400, "bad HTTP method", "bad_method")
    name = _question_name(wire)
    if name is None:
        return _text(500, "DNS forwarding error", "bad_dns_message")  # tailscaled: "bad query", a 500
    if filtered_name(name, access.filtered_names):
        refused = _refused(wire)
        assert refused is not None  # it parsed just above
        return Reply(200, refused, DOH_CONTENT_TYPE, reject="filtered_name")
    return AskResolver(wire, name)


def render(status: int, body: bytes, content_type: str, keep_alive: bool) -> bytes:
    """A whole HTTP/1.1 response."""
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\n"
            + ("" if keep_alive else "Connection: close\r\n") + "\r\n")
    return head.encode("latin-1") + body


def caller_probe_address(caller: IPAddr) -> IPAddr:
    """The address tailscaled's access rule asks the filter about: "the internet"."""
    return ipaddress.IPv6Address("2000::") if caller.version == 6 else ipaddress.IPv4Address("0.0.0.0")


def own_addresses(addresses: Sequence[str]) -> frozenset[IPAddr]:
    """Our netmap Addresses ("100.64.0.1/32") as addresses; unreadable ones skipped."""
    out: set[IPAddr] = set()
    for text in addresses:
        try:
            out.add(ipaddress.ip_interface(text).ip)
        except ValueError:
            continue
    return frozenset(out)


def resolv_conf_nameserver(text: str) -> IPAddr | None:
    """The first ``nameserver`` of /etc/resolv.conf text (tailscale's stubResolverForOS
    asks only that one); None when there is none."""
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                return ipaddress.ip_address(fields[1].split("%", 1)[0])
            except ValueError:
                continue
    return None
