"""DERP over TLS: the server writes about one TLS record per packet; one receive on
our link returns every record already buffered, not one per call."""

from __future__ import annotations

import ssl
from pathlib import Path

import trio
import trio.testing

from tests.realstack import make_tls
from trionet.derp.driver import _StreamLink


def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    make_tls(tmp_path, ["127.0.0.1"])  # the real stack's throwaway CA; "localhost" is a SAN
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    return server, ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))


async def test_buffered_records_come_back_in_one_receive(tmp_path: Path) -> None:
    server_ctx, client_ctx = tls_contexts(tmp_path)
    left, right = trio.testing.memory_stream_pair()
    server = trio.SSLStream(left, server_ctx, server_side=True)
    client = trio.SSLStream(right, client_ctx, server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    link = _StreamLink(client)
    records = [bytes([i]) * 1300 for i in range(20)]
    for record in records:
        await server.send_all(record)  # one TLS record each, as Go's DERP server flushes
    assert await link.receive_some() == b"".join(records)
    await server.send_all(b"later")
    assert await link.receive_some() == b"later"
    await server.aclose()
    assert await link.receive_some() == b""
