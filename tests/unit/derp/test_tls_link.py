"""DERP over TLS through our own TlsStream (an SSLObject over memory BIOs on a Trio
stream; public API only). The server writes about one TLS record per packet; one
receive on the link returns every record already buffered, not one per call."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.realstack import make_tls
from trionet.derp.transport import StreamLink, TlsStream


def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    make_tls(tmp_path, ["127.0.0.1"])  # the real stack's throwaway CA; "localhost" is a SAN
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    return server, ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))


async def connected(tmp_path: Path) -> tuple[trio.SSLStream[trio.abc.Stream], TlsStream, trio.abc.Stream]:
    """(the server's trio.SSLStream, our client, the server's raw transport)."""
    server_ctx, client_ctx = tls_contexts(tmp_path)
    left, right = trio.testing.memory_stream_pair()
    server = trio.SSLStream(left, server_ctx, server_side=True)
    client = TlsStream(right, client_ctx, server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    return server, client, left


async def test_buffered_records_come_back_in_one_receive(tmp_path: Path) -> None:
    server, client, _ = await connected(tmp_path)
    link = StreamLink(client)
    records = [bytes([i]) * 1300 for i in range(20)]
    for record in records:
        await server.send_all(record)  # one TLS record each, as Go's DERP server flushes
    assert await link.receive_some() == b"".join(records)
    await server.send_all(b"later")
    assert await link.receive_some() == b"later"
    await server.aclose()  # close_notify
    assert await link.receive_some() == b""


async def test_max_bytes_is_respected_and_the_rest_follows(tmp_path: Path) -> None:
    server, client, _ = await connected(tmp_path)
    await server.send_all(b"a" * 300)
    await server.send_all(b"b" * 300)
    first = await client.receive_some(100)
    assert first == b"a" * 100
    rest = b""
    while len(rest) < 500:
        rest += await client.receive_some(1000)
    assert rest == b"a" * 200 + b"b" * 300


async def test_sending_while_a_receive_waits_and_both_directions_arrive(tmp_path: Path) -> None:
    server, client, _ = await connected(tmp_path)
    got: list[bytes] = []

    async def read_one() -> None:
        got.append(await client.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_one)
        await trio.testing.wait_all_tasks_blocked()  # the reader waits on the transport
        big = bytes(range(256)) * 200  # several TLS records
        await client.send_all(memoryview(big))
        echoed = b""
        while len(echoed) < len(big):
            echoed += await server.receive_some()
        assert echoed == big
        await server.send_all(b"pong")
    assert got == [b"pong"]


async def test_eof_without_close_notify_is_eof(tmp_path: Path) -> None:
    server, client, server_transport = await connected(tmp_path)
    await server.send_all(b"last words")
    await server_transport.aclose()  # the TCP side ends with no close_notify: https-compatible EOF
    assert await client.receive_some() == b"last words"
    assert await client.receive_some() == b""


async def test_aclose_sends_close_notify(tmp_path: Path) -> None:
    server, client, _ = await connected(tmp_path)
    await client.aclose()
    assert await server.receive_some() == b""  # the server read our close_notify
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()


async def test_a_record_that_does_not_decrypt_breaks_the_stream(tmp_path: Path) -> None:
    _, client, server_transport = await connected(tmp_path)
    await server_transport.send_all(b"\x17\x03\x03\x00\x20" + b"\x55" * 32)  # application data, forged
    with pytest.raises(trio.BrokenResourceError) as info:
        await client.receive_some()
    assert isinstance(info.value.__cause__, ssl.SSLError)


async def test_a_certificate_for_another_name_is_refused(tmp_path: Path) -> None:
    server_ctx, client_ctx = tls_contexts(tmp_path)
    left, right = trio.testing.memory_stream_pair()
    server = trio.SSLStream(left, server_ctx, server_side=True)
    client = TlsStream(right, client_ctx, server_hostname="derp.example")
    server_saw: list[BaseException] = []

    async def serve() -> None:
        try:
            await server.do_handshake()
        except trio.BrokenResourceError as exc:
            server_saw.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        with pytest.raises(trio.BrokenResourceError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.do_handshake()
    assert "ALERT" in str(server_saw[0].__cause__).upper(), "our alert told the server why"
