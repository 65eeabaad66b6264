"""trionet.exitdns: DNS over the exit node's peer API, as tailscaled's dohclient asks it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
import trio.testing

from trionet.errors import RemoteProtocolError, TransportError
from trionet.exitdns import DohError, ExitDnsResolver, NameNotFound, doh_query

URL = "http://100.64.0.3:46813/dns-query"


class FakePeerApi:
    """An opener whose every stream leads to `respond(request_head, body) -> raw HTTP response`."""

    def __init__(self, nursery: trio.Nursery, respond: Callable[[bytes, bytes], bytes]) -> None:
        self.nursery = nursery
        self.respond = respond
        self.requests: list[tuple[bytes, bytes]] = []
        self.dials: list[tuple[str, int]] = []

    async def open_tcp_stream(self, host: str, port: int) -> Any:
        self.dials.append((host, port))
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, server)
        return client

    async def _serve(self, stream: Any) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        head, _, body = buf.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += await stream.receive_some(65536)
        self.requests.append((head, body))
        await stream.send_all(self.respond(head, body))
        await stream.aclose()


def http(body: bytes, status: str = "200 OK", ctype: str = "application/dns-message", chunked: bool = False) -> bytes:
    if chunked:
        half = len(body) // 2
        payload = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in (body[:half], body[half:]) if p)
        return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                + payload + b"0\r\n\r\n")
    return f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def dns_server(records: dict[tuple[str, str], list[str]], ttl: int = 60) -> Callable[[bytes, bytes], bytes]:
    def respond(head: bytes, body: bytes) -> bytes:
        query = dns.message.from_wire(body)
        q = query.question[0]
        name, rdtype = q.name.to_text(), dns.rdatatype.to_text(q.rdtype)
        response = dns.message.make_response(query)
        if not any(n == name for n, _ in records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        values = records.get((name, rdtype), [])
        if values:
            response.answer.append(dns.rrset.from_text(name, ttl, "IN", rdtype, *values))
        return http(response.to_wire())
    return respond


async def test_doh_query_posts_the_message_as_tailscaleds_client_does(nursery: trio.Nursery) -> None:
    api = FakePeerApi(nursery, lambda head, body: http(b"answer bytes"))
    assert await doh_query(api, URL, b"query bytes") == b"answer bytes"
    head, body = api.requests[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /dns-query HTTP/1.1"
    assert "Host: 100.64.0.3:46813" in lines  # the peer API checks Host against its own addresses
    assert "Content-Type: application/dns-message" in lines
    assert not any(line.lower().startswith(("referer", "origin")) for line in lines)  # the peer API refuses those
    assert body == b"query bytes"
    assert api.dials == [("100.64.0.3", 46813)]


async def test_doh_query_accepts_a_chunked_answer_and_ipv6_urls(nursery: trio.Nursery) -> None:
    api = FakePeerApi(nursery, lambda head, body: http(b"0123456789", chunked=True))
    assert await doh_query(api, "http://[fd7a:115c:a1e0::3]:46814/dns-query", b"q") == b"0123456789"
    assert b"Host: [fd7a:115c:a1e0::3]:46814" in api.requests[0][0]


@pytest.mark.parametrize(("response", "error", "message"), [
    (http(b"DNS access denied", status="403 Forbidden", ctype="text/plain"), DohError, "HTTP 403"),
    (http(b"x", ctype="text/html"), DohError, "Content-Type 'text/html'"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/dns-message\r\nContent-Length: 99999\r\n\r\n",
     RemoteProtocolError, "Content-Length"),
    (b"SSH-2.0-nope\r\n\r\n", RemoteProtocolError, "bad HTTP status line"),
])
async def test_doh_query_refuses_what_is_not_a_dns_answer(nursery: trio.Nursery, response: bytes,
                                                          error: type[Exception], message: str) -> None:
    api = FakePeerApi(nursery, lambda head, body: response)
    with pytest.raises(error, match=message):
        await doh_query(api, URL, b"q")


async def test_doh_query_times_out_with_a_transport_error(nursery: trio.Nursery) -> None:
    class Silent:
        async def open_tcp_stream(self, host: str, port: int) -> Any:
            client, _server = trio.testing.memory_stream_pair()
            self.keep = _server
            return client

    with pytest.raises(TransportError, match=r"did not answer within 0\.5 s"):
        await doh_query(Silent(), URL, b"q", timeout=0.5)


async def test_lookup_asks_a_and_aaaa_and_caches_by_ttl(nursery: trio.Nursery, autojump_clock: Any) -> None:
    records = {("web.example.", "A"): ["198.51.100.7"], ("web.example.", "AAAA"): ["2001:db8::7"]}
    api = FakePeerApi(nursery, dns_server(records, ttl=60))
    resolver = ExitDnsResolver()
    assert await resolver.lookup(api, URL, "web.example") == ["198.51.100.7", "2001:db8::7"]
    assert len(api.requests) == 2  # one POST per type, as tailscaled's Go resolver sends them
    assert await resolver.lookup(api, URL, "WEB.example.") == ["198.51.100.7", "2001:db8::7"]
    assert len(api.requests) == 2  # from the cache
    await trio.sleep(61)
    assert await resolver.lookup(api, URL, "web.example", families=(4,)) == ["198.51.100.7"]
    assert len(api.requests) == 3  # expired: asked again, and only for A
    assert resolver.statistics()["cache_hits"] == 2


async def test_lookup_of_a_missing_name_is_name_not_found_and_cached(nursery: trio.Nursery) -> None:
    api = FakePeerApi(nursery, dns_server({}))
    resolver = ExitDnsResolver()
    with pytest.raises(NameNotFound, match="no such name"):
        await resolver.lookup(api, URL, "nowhere.example")
    with pytest.raises(NameNotFound):
        await resolver.lookup(api, URL, "nowhere.example")
    assert len(api.requests) == 2


async def test_lookup_refuses_an_answer_to_another_question(nursery: trio.Nursery) -> None:
    def wrong_id(head: bytes, body: bytes) -> bytes:
        query = dns.message.from_wire(body)
        query.id ^= 1
        return http(dns.message.make_response(query).to_wire())

    with pytest.raises(RemoteProtocolError, match="does not match"):
        await ExitDnsResolver().lookup(FakePeerApi(nursery, wrong_id), URL, "web.example", families=(4,))


def test_cache_is_bounded() -> None:
    resolver = ExitDnsResolver(max_entries=3)
    for i in range(10):
        query = resolver.make_query(f"n{i}.", dns.rdatatype.A)
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(f"n{i}.", 60, "IN", "A", "192.0.2.1"))
        answer = resolver.read_answer(query, response.to_wire(), dns.rdatatype.A, now=0.0)
        resolver.store(URL, f"n{i}.", dns.rdatatype.A, answer)
    assert resolver.statistics()["cached"] == 3
    assert resolver.cached(URL, "n9.", dns.rdatatype.A, now=1.0) is not None
    assert resolver.cached(URL, "n0.", dns.rdatatype.A, now=1.0) is None
