"""Names outside the tailnet, resolved by the exit node's DNS (protocol-notes-next §15.6).

An exit node offers DNS-over-HTTPS on its peer API (tailscale ipn/ipnlocal/peerapi.go,
handleDNSQuery), which answers from the exit node's own resolver: the names a
proxy client asks for resolve as they would on the exit node, where the traffic
leaves. tailscaled's dialer does the same (net/tsdial/dohclient.go):

* ``POST http://<exit node IP>:<peerapi port>/dns-query`` over the tailnet, plain
  HTTP/1.1, ``Content-Type: application/dns-message``, the DNS query as the body;
* only a ``200`` whose ``Content-Type`` is exactly ``application/dns-message`` is
  an answer; A and AAAA are asked separately; answers are cached.

`doh_query` is the one exchange (the MagicDNS resolver forwards through it too);
`ExitDnsResolver` turns a name into addresses with a bounded cache that keeps
answers for their TTL. DNS wire format: dnspython (a well-kept library; the
answers are untrusted input, and a codec of our own would be one more parser
to get wrong).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import urllib.parse
from collections import Counter, OrderedDict
from typing import Any, Protocol

import attrs
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import trio

from trionet.errors import ConfigError, RemoteProtocolError, TransportError
from trionet.http1 import read_response_head
from trionet.netaddr import join_host_port

__all__ = ["DOH_CONTENT_TYPE", "DohError", "ExitDnsResolver", "NameNotFound", "StreamOpener", "doh_query"]

log = logging.getLogger(__name__)

DOH_CONTENT_TYPE = "application/dns-message"
DOH_TIMEOUT = 10.0  # the exit node gives its resolver 5 s (tsdns.go HandlePeerDNSQuery); a dial and a retry on top
MAX_DNS_MESSAGE = 65535  # a DNS message never exceeds this (its TCP length prefix is 16 bits)
CACHE_ENTRIES = 512
MAX_TTL = 3600.0
NEGATIVE_TTL = 30.0  # NXDOMAIN / no records: asked again after this at most


class StreamOpener(Protocol):
    """What `doh_query` dials through: a `trionet.Node` is one."""

    async def open_tcp_stream(self, host: str, port: int) -> Any: ...


class DohError(TransportError):
    """The DoH server did not answer with a DNS message."""


class NameNotFound(ConfigError):
    """The name does not exist (NXDOMAIN) or has no address."""


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


@attrs.frozen
class _Answer:
    expires: float
    addresses: tuple[str, ...]  # empty: the name has no records of that type (or does not exist)
    nxdomain: bool = False


class ExitDnsResolver:
    """Name -> addresses through a DoH server, cached by TTL (sans-IO cache, Trio queries).

    The cache holds at most `max_entries` (URL, name, type) answers, least recently
    used out first; an answer lives for its smallest TTL (at most `MAX_TTL`), a
    negative one for at most `NEGATIVE_TTL`."""

    def __init__(self, max_entries: int = CACHE_ENTRIES, rng: random.Random | None = None) -> None:
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[str, str, int], _Answer] = OrderedDict()
        self._rng = rng or random.Random()
        self.stats: Counter[str] = Counter()

    def statistics(self) -> dict[str, int]:
        return {**self.stats, "cached": len(self._cache)}

    def clear(self) -> None:
        self._cache.clear()

    # ---------------------------------------------------------- sans-IO parts
    def cached(self, url: str, name: str, rdtype: int, now: float) -> _Answer | None:
        key = (url, name, rdtype)
        answer = self._cache.get(key)
        if answer is None:
            return None
        if answer.expires <= now:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return answer

    def store(self, url: str, name: str, rdtype: int, answer: _Answer) -> None:
        key = (url, name, rdtype)
        self._cache[key] = answer
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def make_query(self, name: str, rdtype: int) -> dns.message.QueryMessage:
        query = dns.message.make_query(name, dns.rdatatype.RdataType(rdtype))
        query.id = self._rng.randrange(65536)
        query.flags |= dns.flags.RD
        return query

    def read_answer(self, query: dns.message.QueryMessage, wire: bytes, rdtype: int, now: float) -> _Answer:
        """The addresses in a response to `query`; RemoteProtocolError for one that is not."""
        try:
            response = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError) as exc:
            raise RemoteProtocolError(f"the exit node's DNS answer is not a DNS message: {exc}") from exc
        if not query.is_response(response):
            raise RemoteProtocolError("the exit node's DNS answer does not match the question")
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return _Answer(now + self._negative_ttl(response), (), nxdomain=True)
        if rcode != dns.rcode.NOERROR:
            raise TransportError(f"the exit node's DNS answered {dns.rcode.to_text(rcode)}")
        addresses: list[str] = []
        ttl = MAX_TTL
        for rrset in response.answer:
            if rrset.rdtype != rdtype:
                continue  # the CNAMEs on the way: their A/AAAA records follow in the same answer
            ttl = min(ttl, float(rrset.ttl))
            for rdata in rrset:
                text = rdata.to_text()
                try:
                    ipaddress.ip_address(text)
                except ValueError:
                    continue
                if text not in addresses:
                    addresses.append(text)
        if not addresses:
            return _Answer(now + self._negative_ttl(response), ())
        return _Answer(now + ttl, tuple(addresses))

    @staticmethod
    def _negative_ttl(response: dns.message.Message) -> float:
        for rrset in response.authority:  # RFC 2308: the SOA's TTL (capped by its MINIMUM)
            if rrset.rdtype == dns.rdatatype.SOA:
                minimum = min((float(r.minimum) for r in rrset), default=NEGATIVE_TTL)
                return min(float(rrset.ttl), minimum, NEGATIVE_TTL)
        return NEGATIVE_TTL

    # ----------------------------------------------------------------- Trio
    async def _one(self, opener: StreamOpener, url: str, name: str, rdtype: int) -> _Answer:
        now = trio.current_time()
        answer = self.cached(url, name, rdtype, now)
        if answer is not None:
            self.stats["cache_hits"] += 1
            return answer
        query = self.make_query(name, rdtype)
        self.stats["queries"] += 1
        try:
            wire = await doh_query(opener, url, query.to_wire())
            answer = self.read_answer(query, wire, rdtype, trio.current_time())
        except Exception:
            self.stats["failures"] += 1
            raise
        self.store(url, name, rdtype, answer)
        return answer

    async def lookup(self, opener: StreamOpener, url: str, host: str, families: tuple[int, ...] = (4, 6)) -> list[str]:
        """The addresses of `host` (IPv4 first), asking A and AAAA at once.

        NameNotFound when the name does not exist or has no address of the
        families asked; TransportError/RemoteProtocolError when the DNS failed."""
        try:
            name = dns.name.from_text(host).to_text().lower()  # DNS names are case-insensitive: one cache entry
        except dns.exception.DNSException as exc:
            raise ConfigError(f"{host[:80]!r} is not a valid DNS name: {exc}") from None
        types = [t for f, t in ((4, dns.rdatatype.A), (6, dns.rdatatype.AAAA)) if f in families]
        results: dict[int, _Answer | BaseException] = {}

        async def ask(rdtype: int) -> None:
            try:
                results[rdtype] = await self._one(opener, url, name, rdtype)
            except (TransportError, RemoteProtocolError, ConfigError) as exc:
                results[rdtype] = exc

        async with trio.open_nursery() as nursery:
            for rdtype in types:
                nursery.start_soon(ask, rdtype)
        addresses: list[str] = []
        errors: list[BaseException] = []
        for rdtype in types:
            result = results[rdtype]
            if isinstance(result, BaseException):
                errors.append(result)
            else:
                addresses.extend(result.addresses)
        if addresses:
            return addresses
        if errors:
            raise errors[0]
        raise NameNotFound(f"{host!r}: no such name (the exit node's DNS has no address for it)")
