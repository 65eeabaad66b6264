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
from trionet.exitdns import DohError, doh_query

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
