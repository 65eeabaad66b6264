"""The peer API's DNS-over-HTTP: the request parser and access rule (core), and the server
on a netstack asked by trionet's own DoH client over a linked stack (driver)."""

from __future__ import annotations

import base64
import ipaddress
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import dns.message
import dns.rcode
import dns.rrset
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.netstack.simlink import A4, B4, linked_stacks
from trionet import peerapi
from trionet.dns.driver import MagicDns
from trionet.errors import TransportError
from trionet.exitdns import DohError, doh_query
from trionet.peerapi import Access, AskResolver, BadRequest, Reply, Request, RequestReader, decide
from trionet.peerapi_server import MAX_CONNECTIONS, PeerApiServer

ME = ipaddress.ip_address("100.64.0.1")
QUERY = dns.message.make_query("web.outside.test", "A").to_wire()


def _access(**kw: Any) -> Access:
    base: dict[str, Any] = {"own_addresses": frozenset({ME}), "same_user": False, "offers_exit_node": True,
                            "caller_may_use_internet": True}
    return Access(**{**base, **kw})


def _post(body: bytes = QUERY, **headers: str) -> Request:
    hdrs = {"host": "100.64.0.1:40000", "content-type": "application/dns-message", **headers}
    return Request("POST", "/dns-query", {k: v for k, v in hdrs.items() if v}, body, True)


# ---------------------------------------------------------------- core
def test_the_port_is_tailscaleds_crc_of_the_address_tail() -> None:
    ports = peerapi.peerapi_port_candidates(ipaddress.ip_address("100.64.0.3"))
    assert len(ports) == 5 and all(32768 <= p < 65536 for p in ports) and len(set(ports)) == 5
    import zlib
    assert ports[0] == 0x8000 | (zlib.crc32(bytes([64, 0, 3])) & 0xFFFF)
    # the same last three bytes give IPv4 and IPv6 the same port
    assert peerapi.peerapi_port_candidates(ipaddress.ip_address("fd7a:115c:a1e0::40:3"))[0] == ports[0]


def test_services_name_both_families_and_the_dns_proxy() -> None:
    assert peerapi.services(41000, None) == [{"Proto": "peerapi4", "Port": 41000},
                                             {"Proto": "peerapi-dns-proxy", "Port": 1}]


def test_a_query_is_asked_of_the_resolver() -> None:
    got = decide(_post(), _access())
    assert isinstance(got, AskResolver) and got.wire == QUERY and got.name == "web.outside.test."
    encoded = base64.urlsafe_b64encode(QUERY).rstrip(b"=").decode()
    via_get = decide(Request("GET", f"/dns-query?dns={encoded}", {"host": "peer"}, b"", True), _access())
    assert isinstance(via_get, AskResolver) and via_get.wire == QUERY


@pytest.mark.parametrize(("request_", "status", "reject"), [
    (_post(host="100.64.0.9:40000"), 403, "invalid_request"),  # not our address
    (_post(host="100.64.0.1"), 403, "invalid_request"),  # no port
    (_post(host="100.64.0.1:\u00b2"), 403, "invalid_request"),  # a digit, not ASCII
    (_post(host="100.64.0.1:" + "9" * 5000), 403, "invalid_request"),
    (_post(referer="http://evil/"), 403, "invalid_request"),
    (_post(origin="http://evil"), 403, "invalid_request"),
    (Request("GET", "/v0/env", {"host": "peer"}, b"", True), 404, "not_found"),
    (_post(**{"content-type": "text/plain"}), 400, "bad_query"),
    (Request("PUT", "/dns-query", {"host": "peer"}, QUERY, True), 400, "bad_method"),
    (Request("GET", "/dns-query", {"host": "peer"}, b"", True), 400, "bad_query"),
    (Request("GET", "/dns-query?dns=!!!", {"host": "peer"}, b"", True), 400, "bad_query"),
    (_post(b"\x00\x01garbage"), 500, "bad_dns_message"),
])
def test_bad_requests_are_refused_as_tailscaled_refuses_them(request_: Request, status: int, reject: str) -> None:
    got = decide(request_, _access())
    assert isinstance(got, Reply) and (got.status, got.reject) == (status, reject)


