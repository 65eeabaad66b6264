"""`TailnetTransport`: httpx.AsyncClient under Trio, over the node's netstack.

The client runs against `LinkedNode` (tests/unit/library/tailnet.py): the
requests go through httpx, httpcore's pool and our backend into a real NetStack
and out of the linked peer's, where `HttpPeer` answers.
"""

from __future__ import annotations

import datetime
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.unit.library.tailnet import BLACK_HOLE, HTTP, REFUSED, HttpPeer, LinkedNode, linked_node
from trionet.httpx_transport import TailnetTransport

PAGE = f"http://peer:{HTTP}"


async def eventually(cond: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    with trio.move_on_after(limit):
        while not cond():
            await trio.sleep(0.005)
    assert cond(), what


def test_import_trionet_does_not_import_httpx() -> None:
    code = ("import sys, trionet, trionet.node, trionet.threaded, trionet.forwarding; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'httpcore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


async def test_requests_reach_a_tailnet_name_and_reuse_one_keep_alive_connection(tmp_path: Path) -> None:
    async with linked_node(tmp_path) as node, httpx.AsyncClient(transport=TailnetTransport(node)) as client:
        first = await client.get(f"{PAGE}/")
        big = await client.get(f"{PAGE}/300000")
        assert (first.status_code, first.text) == (200, "hello")
        assert big.content == b"x" * 300_000
        assert node.http.connections == 1
        assert first.extensions["network_stream"].get_extra_info("server_addr") == ("10.0.0.2", HTTP)


async def test_a_pooled_connection_the_server_closed_is_not_reused(tmp_path: Path) -> None:
    async with linked_node(tmp_path) as node, httpx.AsyncClient(transport=TailnetTransport(node)) as client:
        assert (await client.get(f"{PAGE}/close-silently")).text == "hello"
        assert node.stack is not None

        def fin_arrived() -> bool:
            assert node.stack is not None
            return all(conn.fin_received for conn in node.stack.core.conns.values())

        await eventually(fin_arrived, "the server's FIN reached the idle pooled connection")
        assert (await client.get(f"{PAGE}/")).text == "hello"  # on a new connection, not the dead one
        assert node.http.connections == 2


async def test_unknown_names_and_refused_ports_are_connect_errors(tmp_path: Path) -> None:
    async with linked_node(tmp_path) as node, httpx.AsyncClient(transport=TailnetTransport(node)) as client:
        with pytest.raises(httpx.ConnectError, match="unknown peer 'nosuch'"):
            await client.get("http://nosuch/")
        with pytest.raises(httpx.ConnectError, match="refused"):
            await client.get(f"http://peer:{REFUSED}/")


async def test_a_peer_that_does_not_answer_is_a_connect_timeout(tmp_path: Path) -> None:
    async with linked_node(tmp_path) as node, httpx.AsyncClient(transport=TailnetTransport(node)) as client:
        with pytest.raises(httpx.ConnectTimeout):
            await client.get(f"http://{BLACK_HOLE}/", timeout=0.5)
        await eventually(lambda: node.tcp_connections() == 0, "the half-open connection was aborted")


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def _serve_https(node: LinkedNode, port: int, server_ctx: ssl.SSLContext, http: HttpPeer,
                       nursery: trio.Nursery) -> None:
    assert node.peer_stack is not None
    async with node.peer_stack.listen_tcp(port) as listener:
        while True:
            nursery.start_soon(http.serve, trio.SSLStream(await listener.accept(), server_ctx, server_side=True))


async def test_https_verifies_the_tailnet_peer_certificate(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path, "peer")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)
    https = HttpPeer()
    async with linked_node(tmp_path) as node, trio.open_nursery() as nursery:
        nursery.start_soon(_serve_https, node, 8443, server_ctx, https, nursery)
        await trio.testing.wait_all_tasks_blocked()
        trusting = TailnetTransport(node, verify=ssl.create_default_context(cafile=str(cert_file)))
        async with httpx.AsyncClient(transport=trusting) as client:
            page = await client.get("https://peer:8443/")
            assert page.text == "hello"
            assert page.extensions["network_stream"].get_extra_info("ssl_object") is not None
        async with httpx.AsyncClient(transport=TailnetTransport(node)) as client:  # the system CAs
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get("https://peer:8443/")
        assert https.connections == 2
        nursery.cancel_scope.cancel()