def test_access_needs_the_same_user_or_an_exit_node_the_caller_may_use() -> None:
    denied = decide(_post(), _access(caller_may_use_internet=False))
    assert isinstance(denied, Reply) and denied.status == 403 and denied.body == b"DNS access denied\n"
    assert isinstance(decide(_post(), _access(offers_exit_node=False)), Reply)
    assert isinstance(decide(_post(), _access(offers_exit_node=False, caller_may_use_internet=False,
                                              same_user=True)), AskResolver)


def test_a_filtered_name_is_refused_without_asking() -> None:
    got = decide(_post(), _access(filtered_names=(".outside.test",)))
    assert isinstance(got, Reply) and got.status == 200 and got.reject == "filtered_name"
    reply = dns.message.from_wire(got.body)
    assert reply.rcode() == dns.rcode.REFUSED and reply.id == dns.message.from_wire(QUERY).id
    assert peerapi.filtered_name("a.b.test.", ["b.test"]) is False  # exact entries match exactly
    assert peerapi.filtered_name("b.test.", ["b.test"]) and peerapi.filtered_name("x.b.test.", [".b.test"])


def test_the_reader_takes_requests_in_turn_and_bounds_them() -> None:
    reader = RequestReader()
    one = (b"POST /dns-query HTTP/1.1\r\nHost: peer\r\nContent-Type: application/dns-message\r\n"
           b"Content-Length: %d\r\n\r\n" % len(QUERY)) + QUERY
    reader.feed(one[:30])
    assert reader.next_request() is None
    reader.feed(one[30:] + b"GET /dns-query HTTP/1.1\r\nHost: peer\r\nConnection: close\r\n\r\n")
    first, second = reader.next_request(), reader.next_request()
    assert isinstance(first, Request) and first.body == QUERY and first.keep_alive
    assert isinstance(second, Request) and second.method == "GET" and not second.keep_alive
    assert reader.next_request() is None

    for raw, kind in [(b"x" * (peerapi.MAX_HEAD + 1), "head_too_large"),
                      (b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (peerapi.MAX_QUERY + 1), "body_too_large"),
                      (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked"),
                      (b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", "bad_head"),  # a digit, not ASCII
                      (b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", "body_too_large"),
                      (b"BREW\r\n\r\n", "bad_head"), (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", "bad_head")]:
        bad = RequestReader()
        bad.feed(raw)
        got = bad.next_request()
        assert isinstance(got, BadRequest) and got.kind == kind, raw[:40]


def test_resolv_conf_gives_its_first_nameserver() -> None:
    text = "# generated\nsearch x\nnameserver  fe80::1%eth0\nnameserver 1.1.1.1\n"
    assert peerapi.resolv_conf_nameserver(text) == ipaddress.ip_address("fe80::1")
    assert peerapi.resolv_conf_nameserver("nameserver nonsense\n") is None


# ---------------------------------------------------------------- driver
def _answer_for(wire: bytes, address: str = "198.51.100.7") -> bytes:
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(query.question[0].name, 30, "IN", "A", address))
    return bytes(response.to_wire())


class _Opener:
    def __init__(self, stack: Any) -> None:
        self.stack = stack

    async def open_tcp_stream(self, host: str, port: int) -> Any:
        return await self.stack.open_tcp_stream(host, port)


async def _serve(server: PeerApiServer, b: Any, nursery: trio.Nursery) -> str:
    server.listen(b, [B4])
    nursery.start_soon(server.serve)
    return f"http://{B4}:{server.port4}/dns-query"


def _server(access: Access | None = None,
            ask: Callable[[bytes], Awaitable[bytes]] | None = None) -> PeerApiServer:
    async def answer(wire: bytes) -> bytes:
        return _answer_for(wire)

    granted = access or Access(frozenset({B4}), False, True, True)
    return PeerApiServer(lambda ip: granted if ip == A4 else None, ask or answer)


async def test_a_peer_resolves_through_the_server_with_trionets_doh_client() -> None:
    server = _server()
    async with linked_stacks() as (a, b), trio.open_nursery() as nursery:
        url = await _serve(server, b, nursery)
        reply = dns.message.from_wire(await doh_query(_Opener(a), url, QUERY))
        assert reply.answer[0][0].address == "198.51.100.7"
        nursery.cancel_scope.cancel()
    assert server.stats["dns_answers"] == 1 and server.services()[0]["Proto"] == "peerapi4"


async def test_refusals_reach_the_client_and_are_counted() -> None:
    async def broken(wire: bytes) -> bytes:
        raise TransportError("no resolver")

    denied = _server(Access(frozenset({B4}), False, True, caller_may_use_internet=False))
    failing = _server(ask=broken)
    async with linked_stacks() as (a, b), trio.open_nursery() as nursery:
        url = await _serve(denied, b, nursery)
        with pytest.raises(DohError, match="403"):
            await doh_query(_Opener(a), url, QUERY)
        denied_port = denied.port4
        nursery.cancel_scope.cancel()
    assert denied.stats["dns_denied"] == 1 and denied_port
    async with linked_stacks() as (a, b), trio.open_nursery() as nursery:
        url = await _serve(failing, b, nursery)
        with pytest.raises(DohError, match="500"):
            await doh_query(_Opener(a), url, QUERY)
        nursery.cancel_scope.cancel()
    assert failing.stats["dns_failed"] == 1


async def test_an_unknown_caller_is_cut_off_and_a_slow_resolver_is_a_500(autojump_clock: Any) -> None:
    async def slow(wire: bytes) -> bytes:
        await trio.sleep(30)
        return wire

    stranger = PeerApiServer(lambda ip: None, slow)
    async with linked_stacks() as (a, b), trio.open_nursery() as nursery:
        url = await _serve(stranger, b, nursery)
        with pytest.raises(TransportError):
            await doh_query(_Opener(a), url, QUERY)
        nursery.cancel_scope.cancel()
    assert stranger.stats["unknown_peer"] == 1
    slowpoke = _server(ask=slow)
    async with linked_stacks() as (a, b), trio.open_nursery() as nursery:
        url = await _serve(slowpoke, b, nursery)
        with pytest.raises(DohError, match="500"):
            await doh_query(_Opener(a), url, QUERY)
        nursery.cancel_scope.cancel()
    assert slowpoke.stats["dns_timeout"] == 1


async def test_slow_and_surplus_clients_are_bounded(autojump_clock: Any) -> None:
    server = _server()
    async with linked_stacks() as (a, b), trio.open_nursery() as nursery:
        await _serve(server, b, nursery)
        idle = [await a.open_tcp_stream(B4, server.port4) for _ in range(MAX_CONNECTIONS + 1)]
        await trio.sleep(1)
        assert server.stats["too_many_connections"] == 1
        assert server.statistics()["connections_open"] == MAX_CONNECTIONS
        await idle[0].send_all(b"POST /dns-query HTTP/1.1\r\n")  # and never the rest
        await trio.sleep(90)  # past the request and idle timeouts
        assert server.stats["slow_request"] == 1 and server.stats["idle"] == MAX_CONNECTIONS - 1
        assert server.statistics()["connections_open"] == 0
        for stream in idle:
            await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()


async def test_the_host_resolver_is_asked_over_tcp() -> None:
    asked: list[str] = []

    async def resolver(stream: trio.SocketStream) -> None:
        head = await stream.receive_some(2)
        (size,) = struct.unpack("!H", head[:2])
        wire = head[2:]
        while len(wire) < size:
            wire += await stream.receive_some(size - len(wire))
        asked.append(dns.message.from_wire(wire).question[0].name.to_text())
        out = _answer_for(wire, "192.0.2.9")
        await stream.send_all(struct.pack("!H", len(out)) + out)

    magic = MagicDns()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, resolver, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        reply = await magic.ask_host_resolver(QUERY, (ipaddress.ip_address("127.0.0.1"), port))
        assert dns.message.from_wire(reply).answer[0][0].address == "192.0.2.9"
        assert asked == ["web.outside.test."]
        with pytest.raises(TransportError):
            await magic.ask_host_resolver(b"junk", (ipaddress.ip_address("127.0.0.1"), port))
        nursery.cancel_scope.cancel()


@given(st.lists(st.binary(max_size=300), max_size=6),
       st.sampled_from([b"POST /dns-query HTTP/1.1\r\nHost: peer\r\nContent-Type: application/dns-message\r\n",
                        b"GET /dns-query?dns=", b""]))
def test_no_input_makes_the_core_raise(chunks: list[bytes], prefix: bytes) -> None:
    """Whatever a peer sends, the reader and the decision return; nothing raises."""
    reader = RequestReader()
    reader.feed(prefix)
    for chunk in chunks:
        reader.feed(chunk)
        while isinstance(got := reader.next_request(), Request):
            assert isinstance(decide(got, _access()), (Reply, AskResolver))
        if isinstance(got, BadRequest):
            break


async def test_http2_with_prior_knowledge_is_served_too() -> None:
    import h2.config
    import h2.connection
    import h2.events

    server = _server()
    async with linked_stacks() as (a, b), trio.open_nursery() as nursery:
        await _serve(server, b, nursery)
        stream = await a.open_tcp_stream(B4, server.port4)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        for stream_id in (1, 3):  # two queries on one connection
            client.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":path", "/dns-query"),
                                            (":authority", f"{B4}:{server.port4}"),
                                            ("content-type", "application/dns-message")])
            client.send_data(stream_id, QUERY, end_stream=True)
        await stream.send_all(client.data_to_send())
        answers: dict[int, tuple[str, bytes]] = {}
        status: dict[int, str] = {}
        bodies: dict[int, bytes] = {}
        with trio.fail_after(10):
            while len(answers) < 2:
                for event in client.receive_data(await stream.receive_some(65536)):
                    if isinstance(event, h2.events.ResponseReceived):
                        status[event.stream_id] = dict(event.headers)[b":status"].decode()
                    elif isinstance(event, h2.events.DataReceived):
                        client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                    elif isinstance(event, h2.events.StreamEnded):
                        answers[event.stream_id] = (status[event.stream_id], bodies[event.stream_id])
                await stream.send_all(client.data_to_send())
        assert {sid: st for sid, (st, _) in answers.items()} == {1: "200", 3: "200"}
        assert dns.message.from_wire(answers[1][1]).answer[0][0].address == "198.51.100.7"
        await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()
    assert server.stats["h2c_connections"] == 1 and server.stats["dns_answers"] == 2


def test_a_broken_http2_stream_ends_the_connection_without_raising() -> None:
    session = peerapi.H2cSession()
    assert session.feed(peerapi.H2_PREFACE + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x") == []  # DATA on stream 0
    assert session.failed is not None and session.failed.kind == "h2_protocol"


@given(st.lists(st.binary(max_size=200), max_size=5))
def test_no_http2_input_makes_the_session_raise(chunks: list[bytes]) -> None:
    session = peerapi.H2cSession()
    session.feed(peerapi.H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an empty SETTINGS
    for chunk in chunks:
        for _, request in session.feed(chunk):
            assert isinstance(request, (Request, BadRequest))
    assert isinstance(session.data_to_send(), bytes)


async def test_the_port_skips_one_taken_now_and_one_serve_will_take() -> None:
    first, second, third = peerapi.peerapi_port_candidates(B4)[:3]
    server = _server()
    async with linked_stacks() as (_, b):
        b.listen_tcp(first)  # taken already
        server.listen(b, [B4], reserved={second})  # --serve asked for it: left free
        assert server.port4 == third
        b.listen_tcp(second)  # the --serve listener starts later and gets its port
